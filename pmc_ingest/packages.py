"""Read PMC Open Access inputs: ``PMCxxxx.tar.gz`` packages, extracted article folders, bare JATS files,
folders of any of those, and PMC's ``oa_file_list.csv`` to select and label them.

A package is read whole into memory (one article: its ``.nxml`` and figure files), never the corpus.
"""

from __future__ import annotations

import csv
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".tif", ".tiff")
ARTICLE_SUFFIXES = (".nxml", ".xml")
_PMCID = re.compile(r"PMC\d+", re.I)


class PackageError(ValueError):
    """A package that cannot be read (truncated tarball, no JATS file); the message names it."""


@dataclass
class ArticlePackage:
    source: str                                   # the tarball / folder / file it came from
    article_name: str                             # the .nxml inside it
    article: bytes
    files: dict[str, bytes] = field(default_factory=dict)   # figure files by base name

    def find_graphic(self, href: str) -> str | None:
        """The file a ``<graphic xlink:href>`` means: hrefs usually have no extension; prefer JPEG."""
        href = Path(href).name
        if href in self.files:
            return href
        stem = Path(href).stem if Path(href).suffix.lower() in IMAGE_SUFFIXES else href
        candidates = {Path(n).suffix.lower(): n for n in self.files if Path(n).stem == stem}
        for suffix in IMAGE_SUFFIXES:
            if suffix in candidates:
                return candidates[suffix]
        return None


def discover(inputs: list[str | Path]) -> list[Path]:
    """Every article source under ``inputs``, sorted so that ``--shard i/n`` splits are stable."""
    found: set[Path] = set()
    for item in map(Path, inputs):
        if not item.exists():
            raise FileNotFoundError(f"{item}: input not found")
        if item.is_file():
            found.add(item)
            continue
        if _is_article_folder(item):
            found.add(item)
            continue
        for path in item.rglob("*"):
            if path.is_file() and path.name.endswith((".tar.gz", ".tgz")):
                found.add(path)
            elif path.is_file() and path.suffix in ARTICLE_SUFFIXES and not _is_article_folder(path.parent):
                found.add(path)
            elif path.is_dir() and _is_article_folder(path):
                found.add(path)
    return sorted(found)


def _is_article_folder(folder: Path) -> bool:
    return folder.is_dir() and any(p.suffix == ".nxml" for p in folder.iterdir())


def shard(sources: list[Path], spec: str | None) -> list[Path]:
    """``"i/n"`` keeps every n-th source starting at i (0-based), for Slurm arrays and Ray tasks."""
    if not spec:
        return sources
    try:
        index, count = (int(x) for x in spec.split("/"))
    except ValueError as exc:
        raise ValueError(f"--shard {spec!r}: expected i/n, e.g. 0/64") from exc
    if not 0 <= index < count:
        raise ValueError(f"--shard {spec!r}: i must be in 0..n-1")
    return sources[index::count]


def read_package(source: Path) -> ArticlePackage:
    if source.is_dir():
        return _read_folder(source)
    if source.name.endswith((".tar.gz", ".tgz")):
        return _read_tarball(source)
    return ArticlePackage(str(source), source.name, source.read_bytes())


def _read_folder(folder: Path) -> ArticlePackage:
    articles = sorted(p for p in folder.iterdir() if p.suffix == ".nxml")
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    return ArticlePackage(str(folder), articles[0].name, articles[0].read_bytes(), files)


def _read_tarball(path: Path) -> ArticlePackage:
    article_name, article, files = None, None, {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = Path(member.name).name
                suffix = Path(name).suffix.lower()
                if suffix == ".nxml" and article is None:
                    article_name, article = name, tar.extractfile(member).read()
                elif suffix in IMAGE_SUFFIXES:
                    files[name] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise PackageError(f"{path}: unreadable or truncated tarball ({exc}); re-download it") from exc
    if article is None:
        raise PackageError(f"{path}: no .nxml article inside the package")
    return ArticlePackage(str(path), article_name, article, files)


def pmcid_from_name(path: str | Path) -> str | None:
    match = _PMCID.search(Path(path).name)
    return match.group(0).upper() if match else None


@dataclass
class OaListEntry:
    file: str
    citation: str
    pmcid: str
    last_updated: str
    pmid: str | None
    license: str | None


def read_oa_file_list(path: str | Path) -> dict[str, OaListEntry]:
    """PMC's ``oa_file_list.csv`` keyed by accession id (PMCID)."""
    path = Path(path)
    required = {"File", "Accession ID", "License"}
    entries: dict[str, OaListEntry] = {}
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = required - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: not PMC's oa_file_list.csv; missing column(s) {sorted(missing)}")
        for row in reader:
            pmcid = (row.get("Accession ID") or "").strip().upper()
            if not pmcid:
                continue
            entries[pmcid] = OaListEntry(
                file=row.get("File", ""), citation=row.get("Article Citation", ""), pmcid=pmcid,
                last_updated=row.get("Last Updated (YYYY-MM-DD HH:MM:SS)", ""),
                pmid=(row.get("PMID") or "").strip() or None, license=(row.get("License") or "").strip() or None,
            )
    return entries


def iter_packages(sources: list[Path]) -> Iterator[tuple[Path, ArticlePackage | Exception]]:
    for source in sources:
        try:
            yield source, read_package(source)
        except (PackageError, OSError) as exc:
            yield source, exc
