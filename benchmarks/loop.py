"""The training loop's speed against its bare train step, in one run.

  python benchmarks/loop.py [--batch=32] [--steps=25] [--mesh=1,1] \
      [--dtype=float32] [--repeats=2]

The loop is the whole `train_and_evaluate` (launch.py's) on the paper's
network with config.data.dataset='synthetic': random images and labels made
on the devices, so no input pipeline; its images/s come from the run's own
metrics.jsonl (the progress intervals, the first two left out: step 1's
holds the compilation, the next one step 1's evaluation). The bare step is
the same jitted train step on the same mesh and batch, dispatched back to
back. Each is
measured `--repeats` times, alternating; the ratio of the medians says what
the loop's per-step host work costs (goal on the CPU at batch 32: >= 95%).
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from alexnet_jax import startup  # pylint: disable=g-import-not-at-top,wrong-import-position

startup.set_xla_flags()  # As launch.py: before JAX starts, on a CPU.


def loop_config(args):
  from configs import alexnet  # pylint: disable=g-import-not-at-top
  config = alexnet.get_config()
  config.data.dataset = 'synthetic'
  config.data.synthetic_eval_examples = args.batch  # One batch.
  config.model.dtype = args.dtype
  config.batch_size = args.batch
  config.mesh.data_axis_size, config.mesh.tower_axis_size = args.mesh
  config.total_steps = args.steps
  config.log_every_steps = args.log_every
  config.eval.every_epochs = 0.0  # The first and the last step only.
  config.checkpoint.every_epochs = 0.0  # The last step only.
  config.figures.enabled = False
  return config


def loop_rate(config) -> float:
  """Median images/s of a whole train_and_evaluate's progress intervals
  after the first two."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from alexnet_jax import train  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as workdir:
    train.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      rows = [json.loads(line) for line in f]
  rates = [r['images_per_sec'] for r in rows if r['split'] == 'train']
  return float(np.median(rates[2:]))  # [0]: step 1, [1]: holds its eval.


def bare_step(config):
  """A function timing `n` back-to-back train steps (images/s), on the
  loop's model, mesh and synthetic batches."""
  import jax  # pylint: disable=g-import-not-at-top
  from alexnet_jax import input_pipeline, mesh as mesh_lib, model as model_lib  # pylint: disable=g-import-not-at-top
  from alexnet_jax import optimizer, run_dir, train_step  # pylint: disable=g-import-not-at-top
  mesh = mesh_lib.make_mesh(config.model.num_towers,
                            config.mesh.tower_axis_size,
                            config.mesh.data_axis_size)
  model = model_lib.create_model(config.model)
  tx = optimizer.create_optimizer(config.optim)
  _, init = run_dir.abstract_train_state(config, model, tx, mesh)
  state = init()
  step = train_step.make_train_step(model, tx, mesh, state)
  batch = next(input_pipeline.synthetic_batches(config, mesh, 'train',
                                                forever=True))
  state, metrics = step(state, batch)  # Compile.
  jax.block_until_ready(metrics)

  def rate(n):
    nonlocal state
    t0 = time.perf_counter()
    for _ in range(n):
      state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    return n * config.batch_size / (time.perf_counter() - t0)
  return rate


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--steps', type=int, default=25)
  parser.add_argument('--log_every', type=int, default=5)
  parser.add_argument('--mesh', default='1,1', help='data,tower')
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--repeats', type=int, default=2)
  args = parser.parse_args()
  args.mesh = tuple(int(x) for x in args.mesh.split(','))
  if args.mesh[0] * args.mesh[1] > 1 and 'cpu' in os.environ.get(
      'JAX_PLATFORMS', 'cpu'):
    os.environ['XLA_FLAGS'] = (
        os.environ.get('XLA_FLAGS', '') +
        f' --xla_force_host_platform_device_count={args.mesh[0] * args.mesh[1]}')
  startup.quiet_libraries()
  startup.hide_gpus_from_tensorflow()
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  dev = jax.devices()[0]
  print(f'device: {dev.platform} {dev.device_kind}, {jax.device_count()} '
        f'device(s); host {platform.processor() or platform.machine()}, '
        f'{os.cpu_count()} cores; jax {jax.__version__}')
  config = loop_config(args)
  bare = bare_step(config)
  loops, bares = [], []
  for _ in range(args.repeats):
    bares.append(bare(args.steps - args.log_every))
    loops.append(loop_rate(config))
  bares.append(bare(args.steps - args.log_every))
  loop, step = float(np.median(loops)), float(np.median(bares))
  print(f'batch {args.batch}, {args.dtype}, mesh (data={args.mesh[0]}, '
        f'tower={args.mesh[1]}): loop {loop:.1f} images/s '
        f'(runs: {", ".join(f"{x:.1f}" for x in loops)}), bare step '
        f'{step:.1f} images/s (runs: {", ".join(f"{x:.1f}" for x in bares)});'
        f' loop / bare step = {loop / step:.1%}')


if __name__ == '__main__':
  main()
