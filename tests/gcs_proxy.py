#!/usr/bin/env python3
"""Lets TensorFlow's GCS filesystem reach a local GCS emulator, for tests.

Why it exists
-------------
TensorFlow's own GCS filesystem (used by tf.io.gfile, and so by etils epath's
default backend, tf.summary and clu's metric writers, tf.data and tfds) has
its endpoints hard-coded: https://www.googleapis.com/storage/v1/ and
https://www.googleapis.com/upload/storage/v1/ for the JSON API and
https://storage.googleapis.com/<bucket>/<object> for reads. TF 2.21 has no
setting for another endpoint (it ignores STORAGE_EMULATOR_HOST, and the
tensorflow-io GCS plugin that honoured CLOUD_STORAGE_EMULATOR_ENDPOINT no
longer loads). What TF does honour are libcurl's `https_proxy`/`http_proxy`
and TF's `CURL_CA_BUNDLE`.

So, configured as the client's HTTP(S) proxy, this script:
- answers `CONNECT www.googleapis.com:443` (and storage.googleapis.com) and
  terminates the TLS itself, with a certificate for those hosts signed by a
  throwaway CA made here with `cryptography` (the client trusts it through
  CURL_CA_BUNDLE=<ca_dir>/ca.pem);
- forwards the decrypted HTTP/1.1 requests, unchanged, Host header included,
  as plain HTTP to the emulator (fake-gcs-server -scheme http);
- also accepts plain-HTTP proxy requests (`GET http://www.googleapis.com/...`):
  fake-gcs-server builds the `Location` of a resumable upload from the Host
  header and its own scheme, i.e. http://www.googleapis.com/upload/..., which
  the client then sends through `http_proxy`;
- smooths over two gaps of fake-gcs-server: it drops `Transfer-Encoding:
  identity` (TF sends it on empty-body POST/PUT; Go's net/http answers 501),
  and answers `GET /storage/v1/b/<bucket>/storageLayout`, which TF (>= 2.19)
  calls before renaming a directory and fake-gcs-server does not implement;
- answers `Expect: 100-continue` itself, and, should the emulator be gone,
  answers 412 rather than 502: TF retries 5xx for minutes, but fails at once
  (FailedPreconditionError, with the proxy's message) on a 412.

Every other host is refused (403), and nothing is ever forwarded anywhere but
the emulator: through this proxy nothing can reach the real Google Cloud.
This is configuration of a real client (TF's C++ GCS filesystem and libcurl)
against a real implementation of the GCS JSON API, not a mock.

It runs as its own process, not as a thread of the test process: TF's file
writers (TFRecordWriter, the summary writer) hold the GIL while they do I/O,
so a proxy thread in the same interpreter could not answer them (deadlock).

Usage
-----
  python tests/gcs_proxy.py --emulator=http://127.0.0.1:M --ca_dir=DIR [--port=N]

--port=0 (the default) lets the OS choose a free port. When it listens, it
writes DIR/ca.pem (the CA certificate for CURL_CA_BUNDLE) and then, last and
atomically, DIR/ready.json {"port", "url", "ca_file", "pid"}, and prints the
same JSON as one line on stdout. It runs until SIGTERM/SIGINT. Its log
(stderr) has a line for every refused request and failed TLS handshake, and
with --verbose for every request.

The client environment (tests/gcs_emulator.py sets it):
  https_proxy=http_proxy=HTTPS_PROXY=HTTP_PROXY=http://127.0.0.1:<port>
  CURL_CA_BUNDLE=DIR/ca.pem
  no_proxy=NO_PROXY=127.0.0.1,localhost   (direct clients still go straight
                                           to the emulator)

Design: a thread per client connection, which reads one request at a time,
streams its body to the emulator and the response back (Content-Length,
chunked or until-close bodies, so uploads and downloads of any size are never
held in memory), and keeps both connections alive between requests (HTTP/1.1
keep-alive). One thread both reads and writes a connection, so the TLS socket
is never used by two threads at once. Every socket has a timeout, so a stuck
peer ends its connection instead of hanging the proxy.
"""

import argparse
import datetime
import http.client
import json
import os
import re
import select
import signal
import socket
import socketserver
import ssl
import sys
import threading
import time
import traceback
import urllib.parse

