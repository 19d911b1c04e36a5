"""The paper's preprocessing and augmentation as small named TF ops.

Every op works eagerly and inside tf.data, on one image (H, W, C). Randomness
is stateless: an op takes a `seed` (shape [2] int tensor) and the input
pipeline derives one seed per (run seed, example position), so augmentation is
a pure function of (seed, step, example).

Scale: float32 on 0-255 throughout, as in the paper ("raw RGB values", §2).

  decode_and_resize   shorter side to `resize_size`, central square (§2)
  subtract_mean       per-pixel mean image, or per-channel means (§2)
  random_crop         random crop_size x crop_size window (§4.1)
  random_flip         horizontal reflection with probability 1/2 (§4.1)
  pca_lighting        add V (alpha * s) to every pixel (§4.1)
  central_crop        the centre window, for evaluation
  ten_crop            4 corners + centre, each with its mirror (§4.1, test)

Training does not run these one after the other on a float 256x256 image
(that is `train_preprocess_reference`): `train_example` decodes only the
random crop's window and resamples it straight to the crop at the same
sampling points (`decode_crop_resize`; no resampling where the image already
is 256 on its shorter side), keeps uint8, and leaves the mean and PCA
subtraction and the mirror to one batched step (`train_finish`, or on the
accelerator in input_pipeline.device_finish). docs/BENCHMARKS_input.md has
the figures.
"""

import numpy as np
import tensorflow as tf

from alexnet_jax import native


def decode_and_resize(image_bytes, resize_size=256, antialias=True):
  """Encoded image -> (resize_size, resize_size, 3) float32 on 0-255.

  "Rescaled the image such that the shorter side was of length 256, and then
  cropped out the central 256x256 patch" (§2). Equivalently, and cheaper: take
  the central square of side min(h, w) and resize it to 256x256. For JPEGs
  only that square is decoded (`decode_and_crop_jpeg`); other formats (PNG in
  a user's folder) are decoded whole and then cropped.
  """
  def jpeg():
    shape = tf.image.extract_jpeg_shape(image_bytes)
    oy, ox, s = central_square(shape[0], shape[1])
    return tf.image.decode_and_crop_jpeg(
        image_bytes, tf.stack([oy, ox, s, s]), channels=3)

  def other():
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    shape = tf.shape(image)
    oy, ox, s = central_square(shape[0], shape[1])
    return image[oy:oy + s, ox:ox + s]

  image = tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other)
  image = tf.image.resize(image, (resize_size, resize_size), 'bilinear',
                          antialias=antialias)
  return tf.clip_by_value(image, 0.0, 255.0)


def subtract_mean(image, mean):
  """image - mean, mean either (H, W, 3) per pixel or (3,) per channel."""
  return image - tf.cast(mean, image.dtype)


def crop_offsets(seed, limit_y, limit_x):
  """Uniform offsets in [0, limit] for a random crop (exposed for tests)."""
  u = tf.random.stateless_uniform([2], seed)
  limits = tf.cast(tf.stack([limit_y, limit_x]) + 1, tf.float32)
  o = tf.minimum(tf.cast(tf.floor(u * limits), tf.int32),
                 tf.cast(limits, tf.int32) - 1)
  return o[0], o[1]


def random_crop(image, crop_size, seed):
  """A random crop_size x crop_size window, uniform over positions (§4.1)."""
  shape = tf.shape(image)
  oy, ox = crop_offsets(seed, shape[0] - crop_size, shape[1] - crop_size)
  return image[oy:oy + crop_size, ox:ox + crop_size]


def flip_decision(seed):
  return tf.random.stateless_uniform([], seed) < 0.5


def random_flip(image, seed):
  """Horizontal reflection with probability 1/2 (§4.1)."""
  return tf.cond(flip_decision(seed), lambda: image[:, ::-1], lambda: image)


def pca_alpha(seed, alpha_stddev):
  return tf.random.stateless_normal([3], seed) * alpha_stddev


