"""The PMC Cloud Service layout — how PMC distributes the Open Access subset since 2026 — read from a
local mirror or straight from ``s3://pmc-oa-opendata`` (or any S3-compatible copy of it).

What this relies on (PMC's "Accessing PMC Article Datasets Using Amazon Web Services" page, 2026 update,
and the pmc-toolkit package that reads the same bucket with unsigned boto3 requests):

- one prefix per *article version*, ``PMCID.N/`` (e.g. ``PMC11370360.1/``, ``PMC11370360.2/``), holding
  ``PMCID.N.xml`` (JATS), ``.txt``, ``.pdf`` when there is one, ``PMCID.N.json`` and the media and
  supplementary files under their own names (``gr1.jpg``, ``mmc1.pdf``);
- ``metadata/PMCID.N.json`` (also copied into the version prefix) with ``pmcid``, ``version``, ``pmid``,
  ``doi``, ``license_code`` (``CC BY``, ``CC BY-NC``, ``CC0``…, ``TDM`` for author manuscripts, or null),
  ``is_retracted``, ``is_pmc_openaccess``, ``is_manuscript``, ``xml_url``, ``pdf_url``, ``text_url`` and
  ``media_urls``; every URL carries the object's MD5 as ``?md5=…``;
- the versions of a PMCID are the prefixes ``list_objects_v2(Prefix="PMCID.", Delimiter="/")`` returns;
- a daily S3 inventory (CSV rows ``"pmc-oa-opendata","metadata/PMCID.N.json",date,etag``) lists every
  version; ``read_id_list`` accepts those rows (plain or ``.csv.gz``) as well as one PMCID per line.

Choices: only the highest version of a PMCID is used, the others are reported as superseded; an article
whose metadata says ``is_retracted`` is dropped and counted; ``--license`` is matched against
``license_code`` before any XML is read (when the code is null, the JATS ``<license>`` decides, as for
legacy packages). Remotely, metadata and XML are fetched first, then only the media files that a
``<fig>``'s ``<graphic>`` cites — never the PDF, text or supplements.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
from collections import defaultdict
from pathlib import Path

from medvlm.fileio import atomic_write_bytes

from .packages import IMAGE_SUFFIXES, ArticlePackage, FileMissing, PackageError, read_folder, safe_name, safe_pmcid
from .s3 import FetchError, S3Store

_VERSION = re.compile(r"(PMC\d+)\.(\d+)")
_ID = re.compile(r"(?<![A-Za-z0-9])(PMC)?(\d+)(?:\.(\d+))?(?![0-9])", re.I)


def split_version(name: str) -> tuple[str, int] | None:
    """``PMC123.2`` → (``PMC123``, 2); None for anything else."""
    match = _VERSION.fullmatch(name)
    return (match.group(1), int(match.group(2))) if match else None


def is_version_folder(path: Path) -> bool:
    """A local article-version folder: named ``PMCID.N`` and holding a regular ``PMCID.N.xml``."""
    return split_version(path.name) is not None and (path / f"{path.name}.xml").is_file()


def latest_versions(sources: list[Path]) -> tuple[list[Path], list[str]]:
    """Keep the highest version folder of each PMCID (other sources pass through); name the rest."""
    best: dict[str, Path] = {}
    superseded: list[str] = []
    for path in sources:
        parsed = split_version(path.name) if is_version_folder(path) else None
        if parsed is None:
            continue
        current = best.get(parsed[0])
        if current is None or split_version(current.name)[1] < parsed[1]:
            if current is not None:
                superseded.append(str(current))
            best[parsed[0]] = path
        else:
            superseded.append(str(path))
    kept = [p for p in sources if not is_version_folder(p) or best.get(split_version(p.name)[0]) == p]
    return kept, sorted(superseded)


def read_version_folder(folder: Path, max_file_bytes: int) -> ArticlePackage:
    """A local ``PMCID.N/`` folder with its metadata (``PMCID.N/PMCID.N.json`` or ``../metadata/``)."""
    package = read_folder(folder, (".xml",), max_file_bytes, article_name=f"{folder.name}.xml")
    for candidate in (folder / f"{folder.name}.json", folder.parent / "metadata" / f"{folder.name}.json"):
        if candidate.is_file():
            try:
                package.metadata = json.loads(candidate.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as exc:
                raise PackageError(f"{candidate}: metadata is not valid JSON ({exc}); re-download it") from exc
            if not isinstance(package.metadata, dict):
                raise PackageError(f"{candidate}: metadata is not a JSON object")
            break
    return package


def article_skip_reason(metadata: dict | None, licenses: list[str] | None) -> str | None:
    """``retracted`` / ``license_not_allowed`` from the metadata alone (no XML needed), else None."""
    if not metadata:
        return None
    if metadata.get("is_retracted") is True:
        return "retracted"
    code = license_from_metadata(metadata)
    if licenses is not None and code is not None and code not in {normalise_license_code(x) for x in licenses}:
        return "license_not_allowed"
    return None


def normalise_license_code(code: str) -> str:
    """``cc by-nc`` / ``CC-BY-NC`` / ``CC BY-NC 4.0`` → ``CC BY-NC`` (what ``license_code`` holds)."""
    text = " ".join(code.strip().upper().replace("_", " ").split())
    text = re.sub(r"\s+\d+(\.\d+)?$", "", text)                       # a version number: "CC BY 4.0"
    if text.startswith("CC-"):
        text = "CC " + text[3:]
    return {"CC ZERO": "CC0", "CC 0": "CC0"}.get(text, text)


def license_from_metadata(metadata: dict) -> str | None:
    code = metadata.get("license_code")
    return normalise_license_code(code) if isinstance(code, str) and code.strip() else None


def metadata_fields(metadata: dict | None) -> dict:
    """pmcid / version / pmid / doi / license from a metadata JSON (None where absent)."""
    metadata = metadata or {}
    version = metadata.get("version")
    return {"pmcid": safe_pmcid(str(metadata.get("pmcid") or "")),
            "version": int(version) if isinstance(version, int) or str(version).isdigit() else None,
            "pmid": str(metadata["pmid"]) if metadata.get("pmid") not in (None, "") else None,
            "doi": metadata.get("doi") or None, "license": license_from_metadata(metadata)}


# ------------------------------------------------------------------------------------ id lists
def read_id_list(path: str | Path) -> tuple[list[str], list[str]]:
    """PMCIDs to fetch from a file: one id per line (``PMC123``, ``123``, ``PMC123.2``), or PMC's S3
    inventory CSV (``.csv`` / ``.csv.gz``). Versioned ids keep the highest version of each PMCID.
    Returns (ids sorted by PMCID number, superseded versioned ids)."""
    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    versions: dict[str, set[int | None]] = defaultdict(set)
    with opener(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            match = _ID.search(line.split(",")[1] if line.count(",") >= 2 else line)
            if match is None:
                raise ValueError(f"{path}: line {line[:80]!r} holds no PMCID; expected one id per line or "
                                 "PMC's S3 inventory CSV")
            versions[f"PMC{int(match.group(2))}"].add(int(match.group(3)) if match.group(3) else None)
    ids, superseded = [], []
    for pmcid in sorted(versions, key=lambda p: int(p[3:])):
        numbered = sorted(v for v in versions[pmcid] if v is not None)
        if None in versions[pmcid] or not numbered:
            ids.append(pmcid)                      # the latest version is looked up in the bucket
            superseded += [f"{pmcid}.{v}" for v in numbered]
        else:
            ids.append(f"{pmcid}.{numbered[-1]}")
            superseded += [f"{pmcid}.{v}" for v in numbered[:-1]]
    return ids, superseded


# ------------------------------------------------------------------------------------ from S3
def resolve_version(store: S3Store, requested: str) -> tuple[str, list[str]]:
    """``PMC123`` → its highest version prefix ``PMC123.N`` and the superseded ones; ``PMC123.2`` as given."""
    if split_version(requested):
        return requested, []
    found = sorted((v for v in map(split_version, store.list_prefixes(f"{requested}.")) if v and v[0] == requested),
                   key=lambda v: v[1])
    if not found:
        raise FileMissing(f"{store.url(requested)}.*: no version of {requested} in the bucket")
    names = [f"{p}.{n}" for p, n in found]
    return names[-1], names[:-1]


def fetch_package(store: S3Store, version: str, licenses: list[str] | None, max_file_bytes: int,
                  cache_dir: Path | None = None) -> tuple[ArticlePackage | None, str | None]:
    """Metadata, then (unless retracted / license-filtered) the XML; media are fetched on demand by the
    package's loader, only for names the metadata lists. Returns (package, skip reason)."""
    try:
        metadata = json.loads(store.get(f"metadata/{version}.json"))
    except FileMissing:  # the copy inside the version prefix
        metadata = json.loads(store.get(f"{version}/{version}.json"))
    if not isinstance(metadata, dict):
        raise PackageError(f"{store.url(f'metadata/{version}.json')}: metadata is not a JSON object")
    reason = article_skip_reason(metadata, licenses)
    if reason:
        return None, reason
    xml_name, xml_md5 = _name_and_md5(metadata.get("xml_url")) if metadata.get("xml_url") else (f"{version}.xml", None)
    article = store.get(f"{version}/{safe_name(xml_name)}", md5=xml_md5)
    media = dict(_name_and_md5(url) for url in metadata.get("media_urls") or [])
    package = ArticlePackage(store.url(f"{version}/"), xml_name, article, metadata=metadata)
    package.lazy = {name for name in media if name == safe_name(name) and name.lower().endswith(IMAGE_SUFFIXES)}
    package.loader = lambda name: _cached_get(store, version, name, max_file_bytes, media.get(name), cache_dir)
    return package, None


