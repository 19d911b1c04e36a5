"""Input pipeline: ImageNet (tfds), the built-in demo, a folder of images,
the prepared copies (JPEG or decoded; prepare.py), or synthetic data.

  train_iterator(config, mesh, start_step=0)  -> {'images', 'labels'}, forever
  eval_iterator(config, mesh, ten_crop=False) -> {'images', 'labels', 'mask'}

Batches are global `jax.Array`s sharded over the mesh's 'data' axis (and
replicated over 'tower'), assembled from each process's own slice of the data.

Determinism and resume. Each epoch has its own order, a pure function of
(seed, epoch): shards (tfds) are permuted, then records are shuffled inside
fixed windows of `config.data.shuffle_buffer` records (folders: the file list
is permuted whole). Every example's augmentation is seeded by (seed, process,
epoch, position); from the decoded copy, whose host work is a copy of bytes,
the augmentation runs on the device, keyed by (seed, step, example)
(device_augment.py). Records are grouped into batches *before* decoding, so
batch k of epoch e always holds the same records; a restart at step N skips
whole shards and windows without reading them and lands on the same batch.

Undecodable records. Each batch is decoded as a small inner dataset with
`ignore_errors`; the holes a bad record leaves are filled by repeating the
batch's good examples (train) or masked out (eval), so shapes and batch
boundaries never move (a train batch with no good record at all is
dropped). The number skipped travels with the batch and is logged (absl,
WARNING) as a running total; nothing crashes.
"""

import dataclasses
import functools
import itertools
import json
import os
import queue
import threading
import zlib
from typing import Callable, Dict, Optional, Sequence

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from alexnet_jax import data_stats
from alexnet_jax import decoded_copy
from alexnet_jax import device_augment
from alexnet_jax import native
from alexnet_jax import paths
from alexnet_jax import preprocess as pp
from alexnet_jax import startup

DATASETS = ('imagenet2012', 'demo', 'folder', 'synthetic')
IMAGENET_TARS = ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar')
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif')
_SPLITS = {'train': 'train', 'eval': 'validation'}


# ------------------------------------------------------------------ sources
@dataclasses.dataclass
class Source:
  """One split's records for one process, readable from any position.

  `records(order_seed, start)` gives a dataset of (image bytes, label) in
  the epoch order picked by `order_seed` (None: stored order), from record
  `start` on. A decoded copy has a `decoded` reader instead (read with
  numpy, augmented on the device).
  """
  num_examples: int  # This process's.
  total_examples: int  # All processes'.
  num_classes: int
  records: Optional[Callable[[Optional[Sequence[int]], int],
                             tf.data.Dataset]]
  decoded: Optional[decoded_copy.Reader] = None


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


PREPARED_META = decoded_copy.META


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
        '--config=... --copy_dir=DIR` (or --decoded_dir=DIR), or set '
        '--config.data.prepared_dir=\'\'.')
  with tf.io.gfile.GFile(path) as f:
    meta = json.load(f)
  if meta.get('format') == decoded_copy.FORMAT:
    reader = decoded_copy.Reader(d.prepared_dir, split, process_index,
                                 process_count, d.resize_size, meta)
    return Source(reader.num_examples, reader.total_examples,
                  reader.num_classes, None, reader)
  decoded_copy.check_resize_size(d.prepared_dir, meta, d.resize_size)
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
  # gs:// lists folders with a trailing '/': stripped before sorting, so
  # that the classes are numbered as from a local disk.
  classes = sorted(c.rstrip('/') for c in tf.io.gfile.listdir(split_root)
                   if tf.io.gfile.isdir(os.path.join(split_root, c)))
  if not classes:
    raise ValueError(f'{split_root!r} has no class folders.')
  paths, labels = [], []
  for label, c in enumerate(classes):
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


