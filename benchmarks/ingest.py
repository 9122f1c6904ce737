"""Ingest speed, all measured in this process against baselines run here:

1. ``medvlm ingest pmc`` on a synthetic legacy-package corpus with 1 and 2 processes, and the parse step
   (lxml, as pmc_ingest does it) against a straightforward ``xml.etree.ElementTree`` parse.
2. The perceptual hash ``ingest merge --near-duplicates`` computes, per image, with and without the
   reduced-size JPEG decode it uses — and what that costs per million images.
3. The PMC Cloud Service path, ``ingest pmc s3://…``, against a local S3 server (moto, see
   tests/s3_server.py) holding a synthetic Cloud Service tree (figures + a PDF + a supplement per article),
   with ``--latency-ms`` added to every request to stand in for S3's first-byte latency: articles/s at
   concurrency 1 vs 16, and bytes fetched per article vs the whole article folder.

    python benchmarks/ingest.py [--articles 2000] [--s3-articles 200] [--latency-ms 20]

The last line is the ratio: S3 ingest articles/s at concurrency 16 ÷ at concurrency 1.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image  # noqa: E402

from benchmarks.flops import matmul_peak_flops  # noqa: E402
from pmc_ingest.jats import parse_article  # noqa: E402
from pmc_ingest.packages import read_package  # noqa: E402
from pmc_ingest.pairs import IngestOptions, ingest_pmc  # noqa: E402
from pmc_ingest.synthetic import ArticleSpec, FigGroupSpec, FigureSpec, write_package  # noqa: E402

SENTENCES = ["Axial contrast-enhanced CT shows a hypodense lesion in the liver.",
             "The patient was followed for six months without recurrence.",
             "Histology confirmed a well-differentiated adenocarcinoma.",
             "T2-weighted MRI demonstrates a hyperintense mass.", "Laboratory values were within normal limits."]


def make_corpus(root: Path, n: int, seed: int = 0) -> None:
    for spec in article_specs(n, seed):
        write_package(spec, root)


def article_specs(n: int, seed: int = 0):
    rng = random.Random(seed)
    for i in range(n):
        figures = []
        for k in range(1, 4):
            image = Image.new("RGB", (96, 96), (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
            image.putpixel((i % 96, k), (i % 256, k, 7))  # unique bytes: no dedup hits
            caption = f"<p>(A) {rng.choice(SENTENCES)} (B) {rng.choice(SENTENCES)} <italic>n</italic> = {k}.</p>"
            figures.append(FigureSpec(f"F{k}", f"Figure {k}", caption, f"a{i}_f{k}", image))
        figures.append(FigGroupSpec("G4", "Figure 4", f"<p>{rng.choice(SENTENCES)}</p>", [
            FigureSpec("F4a", "4a", f"<p>{rng.choice(SENTENCES)}</p>", f"a{i}_f4a", None)]))
        paragraphs = "".join(
            f'<p>{" ".join(rng.choice(SENTENCES) for _ in range(6))} See <xref ref-type="fig" rid="F{k}">Figure {k}</xref>. '
            f'{rng.choice(SENTENCES)}</p>' for k in range(1, 4) for _ in range(3))
        yield ArticleSpec(f"PMC{9_000_000 + i}", body_xml=paragraphs, figures=figures)


def make_cloud_corpus(root: Path, n: int, seed: int = 1) -> None:
    """Cloud Service layout: PMCID.1/ with the XML, 800x600 figures, a 1 MB PDF and a 400 kB supplement, + metadata/."""
    import io

    from pmc_ingest.synthetic import _all_figures, article_xml, cloud_metadata, write_version_folder

    rng = random.Random(seed)
    for spec in article_specs(n, seed):
        name = f"{spec.pmcid}.1"
        files = {f"{name}.xml": article_xml(spec).encode(), f"{name}.txt": b"text " * 4000,
                 f"{name}.pdf": rng.randbytes(1_000_000), "mmc1.xlsx": rng.randbytes(400_000)}
        for fig in _all_figures(spec):
            if fig.image is not None:  # figure-sized JPEGs (PMC's are typically 100-500 kB)
                image = Image.effect_noise((800, 600), 25).convert("RGB")
                image.paste(fig.image.resize((300, 300)), (rng.randrange(400), rng.randrange(250)))
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=85)
                files[f"{fig.graphic}.jpg"] = buffer.getvalue()
        write_version_folder(root, spec.pmcid, 1, files, cloud_metadata(spec.pmcid, 1, files))


def etree_parse(data: bytes) -> int:
    """What a first script would do: ElementTree, findall figures, itertext captions, scan paragraphs."""
    root = ET.fromstring(data)
    figures = {}
    for fig in root.iter("fig"):
        caption = fig.find("caption")
        figures[fig.get("id")] = " ".join("".join(caption.itertext()).split()) if caption is not None else ""
    mentions = {fid: [] for fid in figures}
    for p in root.iter("p"):
        text = "".join(p.itertext())
        for xref in p.iter("xref"):
            if xref.get("ref-type") == "fig":
                for sentence in re.split(r"(?<=\.)\s+", text):
                    if (xref.text or "") in sentence:
                        mentions.setdefault(xref.get("rid"), []).append(sentence)
                        break
    return len(figures)


def phash_cost(tmp: Path, n: int = 40) -> None:
    """Seconds per image of the merge's perceptual hash on typical PMC figure JPEGs (1200x900)."""
    import imagehash
    from PIL import Image

    from pmc_ingest.merge import perceptual_hash

    rng = random.Random(3)
    paths = []
    for i in range(n):
        image = Image.effect_noise((1200, 900), 40 + i).convert("RGB")
        image.paste((rng.randrange(256), 90, 30), (100, 100, 600, 500))
        paths.append(tmp / f"fig{i}.jpg")
        image.save(paths[-1], quality=90)
    start = time.perf_counter()
    for path in paths:
        with Image.open(path) as image:
            imagehash.phash(image)
    full = (time.perf_counter() - start) / n
    start = time.perf_counter()
    for path in paths:
        perceptual_hash(str(path))
    draft = (time.perf_counter() - start) / n
    print(f"phash per 1200x900 JPEG: {draft * 1e3:.1f} ms with reduced-size decode, {full * 1e3:.1f} ms full decode "
          f"({full / draft:.1f}x); --near-duplicates costs ~{draft * 1e6 / 3600:.1f} CPU-hours per million images")


