"""PMC articles → the pairs table (one row per figure image), with filters, dedup and modality tags.

``ingest_pmc`` streams: a process pool parses packages (lxml), hashes and measures figure images; the
main process applies the cross-article filters (duplicate image hash), copies kept images into
``OUT/images/PMCID/`` and writes rows to Parquet shards through ``datasets`` every ``rows_per_shard``
rows. Memory holds one shard of rows plus the set of image hashes seen, never the corpus. Every shard,
image and report is written to a temporary name and renamed, so a killed run never leaves a
half-written file; re-running the same command rewrites the same outputs (idempotent).

Columns (DESIGN.md's pairs table): ``pmcid, figure_id, label, caption, subcaption, inline_mentions,
image_path, image_sha256, width, height, license, journal, year, modality`` plus ``pmid``,
``panel_labels`` (the panel letters of ``subcaption``), ``is_subfigure`` (a fig-group member) and
``source``. ``subcaption`` is a list: the panel sub-captions of a compound figure, or a fig-group
member's own caption; empty for a simple figure.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from .jats import Article, JatsError, normalise_license, parse_article
from .modality import classify_modality
from .packages import ArticlePackage, PackageError, discover, pmcid_from_name, read_oa_file_list, read_package, shard

FILTER_REASONS = ("caption_too_short", "caption_too_long", "image_missing", "image_undecodable", "image_too_small",
                  "duplicate_image", "license_not_allowed")


@dataclass
class IngestOptions:
    min_caption_chars: int = 20
    max_caption_chars: int = 4000
    min_image_side: int = 64
    licenses: list[str] | None = None           # allow-list, e.g. ["CC BY", "CC0"]; None keeps all
    rows_per_shard: int = 10_000
    num_proc: int = 1
    shard: str | None = None                    # "i/n"
    oa_file_list: str | None = None


@dataclass
class Candidate:
    row: dict
    image: bytes | None


@dataclass
class ArticleResult:
    source: str
    candidates: list[Candidate] = field(default_factory=list)
    filtered: Counter = field(default_factory=Counter)
    figures: int = 0
    error: str | None = None
    error_kind: str | None = None
    warnings: list[tuple[str, str]] = field(default_factory=list)   # (kind, message)


def _features():
    from datasets import Features, Sequence, Value

    return Features({
        "pmcid": Value("string"), "pmid": Value("string"), "figure_id": Value("string"), "label": Value("string"),
        "caption": Value("string"), "subcaption": Sequence(Value("string")), "panel_labels": Sequence(Value("string")),
        "inline_mentions": Sequence(Value("string")), "image_path": Value("string"), "image_sha256": Value("string"),
        "width": Value("int32"), "height": Value("int32"), "license": Value("string"), "journal": Value("string"),
        "year": Value("int32"), "modality": Value("string"), "is_subfigure": Value("bool"), "source": Value("string"),
    })


# ------------------------------------------------------------------------------------ one article
def process_source(source: str, options: IngestOptions, oa_entry: dict | None = None) -> ArticleResult:
    """Parse one package and measure its figure images; runs in worker processes."""
    result = ArticleResult(source)
    try:
        package = read_package(Path(source))
    except PackageError as exc:
        result.error, result.error_kind = str(exc), "unreadable_package"
        return result
    try:
        article = _parse(package, result)
    except JatsError as exc:
        result.error, result.error_kind = str(exc), "malformed_xml"
        return result
    license = (normalise_license(None, oa_entry["license"]) if oa_entry and oa_entry.get("license") else None) or article.license
    allowed = options.licenses is None or license in options.licenses
    for figure in article.figures:
        for index, href in enumerate(figure.graphics or [None]):
            result.figures += 1
            row = _row(article, figure, index, package, oa_entry, license)
            reason = _caption_filter(row["caption"], options) or (None if allowed else "license_not_allowed")
            if reason:
                result.filtered[reason] += 1
                continue
            image_name = package.find_graphic(href) if href else None
            if image_name is None:
                result.filtered["image_missing"] += 1
                result.warnings.append(("image_missing", f"{source}: figure {figure.figure_id} graphic {href!r} not in package"))
                continue
            data = package.files[image_name]
            size = _image_size(data)
            if size is None:
                result.filtered["image_undecodable"] += 1
                result.warnings.append(("image_undecodable", f"{source}: {image_name} does not decode as an image"))
                continue
            if min(size) < options.min_image_side:
                result.filtered["image_too_small"] += 1
                continue
            row.update(width=size[0], height=size[1], image_sha256=hashlib.sha256(data).hexdigest(),
                       image_path=f"images/{row['pmcid']}/{image_name}")
            result.candidates.append(Candidate(row, data))
    return result


def _parse(package: ArticlePackage, result: ArticleResult) -> Article:
    source = f"{package.source}:{package.article_name}" if package.source != package.article_name else package.source
    try:
        return parse_article(package.article, source)
    except JatsError:
        try:
            package.article.decode("utf-8")
            raise
        except UnicodeDecodeError:
            pass
    # Not valid UTF-8: older packages sometimes carry Windows-1252 bytes; recover and report it.
    text = package.article.decode("cp1252", errors="replace")
    text = text.split("?>", 1)[1] if text.lstrip().startswith("<?xml") else text
    result.warnings.append(("non_utf8_text", f"{source}: not valid UTF-8; decoded as Windows-1252"))
    return parse_article(text.encode("utf-8"), source)


def _row(article: Article, figure, index: int, package: ArticlePackage, oa_entry: dict | None, license: str | None) -> dict:
    pmcid = article.pmcid or (oa_entry or {}).get("pmcid") or pmcid_from_name(package.source) or Path(package.source).stem
    figure_id = figure.figure_id if index == 0 else f"{figure.figure_id}_{index}"
    if figure.panels:
        subcaption, panel_labels = [p.text for p in figure.panels], [p.label for p in figure.panels]
    elif figure.own_caption:
        subcaption, panel_labels = [figure.own_caption], [figure.label or ""]
    else:
        subcaption, panel_labels = [], []
    return {
        "pmcid": pmcid, "pmid": article.pmid or (oa_entry or {}).get("pmid"), "figure_id": figure_id,
        "label": figure.label or None, "caption": figure.caption, "subcaption": subcaption,
        "panel_labels": panel_labels, "inline_mentions": article.mentions.get(figure.figure_id, []),
        "license": license, "journal": article.journal, "year": article.year,
        "modality": classify_modality(figure.caption), "is_subfigure": figure.group_id is not None,
        "source": package.source,
    }


def _caption_filter(caption: str, options: IngestOptions) -> str | None:
    if len(caption) < options.min_caption_chars:
        return "caption_too_short"
    if len(caption) > options.max_caption_chars:
        return "caption_too_long"
    return None


def _image_size(data: bytes) -> tuple[int, int] | None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decode fully: a truncated JPEG fails here, not in training
            return image.size
    except Exception:  # noqa: BLE001 - Pillow raises many types for bad files
        return None


# ------------------------------------------------------------------------------------ the run
@dataclass
class IngestReport:
    articles_read: int = 0
    articles_without_figures: int = 0
    figures_found: int = 0
    pairs_kept: int = 0
    filtered: Counter = field(default_factory=Counter)
    bad_inputs: list[dict] = field(default_factory=list)
    warnings: Counter = field(default_factory=Counter)
    modality: Counter = field(default_factory=Counter)
    shards: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        data = asdict(self)
        data["filtered"] = {reason: self.filtered.get(reason, 0) for reason in FILTER_REASONS}
        data["modality"] = dict(self.modality.most_common())
        data["warnings"] = dict(self.warnings)
        return data

    def summary(self) -> str:
        lines = [f"articles read: {self.articles_read} ({len(self.bad_inputs)} bad, "
                 f"{self.articles_without_figures} without figures)",
                 f"figures found: {self.figures_found}", f"pairs kept:    {self.pairs_kept}"]
        lines += [f"  removed ({reason}): {self.filtered.get(reason, 0)}" for reason in FILTER_REASONS]
        if self.modality:
            lines.append("modality: " + ", ".join(f"{k} {v}" for k, v in self.modality.most_common()))
        for bad in self.bad_inputs[:10]:
            lines.append(f"  bad input [{bad['reason']}]: {bad['message']}")
        return "\n".join(lines)


class ShardWriter:
    """Rows → ``pairs-TAG-00000.parquet`` … via ``datasets``; each shard written to a temp name, then renamed."""

    def __init__(self, out_dir: Path, tag: str, rows_per_shard: int):
        self.out_dir, self.tag, self.rows_per_shard = out_dir, tag, rows_per_shard
        self.rows: list[dict] = []
        self.written: list[str] = []

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if len(self.rows) >= self.rows_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        from datasets import Dataset

        name = f"pairs-{self.tag}-{len(self.written):05d}.parquet"
        tmp = self.out_dir / f".{name}.tmp"
        Dataset.from_list(self.rows, features=_features()).to_parquet(str(tmp))
        os.replace(tmp, self.out_dir / name)
        self.written.append(name)
        self.rows = []


def ingest_pmc(inputs: list[str | Path], out_dir: str | Path, options: IngestOptions | None = None,
               progress: bool = True) -> IngestReport:
    """The whole ``medvlm ingest pmc`` run; returns the report (also written as ``report*.json``)."""
    options = options or IngestOptions()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    oa_list = read_oa_file_list(options.oa_file_list) if options.oa_file_list else None
    sources = discover(inputs)
    if oa_list is not None:
        sources = [s for s in sources if (pmcid_from_name(s) or "") in oa_list]
    sources = shard(sources, options.shard)
    tag = _shard_tag(options.shard)
    for stale in out_dir.glob(f"pairs-{tag}-*.parquet"):
        stale.unlink()  # a rerun rewrites this shard's outputs from scratch
    report = IngestReport()
    writer = ShardWriter(out_dir, tag, options.rows_per_shard)
    seen_hashes: set[str] = set()
    for result in _results(sources, options, oa_list, progress):
        _account(result, report, seen_hashes, writer, out_dir, options)
    writer.flush()
    report.shards = writer.written
    report_path = out_dir / ("report.json" if tag == "all" else f"report-{tag}.json")
    tmp = report_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report.as_dict(), indent=2))
    os.replace(tmp, report_path)
    return report


def _shard_tag(spec: str | None) -> str:
    if not spec:
        return "all"
    index, count = spec.split("/")
    return f"{int(index):05d}-of-{int(count):05d}"


def _results(sources: list[Path], options: IngestOptions, oa_list, progress: bool) -> Iterator[ArticleResult]:
    from tqdm.auto import tqdm

    def entry(source: Path) -> dict | None:
        if oa_list is None:
            return None
        found = oa_list.get(pmcid_from_name(source) or "")
        return asdict(found) if found else None

    bar = tqdm(total=len(sources), desc="ingest", unit="article", disable=not progress)
    try:
        if options.num_proc <= 1:
            for source in sources:
                yield process_source(str(source), options, entry(source))
                bar.update(1)
            return
        with ProcessPoolExecutor(max_workers=options.num_proc) as pool:
            # map() keeps input order, so the output is the same for any --num-proc
            chunks = max(1, min(64, len(sources) // (options.num_proc * 8) or 1))
            for result in pool.map(process_source, map(str, sources), _repeat(options, len(sources)),
                                   map(entry, sources), chunksize=chunks):
                yield result
                bar.update(1)
    finally:
        bar.close()


def _repeat(value, n: int) -> Iterable:
    return (value for _ in range(n))


def _account(result: ArticleResult, report: IngestReport, seen: set[str], writer: ShardWriter, out_dir: Path,
             options: IngestOptions) -> None:
    report.articles_read += 1
    if result.error:
        report.bad_inputs.append({"file": result.source, "reason": result.error_kind, "message": result.error})
        return
    for kind, message in result.warnings:
        report.warnings[kind] += 1
        if kind in ("image_missing", "image_undecodable", "non_utf8_text"):
            report.bad_inputs.append({"file": result.source, "reason": kind, "message": message})
    report.figures_found += result.figures
    if result.figures == 0:
        report.articles_without_figures += 1
    report.filtered.update(result.filtered)
    for candidate in result.candidates:
        row = candidate.row
        if row["image_sha256"] in seen:
            report.filtered["duplicate_image"] += 1
            continue
        seen.add(row["image_sha256"])
        _write_image(out_dir / row["image_path"], candidate.image)
        report.pairs_kept += 1
        report.modality[row["modality"] or "unknown"] += 1
        writer.add(row)


def _write_image(path: Path, data: bytes) -> None:
    if path.is_file() and path.stat().st_size == len(data):
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def load_pairs(pairs_dir: str | Path):
    """The pairs table as a ``datasets.Dataset`` (memory-mapped Arrow; 15M rows are fine)."""
    from datasets import Dataset, concatenate_datasets

    files = sorted(Path(pairs_dir).glob("pairs-*.parquet"))
    if not files:
        raise FileNotFoundError(f"{pairs_dir}: no pairs-*.parquet shards; run `medvlm ingest pmc` first")
    return concatenate_datasets([Dataset.from_parquet(str(f)) for f in files])
