"""The compiled bilinear resample (alexnet_jax/native.py, resample.cc): its
output against numpy, against TensorFlow's crop_and_resize path, and its
build: cached, built once by concurrent processes, clear errors."""
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from alexnet_jax import input_pipeline as ip
from alexnet_jax import native
from alexnet_jax import preprocess as pp
from configs import alexnet
from tests.data_fixtures import SIZES, smooth_jpeg


def numpy_bilinear(image, grid, size):
  """Independent reference: float64, taps floor(p) and floor(p) + 1 of the
  clamped point p, weights 1 - f and f."""
  image = image.astype(np.float64)
  h, w = image.shape[:2]

  def taps(start, step, n):
    p = np.clip(start + step * np.arange(size), 0, n - 1)
    lo = np.floor(p).astype(int)
    return lo, np.minimum(lo + 1, n - 1), p - lo

  y0, y1, fy = taps(grid[0], grid[1], h)
  x0, x1, fx = taps(grid[2], grid[3], w)
  fx = fx[None, :, None]
  top = image[y0][:, x0] * (1 - fx) + image[y0][:, x1] * fx
  bottom = image[y1][:, x0] * (1 - fx) + image[y1][:, x1] * fx
  return top * (1 - fy[:, None, None]) + bottom * fy[:, None, None]


# Without a compiler the op cannot exist ('auto' then uses crop_and_resize,
# which the other test files cover); CI's machines have g++.
needs_compiler = pytest.mark.skipif(
    shutil.which(os.environ.get('CXX', 'g++')) is None,
    reason='no C++ compiler to build the native resample op')


# (h, w, c, grid): downscaling, upscaling with points past every edge, a
# whole-pixel grid, one-pixel-wide and one-pixel-high images, one channel.
CASES = [(300, 280, 3, (1.7, 1.33, 2.2, 1.37)),
         (30, 40, 3, (-2.5, 0.62, -1.0, 0.8)),
         (64, 80, 3, (3.0, 1.0, 5.0, 1.0)),
         (50, 1, 3, (0.2, 0.7, 0.0, 0.5)),
         (1, 50, 3, (0.0, 0.5, 0.3, 0.7)),
         (45, 45, 1, (0.5, 0.66, 0.25, 0.61))]


@pytest.mark.parametrize('h,w,c,grid', CASES)
@needs_compiler
def test_op_matches_numpy(h, w, c, grid):
  image = np.random.default_rng(h * w).integers(0, 256, (h, w, c), np.uint8)
  op = native.resample_op('native')
  want = numpy_bilinear(image, grid, 56)
  got = op(image=image, grid=np.float32(grid), height=56, width=56,
           out_type=tf.float32).numpy()
  assert got.shape == (56, 56, c)
  np.testing.assert_allclose(got, want, atol=2e-3)
  rounded = op(image=image, grid=np.float32(grid), height=56, width=56).numpy()
  assert rounded.dtype == np.uint8
  # Rounded half up; float32 rounding may flip a value within 2e-3 of .5.
  assert np.abs(rounded - want).max() <= 0.5 + 2e-3
  # The uint8 path (4-lane SSE2 for RGB) does the float path's arithmetic.
  np.testing.assert_array_equal(rounded, np.floor(got + np.float32(0.5)))
  if grid[1] == grid[3] == 1.0:  # Whole pixels: the pixels themselves.
    np.testing.assert_array_equal(rounded, image[3:59, 5:61])


@needs_compiler
def test_op_rejects_bad_input():
  op = native.resample_op('native')
  with pytest.raises(tf.errors.InvalidArgumentError, match='4 values'):
    op(image=np.zeros((4, 4, 3), np.uint8), grid=[0.0, 1.0], height=2,
       width=2)
  with pytest.raises(tf.errors.InvalidArgumentError, match='empty image'):
    op(image=np.zeros((0, 4, 3), np.uint8), grid=[0.0, 1.0, 0.0, 1.0],
       height=2, width=2)
  with pytest.raises(tf.errors.InvalidArgumentError, match='finite'):
    op(image=np.zeros((4, 4, 3), np.uint8), grid=[np.nan, 1.0, 0.0, 1.0],
       height=2, width=2)


