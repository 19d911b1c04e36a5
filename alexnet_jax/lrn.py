"""Local response normalisation (§3.3) with a hand-written gradient.

  b_i = a_i / (k + alpha * sum_{j=i-n//2}^{i+n//2} a_j^2)^beta

over the channels of one tower, the window clipped at the tower's channel
edges. The window sum is a matmul with a banded 0/1 matrix, which XLA runs as
fast as any dot. On the CPU the gradient is written by hand: two elementwise
passes around one band matmul, where autodiff keeps and re-reads several
intermediates (docs/BENCHMARKS.md has the figures); elsewhere it is
autodiff's (alexnet_jax/backends.py).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from alexnet_jax import backends


def lrn(x, *, k, n, alpha, beta, alpha_over_n=False, grad='auto'):
  """LRN of x (..., C) across its last axis; alpha / n if `alpha_over_n`
  (cuda-convnet2's and Caffe's convention; the paper's formula has alpha).
  The gradient is the hand-written one or autodiff's
  (backends.custom_gradient(grad))."""
  scale = alpha / n if alpha_over_n else alpha
  args = (x, float(k), int(n), float(scale), float(beta))
  if backends.custom_gradient(grad, 'model.lrn_grad'):
    return _lrn(*args)
  return _lrn_value(*args)


def _lrn_value(x, k, n, scale, beta):
  return x * _pow_minus(_denominator(x, k, n, scale), beta)


def _band(x, n):
  idx = jnp.arange(x.shape[-1])
  return (jnp.abs(idx[:, None] - idx[None, :]) <= n // 2).astype(x.dtype)


def _denominator(x, k, n, scale):
  return k + scale * jnp.dot(x * x, _band(x, n))


def _pow_minus(d, beta):
  """d ** -beta; for 0.75 as rsqrt * sqrt(rsqrt), cheaper than a power."""
  if beta == 0.75:
    r = lax.rsqrt(d)
    return r * jnp.sqrt(r)
  return d ** -beta


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _lrn(x, k, n, scale, beta):
  return _lrn_value(x, k, n, scale, beta)


def _lrn_fwd(x, k, n, scale, beta):
  d = _denominator(x, k, n, scale)
  return x * _pow_minus(d, beta), (x, d)


def _lrn_bwd(k, n, scale, beta, residuals, dy):
  """dx_j = dy_j d_j^-beta - 2 scale beta x_j sum_{i: j in window(i)}
  dy_i x_i d_i^(-beta-1); the band is symmetric, so the sum is one matmul."""
  del k
  x, d = residuals
  p = _pow_minus(d, beta)
  back = jnp.dot(dy * x * p / d, _band(x, n))
  return (dy * p - (2 * scale * beta) * x * back,)


_lrn.defvjp(_lrn_fwd, _lrn_bwd)
