"""The train augmentation's bilinear resample as a compiled TensorFlow op.

TensorFlow's `crop_and_resize` costs nearly as much as decoding the JPEG it
resamples; `resample.cc` does the same bilinear filter at the same sampling
points several times faster, written for this one job: separable, with the
horizontal taps computed once per crop (docs/BENCHMARKS_input.md has the
figures). It is compiled against the installed TensorFlow on first use, with
the C++ compiler named by $CXX (default g++), into a cache directory
($ALEXNET_JAX_CACHE_DIR if set, else $XDG_CACHE_HOME/alexnet_jax, else
~/.cache/alexnet_jax), once per source, TensorFlow and compiler, then loaded
from there. Several processes starting together build it once (a file lock;
the library appears by an atomic rename, never half-written).

A loaded library runs with the rights of the process that loads it, so the
cache is used only if nobody but this user or root can change what is loaded:
the directory, every directory above it and the library must be owned by this
user or root and not writable by their group (unless it is the owner's private
group, as umask 002 systems make) or by others. Directories above may instead
be sticky (as /tmp is: nobody can rename or replace what another user owns in
them), the cache directory itself may not (anyone could add a library to it).
Anything else is refused with a BuildError naming what is wrong and the fix;
with 'auto' below that becomes the fallback warning. Other (non-root) users'
libraries are never trusted; to share one cache between users, root builds
it into a directory only root can write, e.g.
  ALEXNET_JAX_CACHE_DIR=/opt/alexnet_jax python -c \
      'from alexnet_jax import native; native.build()'
The library is written readable by all (0644), and a cached one is checked and
loaded without a lock or any write (except its owner making an old 0600 one
readable), so every user of the same TensorFlow and compiler can load it
from there. New cache directories are made 0755.

config.data.resample picks the implementation:
  'auto'    the compiled op if it builds, else crop_and_resize with a warning
            saying why
  'native'  the compiled op; an error saying why not and what to do otherwise
  'tf'      TensorFlow's crop_and_resize (no compiler needed)
Both give the same crops up to float rounding (tests/test_native.py).
"""

import fcntl
import functools
import grp
import hashlib
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import time

from absl import logging
import tensorflow as tf

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      'resample.cc')
CHOICES = ('auto', 'native', 'tf')
SHARE_HINT = ('to share one cache between users, let root build it in a '
              'directory only root can write, e.g. as root: '
              'ALEXNET_JAX_CACHE_DIR=/opt/alexnet_jax python -c '
              '"from alexnet_jax import native; native.build()"')


class BuildError(RuntimeError):
  """The op cannot be built or loaded; the message says why and what to do."""


def cache_dir():
  """$ALEXNET_JAX_CACHE_DIR, else $XDG_CACHE_HOME/alexnet_jax (when that is
  an absolute path, as the XDG spec requires), else ~/.cache/alexnet_jax."""
  if os.environ.get('ALEXNET_JAX_CACHE_DIR'):
    return os.environ['ALEXNET_JAX_CACHE_DIR']
  xdg = os.environ.get('XDG_CACHE_HOME', '')
  if not os.path.isabs(xdg):
    xdg = os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(xdg, 'alexnet_jax')


def _cxx(cxx=None):
  return cxx or os.environ.get('CXX', 'g++')


def _command(cxx, source, output):
  return ([cxx, '-std=c++17', '-shared', '-fPIC', '-O3', source, '-o', output]
          + tf.sysconfig.get_compile_flags() + tf.sysconfig.get_link_flags())


def library_path(directory=None, cxx=None):
  """Where build(directory, cxx) finds or puts the library: a file named for
  the source, TensorFlow and compiler, in the directory's real path."""
  directory = os.path.realpath(directory or cache_dir())
  cxx = _cxx(cxx)
  with open(SOURCE, 'rb') as f:
    source = f.read()
  key = hashlib.sha256(b'\0'.join(
      [source, tf.__version__.encode(), tf.__file__.encode(), cxx.encode(),
       ' '.join(_command(cxx, '', '')).encode()])).hexdigest()[:16]
  return os.path.join(directory, f'resample_{key}.so')


def _user(uid):
  try:
    return f'{pwd.getpwuid(uid).pw_name} (uid {uid})'
  except KeyError:
    return f'uid {uid}'


