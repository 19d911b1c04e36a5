"""Tests run on 8 fake CPU devices; this must happen before JAX initialises.
Also the `data_dir` fixture shared by the trainer's tests."""
import os

import pytest

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """Generated demo data built through tfds, once per test session."""
  from tests import train_helpers as th  # pylint: disable=g-import-not-at-top
  return th.prepare_data(str(tmp_path_factory.getbasetemp() / 'demo_data'))