# The hosts TF's GCS filesystem talks to. Requests for any other host are
# refused.
GCS_HOSTS = ('www.googleapis.com', 'storage.googleapis.com')

_MAX_LINE = 64 * 1024  # Longest request/status/header line accepted.
_MAX_HEADERS = 256
_CHUNK = 256 * 1024  # Bytes copied per read when streaming a body.
# buckets.getStorageLayout, which fake-gcs-server lacks.
_STORAGE_LAYOUT = re.compile(rb'/storage/v1/b/([^/]+)/storageLayout')


# --------------------------------------------------------------- certificates
def make_certificates(ca_dir, hosts):
  """Writes a throwaway CA and a server certificate for `hosts` to `ca_dir`.

  Returns (ca_file, server_cert_file, server_key_file). The keys exist only in
  `ca_dir` (the CA's private key is not even written), are valid for a week,
  and are trusted only by clients told so through CURL_CA_BUNDLE.
  """
  # Imported here so that `--help` works without `cryptography`.
  # pylint: disable=g-import-not-at-top
  from cryptography import x509
  from cryptography.hazmat.primitives import hashes
  from cryptography.hazmat.primitives import serialization
  from cryptography.hazmat.primitives.asymmetric import ec
  from cryptography.x509.oid import ExtendedKeyUsageOID
  from cryptography.x509.oid import NameOID
  # pylint: enable=g-import-not-at-top

  now = datetime.datetime.now(datetime.timezone.utc)
  not_before = now - datetime.timedelta(hours=1)  # Tolerate clock skew.
  not_after = now + datetime.timedelta(days=7)

  ca_key = ec.generate_private_key(ec.SECP256R1())
  ca_name = x509.Name([x509.NameAttribute(
      NameOID.COMMON_NAME, 'alexnet_jax tests: GCS emulator proxy CA')])
  ca_cert = (
      x509.CertificateBuilder()
      .subject_name(ca_name).issuer_name(ca_name)
      .public_key(ca_key.public_key())
      .serial_number(x509.random_serial_number())
      .not_valid_before(not_before).not_valid_after(not_after)
      .add_extension(x509.BasicConstraints(ca=True, path_length=0),
                     critical=True)
      .add_extension(x509.KeyUsage(
          digital_signature=True, content_commitment=False,
          key_encipherment=False, data_encipherment=False,
          key_agreement=False, key_cert_sign=True, crl_sign=True,
          encipher_only=False, decipher_only=False), critical=True)
      .add_extension(x509.SubjectKeyIdentifier.from_public_key(
          ca_key.public_key()), critical=False)
      .sign(ca_key, hashes.SHA256()))

  key = ec.generate_private_key(ec.SECP256R1())
  cert = (
      x509.CertificateBuilder()
      .subject_name(x509.Name([
          x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
      .issuer_name(ca_name)
      .public_key(key.public_key())
      .serial_number(x509.random_serial_number())
      .not_valid_before(not_before).not_valid_after(not_after)
      .add_extension(x509.SubjectAlternativeName(
          [x509.DNSName(h) for h in hosts]), critical=False)
      .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                     critical=True)
      .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                     critical=False)
      .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
          ca_key.public_key()), critical=False)
      .sign(ca_key, hashes.SHA256()))

  os.makedirs(ca_dir, exist_ok=True)
  files = [os.path.join(ca_dir, n)
           for n in ('ca.pem', 'server.pem', 'server.key')]
  contents = [
      ca_cert.public_bytes(serialization.Encoding.PEM),
      cert.public_bytes(serialization.Encoding.PEM),
      key.private_bytes(serialization.Encoding.PEM,
                        serialization.PrivateFormat.PKCS8,
                        serialization.NoEncryption())]
  for path, data in zip(files, contents):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
  return tuple(files)


# ------------------------------------------------------------ HTTP/1.1 parts
class ProtocolError(Exception):
  """A malformed or unexpected message; the connection is closed."""


