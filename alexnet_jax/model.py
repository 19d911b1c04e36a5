"""AlexNet's two towers (Krizhevsky et al. 2012, Figure 2) as a Flax linen module.

Every layer after the input lives in one of `num_towers` towers. A tower-local
parameter has a leading tower dimension, so `PartitionSpec('tower')` puts each
tower's weights on its own device of the mesh's `tower` axis (see mesh.py).

Inside `jax.shard_map` a device holds `num_towers // tower_axis_size` towers
("local towers") and runs them one after the other. The towers talk in
exactly one place, `_exchange` (and fc8's psum): the paper's GPUs exchanged
feature maps at conv3, fc6, fc7 and fc8, nowhere else.

A layer's input is either a list, one array per local tower (each tower reads
its own maps), or `Shared`: one array every local tower reads (the image for
conv1, or all towers' maps after an exchange).

Outside shard_map (`tower_axis=None`) the same module runs every tower on one
device; that is how it is initialised.
"""

from typing import Callable, List, NamedTuple, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from alexnet_jax.lrn import lrn
from alexnet_jax.pool import max_pool


class Shared(NamedTuple):
  """The one input every local tower's layer reads: the image (conv1), or
  every tower's maps gathered by an exchange."""
  x: jax.Array


Towers = List[jax.Array]  # One array per local tower.
LayerInput = Union[Shared, Towers]


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


DROPOUT_SCALINGS = ('paper', 'inverted')


