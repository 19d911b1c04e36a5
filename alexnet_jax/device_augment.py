"""The paper's augmentation and test views on the accelerator, for batches
of uint8 resize_size x resize_size images (the decoded copy,
decoded_copy.py): the host only copies bytes and sends uint8.

Training (§4.1): a random crop_size window, a horizontal flip with
probability 1/2, PCA lighting (V @ (alpha * s) added to every pixel, alpha ~
N(0, alpha_stddev)) and the mean subtraction, in one jitted function right
before the train step, on each data shard's own examples. The draws of
example j of the global batch of step t come from the key
fold_in(fold_in(fold_in(PRNGKey(seed), SALT), t), j): a function of (seed,
step, example) alone, so the crops are the same on any mesh and any number
of processes (JAX's random bits do not depend on the sharding).

Evaluation: the mean subtracted, then the central crop or the ten views
(4 corners and centre, and their reflections), as preprocess.py does on the
host for the other sources.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np

SALT = 0x41554721  # Keeps these draws apart from the run's other keys.


def draws(seed, step, batch_size: int, limit: int, alpha_stddev: float,
          random_flip: bool = True, pca_noise: bool = True):
  """(offsets (B, 2) int32 in [0, limit], flips (B,) bool, alphas (B, 3)
  float32) of step `step`'s global batch."""
  base = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed),
                                               SALT), step)

  def one(j):
    k_crop, k_flip, k_pca = jax.random.split(jax.random.fold_in(base, j), 3)
    offsets = jax.random.randint(k_crop, (2,), 0, limit + 1, jnp.int32)
    flip = (jax.random.uniform(k_flip) < 0.5) & random_flip
    alpha = jax.random.normal(k_pca, (3,), jnp.float32) * alpha_stddev
    return offsets, flip, jnp.where(pca_noise, alpha, 0.0)

  return jax.vmap(one)(jnp.arange(batch_size))


def _mean_and_pca(config, mean):
  d = config.data
  mean = np.asarray(mean, np.float32)
  eigvecs = np.asarray(d.pca_eigvecs, np.float32)
  stddevs = np.asarray(d.pca_stddevs, np.float32)
  return mean, eigvecs, stddevs


def make_train_augment(config, mesh, mean):
  """`augment(images uint8 (B, r, r, 3), step) -> float32 (B, c, c, 3)`,
  jitted over `mesh` (in and out sharded over 'data'); `mean` is the
  per-pixel mean image (r, r, 3) or per-channel means (3,)."""
  d = config.data
  c, r = d.crop_size, d.resize_size
  mean, eigvecs, stddevs = _mean_and_pca(config, mean)
  per_pixel = mean.ndim == 3
  by_data = NamedSharding(mesh, P('data'))

  @functools.partial(jax.jit, in_shardings=(by_data, None),
                     out_shardings=by_data)
  def augment(images, step):
    offsets, flips, alphas = draws(config.seed, step, images.shape[0], r - c,
                                   d.pca_alpha_stddev, d.random_flip,
                                   d.pca_noise)
    window = lambda a, o: lax.dynamic_slice(a, (o[0], o[1], 0), (c, c, 3))
    x = jax.vmap(window)(images, offsets).astype(jnp.float32)
    if per_pixel:
      x = x - jax.vmap(lambda o: window(jnp.asarray(mean), o))(offsets)
    else:
      x = x - jnp.asarray(mean)
    delta = (alphas * jnp.asarray(stddevs)) @ jnp.asarray(eigvecs).T
    x = x + delta[:, None, None, :]
    return jnp.where(flips[:, None, None, None], x[:, :, ::-1], x)

  return augment


def make_eval_views(config, mesh, mean, ten_crop: bool = False):
  """`views(images uint8 (B, r, r, 3)) -> float32 (B, c, c, 3)`, or (B, 10,
  c, c, 3) with `ten_crop`: mean subtracted, then the central crop or the
  ten views, in the order of preprocess.ten_crop."""
  d = config.data
  c, r = d.crop_size, d.resize_size
  mean = jnp.asarray(np.asarray(mean, np.float32))
  by_data = NamedSharding(mesh, P('data'))
  lim, mid = r - c, (r - c) // 2

  @functools.partial(jax.jit, in_shardings=by_data, out_shardings=by_data)
  def views(images):
    x = images.astype(jnp.float32) - mean
    if not ten_crop:
      return x[:, mid:mid + c, mid:mid + c]
    corners = [(0, 0), (0, lim), (lim, 0), (lim, lim), (mid, mid)]
    crops = jnp.stack([x[:, y:y + c, z:z + c] for y, z in corners], axis=1)
    return jnp.concatenate([crops, crops[:, :, :, ::-1]], axis=1)

  return views
