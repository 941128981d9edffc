"""The daemon's HTTP server against clients that misbehave: each gets a clear status, and the server
keeps answering everyone else (issue 12, item 6). A real Unix socket, raw bytes on the wire."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest

from daemon import http
from daemon.http import Response, Router, Server


@pytest.fixture
def server(tmp_path, monkeypatch):
    monkeypatch.setattr(http, "READ_S", 0.5)
    router = Router()

    async def ok(req):
        return Response(body={"ok": True})

    router.add("GET", "/health", ok)
    router.add("POST", "/echo", ok)
    srv = Server(router, lambda peer: True, max_connections=4)
    path = str(tmp_path / "s.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(http.BACKLOG)
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    def run():
        asyncio.set_event_loop(loop)
        loop.run_until_complete(srv.serve(sock))
        ready.set()
        loop.run_forever()
        pending = asyncio.all_tasks(loop)  # connections still open at teardown: end them quietly
        for task in pending:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert ready.wait(5)
    yield srv, path
    loop.call_soon_threadsafe(loop.stop)
    t.join(5)
    sock.close()


def _send(path: str, raw: bytes, timeout: float = 5.0) -> bytes:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    try:
        s.sendall(raw)
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return out
            out += chunk
    finally:
        s.close()


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer else 0


def _healthy(path: str) -> bool:
    return _status(_send(path, b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n")) == 200


@pytest.mark.parametrize("raw, status", [
    (b"GET /health HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(200)) + b"\r\n", 431),
    (b"GET /health HTTP/1.1\r\nX-Big: " + b"a" * 60000 + b"\r\nX-More: " + b"b" * 10000 + b"\r\n\r\n", 431),
    (b"POST /echo HTTP/1.1\r\nContent-Length: lots\r\n\r\n", 400),
    (b"POST /echo HTTP/1.1\r\nContent-Length: -5\r\n\r\n", 400),
    (b"POST /echo HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n", 413),
    (b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 501),
    (b"NONSENSE\r\n\r\n", 400),
])
def test_malformed_requests_get_a_clear_status_and_the_server_keeps_serving(server, raw, status):
    _, path = server
    assert _status(_send(path, raw)) == status
    assert _healthy(path)


def test_a_body_shorter_than_promised_does_not_hold_the_connection(server):
    """It once held a connection (and a file descriptor) forever."""
    srv, path = server
    t0 = time.monotonic()
    answer = _send(path, b"POST /echo HTTP/1.1\r\nContent-Length: 100\r\n\r\nshort", timeout=10)
    assert answer == b"" and time.monotonic() - t0 < 5  # closed after READ_S (0.5 s here)
    deadline = time.monotonic() + 5
    while srv.connections and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.connections == 0


def test_connections_over_the_cap_get_503_and_the_rest_are_served(server):
    srv, path = server
    idle = []
    for _ in range(4):  # the cap: four kept-alive connections that send nothing
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        idle.append(s)
    deadline = time.monotonic() + 5
    while srv.connections < 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    answer = _send(path, b"GET /health HTTP/1.1\r\n\r\n")
    assert _status(answer) == 503 and b"too many connections" in answer and srv.refused == 1
    for s in idle:
        s.close()
    deadline = time.monotonic() + 5
    while srv.connections and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _healthy(path)


def test_the_cli_client_waits_out_the_connection_cap(server):
    """A 503 with Retry-After is the cap talking: the client backs off and retries instead of failing."""
    from edgezo.client import Client

    srv, path = server
    idle = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(4)]
    for s in idle:
        s.connect(path)
    deadline = time.monotonic() + 5
    while srv.connections < 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    threading.Timer(0.5, lambda: [s.close() for s in idle]).start()
    assert Client(path, timeout=10).request("GET", "/health") == {"ok": True}
    assert srv.refused >= 1
