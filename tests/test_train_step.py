"""One sharded train step leaves the parameters one single-device step does."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from alexnet_jax import mesh as mesh_lib
from alexnet_jax import optimizer, train_step
from alexnet_jax.model import AlexNet
from configs.alexnet import get_config
from tests.reference import (fresh_rng, reference_train_in_float64, rel_err)

SIZE, BATCH, STEPS = 99, 8, 2


@pytest.mark.parametrize('shape', [(2, 2), (4, 2)], ids=str)
def test_sharded_steps_equal_reference_steps(shape):
  """Catches the classic shard_map mistakes: gradients summed rather than
  averaged over 'data', or counted twice over 'tower' (either doubles an
  update)."""
  seed, rng = fresh_rng()
  # As in reference.init_small: O(1) logits, healthy gradients.
  model = AlexNet(num_classes=10, width_multiplier=0.25, fc_features=64,
                  init_stddev=0.05)
  cfg = get_config().optim
  cfg.bias_lr_multiplier, cfg.decay_biases = 2.0, False  # Every switch on.
  tx = optimizer.create_optimizer(cfg)
  mesh = mesh_lib.make_mesh(2, shape[1], shape[0])
  batches = [{'images': rng.normal(0, 60, (BATCH, SIZE, SIZE, 3)).astype(
      np.float32), 'labels': rng.integers(0, 10, BATCH).astype(np.int32)}
             for _ in range(STEPS)]
  # Activations in float64 (parameters and optimizer state stay float32):
  # a max-pool's gradient jumps where a window's inputs nearly tie, and
  # float32 breaks such near-ties unlike the float64 reference.
  with jax.enable_x64(True):
    model64 = model.clone(dtype='float64')
    state = train_step.create_train_state(model64, tx, mesh,
                                          jax.random.PRNGKey(seed), SIZE)
    init_params = jax.device_get(state.params)
    base_rng = jax.device_get(state.rng)  # The state is donated.
    step = train_step.make_train_step(model64, tx, mesh, state)
    for b in batches:
      state, metrics = step(state, b)
    assert int(state.step) == STEPS
    assert state.params['fc6']['kernel'].dtype == np.float32

  # The same steps on one device, the reference network in float64.
  with jax.enable_x64(True):
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), init_params)
    opt_state = tx.init(params)
    for i, b in enumerate(batches):
      (loss, _), grads = reference_train_in_float64(
          model, params, b['images'], jnp.asarray(b['labels']),
          jax.random.fold_in(base_rng, i))
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
    grad_norm = float(optax.tree.norm(grads))  # The last step's, global.
    param_norm = float(optax.tree.norm(params))
    params = jax.device_get(params)

  assert float(metrics['loss']) == pytest.approx(float(loss), rel=1e-5)
  # Norms over every tower's and shard's parameters, not one device's.
  assert float(metrics['grad_norm']) == pytest.approx(grad_norm, rel=1e-4)
  assert float(metrics['param_norm']) == pytest.approx(param_norm, rel=1e-5)
  got = dict(jax.tree_util.tree_leaves_with_path(jax.device_get(state.params)))
  init = dict(jax.tree_util.tree_leaves_with_path(init_params))
  for path, want in jax.tree_util.tree_leaves_with_path(params):
    name = jax.tree_util.keystr(path)
    assert rel_err(got[path], want) <= 1e-5, (seed, name)
    # The update itself, small next to the weights, to 1e-4 of its size
    # plus float32 rounding of the weights.
    err = np.linalg.norm(got[path] - want)
    update = np.linalg.norm(want - init[path])
    assert err <= 1e-4 * update + 1e-7 * np.linalg.norm(init[path]), (
        seed, name, err, update)
