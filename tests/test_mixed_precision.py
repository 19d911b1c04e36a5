"""bfloat16 activations and matmuls, float32 parameters and optimizer state."""

import jax
import jax.numpy as jnp
import numpy as np

from alexnet_jax import mesh as mesh_lib
from alexnet_jax import optimizer, train_step
from alexnet_jax.model import AlexNet
from configs.alexnet import get_config

BF16_EPS = 2.0**-8  # bfloat16 keeps 8 significant bits.


def one_step(dtype):
  model = AlexNet(num_classes=10, width_multiplier=0.25, fc_features=64,
                  dtype=dtype, dropout_rate=0.0)
  mesh = mesh_lib.make_mesh(2, 2, 2)
  tx = optimizer.create_optimizer(get_config().optim)
  state = train_step.create_train_state(model, tx, mesh,
                                        jax.random.PRNGKey(0), 99)
  init = jax.device_get(state.params)
  step = train_step.make_train_step(model, tx, mesh, state)
  rng = np.random.default_rng(0)
  batch = {'images': rng.normal(0, 60, (8, 99, 99, 3)).astype(np.float32),
           'labels': rng.integers(0, 10, 8).astype(np.int32)}
  state, metrics = step(state, batch)
  update = jax.tree.map(lambda a, b: a - b, jax.device_get(state.params), init)
  return state, metrics, update


def test_bfloat16_step_within_expected_error_of_float32():
  s32, m32, u32 = one_step('float32')
  s16, m16, u16 = one_step('bfloat16')
  # Parameters and momentum stay float32.
  for leaf in jax.tree.leaves((s16.params, s16.opt_state)):
    assert leaf.dtype in (jnp.float32, jnp.int32, jnp.uint32), leaf.dtype
  # Logits (and so the loss) come out of the bf16 network in float32.
  assert m16['loss'].dtype == jnp.float32
  model = AlexNet(num_classes=10, width_multiplier=0.25, fc_features=64,
                  dtype='bfloat16')
  images = jax.ShapeDtypeStruct((2, 99, 99, 3), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
  assert jax.eval_shape(model.apply, params, images).dtype == jnp.float32
  loss32, loss16 = float(m32['loss']), float(m16['loss'])
  assert abs(loss16 - loss32) <= 4 * BF16_EPS * loss32
  flat32 = np.concatenate([np.ravel(x) for x in jax.tree.leaves(u32)])
  flat16 = np.concatenate([np.ravel(x) for x in jax.tree.leaves(u16)])
  err = np.linalg.norm(flat16 - flat32) / np.linalg.norm(flat32)
  # Rounding at 8 bits, compounded through ~8 layers forward and back; yet
  # really rounded (a float32 run would agree to ~1e-6).
  assert 1e-4 < err < 16 * BF16_EPS, err
  for layer in ('fc6', 'fc7', 'fc8'):  # Long sums in float32: ~eps.
    a, b = u16[layer]['kernel'], u32[layer]['kernel']
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 4 * BF16_EPS, layer
