"""Train-step speed of the full AlexNet (224 crops), and the machine's float32
matmul rate measured in the same run.

  python benchmarks/train_step.py [--batch=32] [--mesh=1,1] [--steps=5]
  python benchmarks/train_step.py --grouped_conv   # towers on one device

--mesh=D,T runs on a (data=D, tower=T) mesh; on a CPU with fewer devices it
makes D*T fake devices that share the machine's cores.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from alexnet_jax import startup  # pylint: disable=g-import-not-at-top,wrong-import-position

# A training step costs ~3x the forward pass: 3 x 1.45 GFLOP (docs/PAPER.md).
FLOP_PER_IMAGE = 4.35e9


def timed(fn, *args, repeats):
  """Best wall time and best process CPU time of `repeats` calls, after one
  warm-up call. On a machine shared with other jobs the CPU time (all of this
  process's threads) is the steadier measure of the work done."""
  import jax
  jax.block_until_ready(fn(*args))
  wall = cpu = float('inf')
  for _ in range(repeats):
    t, c = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn(*args))
    wall = min(wall, time.perf_counter() - t)
    cpu = min(cpu, time.process_time() - c)
  return wall, cpu


def matmul(n=4096, dtype='float32'):
  """(an n x n x n matrix product at the default precision, its operand, its
  FLOPs); on NVIDIA GPUs XLA runs float32 products on the TF32 tensor cores."""
  import jax
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
  return jax.jit(lambda a: a @ a), a, 2 * n**3


def mesh_shape(arg):
  """'D,T' -> (D, T); on a CPU, asks XLA for D*T fake devices (before JAX
  starts) when the mesh needs more than one."""
  d, t = (int(x) for x in arg.split(','))
  if d * t > 1 and 'cpu' in os.environ.get('JAX_PLATFORMS', 'cpu'):
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               f' --xla_force_host_platform_device_count={d*t}')
  return d, t


def full_step(batch_size, d, t, dtype='float32', max_pool_grad='auto',
              lrn_grad='auto'):
  """(train step, state, random batch) of the full network (configs/alexnet.py)
  on a (data=d, tower=t) mesh."""
  import jax
  import numpy as np
  from alexnet_jax import mesh as mesh_lib
  from alexnet_jax import optimizer, train_step
  from alexnet_jax.model import create_model
  from configs.alexnet import get_config
  config = get_config()
  config.model.dtype = dtype
  config.model.max_pool_grad = max_pool_grad
  config.model.lrn_grad = lrn_grad
  size = config.data.crop_size
  model = create_model(config.model)
  mesh = mesh_lib.make_mesh(model.num_towers, t, d)
  tx = optimizer.create_optimizer(config.optim)
  state = train_step.create_train_state(model, tx, mesh,
                                        jax.random.PRNGKey(0), size)
  step = train_step.make_train_step(model, tx, mesh, state)
  rng = np.random.default_rng(0)
  batch = jax.device_put(
      {'images': rng.normal(0, 60, (batch_size, size, size, 3)).astype(
          np.float32),
       'labels': rng.integers(0, 1000, batch_size).astype(np.int32)},
      mesh_lib.data_sharding(mesh))
  return step, state, batch