def dropout_mask(rng, layer: str, tower, example_ids, shape, rate):
  """Keep-mask (1 kept, 0 dropped, float32) of shape (len(example_ids),) +
  shape, each unit dropped with probability `rate`.

  A function of (rng, layer, global tower index, global example index) only,
  so a sharded step draws the same masks as a single-device one. `layer` is
  'fc6' or 'fc7'; its number keys the draws.
  """
  key = jax.random.fold_in(rng, int(layer.removeprefix('fc')))
  key = jax.random.fold_in(key, tower)
  keep = jnp.float32(1.0 - rate)  # float32 draws, whatever jax_enable_x64.

  def one(example_id):
    return jax.random.bernoulli(jax.random.fold_in(key, example_id), keep,
                                shape)

  return jax.vmap(one)(example_ids).astype(jnp.float32)


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
  """AlexNet. Call with images (B, H, W, 3) on the 0-255 mean-subtracted scale.

  conv_features has one width per conv layer: conv1 (11x11, stride 4) and
  conv2 (5x5) are followed by LRN and a pool, the rest are 3x3 layers, the
  last one pooled (5 layers: the paper's; `deeper`/`shallower` add or remove
  a 3x3 layer). `exchange` names the layers whose towers read every tower's
  maps.
  """
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
  # 'paper': training zeroes units, test multiplies by 1 - rate (§4.2);
  # 'inverted': training divides the kept units by 1 - rate, test does nothing.
  dropout_scaling: str = 'paper'
  init_scheme: str = 'paper'
  init_stddev: float = 0.01
  init_bias_one: Sequence[str] = ('conv2', 'conv4', 'conv5', 'fc6', 'fc7')
  dtype: str = 'float32'
  # Hand-written gradients (speed only, same numbers): 'auto' (on the CPU
  # only), 'custom' or 'xla' (alexnet_jax/backends.py).
  max_pool_grad: str = 'auto'
  lrn_grad: str = 'auto'
  # Set by mesh.py when the module runs under shard_map.
  tower_axis: Optional[str] = None
  tower_axis_size: int = 1

  @nn.compact
  def __call__(self, images, *, train: bool = False, dropout_rng=None,
               example_ids=None):
    """Logits (B, num_classes), float32.

    train: apply dropout (needs `dropout_rng`). example_ids: the global index
    of each example in the global batch (default arange(B)), which keys its
    dropout masks.
    """
    self._check_shapes()
    widths = [self._width(f) for f in self.conv_features]
    if example_ids is None:
      example_ids = jnp.arange(images.shape[0])

    # conv1 (11x11, stride 4): every tower reads the whole image.
    xs = self._conv('conv1', Shared(images.astype(self.dtype)), widths[0], 11,
                    stride=4, padding=conv1_padding(self.conv1_padding,
                                                    images.shape[1]))
    xs = self._pool(self._lrn(xs))
    # conv2 (5x5): in the paper each tower reads its own conv1 maps.
    xs = self._conv('conv2', self._maybe_exchange('conv2', xs), widths[1], 5)
    xs = self._pool(self._lrn(xs))
    # conv3, conv4, conv5 (3x3): in the paper conv3 reads both towers' maps
    # (an exchange), conv4 and conv5 their own. (`exchange` says where.)
    for i, features in enumerate(widths[2:], start=3):
      layer = f'conv{i}'
      xs = self._conv(layer, self._maybe_exchange(layer, xs), features, 3)
    xs = self._flatten(self._pool(xs), images.shape)
    # fc6, fc7: in the paper each reads both towers' units (an exchange);
    # dropout (§4.2).
    for layer in ('fc6', 'fc7'):
      xs = self._dense(layer, self._maybe_exchange(layer, xs),
                       self._width(self.fc_features))
      xs = self._dropout(layer, xs, train, dropout_rng, example_ids)
      # The hidden features (Figure 4's nearest neighbours use fc7), when
      # 'intermediates' is mutable.
      self.sow('intermediates', f'{layer}_features', xs)
    # fc8 reads both towers' fc7: a split matmul, partial logits summed.
    return self._fc8(xs)

  # -------------------------------------------------------------- layers
  def _conv(self, layer, inputs: LayerInput, features, size, stride=1,
            padding=None) -> Towers:
    """Each local tower's convolution -> bias -> activation. Padding: 'SAME'
    at stride 1 unless given (conv1)."""
    l = self.num_local_towers
    x0 = inputs.x if isinstance(inputs, Shared) else inputs[0]
    kernel, bias = self._params(
        layer, (l, size, size, x0.shape[-1], features), (l, features))
    padding = padding or ((size // 2, size // 2),) * 2
    xs = [inputs.x] * l if isinstance(inputs, Shared) else inputs
    ys = [lax.conv_general_dilated(x, kernel[t], (stride, stride), padding,
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
          for t, x in enumerate(xs)]
    return [self._act(y + bias[t]) for t, y in enumerate(ys)]

  def _dense(self, layer, inputs: LayerInput, features) -> Towers:
    """xs[t] @ kernel[t] -> bias -> activation for each local tower."""
    l = self.num_local_towers
    xs = [inputs.x] * l if isinstance(inputs, Shared) else inputs
    kernel, bias = self._params(layer, (l, xs[0].shape[-1], features),
                                (l, features))
    if l == 1:
      # A plain matmul: the batched form below would have XLA:CPU transpose
      # the kernel's gradient in a copy.
      ys = [jnp.dot(xs[0], kernel.reshape(kernel.shape[1:]))]
    else:
      # Without slicing the kernel (XLA:CPU copies a kernel[t] out before its
      # dot: 75 MB for fc6).
      ys = list(jnp.einsum('lbk,lkn->lbn', jnp.stack(xs), kernel))
    return [self._act(y + bias[t]) for t, y in enumerate(ys)]

  def _fc8(self, xs: Towers):
    """W8 @ concat(h7_1, h7_2) = sum_t W8[t] @ h7_t (§3.5): this device's
    towers in one matmul, then the sum over the tower axis. Its bias, added
    once after the sum, is the one parameter of no tower."""
    kernel, bias = self._params(
        'fc8', (self.num_local_towers, xs[0].shape[-1], self.num_classes),
        (self.num_classes,))
    out = jnp.promote_types(self.dtype, jnp.float32)  # float32 from bfloat16.
    logits = jnp.dot(jnp.concatenate(xs, axis=-1),
                     kernel.reshape(-1, self.num_classes),
                     preferred_element_type=out)
    if self.tower_axis is not None:
      logits = lax.psum(logits, self.tower_axis)
    return logits + bias.astype(out)

  def _lrn(self, xs: Towers) -> Towers:
    """LRN (§3.3) within each tower's maps, if `use_lrn`."""
    if not self.use_lrn:
      return xs
    return [lrn(x, k=self.lrn_k, n=self.lrn_n, alpha=self.lrn_alpha,
                beta=self.lrn_beta, alpha_over_n=self.lrn_alpha_over_n,
                grad=self.lrn_grad) for x in xs]

  def _pool(self, xs: Towers) -> Towers:
    """Overlapping max-pooling, 3x3 at stride 2 by default (§3.4)."""
    return [max_pool(x, self.pool_window, self.pool_stride,
                     self.max_pool_grad) for x in xs]

  def _dropout(self, layer, xs: Towers, train, rng, example_ids) -> Towers:
    """Dropout (§4.2). 'paper': in training each unit is zeroed with
    probability `dropout_rate`, at test time every output is multiplied by
    1 - rate, the expectation of the mask; 'inverted': kept units are divided
    by 1 - rate in training, nothing at test time."""
    rate, paper = self.dropout_rate, self.dropout_scaling == 'paper'
    if rate <= 0:
      return xs
    if not train:
      return [x * jnp.asarray(1.0 - rate, x.dtype) for x in xs] if paper else xs
    masks = [dropout_mask(rng, layer, self._tower_index(t), example_ids,
                          x.shape[1:], rate) for t, x in enumerate(xs)]
    if not paper:
      masks = [m / jnp.float32(1.0 - rate) for m in masks]
    return [x * m.astype(x.dtype) for x, m in zip(xs, masks)]

  def _flatten(self, xs: Towers, image_shape) -> Towers:
    if 0 in xs[0].shape:
      raise ValueError(f'{image_shape[1]}x{image_shape[2]} images are too '
                       'small for this network: pool5 has no output. Use '
                       'larger crops (the paper uses 224).')
    return [x.reshape(x.shape[0], -1) for x in xs]

  # ------------------------------------------------- the towers' exchange
  def _maybe_exchange(self, layer, xs: Towers) -> LayerInput:
    """What `layer`'s towers read: every tower's maps (the exchange) if
    `layer` is in `exchange`, else each tower its own."""
    return Shared(self._exchange(layer, xs)) if layer in self.exchange else xs

  def _exchange(self, layer, xs: Towers):
    """The paper's cross-GPU exchange before `layer`: every tower gets every
    tower's maps.

    xs: one array per local tower. Returns the channel-wise concatenation of
    all `num_towers` towers' arrays, in tower order: an all_gather over the
    mesh's tower axis (a no-op copy when one device holds every tower).
    """
    del layer  # Named for readers and for audit.exchange_table.
    x = jnp.stack(xs)  # (L, B, ..., C)
    if self.tower_axis is not None:
      x = lax.all_gather(x, self.tower_axis, axis=0, tiled=True)  # (T, ...)
    return jnp.concatenate(list(x), axis=-1)

  # ------------------------------------------------------------- helpers
  @property
  def num_local_towers(self):
    return self.num_towers // self.tower_axis_size

  def _tower_index(self, local):
    """Global index of local tower `local` on this device."""
    if self.tower_axis is None:
      return local
    return lax.axis_index(self.tower_axis) * self.num_local_towers + local

  def _check_shapes(self):
    if self.num_towers % self.tower_axis_size:
      raise ValueError(f'The tower axis ({self.tower_axis_size} devices) must '
                       f'divide num_towers={self.num_towers}.')
    if self.dropout_scaling not in DROPOUT_SCALINGS:
      raise ValueError(f'model.dropout_scaling={self.dropout_scaling!r}: use '
                       f'one of {DROPOUT_SCALINGS}.')
    if len(self.conv_features) < 3:
      raise ValueError('conv_features needs at least 3 layers, got '
                       f'{len(self.conv_features)}.')
    layers = [f'conv{i}' for i in range(2, len(self.conv_features) + 1)]
    unknown = set(self.exchange) - set(layers + ['fc6', 'fc7'])
    if unknown:
      raise ValueError(f'model.exchange names {sorted(unknown)}: the towers '
                       f'can exchange before {", ".join(layers)}, fc6 or fc7 '
                       '(fc8 always reads both towers).')

  def _width(self, w):
    return max(1, int(round(w * self.width_multiplier)))

  def _params(self, layer, kernel_shape, bias_shape):
    """A layer's kernel and bias, params[layer]['kernel'|'bias']."""
    kernel, bias = _LayerParams(tuple(kernel_shape), tuple(bias_shape),
                                self._kernel_init(), self._bias_init(layer),
                                name=layer)()
    return kernel.astype(self.dtype), bias.astype(self.dtype)

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

  def _act(self, x):
    if self.activation == 'relu':
      return nn.relu(x)
    if self.activation == 'tanh':
      return jnp.tanh(x)
    raise ValueError(f"activation must be 'relu' or 'tanh', got "
                     f"{self.activation!r}.")


def create_model(model_config, **overrides) -> AlexNet:
  """An AlexNet from `config.model` (configs/alexnet.py)."""
  fields = {k: (tuple(v) if isinstance(v, (list, tuple)) else v)
            for k, v in model_config.items()}
  fields.update(overrides)
  return AlexNet(**fields)
