"""Ingest speed: articles/s of ``medvlm ingest pmc`` with 1 and 2 processes on a synthetic PMC corpus,
and the parse step (lxml, as pmc_ingest does it) against a straightforward ``xml.etree.ElementTree``
parse of the same articles, in the same process.

    python benchmarks/ingest.py [--articles 2000]

The last line is the ratio: pmc_ingest parse speed ÷ ElementTree parse speed.
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
        write_package(ArticleSpec(f"PMC{9_000_000 + i}", body_xml=paragraphs, figures=figures), root)


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--articles", type=int, default=2000)
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


if __name__ == "__main__":
    main()
