"""An independent single-device AlexNet, written the way Caffe runs it.

No towers, no collectives: the two towers are grouped convolutions
(`feature_group_count=num_towers`) over channel-concatenated maps, the
exchanges at conv3/fc6/fc7/fc8 are plain ungrouped layers over all maps, and
LRN is a sum of shifted squares within each group. It reads the same parameter
tree as `alexnet_jax.model.AlexNet` (tower-stacked kernels, concatenated here
along the output channels) and is used only by tests, with the helpers below
it (fresh random seeds, relative error, the float64 oracle).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from alexnet_jax.model import AlexNet, dropout_mask


def _conv(x, kernel, stride, padding, groups=1):
  return lax.conv_general_dilated(
      x, kernel, (stride, stride), padding,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=groups,
      precision=lax.Precision.HIGHEST)


def _stack_out(kernel):
  """(T, ..., cin, cout) tower kernels -> (..., cin, T*cout), towers in order."""
  return jnp.concatenate(list(kernel), axis=-1)


def lrn(x, groups, k, n, alpha, beta):
  """Sum of squares over n neighbouring maps of the same group, by shifts."""
  b, h, w, c = x.shape
  sq = (x * x).reshape(b, h, w, groups, c // groups)
  half = n // 2
  padded = jnp.pad(sq, [(0, 0)] * 4 + [(half, half)])
  window = sum(padded[..., i:i + c // groups] for i in range(n))
  return x / (k + alpha * window.reshape(x.shape)) ** beta


def _pool(x, window, stride):
  return lax.reduce_window(x, -np.inf, lax.max, (1, window, window, 1),
                           (1, stride, stride, 1), 'VALID')


def reference_apply(model, params, images, *, train=False, dropout_rng=None):
  """Logits of `model` (an AlexNet, for its hyper-parameters) on one device."""
  return reference_layers(model, params, images, train=train,
                          dropout_rng=dropout_rng)[0]


def reference_layers(model, params, images, *, train=False, dropout_rng=None):
  """(logits, hidden): hidden holds fc6/fc7's pre-activations ('fc6_pre',
  'fc7_pre') and outputs after the activation and dropout ('fc6', 'fc7'),
  every tower's units concatenated in tower order."""
  assert tuple(model.exchange) == ('conv3', 'fc6', 'fc7'), model.exchange
  t = model.num_towers
  act = jax.nn.relu if model.activation == 'relu' else jnp.tanh
  alpha = model.lrn_alpha / model.lrn_n if model.lrn_alpha_over_n else (
      model.lrn_alpha)

  def lrn_pool(x):
    if model.use_lrn:
      x = lrn(x, t, model.lrn_k, model.lrn_n, alpha, model.lrn_beta)
    return _pool(x, model.pool_window, model.pool_stride)

  def conv(x, layer, stride, padding, groups):
    p = params[layer]
    return act(_conv(x, _stack_out(p['kernel']), stride, padding, groups) +
               p['bias'].reshape(-1))

  size = images.shape[1]
  if model.conv1_padding == 'cuda-convnet':
    out = int(np.ceil((size - 11) / 4)) + 1
    pad = ((0, (out - 1) * 4 + 11 - size),) * 2
  else:
    pad = {'valid': ((0, 0), (0, 0)), 'torchvision': ((2, 2), (2, 2))}[
        model.conv1_padding]

  x = lrn_pool(conv(images, 'conv1', 4, pad, 1))  # Both towers see the image.
  x = lrn_pool(conv(x, 'conv2', 1, 'SAME', t))  # Tower-local: grouped.
  x = conv(x, 'conv3', 1, 'SAME', 1)  # Reads both towers: ungrouped.
  x = conv(x, 'conv4', 1, 'SAME', t)
  x = _pool(conv(x, 'conv5', 1, 'SAME', t), model.pool_window,
            model.pool_stride)
  # Flatten each tower's (h, w, c) maps, then concatenate the towers.
  b, h, w, c = x.shape
  x = x.reshape(b, h, w, t, c // t).transpose(0, 3, 1, 2, 4).reshape(b, -1)
  ids = jnp.arange(b)
  hidden = {}
  for layer in ('fc6', 'fc7'):
    p = params[layer]
    pre = jnp.dot(x, _stack_out(p['kernel']),
                  precision=lax.Precision.HIGHEST) + p['bias'].reshape(-1)
    hidden[f'{layer}_pre'] = pre
    x = act(pre)
    rate = model.dropout_rate
    if train and rate > 0:
      per = x.shape[1] // t
      mask = jnp.concatenate(
          [dropout_mask(dropout_rng, layer, i, ids, (per,), rate)
           for i in range(t)], axis=-1)
      x = x * (mask if model.dropout_scaling == 'paper' else
               mask / (1 - rate))
    elif rate > 0 and model.dropout_scaling == 'paper':
      x = x * (1 - rate)
    hidden[layer] = x
  w8 = params['fc8']['kernel']
  logits = jnp.dot(x, w8.reshape(-1, w8.shape[-1]),
                   precision=lax.Precision.HIGHEST) + params['fc8']['bias']
  return logits, hidden


# ------------------------------------------------------- test helpers
def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def fresh_rng():
  seed = int(np.random.SeedSequence().entropy % 2**31)
  return seed, np.random.default_rng(seed)


def xent(logits, labels):
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits),
                                       labels[:, None], -1))


