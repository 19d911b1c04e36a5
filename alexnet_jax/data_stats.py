"""Training-set statistics for the paper's preprocessing: computed streaming,
cached next to the dataset.

  mean image   per-pixel mean of the training images after shorter side to
               resize_size and the central square, 0-255 (§2): what the
               paper subtracts (config.data.mean='image').
  RGB PCA      eigen-decomposition of the 3x3 covariance of RGB pixel values
               over the training set (§4.1): eigenvectors as columns and the
               per-component standard deviations (cuda-convnet's convention).

Memory is bounded: running float64 sums of one image and of 3x3 moments.

The cache: a dataset's statistics at one resize size are two files in a
directory next to the dataset (input_pipeline.stats_dir), stats_<r>.json
holding a key (which dataset, how many training examples, the resize size
and filter) with the PCA, and mean_image_<r>.npy. They are used while the
key matches and computed again when it changes (a rebuilt dataset, another
filter). `python -m alexnet_jax.prepare` computes them once, ahead of
training.
"""

import json
import os
import time
from typing import Any, Dict, Iterable, Optional

from absl import logging
import numpy as np
import tensorflow as tf

from alexnet_jax import preprocess as pp


def compute(images: tf.data.Dataset, resize_size: int, antialias: bool = True,
            total: Optional[int] = None, batch: int = 64,
            log_every_seconds: float = 30.0) -> Dict[str, Any]:
  """`accumulate` over a dataset of encoded images, each decoded, its
  shorter side resized to resize_size and the central square cropped
  (preprocess.decode_and_resize; undecodable ones skipped)."""
  ds = images.map(lambda x: pp.decode_and_resize(x, resize_size, antialias),
                  num_parallel_calls=tf.data.AUTOTUNE).ignore_errors()
  return accumulate(ds.batch(batch).prefetch(2).as_numpy_iterator(),
                    resize_size, total, log_every_seconds)


def accumulate(batches: Iterable[np.ndarray], resize_size: int,
               total: Optional[int] = None,
               log_every_seconds: float = 30.0) -> Dict[str, Any]:
  """dict(mean_image, eigvecs, stddevs, channel_means, num_images) of
  batches of (resize_size, resize_size, 3) images; progress is logged every
  `log_every_seconds` against `total` images."""
  sums = np.zeros((resize_size, resize_size, 3))
  s1, s2, n = np.zeros(3), np.zeros((3, 3)), 0
  start = last_log = time.time()
  for chunk in batches:
    chunk = chunk.astype(np.float64)
    sums += chunk.sum(0)
    pixels = chunk.reshape(-1, 3)
    s1 += pixels.sum(0)
    s2 += pixels.T @ pixels
    n += len(chunk)
    if time.time() - last_log > log_every_seconds:
      last_log = time.time()
      rate = n / (last_log - start)
      of = (f' of {total:,} ({100 * n / total:.1f}%, ETA '
            f'{(total - n) / rate:.0f} s)') if total else ''
      logging.info('Training-set statistics: %s images%s, %.0f images/s.',
                   f'{n:,}', of, rate)
  if n == 0:
    raise ValueError('No decodable training image: cannot compute the mean '
                     'image.')
  npix = n * resize_size ** 2
  mu = s1 / npix
  cov = s2 / npix - np.outer(mu, mu)
  eigvals, eigvecs = np.linalg.eigh(cov)  # Ascending, like the paper's list.
  return dict(mean_image=(sums / n).astype(np.float32), eigvecs=eigvecs,
              stddevs=np.sqrt(np.maximum(eigvals, 0)), channel_means=mu,
              num_images=n)


def _paths(directory: str, resize_size: int):
  return (os.path.join(directory, f'stats_{resize_size}.json'),
          os.path.join(directory, f'mean_image_{resize_size}.npy'))


def save(stats: Dict[str, Any], directory: str, resize_size: int,
         key: Dict[str, Any]) -> str:
  """Writes the statistics and their key to `directory` (each file whole or
  not at all); returns the mean image's path."""
  meta_path, mean_path = _paths(directory, resize_size)
  tf.io.gfile.makedirs(directory)
  with tf.io.gfile.GFile(mean_path + '.tmp', 'wb') as f:
    np.save(f, stats['mean_image'])
  tf.io.gfile.rename(mean_path + '.tmp', mean_path, overwrite=True)
  meta = {'key': key, **{k: np.asarray(stats[k]).tolist() for k in
                         ('eigvecs', 'stddevs', 'channel_means',
                          'num_images')}}
  with tf.io.gfile.GFile(meta_path + '.tmp', 'w') as f:
    json.dump(meta, f, indent=1)
  tf.io.gfile.rename(meta_path + '.tmp', meta_path, overwrite=True)
  return mean_path


def load(directory: str, resize_size: int, key: Dict[str, Any]
         ) -> Optional[Dict[str, Any]]:
  """The cached statistics if their key is `key`, else None (and why, in
  the log)."""
  meta_path, mean_path = _paths(directory, resize_size)
  if not (tf.io.gfile.exists(meta_path) and tf.io.gfile.exists(mean_path)):
    return None
  with tf.io.gfile.GFile(meta_path) as f:
    meta = json.load(f)
  if meta.get('key') != key:
    logging.warning('The training-set statistics in %s were computed for %s, '
                    'not %s: computing them again.', directory,
                    meta.get('key'), key)
    return None
  with tf.io.gfile.GFile(mean_path, 'rb') as f:
    mean = np.load(f)
  return {'mean_image': mean, 'path': mean_path,
          **{k: np.asarray(v) for k, v in meta.items() if k != 'key'}}
