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
"""

import tensorflow as tf


def decode_and_resize(image_bytes, resize_size=256, antialias=True):
  """Encoded image -> (resize_size, resize_size, 3) float32 on 0-255.

  "Rescaled the image such that the shorter side was of length 256, and then
  cropped out the central 256x256 patch" (§2). Equivalently, and cheaper: take
  the central square of side min(h, w) and resize it to 256x256. For JPEGs
  only that square is decoded (`decode_and_crop_jpeg`); other formats (PNG in
  a user's folder) are decoded whole and then cropped.
  """
  def square(h, w):
    s = tf.minimum(h, w)
    return (h - s) // 2, (w - s) // 2, s

  def jpeg():
    shape = tf.image.extract_jpeg_shape(image_bytes)
    oy, ox, s = square(shape[0], shape[1])
    return tf.image.decode_and_crop_jpeg(
        image_bytes, tf.stack([oy, ox, s, s]), channels=3)

  def other():
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    shape = tf.shape(image)
    oy, ox, s = square(shape[0], shape[1])
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


def train_preprocess(image_bytes, seed, *, mean, resize_size, crop_size,
                     random_flip_=True, pca_noise=True, eigvecs=None,
                     stddevs=None, alpha_stddev=0.1, antialias=True):
  """The full train augmentation of one example; values from config.data."""
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
