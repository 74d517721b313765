"""Downloads of official files that survive a cut connection: a local HTTP server on 127.0.0.1
that drops the first transfer midway, with and without HTTP range requests."""

import hashlib
import http.server
import os
import socket
import threading

import pytest

from mood_jax.data import prepare
from mood_jax.errors import UserError

PAYLOAD = os.urandom(3 << 20)  # three read chunks
MD5 = hashlib.md5(PAYLOAD).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
  """Serves PAYLOAD; the first request is cut off after a third of it. Range requests are
  taken if the server's `ranges` is set."""

  def do_GET(self):  # pylint: disable=invalid-name
    server = self.server
    server.requests.append(self.headers.get('Range'))
    start = 0
    if server.ranges and self.headers.get('Range'):
      start = int(self.headers['Range'].removeprefix('bytes=').rstrip('-'))
      self.send_response(206)
      self.send_header('Content-Range', f'bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}')
    else:
      self.send_response(200)
    body = PAYLOAD[start:]
    self.send_header('Content-Length', str(len(body)))
    self.end_headers()
    if len(server.requests) == 1:  # the cut: a third, then the connection closes
      self.wfile.write(body[:len(PAYLOAD) // 3])
      self.wfile.flush()
      self.connection.shutdown(socket.SHUT_RDWR)
      return
    self.wfile.write(body)

  def log_message(self, *args):
    pass


@pytest.fixture(params=[True, False], ids=['ranges', 'no_ranges'])
def server(request):
  httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _Handler)
  httpd.ranges, httpd.requests = request.param, []
  httpd.timeout = 10
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  yield httpd
  httpd.shutdown()
  httpd.server_close()
  thread.join(timeout=10)


def _url(httpd) -> str:
  return f'http://127.0.0.1:{httpd.server_address[1]}/file.bin'


def test_a_cut_download_resumes_where_the_server_allows_and_starts_over_otherwise(
    server, tmp_path, caplog):
  path = prepare.fetcher(str(tmp_path))('file.bin', _url(server), MD5)
  with open(path, 'rb') as f:
    assert f.read() == PAYLOAD
  assert server.requests[0] is None and len(server.requests) == 2
  assert server.requests[1] == f'bytes={len(PAYLOAD) // 3}-'  # resumed from the part
  assert ('does not resume downloads; starting it over' in caplog.text) != server.ranges
  assert os.listdir(tmp_path) == ['file.bin']


def test_a_download_with_another_md5_is_refused_in_one_line(server, tmp_path):
  with pytest.raises(UserError) as error:
    prepare.fetcher(str(tmp_path))('file.bin', _url(server), '0' * 32)
  line = str(error.value)
  assert line.startswith(f'file.bin downloaded from {_url(server)} has md5 {MD5}, not the '
                         f'{"0" * 32} its publisher gives: refused')
  assert '\n' not in line and os.listdir(tmp_path) == []


def test_a_download_cut_on_every_try_keeps_its_part_for_the_next_run(tmp_path, monkeypatch):
  httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _Handler)
  httpd.ranges, httpd.requests = True, []
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  try:
    monkeypatch.setattr(prepare, '_DOWNLOAD_TRIES', 1)
    with pytest.raises(UserError, match='could not download file.bin .*rerun to resume'):
      prepare.fetcher(str(tmp_path))('file.bin', _url(httpd), MD5)
    assert os.path.getsize(tmp_path / 'file.bin.part') == len(PAYLOAD) // 3
    path = prepare.fetcher(str(tmp_path))('file.bin', _url(httpd), MD5)  # the next run
    assert httpd.requests[-1] == f'bytes={len(PAYLOAD) // 3}-'
    with open(path, 'rb') as f:
      assert f.read() == PAYLOAD
  finally:
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)