def pca_lighting(image, seed, eigvecs, stddevs, alpha_stddev=0.1):
  """Adds V @ (alpha * s) to every pixel, alpha ~ N(0, alpha_stddev) (§4.1).

  `eigvecs` has the RGB covariance's eigenvectors as columns; `stddevs` are
  the per-component standard deviations (cuda-convnet scales by these, not by
  the eigenvalues), both on the 0-255 scale.
  """
  v = tf.constant(eigvecs, tf.float32)
  s = tf.constant(stddevs, tf.float32)
  delta = tf.linalg.matvec(v, pca_alpha(seed, alpha_stddev) * s)
  return image + tf.cast(delta, image.dtype)


def central_crop(image, crop_size):
  shape = tf.shape(image)
  oy, ox = (shape[0] - crop_size) // 2, (shape[1] - crop_size) // 2
  return image[oy:oy + crop_size, ox:ox + crop_size]


def ten_crop(image, crop_size):
  """(10, crop, crop, 3): top-left, top-right, bottom-left, bottom-right,
  centre, then the same five mirrored (the paper's test-time views, §4.1)."""
  shape = tf.shape(image)
  ly, lx = shape[0] - crop_size, shape[1] - crop_size
  corners = [(0, 0), (0, lx), (ly, 0), (ly, lx), (ly // 2, lx // 2)]
  crops = tf.stack([image[y:y + crop_size, x:x + crop_size]
                    for y, x in corners])
  return tf.concat([crops, crops[:, :, ::-1]], axis=0)


def central_square(h, w):
  """(top, left, side) of the central square of an h x w image."""
  s = tf.minimum(h, w)
  return (h - s) // 2, (w - s) // 2, s


def decode_window(c, s, resize_size, crop_size, radius, margin=2):
  """The decode window a crop at offsets `c` (256-space; both axes at once,
  each result has c's shape) needs.

  Output pixel j of the crop is pixel c + j of the resized square, whose
  centre lies at square coordinate v_j = (c + j + 0.5) / k - 0.5 (pixel-index
  units, k = resize_size / s, half-pixel centres as tf.image.resize). The
  window [lo, lo + n) of the square holds v_0 - radius .. v_last + radius
  (the kernel's support) plus `margin` pixels for the JPEG decoder's
  chroma upsampling at a crop edge, clipped to the square. Returns
  (lo, n, v_0 - lo, v_last - lo).
  """
  k = tf.cast(resize_size, tf.float32) / tf.cast(s, tf.float32)
  c = tf.cast(c, tf.float32)
  v0 = (c + 0.5) / k - 0.5
  v1 = (c + crop_size - 0.5) / k - 0.5
  lo = tf.clip_by_value(tf.cast(tf.floor(v0 - radius), tf.int32) - margin,
                        0, s - 1)
  hi = tf.clip_by_value(tf.cast(tf.math.ceil(v1 + radius), tf.int32) + 1 +
                        margin, lo + 1, s)
  lof = tf.cast(lo, tf.float32)
  return lo, hi - lo, v0 - lof, v1 - lof


def _repeat_edges(img):
  """img with its first/last row and column repeated once."""
  img = tf.concat([img[:1], img, img[-1:]], 0)
  return tf.concat([img[:, :1], img, img[:, -1:]], 1)


def decode_crop_resize(image_bytes, offsets, *, resize_size, crop_size,
                       antialias=True, antialias_above=2.0, as_uint8=False,
                       resample='auto'):
  """Encoded image -> the (crop, crop, 3) float32 window at `offsets` of the
  resize_size square, without making the square; rounded to uint8 if
  `as_uint8`.

  The reference is decode_and_resize (central square, resize to 256) then a
  crop at `offsets`. Here the crop's sampling points are mapped
  back onto the decoded image and only the pixels they need are decoded
  (`decode_and_crop_jpeg` of that window) and resampled straight to
  crop x crop:
    * downscaling by <= `antialias_above` (or antialias=False): bilinear at
      exactly the reference's sampling points, points past the square's
      edge clamped to it as in tf.image.resize: the compiled op of
      alexnet_jax/native.py (`resample` = config.data.resample: 'auto',
      'native' or 'tf'), or `crop_and_resize` (the window padded by one
      replicated pixel for the clamp). Equal to the reference with
      antialias=False up to float rounding; for 1 < s/256 <= 2 it omits the
      reference's antialias widening (a triangle of width s/256 instead of
      1 pixel).
    * downscaling by more (and antialias): the antialiased triangle filter
      of tf.image.resize (`ScaleAndTranslate` with the reference's scale and
      a translation), equal to the reference where the kernel lies inside
      the window, which holds its whole support.
    * an image whose shorter side already is resize_size (the pre-resized
      copies of alexnet_jax/prepare.py, as the paper stored its images): the
      sampling points are whole pixels, so the crop is sliced out of the
      decoded window with no resampling (with as_uint8, no float image is
      made at all; equal to the reference bit for bit).
  Pixels next to the window's edge may differ slightly because the JPEG
  decoder upsamples chroma within the decoded window only (as for the
  central square in decode_and_resize).
  """
  # Flat branches on the format and the filter, not nested conds.
  is_jpeg = tf.io.is_jpeg(image_bytes)

  def decode_other():
    image = tf.io.decode_image(image_bytes, channels=3,
                               expand_animations=False)
    return image, tf.shape(image)
  other, shape = tf.cond(
      is_jpeg, lambda: (tf.zeros([0, 0, 3], tf.uint8),
                        tf.image.extract_jpeg_shape(image_bytes)),
      decode_other)
  oy, ox, s = central_square(shape[0], shape[1])
  k = tf.cast(resize_size, tf.float32) / tf.cast(s, tf.float32)
  smooth = tf.logical_and(tf.constant(bool(antialias)),
                          k * antialias_above < 1.0)
  radius = tf.where(smooth, 1.0 / k, 1.0)
  lo, size, first, last = decode_window(offsets, s, resize_size, crop_size, radius)
  start = tf.stack([oy, ox]) + lo
  img = tf.cond(
      is_jpeg,
      lambda: tf.image.decode_and_crop_jpeg(
          image_bytes, tf.concat([start, size], 0), channels=3),
      lambda: tf.slice(other, tf.concat([start, [0]], 0),
                       tf.concat([size, [3]], 0)))

  def rounded(out):
    # Both filters have non-negative weights summing to 1: no clipping needed.
    return tf.cast(out + 0.5, tf.uint8) if as_uint8 else out

  def whole_pixels():
    # k == 1: output pixel j is window pixel v_0 - lo + j, a whole number.
    y, x = tf.unstack(tf.cast(tf.round(first), tf.int32))
    out = tf.ensure_shape(img[y:y + crop_size, x:x + crop_size],
                          [crop_size, crop_size, 3])
    return out if as_uint8 else tf.cast(out, tf.float32)

  op = native.resample_op(resample)

  def bilinear():
    if op is not None:  # Clamps points past the window's edge itself.
      return op(image=img, grid=tf.stack([first[0], 1 / k, first[1], 1 / k]),
                height=crop_size, width=crop_size,
                out_type=tf.uint8 if as_uint8 else tf.float32)
    # Points past the square's edge (upsampling only) clamp to it, as in
    # tf.image.resize: repeat the edge pixels (cheap: small images only).
    pad = tf.cast(k > 1.0, tf.int32)
    padded = tf.cond(k > 1.0, lambda: _repeat_edges(img), lambda: img)
    pf = tf.cast(pad, tf.float32)
    steps = tf.cast(size - 1 + 2 * pad, tf.float32)  # (padded size) - 1.
    box = tf.concat([(first + pf) / steps, (last + pf) / steps], 0)
    return rounded(tf.image.crop_and_resize(padded[None], box[None], [0],
                                            [crop_size, crop_size])[0])

  def smoothed():
    # Output j samples window coordinate (j + 0.5 - t) / k (centre units).
    t = k * tf.cast(lo, tf.float32) - tf.cast(offsets, tf.float32)
    return rounded(tf.raw_ops.ScaleAndTranslate(
        images=img[None], size=[crop_size, crop_size], scale=tf.stack([k, k]),
        translation=t, kernel_type='triangle',
        antialias=True)[0])

  branch = tf.where(tf.equal(k, 1.0), 0, tf.where(smooth, 2, 1))
  return tf.switch_case(branch, [whole_pixels, bilinear, smoothed])


def train_example(image_bytes, seed, *, mean, resize_size, crop_size,
                  random_flip_=True, pca_noise=True, eigvecs=None,
                  stddevs=None, alpha_stddev=0.1, antialias=True,
                  antialias_above=2.0, resample='auto'):
  """The per-example part of the train augmentation, kept in uint8.

  Returns (image, offsets, flip, shift): image (crop, crop, 3) uint8, the
  random crop of the resized square, rounded to 8 bits, not yet flipped;
  offsets (2,) int32, the crop's position in the square; flip, bool; shift
  (3,) float32, the per-channel mean (when `mean` is per channel, else 0)
  minus the PCA lighting offset. `train_finish` turns a batch of these into
  the augmented float images: image - mean crop - shift, mirrored where
  `flip` (a uint8 mirror here costs more than the decode of a pre-resized
  image; in the batched float step it is free). Same random draws as
  `train_preprocess_reference` for the same seed.
  """
  seeds = tf.random.experimental.stateless_split(seed, 3)
  limit = resize_size - crop_size
  oy, ox = crop_offsets(seeds[0], limit, limit)
  offsets = tf.stack([oy, ox])
  flip = flip_decision(seeds[1]) if random_flip_ else tf.constant(False)
  image = decode_crop_resize(
      image_bytes, offsets, resize_size=resize_size,
      crop_size=crop_size, antialias=antialias,
      antialias_above=antialias_above, as_uint8=True, resample=resample)
  mean = np.asarray(mean, np.float32)
  shift = tf.constant(mean if mean.ndim == 1 else np.zeros(3, np.float32))
  if pca_noise:
    v = tf.constant(eigvecs, tf.float32)
    s = tf.constant(stddevs, tf.float32)
    shift = shift - tf.linalg.matvec(v, pca_alpha(seeds[2], alpha_stddev) * s)
  return image, offsets, flip, shift


def mean_crops(mean, offsets, crop_size):
  """(B, crop, crop, 3): the per-pixel mean image's crop at each example's
  offsets (one gather)."""
  r = mean.shape[1]
  j = tf.range(crop_size)
  rows = (offsets[:, 0:1] + j[None]) * r
  cols = offsets[:, 1:2] + j[None]
  flat = tf.reshape(tf.constant(mean, tf.float32), [-1, 3])
  return tf.gather(flat, rows[:, :, None] + cols[:, None, :])


def train_finish(images, offsets, flips, shifts, *, mean):
  """A batch of `train_example` outputs -> float32 (B, crop, crop, 3):
  image - mean crop (per-pixel mean only) - shift, mirrored where flipped.
  input_pipeline does the same on the accelerator (`device_finish`)."""
  x = tf.cast(images, tf.float32) - shifts[:, None, None, :]
  mean = np.asarray(mean, np.float32)
  if mean.ndim == 3:
    x = x - mean_crops(mean, offsets, images.shape[1])
  return tf.where(flips[:, None, None, None], tf.reverse(x, [2]), x)


def train_preprocess(image_bytes, seed, *, mean, **kwargs):
  """The full train augmentation of one example (train_example, then
  train_finish); kwargs as train_example, values from config.data."""
  parts = train_example(image_bytes, seed, mean=mean, **kwargs)
  return train_finish(*(p[None] for p in parts), mean=mean)[0]


def train_preprocess_reference(image_bytes, seed, *, mean, resize_size,
                               crop_size, random_flip_=True, pca_noise=True,
                               eigvecs=None, stddevs=None, alpha_stddev=0.1,
                               antialias=True):
  """The paper's steps one after the other on the float 256x256 square (the
  slow, literal version; train_preprocess must match it, see the tests)."""
  seeds = tf.random.experimental.stateless_split(seed, 3)
  image = decode_and_resize(image_bytes, resize_size, antialias)
  image = subtract_mean(image, mean)
  image = random_crop(image, crop_size, seeds[0])
  if random_flip_:
    image = random_flip(image, seeds[1])
  if pca_noise:
    image = pca_lighting(image, seeds[2], eigvecs, stddevs, alpha_stddev)
  return image


def eval_preprocess(image_bytes, *, mean, resize_size, crop_size,
                    ten_crop_=False, antialias=True):
  """Central crop (crop, crop, 3), or the ten views (10, crop, crop, 3)."""
  image = subtract_mean(decode_and_resize(image_bytes, resize_size, antialias),
                        mean)
  return ten_crop(image, crop_size) if ten_crop_ else central_crop(
      image, crop_size)
