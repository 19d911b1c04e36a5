"""Input pipeline: ImageNet (tfds), the built-in demo, or a folder of images.

  train_iterator(config, mesh, start_step=0)  -> {'images', 'labels'}, forever
  eval_iterator(config, mesh, ten_crop=False) -> {'images', 'labels', 'mask'}

Batches are global `jax.Array`s sharded over the mesh's 'data' axis (and
replicated over 'tower'), assembled from each process's own slice of the data.

Determinism and resume. Each epoch has its own order, a pure function of
(seed, epoch): shards (tfds) are permuted, then records are shuffled inside
fixed windows of `config.data.shuffle_buffer` records (folders: the file list
is permuted whole). Every example's augmentation is seeded by (seed, process,
epoch, position). Records are grouped into batches *before* decoding, so
batch k of epoch e always holds the same records; a restart at step N skips
whole shards and windows without reading them and lands on the same batch.

Undecodable records. Each batch is decoded as a small inner dataset with
`ignore_errors`; the holes a bad record leaves are filled by repeating the
batch's good examples (train) or masked out (eval), so shapes and batch
boundaries never move (a train batch with no good record at all is dropped). The number skipped travels with the batch and is
logged (absl, WARNING) as a running total; nothing crashes.
"""

import dataclasses
import functools
import json
import os
import queue
import threading
from typing import Callable, Optional, Sequence

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from alexnet_jax import native
from alexnet_jax import preprocess as pp

DATASETS = ('imagenet2012', 'demo', 'folder')
IMAGENET_TARS = ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar')
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif')
_SPLITS = {'train': 'train', 'eval': 'validation'}


# ------------------------------------------------------------------ sources
@dataclasses.dataclass
class Source:
  """One split's records for one process, readable from any position.

  `records(order_seed, start)` gives a dataset of (image bytes, label) in
  the epoch order picked by `order_seed` (None: stored order), from record
  `start` on.
  """
  num_examples: int  # This process's.
  total_examples: int  # All processes'.
  num_classes: int
  records: Callable[[Optional[Sequence[int]], int], tf.data.Dataset]


def process_range(n, process_index, process_count):
  """[start, end) of process `process_index`'s contiguous share of n records
  (the first n % count processes get one more, as `tfds.even_splits`)."""
  base, extra = divmod(n, process_count)
  start = process_index * base + min(process_index, extra)
  return start, start + base + (process_index < extra)


def make_seed(*parts):
  """A stateless-RNG seed (shape [2], int64) from integers (tensors ok)."""
  seed = tf.constant([parts[0], 0], tf.int64)
  for p in parts[1:]:
    seed = tf.random.experimental.stateless_fold_in(seed, p)
  return seed


def example_seeds(seed, positions):
  """(n, 2) seeds of the examples at `positions` (int64): row j is
  `stateless_fold_in(seed, positions[j])`, which is [r, positions[j]] with r
  drawn from `seed` alone; made for a whole batch at once (one fold-in per
  record costs more CPU than a pre-resized image's decode)."""
  r = tf.random.experimental.stateless_fold_in(seed, positions[0])[0]
  return tf.stack([tf.fill(tf.shape(positions), r), positions], axis=1)


def _windowed_shuffle(ds, window, order_seed, first_window):
  """Shuffles inside consecutive windows of `window` records; window w's
  permutation depends only on (order_seed, w)."""
  seed = make_seed(*order_seed)

  def shuffle(w, batch):
    s = tf.random.experimental.stateless_fold_in(seed, w)
    n = tf.shape(batch[0])[0]
    perm = tf.argsort(tf.random.stateless_uniform([n], s))
    return tf.data.Dataset.from_tensor_slices(
        tuple(tf.gather(x, perm) for x in batch))

  ds = ds.batch(window).enumerate(first_window)
  return ds.flat_map(lambda w, batch: shuffle(w, batch))


