"""PMC articles → the pairs table (one row per figure image), with filters, dedup and modality tags.

Inputs: a local PMC Cloud Service mirror (``PMCID.N/`` folders), ``s3://BUCKET`` with a list of PMCIDs
(fetched with bounded concurrency, see ``cloud.py``), or legacy packages/folders/XML (``packages.py``).

``ingest_pmc`` streams: workers (processes for local input, threads for S3) parse each article (lxml),
read only the figure files its ``<graphic>``s cite, and hash and measure them; the main process applies
the cross-article filter (duplicate image hash), writes kept images to
``OUT/images/PMCID/NAME_SHA12.EXT`` — the content hash in the name keeps two sources' same-named figures
apart, so a row's ``image_sha256`` always describes its file — and appends the article's rows to the
resumable log (``worklog.py``). At the end the log becomes Parquet shards (``datasets``), written beside
the previous output and swapped in only on success, and ``report.json`` (``report-TAG.json`` per shard).
Memory holds the images of the articles in flight and the set of image hashes seen, never the corpus.

Columns (DESIGN.md's pairs table): ``pmcid, figure_id, label, caption, subcaption, inline_mentions,
image_path, image_sha256, width, height, license, journal, year, modality`` plus ``pmid``, ``doi``,
``version`` (the article version for Cloud Service input), ``panel_labels`` (the panel letters of
``subcaption``), ``is_subfigure`` (a fig-group member) and ``source``. ``subcaption`` is a list: the panel
sub-captions of a compound figure, or a fig-group member's own caption; empty for a simple figure.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from collections import Counter, deque
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from medvlm.fileio import atomic_path, atomic_write_bytes

from .jats import Article, JatsError, normalise_license, parse_article
from .modality import classify_modality
from .packages import (DEFAULT_MAX_FILE_BYTES, ArticlePackage, FileMissing, FileTooLarge, PackageError, discover,
                       inside, pmcid_from_name, read_oa_file_list, read_package, safe_name, safe_pmcid, shard)
from .worklog import WorkLog, fingerprint

FILTER_REASONS = ("caption_too_short", "caption_too_long", "image_missing", "image_unreadable", "image_too_large",
                  "image_undecodable", "image_too_small", "duplicate_image", "license_not_allowed")
ARTICLE_SKIP_REASONS = ("superseded", "retracted", "license_not_allowed")
BAD_INPUT_WARNINGS = ("image_missing", "image_unreadable", "image_too_large", "image_undecodable", "non_utf8_text",
                      "invalid_pmcid", "unsafe_path")


@dataclass
class IngestOptions:
    min_caption_chars: int = 20
    max_caption_chars: int = 4000
    min_image_side: int = 64
    max_image_bytes: int = DEFAULT_MAX_FILE_BYTES   # a figure file over this is skipped before it is read
    max_image_pixels: int = 64_000_000              # ... and one over this before it is decoded
    licenses: list[str] | None = None           # allow-list, e.g. ["CC BY", "CC0"]; None keeps all
    rows_per_shard: int = 10_000
    num_proc: int = 1
    shard: str | None = None                    # "i/n"
    oa_file_list: str | None = None
    pmcids: str | None = None                   # s3:// input: file of PMCIDs or PMC's S3 inventory CSV
    endpoint_url: str | None = None             # s3:// input: any S3-compatible endpoint
    concurrency: int = 16                       # s3:// input: articles fetched at once
    timeout: float = 30.0                       # s3:// input: seconds per request
    retries: int = 5                            # s3:// input: retries per request (503, timeouts…)
    signed: bool = False                        # s3:// input: sign with AWS credentials (private mirrors)


@dataclass
class Candidate:
    row: dict
    image: bytes | None


@dataclass
class ArticleResult:
    source: str
    key: str = ""                               # the done-log key: the source path or the requested PMCID
    candidates: list[Candidate] = field(default_factory=list)
    filtered: Counter = field(default_factory=Counter)
    figures: int = 0
    error: str | None = None
    error_kind: str | None = None
    transient: bool = False                     # a fetch that may succeed later: not logged as done
    skipped: str | None = None                  # an article-level reason: retracted, license_not_allowed
    superseded: list[str] = field(default_factory=list)
    warnings: list[tuple[str, str]] = field(default_factory=list)   # (kind, message)


def figure_caption(row: dict) -> str:
    """The text that describes a row's image: a fig-group member's own panel caption, else the figure caption."""
    return row["subcaption"][0] if row.get("is_subfigure") and row.get("subcaption") else row["caption"]


def _features():
    from datasets import Features, Sequence, Value

    return Features({
        "pmcid": Value("string"), "pmid": Value("string"), "doi": Value("string"), "version": Value("int32"),
        "figure_id": Value("string"), "label": Value("string"), "caption": Value("string"),
        "subcaption": Sequence(Value("string")), "panel_labels": Sequence(Value("string")),
        "inline_mentions": Sequence(Value("string")), "image_path": Value("string"), "image_sha256": Value("string"),
        "width": Value("int32"), "height": Value("int32"), "license": Value("string"), "journal": Value("string"),
        "year": Value("int32"), "modality": Value("string"), "is_subfigure": Value("bool"), "source": Value("string"),
    })


# ------------------------------------------------------------------------------------ one article
def process_source(source: str, options: IngestOptions, oa_entry: dict | None = None) -> ArticleResult:
    """Read and process one local source; runs in worker processes and never raises."""
    result = ArticleResult(source, key=source)
    try:
        package = read_package(Path(source), options.max_image_bytes)
    except (PackageError, OSError) as exc:
        result.error, result.error_kind = str(exc), "unreadable_package"
        return result
    except Exception as exc:  # noqa: BLE001 - as in process_package: report the article, go on
        result.error, result.error_kind = f"{source}: {type(exc).__name__}: {exc}", "unexpected_error"
        return result
    return process_package(package, options, oa_entry, result)


def process_package(package: ArticlePackage, options: IngestOptions, oa_entry: dict | None = None,
                    result: ArticleResult | None = None) -> ArticleResult:
    """Parse the article, pick its figure files and measure them. One bad article never ends the run:
    anything unexpected is reported on the article (``unexpected_error``) and the run goes on."""
    from .cloud import article_skip_reason
    from .s3 import FetchError

    result = result or ArticleResult(package.source, key=package.source)
    try:
        result.skipped = article_skip_reason(package.metadata, options.licenses)
        if not result.skipped:
            _process(package, options, oa_entry, result)
    except JatsError as exc:
        result.error, result.error_kind = str(exc), "malformed_xml"
    except FetchError as exc:
        result.error, result.error_kind, result.transient = str(exc), "fetch_failed", True
    except Exception as exc:  # noqa: BLE001 - a multi-day run must not die on one article
        result.error, result.error_kind = f"{package.source}: {type(exc).__name__}: {exc}", "unexpected_error"
        result.candidates = []
    return result


def _process(package: ArticlePackage, options: IngestOptions, oa_entry: dict | None, result: ArticleResult) -> None:
    from .cloud import metadata_fields, normalise_license_code

    article = _parse(package, result)
    meta = metadata_fields(package.metadata)
    pmcid = _pmcid(article, meta, oa_entry, package, result)
    license = meta["license"] or (normalise_license(None, oa_entry["license"]) if oa_entry and oa_entry.get("license")
                                  else None) or article.license
    allowed = options.licenses is None or license in {normalise_license_code(x) for x in options.licenses}
    for figure in article.figures:
        for index, href in enumerate(figure.graphics or [None]):
            result.figures += 1
            row = _row(article, figure, index, package, oa_entry, license, pmcid, meta)
            reason = _caption_filter(row["caption"], options) or (None if allowed else "license_not_allowed")
            if reason:
                result.filtered[reason] += 1
                continue
            image_name = package.find_graphic(href) if href else None
            data = _figure_bytes(package, image_name, href, figure.figure_id, result)
            if data is None:
                continue
            size = _image_size(data, options.max_image_pixels)
            if not isinstance(size, tuple):
                result.filtered[size] += 1
                result.warnings.append((size, f"{package.source}: {image_name} "
                                        + ("does not decode as an image" if size == "image_undecodable" else
                                           f"has over {options.max_image_pixels:,} pixels (--max-image-pixels)")))
                continue
            if min(size) < options.min_image_side:
                result.filtered["image_too_small"] += 1
                continue
            sha = hashlib.sha256(data).hexdigest()
            name = Path(safe_name(image_name))
            row.update(width=size[0], height=size[1], image_sha256=sha,
                       image_path=f"images/{pmcid}/{name.stem}_{sha[:12]}{name.suffix.lower()}")
            result.candidates.append(Candidate(row, data))


def _figure_bytes(package: ArticlePackage, name: str | None, href, figure_id: str, result: ArticleResult) -> bytes | None:
    """The cited file's bytes, or None with the reason counted (missing, unreadable, too large)."""
    if name is None:
        reason, message = "image_missing", f"figure {figure_id} graphic {href!r} not in package"
    elif name in package.problems:
        reason, message = package.problems[name]
    else:
        try:
            return package.load(name)
        except FileTooLarge as exc:
            reason, message = "image_too_large", str(exc)
        except FileMissing as exc:
            reason, message = "image_missing", f"{exc} (listed but not found)"
        except OSError as exc:
            reason, message = "image_unreadable", f"{name}: {exc}"
    result.filtered[reason] += 1
    result.warnings.append((reason, f"{package.source}: {message}"))
    return None


