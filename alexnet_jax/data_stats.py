"""Training-set statistics for the paper's preprocessing, computed streaming.

  mean image   per-pixel mean of the training images after shorter side to
               resize_size and the central square, 0-255 (§2); saved as .npy
               and used through config.data.mean_image_path.
  RGB PCA      eigen-decomposition of the 3x3 covariance of RGB pixel values
               over the training set (§4.1): eigenvectors as columns and the
               per-component standard deviations (cuda-convnet's convention).

Memory is bounded: running float64 sums of one image and of 3x3 moments.

  python -m alexnet_jax.data_stats --config=configs/alexnet.py:demo \
      --out=/tmp/stats [--max_images=50000]
"""

import json
import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags
import numpy as np
import tensorflow as tf

from alexnet_jax import input_pipeline as ip
from alexnet_jax import preprocess as pp
from alexnet_jax import startup


def compute(config, max_images=0, batch=64):
  """Returns dict(mean_image, eigvecs, stddevs, channel_means, num_images)
  for the split."""
  d = config.data
  source = ip.get_source(config, 'train', 0, 1)
  ds = source.records(None, 0)
  if max_images:
    ds = ds.take(max_images)
  ds = ds.map(lambda x, l: pp.decode_and_resize(x, d.resize_size,
                                                d.resize_antialias),
              num_parallel_calls=tf.data.AUTOTUNE).ignore_errors()
  ds = ds.batch(batch).prefetch(2)
  total = np.zeros((d.resize_size, d.resize_size, 3))
  s1, s2, n = np.zeros(3), np.zeros((3, 3)), 0
  for images in ds.as_numpy_iterator():
    images = images.astype(np.float64)
    total += images.sum(0)
    pixels = images.reshape(-1, 3)
    s1 += pixels.sum(0)
    s2 += pixels.T @ pixels
    n += len(images)
  mean = total / n
  npix = n * d.resize_size ** 2
  mu = s1 / npix
  cov = s2 / npix - np.outer(mu, mu)
  eigvals, eigvecs = np.linalg.eigh(cov)  # Ascending, like the paper's list.
  return dict(mean_image=mean.astype(np.float32), eigvecs=eigvecs,
              stddevs=np.sqrt(np.maximum(eigvals, 0)), channel_means=mu,
              num_images=n)


def save(stats, out_dir):
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, 'mean_image.npy')
  np.save(path, stats['mean_image'])
  pca = {k: np.asarray(stats[k]).tolist()
         for k in ('eigvecs', 'stddevs', 'channel_means', 'num_images')}
  with open(os.path.join(out_dir, 'rgb_pca.json'), 'w') as f:
    json.dump(pca, f, indent=1)
  return path


def main(argv):
  del argv
  startup.quiet_libraries(verbose=logging.get_verbosity() >= 1)
  startup.hide_gpus_from_tensorflow()
  f = flags.FLAGS
  stats = compute(f.config, f.max_images)
  path = save(stats, f.out)
  logging.info('%d images; mean image -> %s', stats['num_images'], path)
  print(f'--config.data.mean_image_path={path}')
  print(f'--config.data.pca_eigvecs="{tuple(map(tuple, np.round(stats["eigvecs"], 4).tolist()))}"')
  print(f'--config.data.pca_stddevs="{tuple(np.round(stats["stddevs"], 3).tolist())}"')


if __name__ == '__main__':
  # Flags only when run as a program, so importing never clashes.
  config_flags.DEFINE_config_file('config', None, 'Config file.')
  flags.DEFINE_string('out', None, 'Output directory.')
  flags.DEFINE_integer('max_images', 0, '0: the whole training split.')
  flags.mark_flags_as_required(['config', 'out'])
  app.run(main)
