"""Demo data built once per test session (small, seconds)."""
import jax
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