def tfds_source(builder, split, process_index, process_count, window):
  """A tfds split's process share, read shard by shard (no tfds shuffling)."""
  sub = tfds.split_for_jax_process(split, process_index=process_index,
                                   process_count=process_count)
  info = builder.info.splits[sub]
  instr = [(f.filename, f.skip, f.take) for f in info.file_instructions]
  # The tf.Example keys tfds writes for the image (undecoded) and label.
  serialized = builder.info.features.get_serialized_info()
  spec = {k: tf.io.FixedLenFeature(serialized[k].shape, serialized[k].tf_dtype)
          for k in ('image', 'label')}
  return Source(info.num_examples, builder.info.splits[split].num_examples,
                builder.info.features['label'].num_classes,
                _sharded_records(instr, spec, window))


def _sharded_records(instr, spec, window):
  """`Source.records` over (file, skip, take) TFRecord shard instructions of
  tf.Examples with an 'image' (bytes) and a 'label' feature (`spec`)."""

  def parse(serialized):  # A batch at a time: ~4x less CPU than one by one.
    ex = tf.io.parse_example(serialized, spec)
    return ex['image'], tf.cast(ex['label'], tf.int32)

  def records(order_seed, start):
    order = np.arange(len(instr))
    if order_seed is not None:
      order = np.random.default_rng(list(order_seed)).permutation(len(instr))
    takes = np.array([instr[i][2] for i in order])
    ends = np.cumsum(takes)
    # Shuffled: restart at the window holding `start`, then skip inside it.
    first_window = start // window if order_seed is not None else 0
    base = first_window * window if order_seed is not None else start
    i = int(np.searchsorted(ends, base, side='right'))
    if i >= len(order):
      return tf.data.Dataset.from_tensor_slices(
          (tf.constant([], tf.string), tf.constant([], tf.int32)))
    into = base - (ends[i] - takes[i])
    files = [instr[j][0] for j in order[i:]]
    skips = [instr[j][1] for j in order[i:]]
    skips[0] += into
    counts = list(takes[i:])
    counts[0] -= into
    ds = tf.data.Dataset.from_tensor_slices(
        (files, np.array(skips, np.int64), np.array(counts, np.int64)))
    ds = ds.flat_map(lambda f, s, t: tf.data.TFRecordDataset(
        f, buffer_size=8 << 20).skip(s).take(t))
    ds = ds.batch(256).map(parse).unbatch()
    if order_seed is not None:
      ds = _windowed_shuffle(ds, window, order_seed, first_window)
      ds = ds.skip(start - base)
    return ds
  return records


PREPARED_META = 'prepared.json'


def prepared_source(config, split, process_index, process_count):
  """A copy written by `python -m alexnet_jax.prepare` (images stored at
  resize_size x resize_size, the paper's trick): the process's contiguous
  share of the split's shards."""
  d = config.data
  path = os.path.join(d.prepared_dir, PREPARED_META)
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(
        f'config.data.prepared_dir={d.prepared_dir!r} holds no '
        f'{PREPARED_META}; write it with `python -m alexnet_jax.prepare '
        '--config=... --out=DIR` or set --config.data.prepared_dir=\'\'.')
  with tf.io.gfile.GFile(path) as f:
    meta = json.load(f)
  if meta['resize_size'] != d.resize_size:
    raise ValueError(
        f'{d.prepared_dir!r} holds {meta["resize_size"]}-pixel images but '
        f'config.data.resize_size={d.resize_size}; prepare it again.')
  files = meta['splits'][split]
  total = sum(c for _, c in files)
  lo, hi = process_range(total, process_index, process_count)
  instr, pos = [], 0
  for name, count in files:
    skip, end = max(lo - pos, 0), min(hi - pos, count)
    if end > skip:
      instr.append((os.path.join(d.prepared_dir, name), skip, end - skip))
    pos += count
  spec = {'image': tf.io.FixedLenFeature([], tf.string),
          'label': tf.io.FixedLenFeature([], tf.int64)}
  return Source(hi - lo, total, meta['num_classes'],
                _sharded_records(instr, spec, d.shuffle_buffer))


