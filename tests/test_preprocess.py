"""Each preprocessing op against numpy, eagerly and inside tf.data."""
import io

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from alexnet_jax import preprocess as pp
from configs.alexnet import get_config
from tests.data_fixtures import SIZES, smooth_jpeg, write_folder

D = get_config().data
SEED = tf.constant([3, 7], tf.int64)


def run(fn, *args, in_data):
  """fn(*args) eagerly, or as a tf.data map over one element."""
  if not in_data:
    return np.asarray(fn(*args))
  ds = tf.data.Dataset.from_tensors(tuple(args)).map(fn)
  return next(iter(ds.as_numpy_iterator()))


def jpeg(h, w, mode='RGB', fmt='JPEG', seed=0):
  rng = np.random.default_rng(seed)
  a = rng.integers(0, 256, (h, w, 3), np.uint8)
  a = np.asarray(Image.fromarray(a).resize((w, h)))
  img = Image.fromarray(a).convert(mode)
  buf = io.BytesIO()
  img.save(buf, fmt, quality=95)
  return buf.getvalue()


@pytest.mark.parametrize('in_data', [False, True])
@pytest.mark.parametrize('h,w', [(60, 100), (100, 60), (80, 80), (17, 29)])
def test_decode_and_resize_is_central_square(h, w, in_data):
  data = jpeg(h, w)
  full = tf.io.decode_jpeg(data, channels=3).numpy()
  s = min(h, w)
  oy, ox = (h - s) // 2, (w - s) // 2
  want = tf.image.resize(full[oy:oy + s, ox:ox + s].astype(np.float32),
                         (32, 32), antialias=True).numpy()
  got = run(lambda x: pp.decode_and_resize(x, 32), tf.constant(data),
            in_data=in_data)
  assert got.shape == (32, 32, 3) and got.dtype == np.float32
  # decode_and_crop_jpeg upsamples chroma inside the crop only, so pixels at
  # the crop's edge differ a little from cropping the full decode.
  err = np.abs(got - np.clip(want, 0, 255))
  assert err.mean() < 1.0 and err[2:-2, 2:-2].mean() < 0.5


@pytest.mark.parametrize('mode,fmt', [('L', 'JPEG'), ('CMYK', 'JPEG'),
                                      ('RGB', 'PNG')])
def test_decode_grayscale_cmyk_png(mode, fmt):
  got = pp.decode_and_resize(tf.constant(jpeg(30, 40, mode, fmt)), 16)
  assert got.shape == (16, 16, 3)
  assert np.isfinite(got.numpy()).all()


def test_corrupt_raises_so_pipeline_can_skip():
  with pytest.raises(tf.errors.InvalidArgumentError):
    pp.decode_and_resize(tf.constant(b'\xff\xd8\xff' + b'\x00garbage' * 9))


@pytest.mark.parametrize('in_data', [False, True])
def test_random_crop_and_flip_match_numpy(in_data):
  image = np.random.default_rng(0).normal(size=(20, 24, 3)).astype(np.float32)
  oy, ox = (int(v) for v in pp.crop_offsets(SEED, 20 - 8, 24 - 8))
  got = run(lambda x, s: pp.random_crop(x, 8, s), image, SEED,
            in_data=in_data)
  np.testing.assert_array_equal(got, image[oy:oy + 8, ox:ox + 8])
  flip = bool(pp.flip_decision(SEED))
  got = run(pp.random_flip, image, SEED, in_data=in_data)
  np.testing.assert_array_equal(got, image[:, ::-1] if flip else image)


def test_crop_offsets_uniform_and_flip_half():
  seeds = [tf.constant([0, i], tf.int64) for i in range(400)]
  offs = np.array([[int(v) for v in pp.crop_offsets(s, 3, 3)] for s in seeds])
  assert offs.min() == 0 and offs.max() == 3
  counts = np.bincount(offs[:, 0], minlength=4)
  assert counts.min() > 60  # ~100 each.
  flips = np.mean([bool(pp.flip_decision(s)) for s in seeds])
  assert 0.4 < flips < 0.6


@pytest.mark.parametrize('in_data', [False, True])
def test_pca_lighting_matches_numpy(in_data):
  image = np.zeros((4, 5, 3), np.float32)
  fn = lambda x, s: pp.pca_lighting(x, s, D.pca_eigvecs, D.pca_stddevs,
                                    D.pca_alpha_stddev)
  got = run(fn, image, SEED, in_data=in_data)
  alpha = pp.pca_alpha(SEED, D.pca_alpha_stddev).numpy()
  delta = np.array(D.pca_eigvecs) @ (alpha * np.array(D.pca_stddevs))
  np.testing.assert_allclose(got, image + delta, rtol=1e-5, atol=1e-4)