def _build_once_error(config, builder):
  return FileNotFoundError(
      f'The {config.data.dataset} dataset is not built in {builder.data_dir!r}'
      f' and this run has {jax.process_count()} processes, which must not '
      'build it at once: build it first, in one process, with python -m '
      'alexnet_jax.prepare --config=<the same config and --config.data.* '
      'flags>.')


def imagenet_builder(config):
  """tfds's imagenet2012 builder, prepared (built here in a single-process
  run); a clear error without the tars."""
  data_dir = config.data.data_dir or None
  builder = tfds.builder('imagenet2012', data_dir=data_dir)
  if builder.is_prepared():
    return builder
  if jax.process_count() > 1:
    raise _build_once_error(config, builder)
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
  if paths.is_remote(d.data_dir):
    raise ValueError(
        f'--config.data.data_dir={d.data_dir!r}: the demo generates its '
        'archives in its data_dir, which must be local; keep the demo\'s data '
        'on a local disk (the workdir may be a bucket).')
  data_dir = d.data_dir or os.path.join(
      os.path.expanduser('~'), 'tensorflow_datasets')
  lo, hi = d.demo_image_size
  spec = demo_data.DemoSpec(
      num_classes=d.demo_num_classes, train_per_class=d.demo_train_per_class,
      val_per_class=d.demo_val_per_class, min_size=lo, max_size=hi)
  if jax.process_count() > 1:
    builder = demo_data.prepare_demo(data_dir, spec, build=False)
    if not builder.is_prepared():
      raise _build_once_error(config, builder)
    return builder
  return demo_data.prepare_demo(data_dir, spec)


def tfds_builder(config):
  """The tfds builder of config.data.dataset ('imagenet2012' or 'demo')."""
  if config.data.dataset == 'imagenet2012':
    return imagenet_builder(config)
  return demo_builder(config)


def get_source(config, split, process_index=None, process_count=None):
  """The process's share of 'train' or 'eval'; checks the dataset exists."""
  d = config.data
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  if d.dataset not in DATASETS:
    raise ValueError(f'Unknown config.data.dataset={d.dataset!r}; valid: '
                     f'{", ".join(DATASETS)}.')
  if d.dataset == 'synthetic':
    total = (d.synthetic_train_examples if split == 'train' else
             d.synthetic_eval_examples)
    lo, hi = process_range(total, pi, pc)
    return Source(hi - lo, total, config.model.num_classes, None)
  if d.get('prepared_dir'):
    return prepared_source(config, split, pi, pc)
  if d.dataset == 'folder':
    if not d.folder:
      raise ValueError('dataset=folder needs --config.data.folder=<root with '
                       'train/<class>/*.jpg and val/<class>/*.jpg>.')
    return folder_source(d.folder, {'train': 'train', 'eval': 'val'}[split],
                         pi, pc)
  builder = tfds_builder(config)
  return tfds_source(builder, _SPLITS[split], pi, pc, d.shuffle_buffer)


# ----------------------------------------------------- training-set mean
MEANS = ('image', 'channel')


def stats_dir(config) -> str:
  """Where the dataset's training-set statistics are cached: next to it."""
  d = config.data
  if d.get('prepared_dir'):
    return os.path.join(d.prepared_dir, 'stats')
  if d.dataset == 'folder':
    return os.path.join(d.folder, 'alexnet_jax_stats')
  builder = tfds_builder(config)
  return os.path.join(builder.data_dir, 'alexnet_jax_stats')


def stats_key(config, source: Source):
  """What the statistics are a function of: the dataset (for a tfds dataset
  its version and bytes; for a copy what prepared.json says of it, not its
  path, so that a copy moved or copied to each host keeps its statistics; a
  folder by its path), its training examples, the resize size and filter."""
  d = config.data
  if d.get('prepared_dir'):
    meta = json.loads(paths.read_text(paths.join(d.prepared_dir,
                                                 PREPARED_META)))
    dataset = (f'{meta.get("format", "jpeg")} copy of {meta.get("source")} '
               f'written {meta.get("written", "")}: '
               f'{meta["splits"]["train"]}')
  elif d.dataset == 'folder':
    dataset = f'folder {paths.absolute(d.folder)}'
  else:
    builder = tfds_builder(config)
    dataset = (f'{builder.name} {builder.version} in {builder.data_dir}, '
               f'{builder.info.splits["train"].num_bytes} bytes')
  return {'dataset': dataset, 'train_examples': source.total_examples,
          'resize_size': d.resize_size, 'antialias': d.resize_antialias}


