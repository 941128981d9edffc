"""Starting the daemon: directories, the listening socket (or systemd's), then the loop."""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import resource
import socket
from pathlib import Path

from . import sdnotify
from .api import build_router
from .core import Config, Daemon
from .http import BACKLOG, MAX_CONNECTIONS, Server

log = logging.getLogger("edgezo.daemon")


def bind_socket(path: Path, group: str = "edgezo") -> socket.socket:
    """Listen on `path` with mode 0660 (group `group` where it exists). Refuses a live socket."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(0.5)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # stale: its daemon is gone
        else:
            raise SystemExit(f"another edgezo daemon is listening on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o117)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o660)
    with contextlib.suppress(KeyError, PermissionError):
        os.chown(path, -1, grp.getgrnam(group).gr_gid)
    sock.listen(BACKLOG)
    return sock


def _connection_cap() -> int:
    """Raise the soft file-descriptor limit to the hard one (a user-mode daemon starts at 1024, which
    ~1,100 idle clients exhausted) and keep the connection cap under it, with room for the store,
    the workers' pipes and /proc reads."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft != resource.RLIM_INFINITY and soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
    return max(16, min(MAX_CONNECTIONS, soft - 128))


def serve(cfg: Config) -> int:
    logging.basicConfig(level=os.environ.get("EDGEZO_LOG", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.umask(0o027)  # job directories 0750, files 0640: the socket's group may read outputs, others nothing
    inherited = sdnotify.listen_fds()
    daemon = Daemon(cfg)
    daemon.open()
    if inherited:
        socks = inherited
        with contextlib.suppress(OSError):
            name = socks[0].getsockname()
            if isinstance(name, str) and name:
                cfg.socket_path = Path(name)  # workers must dial what systemd listens on
        log.info("socket activation: %d inherited socket(s)", len(socks))
    else:
        socks = [bind_socket(cfg.socket_path, cfg.socket_group)]
    server = Server(build_router(daemon), daemon.authorize, max_connections=_connection_cap())

    async def main() -> int:
        return await daemon.run(socks, server)

    try:
        return asyncio.run(main())
    finally:
        if not inherited:
            with contextlib.suppress(OSError):
                cfg.socket_path.unlink()
