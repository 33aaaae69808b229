"""Atomic writes: a reader sees the old file or the new one, never half of one (torch-free, so
both scratch/ and reference/ use it)."""
from __future__ import annotations

import json
import os
from pathlib import Path


def atomic_write(path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, ``os.replace`` it onto
    ``path``, then fsync the folder so the rename itself survives a crash.  On an error the
    temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
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