def _name_and_md5(url: str) -> tuple[str, str | None]:
    """``s3://bucket/PMC1.1/gr1.jpg?md5=abc`` → (``gr1.jpg``, ``abc``): only the base name is ever used."""
    path, _, query = str(url).partition("?")
    md5 = next((part[4:] for part in query.split("&") if part.startswith("md5=")), None)
    return path.rsplit("/", 1)[-1], md5


def _cached_get(store: S3Store, version: str, name: str, limit: int, md5: str | None, cache_dir: Path | None) -> bytes:
    """A media GET kept on disk until the article is finished, so a killed run never fetches it twice."""
    cached = cache_dir / version / name if cache_dir else None
    if cached is not None and cached.is_file() and cached.stat().st_size <= limit:
        return cached.read_bytes()
    data = store.get(f"{version}/{name}", limit=limit, md5=md5)
    if cached is not None:
        atomic_write_bytes(cached, data, fsync=False)  # a cache: fetched again if lost
    return data


def forget_cached(cache_dir: Path | None, version: str) -> None:
    """Drop an article's fetched media once its rows and images are safely written."""
    if cache_dir is not None and split_version(version):
        shutil.rmtree(cache_dir / version, ignore_errors=True)


__all__ = ["FetchError", "S3Store", "article_skip_reason", "fetch_package", "forget_cached", "is_version_folder",
           "latest_versions", "metadata_fields", "read_id_list", "read_version_folder", "resolve_version"]