def s3_rates(tmp: Path, n: int, latency_ms: float) -> None:
    from tests.s3_server import BUCKET, LocalS3

    root = tmp / BUCKET
    make_cloud_corpus(root, n)
    ids = tmp / "ids.txt"
    ids.write_text("".join(f"PMC{9_000_000 + i}\n" for i in range(n)))
    folder_bytes = sum(p.stat().st_size for p in root.glob("PMC*/*") if p.is_file()) / n
    rates = {}
    with LocalS3(delay_s=latency_ms / 1000, own_process=True) as s3:
        s3.upload_tree(root)
        for concurrency in (1, 16):
            start = time.perf_counter()
            report = ingest_pmc([f"s3://{BUCKET}"], tmp / f"s3_{concurrency}", IngestOptions(
                pmcids=str(ids), endpoint_url=s3.url, concurrency=concurrency), progress=False)
            rates[concurrency] = n / (time.perf_counter() - start)
            print(f"ingest pmc s3:// (moto server process, +{latency_ms:.0f} ms/request), concurrency {concurrency}: "
                  f"{rates[concurrency]:.1f} articles/s ({report.pairs_kept} pairs, {report.fetch['requests']} requests)")
    fetched = report.fetch["bytes"] / n
    print(f"bytes fetched per article: {fetched / 1e3:.0f} kB (metadata + XML + cited figures) vs the whole article "
          f"folder {folder_bytes / 1e3:.0f} kB: {folder_bytes / fetched:.1f}x less")
    print(f"S3 ingest speedup concurrency 16 vs 1: {rates[16] / rates[1]:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--articles", type=int, default=2000)
    parser.add_argument("--s3-articles", type=int, default=200)
    parser.add_argument("--latency-ms", type=float, default=20.0, help="added to every S3 request (S3 first-byte latency)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "corpus"
        make_corpus(root, args.articles)
        sources = sorted(root.glob("*.tar.gz"))
        articles = [read_package(s).article for s in sources]
        rates = {}
        for procs in (1, 2):
            start = time.perf_counter()
            report = ingest_pmc([root], Path(tmp) / f"out{procs}", IngestOptions(num_proc=procs), progress=False)
            rates[procs] = args.articles / (time.perf_counter() - start)
            print(f"ingest pmc, {procs} process(es): {rates[procs]:.1f} articles/s "
                  f"({report.pairs_kept} pairs from {report.articles_read} articles)")
        timings = {"lxml": [], "etree": []}
        for _ in range(3):  # alternate to share machine noise
            start = time.perf_counter()
            for data in articles:
                parse_article(data)
            timings["lxml"].append(time.perf_counter() - start)
            start = time.perf_counter()
            for data in articles:
                etree_parse(data)
            timings["etree"].append(time.perf_counter() - start)
        lxml_rate = len(articles) / min(timings["lxml"])
        etree_rate = len(articles) / min(timings["etree"])
        print(f"parse only: pmc_ingest (lxml) {lxml_rate:.1f} articles/s, ElementTree baseline {etree_rate:.1f} articles/s")
        print(f"matmul peak (fp32): {matmul_peak_flops() / 1e9:.1f} GFLOP/s; ingest does no model FLOPs, MFU n/a")
        print(f"speedup 2 processes vs 1: {rates[2] / rates[1]:.2f}x")
        print(f"parse ratio pmc_ingest/ElementTree: {lxml_rate / etree_rate:.2f}x")
        phash_cost(Path(tmp))
        s3_rates(Path(tmp), args.s3_articles, args.latency_ms)


if __name__ == "__main__":
    main()