def _pmcid(article: Article, meta: dict, oa_entry: dict | None, package: ArticlePackage, result: ArticleResult) -> str:
    """The article's PMCID, validated: it becomes a folder name under ``images/``."""
    pmcid = safe_pmcid(article.pmcid) or meta["pmcid"] or safe_pmcid((oa_entry or {}).get("pmcid")) \
        or pmcid_from_name(package.source)
    if article.pmcid and not safe_pmcid(article.pmcid):
        result.warnings.append(("invalid_pmcid", f"{package.source}: article id {article.pmcid[:80]!r} is not a PMCID; "
                                f"using {pmcid or 'the file name'}"))
    return pmcid or safe_name(Path(package.source.rstrip("/")).stem)


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


def _row(article: Article, figure, index: int, package: ArticlePackage, oa_entry: dict | None, license: str | None,
         pmcid: str, meta: dict) -> dict:
    figure_id = figure.figure_id if index == 0 else f"{figure.figure_id}_{index}"
    if figure.panels:
        subcaption, panel_labels = [p.text for p in figure.panels], [p.label for p in figure.panels]
    elif figure.own_caption:
        subcaption, panel_labels = [figure.own_caption], [figure.label or ""]
    else:
        subcaption, panel_labels = [], []
    return {
        "pmcid": pmcid, "pmid": article.pmid or meta["pmid"] or (oa_entry or {}).get("pmid"),
        "doi": article.doi or meta["doi"], "version": meta["version"], "figure_id": figure_id,
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


def _image_size(data: bytes, max_pixels: int) -> tuple[int, int] | str:
    """(width, height) after a full decode, or ``image_too_large`` (checked from the header, before
    decoding) or ``image_undecodable``."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                if image.size[0] * image.size[1] > max_pixels:
                    return "image_too_large"
                image.load()  # decode fully: a truncated JPEG fails here, not in training
                return image.size
    except Image.DecompressionBombError:
        return "image_too_large"
    except Exception:  # noqa: BLE001 - Pillow raises many types for bad files
        return "image_undecodable"


# ------------------------------------------------------------------------------------ the report
@dataclass
class IngestReport:
    articles_read: int = 0
    articles_without_figures: int = 0
    articles_skipped: Counter = field(default_factory=Counter)
    figures_found: int = 0
    pairs_kept: int = 0
    filtered: Counter = field(default_factory=Counter)
    bad_inputs: list[dict] = field(default_factory=list)
    warnings: Counter = field(default_factory=Counter)
    modality: Counter = field(default_factory=Counter)
    superseded: list[str] = field(default_factory=list)
    fetch: Counter = field(default_factory=Counter)        # s3:// input: requests, retries, bytes
    resumed_articles: int = 0                              # taken from a killed run's log
    retry_later: int = 0                                   # fetches that failed: rerun the command
    shards: list[str] = field(default_factory=list)

    def add(self, entry: dict) -> None:
        """Fold one done-log entry (see ``_entry``) into the counts."""
        self.articles_read += 1
        self.superseded += entry.get("superseded") or []
        if entry.get("skipped"):
            self.articles_skipped[entry["skipped"]] += 1
            return
        if entry.get("error"):
            self.bad_inputs.append({"file": entry["source"], "reason": entry["error_kind"], "message": entry["error"]})
            return
        for kind, message in entry["warnings"]:
            self.warnings[kind] += 1
            if kind in BAD_INPUT_WARNINGS:
                self.bad_inputs.append({"file": entry["source"], "reason": kind, "message": message})
        self.figures_found += entry["figures"]
        self.articles_without_figures += entry["figures"] == 0
        self.filtered.update(entry["filtered"])
        self.pairs_kept += len(entry["rows"])
        self.modality.update(row["modality"] or "unknown" for row in entry["rows"])

    def as_dict(self) -> dict:
        data = asdict(self)
        data["filtered"] = {reason: self.filtered.get(reason, 0) for reason in FILTER_REASONS}
        data["articles_skipped"] = {reason: self.articles_skipped.get(reason, 0) for reason in ARTICLE_SKIP_REASONS}
        data["modality"] = dict(self.modality.most_common())
        data["warnings"] = dict(self.warnings)
        data["fetch"] = dict(self.fetch)
        return data

    def summary(self) -> str:
        skipped = ", ".join(f"{k} {v}" for k, v in self.articles_skipped.items() if v)
        lines = [f"articles read: {self.articles_read} ({len(self.bad_inputs)} bad, "
                 f"{self.articles_without_figures} without figures{', skipped: ' + skipped if skipped else ''})",
                 f"figures found: {self.figures_found}", f"pairs kept:    {self.pairs_kept}"]
        lines += [f"  removed ({reason}): {self.filtered.get(reason, 0)}" for reason in FILTER_REASONS]
        if self.modality:
            lines.append("modality: " + ", ".join(f"{k} {v}" for k, v in self.modality.most_common()))
        if self.fetch:
            lines.append(f"fetched: {self.fetch.get('requests', 0)} requests ({self.fetch.get('retries', 0)} retries), "
                         f"{self.fetch.get('bytes', 0) / 2**20:.1f} MiB")
        if self.resumed_articles:
            lines.append(f"resumed: {self.resumed_articles} articles taken from the interrupted run")
        for bad in self.bad_inputs[:10]:
            lines.append(f"  bad input [{bad['reason']}]: {bad['message']}")
        if self.retry_later:
            lines.append(f"{self.retry_later} article(s) could not be fetched; run the same command again to retry them")
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
        with atomic_path(self.out_dir / name) as tmp:
            Dataset.from_list(self.rows, features=_features()).to_parquet(str(tmp))
        self.written.append(name)
        self.rows = []


# ------------------------------------------------------------------------------------ the run
@dataclass
class _Plan:
    """What to ingest: keys in order; ``args(key)`` (in the main process) and ``work(*args)`` (in a worker)."""
    keys: list[str]
    args: Callable[[str], tuple]
    work: Callable[..., ArticleResult]
    executor: Callable[[], Executor] | None
    superseded: list[str]
    store: object | None = None


def ingest_pmc(inputs: list[str | Path], out_dir: str | Path, options: IngestOptions | None = None,
               progress: bool = True) -> IngestReport:
    """The whole ``medvlm ingest pmc`` run; returns the report (also written as ``report*.json``)."""
    options = options or IngestOptions()
    out_dir = Path(out_dir)
    tag = _shard_tag(options.shard)
    log = WorkLog(out_dir, tag, "")
    plan = _remote_plan(inputs, options, log) if _is_remote(inputs) else _local_plan(inputs, options)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in asdict(options).items()
                if k not in ("num_proc", "concurrency", "timeout", "retries", "endpoint_url", "signed",
                             "rows_per_shard")}
    log.key = fingerprint({"options": settings, "inputs": [str(i) for i in inputs], "keys": plan.keys})
    done = log.open()
    report = IngestReport(superseded=list(plan.superseded), resumed_articles=len(done))
    seen = {row["image_sha256"] for entry in log.entries() for row in entry["rows"]}
    failed = []
    try:
        for result in _results(plan, [k for k in plan.keys if k not in done], progress):
            if result.transient:
                failed.append({"file": result.source, "reason": result.error_kind, "message": result.error})
                continue
            log.append(_entry(result, seen, out_dir))
            _forget_fetched(log, result)
    finally:
        log.close()
    for entry in log.entries():
        report.add(entry)
    report.bad_inputs += failed
    report.retry_later = len(failed)
    report.articles_skipped["superseded"] = len(report.superseded)
    report.fetch.update(getattr(plan.store, "stats", {}))
    report_name = "report.json" if tag == "all" else f"report-{tag}.json"
    report.shards = log.publish(lambda staging: _write_shards(log, staging, tag, options.rows_per_shard),
                                report_name, report.as_dict())
    log.finish(keep=bool(failed))
    return report


def _is_remote(inputs: list[str | Path]) -> bool:
    remote = [str(i).startswith("s3://") for i in inputs]
    if any(remote) and len(inputs) != 1:
        raise ValueError("give either one s3:// URL or local paths, not both")
    return bool(remote and remote[0])


def _local_plan(inputs: list[str | Path], options: IngestOptions) -> _Plan:
    oa_list = read_oa_file_list(options.oa_file_list) if options.oa_file_list else None
    sources, superseded = discover(inputs)
    if oa_list is not None:
        sources = [s for s in sources if (pmcid_from_name(s) or "") in oa_list]

    def args(source: str) -> tuple:
        found = oa_list.get(pmcid_from_name(source) or "") if oa_list is not None else None
        return source, options, asdict(found) if found else None

    executor = (lambda: ProcessPoolExecutor(max_workers=options.num_proc)) if options.num_proc > 1 else None
    return _Plan([str(s) for s in shard(sources, options.shard)], args, process_source, executor, superseded)


def _remote_plan(inputs: list[str | Path], options: IngestOptions, log: WorkLog) -> _Plan:
    from .cloud import read_id_list
    from .s3 import S3Options, S3Store

    if not options.pmcids:
        raise ValueError(f"{inputs[0]}: reading a bucket needs --pmcids FILE (PMCIDs, one per line, or PMC's S3 "
                         "inventory CSV); listing all ~8 million prefixes is not done")
    ids, superseded = read_id_list(options.pmcids)
    store = S3Store(str(inputs[0]), S3Options(endpoint_url=options.endpoint_url, concurrency=options.concurrency,
                                              timeout=options.timeout, retries=options.retries,
                                              signed=options.signed))
    store.check()
    return _Plan(shard(ids, options.shard), lambda key: (key,), lambda key: _fetch_and_process(store, key, options, log),
                 lambda: ThreadPoolExecutor(max_workers=max(1, options.concurrency)), superseded, store)


def _fetch_and_process(store, requested: str, options: IngestOptions, log: WorkLog) -> ArticleResult:
    """One PMCID from the bucket: its latest version, metadata, XML, then the cited media (in a thread)."""
    from .cloud import fetch_package, resolve_version
    from .s3 import FetchError

    result = ArticleResult(store.url(requested), key=requested)
    try:
        version, result.superseded = resolve_version(store, requested)
        result.source = store.url(f"{version}/")
        package, result.skipped = fetch_package(store, version, options.licenses, options.max_image_bytes,
                                                log.fetch_dir)
    except FetchError as exc:
        result.error, result.error_kind, result.transient = str(exc), "fetch_failed", True
        return result
    except (FileMissing, PackageError, ValueError, TypeError, KeyError, AttributeError) as exc:
        # TypeError & co.: metadata JSON of the wrong shape (e.g. ``"media_urls": 5``); that article is
        # reported and the run goes on, as for a bad local package
        result.error, result.error_kind = str(exc), "not_found" if isinstance(exc, FileMissing) else "bad_metadata"
        return result
    return process_package(package, options, None, result) if package else result


def _forget_fetched(log: WorkLog, result: ArticleResult) -> None:
    from .cloud import forget_cached

    if result.source.startswith("s3://"):
        forget_cached(log.fetch_dir, result.source.rstrip("/").rsplit("/", 1)[-1])


def _results(plan: _Plan, keys: list[str], progress: bool) -> Iterator[ArticleResult]:
    from tqdm.auto import tqdm

    bar = tqdm(total=len(keys), desc="ingest", unit="article",
               disable=not progress or bool(os.environ.get("MEDVLM_NO_PROGRESS")))
    try:
        if plan.executor is None:
            for key in keys:
                yield plan.work(*plan.args(key))
                bar.update(1)
            return
        with plan.executor() as pool:
            workers = getattr(pool, "_max_workers", 1)
            for result in ordered_map(pool, plan.work, map(plan.args, keys), window=4 * workers):
                yield result
                bar.update(1)
    finally:
        bar.close()


def ordered_map(pool: Executor, fn: Callable, items: Iterable, window: int) -> Iterator:
    """``pool.map`` over argument tuples, in input order, at most ``window`` in flight: memory stays flat."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, *item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _entry(result: ArticleResult, seen: set[str], out_dir: Path) -> dict:
    """Write the article's new images and return its done-log line (kept rows and counts)."""
    filtered, rows = Counter(result.filtered), []
    for candidate in result.candidates:
        row = candidate.row
        if row["image_sha256"] in seen:
            filtered["duplicate_image"] += 1
            continue
        try:
            _write_image(inside(out_dir, row["image_path"]), candidate.image)
        except ValueError as exc:  # names are sanitised before this; this is the last line of defence
            result.warnings.append(("unsafe_path", f"{result.source}: {exc}"))
            continue
        seen.add(row["image_sha256"])
        rows.append(row)
    return {"key": result.key, "source": result.source, "rows": rows, "figures": result.figures,
            "filtered": dict(filtered), "warnings": result.warnings, "error": result.error,
            "error_kind": result.error_kind, "skipped": result.skipped, "superseded": result.superseded}


def _write_shards(log: WorkLog, staging: Path, tag: str, rows_per_shard: int) -> list[str]:
    writer = ShardWriter(staging, tag, rows_per_shard)
    for entry in log.entries():
        for row in entry["rows"]:
            writer.add(row)
    writer.flush()
    return writer.written


def _shard_tag(spec: str | None) -> str:
    if not spec:
        return "all"
    shard([], spec)  # validates: a clear message for a malformed --shard
    index, count = spec.split("/")
    return f"{int(index):05d}-of-{int(count):05d}"


def _write_image(path: Path, data: bytes) -> None:
    if path.is_file() and path.stat().st_size == len(data):
        return  # the name holds the content hash: the same bytes are already there
    atomic_write_bytes(path, data, fsync=False)  # no fsync per figure: a rerun rewrites one of the wrong size


def load_pairs(pairs_dir: str | Path):
    """The pairs table as a ``datasets.Dataset`` (memory-mapped Arrow; 15M rows are fine)."""
    from datasets import Dataset, concatenate_datasets

    files = sorted(Path(pairs_dir).glob("pairs-*.parquet"))
    if not files:
        raise FileNotFoundError(f"{pairs_dir}: no pairs-*.parquet shards; run `medvlm ingest pmc` first")
    return concatenate_datasets([Dataset.from_parquet(str(f)) for f in files])