@functools.partial(jax.jit, static_argnums=0)
def reference_forward(model, params, images):
  return reference_apply(model, params, images)


@functools.partial(jax.jit, static_argnums=0)
def _reference_train_loss(model, params, images, labels, rng):
  def loss(p):
    logits = reference_apply(model, p, images, train=True, dropout_rng=rng)
    return xent(logits, labels), logits
  return jax.value_and_grad(loss, has_aux=True)(params)


def reference_train_in_float64(model, params, images, labels, rng):
  """((loss, logits), grads) of the reference network in float64, the oracle
  the float32 model is held to. (In float32, XLA:CPU's grouped-convolution
  gradient alone is off by up to 1e-3 relative, far more than the model.)"""
  with jax.enable_x64(True):
    to64 = lambda x: jnp.asarray(x, jnp.float64)
    return jax.device_get(_reference_train_loss(
        model, jax.tree.map(to64, params), to64(images), labels, rng))


# A small AlexNet whose every piece (two towers, LRN, overlapping pools,
# dropout) is there, at a size the tests run in seconds.
SMALL = dict(num_classes=10, width_multiplier=0.25, fc_features=64)


def init_small(seed_rng, size=99, batch=8, **kw):
  """(model, params, images, labels): a SMALL AlexNet with fields `kw`,
  initialised from `seed_rng`, and a batch of random images and labels."""
  # 99 pixels: 23x23 conv1 maps, 2x2 pool5 maps, so the fc6 flatten order
  # matters. The paper's N(0, s) init with s=0.05 for this thin net: O(1)
  # logits and no vanishing gradients, where float32 agrees with the float64
  # reference to < 1e-6 (s=0.01 vanishes here; he init on 0-255 inputs
  # saturates the softmax and drifts to ~5e-6).
  kw = {'init_stddev': 0.05, **kw}
  model = AlexNet(**{**SMALL, **kw})
  key = jax.random.PRNGKey(int(seed_rng.integers(2**31)))
  params = model.init(key, jnp.zeros((1, size, size, 3)))['params']
  # Mean-subtracted 0-255 images, as the input pipeline makes them.
  images = jnp.asarray(seed_rng.normal(0, 60, (batch, size, size, 3)),
                       jnp.float32)
  labels = jnp.asarray(seed_rng.integers(0, model.num_classes, batch))
  return model, params, images, labels