def folder_source(root, split_dir, process_index, process_count):
  """`root/<split_dir>/<class>/*.jpg`, classes numbered in sorted order."""
  split_root = os.path.join(root, split_dir)
  if not tf.io.gfile.isdir(split_root):
    raise FileNotFoundError(
        f'No folder {split_root!r}. config.data.folder must hold train/<class>/'
        '*.jpg and val/<class>/*.jpg.')
  classes = sorted(c for c in tf.io.gfile.listdir(split_root)
                   if tf.io.gfile.isdir(os.path.join(split_root, c)))
  if not classes:
    raise ValueError(f'{split_root!r} has no class folders.')
  paths, labels = [], []
  for label, c in enumerate(c.rstrip('/') for c in classes):
    files = sorted(f for f in tf.io.gfile.listdir(os.path.join(split_root, c))
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
      raise ValueError(
          f'Class folder {os.path.join(split_root, c)!r} holds no images '
          f'({", ".join(IMAGE_EXTENSIONS)}); add images or remove the folder.')
    paths += [os.path.join(split_root, c, f) for f in files]
    labels += [label] * len(files)
  total = len(paths)
  start_, end_ = process_range(total, process_index, process_count)
  paths = np.array(paths[start_:end_])
  labels = np.array(labels[start_:end_], np.int32)

  def records(order_seed, start):
    order = np.arange(len(paths))
    if order_seed is not None:
      order = np.random.default_rng(list(order_seed)).permutation(len(paths))
    order = order[start:]
    ds = tf.data.Dataset.from_tensor_slices((paths[order], labels[order]))
    return ds.map(lambda p, l: (tf.io.read_file(p), l))

  return Source(len(paths), total, len(classes), records)


def imagenet_builder(config):
  """tfds's imagenet2012 builder, prepared; a clear error without the tars."""
  data_dir = config.data.data_dir or None
  builder = tfds.builder('imagenet2012', data_dir=data_dir)
  if builder.is_prepared():
    return builder
  manual_dir = config.data.manual_dir
  missing = [os.path.join(manual_dir or '<manual_dir>', t)
             for t in IMAGENET_TARS
             if not manual_dir or
             not tf.io.gfile.exists(os.path.join(manual_dir, t))]
  if missing:
    raise FileNotFoundError(
        'ImageNet (ILSVRC2012) is not prepared in '
        f'{builder.data_dir!r} and its archives are missing: '
        f'{", ".join(missing)}. Register at https://image-net.org/download-'
        'images, download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar'
        ' into one folder and pass --config.data.manual_dir=<that folder> '
        '(or use --config.data.dataset=demo).')
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=manual_dir))
  return builder


def demo_builder(config):
  from alexnet_jax import demo_data  # pylint: disable=g-import-not-at-top
  d = config.data
  data_dir = d.data_dir or os.path.join(
      os.path.expanduser('~'), 'tensorflow_datasets')
  lo, hi = d.demo_image_size
  return demo_data.prepare_demo(
      data_dir, num_classes=d.demo_num_classes,
      train_per_class=d.demo_train_per_class,
      val_per_class=d.demo_val_per_class, min_size=lo, max_size=hi)


def get_source(config, split, process_index=None, process_count=None):
  """The process's share of 'train' or 'eval'; checks the dataset exists."""
  d = config.data
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  if d.dataset not in DATASETS:
    raise ValueError(f'Unknown config.data.dataset={d.dataset!r}; valid: '
                     f'{", ".join(DATASETS)}.')
  if d.get('prepared_dir'):
    return prepared_source(config, split, pi, pc)
  if d.dataset == 'folder':
    if not d.folder:
      raise ValueError('dataset=folder needs --config.data.folder=<root with '
                       'train/<class>/*.jpg and val/<class>/*.jpg>.')
    return folder_source(d.folder, {'train': 'train', 'eval': 'val'}[split],
                         pi, pc)
  builder = (imagenet_builder if d.dataset == 'imagenet2012' else
             demo_builder)(config)
  return tfds_source(builder, _SPLITS[split], pi, pc, d.shuffle_buffer)


# ------------------------------------------------------------ preprocessing
def load_mean(config):
  """The per-pixel mean image if cached, else the per-channel means."""
  d = config.data
  if d.mean_image_path:
    with tf.io.gfile.GFile(d.mean_image_path, 'rb') as f:
      mean = np.load(f).astype(np.float32)
    want = (d.resize_size, d.resize_size, 3)
    if mean.shape != want:
      raise ValueError(f'Mean image {d.mean_image_path!r} has shape '
                       f'{mean.shape}, expected {want} (resize_size).')
    return mean
  return np.asarray(d.channel_means, np.float32)


