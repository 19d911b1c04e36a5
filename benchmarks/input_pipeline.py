"""Input pipeline throughput next to bare JPEG decoding of the same files.

  python benchmarks/input_pipeline.py [--num_images 400] [--copies 5] \\
      [--repeats 3] \\
      [--out docs/BENCHMARKS_input.md]  (rewrites the table, keeps the notes)

Generates ImageNet-like JPEGs (sides 200-550 px, ~400x350 average, photo-like
smooth content plus noise), then times, in one run, images/s through tf.data
(batches of 128):
  bare decode          tf.io.decode_jpeg of the whole image
  components           the crop window's decode alone, then with the
                       bilinear resample to 224 by each implementation
                       (no RNG/PCA/conds)
  reference            preprocess.train_preprocess_reference: the literal
                       chain on the float 256x256 square (the old pipeline)
  train augmentation   preprocess.train_example: the crop window decoded and
                       resampled straight to 224, uint8, plus the mean/PCA
                       shift; the float step (mean, shift, mirror) runs on
                       the accelerator (input_pipeline.device_finish); the
                       resample by the native op (alexnet_jax/native.py),
                       and once more by TensorFlow's crop_and_resize
  ... + float on host  the same plus preprocess.train_finish in tf.data (what
                       a host without an accelerator pays)
  full train pipeline  input_pipeline.train_dataset on a folder of the files
                       (file reads, per-batch decode with skip-and-count),
                       and once more with a bare decode of each whole image
                       in place of the augmentation (that pipeline's own
                       baseline)
  pre-resized 256      on copies stored as 256x256 JPEGs (the paper's trick;
                       made as alexnet_jax/prepare.py does); the full
                       pipeline row reads prepare.py's own output, and once
                       more with a no-op decode: the rate the pipeline
                       itself (reading, shuffling, batching) allows
  decoded copy         prepare.py's decoded copy of the same images (raw
                       uint8 256x256, alexnet_jax/decoded_copy.py): the
                       host's part (uint8 batches in the epoch's order, read
                       from the memory-mapped shards), then the whole train
                       iterator (the same, handed to JAX, and the crop,
                       flip, PCA lighting and mean subtraction done by
                       alexnet_jax/device_augment.py, here on this CPU)

With --train_step, it also times the full network's train step (batch 32,
224 crops, as benchmarks/train_step.py) fed float images made beforehand
and fed uint8 256x256 images through the device augmentation first: what
the augmentation costs the step.

Each pass goes over every image `--copies` times (the folders hold that
many copies of each file), so that it runs long against what a pipeline
prepares ahead, and is timed from its first batch on (reading the first
shuffle window is paid once a run). Each stage is timed `--repeats` times,
interleaved with the others, and the best pass is kept; rates are given per
wall-clock second and per CPU second of this process (all threads), the
latter robust to other jobs sharing the machine. Ratios are to bare decode
in the same run.
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
from alexnet_jax import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
from alexnet_jax import native  # pylint: disable=g-import-not-at-top
from alexnet_jax import prepare  # pylint: disable=g-import-not-at-top
from alexnet_jax import preprocess as pp  # pylint: disable=g-import-not-at-top
from configs import alexnet  # pylint: disable=g-import-not-at-top


def get_config():
  """The paper's config with the per-channel means: generated images have
  no cached mean image, and the mean's kind does not change the cost."""
  config = alexnet.get_config()
  config.data.mean = 'channel'
  return config


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


def rate(ds, n):
  """(images per wall second, images per CPU second) over one pass, in
  steady state: from the first batch on, not counting it (the time to the
  first batch, e.g. reading a whole shuffle window, is paid once a run)."""
  it = iter(ds)
  first = tf.nest.flatten(next(it))[0].shape[0]
  t, c = time.perf_counter(), time.process_time()
  for _ in it:
    pass
  n -= first
  return n / (time.perf_counter() - t), n / (time.process_time() - c)


