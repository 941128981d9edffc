"""A torch-free client for the daemon's Unix-socket HTTP API (used by the CLI and the worker).

Socket discovery, first hit wins: an explicit path (--socket), $EDGEZO_SOCKET, the user-mode
default ($XDG_RUNTIME_DIR/edgezo/edgezo.sock) when it exists, the system default
(/run/edgezo/edgezo.sock) when it exists; otherwise the default for who is asking (root: system).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

SYSTEM_SOCKET = Path("/run/edgezo/edgezo.sock")


def user_runtime_dir() -> Path:
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg)
    run_user = Path(f"/run/user/{os.getuid()}")
    return run_user if run_user.is_dir() else Path(f"/tmp/edgezo-{os.getuid()}")


def user_socket() -> Path:
    return user_runtime_dir() / "edgezo" / "edgezo.sock"


def system_socket() -> Path:
    rt = os.environ.get("RUNTIME_DIRECTORY")
    return Path(rt.split(":")[0]) / "edgezo.sock" if rt else SYSTEM_SOCKET


def discover_socket(explicit: str | os.PathLike | None = None) -> Path:
    if explicit:
        return Path(explicit)
    if os.environ.get("EDGEZO_SOCKET"):
        return Path(os.environ["EDGEZO_SOCKET"])
    for candidate in (user_socket(), system_socket()):
        if candidate.exists():
            return candidate
    return system_socket() if os.getuid() == 0 else user_socket()


class DaemonNotRunning(ConnectionError):
    def __init__(self, path: Path, cause: BaseException | None = None):
        self.path = path
        super().__init__(f"no edgezo daemon at {path}: start one with `edgezo daemon --user`"
                         + (f" ({cause})" if cause and not isinstance(cause, FileNotFoundError) else ""))


class DaemonUnresponsive(DaemonNotRunning):
    """The daemon is there but did not answer: a stall past the timeout, or a listen backlog that stayed
    full. The connection is dropped, so the next request starts clean (a timed-out one left mid-request
    once made every later call raise CannotSendRequest)."""

    def __init__(self, path: Path, cause: BaseException | None = None):
        self.path = path
        ConnectionError.__init__(self, f"the edgezo daemon at {path} did not answer ({cause or 'timed out'})")


class ApiError(RuntimeError):
    def __init__(self, status: int, body: Any):
        self.status, self.body = status, body
        msg = body.get("error") if isinstance(body, dict) else str(body)
        super().__init__(f"daemon answered {status}: {msg}")


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class Client:
    """One keep-alive connection, reopened as needed. Not thread-safe: one Client per thread."""

    def __init__(self, socket_path: str | os.PathLike | None = None, timeout: float | None = 30.0):
        self.path = discover_socket(socket_path)
        self.timeout = timeout
        self._conn: _UnixConnection | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _connection(self) -> _UnixConnection:
        if self._conn is None:
            self._conn = _UnixConnection(str(self.path), self.timeout)
        return self._conn

    def raw(self, method: str, path: str, body: Any = None) -> tuple[int, str, bytes]:
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        deadline = time.monotonic() + (self.timeout or 30.0)
        backoff, reconnected = 0.01, False
        while True:
            conn = self._connection()
            try:
                conn.request(method, path, body=payload, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                if resp.getheader("Connection", "").lower() == "close":
                    self.close()
                if resp.getheader("Retry-After") and time.monotonic() + backoff <= deadline:  # over its connection cap
                    self.close()
                    time.sleep(backoff)
                    backoff = min(backoff * 2, 0.25)
                    continue
                return resp.status, resp.getheader("Content-Type", ""), data
            except (FileNotFoundError, ConnectionRefusedError, PermissionError) as e:
                self.close()
                raise DaemonNotRunning(self.path, e) from None
            except BlockingIOError:  # the listen backlog is full (a burst of clients): nothing was sent
                self.close()
                if time.monotonic() + backoff > deadline:
                    raise DaemonUnresponsive(self.path, "its listen backlog stayed full") from None
                time.sleep(backoff)
                backoff = min(backoff * 2, 0.25)
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
                self.close()  # a kept-alive connection the daemon closed: retry once on a fresh one
                if reconnected:
                    raise DaemonNotRunning(self.path, e) from None
                reconnected = True
            except (OSError, http.client.HTTPException) as e:  # a timeout, or a garbled answer
                self.close()
                raise DaemonUnresponsive(self.path, e) from None

    def request(self, method: str, path: str, body: Any = None) -> Any:
        status, ctype, data = self.raw(method, path, body)
        parsed: Any = data.decode(errors="replace")
        if "json" in ctype:
            try:
                parsed = json.loads(data or b"null")
            except ValueError:
                pass
        if status >= 400:
            raise ApiError(status, parsed)
        return parsed

    def stream(self, path: str) -> Iterator[bytes]:
        """A follow-mode endpoint, chunk by chunk, on its own connection."""
        conn = _UnixConnection(str(self.path), None)
        try:
            try:
                conn.request("GET", path)
            except (FileNotFoundError, ConnectionRefusedError) as e:
                raise DaemonNotRunning(self.path, e) from None
            resp = conn.getresponse()
            if resp.status >= 400:
                raise ApiError(resp.status, resp.read().decode(errors="replace"))
            while True:
                chunk = resp.read1(65536) if hasattr(resp, "read1") else resp.read(65536)
                if not chunk:
                    return
                yield chunk
        finally:
            conn.close()

    # conveniences ----------------------------------------------------------
    def health(self) -> dict:
        return self.request("GET", "/health")

    def jobs(self) -> dict:
        return self.request("GET", "/jobs")

    def job(self, job: str) -> dict:
        return self.request("GET", f"/jobs/{quote(job, safe='')}")

    def enqueue(self, spec: dict, *, sets: list[str] | None = None, window: str | None = None,
                at: str | None = None) -> dict:
        return self.request("POST", "/jobs", {"spec": spec, "set": sets or [], "window": window, "at": at})

    def cancel(self, job: str) -> dict:
        return self.request("POST", f"/jobs/{quote(job, safe='')}/cancel")

    def retry(self, job: str, budget: str | None = None) -> dict:
        body = {"budget": budget} if budget is not None else {}
        return self.request("POST", f"/jobs/{quote(job, safe='')}/retry", body)

    def report(self, job: str) -> dict:
        return self.request("GET", f"/jobs/{quote(job, safe='')}/report")

    def memory(self, job: str) -> dict:
        return self.request("GET", f"/jobs/{quote(job, safe='')}/memory")

    def events(self, job: str, after: int = 0) -> list[dict]:
        return self.request("GET", f"/jobs/{quote(job, safe='')}/events?{urlencode({'after': after})}")["events"]

    def device(self) -> dict:
        return self.request("GET", "/device")

    def metrics(self) -> str:
        return self.request("GET", "/metrics")