def local_batch_size(config, mesh, process_count=None):
  """Per-process batch; checks the global batch divides over the mesh."""
  pc = jax.process_count() if process_count is None else process_count
  b, data = config.batch_size, mesh.shape['data']
  if b % data:
    raise ValueError(
        f'config.batch_size={b} does not divide over the mesh data axis of '
        f'size {data}; use a multiple of {data} (--config.batch_size) or '
        'change config.mesh.data_axis_size.')
  if b % pc:
    raise ValueError(f'config.batch_size={b} does not divide over {pc} '
                     'processes; use a multiple of the process count.')
  return b // pc


def _decode_batches(ds, fn, batch, spec, parallel):
  """(bytes, label, seed) batches -> decoded batches, bad records dropped.

  `fn(bytes, seed)` gives a tuple of tensors with the shapes and dtypes of
  `spec` ((shape, dtype) pairs). Decoding a whole record batch as one inner
  dataset keeps batch boundaries fixed however many records fail: each
  record batch gives exactly one output, (outputs, labels, n) with the n
  good examples (n may be 0).
  """
  none = tf.data.Dataset.from_tensors(
      (tuple(tf.zeros((0,) + tuple(sh), dt) for sh, dt in spec),
       tf.zeros((0,), tf.int32)))

  def one_batch(images, labels, seeds):
    inner = tf.data.Dataset.from_tensor_slices((images, labels, seeds))
    inner = inner.map(lambda x, l, s: (tuple(
        tf.ensure_shape(y, sh) for y, (sh, _) in zip(fn(x, s), spec)), l))
    inner = inner.ignore_errors().batch(batch).concatenate(none).take(1)
    return inner.map(lambda x, l: (x, l, tf.shape(l)[0]))
  return ds.interleave(one_batch, cycle_length=parallel, block_length=1,
                       num_parallel_calls=parallel, deterministic=True)


def _cycle(config):
  n = config.data.num_parallel_calls
  return max(2, os.cpu_count() or 2) if n == -1 else n


def train_dataset(config, source, local_batch, steps, epoch, start_batch=0,
                  process_index=0, example_fn=None):
  """tf.data of epoch `epoch`'s `steps` batches, from batch `start_batch` on.

  Yields ((images, offsets, flips, shifts), labels, skipped): uint8 crops and
  what `pp.train_finish` / `device_finish` need to make the float images;
  batch k of an epoch is a pure function of (seed, process, epoch, k).
  `example_fn(bytes, seed)` makes one example's parts (default:
  `train_example_fn(config)`; the benchmark times the pipeline alone with a
  no-op).
  """
  d = config.data
  order_seed = (config.seed, process_index, epoch)
  ds = source.records(order_seed, start_batch * local_batch)
  ds = ds.take((steps - start_batch) * local_batch)
  seed = make_seed(config.seed, process_index, epoch)
  ds = ds.enumerate(start_batch * local_batch).batch(local_batch,
                                                     drop_remainder=True)
  ds = ds.map(lambda i, r: (r[0], r[1], example_seeds(seed, i)))
  fn = example_fn or train_example_fn(config)
  c = d.crop_size
  spec = (((c, c, 3), tf.uint8), ((2,), tf.int32), ((), tf.bool),
          ((3,), tf.float32))
  ds = _decode_batches(ds, fn, local_batch, spec, _cycle(config))

  def fill(x, l, n):  # Repeat good examples where bad records were.
    def repeat():
      idx = tf.range(local_batch) % n
      return tuple(tf.gather(y, idx) for y in x), tf.gather(l, idx)
    x, l = tf.cond(n < local_batch, repeat, lambda: (x, l))
    return x, l, local_batch - n
  # A batch whose every record is bad has nothing to repeat: it is dropped
  # (and counted), so that epoch ends one step early.
  return ds.filter(lambda x, l, n: n > 0).map(fill).prefetch(1)


