"""The resumable work folder of one ``ingest pmc`` run: ``OUT/.ingest-TAG/``.

``done.jsonl`` gets one line per finished article — its kept rows and its counts — appended only after
the article's images are written; a line cut by a kill is detected and dropped. A rerun with the same
arguments (same ``fingerprint``) replays those lines and skips the articles; different arguments start
over. ``publish`` builds the Parquet shards from the log in ``staging/`` *beside* the previous output and
swaps them in only when all are written, removing the old report first so that no report ever describes
shards that are not there. ``fetch/`` holds media fetched for articles not yet finished.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

from medvlm.fileio import atomic_write_json


def fingerprint(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class WorkLog:
    def __init__(self, out_dir: Path, tag: str, key: str):
        self.out_dir, self.tag, self.key = out_dir, tag, key
        self.dir = out_dir / f".ingest-{tag}"
        self.done_file = self.dir / "done.jsonl"
        self.fetch_dir = self.dir / "fetch"
        self.resumed = 0

    def open(self) -> set[str]:
        """Resume a matching unfinished run (returns the finished keys) or start a fresh work folder."""
        stamp = self.dir / "fingerprint.json"
        if self.dir.is_dir():
            try:
                same = json.loads(stamp.read_text())["fingerprint"] == self.key
            except (OSError, ValueError, KeyError):
                same = False
            if not same:
                logging.getLogger(__name__).warning(
                    "%s: an unfinished run with other arguments or inputs; starting this one afresh", self.dir)
                shutil.rmtree(self.dir)
        if not self.dir.is_dir():
            self.dir.mkdir(parents=True)
            atomic_write_json(stamp, {"fingerprint": self.key})
            self.done_file.touch()
        done = {entry["key"] for entry in self.entries()}
        self.resumed = len(done)
        self._fh = open(self.done_file, "a", encoding="utf-8")
        return done

    def entries(self) -> Iterator[dict]:
        """Every complete line; a torn last line (a kill mid-append) is cut off the file."""
        good = 0
        with open(self.done_file, "rb") as fh:
            for line in fh:
                if not line.endswith(b"\n"):
                    break
                try:
                    entry = json.loads(line)
                except ValueError:
                    break
                good += len(line)
                yield entry
        if good != self.done_file.stat().st_size:
            os.truncate(self.done_file, good)

    def append(self, entry: dict) -> None:
        self._fh.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self._fh.flush()  # in the OS's hands: a killed process loses nothing written

    def close(self) -> None:
        if getattr(self, "_fh", None):
            self._fh.close()
            self._fh = None

    def publish(self, write_shards: Callable[[Path], list[str]], report_name: str, report: dict) -> list[str]:
        """Write shards into staging/, then swap them for the previous ``pairs-TAG-*`` and write the report."""
        self.close()
        return publish(self.out_dir, self.dir / "staging", self.tag, write_shards, report_name, report)

    def finish(self, keep: bool) -> None:
        """Remove the work folder, or keep it (with its log) when some articles must be retried."""
        self.close()
        if keep:
            shutil.rmtree(self.dir / "staging", ignore_errors=True)
        else:
            shutil.rmtree(self.dir, ignore_errors=True)


def publish(out_dir: Path, staging: Path, tag: str, write_shards: Callable[[Path], list[str]], report_name: str,
            report: dict) -> list[str]:
    """``write_shards(staging)`` writes the new ``pairs-TAG-*.parquet`` beside the old output; only when all
    are written is the old report removed (never a report describing other shards), the old shards
    replaced, and the new report written. Returns the shard names."""
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    names = write_shards(staging)
    (out_dir / report_name).unlink(missing_ok=True)
    for old in out_dir.glob(f"pairs-{tag}-*.parquet"):
        old.unlink()
    for name in names:  # whole files already written in staging/: a rename (not fileio) moves each in one step
        os.replace(staging / name, out_dir / name)
    shutil.rmtree(staging, ignore_errors=True)
    atomic_write_json(out_dir / report_name, report)
    return names
