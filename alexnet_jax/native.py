"""The train augmentation's bilinear resample as a compiled TensorFlow op.

TensorFlow's `crop_and_resize` costs nearly as much as decoding the JPEG it
resamples; `resample.cc` does the same bilinear filter at the same sampling
points several times faster, written for this one job: separable, with the
horizontal taps computed once per crop (docs/BENCHMARKS_input.md has the
figures). It is compiled against the installed TensorFlow on first use, with
the C++ compiler named by $CXX (default g++), into a cache directory
($ALEXNET_JAX_CACHE_DIR, default ~/.cache/alexnet_jax), once per source,
TensorFlow and compiler, then loaded from there. Several processes starting
together build it once (a file lock).

config.data.resample picks the implementation:
  'auto'    the compiled op if it builds, else crop_and_resize with a warning
  'native'  the compiled op; an error saying what to do if it cannot be built
  'tf'      TensorFlow's crop_and_resize (no compiler needed)
Both give the same crops up to float rounding (tests/test_native.py).
"""

import fcntl
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import time

from absl import logging
import tensorflow as tf

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      'resample.cc')
CHOICES = ('auto', 'native', 'tf')


class BuildError(RuntimeError):
  pass


def cache_dir():
  return os.environ.get('ALEXNET_JAX_CACHE_DIR') or os.path.join(
      os.path.expanduser('~'), '.cache', 'alexnet_jax')


def _command(cxx, source, output):
  return ([cxx, '-std=c++17', '-shared', '-fPIC', '-O3', source, '-o', output]
          + tf.sysconfig.get_compile_flags() + tf.sysconfig.get_link_flags())


def build(directory=None, cxx=None):
  """Path of the compiled op library, building it if the cache lacks it.

  Raises BuildError (with the compiler's output) if it cannot be built.
  """
  directory = directory or cache_dir()
  cxx = cxx or os.environ.get('CXX', 'g++')
  with open(SOURCE, 'rb') as f:
    source = f.read()
  key = hashlib.sha256(b'\0'.join(
      [source, tf.__version__.encode(), tf.__file__.encode(), cxx.encode(),
       ' '.join(_command(cxx, '', '')).encode()])).hexdigest()[:16]
  path = os.path.join(directory, f'resample_{key}.so')
  if os.path.exists(path):
    return path
  if shutil.which(cxx) is None:
    raise BuildError(f'no C++ compiler {cxx!r} on PATH (set $CXX to one)')
  os.makedirs(directory, exist_ok=True)
  with open(path + '.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # Another process may be building it.
    if os.path.exists(path):
      return path
    start = time.perf_counter()
    fd, tmp = tempfile.mkstemp(suffix='.so', dir=directory)
    os.close(fd)
    try:
      try:
        result = subprocess.run(_command(cxx, SOURCE, tmp),
                                capture_output=True, text=True, timeout=600,
                                check=False)
      except subprocess.TimeoutExpired as e:
        raise BuildError(f'{cxx} took over {e.timeout:.0f} s') from e
      if result.returncode:
        raise BuildError(f'{cxx} failed (exit {result.returncode}):\n'
                         f'{result.stderr[-4000:]}')
      os.replace(tmp, path)  # Atomic: a reader never sees half a file.
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)
    logging.info('Built the native resample op in %.0f s: %s',
                 time.perf_counter() - start, path)
  return path


def reset():
  """Forgets this process's build or load of the op (and its failure): the
  next use tries again, e.g. after $CXX or the cache directory changed."""
  _load.cache_clear()


@functools.cache
def _load():
  """(the op, None) or (None, why not): built and loaded once a process."""
  try:
    return tf.load_op_library(build()).alexnet_bilinear_resample, None
  except (BuildError, tf.errors.NotFoundError, OSError) as e:
    return None, e


def resample_op(choice):
  """The op's Python function for config.data.resample = `choice`, or None
  when crop_and_resize is to be used."""
  if choice not in CHOICES:
    raise ValueError(f'config.data.resample={choice!r}: use one of {CHOICES}.')
  if choice == 'tf':
    return None
  op, error = _load()
  if error is not None:
    if choice == 'native':
      raise BuildError(
          f'config.data.resample=native: cannot build {SOURCE} ({error}). '
          'Install a C++ compiler (e.g. g++) or set --config.data.resample=tf '
          '(TensorFlow\'s crop_and_resize: the same crops, slower).'
      ) from error
    _warn_once(str(error))
  return op


@functools.cache
def _warn_once(reason):
  logging.warning('The native resample op is not available (%s); using '
                  'TensorFlow\'s crop_and_resize (the same crops, ~1.5x '
                  'slower augmentation). --config.data.resample=tf silences '
                  'this.', reason)

