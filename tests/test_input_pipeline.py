"""The pipeline on the demo data through tfds's imagenet2012 builder."""
import os
import threading
import time

import numpy as np
import pytest
import tensorflow as tf

from alexnet_jax import input_pipeline as ip
from alexnet_jax import data_stats
from alexnet_jax import preprocess as pp
from configs.alexnet import get_config
from tests.data_fixtures import demo_config, demo_dir, make_mesh, SPEC, write_folder, write_photo_folder  # pylint: disable=unused-import


def take(it, n):
  return [{k: np.asarray(v) for k, v in next(it).items()} for _ in range(n)]


def test_train_batches_are_global_sharded(demo_dir):
  c = demo_config(demo_dir)
  mesh = make_mesh(4, 2)
  b = next(ip.train_iterator(c, mesh))
  assert b['images'].shape == (16, 56, 56, 3) and b['images'].dtype == np.float32
  assert b['labels'].shape == (16,) and b['labels'].dtype == np.int32
  assert b['images'].sharding.spec == ip.P('data')
  assert 0 <= int(b['labels'].min()) and int(b['labels'].max()) < SPEC.num_classes


def test_example_seeds_are_the_fold_in_of_each_position():
  seed = ip.make_seed(3, 1, 7)
  positions = tf.constant([5, 6, 7, 1000003], tf.int64)
  got = ip.example_seeds(seed, positions).numpy()
  for row, i in zip(got, positions):
    want = tf.random.experimental.stateless_fold_in(seed, i).numpy()
    np.testing.assert_array_equal(row, want)


def test_restart_at_step_n_matches(demo_dir):
  c = demo_config(demo_dir)
  mesh = make_mesh(2)
  steps = ip.steps_per_epoch(c)  # 96 + fixups -> 6 steps of 16.
  full = take(ip.train_iterator(c, mesh), steps + 3)  # Crosses an epoch.
  for n in (2, steps + 1):
    resumed = take(ip.train_iterator(c, mesh, start_step=n), 2)
    for a, b in zip(full[n:n + 2], resumed):
      np.testing.assert_array_equal(a['labels'], b['labels'])
      np.testing.assert_array_equal(a['images'], b['images'])
  # Epochs are ordered differently.
  assert not np.array_equal(full[0]['images'], full[steps]['images'])


def test_corrupt_record_skipped_and_counted(demo_dir, caplog):
  c = demo_config(demo_dir, batch_size=8)
  c.data.shuffle_buffer = 10_000  # One window: the whole epoch.
  mesh = make_mesh(2)
  with caplog.at_level('WARNING'):
    take(ip.train_iterator(c, mesh), ip.steps_per_epoch(c))
  assert 'skipped 1 undecodable' in caplog.text


@pytest.mark.parametrize('ten_crop', [False, True])
def test_eval_sees_every_example_once(demo_dir, ten_crop):
  c = demo_config(demo_dir, batch_size=8)  # 20 val -> 3 batches, 4 padded.
  mesh = make_mesh(4, 2)
  batches = list(ip.eval_iterator(c, mesh, ten_crop=ten_crop))
  masks = np.concatenate([np.asarray(b['mask']) for b in batches])
  labels = np.concatenate([np.asarray(b['labels']) for b in batches])
  assert len(batches) == 3 and masks.sum() == 20 and masks[-4:].sum() == 0
  shape = (8, 10, 56, 56, 3) if ten_crop else (8, 56, 56, 3)
  assert batches[0]['images'].shape == shape
  # Labels from the demo's own ground truth, not tfds's ImageNet file.
  want = np.bincount(labels[masks > 0], minlength=SPEC.num_classes)
  np.testing.assert_array_equal(want, [SPEC.val_per_class] * SPEC.num_classes)
  np.testing.assert_array_equal(np.asarray(batches[-1]['images'])[4:], 0)


def test_process_splits_disjoint_and_covering(demo_dir):
  c = demo_config(demo_dir)
  for count in (1, 3):
    seen = []
    for i in range(count):
      src = ip.get_source(c, 'eval', i, count)
      seen += [bytes(x) for x, _ in src.records(None, 0).as_numpy_iterator()]
    assert len(seen) == len(set(seen)) == SPEC.num_classes * SPEC.val_per_class
  ranges = [ip.process_range(11, i, 3) for i in range(3)]
  assert ranges == [(0, 4), (4, 8), (8, 11)]


