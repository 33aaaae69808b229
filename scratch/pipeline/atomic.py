"""Atomic writes: a reader sees the old file or the new one, never half of one (torch-free, so
both scratch/ and reference/ use it)."""
from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

from .errors import CommandError


def gib(n: float) -> str:
    """Bytes as a short human size."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


class NoSpace(OSError, CommandError):
    """ENOSPC while writing under ``folder``: a one-line message naming the folder, its free
    space and the space the write needs (``needed`` bytes, when known)."""

    def __init__(self, folder, needed: int | None = None, what: str = "the write"):
        self.folder, self.needed = Path(folder), needed
        try:
            free = gib(shutil.disk_usage(_existing(self.folder)).free)
        except OSError:
            free = "unknown"
        need = f"needs about {gib(needed)} free" if needed else "needs more free space"
        super().__init__(errno.ENOSPC, f"no space left in {self.folder} ({free} free): {what} "
                                       f"{need}; free some space or choose another folder, "
                                       "then run again (nothing half-written was left)")

    def __str__(self) -> str:
        return self.strerror


def _existing(folder: Path) -> Path:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def is_enospc(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def atomic_write(path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, ``os.replace`` it onto
    ``path``, then fsync the folder so the rename itself survives a crash.  On an error the
    temporary file is removed and ``path`` is left as it was; a full disk is :class:`NoSpace`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if is_enospc(e) and not isinstance(e, NoSpace):
            raise NoSpace(path.parent, len(data), f"writing {path.name}") from e
        raise
    try:                                   # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def write_json(path, obj) -> None:
    atomic_write(path, (json.dumps(obj, indent=2) + "\n").encode())