def _private_group(st):
  """Whether the group of the file `st` describes has one member, its owner:
  a user private group (as umask 002 systems give), which makes
  group-writable mean writable by the owner alone."""
  try:
    group, owner = grp.getgrgid(st.st_gid), pwd.getpwuid(st.st_uid)
  except KeyError:
    return False
  members = set(group.gr_mem) | (
      {owner.pw_name} if owner.pw_gid == st.st_gid else set())
  return members == {owner.pw_name}


def _group(gid):
  try:
    return grp.getgrgid(gid).gr_name
  except KeyError:
    return f'gid {gid}'


def _problem(st, sticky_ok=False):
  """What lets someone other than this user or root change the file or
  directory `st` describes, or None."""
  if st.st_uid not in (0, os.geteuid()):
    return f'owned by {_user(st.st_uid)}, not by you or root'
  if sticky_ok and st.st_mode & stat.S_ISVTX:
    return None
  who = []
  if st.st_mode & stat.S_IWGRP and not _private_group(st):
    who.append(f'its group {_group(st.st_gid)}')
  if st.st_mode & stat.S_IWOTH:
    who.append('other users')
  if who:
    return (f'writable by {" and ".join(who)} '
            f'(mode {stat.S_IMODE(st.st_mode):04o})')
  return None


def _check_directory(directory):
  """Raises BuildError unless only this user or root can change what the
  directory (a real path) holds: it and each directory above it."""
  parts = directory.split(os.sep)
  for i in range(1, len(parts) + 1):
    path = os.sep.join(parts[:i]) or os.sep
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):  # A symbolic link: it changed under us.
      raise BuildError(f'cache directory {directory}: {path} is no longer a '
                       'directory; try again')
    leaf = path == directory
    problem = _problem(st, sticky_ok=not leaf)
    if problem is None:
      continue
    where = 'it is' if leaf else f'{path}, above it, is'
    if problem.startswith('owned'):
      fix = ('point $ALEXNET_JAX_CACHE_DIR to a directory of yours; '
             + SHARE_HINT)
    else:
      fix = (f'chmod go-w {path}' + ('' if leaf else f' (or chmod +t {path})')
             + ', or point $ALEXNET_JAX_CACHE_DIR to a directory only you '
             'can write')
    raise BuildError(
        f'unsafe cache directory {directory}: {where} {problem}, so another '
        f'user could replace the library loaded from it. Fix: {fix}.')


def _check_library(path):
  """Raises BuildError unless only this user or root can change the library
  and this user can read it."""
  st = os.stat(path)
  problem = 'not a regular file' if not stat.S_ISREG(st.st_mode) else (
      _problem(st))
  if problem is not None:
    fix = (f'chmod go-w {path}' if problem.startswith('writable') else
           f'remove {path} (it is rebuilt on next use)')
    raise BuildError(f'unsafe cached library {path}: it is {problem}, so '
                     'another user could replace what is loaded. Fix: '
                     f'{fix}.')
  if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) & 0o044 != 0o044:
    try:  # Made by an earlier version (0600): let other users read it.
      os.chmod(path, 0o644)
    except OSError:
      pass
  if not os.access(path, os.R_OK, effective_ids=True):
    raise BuildError(
        f'cached library {path} is not readable by you (mode '
        f'{stat.S_IMODE(st.st_mode):04o}). Fix: its owner, '
        f'{_user(st.st_uid)}, can chmod 644 it.')


def _open_lock(path):
  """A file descriptor to flock: the lock file may belong to another user
  (root) and then be read-only to us, which flock does not mind."""
  try:
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except PermissionError:
    return os.open(path, os.O_RDONLY)


def _makedirs(directory):
  """os.makedirs, with 0755 (less the umask) for the directories above too,
  which the safety check covers as well."""
  parent = os.path.dirname(directory)
  if parent != directory and not os.path.isdir(parent):
    _makedirs(parent)
  try:
    os.mkdir(directory, 0o755)
  except FileExistsError:
    pass


