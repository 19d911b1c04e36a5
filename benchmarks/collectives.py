"""Bytes each collective of the full AlexNet train step moves, per step and
per image, next to the figure worked out from the layer table.

  python benchmarks/collectives.py [--data=2 --towers=2 --batch=128]

Compiles (does not run) the paper's network at 224 crops on a (data, tower)
mesh of fake CPU devices and reads the collectives from the optimised HLO.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--data', type=int, default=2)
  parser.add_argument('--towers', type=int, default=2)
  parser.add_argument('--batch', type=int, default=128)
  args = parser.parse_args()
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_force_host_platform_device_count=%d' %
                             (args.data * args.towers))
  import jax
  import jax.numpy as jnp
  from alexnet_jax import audit, optimizer, train_step
  from alexnet_jax import mesh as mesh_lib
  from alexnet_jax.model import create_model
  from configs.alexnet import get_config

  config = get_config()
  size = config.data.crop_size
  model = create_model(config.model)
  mesh = mesh_lib.make_mesh(model.num_towers, args.towers, args.data)
  tx = optimizer.create_optimizer(config.optim)
  state = jax.eval_shape(lambda: train_step.create_train_state(
      model, tx, mesh, jax.random.PRNGKey(0), size))
  step = train_step.make_train_step(model, tx, mesh, state)
  batch = {'images': jax.ShapeDtypeStruct((args.batch, size, size, 3),
                                          jnp.float32),
           'labels': jax.ShapeDtypeStruct((args.batch,), jnp.int32)}
  found = audit.by_axis(
      audit.collectives(step.lower(state, batch).compile().as_text()), mesh)
  local_batch = args.batch // args.data
  table = audit.exchange_table(model, size)

  print(f'AlexNet train step, {size}x{size} crops, global batch {args.batch}, '
        f'mesh (data={args.data}, tower={args.towers}): bytes received per '
        'device (ring algorithms).\n')
  print('| axis | collective | from | array | per step | per image | '
        'layer table, per image |')
  print('|---|---|---|---|---:|---:|---:|')
  gathers = [r for r in table if r['kind'] == 'all-gather']
  rows = {'all-gather': iter(gathers), 'reduce-scatter': iter(gathers[::-1]),
          'all-reduce': iter(table[-1:])}
  for axis in ('tower', 'data', 'other'):
    for c in found[axis]:
      moved = c.bytes_moved()
      layer, expect = '', ''
      if axis == 'tower':
        r = next(rows[c.kind], None)
        if r:
          scale = 1 if args.towers > 1 else 0
          layer = r['layer'] + (' (backward)' if c.kind == 'reduce-scatter'
                                else '')
          expect = f"{r['bytes_received'] * scale:,}"
      elif axis == 'data':
        layer = 'gradients' if c.elements > 1000 else 'metrics'
      else:
        layer = 'metrics'
      shape = ', '.join(f'{t}{list(d)}' for t, d in c.shapes[:2]) + (
          f' (+{len(c.shapes) - 2} more)' if len(c.shapes) > 2 else '')
      print(f'| {axis} | {c.kind} | {layer} | {shape} | {moved:,} | '
            f'{moved / local_batch:,.0f} | {expect} |')
  tower = sum(c.bytes_moved() for c in found['tower'])
  data = sum(c.bytes_moved() for c in found['data'])
  print(f'\nTotal per step per device: tower axis {tower:,} B '
        f'({tower / local_batch:,.0f} B per image), data axis {data:,} B.')


if __name__ == '__main__':
  main()
