"""The torch-free socket client and the CLI's client commands."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgezo import client
from edgezo.client import Client, DaemonNotRunning, discover_socket


def test_discovery_order(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.delenv("EDGEZO_SOCKET", raising=False)
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    assert discover_socket("/x/explicit.sock") == Path("/x/explicit.sock")
    monkeypatch.setenv("EDGEZO_SOCKET", "/x/env.sock")
    assert discover_socket(None) == Path("/x/env.sock")
    monkeypatch.delenv("EDGEZO_SOCKET")
    user = tmp_path / "edgezo" / "edgezo.sock"
    monkeypatch.setattr(client, "SYSTEM_SOCKET", tmp_path / "system.sock")
    # nothing exists: the default for who asks
    assert discover_socket(None) in (user, tmp_path / "system.sock")
    (tmp_path / "system.sock").touch()
    assert discover_socket(None) == tmp_path / "system.sock"
    user.parent.mkdir()
    user.touch()
    assert discover_socket(None) == user  # the user daemon wins over the system one


def test_no_daemon_gives_a_clear_message(tmp_path):
    sock = tmp_path / "none.sock"
    with pytest.raises(DaemonNotRunning) as e:
        Client(sock).jobs()
    assert str(e.value).startswith(f"no edgezo daemon at {sock}: start one with `edgezo daemon --user`")
    r = subprocess.run([sys.executable, "-m", "edgezo.daemon_cli", "status", "--socket", str(sock),
                        "--state-dir", str(tmp_path / "no-state")],  # and no state directory to read instead
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 3 and "no edgezo daemon at" in r.stderr


def test_client_commands_stay_light():
    code = (
        "import sys, time; t = time.perf_counter()\n"
        "import edgezo.client, edgezo.daemon_cli, edgezo.worker\n"
        "heavy = [m for m in ('torch', 'transformers', 'matplotlib', 'daemon.core') if m in sys.modules]\n"
        "print(heavy, time.perf_counter() - t)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    heavy, _ = r.stdout.rsplit("]", 1)
    assert heavy == "[", r.stdout + r.stderr


def test_status_answers_fast_against_a_real_daemon():
    from edgezo.testing.daemon import DaemonProc

    d = DaemonProc().start()
    try:
        t = time.perf_counter()
        r = d.cli("status")
        elapsed = time.perf_counter() - t
        assert r.returncode == 0 and r.stdout.startswith("JOB")
        assert elapsed < 2.0  # a whole interpreter start included; the request itself is ~ms
        c = Client(d.socket)
        for _ in range(20):  # keep-alive connection reused
            c.health()
        c.close()
    finally:
        d.cleanup()


def _answer(conn) -> None:
    """Read one HTTP request on a raw socket and answer it with a small JSON body."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(4096)
    body = b'{"ok": true}'
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                 % (len(body), body))


def test_after_a_timeout_the_next_request_starts_clean(tmp_path):
    """A daemon stall past the timeout left the connection mid-request, and every later call raised
    CannotSendRequest: running jobs failed on a 10-15 s stall (issue 12, item 2)."""
    import socket
    import threading

    path = str(tmp_path / "s.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(8)
    stalled = []

    def serve():
        first, _ = server.accept()  # read the request, never answer (the stall)
        stalled.append(first)
        second, _ = server.accept()
        _answer(second)
        second.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    c = Client(path, timeout=0.5)
    with pytest.raises(client.DaemonUnresponsive, match="did not answer"):
        c.request("GET", "/health")
    assert c.request("GET", "/health") == {"ok": True}
    t.join(5)
    server.close()


def test_a_full_listen_backlog_is_waited_out_not_a_traceback(tmp_path):
    """200 concurrent clients against a backlog of 100: 1-31 % of connects failed with BlockingIOError
    (issue 12, item 6). A connect refused for a full backlog sent nothing, so it is retried."""
    import socket
    import threading

    path = str(tmp_path / "s.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(0)
    fillers = []
    for _ in range(4):  # fill the backlog (Linux admits backlog + 1) until a connect would fail
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(path)
        except BlockingIOError:
            s.close()
            break
        fillers.append(s)
    else:
        pytest.skip("this kernel never refused a connect on a full backlog")

    def drain_then_serve():
        time.sleep(0.3)
        for _ in fillers:
            server.accept()[0].close()
        conn, _ = server.accept()
        _answer(conn)
        conn.close()

    t = threading.Thread(target=drain_then_serve, daemon=True)
    t.start()
    assert Client(path, timeout=5).request("GET", "/health") == {"ok": True}
    t.join(5)
    server.close()