@needs_compiler
@pytest.mark.parametrize('h,w,fmt', SIZES)
def test_native_and_tf_paths_give_the_same_crops(h, w, fmt):
  """decode_crop_resize with the op and with crop_and_resize: the same
  sampling points and filter, so equal up to float rounding (uint8: a value
  on the edge of .5 may round either way)."""
  data = tf.constant(smooth_jpeg(h, w, fmt, seed=h))
  for oy, ox in [(0, 0), (8, 3), (8, 8)]:
    kw = dict(offsets=tf.constant([oy, ox]), resize_size=64, crop_size=56)
    for as_uint8 in (False, True):
      a, b = (pp.decode_crop_resize(data, as_uint8=as_uint8, resample=r,
                                    **kw).numpy().astype(np.float32)
              for r in ('native', 'tf'))
      if as_uint8:
        assert np.abs(a - b).max() <= 1 and np.mean(a != b) < 1e-3
      else:
        np.testing.assert_allclose(a, b, atol=2e-3)


def _op_types(fn):
  """Op types in fn's traced graph, branch functions included."""
  graph = tf.function(fn).get_concrete_function(
      tf.TensorSpec([], tf.string), tf.TensorSpec([2], tf.int64)
  ).graph.as_graph_def()
  nodes = list(graph.node)
  for f in graph.library.function:
    nodes += f.node_def
  return {n.op for n in nodes}


@needs_compiler
def test_training_pipeline_uses_the_configured_resample():
  """config.data.resample reaches the train augmentation the pipeline
  builds: the op in its graph with 'auto' (a compiler is here), not with
  'tf' (crop_and_resize instead)."""
  config = alexnet.get_config()
  ops = _op_types(ip.train_example_fn(config))
  assert 'AlexnetBilinearResample' in ops
  config.data.resample = 'tf'
  ops = _op_types(ip.train_example_fn(config))
  assert 'AlexnetBilinearResample' not in ops and 'CropAndResize' in ops


def test_unknown_choice_is_refused():
  with pytest.raises(ValueError, match="one of \\('auto', 'native', 'tf'\\)"):
    native.resample_op('fast')


def test_build_failure_falls_back_or_says_what_to_do(monkeypatch, tmp_path):
  """'auto' without a working compiler uses crop_and_resize; 'native' stops
  with a message naming the way out."""
  monkeypatch.setenv('ALEXNET_JAX_CACHE_DIR', str(tmp_path))
  monkeypatch.setenv('CXX', 'false')  # A "compiler" that always fails.
  native.reset()
  try:
    assert native.resample_op('auto') is None
    with pytest.raises(native.BuildError, match='config.data.resample=tf'):
      native.resample_op('native')
    monkeypatch.setenv('CXX', 'no-such-compiler')
    native.reset()
    with pytest.raises(native.BuildError, match='no C\\+\\+ compiler'):
      native.resample_op('native')
    # Nothing half-built is left to be loaded later.
    assert not [n for n in os.listdir(tmp_path) if n.endswith('.so')]
  finally:
    native.reset()


def test_concurrent_builds_compile_once(tmp_path):
  """Processes starting together (one per host, or the tests' launch.py
  runs) build the library once: the others wait for it and load it; a
  later call finds it in the cache."""
  calls = tmp_path / 'calls'
  compiler = tmp_path / 'fake-c++'
  compiler.write_text(textwrap.dedent(f"""\
      #!/bin/sh
      echo x >> {calls}
      sleep 2
      while [ "$1" != "-o" ]; do shift; done
      echo library > "$2"
      """))
  compiler.chmod(0o755)
  code = ('import sys; from alexnet_jax import native; '
          'print(native.build(sys.argv[1], sys.argv[2]))')
  cache = str(tmp_path / 'cache')
  procs = [subprocess.Popen([sys.executable, '-c', code, cache, str(compiler)],
                            stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(__file__)))
           for _ in range(2)]
  paths = {p.communicate(timeout=300)[0].strip().splitlines()[-1]
           for p in procs}
  assert all(p.returncode == 0 for p in procs)
  assert len(paths) == 1
  path = paths.pop()
  assert open(path).read() == 'library\n'
  assert native.build(cache, str(compiler)) == path  # From the cache.
  assert calls.read_text() == 'x\n'  # One compile in all.
