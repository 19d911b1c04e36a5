"""Max pooling whose gradient is cheap on XLA:CPU.

XLA's gradient of a max-pool (select-and-scatter) runs ~3x slower on the CPU
than this one (docs/BENCHMARKS.md): for each of the window's w*w taps, the
pooled gradient goes to the input that tap saw wherever that input is the
window's maximum and no earlier tap was, i.e. to the first maximum in
row-major order, exactly as select-and-scatter does.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax


def _pool(x, window, stride):
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, window, window, 1),
                           (1, stride, stride, 1), 'VALID')


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def max_pool(x, window: int, stride: int):
  """window x window max-pooling at `stride`, no padding (NHWC)."""
  return _pool(x, window, stride)


def _max_pool_fwd(x, window, stride):
  y = _pool(x, window, stride)
  return y, (x, y)


def _max_pool_bwd(window, stride, residuals, dy):
  x, y = residuals
  b, ho, wo, c = y.shape
  h, w = x.shape[1:3]
  dx = jnp.zeros_like(x)
  taken = jnp.zeros(y.shape, bool)
  for i in range(window):
    for j in range(window):
      # The inputs tap (i, j) saw, and where the gradient goes back to them.
      seen = lax.slice(x, (0, i, j, 0),
                       (b, i + (ho - 1) * stride + 1,
                        j + (wo - 1) * stride + 1, c), (1, stride, stride, 1))
      first_max = (seen == y) & ~taken
      taken = taken | first_max
      grad = jnp.where(first_max, dy, jnp.zeros((), dy.dtype))
      dx = dx + lax.pad(grad, jnp.zeros((), dy.dtype), (
          (0, 0, 0), (i, h - i - (ho - 1) * stride - 1, stride - 1),
          (j, w - j - (wo - 1) * stride - 1, stride - 1), (0, 0, 0)))
  return (dx,)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