def _read_head(rfile):
  """Reads a message's start line and headers.

  Returns (start_line, [(name, value), ...]) as bytes, or None at a clean
  end of stream before a new message.
  """
  start = None
  headers = []
  while True:
    line = rfile.readline(_MAX_LINE + 1)
    if not line:
      if start is None:
        return None
      raise ProtocolError('connection closed inside a message head')
    if len(line) > _MAX_LINE:
      raise ProtocolError('line too long')
    line = line.rstrip(b'\r\n')
    if start is None:
      if line:  # Empty lines before a request are allowed (RFC 9112 2.2).
        start = line
      continue
    if not line:
      return start, headers
    if line[:1] in (b' ', b'\t'):
      raise ProtocolError('obsolete header line folding')
    name, sep, value = line.partition(b':')
    if not sep:
      raise ProtocolError(f'bad header line {line[:100]!r}')
    headers.append((name.strip(), value.strip()))
    if len(headers) > _MAX_HEADERS:
      raise ProtocolError('too many headers')


def _header(headers, name):
  """The last value of header `name` (bytes, case-insensitive) or None."""
  value = None
  for k, v in headers:
    if k.lower() == name:
      value = v
  return value


def _tokens(headers, name):
  """The comma-separated tokens of all `name` headers, lower-cased."""
  out = []
  for k, v in headers:
    if k.lower() == name:
      out += [t.strip().lower() for t in v.split(b',') if t.strip()]
  return out


def _format_head(start, headers):
  return b''.join([start, b'\r\n'] +
                  [k + b': ' + v + b'\r\n' for k, v in headers] + [b'\r\n'])


def _copy_exact(rfile, dst, n):
  while n > 0:
    data = rfile.read(min(n, _CHUNK))
    if not data:
      raise ProtocolError(f'connection closed with {n} body bytes missing')
    dst.sendall(data)
    n -= len(data)


def _copy_chunked(rfile, dst):
  """Copies a chunked body (chunks, last chunk, trailers) unchanged."""
  while True:
    line = rfile.readline(_MAX_LINE + 1)
    if not line.endswith(b'\n') or len(line) > _MAX_LINE:
      raise ProtocolError('bad chunk-size line')
    dst.sendall(line)
    try:
      size = int(line.split(b';', 1)[0].strip(), 16)
    except ValueError:
      raise ProtocolError(f'bad chunk size {line[:100]!r}') from None
    if size == 0:
      break
    _copy_exact(rfile, dst, size + 2)  # The data and its CRLF.
  while True:  # Trailer section, up to the empty line.
    line = rfile.readline(_MAX_LINE + 1)
    if not line.endswith(b'\n') or len(line) > _MAX_LINE:
      raise ProtocolError('bad trailer line')
    dst.sendall(line)
    if line in (b'\r\n', b'\n'):
      return


def _copy_until_eof(rfile, dst):
  while True:
    data = rfile.read1(_CHUNK)
    if not data:
      return
    dst.sendall(data)


def _body_framing(headers):
  """('chunked'|'length'|None, length) of a message's body from its headers."""
  codings = _tokens(headers, b'transfer-encoding')
  if codings:
    if codings[-1] != b'chunked':
      return None, 0
    return 'chunked', 0
  length = _header(headers, b'content-length')
  if length is not None:
    try:
      n = int(length)
    except ValueError:
      raise ProtocolError(f'bad Content-Length {length!r}') from None
    if n < 0:
      raise ProtocolError(f'bad Content-Length {length!r}')
    return 'length', n
  return None, 0


def _simple_response(status, reason, body=b'', content_type=b'text/plain',
                     close=False):
  headers = [(b'Content-Type', content_type),
             (b'Content-Length', str(len(body)).encode())]
  if close:
    headers.append((b'Connection', b'close'))
  return _format_head(b'HTTP/1.1 %d %s' % (status, reason), headers) + body


# --------------------------------------------------------------------- proxy
class _Upstream:
  """One keep-alive connection to the emulator, reopened when needed."""

  def __init__(self, address, timeout):
    self.address = address
    self.timeout = timeout
    self.sock = None
    self.rfile = None

  def get(self):
    if self.sock is not None:
      # An idle keep-alive connection that is readable has been closed by
      # the emulator (or holds garbage): don't send a request on it.
      try:
        readable, _, _ = select.select([self.sock], [], [], 0)
      except (OSError, ValueError):
        readable = True
      if readable:
        self.close()
    if self.sock is None:
      self.sock = socket.create_connection(self.address, timeout=self.timeout)
      self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
      self.rfile = self.sock.makefile('rb', buffering=_CHUNK)
    return self.sock, self.rfile

  def close(self):
    for f in (self.rfile, self.sock):
      if f is not None:
        try:
          f.close()
        except OSError:
          pass
    self.sock = self.rfile = None


