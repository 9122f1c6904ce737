"""Read PMC inputs on disk as articles with their figure files: PMC Cloud Service article-version folders
(``PMCID.N/PMCID.N.xml`` + media, see ``cloud.py``), legacy ``PMCxxxx.tar.gz`` packages, extracted legacy
folders, bare JATS files, folders of any of those, and PMC's legacy ``oa_file_list.csv``.

Memory: a tarball's image members are read (each capped at ``max_file_bytes`` *before* reading); a folder's
files are read only when a figure asks for them. Hostile input: a file that is not a regular file (a
dangling symlink, a directory named ``fig1.jpg``) or is too large is recorded as a problem of that file,
never an exception; every name that reaches an output path goes through ``safe_name``/``safe_pmcid``.
"""

from __future__ import annotations

import csv
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".tif", ".tiff")
ARTICLE_SUFFIXES = (".nxml", ".xml")
DEFAULT_MAX_FILE_BYTES = 64 * 2**20
_PMCID = re.compile(r"PMC\d+", re.I)
_VALID_PMCID = re.compile(r"PMC\d{1,12}")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class PackageError(ValueError):
    """A package that cannot be read (truncated tarball, no JATS file); the message names it."""


class FileTooLarge(Exception):
    """A figure file over the size cap; raised before its bytes are read."""

    def __init__(self, name: str, size: int, limit: int):
        super().__init__(f"{name}: {size:,} bytes, over the {limit:,}-byte cap (--max-image-mb)")
        self.size = size


class FileMissing(Exception):
    """A listed figure file that is not there (404 on S3, removed from disk)."""


@dataclass
class ArticlePackage:
    """One article: its JATS bytes and the figure files it may cite.

    ``files`` holds bytes already read (tarballs); ``lazy`` lists names that ``loader(name)`` reads on demand
    (folders, S3); ``problems`` maps names of unusable files to ``(reason, message)``.
    """

    source: str                                   # the tarball / folder / file / s3 prefix it came from
    article_name: str                             # the JATS file inside it
    article: bytes
    files: dict[str, bytes] = field(default_factory=dict)
    lazy: set[str] = field(default_factory=set)
    loader: Callable[[str], bytes] | None = None
    problems: dict[str, tuple[str, str]] = field(default_factory=dict)
    metadata: dict | None = None                  # PMC Cloud Service metadata JSON, when there is one

    def names(self) -> set[str]:
        return set(self.files) | self.lazy | set(self.problems)

    def find_graphic(self, href: str) -> str | None:
        """The file a ``<graphic xlink:href>`` means: hrefs usually have no extension; prefer JPEG."""
        names = self.names()
        href = Path(href.replace("\\", "/")).name
        if href in names:
            return href
        stem = Path(href).stem if Path(href).suffix.lower() in IMAGE_SUFFIXES else href
        candidates = {Path(n).suffix.lower(): n for n in names if Path(n).stem == stem}
        for suffix in IMAGE_SUFFIXES:
            if suffix in candidates:
                return candidates[suffix]
        return None

    def load(self, name: str) -> bytes:
        if name in self.files:
            return self.files[name]
        if name in self.lazy and self.loader is not None:
            return self.loader(name)
        raise FileMissing(name)


# ------------------------------------------------------------------------------------ names from data
def safe_pmcid(value: str | None) -> str | None:
    """``PMC123`` (upper-cased) when ``value`` is exactly a PMCID, else None: ids go into output paths."""
    if not value:
        return None
    value = value.strip().upper()
    return value if _VALID_PMCID.fullmatch(value) else None


def safe_name(name: str) -> str:
    """A file name safe as one path component: no separators, no leading dot, no ``..``; never empty."""
    cleaned = _UNSAFE.sub("_", Path(name.replace("\\", "/")).name).lstrip(".")
    return cleaned[:120] or "file"


def inside(root: Path, relative: str) -> Path:
    """``root/relative``, refusing anything that resolves outside ``root`` (the last line of defence)."""
    root = root.resolve()
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"{relative!r} would leave the output folder {root}")
    return path


