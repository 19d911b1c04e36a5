"""Test data: demo data built once per test session (small, seconds), photo-
like JPEGs and image folders."""
import io
import os

import jax
import numpy as np
from PIL import Image
import pytest

from alexnet_jax import demo_data
from configs.alexnet import get_config

# Small but with every awkward case; 4 classes x 24 train, 5 val per class.
SPEC = demo_data.DemoSpec(num_classes=4, train_per_class=24, val_per_class=5,
                          min_size=40, max_size=90)


@pytest.fixture(scope='session')
def demo_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp('tfds'))
  demo_data.prepare_demo(d, spec=SPEC)
  return d


def demo_config(data_dir, batch_size=16):
  c = get_config('demo')
  c.data.data_dir = data_dir
  c.data.demo_num_classes = SPEC.num_classes
  c.data.demo_train_per_class = SPEC.train_per_class
  c.data.demo_val_per_class = SPEC.val_per_class
  c.data.demo_image_size = (SPEC.min_size, SPEC.max_size)
  c.data.resize_size = 64  # Small views keep the tests fast.
  c.data.crop_size = 56
  c.data.shuffle_buffer = 32
  c.data.prefetch = 2
  c.batch_size = batch_size
  return c


def make_mesh(data, tower=1):
  return jax.make_mesh((data, tower), ('data', 'tower'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


def smooth_jpeg(h, w, fmt='JPEG', seed=0, cell=8):
  """Photo-like: smooth colour fields (bicubic upsampling of noise)."""
  rng = np.random.default_rng(seed)
  small = rng.integers(0, 256, (h // cell + 2, w // cell + 2, 3), np.uint8)
  img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
  buf = io.BytesIO()
  img.save(buf, fmt, quality=95)
  return buf.getvalue()


# (h, w, format): upsampling, downscaling by < 2x and by > 2x (antialiased
# path), both orientations, a non-JPEG; shorter side already 64 (whole-pixel
# path, as the pre-resized copies).
SIZES = [(40, 50, 'JPEG'), (90, 70, 'JPEG'), (100, 130, 'PNG'),
         (150, 200, 'JPEG'), (210, 140, 'PNG'), (64, 80, 'JPEG'),
         (72, 64, 'PNG')]


def write_folder(root, classes, n=4):
  """root/{train,val}/<class>/<i>.jpg: n small solid images per class."""
  for split in ('train', 'val'):
    for k, c in enumerate(classes):
      os.makedirs(root / split / c)
      for i in range(n):
        Image.new('RGB', (40 + i, 30), (60 * k, 0, 0)).save(
            root / split / c / f'{i}.jpg')


def write_photo_folder(root, classes, n=3, split='train', first=0):
  """root/<split>/<class>/<i>.jpg, i in [first, first + n): photo-like
  images (smooth_jpeg) of varied sizes, both orientations, so that a
  per-pixel mean image varies from pixel to pixel."""
  for k, c in enumerate(classes):
    os.makedirs(root / split / c, exist_ok=True)
    for i in range(first, first + n):
      h, w = (50 + 7 * i, 70 + 5 * k) if (i + k) % 2 else (70 + 5 * k,
                                                           50 + 7 * i)
      (root / split / c / f'{i}.jpg').write_bytes(
          smooth_jpeg(h, w, seed=100 * k + i))
