#!/bin/bash
# The train-step benchmark on a GPU host, one process per configuration:
# float32 (TF32 products) and bfloat16 at batch 128 (the paper's) and 512,
# and alexnet_jax.pool's hand-written max-pool gradient against XLA's own
# (the default on GPU).
#
#   bash benchmarks/gpu.sh
set -u
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax',
  flax.__version__, 'optax', optax.__version__, jax.devices())"
for args in "--batch=128" "--batch=128 --dtype=bfloat16" \
            "--batch=512" "--batch=512 --dtype=bfloat16" \
            "--batch=128 --max_pool_grad=custom"; do
  python3 benchmarks/train_step.py $args --steps=30 --matmul_size=8192 \
    2>&1 | grep -v "^WARNING\|^I0000\|^E0000"
done