def train_example_fn(config):
  """(image bytes, seed) -> pp.train_example's outputs, from config.data."""
  d = config.data
  mean = load_mean(config)
  return lambda x, s: pp.train_example(
      x, s, mean=mean, resize_size=d.resize_size, crop_size=d.crop_size,
      random_flip_=d.random_flip, pca_noise=d.pca_noise,
      eigvecs=d.pca_eigvecs, stddevs=d.pca_stddevs,
      alpha_stddev=d.pca_alpha_stddev, antialias=d.resize_antialias,
      antialias_above=d.train_antialias_above, resample=d.resample)


def device_finish(config, mesh):
  """jit fn: global (uint8 images, offsets, flips, shifts) -> float32 images
  (pp.train_finish, on the accelerator: 4x less host-to-device traffic and
  one fused pass instead of the host's float work)."""
  d = config.data
  mean = load_mean(config)
  c = d.crop_size
  sharding = NamedSharding(mesh, P('data'))
  per_pixel = mean.ndim == 3
  mean = jax.device_put(mean if per_pixel else np.zeros((1, 1, 3), np.float32),
                        NamedSharding(mesh, P()))

  @functools.partial(jax.jit, out_shardings=sharding)
  def finish(images, offsets, flips, shifts, mean):
    x = images.astype(jnp.float32) - shifts[:, None, None, :]
    if per_pixel:
      crop = lambda o: jax.lax.dynamic_slice(mean, (o[0], o[1], 0), (c, c, 3))
      x = x - jax.vmap(crop)(offsets)
    return jnp.where(flips[:, None, None, None], x[:, :, ::-1], x)
  return lambda *parts: finish(*parts, mean)


def eval_dataset(config, source, local_batch, ten_crop=False):
  """Every record of the process's share once; padding has mask 0."""
  d = config.data
  mean = load_mean(config)
  fn = lambda x, s: pp.eval_preprocess(
      x, mean=mean, resize_size=d.resize_size, crop_size=d.crop_size,
      ten_crop_=ten_crop, antialias=d.resize_antialias)
  ds = source.records(None, 0).map(
      lambda x, l: (x, l, tf.zeros([2], tf.int64)))
  ds = ds.batch(local_batch)
  view = ((10,) if ten_crop else ()) + (d.crop_size, d.crop_size, 3)
  ds = _decode_batches(ds, lambda x, s: (fn(x, s),), local_batch,
                       ((view, tf.float32),), _cycle(config))

  def pad(x, l, n):
    x, k = x[0], local_batch - n
    x = tf.concat([x, tf.zeros((k,) + view, x.dtype)], 0)
    return x, tf.pad(l, [[0, k]]), tf.sequence_mask(n, local_batch, tf.float32)
  return ds.map(pad).prefetch(1)


# ----------------------------------------------------------------- to mesh
class SkipCounter:
  """Running count of undecodable records, logged at the first and then
  each time the total passes a power of ten (every epoch meets the same bad
  records again)."""

  def __init__(self, name):
    self.name, self.count, self._next_log = name, 0, 1

  def add(self, n):
    if not n:
      return
    self.count += int(n)
    if self.count >= self._next_log:
      while self._next_log <= self.count:
        self._next_log *= 10
      logging.warning('%s: skipped %d undecodable record(s) so far (next '
                      'reported at %d).', self.name, self.count,
                      self._next_log)


def _to_global(mesh, batch):
  sharding = NamedSharding(mesh, P('data'))
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in batch.items()}


def prefetch(iterator, size):
  """Runs `iterator` in a background thread, `size` items ahead.

  Closing the returned generator (or dropping it) stops the thread once it
  has finished the item in hand, so that no thread is left inside
  TensorFlow or JAX when the program exits.
  """
  if size <= 0:
    yield from iterator
    return
  q = queue.Queue(maxsize=size)
  end = object()
  stop = threading.Event()

  def put(item):
    while not stop.is_set():
      try:
        q.put(item, timeout=0.1)
        return True
      except queue.Full:
        pass
    return False

  def work():
    try:
      for item in iterator:
        if not put(item):
          return
      put(end)
    except Exception as e:  # pylint: disable=broad-except
      put(e)
  thread = threading.Thread(target=work, daemon=True)
  thread.start()
  try:
    while (item := q.get()) is not end:
      if isinstance(item, Exception):
        raise item
      yield item
  finally:
    stop.set()
    thread.join()