def test_multiprocess_eval_pads_equal_batches(demo_dir):
  c = demo_config(demo_dir, batch_size=8)
  total = 0
  for i in range(3):  # 20 val over 3 processes: 7, 7, 6; local batch 2.
    src = ip.get_source(c, 'eval', i, 3)
    ds = ip.eval_dataset(c, src, 2)
    total += sum(m.sum() for _, _, m in ds.as_numpy_iterator())
  assert total == 20


def test_bad_batch_size(demo_dir):
  c = demo_config(demo_dir, batch_size=6)
  with pytest.raises(ValueError, match='multiple of 4'):
    ip.train_iterator(c, make_mesh(4, 2))


def test_unknown_dataset():
  c = demo_config('/nonexistent')
  c.data.dataset = 'imagenet21k'
  with pytest.raises(ValueError, match='imagenet2012, demo, folder'):
    ip.get_source(c, 'train')


def test_missing_imagenet_tars_named(tmp_path):
  c = demo_config(str(tmp_path / 'tfds'))
  c.data.dataset = 'imagenet2012'
  c.data.manual_dir = str(tmp_path / 'manual')
  with pytest.raises(FileNotFoundError) as e:
    ip.get_source(c, 'train')
  msg = str(e.value)
  assert os.path.join(c.data.manual_dir, 'ILSVRC2012_img_train.tar') in msg
  assert 'ILSVRC2012_img_val.tar' in msg and 'image-net.org' in msg


def test_folder_dataset(tmp_path):
  write_folder(tmp_path, ['cat', 'dog'])
  (tmp_path / 'val' / 'dog' / 'bad.jpg').write_bytes(b'\xff\xd8\xffnope')
  c = demo_config('')
  c.data.dataset, c.data.folder = 'folder', str(tmp_path)
  c.batch_size = 4
  mesh = make_mesh(2)
  b = next(ip.train_iterator(c, mesh))
  assert b['images'].shape == (4, 56, 56, 3)
  batches = list(ip.eval_iterator(c, mesh))
  assert sum(float(b['mask'].sum()) for b in batches) == 8  # bad one masked.


def test_empty_class_folder(tmp_path):
  write_folder(tmp_path, ['cat', 'dog'])
  os.makedirs(tmp_path / 'train' / 'empty')
  c = demo_config('')
  c.data.dataset, c.data.folder = 'folder', str(tmp_path)
  with pytest.raises(ValueError, match='empty.*holds no images'):
    ip.get_source(c, 'train')


def test_mean_image_is_used(demo_dir, tmp_path):
  c = demo_config(demo_dir, batch_size=8)
  path = str(tmp_path / 'mean.npy')
  r, k = c.data.resize_size, c.data.crop_size
  mean = np.random.default_rng(0).uniform(0, 50, (r, r, 3)).astype(np.float32)
  np.save(path, mean)
  c.data.mean_image_path = path
  src = ip.get_source(c, 'eval', 0, 1)
  with_mean = next(ip.eval_dataset(c, src, 8).as_numpy_iterator())[0]
  c.data.mean_image_path = ''
  c.data.channel_means = (0.0, 0.0, 0.0)
  raw = next(ip.eval_dataset(c, src, 8).as_numpy_iterator())[0]
  o = (r - k) // 2  # The centre crop sees the mean image's central crop.
  np.testing.assert_allclose(with_mean, raw - mean[o:o + k, o:o + k],
                             atol=1e-4)


# ------------------------------------------------- the training-set mean
def recipe_on_folder(root, resize_size=24):
  """get_config() (the paper's recipe, data.mean left at 'image') on a
  folder dataset at `root`, small."""
  c = get_config()
  c.data.dataset, c.data.folder = 'folder', str(root)
  c.data.resize_size, c.data.crop_size = resize_size, resize_size - 4
  c.data.num_parallel_calls = 2
  return c


def numpy_mean_image(root, resize_size, antialias=True):
  """The mean over root/train/*/*.jpg, each decoded and resized on its own."""
  files = sorted((root / 'train').glob('*/*.jpg'))
  images = [pp.decode_and_resize(tf.io.read_file(str(f)), resize_size,
                                 antialias).numpy().astype(np.float64)
            for f in files]
  return np.mean(images, axis=0), len(files)


