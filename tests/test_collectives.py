"""Collective audit: what the compiled train step sends between devices."""

import jax
import jax.numpy as jnp
import numpy as np

from alexnet_jax import audit
from alexnet_jax import mesh as mesh_lib
from alexnet_jax import optimizer, train_step
from alexnet_jax.model import AlexNet
from configs.alexnet import get_config

SIZE, BATCH = 99, 8


def compiled_step(mesh, model):
  tx = optimizer.create_optimizer(get_config().optim)
  state = jax.eval_shape(lambda: train_step.create_train_state(
      model, tx, mesh, jax.random.PRNGKey(0), SIZE))
  step = train_step.make_train_step(model, tx, mesh, state)
  batch = {'images': jax.ShapeDtypeStruct((BATCH, SIZE, SIZE, 3), jnp.float32),
           'labels': jax.ShapeDtypeStruct((BATCH,), jnp.int32)}
  return step.lower(state, batch).compile().as_text(), state


def test_train_step_collectives_on_2x2_mesh():
  model = AlexNet(num_classes=10, width_multiplier=0.25, fc_features=64)
  mesh = mesh_lib.make_mesh(2, tower_axis_size=2, data_axis_size=2)
  hlo, state = compiled_step(mesh, model)
  found = audit.by_axis(audit.collectives(hlo), mesh)
  tower, data, other = found['tower'], found['data'], found['other']

  # Across towers: the forward exchanges at conv3, fc6, fc7 (all-gather) and
  # fc8 (all-reduce of partial logits), and the backward of each gather
  # (reduce-scatter). fc8's backward is a broadcast: no traffic.
  local_batch = BATCH // 2
  expected = [(r['kind'], r['floats_per_tower'])
              for r in audit.exchange_table(model, SIZE)]
  # By hand, per tower and image: pool2 5x5 maps x 32 kernels before conv3,
  # pool5 2x2 x 32 before fc6, 16 fc6 units before fc7, 10 logits at fc8.
  assert expected == [('all-gather', 800), ('all-gather', 128),
                      ('all-gather', 16), ('all-reduce', 10)]
  assert sorted((c.kind, c.elements // local_batch // (
      2 if c.kind == 'all-gather' else 1)) for c in tower) == sorted(
          expected + [('reduce-scatter', n) for k, n in expected
                      if k == 'all-gather'])
  assert [r['layer'] for r in audit.exchange_table(model, SIZE)] == [
      'conv3', 'fc6', 'fc7', 'fc8']
  for c in tower:
    assert 'AlexNet' in c.op_name, c.op_name  # Issued by the model itself.

  # Across data shards: one gradient reduction, holding each device's share
  # of every parameter (fc8's bias whole) and nothing of the other tower's.
  params = state.params
  local = sum(int(np.prod(x.shape)) // (1 if x.ndim == 1 else 2)
              for x in jax.tree.leaves(params))
  assert all(c.kind == 'all-reduce' for c in data)
  grad_elements = sum(c.elements for c in data)
  assert local <= grad_elements <= local + 16, (local, grad_elements)

  # Anything else is a scalar metric (loss, error rates, norms).
  for c in other:
    assert c.kind == 'all-reduce' and all(d == () for _, d in c.shapes), c


def test_one_tower_per_device_has_no_tower_traffic():
  """Both towers on each device (tower axis of size 1): pure data parallel."""
  model = AlexNet(num_classes=10, width_multiplier=0.25, fc_features=64)
  mesh = mesh_lib.make_mesh(2, tower_axis_size=1, data_axis_size=4)
  hlo, _ = compiled_step(mesh, model)
  found = audit.by_axis(audit.collectives(hlo), mesh)
  assert found['data']
  # The exchanges degenerate to single-device groups: nothing moves.
  for c in found['tower'] + found['other']:
    scalars = all(d == () for _, d in c.shapes)
    assert scalars or c.bytes_moved() == 0, c