# ------------------------------------------------------------------------------------ discovery
def discover(inputs: list[str | Path]) -> tuple[list[Path], list[str]]:
    """Every article source under ``inputs`` (sorted, so ``--shard i/n`` splits are stable), and the
    article-version folders left out because a higher version of the same PMCID is present."""
    from .cloud import is_version_folder, latest_versions

    found: set[Path] = set()
    holds_article: dict[Path, bool] = {}  # folder → is an article folder (asked once per folder, not per file)

    def article_folder(folder: Path) -> bool:
        if folder not in holds_article:
            holds_article[folder] = _is_article_folder(folder) or is_version_folder(folder)
        return holds_article[folder]

    for item in map(Path, inputs):
        if not item.exists():
            raise FileNotFoundError(f"{item}: input not found; give a package, an article folder or a folder of them")
        if item.is_file() or article_folder(item):
            found.add(item)
            continue
        for path in item.rglob("*"):
            if path.is_dir():
                if article_folder(path):
                    found.add(path)
            elif not path.is_file() or article_folder(path.parent):  # dangling links; files of an article
                continue
            elif path.name.endswith((".tar.gz", ".tgz")) or path.suffix == ".nxml":
                found.add(path)
            elif path.suffix == ".xml" and path.parent.name != "metadata":
                found.add(path)
    return latest_versions(sorted(found))


def _is_article_folder(folder: Path) -> bool:
    return folder.is_dir() and any(p.suffix == ".nxml" and p.is_file() for p in folder.iterdir())


def shard(sources: list, spec: str | None) -> list:
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


# ------------------------------------------------------------------------------------ reading
def read_package(source: Path, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> ArticlePackage:
    from .cloud import is_version_folder, read_version_folder

    if is_version_folder(source):
        return read_version_folder(source, max_file_bytes)
    if source.is_dir():
        return read_folder(source, (".nxml",), max_file_bytes)
    if source.name.endswith((".tar.gz", ".tgz")):
        return _read_tarball(source, max_file_bytes)
    return ArticlePackage(str(source), source.name, source.read_bytes())


def read_folder(folder: Path, article_suffixes: tuple[str, ...], max_file_bytes: int,
                article_name: str | None = None) -> ArticlePackage:
    """An extracted article folder; figure files are listed now and read when a figure cites them."""
    entries = sorted(folder.iterdir())
    articles = [p for p in entries if p.is_file() and (p.name == article_name if article_name else p.suffix in article_suffixes)]
    if not articles:
        raise PackageError(f"{folder}: no JATS file ({article_name or '/'.join(article_suffixes)}) in the folder")
    package = ArticlePackage(str(folder), articles[0].name, articles[0].read_bytes())
    for path in entries:
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if not path.is_file():  # a dangling symlink, a directory named like a figure, a device
            package.problems[path.name] = ("image_unreadable", f"{path}: not a regular file")
        else:
            package.lazy.add(path.name)
    package.loader = lambda name: _read_capped(folder / name, max_file_bytes)
    return package


def _read_capped(path: Path, limit: int) -> bytes:
    size = path.stat().st_size
    if size > limit:
        raise FileTooLarge(str(path), size, limit)
    return path.read_bytes()


def _read_tarball(path: Path, max_file_bytes: int) -> ArticlePackage:
    article_name, article, files, problems = None, None, {}, {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                name = Path(member.name).name
                suffix = Path(name).suffix.lower()
                if not member.isfile() or suffix not in IMAGE_SUFFIXES + (".nxml",):
                    continue
                if member.size > max_file_bytes:  # checked from the header, before a byte is read
                    problems[name] = ("image_too_large", str(FileTooLarge(f"{path}:{member.name}", member.size, max_file_bytes)))
                elif suffix == ".nxml":
                    if article is None:
                        article_name, article = name, tar.extractfile(member).read()
                else:
                    files[name] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise PackageError(f"{path}: unreadable or truncated tarball ({exc}); re-download it") from exc
    if article is None:
        raise PackageError(f"{path}: no .nxml article inside the package (or it is over the size cap)")
    return ArticlePackage(str(path), article_name, article, files, problems=problems)


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
    """PMC's legacy ``oa_file_list.csv`` keyed by accession id (PMCID)."""
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
