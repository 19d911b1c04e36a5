"""AlexNet's two towers (Krizhevsky et al. 2012, Figure 2) as a Flax linen module.

Every layer after the input lives in one of `num_towers` towers. A tower-local
parameter has a leading tower dimension, so `PartitionSpec('tower')` puts each
tower's weights on its own device of the mesh's `tower` axis (see mesh.py).

Inside `jax.shard_map` a device holds `num_towers // tower_axis_size` towers
("local towers") and runs them one after the other with plain convolutions.
The towers talk in exactly one place, `_exchange` (and fc8's psum): the paper's
GPUs exchanged feature maps at conv3, fc6, fc7 and fc8, nowhere else.

Outside shard_map (`tower_axis=None`) the same module runs every tower on one
device; that is how it is initialised.
"""

import functools
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from alexnet_jax.conv import conv
from alexnet_jax.pool import max_pool

# conv1's kernel is 11x11 with stride 4, conv2's 5x5, the rest 3x3 at stride
# 1 (Figure 2). A net of another depth (len(conv_features) != 5) keeps conv1
# and conv2 and has len - 2 such 3x3 layers, the last one pooled.
CONV_KERNEL = {'conv1': 11, 'conv2': 5}
CONV_STRIDE = {'conv1': 4}


def conv_layer_names(depth: int):
  if depth < 3:
    raise ValueError(f'conv_features needs at least 3 layers, got {depth}.')
  return tuple(f'conv{i + 1}' for i in range(depth))
# Dropout keys are folded with a per-layer constant so that masks are a pure
# function of (rng, layer, tower, example) whatever the mesh.
_DROPOUT_LAYER_ID = {'fc6': 6, 'fc7': 7}


