"""``medvlm ingest merge OUT_1 OUT_2 … --out pairs/``: shard outputs of ``ingest pmc`` → one pairs table.

The same figure is often reused by several articles (a journal's logo, a reprinted figure, a corrected
article), and dedup inside ``ingest pmc`` only sees its own shard. Here rows are ranked by article —
earliest first: lowest PMCID number (PMC assigns them in deposit order), then version, then the order the
inputs were given — and of every group of rows sharing an ``image_sha256`` only the earliest is kept.
The ranking, grouping and selection run in Arrow (``datasets`` + ``pyarrow.compute``: a sort of the
needed columns and a group-by), so 15M rows need no hand-written external sort.

``--near-duplicates`` also removes perceptual near-duplicates (re-encoded or resized copies):
``imagehash.phash`` (64 bits) of every kept image, decoded at reduced size (``Image.draft``), and
Hamming distance ≤ ``max_distance``, found by splitting the hash into ``max_distance + 1`` bands (two
hashes that close agree exactly on at least one band) and checking only hashes that share a band; the
earliest image of a near group is kept. Its cost is the decode: ``benchmarks/ingest.py`` measures it
(see README section 1 for CPU-hours per million images).

Written to ``--out``: ``pairs-all-*.parquet`` (staged, swapped in when complete), ``images/`` (hard links
to the inputs' files, copies across file systems) and ``report.json`` (each input's reports, summed
totals, duplicates removed).
"""

from __future__ import annotations

import json
import os
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .packages import inside
from .worklog import publish


@dataclass
class MergeOptions:
    near_duplicates: bool = False
    max_distance: int = 4          # phash Hamming distance that counts as a near-duplicate
    rows_per_shard: int = 10_000
    num_proc: int = 4              # threads hashing images for --near-duplicates


@dataclass
class MergeReport:
    inputs: list[dict] = field(default_factory=list)
    totals: dict = field(default_factory=dict)
    rows_in: int = 0
    duplicates_removed: int = 0
    near_duplicates_removed: int = 0
    pairs_kept: int = 0
    shards: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"merged {len(self.inputs)} output(s): {self.rows_in} rows in, {self.duplicates_removed} exact and "
                f"{self.near_duplicates_removed} near duplicates removed, {self.pairs_kept} pairs kept")


def merge_pairs(inputs: list[str | Path], out_dir: str | Path, options: MergeOptions | None = None) -> MergeReport:
    import numpy as np

    from .pairs import load_pairs

    options = options or MergeOptions()
    folders, out_dir = [Path(i) for i in inputs], Path(out_dir)
    _check_folders(folders, out_dir)
    tables = [load_pairs(folder) for folder in folders]
    report = MergeReport(inputs=[_input_summary(f, len(t)) for f, t in zip(folders, tables)])
    report.totals = _sum_reports([r for i in report.inputs for r in i["reports"].values()])
    report.rows_in = sum(len(t) for t in tables)
    order, source, row = _earliest_first(tables)
    keep = _first_of_each(order, [t.data.table.column("image_sha256") for t in tables])
    report.duplicates_removed = report.rows_in - len(keep)
    if options.near_duplicates:
        near = near_duplicate_positions(_image_files(source[keep], row[keep], tables, folders),
                                        options.max_distance, options.num_proc)
        report.near_duplicates_removed = len(near)
        keep = np.delete(keep, near)
    report.pairs_kept = len(keep)
    out_dir.mkdir(parents=True, exist_ok=True)
    selected = list(zip(source[keep].tolist(), row[keep].tolist()))
    _link_images(_image_files(source[keep], row[keep], tables, folders), out_dir)
    report.shards = publish(out_dir, out_dir / ".merge-staging", "all",
                            lambda staging: _write(selected, tables, staging, options.rows_per_shard),
                            "report.json", _as_dict(report))
    return report


def _check_folders(folders: list[Path], out_dir: Path) -> None:
    for folder in folders:
        if not any(folder.glob("pairs-*.parquet")):
            raise FileNotFoundError(f"{folder}: no pairs-*.parquet; give folders that `medvlm ingest pmc` wrote")
        if folder.resolve() == out_dir.resolve():
            raise ValueError(f"--out {out_dir} is one of the inputs; merge into a new folder")
    if len({f.resolve() for f in folders}) != len(folders):
        raise ValueError("the same folder is given twice; each shard output once")


def _input_summary(folder: Path, rows: int) -> dict:
    reports = {p.name: json.loads(p.read_text()) for p in sorted(folder.glob("report*.json"))}
    return {"folder": str(folder), "rows": rows, "reports": reports}


