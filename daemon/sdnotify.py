"""systemd's notify and socket-activation protocols, in plain Python.

sd_notify: one datagram per message to the AF_UNIX socket named by $NOTIFY_SOCKET (a path, or an
abstract name when it starts with '@'). sd_listen_fds: inherited listening sockets start at fd 3;
they are ours only when $LISTEN_PID is our pid. Both are no-ops outside systemd.
"""

from __future__ import annotations

import os
import socket

SD_LISTEN_FDS_START = 3


def notify(message: str, env: dict[str, str] | None = None) -> bool:
    """Send e.g. "READY=1\\nSTATUS=..." to the service manager. False when there is none."""
    env = os.environ if env is None else env
    addr = env.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(message.encode())
        return True
    except OSError:
        return False


def watchdog_interval(env: dict[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None when no watchdog is armed."""
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(int(usec) / 1e6 / 2, 0.05)
    except ValueError:
        return None


def listen_fds(unset: bool = True) -> list[socket.socket]:
    """Sockets passed by socket activation (LISTEN_FDS/LISTEN_PID), as socket objects."""
    pid, count = os.environ.get("LISTEN_PID"), os.environ.get("LISTEN_FDS")
    if unset:
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(key, None)
    if not pid or not count or pid != str(os.getpid()):
        return []
    socks = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count)):
        os.set_inheritable(fd, False)
        socks.append(socket.socket(fileno=fd))
    return socks