class _Handler(socketserver.BaseRequestHandler):
  """One client connection: CONNECT + TLS, then requests, until closed."""

  server: '_ProxyServer'

  def handle(self):
    sock = self.request
    sock.settimeout(self.server.timeout_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    upstream = _Upstream(self.server.emulator, self.server.timeout_s)
    tunnel_host = None
    try:
      rfile = sock.makefile('rb', buffering=_CHUNK)
      head = _read_head(rfile)
      if head is None:
        return
      start, _ = head
      if start.startswith(b'CONNECT '):
        parts = start.split(b' ')
        if len(parts) != 3:
          raise ProtocolError(f'bad request line {start[:100]!r}')
        authority = parts[1].decode('latin-1')
        host, _, port = authority.rpartition(':')
        if host.lower() not in self.server.hosts or port != '443':
          self._refuse(sock, f'CONNECT {authority}')
          return
        sock.sendall(b'HTTP/1.1 200 Connection established\r\n\r\n')
        # The client sends nothing more before it has read the 200, so the
        # plain-text reader holds no bytes of the TLS handshake.
        rfile.close()
        try:
          sock = self.server.tls.wrap_socket(sock, server_side=True)
        except (ssl.SSLError, OSError) as e:
          self.server.log(
              f'TLS handshake with a client failed for {host} ({e}): does '
              'it trust the CA (CURL_CA_BUNDLE)?')
          return
        tunnel_host = host.lower()
        rfile = sock.makefile('rb', buffering=_CHUNK)
        head = _read_head(rfile)
      while head is not None:
        if not self._exchange(sock, rfile, head, upstream, tunnel_host):
          break
        head = _read_head(rfile)
    except (ProtocolError, OSError) as e:  # OSError: also SSL errors,
      # timeouts and clients that hang up. Ends this connection only.
      if self.server.verbose:
        self.server.log(f'connection ended: {type(e).__name__}: {e}')
    except Exception:  # pylint: disable=broad-except
      # A bug here: say so, and end only this connection.
      self.server.log('internal error:\n' + traceback.format_exc())
    finally:
      upstream.close()
      try:
        sock.close()
      except OSError:
        pass

  def _refuse(self, sock, what):
    self.server.log(f'REFUSED {what}: not a GCS host this proxy serves')
    try:
      sock.sendall(_simple_response(
          403, b'Forbidden',
          b'gcs_proxy.py only serves the GCS emulator for '
          + ', '.join(sorted(self.server.hosts)).encode() + b'\n',
          close=True))
    except OSError:
      pass

  def _exchange(self, sock, rfile, head, upstream, tunnel_host):
    """Relays one request and its response. Returns False to close."""
    start, headers = head
    try:
      method, target, version = start.split(b' ')
    except ValueError:
      raise ProtocolError(f'bad request line {start[:100]!r}') from None
    if not version.startswith(b'HTTP/1.'):
      raise ProtocolError(f'unsupported {version[:20]!r}')

    if target.lower().startswith((b'http://', b'https://')):
      # Absolute form, from a plain-HTTP proxy request (e.g. the
      # http://www.googleapis.com/upload/... Location of a resumable upload).
      url = urllib.parse.urlsplit(target.decode('latin-1'))
      if (url.hostname or '').lower() not in self.server.hosts:
        self._refuse(sock, f'{method.decode("latin-1")} '
                     f'{target[:200].decode("latin-1")}')
        return False
      target = (url.path or '/').encode('latin-1')
      if url.query:
        target += b'?' + url.query.encode('latin-1')
      if _header(headers, b'host') is None:
        headers.append((b'Host', url.netloc.encode('latin-1')))
    elif tunnel_host is None:
      self._refuse(sock, f'{method.decode("latin-1")} '
                   f'{target[:200].decode("latin-1")} (not a proxy request)')
      return False

    keep_alive = (version == b'HTTP/1.1' and
                  b'close' not in _tokens(headers, b'connection'))
    expects_continue = b'100-continue' in _tokens(headers, b'expect')
    forwarded = []
    for k, v in headers:
      kl = k.lower()
      # fake-gcs-server (Go net/http) rejects "Transfer-Encoding: identity",
      # which TF's libcurl sends with empty POST/PUT bodies; it means "no
      # transfer coding", so dropping it changes nothing.
      if kl == b'transfer-encoding' and v.strip().lower() == b'identity':
        continue
      # Headers for this proxy, not for the server. "Expect: 100-continue" is
      # answered here (below), so the emulator never waits for it.
      if kl in (b'proxy-connection', b'proxy-authorization', b'expect'):
        continue
      forwarded.append((k, v))
    framing, length = _body_framing(forwarded)
    if framing is None and _tokens(forwarded, b'transfer-encoding'):
      raise ProtocolError('request with a transfer coding other than chunked')

    if self.server.verbose:
      self.server.log(f'{method.decode("latin-1")} '
                      f'{_header(headers, b"host")!r} '
                      f'{target[:200].decode("latin-1")}')

    layout = _STORAGE_LAYOUT.fullmatch(target.split(b'?', 1)[0])
    if method == b'GET' and layout:
      self._skip_body(rfile, framing, length)
      sock.sendall(self._storage_layout(layout.group(1), keep_alive))
      return keep_alive

    if expects_continue and (framing == 'chunked' or length > 0):
      sock.sendall(b'HTTP/1.1 100 Continue\r\n\r\n')

    try:
      usock, ufile = upstream.get()
      usock.sendall(_format_head(b' '.join([method, target, version]),
                                 forwarded))
    except OSError as e:
      upstream.close()
      self.server.log(f'emulator unreachable: {e}')
      # Not 502: TF retries 5xx for minutes (10 tries, backoff to 32 s),
      # while an emulator that is gone stays gone. TF gives up at once on a
      # 412 (FailedPreconditionError), with this message.
      sock.sendall(_simple_response(
          412, b'Precondition Failed',
          f'gcs_proxy.py: the GCS emulator is unreachable ({e})\n'.encode(),
          close=True))
      return False
    if framing == 'chunked':
      _copy_chunked(rfile, usock)
    elif framing == 'length':
      _copy_exact(rfile, usock, length)

    while True:
      response = _read_head(ufile)
      if response is None:
        raise ProtocolError('the emulator closed the connection')
      status_line, rheaders = response
      try:
        status = int(status_line.split(b' ', 2)[1])
      except (IndexError, ValueError):
        raise ProtocolError(f'bad status line {status_line[:100]!r}') from None
      sock.sendall(_format_head(status_line, rheaders))
      if 100 <= status < 200 and status != 101:
        continue  # Interim response; the final one follows.
      break
    upstream_keeps = b'close' not in _tokens(rheaders, b'connection')
    if method == b'HEAD' or status in (101, 204, 304):
      pass
    else:
      rframing, rlength = _body_framing(rheaders)
      if rframing == 'chunked':
        _copy_chunked(ufile, sock)
      elif rframing == 'length':
        _copy_exact(ufile, sock, rlength)
      else:  # Delimited by the end of the connection.
        _copy_until_eof(ufile, sock)
        upstream_keeps = False
        keep_alive = False
    if not upstream_keeps:
      upstream.close()
      keep_alive = False  # The client was told "Connection: close" too.
    return keep_alive

  @staticmethod
  def _skip_body(rfile, framing, length):
    class _Null:
      def sendall(self, data):
        del data
    if framing == 'chunked':
      _copy_chunked(rfile, _Null())
    elif framing == 'length':
      _copy_exact(rfile, _Null(), length)

  def _storage_layout(self, bucket, keep_alive):
    """The response to buckets.getStorageLayout, which fake-gcs-server lacks.

    It reports what the emulator has: a flat namespace (no hierarchical
    namespace), in the bucket's location; a missing bucket gets the
    emulator's own 404.
    """
    bucket = bucket.decode('latin-1')
    conn = http.client.HTTPConnection(*self.server.emulator,
                                      timeout=self.server.timeout_s)
    try:
      conn.request('GET', '/storage/v1/b/' + bucket)
      reply = conn.getresponse()
      body = reply.read()
      status, reason = reply.status, reply.reason
    finally:
      conn.close()
    if status == 200:
      info = json.loads(body)
      body = json.dumps({
          'kind': 'storage#storageLayout',
          'bucket': urllib.parse.unquote(bucket),
          'location': info.get('location', 'US-CENTRAL1'),
          'locationType': info.get('locationType', 'region'),
          'hierarchicalNamespace': {'enabled': False},
      }).encode()
    return _simple_response(status, reason.encode('latin-1'), body,
                            content_type=b'application/json',
                            close=not keep_alive)


class _ProxyServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
  daemon_threads = True  # Open connections don't keep the process alive.
  allow_reuse_address = True
  request_queue_size = 128

  def __init__(self, port, emulator, tls, hosts, timeout_s, verbose):
    super().__init__(('127.0.0.1', port), _Handler)
    self.emulator = emulator
    self.tls = tls
    self.hosts = frozenset(h.lower() for h in hosts)
    self.timeout_s = timeout_s
    self.verbose = verbose
    self._log_lock = threading.Lock()

  def log(self, message):
    with self._log_lock:
      print(f'gcs_proxy {time.strftime("%H:%M:%S")} {message}',
            file=sys.stderr, flush=True)

  def handle_error(self, request, client_address):
    # Errors are handled per connection; don't print tracebacks for clients
    # that went away.
    if self.verbose:
      super().handle_error(request, client_address)


def _parse_emulator(url):
  u = urllib.parse.urlsplit(url if '://' in url else 'http://' + url)
  if u.scheme != 'http' or not u.hostname or not u.port:
    raise SystemExit(f'--emulator must be http://HOST:PORT, got {url!r}')
  return u.hostname, u.port


def main(argv=None):
  parser = argparse.ArgumentParser(
      description=__doc__.split('\n\n', 1)[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--port', type=int, default=0,
                      help='port on 127.0.0.1 to listen on (0: any free one)')
  parser.add_argument('--emulator', required=True,
                      help='the emulator, e.g. http://127.0.0.1:4443')
  parser.add_argument('--ca_dir', required=True,
                      help='where to write ca.pem, the server certificate '
                      'and key, and ready.json')
  parser.add_argument('--timeout', type=float, default=300.0,
                      help='seconds a connection may be idle or stalled')
  parser.add_argument('--verbose', action='store_true',
                      help='log every request to stderr')
  args = parser.parse_args(argv)

  emulator = _parse_emulator(args.emulator)
  hosts = list(GCS_HOSTS)
  ready_file = os.path.join(args.ca_dir, 'ready.json')
  if os.path.exists(ready_file):  # From an earlier run.
    os.remove(ready_file)
  ca_file, cert_file, key_file = make_certificates(args.ca_dir, hosts)
  tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
  tls.load_cert_chain(cert_file, key_file)
  # HTTP/1.1 only: an HTTP/2-only client (e.g. gRPC) fails at once instead
  # of waiting for frames this proxy does not speak.
  tls.set_alpn_protocols(['http/1.1'])

  server = _ProxyServer(args.port, emulator, tls, hosts, args.timeout,
                        args.verbose)

  def _stop(signum, frame):
    del frame
    raise SystemExit(128 + signum)
  signal.signal(signal.SIGTERM, _stop)
  signal.signal(signal.SIGINT, _stop)

  port = server.server_address[1]
  ready = {'port': port, 'url': f'http://127.0.0.1:{port}',
           'ca_file': os.path.abspath(ca_file), 'pid': os.getpid()}
  with open(ready_file + '.tmp', 'w') as f:
    json.dump(ready, f)
  os.replace(ready_file + '.tmp', ready_file)  # Appears complete or not at all.
  print(json.dumps(ready), flush=True)
  server.log(f'listening on {ready["url"]}, forwarding {", ".join(hosts)} '
             f'to http://{emulator[0]}:{emulator[1]}')
  try:
    server.serve_forever(poll_interval=0.5)
  except SystemExit:
    pass
  finally:
    server.server_close()


if __name__ == '__main__':
  main()
