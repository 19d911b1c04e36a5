"""The paper's update rule, checked against numpy written from §5."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from alexnet_jax import optimizer


def config(**kw):
  c = ml_collections.ConfigDict(dict(
      learning_rate=0.01, momentum=0.9, weight_decay=5e-4, decay_biases=True,
      bias_lr_multiplier=1.0))
  c.update(kw)
  return c


def numpy_paper_rule(w, grads, lrs, decay_biases, bias_mult, m=0.9, wd=5e-4):
  """v <- m v - wd lr w - lr g; w <- w + v, per leaf, as the paper writes it."""
  w = {k: v.astype(np.float64) for k, v in w.items()}
  v = {k: np.zeros_like(x) for k, x in w.items()}
  for g, lr in zip(grads, lrs):
    for k in w:
      is_bias = k == 'bias'
      leaf_lr = lr * (bias_mult if is_bias else 1.0)
      leaf_wd = 0.0 if (is_bias and not decay_biases) else wd
      v[k] = m * v[k] - leaf_wd * leaf_lr * w[k] - leaf_lr * g[k]
      w[k] = w[k] + v[k]
  return w


@pytest.mark.parametrize('decay_biases,bias_mult', [(True, 1.0), (False, 2.0)],
                         ids=['paper', 'cuda-convnet'])
def test_matches_hand_written_rule_across_lr_drop(decay_biases, bias_mult):
  rng = np.random.default_rng(0)
  w0 = {'kernel': rng.normal(0, 0.01, (5, 4)).astype(np.float32),
        'bias': np.ones(4, np.float32)}
  grads = [{k: rng.normal(0, 1, v.shape).astype(np.float32)
            for k, v in w0.items()} for _ in range(6)]
  lrs = [0.01, 0.01, 0.01, 0.001, 0.001, 0.0001]  # Two drops by 10.

  tx = optimizer.create_optimizer(config(decay_biases=decay_biases,
                                         bias_lr_multiplier=bias_mult))
  params = jax.tree.map(jnp.asarray, w0)
  state = tx.init(params)
  for g, lr in zip(grads, lrs):
    state = optimizer.set_learning_rate(state, lr)
    updates, state = tx.update(g, state, params)
    params = optax.apply_updates(params, updates)
  assert float(optimizer.get_learning_rate(state)) == pytest.approx(1e-4)

  want = numpy_paper_rule(w0, grads, lrs, decay_biases, bias_mult)
  for k in w0:
    np.testing.assert_allclose(params[k], want[k], rtol=1e-5, atol=1e-7)

  # optax.sgd keeps lr outside the velocity: it differs after the drop, so
  # the comparison above can tell the two apart.
  sgd = optax.chain(optax.add_decayed_weights(5e-4),
                    optax.inject_hyperparams(optax.sgd)(learning_rate=0.01,
                                                        momentum=0.9))
  p2, s2 = jax.tree.map(jnp.asarray, w0), None
  s2 = sgd.init(p2)
  for g, lr in zip(grads, lrs):
    s2[1].hyperparams['learning_rate'] = jnp.asarray(lr)
    u, s2 = sgd.update(g, s2, p2)
    p2 = optax.apply_updates(p2, u)
  assert not np.allclose(p2['kernel'], want['kernel'], rtol=1e-3)
