"""The compiled bilinear resample (alexnet_jax/native.py, resample.cc): its
output against numpy, against TensorFlow's crop_and_resize path, and its
build: cached, built once by concurrent processes, clear errors, and the
cache's safety rules (only you or root can change what is loaded)."""
import contextlib
import grp
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
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
  config.data.mean = 'channel'  # No dataset here to take a mean image of.
  ops = _op_types(ip.train_example_fn(config))
  assert 'AlexnetBilinearResample' in ops
  config.data.resample = 'tf'
  ops = _op_types(ip.train_example_fn(config))
  assert 'AlexnetBilinearResample' not in ops and 'CropAndResize' in ops


def test_prepared_copies_never_need_the_op(monkeypatch):
  """A prepared copy's crops are whole-pixel slices: neither the start-up
  check nor the augmentation asks for the op, so it is never built."""
  config = alexnet.get_config()
  config.data.mean = 'channel'
  config.data.prepared_dir = '/nowhere'
  asked = []
  real = native.resample_op
  monkeypatch.setattr(native, 'resample_op',
                      lambda choice: asked.append(choice) or real(choice))
  assert ip.train_resample(config) == 'tf'
  ops = _op_types(ip.train_example_fn(config))
  assert 'AlexnetBilinearResample' not in ops
  assert set(asked) == {'tf'}


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
  assert os.stat(path).st_mode & 0o777 == 0o644  # Not mkstemp's 0600.
  assert native.build(cache, str(compiler)) == path  # From the cache.
  assert calls.read_text() == 'x\n'  # One compile in all.


def _fake_compiler(path):
  """A "compiler" writing `library` as its output: builds cost nothing."""
  path.write_text('#!/bin/sh\nwhile [ "$1" != "-o" ]; do shift; done\n'
                  'echo library > "$2"\n')
  path.chmod(0o755)
  return str(path)


@pytest.fixture(scope='module')
def built_library():
  """The test session's library (tests/conftest.py's cache directory):
  built by the first test needing it, then found in the cache."""
  return native.build()


NO_CXX = 'no-such-compiler'  # Finding the library must not need a compiler.
is_root = pytest.mark.skipif(os.geteuid() != 0,
                             reason='needs root: chown, another user')


@needs_compiler
def test_built_library_is_readable_by_all(built_library):
  assert built_library == native.library_path()
  assert os.stat(built_library).st_mode & 0o777 == 0o644


def test_cache_dir_follows_xdg(monkeypatch, tmp_path):
  """$ALEXNET_JAX_CACHE_DIR, else $XDG_CACHE_HOME/alexnet_jax (if absolute),
  else ~/.cache/alexnet_jax; made 0755 where missing."""
  home = os.path.join(os.path.expanduser('~'), '.cache', 'alexnet_jax')
  monkeypatch.delenv('ALEXNET_JAX_CACHE_DIR')
  monkeypatch.delenv('XDG_CACHE_HOME', raising=False)
  assert native.cache_dir() == home
  monkeypatch.setenv('XDG_CACHE_HOME', 'relative/cache')  # Ignored (spec).
  assert native.cache_dir() == home
  xdg = tmp_path / 'xdg' / 'cache'
  monkeypatch.setenv('XDG_CACHE_HOME', str(xdg))
  assert native.cache_dir() == str(xdg / 'alexnet_jax')
  old = os.umask(0o002)  # Made 0755 all the same (else the check refuses).
  try:
    path = native.build(cxx=_fake_compiler(tmp_path / 'c++'))
  finally:
    os.umask(old)
  assert os.path.dirname(path) == os.path.realpath(xdg / 'alexnet_jax')
  for d in (xdg.parent, xdg, xdg / 'alexnet_jax'):
    assert d.stat().st_mode & 0o777 == 0o755
  monkeypatch.setenv('ALEXNET_JAX_CACHE_DIR', str(tmp_path / 'mine'))
  assert native.cache_dir() == str(tmp_path / 'mine')


def _refused(directory, *words):
  with pytest.raises(native.BuildError) as e:
    native.build(str(directory), NO_CXX)
  for w in words:
    assert w in str(e.value)
  return str(e.value)


def test_unsafe_cache_directories_are_refused(tmp_path):
  """A directory (or one above it, or the library) that others can write is
  never built into or loaded from; the error names it and the fix."""
  cache = tmp_path / 'cache'
  cache.mkdir()
  real = os.path.realpath(cache)
  fix = f'chmod go-w {real}, or point $ALEXNET_JAX_CACHE_DIR'
  for mode in (0o777, 0o757, 0o1777):  # Sticky does not make it safe.
    cache.chmod(mode)
    _refused(cache, f'unsafe cache directory {real}: it is writable by ',
             f'other users (mode {mode:04o})', fix)
  cache.chmod(0o755)
  _refused(cache, 'no C++ compiler')  # Safe: it would build.
  # A directory above it: others could rename it and put theirs in its place.
  parent = tmp_path / 'shared'
  (parent / 'cache').mkdir(parents=True)
  parent.chmod(0o777)
  _refused(parent / 'cache', f'{os.path.realpath(parent)}, above it, is '
           'writable by other users (mode 0777)', 'chmod +t')
  parent.chmod(0o1777)  # Sticky, as /tmp: only owners rename their entries.
  _refused(parent / 'cache', 'no C++ compiler')
  # The library: refused, not loaded.
  path = native.library_path(str(cache), NO_CXX)
  with open(path, 'w') as f:
    f.write('not a library')
  os.chmod(path, 0o646)
  _refused(cache, f'unsafe cached library {path}: it is writable by other '
           'users (mode 0646)', f'chmod go-w {path}')
  assert sorted(os.listdir(cache)) == [os.path.basename(path)]  # No writes.


