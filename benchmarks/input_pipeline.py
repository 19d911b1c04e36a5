"""Input pipeline throughput next to bare JPEG decoding of the same files.

  python benchmarks/input_pipeline.py [--num_images 400] [--out docs/BENCHMARKS_input.md]

Generates ImageNet-like JPEGs (sides 200-550 px, ~400x350 average, photo-like
smooth content plus noise), then times, in one run, images/s through tf.data:
  bare decode          tf.io.decode_jpeg of the whole image
  train augmentation   preprocess.train_preprocess (central-square crop-decode,
                       resize 256, mean, random 224 crop, flip, PCA lighting)
  full train pipeline  input_pipeline.train_dataset on a folder of the files
                       (file reads, per-batch decode with skip-and-count)
  pre-resized 256      the same, on copies stored as 256x256 JPEGs (the
                       paper's trick)
"""

import argparse
import io
import os
import platform
import sys
import tempfile
import time

import numpy as np
from PIL import Image
import tensorflow as tf

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from alexnet_jax import input_pipeline as ip  # pylint: disable=g-import-not-at-top
from alexnet_jax import preprocess as pp  # pylint: disable=g-import-not-at-top
from configs.alexnet import get_config  # pylint: disable=g-import-not-at-top


def photo_like(rng, h, w):
  small = rng.integers(0, 256, (h // 16 + 2, w // 16 + 2, 3)).astype(np.uint8)
  img = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC),
                   np.int16)
  img = img + rng.normal(0, 12, (h, w, 3))
  return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def make_jpegs(n, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    h, w = int(rng.integers(200, 501)), int(rng.integers(250, 551))
    buf = io.BytesIO()
    photo_like(rng, h, w).save(buf, 'JPEG', quality=90)
    out.append(buf.getvalue())
  return out


def pre_resize(jpegs, size):
  out = []
  for data in jpegs:
    img = pp.decode_and_resize(tf.constant(data), size).numpy()
    out.append(tf.io.encode_jpeg(img.round().astype(np.uint8),
                                 quality=95).numpy())
  return out


def rate(ds, n, repeats=2):
  """Images/s over `repeats` passes after one warm-up pass."""
  for _ in ds:
    pass
  t = time.perf_counter()
  for _ in range(repeats):
    for _ in ds:
      pass
  return n * repeats / (time.perf_counter() - t)


def per_image(jpegs, fn):
  ds = tf.data.Dataset.from_tensor_slices(jpegs).enumerate()
  ds = ds.map(lambda i, x: fn(x, tf.stack([i, i])),
              num_parallel_calls=tf.data.AUTOTUNE)
  return ds.batch(128)


def folder_pipeline(config, jpegs, root):
  for i, data in enumerate(jpegs):
    d = os.path.join(root, 'train', f'c{i % 10}')
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f'{i}.jpg'), 'wb') as f:
      f.write(data)
  config.data.dataset, config.data.folder = 'folder', root
  source = ip.get_source(config, 'train', 0, 1)
  steps = source.num_examples // config.batch_size
  return ip.train_dataset(config, source, config.batch_size, steps, 0), (
      steps * config.batch_size)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--num_images', type=int, default=400)
  parser.add_argument('--out', default='docs/BENCHMARKS_input.md')
  args = parser.parse_args()
  config = get_config()
  d = config.data
  t0 = time.perf_counter()
  jpegs = make_jpegs(args.num_images)
  small = pre_resize(jpegs, d.resize_size)
  mean = ip.load_mean(config)
  n = len(jpegs)

  def train(antialias):
    return lambda x, s: pp.train_preprocess(
        x, s, mean=mean, resize_size=d.resize_size, crop_size=d.crop_size,
        random_flip_=d.random_flip, pca_noise=d.pca_noise,
        eigvecs=d.pca_eigvecs, stddevs=d.pca_stddevs,
        alpha_stddev=d.pca_alpha_stddev, antialias=antialias)
  decode = lambda x, s: tf.io.decode_jpeg(x, channels=3)[:1, :1]
  rows = []
  bare = rate(per_image(jpegs, decode), n)
  rows.append(('bare decode (full image)', bare))
  rows.append(('train augmentation, antialias resize',
               rate(per_image(jpegs, train(True)), n)))
  rows.append(('train augmentation, plain bilinear resize',
               rate(per_image(jpegs, train(False)), n)))
  with tempfile.TemporaryDirectory() as root:
    config.batch_size = 64
    ds, m = folder_pipeline(config, jpegs, root)
    rows.append(('full train pipeline (folder, batches of 64)', rate(ds, m)))
  rows.append(('pre-resized 256: bare decode', rate(per_image(small, decode),
                                                    n)))
  rows.append(('pre-resized 256: train augmentation',
               rate(per_image(small, train(True)), n)))
  cores = os.cpu_count()
  sizes = [tf.image.extract_jpeg_shape(x).numpy()[:2] for x in jpegs]
  lines = [
      '# Input pipeline throughput', '',
      f'Machine: {platform.processor() or platform.machine()}, {cores} CPU '
      f'cores, TensorFlow {tf.__version__}, Python {platform.python_version()}.',
      f'Data: {n} generated JPEGs, mean size {np.mean(sizes, 0).round()} '
      f'(h, w), mean {np.mean([len(x) for x in jpegs]) / 1e3:.0f} KB; '
      f'pre-resized copies {np.mean([len(x) for x in small]) / 1e3:.0f} KB.',
      'Command: `python benchmarks/input_pipeline.py` '
      f'({time.perf_counter() - t0:.0f} s).', '',
      '| stage | images/s | per core | vs bare decode |', '|---|---|---|---|']
  for name, r in rows:
    lines.append(f'| {name} | {r:.0f} | {r / cores:.0f} | {r / bare:.0%} |')
  text = '\n'.join(lines) + '\n'
  print(text)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(text)


if __name__ == '__main__':
  main()
