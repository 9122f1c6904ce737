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
from typing import Any, Iterable, Iterator


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


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
    """``path``'s JSON, or ``default`` ({} when not given) when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {} if default is None else default


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


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[Any], fsync: bool = True) -> Path:
    """Replace ``path`` with one JSON value per line, streamed (``rows`` may be a generator)."""
    with atomic_path(path, fsync=fsync) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, default=str, ensure_ascii=False) + "\n")
    return Path(path)


class FolderInUse(RuntimeError):
    """Another live process holds the folder's lock."""


class FolderLock:
    """One process at a time in a folder (a curriculum run directory): ``with FolderLock(run_dir): ...``.

    The lock is an OS file lock (``filelock``) on ``FOLDER/.lock``, so the kernel drops it when its holder
    dies, however it dies. ``FOLDER/.lock.owner`` names the holder (pid, host, start time) for the message a
    second process gets; finding that file while taking a free lock means the last holder crashed: its lock
    is taken over, and said so.
    """

    def __init__(self, folder: str | os.PathLike, what: str = "run"):
        self.folder = Path(folder)
        self.what = what
        self.owner_file = self.folder / ".lock.owner"
        self._lock = None

    def __enter__(self) -> "FolderLock":
        import socket
        import time

        from filelock import FileLock, Timeout

        self.folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.folder / ".lock"), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise FolderInUse(f"{self.folder} is in use by another {self.what} ({self._owner()}); wait for it to "
                              "finish, stop it, or use another directory") from None
        self._lock = lock
        previous = self._owner() if self.owner_file.is_file() else None
        if previous:
            print(f"[medvlm] {self.folder}: the {self.what} that held it ({previous}) ended without releasing it "
                  "(crashed or killed); taking over", flush=True)
        atomic_write_json(self.owner_file, {"pid": os.getpid(), "host": socket.gethostname(),
                                            "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
        return self

    def __exit__(self, *exc_info) -> None:
        if self._lock is not None:
            self.owner_file.unlink(missing_ok=True)
            self._lock.release()
            self._lock = None

    def _owner(self) -> str:
        try:
            owner = json.loads(self.owner_file.read_text())
            return f"pid {owner['pid']} on {owner['host']}, since {owner['started']}"
        except (OSError, ValueError, KeyError):
            return "owner unknown"
