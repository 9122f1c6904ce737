"""Write PMC Open Access packages the way PMC ships them, from a small description.

A package is ``PMCID.tar.gz`` holding ``PMCID/<name>.nxml`` (JATS, no namespace, xlink hrefs without file
extensions) and the figure files next to it. Used by the demo (real DICOM-derived figures), the tests
(every JATS shape the parser must handle) and ``benchmarks/ingest.py`` (thousands of articles).
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

from PIL import Image


@dataclass
class FigureSpec:
    fig_id: str
    label: str
    caption_xml: str                 # inner XML of <caption> (may hold <title>, <p>, <italic>, <bold>…)
    graphic: str | None = None       # href (no extension); None: a figure without a graphic element
    image: Image.Image | None = None  # None with a graphic: the file is absent from the package
    image_format: str = "JPEG"
    in_floats_group: bool = False


@dataclass
class FigGroupSpec:
    group_id: str
    label: str
    caption_xml: str
    figures: list[FigureSpec]


@dataclass
class ArticleSpec:
    pmcid: str
    title: str = "A case report"
    journal: str = "Journal of Synthetic Radiology"
    year: int = 2023
    pmid: str | None = "12345678"
    license_url: str | None = "https://creativecommons.org/licenses/by/4.0/"
    body_xml: str = "<p>No figures are cited.</p>"
    figures: list[FigureSpec | FigGroupSpec] = field(default_factory=list)


def article_xml(spec: ArticleSpec) -> str:
    body_figs = [f for f in spec.figures if not (isinstance(f, FigureSpec) and f.in_floats_group)]
    float_figs = [f for f in spec.figures if isinstance(f, FigureSpec) and f.in_floats_group]
    license_xml = (f'<permissions><license xlink:href="{spec.license_url}"><license-p>Open access under '
                   f'{escape(spec.license_url)}.</license-p></license></permissions>' if spec.license_url else "")
    pmid = f'<article-id pub-id-type="pmid">{spec.pmid}</article-id>' if spec.pmid else ""
    floats = f"<floats-group>{''.join(map(_figure_xml, float_figs))}</floats-group>" if float_figs else ""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<!DOCTYPE article PUBLIC "-//NLM//DTD JATS (Z39.96) Journal Archiving and Interchange DTD v1.2 20190208//EN" '
        '"JATS-archivearticle1.dtd">\n'
        '<article xmlns:xlink="http://www.w3.org/1999/xlink" xmlns:mml="http://www.w3.org/1998/Math/MathML" '
        'article-type="case-report">'
        f'<front><journal-meta><journal-title-group><journal-title>{escape(spec.journal)}</journal-title>'
        '</journal-title-group></journal-meta><article-meta>'
        f'<article-id pub-id-type="pmc">{spec.pmcid[3:]}</article-id>{pmid}'
        f'<title-group><article-title>{escape(spec.title)}</article-title></title-group>'
        f'<pub-date pub-type="epub"><year>{spec.year}</year></pub-date>{license_xml}</article-meta></front>'
        f'<body><sec><title>Case</title>{spec.body_xml}{"".join(map(_figure_xml, body_figs))}</sec></body>'
        f'{floats}</article>'
    )


def _figure_xml(fig) -> str:
    if isinstance(fig, FigGroupSpec):
        inner = "".join(_figure_xml(f) for f in fig.figures)
        return (f'<fig-group id="{fig.group_id}"><label>{fig.label}</label><caption>{fig.caption_xml}</caption>'
                f'{inner}</fig-group>')
    graphic = f'<graphic xlink:href="{fig.graphic}"/>' if fig.graphic else ""
    label = f"<label>{fig.label}</label>" if fig.label else ""
    return f'<fig id="{fig.fig_id}" position="float">{label}<caption>{fig.caption_xml}</caption>{graphic}</fig>'


def _all_figures(spec: ArticleSpec):
    for fig in spec.figures:
        yield from (fig.figures if isinstance(fig, FigGroupSpec) else [fig])


def _image_bytes(fig: FigureSpec) -> bytes:
    buffer = io.BytesIO()
    fig.image.convert("RGB").save(buffer, format=fig.image_format)
    return buffer.getvalue()


_SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "TIFF": ".tif"}


def write_package(spec: ArticleSpec, out_dir: str | Path, nxml_override: bytes | None = None) -> Path:
    """Write ``out_dir/PMCID.tar.gz`` as PMC does; ``nxml_override`` replaces the article bytes (bad input)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{spec.pmcid}.tar.gz"
    members = {f"{spec.pmcid}/{spec.pmcid.lower()}.nxml": nxml_override or article_xml(spec).encode("utf-8")}
    for fig in _all_figures(spec):
        if fig.graphic and fig.image is not None:
            members[f"{spec.pmcid}/{fig.graphic}{_SUFFIX[fig.image_format]}"] = _image_bytes(fig)
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return path


def write_folder(spec: ArticleSpec, out_dir: str | Path) -> Path:
    """The same article as an already-extracted folder."""
    folder = Path(out_dir) / spec.pmcid
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{spec.pmcid.lower()}.nxml").write_text(article_xml(spec), encoding="utf-8")
    for fig in _all_figures(spec):
        if fig.graphic and fig.image is not None:
            (folder / f"{fig.graphic}{_SUFFIX[fig.image_format]}").write_bytes(_image_bytes(fig))
    return folder


def cloud_metadata(pmcid: str, version: int, files: dict[str, bytes], bucket: str = "pmc-oa-opendata", **fields) -> dict:
    """The metadata JSON PMC's Cloud Service keeps for an article version (fields as its AWS page lists;
    every URL carries the object's MD5 as ``?md5=``). ``files`` are the version folder's files."""
    import hashlib

    name = f"{pmcid}.{version}"

    def url(file: str) -> str:
        return f"s3://{bucket}/{name}/{file}?md5={hashlib.md5(files[file]).hexdigest()}"

    media = [url(f) for f in sorted(files) if not f.startswith(f"{name}.")]
    data = {"pmcid": pmcid, "version": version, "pmid": None, "doi": None, "mid": None, "title": None,
            "citation": None, "is_pmc_openaccess": True, "is_manuscript": False, "is_historical_ocr": False,
            "is_retracted": False, "license_code": "CC BY",
            "pdf_url": url(f"{name}.pdf") if f"{name}.pdf" in files else None, "xml_url": url(f"{name}.xml"),
            "text_url": url(f"{name}.txt") if f"{name}.txt" in files else None, "media_urls": media}
    data.update(fields)
    return data


def write_version_folder(root: str | Path, pmcid: str, version: int, files: dict[str, bytes], metadata: dict | None,
                         sibling_metadata: bool = True) -> Path:
    """``root/PMCID.N/`` with ``files`` (the XML as ``PMCID.N.xml``) and its metadata JSON both inside the
    folder and, when ``sibling_metadata``, in ``root/metadata/`` — the PMC Cloud Service layout."""
    import json

    folder = Path(root) / f"{pmcid}.{version}"
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    if metadata is not None:
        text = json.dumps(metadata)
        (folder / f"{folder.name}.json").write_text(text)
        if sibling_metadata:
            (Path(root) / "metadata").mkdir(exist_ok=True)
            (Path(root) / "metadata" / f"{folder.name}.json").write_text(text)
    return folder