# This process's statistics by data config: a run resolves them once
# (listing a large folder to key the cache is not free).
_stats_of_run: Dict[str, Dict] = {}


def forget_training_set_stats():
  """Makes the next training_set_stats look at the cache again, e.g. after
  the dataset changed within this process."""
  _stats_of_run.clear()


def training_set_stats(config, compute_if_missing=None):
  """The training split's mean image and RGB PCA (data_stats), from the
  cache next to the dataset, or computed over the whole split and cached
  (with progress in the log). compute_if_missing (default: in a single-
  process run) False: a missing cache is an error naming the command that
  computes it, as several processes must not compute it at once."""
  d = config.data
  memo = d.to_json(sort_keys=True)
  if memo in _stats_of_run:
    return _stats_of_run[memo]
  source = get_source(config, 'train', 0, 1)
  directory, key = stats_dir(config), stats_key(config, source)
  stats = data_stats.load(directory, d.resize_size, key)
  if stats is not None:
    _stats_of_run[memo] = stats
    return stats
  if compute_if_missing is None:
    compute_if_missing = jax.process_count() == 1
  if not compute_if_missing:
    raise FileNotFoundError(
        f'The training set\'s mean image for this data is not in '
        f'{directory} (missing, or computed for other data or another '
        'resize): compute it once before a multi-process run, with python -m '
        'alexnet_jax.prepare --config=<the same config>, or set '
        '--config.data.mean=channel.')
  logging.info('Computing the training set\'s mean image and RGB PCA (%s '
               'images, once; cached in %s).', f'{source.total_examples:,}',
               directory)
  if source.decoded is not None:
    n = source.num_examples
    stats = data_stats.accumulate(
        (source.decoded.read(np.arange(i, min(i + 256, n)))[0]
         for i in range(0, n, 256)), d.resize_size, total=n)
  else:
    stats = data_stats.compute(source.records(None, 0).map(lambda x, l: x),
                               d.resize_size, d.resize_antialias,
                               total=source.total_examples)
  stats['path'] = data_stats.save(stats, directory, d.resize_size, key)
  _stats_of_run[memo] = stats
  return stats


def load_mean(config):
  """What is subtracted from every image: config.data.mean_image_path if
  set; else, for config.data.mean='image', the training set's per-pixel
  mean image (§2, `training_set_stats`); for 'channel', the per-channel
  constants config.data.channel_means."""
  d = config.data
  if d.mean not in MEANS:
    raise ValueError(f'config.data.mean={d.mean!r}: use one of {MEANS}.')
  if d.dataset == 'synthetic':  # Its images are already centred.
    return np.zeros(3, np.float32)
  if d.mean_image_path:
    with tf.io.gfile.GFile(d.mean_image_path, 'rb') as f:
      mean = np.load(f).astype(np.float32)
    want = (d.resize_size, d.resize_size, 3)
    if mean.shape != want:
      raise ValueError(f'Mean image {d.mean_image_path!r} has shape '
                       f'{mean.shape}, expected {want} (resize_size).')
    return mean
  if d.mean == 'image':
    return training_set_stats(config)['mean_image'].astype(np.float32)
  return np.asarray(d.channel_means, np.float32)


