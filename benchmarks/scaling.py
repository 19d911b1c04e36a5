"""Scaling on paper: bytes each device sends per step on the tower and data
axes at 1, 2, 8, 64 and 512 devices, the global batch each implies, and where
interconnect bandwidth, not compute, would set the step time.

  python benchmarks/scaling.py [--local_batch=128] [--dtype_bytes=4]

The traffic comes from the collective audit's figures (alexnet_jax/audit.py:
the exchanges of the layer table, checked against the compiled HLO by
tests/test_collectives.py) and the parameter count of each tower's share;
the hardware figures below are the vendors' published numbers.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# NVIDIA H100 SXM5 datasheet: dense tensor-core 989 TFLOP/s in BF16 and
# 494.5 in TF32 (the sheet's 1979 / 989 assume sparsity); NVLink 4 900 GB/s
# per GPU in total, i.e. 450 GB/s each way.
GPU_FLOPS = {2: 989e12, 4: 494.5e12}  # By bytes per activation.
NVLINK_BYTES_PER_S = 450e9
# DGX H100: one ConnectX-7 400 Gb/s InfiniBand NDR port per GPU = 50 GB/s.
NETWORK_BYTES_PER_S = 50e9
GPUS_PER_NODE = 8
# A train step costs ~3x the forward pass: 3 x 1.45 GFLOP per image (docs/PAPER.md).
FLOP_PER_IMAGE = 4.35e9
MFU = 0.5  # Assumed achieved fraction of peak for a small convnet.


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--local_batch', type=int, default=128,
                      help='images per data shard (the paper: 128 on its 2 '
                           'GPUs, each tower seeing all 128)')
  parser.add_argument('--dtype_bytes', type=int, default=4, choices=(2, 4),
                      help='4: float32 (TF32 matmuls), 2: bfloat16')
  args = parser.parse_args()
  import jax
  import numpy as np
  from alexnet_jax import audit
  from alexnet_jax.model import create_model
  from configs.alexnet import get_config

  config = get_config()
  model = create_model(config.model)
  size = config.data.crop_size
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((1, size, size, 3),
                                               np.float32))['params']
  t = model.num_towers
  # A device holding one tower keeps its share of every tower-local layer
  # and fc8's bias whole.
  per_device_params = sum(
      int(np.prod(x.shape)) // (1 if x.ndim == 1 else t)
      for x in jax.tree.leaves(params))
  table = audit.exchange_table(model, size)
  scale = args.dtype_bytes / 4  # The table counts float32.
  # Forward exchanges plus their backward (reduce-scatter of each gather).
  tower_per_image = scale * sum(
      r['bytes_received'] * (2 if r['kind'] == 'all-gather' else 1)
      for r in table)

  print(f'AlexNet, {size}x{size} crops, {args.local_batch} images per data '
        f'shard, {args.dtype_bytes}-byte activations/gradients; '
        f'{per_device_params:,} parameters per device.\n')
  print('| devices | mesh (data, tower) | global batch | tower axis, MB/step '
        '| data axis, MB/step | compute, ms | tower comm, ms | data comm, ms '
        '| limit |')
  print('|---:|---|---:|---:|---:|---:|---:|---:|---|')
  for n in (1, 2, 8, 64, 512):
    towers = t if n >= t else 1
    d = n // towers
    tower_bytes = tower_per_image * args.local_batch if towers > 1 else 0
    grad_bytes = args.dtype_bytes * per_device_params
    data_bytes = 2 * (d - 1) / d * grad_bytes  # Ring all-reduce.
    flops = GPU_FLOPS[args.dtype_bytes]
    compute = args.local_batch * FLOP_PER_IMAGE / towers / (flops * MFU)
    tower_s = tower_bytes / NVLINK_BYTES_PER_S  # Towers share a node.
    data_bw = NVLINK_BYTES_PER_S if n <= GPUS_PER_NODE else (
        NETWORK_BYTES_PER_S)
    data_s = data_bytes / data_bw
    limit = 'compute' if compute >= tower_s + data_s else (
        'data-axis bandwidth' if data_s >= tower_s else 'tower exchange')
    print(f'| {n} | ({d}, {towers}) | {d * args.local_batch:,} | '
          f'{tower_bytes / 1e6:,.1f} | {data_bytes / 1e6:,.1f} | '
          f'{compute * 1e3:.2f} | {tower_s * 1e3:.3f} | {data_s * 1e3:.2f} | '
          f'{limit} |')
  print(f'\nTower traffic per image (forward + backward): '
        f'{tower_per_image:,.0f} B; gradient bytes per device: '
        f'{args.dtype_bytes * per_device_params / 1e6:,.1f} MB. Compute at '
        f'{MFU:.0%} of {GPU_FLOPS[args.dtype_bytes] / 1e12:.0f} TFLOP/s; no overlap of '
        'communication with compute assumed.')


if __name__ == '__main__':
  main()