def _sum_reports(reports: list[dict]) -> dict:
    """Numbers added up across the inputs' reports (nested count tables too)."""
    total: dict = {}
    for report in reports:
        for key, value in report.items():
            if isinstance(value, bool):
                continue
            if isinstance(value, int):
                total[key] = total.get(key, 0) + value
            elif isinstance(value, dict) and all(isinstance(v, int) for v in value.values()):
                inner = total.setdefault(key, {})
                for k, v in value.items():
                    inner[k] = inner.get(k, 0) + v
    return total


def _earliest_first(tables) -> tuple:
    """Global row positions sorted earliest article first, and each position's (input, row): numpy arrays."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    pmc, version, source, row = [], [], [], []
    for index, table in enumerate(tables):
        arrow = table.data.table
        number = pc.struct_field(pc.extract_regex(arrow.column("pmcid"), r"^PMC(?P<n>\d+)$"), "n")
        pmc.append(pc.fill_null(pc.cast(number, pa.int64()), 2**62).to_numpy())
        version.append(pc.fill_null(arrow.column("version").cast(pa.int64()), 0).to_numpy())
        source.append(np.full(len(table), index, dtype=np.int64))
        row.append(np.arange(len(table), dtype=np.int64))
    source, row = np.concatenate(source), np.concatenate(row)
    order = np.lexsort((row, source, np.concatenate(version), np.concatenate(pmc)))  # last key sorts first
    return order, source, row


def _first_of_each(order, hashes):
    """The earliest position of each distinct image hash, in earliest-first order."""
    import numpy as np
    import pyarrow as pa

    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order), dtype=np.int64)
    sha = pa.chunked_array([chunk for column in hashes for chunk in column.chunks], type=pa.string())
    best = pa.table({"sha": sha, "rank": rank}).group_by("sha").aggregate([("rank", "min")])
    return order[np.sort(best.column("rank_min").to_numpy())]


def near_duplicate_positions(files, max_distance: int, workers: int = 4) -> list[int]:
    """Positions (in ``files``: (folder, image_path), earliest first) whose image is within ``max_distance`` bits of an earlier
    kept one's phash; unreadable images are never called duplicates."""
    from concurrent.futures import ThreadPoolExecutor

    from .pairs import ordered_map

    bands = max_distance + 1
    width = -(-64 // bands)
    buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
    removed = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        hashes = ordered_map(pool, perceptual_hash, ((str(folder / path),) for folder, path in files), 4 * workers)
        for position, value in enumerate(hashes):
            if value is None:
                continue
            keys = [(b, (value >> (b * width)) & ((1 << width) - 1)) for b in range(bands)]
            if any(bin(value ^ other).count("1") <= max_distance for key in keys for other in buckets[key]):
                removed.append(position)
                continue
            for key in keys:
                buckets[key].append(value)
    return removed


def perceptual_hash(path: str) -> int | None:
    """64-bit DCT hash (imagehash.phash) of an image decoded at reduced size; None if it does not open."""
    import imagehash
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.draft("L", (128, 128))  # JPEG: decode at 1/2..1/8 scale, what makes this affordable
            return int(str(imagehash.phash(image)), 16)
    except Exception:  # noqa: BLE001 - an unreadable image is simply not compared
        return None


def _image_files(sources, rows, tables, folders: list[Path]):
    """(input folder, image_path) of the given rows, streamed column-wise (no per-row dataset access)."""
    columns = [t.data.table.column("image_path") for t in tables]
    for start in range(0, len(rows), 50_000):
        for index, row in zip(sources[start:start + 50_000].tolist(), rows[start:start + 50_000].tolist()):
            yield folders[index], columns[index][row].as_py()


def _link_images(files, out_dir: Path) -> None:
    for folder, relative in files:
        source, target = folder / relative, inside(out_dir, relative)
        if target.exists():
            if target.stat().st_size != source.stat().st_size:
                raise ValueError(f"{target}: exists with other content than {source}; merge into an empty folder")
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, target)
        except OSError:  # another file system
            shutil.copy2(source, target)


def _write(selected: list[tuple[int, int]], tables, staging: Path, rows_per_shard: int) -> list[str]:
    from datasets import concatenate_datasets

    names = []
    for start in range(0, len(selected), rows_per_shard):
        part = selected[start:start + rows_per_shard]
        by_input: dict[int, list[int]] = defaultdict(list)
        for index, row in part:
            by_input[index].append(row)
        pieces = [tables[i].select(rows) for i, rows in by_input.items()]
        chunk = concatenate_datasets(pieces)
        # back to earliest-first order within the shard
        position = {key: n for n, key in enumerate(part)}
        keys = [(i, r) for i, rows in by_input.items() for r in rows]
        chunk = chunk.select(sorted(range(len(keys)), key=lambda n: position[keys[n]]))
        name = f"pairs-all-{len(names):05d}.parquet"
        chunk.to_parquet(str(staging / name))
        names.append(name)
    return names


def _as_dict(report: MergeReport) -> dict:
    from dataclasses import asdict

    return asdict(report)