def describe_mean(config) -> str:
  """Which mean a run subtracts, for its log (computes it if missing)."""
  d = config.data
  if d.dataset == 'synthetic':
    return 'none (synthetic images are centred)'
  if d.mean_image_path:
    return f'the mean image {d.mean_image_path}'
  if d.mean == 'image':
    stats = training_set_stats(config)
    return (f'the training set\'s per-pixel mean image ({stats["path"]}, '
            f'{int(stats["num_images"]):,} images)')
  return f'the per-channel means {tuple(d.channel_means)}'


# ------------------------------------------------------------ preprocessing


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


def host_cores_for_this_process() -> int:
  """The CPU cores this process may use: its CPU affinity when a scheduler
  restricted it (SLURM's --cpus-per-task, taskset), else its share of the
  host when several processes of the run share it ($ALEXNET_JAX_PROCESSES_
  ON_HOST, set by startup.initialize_distributed)."""
  cores = len(os.sched_getaffinity(0))
  if cores < (os.cpu_count() or cores):
    return cores
  on_host = int(os.environ.get(startup.PROCESSES_ON_HOST, '1') or 1)
  return max(1, cores // max(1, on_host))


def _cycle(config):
  n = config.data.num_parallel_calls
  return max(2, host_cores_for_this_process()) if n == -1 else n


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


def train_resample(config) -> str:
  """config.data.resample, or 'tf' where the train crops never resample: a
  prepared copy's images are resize_size squares, so crops are whole-pixel
  slices and the native op is not built for nothing."""
  return 'tf' if config.data.get('prepared_dir') else config.data.resample


def train_example_fn(config):
  """(image bytes, seed) -> pp.train_example's outputs, from config.data."""
  d = config.data
  mean = load_mean(config)
  return lambda x, s: pp.train_example(
      x, s, mean=mean, resize_size=d.resize_size, crop_size=d.crop_size,
      random_flip_=d.random_flip, pca_noise=d.pca_noise,
      eigvecs=d.pca_eigvecs, stddevs=d.pca_stddevs,
      alpha_stddev=d.pca_alpha_stddev, antialias=d.resize_antialias,
      antialias_above=d.train_antialias_above,
      resample=train_resample(config))


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
  if config.data.dataset == 'synthetic':
    return synthetic_batches(config, mesh, 'train', start_step, forever=True)
  source = get_source(config, 'train', pi, pc)
  steps = steps_per_epoch(config, source, pc)
  if source.decoded is not None:
    return decoded_train_batches(config, mesh, source.decoded, local_batch,
                                 steps, start_step, pi)
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


@functools.lru_cache(maxsize=8)
def _synthetic_fns(seed, split, batch, view, num_classes, mesh):
  """The jitted (images(step), labels(step)) of synthetic_batches, made
  once per shape and mesh (each validation would compile them again)."""
  sharding = NamedSharding(mesh, P('data'))
  image_key, label_key = jax.random.split(jax.random.fold_in(
      jax.random.PRNGKey(seed), zlib.crc32(split.encode())))

  @functools.partial(jax.jit, out_shardings=sharding)
  def images(step):
    return 60.0 * jax.random.normal(jax.random.fold_in(image_key, step),
                                    (batch,) + view)

  @functools.partial(jax.jit, out_shardings=sharding)
  def labels(step):
    return jax.random.randint(jax.random.fold_in(label_key, step), (batch,),
                              0, num_classes, jnp.int32)

  return images, labels


def synthetic_batches(config, mesh, split, start_step=0, ten_crop=False,
                      forever=False):
  """config.data.dataset='synthetic': global batches of random images
  (N(0, 60), the scale of mean-subtracted pixels) and labels, made on the
  devices by one jitted call each, a function of (seed, split, step): no
  input pipeline, nothing read, so that a run times the training loop
  itself. `forever` for training; else (an evaluation, of any split) they
  stop after synthetic_eval_examples, the last batch masked past them."""
  d, b = config.data, config.batch_size
  view = ((10,) if ten_crop else ()) + (d.crop_size, d.crop_size, 3)
  sharding = NamedSharding(mesh, P('data'))
  images, labels = _synthetic_fns(config.seed, split, b, view,
                                  config.model.num_classes, mesh)

  def batches():
    if forever:
      for step in itertools.count(start_step):
        yield {'images': images(step), 'labels': labels(step)}
    else:
      total = d.synthetic_eval_examples
      for k in range(-(-total // b)):
        mask = (np.arange(k * b, (k + 1) * b) < total).astype(np.float32)
        yield {'images': images(k), 'labels': labels(k),
               'mask': jax.device_put(mask, sharding)}
  return prefetch(batches(), d.prefetch)


def decoded_train_batches(config, mesh, reader, local_batch, steps,
                          start_step, process_index):
  """Training batches from a decoded copy, from step `start_step` on: the
  host copies uint8 images out of the memory-mapped shards (epoch e's order
  a permutation keyed by (seed, process, e), batch k its k-th slice), the
  device crops, flips, lights and centres them (device_augment), keyed by
  (seed, step, example)."""
  augment = device_augment.make_train_augment(config, mesh, load_mean(config))
  sharding = NamedSharding(mesh, P('data'))

  def batches():
    epoch, k = divmod(start_step, steps)
    while True:
      order = reader.epoch_order((config.seed, process_index, epoch))
      for b in range(k, steps):
        images, labels = reader.read(
            order[b * local_batch:(b + 1) * local_batch])
        images = jax.make_array_from_process_local_data(sharding, images)
        yield {'images': augment(images, epoch * steps + b),
               'labels': jax.make_array_from_process_local_data(sharding,
                                                                labels)}
      epoch, k = epoch + 1, 0
  return prefetch(batches(), config.data.prefetch)


def decoded_eval_batches(config, mesh, reader, local_batch, num_batches,
                         ten_crop=False):
  """Every record of the process's share of a decoded copy once, in stored
  order, as eval_iterator's batches (views made on the device)."""
  views = device_augment.make_eval_views(config, mesh, load_mean(config),
                                         ten_crop)
  sharding = NamedSharding(mesh, P('data'))
  r = config.data.resize_size

  def batches():
    for b in range(num_batches):
      idx = np.arange(b * local_batch,
                      min((b + 1) * local_batch, reader.num_examples))
      images, labels = reader.read(idx)
      pad = local_batch - len(idx)
      mask = np.concatenate([np.ones(len(idx)), np.zeros(pad)]).astype(
          np.float32)
      images = np.concatenate([images, np.zeros((pad, r, r, 3), np.uint8)])
      labels = np.concatenate([labels, np.zeros(pad, np.int32)])
      glob = lambda x: jax.make_array_from_process_local_data(sharding, x)
      yield {'images': views(glob(images)), 'labels': glob(labels),
             'mask': glob(mask)}
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
  if config.data.dataset == 'synthetic':
    return synthetic_batches(config, mesh, split, ten_crop=ten_crop)
  source = get_source(config, split, pi, pc)
  per_process = -(-source.total_examples // pc)  # The largest share.
  num_batches = -(-per_process // local_batch)
  if source.decoded is not None:
    return decoded_eval_batches(config, mesh, source.decoded, local_batch,
                                num_batches, ten_crop)
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
  use, alexnet_jax/native.py); logs which mean is subtracted (computing the
  training set's mean image if it is not cached yet)."""
  classes = num_classes(config)
  if config.data.dataset == 'synthetic':
    logging.info('Synthetic data: random images and labels made on the '
                 'device, no input pipeline (timing the loop).')
    return
  if classes != config.model.num_classes:
    raise ValueError(
        f'The dataset {config.data.dataset!r} has {classes} classes but '
        f'config.model.num_classes={config.model.num_classes}: set '
        f'--config.model.num_classes={classes}.')
  native.resample_op(train_resample(config))
  logging.info('Mean subtracted: %s.', describe_mean(config))
