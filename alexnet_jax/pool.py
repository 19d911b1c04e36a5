"""Max pooling with a gradient that is cheap on XLA:CPU.

XLA's gradient of a max-pool (select-and-scatter) is slow on the CPU
(docs/BENCHMARKS.md has the figures); the hand-written one is not: for each
of the window's w*w taps, the pooled gradient goes to the input that tap saw
wherever that input is the window's maximum and no earlier tap was, i.e. to
the first maximum in row-major order, exactly as select-and-scatter does.
The taps' gradients are summed per stride phase at the pooled size and
interleaved once. On GPU and TPU XLA's own is used (alexnet_jax/
backends.py).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from alexnet_jax import backends


def xla_max_pool(x, window, stride):
  """The same pooling, differentiated by XLA (select-and-scatter)."""
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, window, window, 1),
                           (1, stride, stride, 1), 'VALID')


def max_pool(x, window: int, stride: int, grad: str = 'auto'):
  """window x window max-pooling at `stride`, no padding (NHWC); its
  gradient hand-written or XLA's (backends.custom_gradient(grad))."""
  if backends.custom_gradient(grad, 'model.max_pool_grad'):
    return _max_pool(x, window, stride)
  return xla_max_pool(x, window, stride)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _max_pool(x, window: int, stride: int):
  return xla_max_pool(x, window, stride)


def _max_pool_fwd(x, window, stride):
  y = xla_max_pool(x, window, stride)
  return y, (x, y)


def _max_pool_bwd(window, stride, residuals, dy):
  x, y = residuals
  b, ho, wo, c = y.shape
  zero = jnp.zeros((), dy.dtype)
  # Input row stride*(h + oi) + pi, for tap i = stride*oi + pi, gets output
  # row h's gradient: the taps of one phase (pi, pj) add up on a grid of
  # pooled size (plus `reach`), and the stride x stride phase grids then
  # interleave into the input's shape in one pass, instead of one full-size
  # scatter per tap.
  reach = (window - 1) // stride
  grids = {}
  taken = jnp.zeros(y.shape, bool)
  for i in range(window):
    for j in range(window):
      # The inputs tap (i, j) saw; the gradient goes to them where they are
      # the window's first maximum.
      seen = lax.slice(x, (0, i, j, 0),
                       (b, i + (ho - 1) * stride + 1,
                        j + (wo - 1) * stride + 1, c), (1, stride, stride, 1))
      first_max = (seen == y) & ~taken
      taken = taken | first_max
      (oi, pi), (oj, pj) = divmod(i, stride), divmod(j, stride)
      grad = lax.pad(jnp.where(first_max, dy, zero), zero,
                     ((0, 0, 0), (oi, reach - oi, 0), (oj, reach - oj, 0),
                      (0, 0, 0)))
      grids[pi, pj] = grids[pi, pj] + grad if (pi, pj) in grids else grad
  gh, gw = ho + reach, wo + reach
  empty = jnp.zeros((b, gh, gw, c), dy.dtype)  # A phase no tap reaches.
  dx = jnp.stack([jnp.stack([grids.get((pi, pj), empty)
                             for pj in range(stride)], axis=3)
                  for pi in range(stride)], axis=2)
  dx = dx.reshape(b, gh * stride, gw * stride, c)
  h, w = x.shape[1:3]  # Cut to the input, or extend over rows no window saw.
  return (lax.pad(dx, zero, ((0, 0, 0), (0, h - gh * stride, 0),
                             (0, w - gw * stride, 0), (0, 0, 0))),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
