"""Where a train step's time goes on XLA:CPU: per-op durations.

  python benchmarks/profile_step.py [--batch=32] [--mesh=1,1] [--top=40]
  python benchmarks/profile_step.py --ynn_convolutions  # convolutions too

Runs three steps of the full network under jax.profiler.trace, reads each
op's duration from the trace (the XPlane protobuf, parsed with the copy of
its schema that TensorFlow ships), and names each op by the jax operation
it came from (the compiled HLO's op_name metadata). XLA:CPU runs independent
ops concurrently, so op times add up to more than the step time and small
ops look slower than they are alone. The XNNPACK convolutions launch.py
asks for (alexnet_jax/xla_cpu.py) leave no events in the trace, so the
table leaves them out; --ynn_convolutions runs them as XLA's default
YNNPACK fusions, which it lists.
"""

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from alexnet_jax import startup  # pylint: disable=g-import-not-at-top,wrong-import-position


def op_times(trace_dir, steps):
  """{op name: ms per step} over the XLA:CPU worker threads."""
  from tensorflow.tsl.profiler.protobuf import xplane_pb2
  space = xplane_pb2.XSpace()
  path, = glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'),
                    recursive=True)
  with open(path, 'rb') as f:
    space.ParseFromString(f.read())
  times = collections.Counter()
  for plane in space.planes:
    for line in plane.lines:
      if not line.name.startswith('tf_XLA'):
        continue
      for event in line.events:
        name = plane.event_metadata[event.metadata_id].name
        if not name.startswith(('ThunkExecutor', 'SlinkyThreadPool', '$')):
          times[name] += event.duration_ps / 1e9 / steps
  return times


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--mesh', default='1,1', help='data,tower')
  parser.add_argument('--top', type=int, default=40)
  parser.add_argument('--ynn_convolutions', action='store_true',
                      help="XLA:CPU's default convolution library, whose "
                      'convolutions show in the trace')
  args = parser.parse_args()
  startup.set_xla_flags(xnn_convolutions=not args.ynn_convolutions)
  from train_step import full_step, mesh_shape  # benchmarks/train_step.py
  d, t = mesh_shape(args.mesh)
  import jax

  step, state, batch = full_step(args.batch, d, t)
  hlo = step.lower(state, batch).compile().as_text()
  for _ in range(2):  # Compile and warm up.
    state, m = step(state, batch)
    jax.block_until_ready(m)
  steps = 3
  with tempfile.TemporaryDirectory() as trace_dir:
    t0 = time.perf_counter()
    with jax.profiler.trace(trace_dir):
      for _ in range(steps):
        state, m = step(state, batch)
        jax.block_until_ready(m)
    wall = (time.perf_counter() - t0) / steps
    times = op_times(trace_dir, steps)

  where = {}
  for name, rest in re.findall(r'^\s*(?:ROOT )?%(\S+) = (.*)$', hlo, re.M):
    shape = rest.split(' ', 1)[0]
    op = re.search(r'op_name="([^"]*)"', rest)
    where[name] = (shape, op.group(1).split('/', 1)[-1] if op else '')
  print(f'mesh (data={d}, tower={t}), batch {args.batch}: {wall * 1e3:.0f} '
        f'ms/step under the profiler, {sum(times.values()):.0f} ms of op time')
  print(f'{"ms/step":>8}  {"op":<26} {"shape":<28} from')
  for name, ms in times.most_common(args.top):
    shape, op = where.get(name, ('', ''))
    print(f'{ms:8.1f}  {name[:26]:<26} {shape[:28]:<28} {op[-70:]}')


if __name__ == '__main__':
  main()
