"""Writing secrets to disk: created with their final mode, never world-readable first."""

from __future__ import annotations

import os
from pathlib import Path


def secure_dir(path: Path) -> Path:
    """`path`, created if missing, mode 0700."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def write_secret(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Write `data` to `path` atomically, the file carrying `mode` from its creation."""
    secure_dir(path.parent)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    tmp.chmod(mode)  # the umask may have narrowed it; never widened past `mode`
    tmp.replace(path)