def build(directory=None, cxx=None):
  """Path of the compiled op library, building it if the cache lacks it.

  `directory` defaults to cache_dir(), `cxx` to $CXX or g++. Raises
  BuildError (saying why, with the compiler's output if it failed, and what
  to do) if it cannot be built or the cache is unsafe (the module docstring).
  A cached library is checked and returned without writing anything (but
  its owner makes one that earlier versions wrote 0600 readable by all).
  """
  cxx = _cxx(cxx)
  path = library_path(directory, cxx)
  directory = os.path.dirname(path)
  if os.path.isdir(directory):
    _check_directory(directory)
    if os.path.exists(path):
      _check_library(path)
      return path
  if shutil.which(cxx) is None:
    raise BuildError(f'no C++ compiler {cxx!r} on PATH. Fix: install one '
                     '(e.g. g++) or set $CXX to one.')
  try:
    _makedirs(directory)
  except OSError as e:
    raise BuildError(f'cannot create the cache directory {directory} ({e}). '
                     'Fix: point $ALEXNET_JAX_CACHE_DIR to a directory you '
                     'can write.') from e
  _check_directory(directory)  # Made by us, or by someone meanwhile.
  if not os.access(directory, os.W_OK | os.X_OK, effective_ids=True):
    raise BuildError(
        f'cache directory {directory} has no {os.path.basename(path)} (this '
        'TensorFlow and compiler) and you cannot write there to build it. '
        f'Fix: point $ALEXNET_JAX_CACHE_DIR to a directory of yours; '
        + SHARE_HINT + '.')
  lock = _open_lock(path + '.lock')
  try:
    fcntl.flock(lock, fcntl.LOCK_EX)  # Another process may be building it.
    if os.path.exists(path):
      _check_library(path)
      return path
    _compile(cxx, path)
  finally:
    os.close(lock)
  return path


def _compile(cxx, path):
  start = time.perf_counter()
  fd, tmp = tempfile.mkstemp(suffix='.so', dir=os.path.dirname(path))
  os.close(fd)
  try:
    try:
      result = subprocess.run(_command(cxx, SOURCE, tmp),
                              capture_output=True, text=True, timeout=600,
                              check=False)
    except subprocess.TimeoutExpired as e:
      raise BuildError(f'{cxx} took over {e.timeout:.0f} s to compile '
                       f'{SOURCE}. Fix: set $CXX to a faster compiler or '
                       'check this machine\'s load.') from e
    if result.returncode:
      raise BuildError(f'{cxx} failed (exit {result.returncode}) to compile '
                       f'{SOURCE}. Fix: set $CXX to a working C++17 compiler '
                       f'for these TensorFlow headers. Its output:\n'
                       f'{result.stderr[-4000:]}')
    # mkstemp made it 0600 (and a linker may have remade it): readable by
    # all, so other users of a shared cache can load it.
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)  # Atomic: a reader never sees half a file.
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  logging.info('Built the native resample op in %.0f s: %s',
               time.perf_counter() - start, path)


def reset():
  """Forgets this process's build or load of the op (and its failure): the
  next use tries again, e.g. after $CXX or the cache directory changed."""
  _load.cache_clear()


# The op's function from the first library loaded. TensorFlow registers an
# op once a process, and loading a second copy of the library (another cache
# directory, after reset()) would register its kernel twice, which breaks
# every later use of the op: a process loads one copy, at most.
_registered = {}


@functools.cache
def _load():
  """(the op, None) or (None, why not): built and loaded once a process."""
  try:
    path = build()
  except BuildError as e:
    return None, e
  except OSError as e:
    return None, BuildError(f'cannot use the cache directory {cache_dir()} '
                            f'({e})')
  if 'op' in _registered:
    return _registered['op'], None
  try:
    module = tf.load_op_library(path)
  except (tf.errors.OpError, OSError) as e:
    return None, BuildError(f'cannot load {path} ({e}). Fix: remove it (it '
                            'is rebuilt on next use).')
  op = getattr(module, 'alexnet_bilinear_resample', None)
  if op is None:
    return None, BuildError(f'{path} has no AlexnetBilinearResample op. Fix: '
                            'remove it (it is rebuilt on next use).')
  _registered['op'] = op
  return op, None


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
          f'config.data.resample=native: the native resample op is not '
          f'available: {error}\nOr set --config.data.resample=tf '
          '(TensorFlow\'s crop_and_resize: the same crops, slower).'
      ) from error
    _warn_once(str(error))
  return op


@functools.cache
def _warn_once(reason):
  logging.warning('The native resample op is not available: %s\nUsing '
                  'TensorFlow\'s crop_and_resize instead (the same crops, '
                  'slower augmentation); --config.data.resample=tf '
                  'silences this.', reason)