def per_image(jpegs, copies, fn, finish=None):
  ds = tf.data.Dataset.from_tensor_slices(jpegs).repeat(copies).enumerate()
  ds = ds.map(lambda i, x: fn(x, tf.stack([i, i])),
              num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(128)
  return ds.map(finish) if finish else ds


def write_folder(config, jpegs, copies, root, prepared=False):
  """Writes a folder holding `copies` copies of each JPEG under `root` and
  returns its training source (or that of prepare.py's pre-resized copy of
  the folder)."""
  for i, data in enumerate(jpegs):
    for split, k in [('train', copies), ('val', int(i < 10))]:
      d = os.path.join(root, split, f'c{i % 10}')
      os.makedirs(d, exist_ok=True)
      for j in range(k):
        with open(os.path.join(d, f'{i}_{j}.jpg'), 'wb') as f:
          f.write(data)
  config.data.dataset, config.data.folder = 'folder', root
  if prepared:
    out = os.path.join(root, 'prepared')
    prepare.prepare(config, out)
    config.data.prepared_dir = out
  return ip.get_source(config, 'train', 0, 1)


def rate_iter(make, n, batch):
  """As `rate`, for a Python iterator of batches (jax arrays are waited
  for)."""
  import jax  # pylint: disable=g-import-not-at-top
  it = make()
  jax.block_until_ready(next(it))
  t, c = time.perf_counter(), time.process_time()
  for _ in range(n // batch - 1):
    jax.block_until_ready(next(it))
  n = (n // batch - 1) * batch
  close = getattr(it, 'close', None)
  if close:
    close()
  return n / (time.perf_counter() - t), n / (time.process_time() - c)


def decoded_host_batches(reader, batch):
  """The decoded copy's host part: the epoch's uint8 batches."""
  order = reader.epoch_order((0, 0, 0))
  for b in range(len(order) // batch):
    yield reader.read(order[b * batch:(b + 1) * batch])


def train_step_with_augmentation(batch, steps):
  """(images/s of the train step fed float crops, and fed uint8 256x256
  images through device_augment first), median of `steps` interleaved."""
  import jax  # pylint: disable=g-import-not-at-top
  from alexnet_jax import device_augment  # pylint: disable=g-import-not-at-top
  from benchmarks import train_step as bench  # pylint: disable=g-import-not-at-top
  step, state, floats = bench.full_step(batch, 1, 1)
  config = get_config()
  mesh = mesh_lib.make_mesh(config.model.num_towers, 1, 1)
  augment = device_augment.make_train_augment(
      config, mesh, np.asarray(config.data.channel_means, np.float32))
  rng = np.random.default_rng(0)
  r = config.data.resize_size
  uint8 = jax.device_put(rng.integers(0, 256, (batch, r, r, 3), np.uint8),
                         mesh_lib.data_sharding(mesh))
  labels = floats['labels']

  def fed(kind, i):
    if kind == 'float':
      return floats
    return {'images': augment(uint8, i), 'labels': labels}
  times = {'float': [], 'uint8': []}
  for kind in times:  # Compile and warm up.
    state, m = step(state, fed(kind, 0))
    jax.block_until_ready(m)
  for i in range(steps):
    for kind in times:
      t = time.perf_counter()
      state, m = step(state, fed(kind, i))
      jax.block_until_ready(m)
      times[kind].append(time.perf_counter() - t)
  return {k: batch / np.median(v) for k, v in times.items()}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--num_images', type=int, default=400)
  parser.add_argument('--copies', type=int, default=5)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--out', default='docs/BENCHMARKS_input.md')
  parser.add_argument('--train_step', action='store_true',
                      help='Also time the train step with and without the '
                      'device augmentation.')
  args = parser.parse_args()
  if args.num_images * args.copies < 256:
    parser.error('--num_images x --copies must be at least 256: each pass is '
                 'timed from its first batch of 128 on, so it needs more.')
  config = get_config()
  d = config.data
  t0 = time.perf_counter()
  jpegs = make_jpegs(args.num_images)
  small = pre_resize(jpegs, d.resize_size)
  mean = ip.load_mean(config)
  n, copies = len(jpegs), args.copies

  def reference(x, s):
    return pp.train_preprocess_reference(
        x, s, mean=mean, resize_size=d.resize_size, crop_size=d.crop_size,
        random_flip_=d.random_flip, pca_noise=d.pca_noise,
        eigvecs=d.pca_eigvecs, stddevs=d.pca_stddevs,
        alpha_stddev=d.pca_alpha_stddev, antialias=d.resize_antialias)

  def train(**overrides):
    c = get_config()
    c.data.update(overrides)
    return ip.train_example_fn(c)
  finish = lambda *parts: pp.train_finish(*parts, mean=mean)
  decode = lambda x, s: tf.io.decode_jpeg(x, channels=3)[:1, :1]

  def window(x, s, resample=None):
    """Components of train_example on a JPEG: the crop window's decode
    (plus the bilinear resample to the crop, rounded to uint8, by
    `resample`: 'native' or 'tf')."""
    limit = d.resize_size - d.crop_size
    offsets = tf.stack(pp.crop_offsets(
        tf.random.experimental.stateless_split(s, 3)[0], limit, limit))
    shape = tf.image.extract_jpeg_shape(x)
    oy, ox, side = pp.central_square(shape[0], shape[1])
    lo, size, first, last = pp.decode_window(offsets, side, d.resize_size,
                                             d.crop_size, 1.0)
    img = tf.image.decode_and_crop_jpeg(
        x, tf.concat([tf.stack([oy, ox]) + lo, size], 0), channels=3)
    if not resample:
      return img[:1, :1]
    if resample == 'native':
      step = tf.cast(side, tf.float32) / d.resize_size
      return native.resample_op('native')(
          image=img, grid=tf.stack([first[0], step, first[1], step]),
          height=d.crop_size, width=d.crop_size)
    steps = tf.cast(size - 1, tf.float32)
    box = tf.concat([first / steps, last / steps], 0)
    return tf.cast(tf.image.crop_and_resize(
        img[None], box[None], [0], [d.crop_size, d.crop_size])[0] + 0.5,
                   tf.uint8)
  stages = {
      'bare decode (full image)': lambda: per_image(jpegs, copies, decode),
      'component: decode of the crop window only':
          lambda: per_image(jpegs, copies, window),
      'component: window decode + crop_and_resize to 224, uint8':
          lambda: per_image(jpegs, copies,
                            lambda x, s: window(x, s, 'tf')),
      'component: window decode + the native resample to 224, uint8':
          lambda: per_image(jpegs, copies,
                            lambda x, s: window(x, s, 'native')),
      'reference: float 256x256 chain (old pipeline)':
          lambda: per_image(jpegs, copies, reference),
      '**train augmentation** (uint8 crops + shift; float step on device)':
          lambda: per_image(jpegs, copies, train()),
      '... the same with crop_and_resize (--config.data.resample=tf)':
          lambda: per_image(jpegs, copies, train(resample='tf')),
      '... + float step on the host (train_finish in tf.data)':
          lambda: per_image(jpegs, copies, train(), finish),
      'pre-resized 256: bare decode':
          lambda: per_image(small, copies, decode),
      'pre-resized 256: train augmentation':
          lambda: per_image(small, copies, train()),
  }
  best = {k: (0.0, 0.0) for k in stages}
  built = {k: f() for k, f in stages.items()}
  counts = {name: n * copies for name in built}
  crop = (d.crop_size, d.crop_size, 3)
  noop = lambda x, s: (tf.zeros(crop, tf.uint8), tf.zeros([2], tf.int32),
                       tf.constant(False), tf.zeros([3]))
  # The whole image decoded, one pixel of it broadcast to the crop's shape.
  bare_decode = lambda x, s: (
      tf.broadcast_to(tf.io.decode_jpeg(x, channels=3)[:1, :1], crop),
      tf.zeros([2], tf.int32), tf.constant(False), tf.zeros([3]))
  with tempfile.TemporaryDirectory() as root:
    for full, prepared in [('full train pipeline (folder, batches of 64)',
                            False),
                           ('pre-resized 256: full train pipeline (prepare.py '
                            'output, batches of 64)', True)]:
      cfg = get_config()
      cfg.batch_size = 64
      source = write_folder(cfg, jpegs, copies,
                            os.path.join(root, str(prepared)), prepared)
      steps = source.num_examples // 64
      rows = {full: None}  # None: the train augmentation.
      if prepared:
        rows['pre-resized 256: the same with a no-op decode (the '
             "pipeline's own ceiling)"] = noop
      else:
        rows['the same pipeline with a bare decode (its own baseline)'] = (
            bare_decode)
      for name, fn in rows.items():
        built[name] = ip.train_dataset(cfg, source, 64, steps, 0,
                                       example_fn=fn)
        counts[name], best[name] = steps * 64, (0.0, 0.0)
    # The decoded copy of the same folder: host batches, whole iterator.
    cfg = get_config()
    cfg.batch_size = 64
    write_folder(cfg, jpegs, copies, os.path.join(root, 'decoded'))
    out = os.path.join(root, 'decoded', 'copy')
    prepare.prepare(cfg, out, decoded=True)
    cfg.data.prepared_dir = out
    source = ip.get_source(cfg, 'train', 0, 1)
    mesh = mesh_lib.make_mesh(2, 1, 1)
    steps = source.num_examples // 64
    iters = {
        '**decoded copy: host batches** (uint8, epoch order, memory-mapped '
        'shards)': lambda: decoded_host_batches(source.decoded, 64),
        'decoded copy: whole train iterator (+ device augmentation, here on '
        'the CPU)': lambda: ip.train_iterator(cfg, mesh)}
    for k in iters:
      counts[k], best[k] = steps * 64, (0.0, 0.0)

    def measure(k):
      return (rate(built[k], counts[k]) if k in built else
              rate_iter(iters[k], counts[k], 64))
    for k in best:  # Warm-up pass.
      measure(k)
    for _ in range(args.repeats):
      for k in best:
        w, c = measure(k)
        best[k] = (max(best[k][0], w), max(best[k][1], c))
  bare = best['bare decode (full image)']
  cores = os.cpu_count()
  sizes = [tf.image.extract_jpeg_shape(x).numpy()[:2] for x in jpegs]
  lines = [
      '| stage | images/s | per core | vs bare decode | images per CPU-s '
      '| vs bare decode (CPU) |', '|---|---|---|---|---|---|']
  for k, (w, c) in best.items():
    lines.append(f'| {k} | {w:.0f} | {w / cores:.0f} | {w / bare[0]:.0%} | '
                 f'{c:.0f} | {c / bare[1]:.0%} |')
  head = [
      f'Machine: {platform.processor() or platform.machine()}, {cores} CPU '
      f'cores, TensorFlow {tf.__version__}, Python {platform.python_version()}.',
      f'Data: {n} generated JPEGs, mean size {np.mean(sizes, 0).round()} '
      f'(h, w), mean {np.mean([len(x) for x in jpegs]) / 1e3:.0f} KB; '
      f'pre-resized copies {np.mean([len(x) for x in small]) / 1e3:.0f} KB.',
      f'Command: `python benchmarks/input_pipeline.py --num_images '
      f'{args.num_images} --copies {copies} --repeats {args.repeats}` ('
      f'{time.perf_counter() - t0:.0f} s); best of {args.repeats} interleaved '
      'passes, each timed from its first batch on.', '']
  copy_row = best['pre-resized 256: full train pipeline (prepare.py output, '
                  'batches of 64)']
  decoded_row = best['**decoded copy: host batches** (uint8, epoch order, '
                     'memory-mapped shards)']
  lines += ['', f'Decoded copy vs the JPEG copy, whole host pipeline: '
            f'{decoded_row[0] / copy_row[0]:.1f}x per wall second, '
            f'{decoded_row[1] / copy_row[1]:.1f}x per CPU second.']
  if args.train_step:
    step = train_step_with_augmentation(32, 5)
    lines += ['', f'Train step, full network, batch 32: {step["float"]:.1f} '
              f'images/s fed float crops, {step["uint8"]:.1f} fed uint8 '
              '256x256 images through the device augmentation '
              f'({1 - step["uint8"] / step["float"]:.1%} slower).']
  text = '\n'.join(head + lines) + '\n'
  print(text)
  if args.out:
    # Replaces the figures at the top of the file, keeping the notes below.
    notes = ''
    if os.path.exists(args.out):
      with open(args.out) as f:
        old = f.read()
      if '\nHow to read it:' in old:
        notes = '\n' + old[old.index('How to read it:'):]
    with open(args.out, 'w') as f:
      f.write('# Input pipeline throughput\n\n' + text + notes)


if __name__ == '__main__':
  main()
