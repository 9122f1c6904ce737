"""Write-then-rename: a file is either its old complete content or its new complete content, never half.

Every output medvlm writes (metrics, manifests, reports, caches) goes through these helpers: the data is
written to a hidden temporary file in the same folder (so the rename stays on one file system), flushed
to disk, then ``os.replace``-d onto the final name, which POSIX makes atomic. A run killed mid-write
leaves at worst a ``.NAME.tmp-PID`` file, never a truncated ``NAME``. Folders (checkpoints) use the same
idea in ``medvlm.checkpoint.atomic_folder``.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without error it replaces ``path``.

    For writers that want a file name (``safetensors.save_file``, ``fig.savefig``). On error the
    temporary file is removed and ``path`` is untouched. ``fsync=False`` for caches that can be rebuilt.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8", fsync: bool = True) -> Path:
    """Replace ``path`` with ``text`` atomically."""
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, fsync: bool = True) -> Path:
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, data: Any, indent: int | None = 2, fsync: bool = True) -> Path:
    """Replace ``path`` with ``data`` as JSON (values JSON cannot hold are written with ``str``)."""
    return atomic_write_text(path, json.dumps(data, indent=indent, default=str, ensure_ascii=False) + "\n", fsync=fsync)
