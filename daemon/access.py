"""Who may change what, and may this caller read that path?

Changing endpoints (enqueue, cancel, retry) need a caller, known by SO_PEERCRED, who is root, the
daemon's own user, or a member of the socket's group. The worker opens the files a spec names with
the daemon's privileges, so a group member could otherwise train on (and read back, through error
messages) files only the daemon's user may read: at enqueue the daemon refuses a path its caller
could not open themselves.

That check follows the path as the worker will (symlinks resolved), needs search permission on every
directory above and read permission on the file, or on a directory and every entry inside it (a
model or datasets directory). It is advisory against a caller who swaps files after enqueue; the
point is that nobody gets the daemon to read for them what they could not.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from pathlib import Path
from typing import Any

from edgezo.spec import SpecError, spec_paths

MAX_ENTRIES = 10_000  # a directory with more is refused rather than walked for minutes


def groups_of(uid: int) -> set[int]:
    """The uid's primary and supplementary groups (empty for a uid without a passwd entry)."""
    try:
        user = pwd.getpwuid(uid)
    except KeyError:
        return set()
    return set(os.getgrouplist(user.pw_name, user.pw_gid))


def _may(st: os.stat_result, uid: int, gids: set[int], user_bits: int, group_bits: int, other_bits: int) -> bool:
    """The owner's bits apply to the owner, the group's to members, the others' to everyone else."""
    bits = user_bits if st.st_uid == uid else group_bits if st.st_gid in gids else other_bits
    return st.st_mode & bits == bits


def readable_by(path: str | Path, uid: int) -> bool:
    """True when `uid` could read `path` (a file, or a directory and everything in it) itself.
    A path that does not exist is simply not readable: the answer does not tell the two apart."""
    if uid == 0:
        return True
    gids = groups_of(uid)
    real = Path(os.path.realpath(path))
    try:
        for d in reversed(real.parents):  # from / down: each must be searchable
            if not _may(os.stat(d), uid, gids, stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH):
                return False
        st = os.stat(real)
        if not stat.S_ISDIR(st.st_mode):
            return _may(st, uid, gids, stat.S_IRUSR, stat.S_IRGRP, stat.S_IROTH)
        seen = 0
        for top, dirs, files in os.walk(real, followlinks=False):
            seen += len(dirs) + len(files)
            if seen > MAX_ENTRIES:
                return False
            if not _may(os.stat(top), uid, gids, stat.S_IRUSR | stat.S_IXUSR, stat.S_IRGRP | stat.S_IXGRP,
                        stat.S_IROTH | stat.S_IXOTH) or not all(
                    _may(os.stat(os.path.realpath(os.path.join(top, f))), uid, gids, stat.S_IRUSR, stat.S_IRGRP,
                         stat.S_IROTH) for f in files):
                return False
        return True
    except OSError:
        return False


def group_id(name: str) -> int | None:
    """The socket group's gid; None when no such group exists (then only root and the daemon's user)."""
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def _proc_groups(pid: int) -> set[int]:
    """The supplementary groups a process runs with now (a login may predate /etc/group's)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Groups:"):
                return {int(g) for g in line.split()[1:]}
    except (OSError, ValueError):
        pass
    return set()


def may_change(peer: Any, group_gid: int | None) -> bool:
    """Root, the daemon's own user, or a member of the socket group (`peer`: uid, gid, pid)."""
    if peer is None:
        return False
    if peer.uid in (0, os.getuid()):
        return True
    if group_gid is None:
        return False
    return peer.gid == group_gid or group_gid in _proc_groups(peer.pid)


def check_paths(spec: dict, uid: int | None) -> None:
    """Every path the spec names exists, and a caller other than the daemon's user could read it."""
    other = uid is not None and uid != os.geteuid()
    for field, path in spec_paths(spec):
        if other and not readable_by(path, uid):
            raise SpecError(field, f"{path}: you (uid {uid}) cannot read it, or it does not exist; the daemon "
                            "reads only files its caller could read")
        if not Path(path).exists():
            raise SpecError(field, f"{path} does not exist on the daemon's machine")