def train_iterator(config, mesh, start_step=0, *, process_index=None,
                   process_count=None):
  """Global training batches from step `start_step` on, forever.

  {'images': float32 (B, crop, crop, 3) mean-subtracted on 0-255,
   'labels': int32 (B,)}. Undecodable records are counted in the logs.
  """
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  local_batch = local_batch_size(config, mesh, pc)
  source = get_source(config, 'train', pi, pc)
  steps = steps_per_epoch(config, source, pc)
  counter = SkipCounter('train')
  finish = device_finish(config, mesh)
  sharding = NamedSharding(mesh, P('data'))

  def batches():
    epoch, k = divmod(start_step, steps)
    while True:
      ds = train_dataset(config, source, local_batch, steps, epoch, k,
                         pi)
      for x, l, skipped in ds.as_numpy_iterator():
        counter.add(skipped)
        parts = [jax.make_array_from_process_local_data(sharding, y)
                 for y in x]
        yield {'images': finish(*parts),
               'labels': jax.make_array_from_process_local_data(sharding, l)}
      epoch, k = epoch + 1, 0
  return prefetch(batches(), config.data.prefetch)


def steps_per_epoch(config, source=None, process_count=None):
  """Training steps per epoch: every process takes the same number."""
  pc = jax.process_count() if process_count is None else process_count
  source = source or get_source(config, 'train', 0, pc)
  steps = (source.total_examples // pc) // (config.batch_size // pc)
  if steps == 0:
    raise ValueError(f'The training split ({source.total_examples} examples) '
                     f'is smaller than one batch ({config.batch_size}).')
  return steps


def eval_iterator(config, mesh, ten_crop=False, *, split='eval',
                  process_index=None, process_count=None):
  """Every example of `split` ('eval': validation) exactly once, then stops,
  preprocessed as for evaluation (central crop or ten crops).

  {'images': (B, crop, crop, 3) or (B, 10, crop, crop, 3) for ten_crop,
   'labels': int32 (B,), 'mask': float32 (B,), 1 real, 0 padding}. All
  processes yield the same number of batches (extra ones fully masked).
  """
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  local_batch = local_batch_size(config, mesh, pc)
  source = get_source(config, split, pi, pc)
  per_process = -(-source.total_examples // pc)  # The largest share.
  num_batches = -(-per_process // local_batch)
  counter = SkipCounter(split)
  d = config.data
  view = ((10,) if ten_crop else ()) + (d.crop_size, d.crop_size, 3)

  def batches():
    n = 0
    for x, l, m in eval_dataset(config, source, local_batch,
                                ten_crop).as_numpy_iterator():
      records = min(local_batch, source.num_examples - n * local_batch)
      counter.add(records - int(m.sum()))
      n += 1
      yield _to_global(mesh, {'images': x, 'labels': l, 'mask': m})
    for _ in range(n, num_batches):
      yield _to_global(mesh, {
          'images': np.zeros((local_batch,) + view, np.float32),
          'labels': np.zeros((local_batch,), np.int32),
          'mask': np.zeros((local_batch,), np.float32)})
  return prefetch(batches(), config.data.prefetch)


def num_classes(config):
  """Classes in the configured dataset (checks it is available)."""
  return get_source(config, 'train', 0, 1).num_classes


def check_config(config):
  """Stops a run at start, with what to set, if the dataset is missing or
  its number of classes is not config.model.num_classes, or if
  config.data.resample cannot be had (this builds the native op on first
  use, alexnet_jax/native.py)."""
  classes = num_classes(config)
  if classes != config.model.num_classes:
    raise ValueError(
        f'The dataset {config.data.dataset!r} has {classes} classes but '
        f'config.model.num_classes={config.model.num_classes}: set '
        f'--config.model.num_classes={classes}.')
  native.resample_op(config.data.resample)