def test_subtract_mean_pixel_and_channel():
  image = np.full((4, 4, 3), 100., np.float32)
  mean = np.arange(48, dtype=np.float32).reshape(4, 4, 3)
  np.testing.assert_allclose(pp.subtract_mean(image, mean), image - mean)
  np.testing.assert_allclose(pp.subtract_mean(image, D.channel_means),
                             image - np.array(D.channel_means), rtol=1e-5)


@pytest.mark.parametrize('in_data', [False, True])
def test_central_and_ten_crop_windows(in_data):
  image = np.random.default_rng(1).normal(size=(10, 12, 3)).astype(np.float32)
  got = run(lambda x: pp.central_crop(x, 6), image, in_data=in_data)
  np.testing.assert_array_equal(got, image[2:8, 3:9])
  got = run(lambda x: pp.ten_crop(x, 6), image, in_data=in_data)
  assert got.shape == (10, 6, 6, 3)
  windows = [(0, 0), (0, 6), (4, 0), (4, 6), (2, 3)]
  for i, (y, x) in enumerate(windows):
    np.testing.assert_array_equal(got[i], image[y:y + 6, x:x + 6])
    np.testing.assert_array_equal(got[i + 5], image[y:y + 6, x:x + 6][:, ::-1])


def test_train_preprocess_is_function_of_seed():
  data = tf.constant(jpeg(50, 70))
  kw = dict(mean=D.channel_means, resize_size=32, crop_size=28,
            eigvecs=D.pca_eigvecs, stddevs=D.pca_stddevs)
  a = pp.train_preprocess(data, SEED, **kw).numpy()
  b = pp.train_preprocess(data, SEED, **kw).numpy()
  c = pp.train_preprocess(data, SEED + 1, **kw).numpy()
  assert a.shape == (28, 28, 3)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_data_stats_match_numpy(tmp_path):
  """data_stats.compute over a dataset of encoded images (the folder
  source's, as input_pipeline.training_set_stats reads it) against numpy;
  save/load round-trip under a key, None for another key."""
  from alexnet_jax import data_stats  # pylint: disable=g-import-not-at-top
  from alexnet_jax import input_pipeline as ip  # pylint: disable=g-import-not-at-top
  write_folder(tmp_path, ['a', 'b'], n=3)
  c = get_config()
  c.data.dataset, c.data.folder, c.data.resize_size = 'folder', str(tmp_path), 16
  images = ip.get_source(c, 'train', 0, 1).records(None, 0).map(
      lambda x, l: x)
  stats = data_stats.compute(images, 16, batch=4)
  imgs = np.stack([pp.decode_and_resize(tf.io.read_file(str(p)), 16).numpy()
                   for p in sorted((tmp_path / 'train').glob('*/*.jpg'))])
  assert stats['num_images'] == 6
  np.testing.assert_allclose(stats['mean_image'], imgs.mean(0), atol=1e-3)
  cov = np.cov(imgs.reshape(-1, 3).T, bias=True)
  v, s = stats['eigvecs'], stats['stddevs']
  np.testing.assert_allclose(v @ np.diag(s ** 2) @ v.T, cov, atol=1e-3 * max(1, np.abs(cov).max()))
  np.testing.assert_allclose(stats['channel_means'],
                             imgs.reshape(-1, 3).mean(0), atol=1e-3)
  key = {'dataset': 'test', 'resize_size': 16}
  out = str(tmp_path / 'out')
  path = data_stats.save(stats, out, 16, key)
  assert path.endswith('.npy')
  loaded = data_stats.load(out, 16, key)
  np.testing.assert_array_equal(loaded['mean_image'], stats['mean_image'])
  np.testing.assert_allclose(loaded['eigvecs'], v)
  np.testing.assert_allclose(loaded['stddevs'], s)
  assert int(loaded['num_images']) == 6
  assert data_stats.load(out, 16, {**key, 'resize_size': 17}) is None
  assert data_stats.load(out, 32, key) is None  # Another size: no file.


