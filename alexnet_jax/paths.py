"""The one filesystem layer for a run's files: local paths and gs:// buckets.

Every file a run reads or writes outside TensorFlow's own readers (the
workdir's config.json, metrics.jsonl, figures, reports, sweep records,
checkpoints through orbax) goes through etils `epath`, the layer orbax
itself uses: a local path, or gs://bucket/path through TensorFlow's GCS
filesystem (TensorBoard events, tf.data and tfds read and write gs:// the
same way). Credentials are the platform's usual ones (Application Default
Credentials: the VM's service account, or GOOGLE_APPLICATION_CREDENTIALS).

`check(path, what)` refuses, before anything is written, a path no installed
layer can serve (another scheme such as s3://, or a misspelt gs:/bucket),
so that nothing ever writes a local folder named after a URL.
"""

import importlib.util
import os
import re

from etils import epath

SCHEMES = ('gs',)
_SCHEME = re.compile(r'^([A-Za-z][A-Za-z0-9+.-]*):(/+)(.*)$')


def is_remote(path) -> bool:
  return '://' in str(path)


def absolute(p) -> str:
  """A local path made absolute; a gs:// path unchanged."""
  return str(p) if is_remote(p) else os.path.abspath(p)


def _installed(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:  # A parent package is missing.
    return False


def check(path, what: str) -> str:
  """`path` unchanged if a local path or gs://bucket/...; else a ValueError
  naming `what` (e.g. '--workdir') and the fix."""
  path = str(path)
  m = _SCHEME.match(path)
  if not m or len(m.group(1)) == 1:  # A local path (or a drive letter).
    return path
  scheme, slashes, rest = m.group(1).lower(), m.group(2), m.group(3)
  if scheme in SCHEMES and slashes == '//' and rest:
    if scheme == 'gs':
      if not _installed('google.cloud.storage'):
        raise ValueError(
            f'{what}={path!r}: gs:// needs the google-cloud-storage package '
            '(orbax lists checkpoints with it): pip install -r '
            'requirements.txt.')
    return path
  if scheme in SCHEMES:
    raise ValueError(f'{what}={path!r} is not a bucket path: write '
                     f'{scheme}://<bucket>/<path> (two slashes).')
  raise ValueError(
      f'{what}={path!r}: {scheme}:// is not supported: this project reads and '
      'writes local paths and gs:// buckets (TensorFlow 2.21 has no '
      f'{scheme}:// filesystem). Mount the storage (e.g. with s3fs or '
      'gcsfuse) and give the local path, or use a gs:// bucket.')


# The config fields that name files or folders.
CONFIG_PATHS = ('init_from', 'data.data_dir', 'data.manual_dir',
                'data.folder', 'data.prepared_dir', 'data.mean_image_path')


def check_config(config, workdir=None):
  """check() of the workdir and of every path the config names."""
  if workdir is not None:
    check(workdir, '--workdir')
  for field in CONFIG_PATHS:
    node = config
    for key in field.split('.'):
      node = node.get(key, '') if node is not None else ''
    if node:
      check(node, f'--config.{field}')


def path(p) -> epath.Path:
  return epath.Path(p)


def join(*parts) -> str:
  """os.path.join that keeps gs://."""
  return str(epath.Path(parts[0]).joinpath(*parts[1:]))


def name(p) -> str:
  """The last component of a local or gs:// path (trailing / ignored)."""
  return epath.Path(str(p).rstrip('/')).name


def exists(p) -> bool:
  return epath.Path(p).exists()


def makedirs(p):
  epath.Path(p).mkdir(parents=True, exist_ok=True)


def read_text(p) -> str:
  return epath.Path(p).read_text()


def write_text(p, text: str):
  """Writes `text` whole: a local file through a temporary file and a
  rename; a gs:// object is replaced whole by its upload anyway."""
  target = epath.Path(p)
  if is_remote(target):
    target.write_text(text)
    return
  tmp = target.parent / f'.{target.name}.tmp'
  tmp.write_text(text)
  tmp.replace(target)


def append_text(p, text: str):
  with epath.Path(p).open('a') as f:
    f.write(text)