class ComputeSpy:
  """Counts data_stats.compute calls (and still computes)."""

  def __init__(self, monkeypatch):
    self.calls, self._compute = 0, data_stats.compute
    monkeypatch.setattr(data_stats, 'compute', self)

  def __call__(self, *args, **kwargs):
    self.calls += 1
    return self._compute(*args, **kwargs)


def test_recipe_subtracts_the_training_sets_per_pixel_mean_image(
    tmp_path, monkeypatch):
  """get_config()'s data.mean is 'image' (the demo's 'channel'): load_mean
  resolves to the (r, r, 3) per-pixel mean of the decoded and resized
  training images (not the validation images, not the per-channel means),
  computed once and cached in stats_dir; the eval pipeline subtracts it.
  Catches the recipe falling back to the channel means, a mean over the
  wrong split, or over pixels (a constant image)."""
  assert get_config().data.mean == 'image'
  assert get_config('demo').data.mean == 'channel'
  write_photo_folder(tmp_path, ['cat', 'dog'], n=3)
  write_photo_folder(tmp_path, ['cat', 'dog'], n=1, split='val')
  c = recipe_on_folder(tmp_path)
  spy = ComputeSpy(monkeypatch)
  mean = ip.load_mean(c)
  want, n = numpy_mean_image(tmp_path, 24)
  assert mean.shape == (24, 24, 3) and mean.dtype == np.float32
  np.testing.assert_allclose(mean, want, atol=1e-3)
  assert want.std(axis=(0, 1)).min() > 5  # Varies from pixel to pixel.
  assert spy.calls == 1
  stats = ip.training_set_stats(c)
  assert int(stats['num_images']) == n == 6
  assert os.path.dirname(stats['path']) == ip.stats_dir(c)
  np.testing.assert_array_equal(np.load(stats['path']), mean)
  # The eval pipeline's centre crop is the image minus the mean's crop.
  src = ip.get_source(c, 'eval', 0, 1)
  got = next(ip.eval_dataset(c, src, 2).as_numpy_iterator())[0]
  c.data.mean = 'channel'
  c.data.channel_means = (0.0, 0.0, 0.0)
  raw = next(ip.eval_dataset(c, src, 2).as_numpy_iterator())[0]
  np.testing.assert_allclose(got, raw - mean[2:22, 2:22], atol=1e-3)
  # 'channel': the three constants, nothing computed.
  np.testing.assert_array_equal(ip.load_mean(c), np.zeros(3, np.float32))
  assert spy.calls == 1


def test_mean_image_cache_is_reused_and_rebuilt_when_its_key_changes(
    tmp_path, monkeypatch):
  """A second load_mean reads the cache (no computation, file untouched);
  another resize filter or another number of training images recomputes it
  (and the new mean is the new one). Catches a cache never read, or read
  whatever the dataset and filter (a stale mean)."""
  write_photo_folder(tmp_path, ['cat', 'dog'], n=2)
  c = recipe_on_folder(tmp_path)
  spy = ComputeSpy(monkeypatch)
  first = ip.load_mean(c)
  path = ip.training_set_stats(c)['path']
  stamp = os.stat(path).st_mtime_ns
  ip.forget_training_set_stats()  # As the next run, in a new process.
  np.testing.assert_array_equal(ip.load_mean(c), first)
  assert spy.calls == 1 and os.stat(path).st_mtime_ns == stamp

  c.data.resize_antialias = False  # Another filter: another key.
  plain = ip.load_mean(c)
  assert spy.calls == 2
  want, _ = numpy_mean_image(tmp_path, 24, antialias=False)
  np.testing.assert_allclose(plain, want, atol=1e-3)
  assert np.abs(plain - first).max() > 0.5  # The filters do differ here.

  write_photo_folder(tmp_path, ['dog'], n=1, first=2)  # A 5th image.
  ip.forget_training_set_stats()  # As the next run, in a new process.
  grown = ip.load_mean(c)
  assert spy.calls == 3
  want, n = numpy_mean_image(tmp_path, 24, antialias=False)
  assert n == 5 and int(ip.training_set_stats(c)['num_images']) == 5
  np.testing.assert_allclose(grown, want, atol=1e-3)
  np.testing.assert_array_equal(ip.load_mean(c), grown)
  assert spy.calls == 3