@is_root
def test_other_users_caches_are_refused(tmp_path):
  """Only you and root are trusted: not another user's directory or library
  (even one only they can write), nor a group with other members."""
  cache = tmp_path / 'cache'
  cache.mkdir(mode=0o755)
  os.chown(cache, 65534, -1)
  _refused(cache, 'it is owned by ', 'uid 65534), not by you or root',
           'ALEXNET_JAX_CACHE_DIR=/opt/alexnet_jax')
  os.chown(cache, 0, 65534)
  cache.chmod(0o775)
  _refused(cache, 'it is writable by its group ', '(mode 0775)')
  os.chown(cache, 0, 0)
  if not grp.getgrgid(0).gr_mem:  # root's private group: only root writes.
    _refused(cache, 'no C++ compiler')
  cache.chmod(0o755)
  path = native.library_path(str(cache), NO_CXX)
  with open(path, 'w') as f:
    f.write('not a library')
  os.chmod(path, 0o644)
  os.chown(path, 65534, 65534)
  _refused(cache, f'unsafe cached library {path}: it is owned by ',
           f'Fix: remove {path}')


@needs_compiler
def test_cached_library_is_loaded_without_writing(built_library, tmp_path):
  """A 0644 library in a 0755 directory (yours or root's) is loaded as it
  is: no compiler, no lock file, nothing written."""
  cache = tmp_path / 'cache'
  cache.mkdir(mode=0o755)
  path = native.library_path(str(cache), NO_CXX)
  shutil.copy(built_library, path)
  os.chmod(path, 0o644)
  before = {n: os.stat(cache / n) for n in os.listdir(cache)}
  assert native.build(str(cache), NO_CXX) == path
  assert {n: os.stat(cache / n) for n in os.listdir(cache)} == before
  # Readable as a library (loading a second copy in this process would
  # register its kernel twice).
  assert open(path, 'rb').read(4) == b'\x7fELF'


@contextlib.contextmanager
def _as_user(uid):
  """This process as user `uid` (root can switch back: saved ids stay 0)."""
  os.setresgid(uid, uid, 0)
  os.setresuid(uid, uid, 0)
  try:
    yield
  finally:
    os.setresuid(0, 0, 0)
    os.setresgid(0, 0, 0)


@is_root
@needs_compiler
def test_another_user_loads_a_root_built_cache(built_library):
  """A second user loads root's library from root's 0755 directory (where
  they can write nothing), is told how to share when it lacks theirs, and
  builds in their own directory past a lock file root left there."""
  shared = tempfile.mkdtemp()  # Under /tmp: reachable by the other user.
  try:
    os.chmod(shared, 0o755)
    path = native.library_path(shared, NO_CXX)
    shutil.copy(built_library, path)
    os.chmod(path, 0o644)
    compiler = _fake_compiler(pathlib.Path(shared, 'c++'))
    with _as_user(65534):
      assert native.build(shared, NO_CXX) == path
      assert open(path, 'rb').read(4) == b'\x7fELF'  # Readable.
      with pytest.raises(native.BuildError) as e:  # Not cached for this one.
        native.build(shared, compiler)
    assert 'has no resample_' in str(e.value)
    assert 'you cannot write there' in str(e.value)
    assert 'ALEXNET_JAX_CACHE_DIR=/opt/alexnet_jax' in str(e.value)
    assert sorted(os.listdir(shared)) == sorted([os.path.basename(path),
                                                 'c++'])
    mine = os.path.join(shared, 'mine')
    os.mkdir(mine, 0o755)
    os.chown(mine, 65534, 65534)
    lock = native.library_path(mine, compiler) + '.lock'
    open(lock, 'w').close()  # root's, 0644: read-only to the other user.
    with _as_user(65534):
      built = native.build(mine, compiler)
    assert os.stat(built).st_uid == 65534
    assert os.stat(built).st_mode & 0o777 == 0o644
  finally:
    shutil.rmtree(shared)


def test_unsafe_cache_falls_back_saying_why(monkeypatch, tmp_path, caplog):
  """'auto' warns with the real reason and its fix (not "install a
  compiler"); 'native' stops with them."""
  cache = tmp_path / 'cache'
  cache.mkdir()
  cache.chmod(0o777)
  monkeypatch.setenv('ALEXNET_JAX_CACHE_DIR', str(cache))
  native.reset()
  try:
    with caplog.at_level(logging.WARNING):
      assert native.resample_op('auto') is None
    warning = caplog.text
    assert 'writable by ' in warning and '(mode 0777)' in warning
    assert f'chmod go-w {os.path.realpath(cache)}' in warning
    assert 'crop_and_resize' in warning and 'compiler' not in warning
    with pytest.raises(native.BuildError) as e:
      native.resample_op('native')
    assert 'chmod go-w' in str(e.value)
    assert 'compiler' not in str(e.value)
    assert '--config.data.resample=tf' in str(e.value)
  finally:
    native.reset()
