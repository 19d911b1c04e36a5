"""alexnet_jax.pool: the max-pool gradient against XLA's select-and-scatter."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alexnet_jax import pool


@pytest.mark.parametrize('shape,window,stride', [
    ((2, 55, 55, 3), 3, 2),  # pool1 (overlapping, §3.4)
    ((2, 13, 13, 4), 3, 2),  # pool5
    ((2, 12, 13, 3), 2, 2),  # the no_overlap ablation
    ((2, 11, 12, 3), 3, 1),
    ((2, 14, 15, 2), 2, 3),  # window < stride: rows no window sees
    ((2, 16, 16, 2), 5, 2),
])
def test_gradient_equals_select_and_scatter_with_ties(shape, window, stride):
  """Inputs drawn from {0..3} tie in almost every window: the gradient must
  go to the first maximum in row-major order, as XLA's does, exactly."""
  x = jnp.asarray(np.random.default_rng(window * 10 + stride).integers(
      0, 4, size=shape).astype(np.float32))
  out_shape = pool.xla_max_pool(x, window, stride).shape
  w = jnp.arange(1.0, 1.0 + np.prod(out_shape)).reshape(out_shape)
  ours = jax.grad(lambda x: jnp.sum(pool.max_pool(x, window, stride) * w))(x)
  xla = jax.grad(lambda x: jnp.sum(pool.xla_max_pool(x, window, stride) * w))(x)
  np.testing.assert_array_equal(ours, xla)
  np.testing.assert_array_equal(pool.max_pool(x, window, stride),
                                pool.xla_max_pool(x, window, stride))
