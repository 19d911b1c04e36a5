"""2-D convolution (NHWC, HWIO) with a faster kernel gradient on XLA:CPU.

XLA:CPU computes the weight gradient of a convolution (a correlation of the
layer's input with its output gradient, contracted over batch and space) at
a fraction of its forward speed: ~8 GFLOP/s for AlexNet's conv2 against ~60
forward, 5x5 at stride 1 (docs/BENCHMARKS.md). `conv(..., kernel_grad='rows')` computes it as
one matmul per kernel row instead: the input's strided windows for that row,
stacked, contracted with the output gradient over (batch, h, w). The input
gradient and the forward pass stay XLA's own.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

_DIMS = ('NHWC', 'HWIO', 'NHWC')


def _xla_conv(x, kernel, stride, padding):
  return lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                  dimension_numbers=_DIMS)


def conv(x, kernel, stride: int, padding, kernel_grad: str = 'auto'):
  """Convolution; `padding` is ((top, bottom), (left, right)).

  kernel_grad: 'xla' (XLA's own gradient), 'rows' (one matmul per kernel
  row), or 'auto' ('rows' on CPU for the layers where it was measured
  faster, 'xla' elsewhere and on GPU/TPU, whose convolution libraries are
  fast at it).
  """
  padding = tuple(tuple(p) for p in padding)
  if kernel_grad == 'auto':
    # Where XLA:CPU was measured slow: conv2's 5x5 stride-1 kernels (2x);
    # for 11x11/4 and 3x3 its own gradient is as fast or faster.
    on_cpu = jax.default_backend() == 'cpu'
    rows = on_cpu and stride == 1 and kernel.shape[0] >= 5
    kernel_grad = 'rows' if rows else 'xla'
  if kernel_grad == 'xla':
    return _xla_conv(x, kernel, stride, padding)
  if kernel_grad == 'rows':
    # Under shard_map the kernel is replicated over 'data' and the input is
    # not: cast the kernel to varying first, so that the transpose of that
    # cast (not our rule) sums its gradient over the data shards.
    varying = lambda a: jax.typeof(a).manual_axis_type.varying
    missing = tuple(sorted(varying(x) - varying(kernel)))
    if missing:
      kernel = lax.pcast(kernel, missing, to='varying')
    return _conv_rows(x, kernel, stride, padding)
  raise ValueError(f"kernel_grad must be 'auto', 'xla' or 'rows', got "
                   f'{kernel_grad!r}.')


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_rows(x, kernel, stride, padding):
  return _xla_conv(x, kernel, stride, padding)


def _conv_rows_fwd(x, kernel, stride, padding):
  return _xla_conv(x, kernel, stride, padding), (x, kernel)


def _conv_rows_bwd(stride, padding, residuals, dy):
  x, kernel = residuals
  # Unused for the first layer (images need no gradient): XLA drops it.
  dx = jax.vjp(lambda x: _xla_conv(x, kernel, stride, padding), x)[1](dy)[0]
  kh, kw, cin, cout = kernel.shape
  b, ho, wo, _ = dy.shape
  xp = jnp.pad(x, ((0, 0),) + padding + ((0, 0),))

  def window(i, j):  # The inputs kernel tap (i, j) saw, (b, ho, wo, cin).
    return lax.slice(xp, (0, i, j, 0),
                     (b, i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1,
                      cin), (1, stride, stride, 1))

  rows = [jnp.einsum('bhwjc,bhwo->jco',
                     jnp.stack([window(i, j) for j in range(kw)], axis=3), dy,
                     preferred_element_type=jnp.promote_types(dy.dtype,
                                                              jnp.float32))
          for i in range(kh)]
  return dx, jnp.stack(rows).astype(kernel.dtype)


_conv_rows.defvjp(_conv_rows_fwd, _conv_rows_bwd)
