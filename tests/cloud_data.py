"""The vendored real PMC articles (tests/data/pmc_real/) laid out as PMC serves them today (Cloud Service
article-version folders with metadata JSON) and as legacy ``.tar.gz`` packages, with the same figures.

Cloud tree: PMC6000000 in two versions (v1 lacks its figure files, so using it would lose every pair),
PMC6500000 whose metadata says ``CC BY-NC`` (its JATS says CC BY), and a retracted article. Each folder
also holds the text, a PDF and a supplement that ingest must never fetch. The figure images are made
here (the articles' own figures are not vendored): distinct, decodable JPEGs named after each
``<graphic xlink:href>``, as PMC names media files.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

from PIL import Image

from pmc_ingest.synthetic import ArticleSpec, FigureSpec, article_xml, cloud_metadata, write_version_folder

REAL_PMC = Path(__file__).resolve().parent / "data" / "pmc_real"
RETRACTED = "PMC1000010"
LICENSES = {"PMC6000000": "CC BY", "PMC6500000": "CC BY-NC"}


def figure_image(seed: int, size=(320, 240)) -> bytes:
    image = Image.new("RGB", size, (seed * 37 % 256, seed * 91 % 256, seed * 53 % 256))
    for x in range(0, size[0], 5):
        image.putpixel((x, (x * seed) % size[1]), (255, 255, 255))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def article_files(pmcid: str, seed: int = 0) -> tuple[bytes, dict[str, bytes]]:
    """The article's XML and one image per ``<graphic>`` href (``href.jpg``)."""
    xml = (REAL_PMC / f"{pmcid}.xml").read_bytes()
    hrefs = re.findall(rb'<graphic xlink:href="([^"]+)"', xml)
    return xml, {f"{h.decode()}.jpg": figure_image(seed + i + 1) for i, h in enumerate(hrefs)}


def _extras(name: str, pages: int = 1) -> dict[str, bytes]:
    return {f"{name}.txt": b"plain text of the article\n", f"{name}.pdf": b"%PDF-1.4\n" + b"0" * 300_000 * pages,
            "mmc1.docx": b"PK" + b"1" * 200_000}


def write_cloud_tree(root: Path, with_retracted: bool = True) -> Path:
    for pmcid in ("PMC6000000", "PMC6500000"):
        xml, media = article_files(pmcid, seed=10 if pmcid == "PMC6500000" else 0)
        version = 2 if pmcid == "PMC6000000" else 1
        name = f"{pmcid}.{version}"
        files = {f"{name}.xml": xml, **media, **_extras(name)}
        write_version_folder(root, pmcid, version, files, cloud_metadata(
            pmcid, version, files, license_code=LICENSES[pmcid]), sibling_metadata=pmcid == "PMC6000000")
    old = {"PMC6000000.1.xml": article_files("PMC6000000")[0]}  # v1: an older version without figure files
    write_version_folder(root, "PMC6000000", 1, old, cloud_metadata("PMC6000000", 1, old))
    if with_retracted:
        spec = ArticleSpec(RETRACTED, figures=[FigureSpec("F1", "Figure 1", "<p>Axial CT of the chest shows a mass "
                                                          "in the right upper lobe.</p>", "gr1", None)])
        files = {f"{RETRACTED}.1.xml": article_xml(spec).encode(), "gr1.jpg": figure_image(99)}
        write_version_folder(root, RETRACTED, 1, files, cloud_metadata(RETRACTED, 1, files, is_retracted=True))
    return root


def write_legacy_packages(root: Path) -> tuple[Path, Path]:
    """The same two articles as legacy ``PMCID.tar.gz`` packages, and the ``oa_file_list.csv`` naming their
    licenses (the legacy way PMC said what the metadata JSON now says)."""
    import tarfile

    root.mkdir(parents=True, exist_ok=True)
    for pmcid in ("PMC6000000", "PMC6500000"):
        xml, media = article_files(pmcid, seed=10 if pmcid == "PMC6500000" else 0)
        with tarfile.open(root / f"{pmcid}.tar.gz", "w:gz") as tar:
            for name, data in {f"{pmcid.lower()}.nxml": xml, **media}.items():
                info = tarfile.TarInfo(f"{pmcid}/{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    csv = root.parent / "oa_file_list.csv"
    csv.write_text("File,Article Citation,Accession ID,Last Updated (YYYY-MM-DD HH:MM:SS),PMID,License\n" + "".join(
        f"oa_package/00/00/{p}.tar.gz,J. 2019,{p},2019-01-01 00:00:00,,{lic}\n" for p, lic in LICENSES.items()))
    return root, csv