def grouped_vs_split(batch):
  """conv2 of both towers on one device: one feature_group_count=2 conv vs
  two plain convs (forward + backward)."""
  import jax
  import jax.numpy as jnp
  from jax import lax
  key = jax.random.PRNGKey(0)
  x = jax.random.normal(key, (batch, 27, 27, 96))
  k = jax.random.normal(key, (2, 5, 5, 48, 128)) * 0.01
  conv = lambda x, k, g: lax.conv_general_dilated(
      x, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=g)

  def grouped(x, k):
    return conv(x, jnp.concatenate([k[0], k[1]], -1), 2).sum()

  def split(x, k):
    return sum(conv(x[..., 48 * t:48 * (t + 1)], k[t], 1).sum()
               for t in range(2))

  out = {}
  for name, f in (('grouped', grouped), ('split', split)):
    out[name] = timed(jax.jit(jax.grad(f, argnums=(0, 1))), x, k, repeats=3)[0]
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--mesh', default='1,1', help='data,tower')
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--grouped_conv', action='store_true')
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--max_pool_grad', default='auto',
                      choices=('auto', 'custom', 'xla'),
                      help='model.max_pool_grad (alexnet_jax/backends.py)')
  parser.add_argument('--lrn_grad', default='auto',
                      choices=('auto', 'custom', 'xla'),
                      help='model.lrn_grad (alexnet_jax/backends.py)')
  parser.add_argument('--matmul_size', type=int, default=4096)
  parser.add_argument('--concurrent_scheduler', action='store_true',
                      help="XLA:CPU's default concurrency-optimised scheduler "
                      'instead of the one launch.py uses (alexnet_jax/xla_cpu.py)')
  parser.add_argument('--ynn_convolutions', action='store_true',
                      help="XLA:CPU's default convolution library (YNNPACK) "
                      'instead of the one launch.py uses (XNNPACK)')
  args = parser.parse_args()
  startup.set_xla_flags(sequential_scheduler=not args.concurrent_scheduler,
                        xnn_convolutions=not args.ynn_convolutions)
  d, t = mesh_shape(args.mesh)
  import jax
  import numpy as np

  dev = jax.devices()[0]
  print(f'device: {dev.platform} {dev.device_kind}, {jax.device_count()} '
        f'device(s), {os.cpu_count()} CPU cores, jax {jax.__version__}')
  if args.grouped_conv:
    for name, s in grouped_vs_split(args.batch).items():
      print(f'conv2 fwd+bwd, both towers, batch {args.batch}, {name}: '
            f'{s * 1e3:.1f} ms')
    return

  step, state, batch = full_step(args.batch, d, t, args.dtype,
                                 args.max_pool_grad, args.lrn_grad)
  mm, a, mm_flops = matmul(args.matmul_size, args.dtype)
  state, m = step(state, batch)  # Compile and warm up.
  jax.block_until_ready(m)
  # Each step is followed by the matmul (one to warm up: the first after a
  # step runs up to 10% slower; then the best of two), and each ratio is
  # taken between the two: the VM's speed drifts by 20% within minutes.
  rows = []  # (step wall, step CPU, matmul wall, matmul CPU) seconds
  for _ in range(args.steps):
    t0, c0 = time.perf_counter(), time.process_time()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    rows.append((time.perf_counter() - t0, time.process_time() - c0,
                 *timed(mm, a, repeats=2)))
  step_s, step_cpu, mm_s, mm_cpu = np.median(rows, axis=0)
  rate, rate_cpu = mm_flops / mm_s, mm_flops / mm_cpu
  flops = args.batch * FLOP_PER_IMAGE
  ratio, ratio_cpu = np.median(
      [((flops / w) / (mm_flops / mw), (flops / c) / (mm_flops / mc))
       for w, c, mw, mc in rows], axis=0)
  n = args.matmul_size
  # Process CPU time measures the work only where the CPU does it.
  on_cpu = dev.platform == 'cpu'
  from alexnet_jax import backends
  grads = {name: ('custom' if backends.custom_gradient(choice, name) else
                  'xla') for name, choice in (('max-pool', args.max_pool_grad),
                                              ('LRN', args.lrn_grad))}
  print(f'mesh (data={d}, tower={t}), batch {args.batch}, {args.dtype}, '
        + (f'{"concurrent" if args.concurrent_scheduler else "sequential"} '
           f'scheduler, {"YNN" if args.ynn_convolutions else "XNN"}PACK '
           'convolutions, ' if on_cpu else '') +
        ', '.join(f'{v} {k} gradient' for k, v in grads.items()) + ': '
        f'{step_s * 1e3:.1f} ms/step '
        f'(median of {args.steps}), {args.batch / step_s:.1f} images/s, '
        f'{flops / step_s / 1e9:.1f} GFLOP/s' +
        (f'; {step_cpu:.2f} CPU-s/step' if on_cpu else ''))
  print(f'{args.dtype} matmul {n}x{n}: {rate / 1e9:.1f} GFLOP/s wall' +
        (f', {rate_cpu / 1e9:.1f} GFLOP per CPU-s' if on_cpu else '') +
        ' (median of the best of two after each step)')
  print(f'train step / matmul rate (median over the pairs): {ratio:.1%} by '
        'wall time' + (f', {ratio_cpu:.1%} by CPU time' if on_cpu else ''))

if __name__ == '__main__':
  main()