def conv1_padding(mode: str, image_size: int, kernel: int = 11, stride: int = 4):
  """Padding ((top, bottom), (left, right)) of conv1 for a square input."""
  if mode == 'cuda-convnet':
    # Output size 1 + ceil((img - filter) / stride): zeros past bottom/right.
    out = 1 + -(-(image_size - kernel) // stride)
    extra = max((out - 1) * stride + kernel - image_size, 0)
    return ((0, extra), (0, extra))
  if mode == 'valid':
    return ((0, 0), (0, 0))
  if mode == 'torchvision':
    return ((2, 2), (2, 2))
  raise ValueError(f"conv1_padding must be 'cuda-convnet', 'valid' or "
                   f"'torchvision', got {mode!r}.")


def lrn(x, *, k, n, alpha, beta, alpha_over_n=False):
  """Local response normalisation across the channels of one tower (§3.3).

  b_i = a_i / (k + alpha * sum_{j=i-n//2}^{i+n//2} a_j^2)^beta, the window
  clipped at the tower's channel edges. The window sum is a matmul with a
  banded 0/1 matrix, which XLA runs as fast as any dot.
  """
  scale = alpha / n if alpha_over_n else alpha
  return _lrn(x, float(k), int(n), float(scale), float(beta))


def _lrn_band(x, n):
  idx = jnp.arange(x.shape[-1])
  return (jnp.abs(idx[:, None] - idx[None, :]) <= n // 2).astype(x.dtype)


def _lrn_denominator(x, k, n, scale):
  return k + scale * jnp.dot(x * x, _lrn_band(x, n))


def _pow_minus(d, beta):
  """d ** -beta; for 0.75 as rsqrt * sqrt(rsqrt), cheaper than a power."""
  if beta == 0.75:
    r = lax.rsqrt(d)
    return r * jnp.sqrt(r)
  return d ** -beta


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _lrn(x, k, n, scale, beta):
  return x * _pow_minus(_lrn_denominator(x, k, n, scale), beta)


def _lrn_fwd(x, k, n, scale, beta):
  d = _lrn_denominator(x, k, n, scale)
  return x * _pow_minus(d, beta), (x, d)


def _lrn_bwd(k, n, scale, beta, residuals, dy):
  """dx_j = dy_j d_j^-beta - 2 scale beta x_j sum_{i: j in window(i)}
  dy_i x_i d_i^(-beta-1): two elementwise passes around one band matmul
  (the band is symmetric), where autodiff keeps and re-reads several
  intermediates."""
  x, d = residuals
  p = _pow_minus(d, beta)
  back = jnp.dot(dy * x * p / d, _lrn_band(x, n))
  return (dy * p - (2 * scale * beta) * x * back,)


_lrn.defvjp(_lrn_fwd, _lrn_bwd)


def dropout_mask(rng, layer: str, tower, example_ids, shape, rate):
  """Keep-mask of shape (len(example_ids),) + shape, scaled by 1/(1-rate).

  A function of (rng, layer, global tower index, global example index) only,
  so a sharded step draws the same masks as a single-device one.
  """
  key = jax.random.fold_in(rng, _DROPOUT_LAYER_ID[layer])
  key = jax.random.fold_in(key, tower)
  keep = jnp.float32(1.0 - rate)  # float32 draws, whatever jax_enable_x64.

  def one(example_id):
    return jax.random.bernoulli(jax.random.fold_in(key, example_id), keep,
                                shape)

  return jax.vmap(one)(example_ids).astype(jnp.float32) / keep


class _LayerParams(nn.Module):
  """Declares one layer's parameters under its own name (conv1, fc6...)."""
  kernel_shape: Sequence[int]
  bias_shape: Sequence[int]
  kernel_init: Callable
  bias_init: Callable

  @nn.compact
  def __call__(self):
    return (self.param('kernel', self.kernel_init, self.kernel_shape,
                       jnp.float32),
            self.param('bias', self.bias_init, self.bias_shape, jnp.float32))


class AlexNet(nn.Module):
  """AlexNet. Call with images (B, H, W, 3) on the 0-255 mean-subtracted scale."""
  num_classes: int = 1000
  num_towers: int = 2
  conv_features: Sequence[int] = (48, 128, 192, 192, 128)
  fc_features: int = 2048
  width_multiplier: float = 1.0
  exchange: Sequence[str] = ('conv3', 'fc6', 'fc7')
  conv1_padding: str = 'cuda-convnet'
  activation: str = 'relu'
  use_lrn: bool = True
  lrn_k: float = 2.0
  lrn_n: int = 5
  lrn_alpha: float = 1e-4
  lrn_beta: float = 0.75
  lrn_alpha_over_n: bool = False
  pool_window: int = 3
  pool_stride: int = 2
  dropout_rate: float = 0.5
  init_scheme: str = 'paper'
  init_stddev: float = 0.01
  init_bias_one: Sequence[str] = ('conv2', 'conv4', 'conv5', 'fc6', 'fc7')
  dtype: str = 'float32'
  # How convolution weight gradients are computed (speed only; see conv.py).
  conv_kernel_grad: str = 'auto'
  # Set by mesh.py when the module runs under shard_map.
  tower_axis: Optional[str] = None
  tower_axis_size: int = 1

  @property
  def num_local_towers(self):
    return self.num_towers // self.tower_axis_size

  def _width(self, w):
    return max(1, int(round(w * self.width_multiplier)))

  def _kernel_init(self):
    if self.init_scheme == 'paper':
      return nn.initializers.normal(self.init_stddev)
    if self.init_scheme == 'he':
      return nn.initializers.variance_scaling(
          2.0, 'fan_in', 'normal', in_axis=-2, out_axis=-1, batch_axis=(0,))
    raise ValueError(
        f"init_scheme must be 'paper' or 'he', got {self.init_scheme!r}.")

  def _bias_init(self, layer):
    if self.init_scheme == 'paper' and layer in self.init_bias_one:
      return nn.initializers.ones
    return nn.initializers.zeros

  def _params(self, layer, kernel_shape, bias_shape):
    """A layer's kernel and bias, params[layer]['kernel'|'bias']."""
    kernel, bias = _LayerParams(tuple(kernel_shape), tuple(bias_shape),
                                self._kernel_init(), self._bias_init(layer),
                                name=layer)()
    return kernel.astype(self.dtype), bias.astype(self.dtype)

  def _act(self, x):
    if self.activation == 'relu':
      return nn.relu(x)
    if self.activation == 'tanh':
      return jnp.tanh(x)
    raise ValueError(f"activation must be 'relu' or 'tanh', got "
                     f"{self.activation!r}.")

  def _pool(self, x):
    return max_pool(x, self.pool_window, self.pool_stride)

  def _conv_towers(self, xs, kernel, stride, padding):
    """Each local tower's convolution of xs[t] with kernel[t]; towers that
    read the same input (conv1, and a layer after an exchange) go together
    (conv.py: their weight gradients are computed at once)."""
    k = self.conv_kernel_grad
    if len(xs) > 1 and all(x is xs[0] for x in xs):
      return conv(xs[0], kernel, stride, padding, k)
    return [conv(x, kernel[t:t + 1], stride, padding, k)[0]
            for t, x in enumerate(xs)]

  def _dense_towers(self, xs, kernel):
    """xs[t] @ kernel[t] for each local tower, without slicing the kernel
    (XLA:CPU copies a kernel[t] out before its dot: 75 MB for fc6)."""
    if len(xs) == 1:
      # A plain matmul: the batched form below would have XLA:CPU transpose
      # the kernel's gradient in a copy.
      return [jnp.dot(xs[0], kernel.reshape(kernel.shape[1:]))]
    return list(jnp.einsum('lbk,lkn->lbn', jnp.stack(xs), kernel))

  def _tower_index(self, local):
    """Global index of local tower `local` on this device."""
    if self.tower_axis is None:
      return local
    return lax.axis_index(self.tower_axis) * self.num_local_towers + local

  def _exchange(self, xs):
    """The paper's cross-GPU exchange: every tower gets every tower's maps.

    xs: one array per local tower. Returns the channel-wise concatenation of
    all `num_towers` towers' arrays, in tower order: an all_gather over the
    mesh's tower axis (a no-op copy when one device holds every tower).
    """
    x = jnp.stack(xs)  # (L, B, ..., C)
    if self.tower_axis is not None:
      x = lax.all_gather(x, self.tower_axis, axis=0, tiled=True)  # (T, ...)
    return jnp.concatenate(list(x), axis=-1)

  @nn.compact
  def __call__(self, images, *, train: bool = False, dropout_rng=None,
               example_ids=None):
    """Logits (B, num_classes), float32.

    train: apply dropout (needs `dropout_rng`). example_ids: the global index
    of each example in the global batch (default arange(B)), which keys its
    dropout masks.
    """
    l = self.num_local_towers
    if self.num_towers % self.tower_axis_size:
      raise ValueError(f'The tower axis ({self.tower_axis_size} devices) must '
                       f'divide num_towers={self.num_towers}.')
    x = images.astype(self.dtype)
    xs = [x] * l  # conv1 of every tower reads the whole image.

    # ------------------------------------------------- convolutional layers
    names = conv_layer_names(len(self.conv_features))
    for i, layer in enumerate(names):
      if layer in self.exchange:
        xs = [self._exchange(xs)] * l
      size, stride = CONV_KERNEL.get(layer, 3), CONV_STRIDE.get(layer, 1)
      features = self._width(self.conv_features[i])
      kernel, bias = self._params(
          layer, (l, size, size, xs[0].shape[-1], features), (l, features))
      if layer == 'conv1':
        padding = conv1_padding(self.conv1_padding, images.shape[1], size,
                                stride)
      else:
        padding = ((size // 2, size // 2),) * 2  # 'SAME' at stride 1.
      ys = []
      for t, y in enumerate(self._conv_towers(xs, kernel, stride, padding)):
        y = self._act(y + bias[t])
        if layer in ('conv1', 'conv2'):
          if self.use_lrn:
            y = lrn(y, k=self.lrn_k, n=self.lrn_n, alpha=self.lrn_alpha,
                    beta=self.lrn_beta, alpha_over_n=self.lrn_alpha_over_n)
          y = self._pool(y)
        elif layer == names[-1]:
          y = self._pool(y)
        ys.append(y)
      xs = ys

    if 0 in xs[0].shape:
      raise ValueError(f'{images.shape[1]}x{images.shape[2]} images are too '
                       'small for this network: pool5 has no output. Use '
                       'larger crops (the paper uses 224).')
    xs = [x.reshape(x.shape[0], -1) for x in xs]

    # ------------------------------------------------- fully connected
    if example_ids is None:
      example_ids = jnp.arange(images.shape[0])
    for layer in ('fc6', 'fc7'):
      if layer in self.exchange:
        xs = [self._exchange(xs)] * l
      features = self._width(self.fc_features)
      kernel, bias = self._params(layer, (l, xs[0].shape[-1], features),
                                  (l, features))
      ys = []
      for t, y in enumerate(self._dense_towers(xs, kernel)):
        y = self._act(y + bias[t])
        if train and self.dropout_rate > 0:
          mask = dropout_mask(dropout_rng, layer, self._tower_index(t),
                              example_ids, y.shape[1:], self.dropout_rate)
          y = y * mask.astype(y.dtype)
        ys.append(y)
      xs = ys
      # The hidden features (Figure 4's nearest neighbours use fc7): a list of
      # this device's towers' activations, when 'intermediates' is mutable.
      self.sow('intermediates', f'{layer}_features', xs)

    # fc8 reads both towers' fc7 (§3.5): a split matmul whose partial logits
    # are summed over towers, W8 @ concat(h7_1, h7_2) = sum_t W8[t] @ h7_t
    # (this device's towers in one matmul, then the sum over the tower axis).
    # Its bias, added once after the sum, is the one parameter of no tower.
    kernel, bias = self._params('fc8', (l, xs[0].shape[-1], self.num_classes),
                                (self.num_classes,))
    out = jnp.promote_types(self.dtype, jnp.float32)  # float32 from bfloat16.
    logits = jnp.dot(jnp.concatenate(xs, axis=-1),
                     kernel.reshape(-1, self.num_classes),
                     preferred_element_type=out)
    if self.tower_axis is not None:
      logits = lax.psum(logits, self.tower_axis)
    return logits + bias.astype(out)


def create_model(model_config, **overrides) -> AlexNet:
  """An AlexNet from `config.model` (configs/alexnet.py)."""
  fields = {k: (tuple(v) if isinstance(v, (list, tuple)) else v)
            for k, v in model_config.items()}
  fields.update(overrides)
  return AlexNet(**fields)