@pytest.mark.parametrize('h,w,fmt', SIZES)
def test_decode_crop_resize_equals_resize_then_crop(h, w, fmt):
  """The crop window resampled straight from the decoded image equals the
  reference (square resized to 64, then cropped) up to float
  rounding: same sampling points; the filter is the reference's antialiased
  one above 2x downscaling, bilinear below (the reference with
  antialias=False)."""
  data = tf.constant(smooth_jpeg(h, w, fmt))
  aa = min(h, w) > 2 * 64
  ref = pp.decode_and_resize(data, 64, antialias=aa).numpy()
  for oy, ox in [(0, 0), (8, 3), (5, 8), (8, 8)]:
    got = pp.decode_crop_resize(data, tf.constant([oy, ox]), resize_size=64,
                                crop_size=56).numpy()
    want = ref[oy:oy + 56, ox:ox + 56]
    assert got.shape == (56, 56, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=0.05)


@pytest.mark.parametrize('h,w', [(64, 64), (64, 80), (90, 64)])
def test_whole_pixel_crop_is_the_reference_bit_for_bit(h, w):
  """Shorter side == resize_size (prepare.py's copies): the uint8 crop is
  sliced from the decoded window, equal to resize (identity) + crop of the
  reference without rounding error. (Decoding exactly the crop's
  window instead changed its edge pixels by up to 11: the JPEG decoder
  upsamples chroma within the decoded window only.)"""
  data = tf.constant(smooth_jpeg(h, w, seed=h + w))
  ref = pp.decode_and_resize(data, 64).numpy()
  for oy, ox in [(0, 0), (8, 3), (5, 8), (8, 8)]:
    got = pp.decode_crop_resize(data, tf.constant([oy, ox]), resize_size=64,
                                crop_size=56, as_uint8=True).numpy()
    want = ref[oy:oy + 56, ox:ox + 56]
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, want.astype(np.uint8))
    assert np.array_equal(want, want.round())  # The reference is whole too.


@pytest.mark.parametrize('per_pixel', [False, True])
@pytest.mark.parametrize('h,w,fmt', SIZES)
def test_train_preprocess_matches_reference(h, w, fmt, per_pixel):
  """Same draws (crop, flip, PCA) as the literal resize/mean/crop/flip/PCA
  chain; differs by the uint8 rounding of the resampled crop (<= 0.5)."""
  data = tf.constant(smooth_jpeg(h, w, fmt))
  mean = (np.random.default_rng(2).uniform(0, 200, (64, 64, 3)).astype(
      np.float32) if per_pixel else np.asarray(D.channel_means, np.float32))
  kw = dict(mean=mean, resize_size=64, crop_size=56, eigvecs=D.pca_eigvecs,
            stddevs=D.pca_stddevs)
  flips = set()
  for i in range(4):
    seed = tf.constant([i, 11], tf.int64)
    flips.add(bool(pp.train_example(data, seed, **kw)[2]))
    got = pp.train_preprocess(data, seed, **kw).numpy()
    want = pp.train_preprocess_reference(
        data, seed, antialias=min(h, w) > 128, **kw).numpy()
    err = np.abs(got - want)
    assert err.max() < 0.52 and err.mean() < 0.3
  assert flips == {False, True}  # Both the mirrored and the plain crop.


def test_train_example_in_data_and_finish_matches_numpy():
  data = tf.constant(smooth_jpeg(90, 120))
  mean = np.random.default_rng(3).normal(size=(64, 64, 3)).astype(np.float32)
  kw = dict(mean=mean, resize_size=64, crop_size=56, eigvecs=D.pca_eigvecs,
            stddevs=D.pca_stddevs)
  seeds = tf.constant([[i, 1] for i in range(6)], tf.int64)
  ds = tf.data.Dataset.from_tensor_slices(seeds).map(
      lambda s: pp.train_example(data, s, **kw)).batch(6)
  image, offsets, flips, shifts = next(iter(ds.as_numpy_iterator()))
  assert image.dtype == np.uint8 and image.shape == (6, 56, 56, 3)
  assert flips.any() and not flips.all()
  got = pp.train_finish(image, offsets, flips, shifts, mean=mean).numpy()
  for b in range(6):
    m = mean[offsets[b, 0]:offsets[b, 0] + 56, offsets[b, 1]:offsets[b, 1] + 56]
    want = image[b] - m - shifts[b]
    want = want[:, ::-1] if flips[b] else want
    np.testing.assert_allclose(got[b], want, atol=1e-4)
    eager = pp.train_example(data, seeds[b], **kw)
    np.testing.assert_array_equal(eager[0], image[b])
