"""Tests run on 8 fake CPU devices; this must happen before JAX initialises.
Also the `data_dir` fixture shared by the trainer's tests."""
import atexit
import os
import shutil
import tempfile

import pytest

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# JAX's persistent compilation cache, fresh for each test session and
# inherited by the tests' subprocesses: restarts, resumes, sweeps and the
# command-line tests compile the same programs again in every process and
# load them from here instead (the suite: 12:35 -> 10:47 on 2 cores).
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _cache = tempfile.mkdtemp(prefix='alexnet_jax_tests_jax_cache_')
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'

# The native resample op (alexnet_jax/native.py) is compiled once per test
# session into a fresh directory, inherited likewise: the suite builds it as
# a new machine does.
if 'ALEXNET_JAX_CACHE_DIR' not in os.environ:
  _ops = tempfile.mkdtemp(prefix='alexnet_jax_tests_ops_')
  atexit.register(shutil.rmtree, _ops, ignore_errors=True)
  os.environ['ALEXNET_JAX_CACHE_DIR'] = _ops


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """Generated demo data built through tfds, once per test session."""
  from tests import train_helpers as th  # pylint: disable=g-import-not-at-top
  return th.prepare_data(str(tmp_path_factory.getbasetemp() / 'demo_data'))
