"""Writing secrets to disk: created with their final mode, never world-readable first."""

from __future__ import annotations

import os
import stat
from pathlib import Path

Owner = tuple[int, int]
"""(uid, gid)."""


def secure_dir(path: Path) -> Path:
    """`path`, created if missing, mode 0700."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def write_secret(path: Path, data: bytes, *, mode: int = 0o600,
                 owner: Owner | None = None) -> None:
    """Write `data` to `path` atomically, the file carrying `mode` (and `owner`, see
    `take_owner`) from the moment it appears under its name."""
    secure_dir(path.parent)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    tmp.chmod(mode)  # the umask may have narrowed it; never widened past `mode`
    if owner is not None:
        take_owner(tmp, owner)
    tmp.replace(path)


def update_secret(path: Path, data: bytes, *, mode: int = 0o600,
                  owner: Owner | None = None) -> bool:
    """Make `path` hold `data` with `mode` (and `owner`), rewriting it only when its bytes
    differ: a second run with nothing new leaves the file as it was (inode, mtime), so
    nothing watching it sees a change. A mode or owner alone is put right in place.
    Returns whether the bytes were written."""
    try:
        same = path.read_bytes() == data
    except FileNotFoundError:
        same = False
    if not same:
        write_secret(path, data, mode=mode, owner=owner)
        return True
    if stat.S_IMODE(path.stat().st_mode) != mode:
        path.chmod(mode)
    if owner is not None:
        take_owner(path, owner)
    return False


def owner_of(path: Path) -> Owner:
    found = path.stat()
    return found.st_uid, found.st_gid


def take_owner(path: Path, owner: Owner) -> None:
    """Give `path` to `owner` when running as root (`docker compose run … secrets` is:
    the files must stay readable by the services' user); a user that is not root owns
    what it writes, as its sources, and cannot give it away."""
    if os.geteuid() == 0 and owner_of(path) != owner:
        os.chown(path, *owner)
