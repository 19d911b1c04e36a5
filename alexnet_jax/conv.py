"""2-D convolution (NHWC, HWIO) with a faster kernel gradient on XLA:CPU.

XLA:CPU's default convolution library computes the weight gradient of a
convolution (a correlation of the layer's input with its output gradient,
contracted over batch and space) at a fraction of its forward speed
(docs/BENCHMARKS.md, "Train step on the CPU"). `conv(...,
kernel_grad='taps')` computes it as one matmul per kernel tap instead: the
inputs tap (i, j) saw, (batch*h*w, cin), contracted with the output gradient,
(batch*h*w, cout). A strided layer is first rearranged space-to-depth
(s x s blocks of pixels become channels), which makes it a stride-1 layer of
ceil(k/s) x ceil(k/s) taps: conv1's 11x11/4 kernel becomes 3x3 taps over 48
channels instead of 121 taps over 3. The input gradient and the forward pass
stay XLA's own.

That holds for XLA:CPU's default convolution library (YNNPACK). With the
XNNPACK convolutions the entry points ask for (alexnet_jax/xla_cpu.py),
XLA's own weight gradient is the faster one, and 'auto' picks it.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from alexnet_jax import xla_cpu

_DIMS = ('NHWC', 'HWIO', 'NHWC')


def xla_conv(x, kernel, stride, padding):
  """The convolution as XLA runs and differentiates it."""
  return lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                  dimension_numbers=_DIMS)


def resolve(kernel_grad):
  """'auto' -> 'taps' or 'xla' (see conv()); any other value unchanged."""
  if kernel_grad != 'auto':
    return kernel_grad
  return ('taps' if jax.default_backend() == 'cpu' and
          not xla_cpu.xnn_convolutions() else 'xla')


def conv(x, kernels, stride: int, padding, kernel_grad: str = 'auto'):
  """x convolved with each kernel of the stack `kernels` (l, kh, kw, cin,
  cout): a tuple of l outputs. `padding` is ((top, bottom), (left, right)).

  Towers that read the same input (conv1, and a layer after an exchange)
  pass all their kernels at once: their weight gradients are then one
  matmul per tap with l*cout columns, wider and faster than l separate ones.

  kernel_grad: 'xla' (XLA's own gradient), 'taps' (one matmul per kernel
  tap), or 'auto' ('taps' on a CPU with XLA's default convolutions, 'xla'
  with XNNPACK convolutions and on GPU/TPU, whose convolution libraries are
  fast at it).
  """
  padding = tuple(tuple(p) for p in padding)
  kernel_grad = resolve(kernel_grad)
  if kernel_grad == 'xla':
    return tuple(xla_conv(x, k, stride, padding) for k in kernels)
  if kernel_grad == 'taps':
    # Under shard_map the kernel is replicated over 'data' and the input is
    # not: cast the kernel to varying first, so that the transpose of that
    # cast (not our rule) sums its gradient over the data shards.
    varying = lambda a: jax.typeof(a).manual_axis_type.varying
    missing = tuple(sorted(varying(x) - varying(kernels)))
    if missing:
      kernels = lax.pcast(kernels, missing, to='varying')
    return _conv_taps(x, kernels, stride, padding)
  raise ValueError(f"kernel_grad must be 'auto', 'xla' or 'taps', got "
                   f'{kernel_grad!r}.')


def kernel_grad_taps(x, dy, kernel_shape, stride, padding):
  """d(loss)/d(kernel) of `xla_conv(x, kernel, stride, padding)` given the
  output gradient dy, as one (cin*s*s, cout) matmul per space-to-depth tap."""
  kh, kw, cin, cout = kernel_shape
  b, ho, wo, _ = dy.shape
  s = stride
  th, tw = -(-kh // s), -(-kw // s)  # Taps after space-to-depth.
  # The padded input, cut or zero-extended to the s x s blocks the taps
  # cover (zeros only meet kernel positions past kh, kw: dropped below).
  hs, ws = (ho - 1 + th) * s, (wo - 1 + tw) * s
  (top, _), (left, _) = padding
  zero = jnp.zeros((), x.dtype)
  xp = lax.pad(x, zero, ((0, 0, 0), (top, hs - x.shape[1] - top, 0),
                         (left, ws - x.shape[2] - left, 0), (0, 0, 0)))
  z = xp.reshape(b, hs // s, s, ws // s, s, cin).transpose(
      0, 1, 3, 2, 4, 5).reshape(b, hs // s, ws // s, s * s * cin)
  dy2 = dy.reshape(-1, cout)
  acc = jnp.promote_types(dy.dtype, jnp.float32)
  taps = [jnp.matmul(
      lax.slice(z, (0, i, j, 0), (b, i + ho, j + wo, s * s * cin)).reshape(
          -1, s * s * cin).T, dy2, preferred_element_type=acc)
          for i in range(th) for j in range(tw)]
  g = jnp.stack(taps).reshape(th, tw, s, s, cin, cout).transpose(
      0, 2, 1, 3, 4, 5).reshape(th * s, tw * s, cin, cout)
  return g[:kh, :kw]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_taps(x, kernels, stride, padding):
  return tuple(xla_conv(x, k, stride, padding) for k in kernels)


def _conv_taps_fwd(x, kernels, stride, padding):
  return _conv_taps(x, kernels, stride, padding), (x, kernels)


def _conv_taps_bwd(stride, padding, residuals, dys):
  x, kernels = residuals
  # Unused for the first layer (images need no gradient): XLA drops it.
  dx = sum(jax.vjp(lambda x: xla_conv(x, k, stride, padding), x)[1](dy)[0]
           for k, dy in zip(kernels, dys))
  l, kh, kw, cin, cout = kernels.shape
  dk = kernel_grad_taps(x, jnp.concatenate(dys, axis=-1),
                        (kh, kw, cin, l * cout), stride, padding)
  dk = jnp.moveaxis(dk.reshape(kh, kw, cin, l, cout), 3, 0)
  return dx, dk.astype(kernels.dtype)


_conv_taps.defvjp(_conv_taps_fwd, _conv_taps_bwd)