def test_missing_mean_image_cache_is_an_error_naming_prepare(tmp_path,
                                                            monkeypatch):
  """Without the cache, compute_if_missing=False (and a multi-process run,
  by default) raises, naming the command that computes it; with the cache,
  it is read."""
  write_photo_folder(tmp_path, ['cat', 'dog'], n=1)
  c = recipe_on_folder(tmp_path)
  spy = ComputeSpy(monkeypatch)
  with pytest.raises(FileNotFoundError, match='python -m alexnet_jax.prepare'):
    ip.training_set_stats(c, compute_if_missing=False)
  monkeypatch.setattr(ip.jax, 'process_count', lambda: 2)
  with pytest.raises(FileNotFoundError, match='python -m alexnet_jax.prepare'):
    ip.load_mean(c)
  assert spy.calls == 0
  stats = ip.training_set_stats(c, compute_if_missing=True)
  assert spy.calls == 1
  ip.forget_training_set_stats()  # As the next run, in a new process.
  np.testing.assert_array_equal(ip.load_mean(c), stats['mean_image'])
  np.testing.assert_array_equal(
      ip.training_set_stats(c, compute_if_missing=False)['mean_image'],
      stats['mean_image'])
  assert spy.calls == 1


def test_device_finish_equals_train_finish(demo_dir, tmp_path):
  """The float step on the accelerator equals the tf version (per-pixel
  mean crops, PCA shift, the mirror where flipped)."""
  from alexnet_jax import preprocess as pp  # pylint: disable=g-import-not-at-top
  c = demo_config(demo_dir, batch_size=8)
  path = str(tmp_path / 'mean.npy')
  mean = np.random.default_rng(0).normal(size=(64, 64, 3)).astype(np.float32)
  np.save(path, mean)
  c.data.mean_image_path = path
  src = ip.get_source(c, 'train', 0, 1)
  x, _, _ = next(ip.train_dataset(c, src, 8, 2, 0).as_numpy_iterator())
  assert x[2].any() and not x[2].all()  # Mirrored and plain examples.
  mesh = make_mesh(2)
  sharding = ip.NamedSharding(mesh, ip.P('data'))
  got = ip.device_finish(c, mesh)(*[ip.jax.device_put(y, sharding) for y in x])
  want = pp.train_finish(*x, mean=mean).numpy()
  assert got.sharding.spec == ip.P('data')
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4)


def test_train_dataset_example_fn(demo_dir):
  """A given per-example function replaces the augmentation (the benchmark
  times the pipeline alone with a no-op) and sees each record's own bytes
  and seed."""
  c = demo_config(demo_dir, batch_size=8)
  src = ip.get_source(c, 'train', 0, 1)
  k = c.data.crop_size

  def fn(x, s):  # The JPEG's length and the seed's position, as pixels.
    return (tf.fill((k, k, 3), tf.cast(tf.strings.length(x) % 251, tf.uint8)),
            tf.cast(s, tf.int32), tf.constant(False), tf.zeros([3]))
  x, l, _ = next(ip.train_dataset(c, src, 8, 2, 0, start_batch=1,
                                  example_fn=fn).as_numpy_iterator())
  records = list(src.records((c.seed, 0, 0), 8).take(8).as_numpy_iterator())
  np.testing.assert_array_equal(x[0][:, 0, 0, 0],
                                [len(r) % 251 for r, _ in records])
  np.testing.assert_array_equal(x[1][:, 1], np.arange(8, 16))
  np.testing.assert_array_equal(l, [label for _, label in records])


def test_prefetch_stops_its_thread_when_closed():
  """A closed prefetcher leaves no thread running (none left inside
  TensorFlow or JAX at exit) and stops pulling from its source."""
  produced = []

  def source():
    i = 0
    while True:
      produced.append(i)
      yield i
      i += 1
  before = threading.active_count()
  it = ip.prefetch(source(), 2)
  assert [next(it) for _ in range(3)] == [0, 1, 2]
  it.close()
  assert threading.active_count() == before
  n = len(produced)
  time.sleep(0.3)
  assert len(produced) == n <= 3 + 2 + 1
