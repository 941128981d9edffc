"""A small HTTP/1.1 server for the Unix socket: JSON in, JSON out, chunked streams for follow mode.

Enough HTTP for curl and `edgezo.client`: request line, headers, Content-Length bodies,
keep-alive, and `Transfer-Encoding: chunked` responses. Each connection carries the peer's
credentials (SO_PEERCRED) so handlers can decide who may change state.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

log = logging.getLogger("edgezo.daemon.http")

MAX_BODY = 4 * 1024 * 1024
MAX_HEADERS = 100  # per request; one client once raised the daemon's RSS from 36 to 212 MiB with a flood
MAX_HEAD_BYTES = 64 * 1024  # request line and headers together
IDLE_S = 600.0  # a kept-alive connection waits this long for its next request line
READ_S = 30.0  # once a request has begun, its headers and body must arrive within this
BACKLOG = 1024  # pending connects the kernel queues (asyncio's default of 100 refused 1-31 % of a 200-client burst)
MAX_CONNECTIONS = 1000  # open at once; beyond it a new connection gets a 503 (each holds a file descriptor)


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    peer: Peer | None
    params: dict[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        if not self.body:
            return {}
        try:
            return json.loads(self.body)
        except json.JSONDecodeError as e:
            raise HTTPError(400, f"body is not JSON: {e}") from None


@dataclass
class Response:
    status: int = 200
    body: Any = None  # JSON-able, or str for text
    content_type: str = "application/json"
    stream: AsyncIterator[bytes] | None = None
    headers: dict[str, str] | None = None  # extra response headers, e.g. Retry-After


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


Handler = Callable[[Request], Awaitable[Response]]


class Router:
    def __init__(self) -> None:
        self.routes: list[tuple[str, re.Pattern, Handler, bool]] = []

    def add(self, method: str, pattern: str, handler: Handler, *, mutating: bool = False) -> None:
        regex = "^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern) + "$"
        self.routes.append((method, re.compile(regex), handler, mutating))

    def match(self, method: str, path: str) -> tuple[Handler, dict[str, str], bool]:
        allowed = []
        for m, regex, handler, mutating in self.routes:
            hit = regex.match(path)
            if hit:
                if m == method or (method == "HEAD" and m == "GET"):
                    return handler, {k: unquote(v) for k, v in hit.groupdict().items()}, mutating
                allowed.append(m)
        if allowed:
            raise HTTPError(405, f"{method} not allowed on {path} (use {', '.join(sorted(set(allowed)))})")
        raise HTTPError(404, f"no endpoint {path}")


def peer_credentials(sock: socket.socket | None) -> Peer | None:
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    return Peer(*struct.unpack("3i", raw))


class Server:
    """Serves a Router on already-listening sockets."""

    def __init__(self, router: Router, authorize: Callable[[Peer | None], bool], *,
                 max_connections: int = MAX_CONNECTIONS):
        self.router, self.authorize = router, authorize
        self.servers: list[asyncio.AbstractServer] = []
        self.requests = 0
        self.connections = 0  # open now
        self.max_connections = max_connections
        self.refused = 0  # connections answered 503 for being over max_connections

    async def serve(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.servers.append(await asyncio.start_unix_server(self._connection, sock=sock, backlog=BACKLOG))

    async def close(self) -> None:
        for s in self.servers:
            s.close()
        for s in self.servers:
            try:
                await asyncio.wait_for(s.wait_closed(), 1.0)
            except (asyncio.TimeoutError, Exception):
                pass

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = peer_credentials(writer.get_extra_info("socket"))
        self.connections += 1
        try:
            if self.connections > self.max_connections:
                self.refused += 1
                try:  # read the request first: closing on unread bytes resets the connection before our answer
                    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 1.0)
                except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    pass
                await self._write(writer, Response(503, {"error": f"too many connections ({self.max_connections} "
                                                               "open); retry shortly"}, headers={"Retry-After": "1"}), False)
                return
            while True:
                keep = await self._one(reader, writer, peer)
                if not keep:
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError):
            pass  # a client that went away, or went quiet past IDLE_S / READ_S
        except asyncio.CancelledError:
            raise
        except Exception:  # a broken connection must never take the daemon down
            log.exception("connection error")
        finally:
            self.connections -= 1
            try:
                writer.close()
            except Exception:
                pass

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: Peer | None) -> bool:
        line = await asyncio.wait_for(reader.readline(), IDLE_S)
        if not line:
            return False
        try:
            method, target, version = line.decode("latin-1").strip().split(" ", 2)
        except ValueError:
            await self._write(writer, Response(400, {"error": "bad request line"}), False)
            return False
        try:
            headers, body = await asyncio.wait_for(self._head_and_body(reader, len(line)), READ_S)
        except HTTPError as e:
            await self._write(writer, Response(e.status, {"error": e.message}), False)
            return False
        keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        url = urlsplit(target)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        req = Request(method.upper(), url.path.rstrip("/") or "/", query, headers, body, peer)
        self.requests += 1
        try:
            handler, req.params, mutating = self.router.match(req.method, req.path)
            if mutating and not self.authorize(peer):
                raise HTTPError(403, "permission denied: only root, the daemon's user or the socket's group may change state")
            resp = await handler(req)
        except HTTPError as e:
            resp = Response(e.status, {"error": e.message})
        except Exception as e:
            log.exception("handler failed: %s %s", method, target)
            resp = Response(500, {"error": f"{type(e).__name__}: {e}"})
        if req.method == "HEAD":
            resp.body, resp.stream = None, None
        if resp.stream is not None:
            await self._write_stream(writer, resp)
            return False
        await self._write(writer, resp, keep)
        return keep

    @staticmethod
    async def _head_and_body(reader: asyncio.StreamReader, used: int) -> tuple[dict[str, str], bytes]:
        """Headers (bounded in count and bytes) and a Content-Length body; HTTPError says what is wrong."""
        headers: dict[str, str] = {}
        while True:
            h = await reader.readline()
            if h in (b"\r\n", b"\n", b""):
                break
            used += len(h)
            if len(headers) >= MAX_HEADERS or used > MAX_HEAD_BYTES:
                raise HTTPError(431, f"too many or too large headers (at most {MAX_HEADERS}, {MAX_HEAD_BYTES} bytes)")
            k, _, v = h.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            raise HTTPError(501, "chunked request bodies are not supported; send Content-Length")
        raw = headers.get("content-length") or "0"
        if not raw.isdigit():
            raise HTTPError(400, f"bad Content-Length {raw[:40]!r}")
        length = int(raw)
        if length > MAX_BODY:
            raise HTTPError(413, f"body too large (at most {MAX_BODY} bytes)")
        return headers, (await reader.readexactly(length) if length else b"")

    @staticmethod
    def _head(status: int, content_type: str, extra: dict[str, str]) -> bytes:
        reason = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else ""
        lines = [f"HTTP/1.1 {status} {reason}", f"Content-Type: {content_type}"]
        lines += [f"{k}: {v}" for k, v in extra.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def _write(self, writer: asyncio.StreamWriter, resp: Response, keep: bool) -> None:
        if resp.body is None:
            payload = b""
        elif isinstance(resp.body, (str, bytes)):
            payload = resp.body.encode() if isinstance(resp.body, str) else resp.body
        else:
            payload = (json.dumps(resp.body, indent=None, separators=(",", ":")) + "\n").encode()
        head = self._head(
            resp.status,
            resp.content_type,
            {"Content-Length": str(len(payload)), "Connection": "keep-alive" if keep else "close",
             **(resp.headers or {})},
        )
        writer.write(head + payload)
        await writer.drain()

    async def _write_stream(self, writer: asyncio.StreamWriter, resp: Response) -> None:
        writer.write(self._head(resp.status, resp.content_type, {"Transfer-Encoding": "chunked", "Connection": "close"}))
        await writer.drain()
        assert resp.stream is not None
        try:
            async for chunk in resp.stream:
                if chunk:
                    writer.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                    await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        finally:
            aclose = getattr(resp.stream, "aclose", None)
            if aclose is not None:
                await aclose()
