"""The demo's data, made at run time on a laptop with no network (``build_demo_data``):

1. ``general/`` — the laptop stand-in for LLaVA's data: shapes in colours on textured backgrounds drawn
   with Pillow, with captions (stage 1) and question/answer turns (stage 2) describing them.
2. ``pmc/`` — PMC-style OA packages (JATS + figure JPEGs) whose figures are **real medical images**:
   the CT, MRI, X-ray and ultrasound DICOMs shipped in pydicom and pydicom-data (``medvlm.sample_images``),
   rendered and varied by crops, flips and small rotations, with captions stating modality and content.
   They go through ``pmc_ingest`` like real packages: pairs → alignment data, and instruction data from
   the captions by ``pmc_ingest.instruct_template`` (documented there) — the demo never needs a key.
3. ``vqa_rad/`` — a VQA-RAD-layout set (``VQA_RAD Dataset Public.json`` + image folder) from the same
   scans: balanced closed questions ("Is this a CT image?", yes for the true modality and no for one
   other) and open ones ("What modality is shown?"). Test questions are asked about held-out views that
   no stage trained on (new crops of the same scans: say so when quoting the numbers).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageOps

from medvlm.imaging import load_image
from medvlm.sample_images import SAMPLES, SampleImage

MODALITY_PHRASES = {"CT": "computed tomography (CT)", "MRI": "magnetic resonance imaging (MRI)",
                    "X-ray": "a plain radiograph (X-ray)", "ultrasound": "ultrasound"}
QUESTION_MODALITY = {"CT": "CT", "MRI": "MRI", "X-ray": "X-ray", "ultrasound": "ultrasound"}


@dataclass
class DemoImage:
    image: Image.Image
    name: str
    sample: SampleImage
    held_out: bool


def render_variants(variants_per_image: int = 18, size: int = 224, seed: int = 0, held_out_every: int = 3) -> list[DemoImage]:
    """Views of every real sample scan; every ``held_out_every``-th view is kept for testing only."""
    rng = random.Random(seed)
    images = []
    for sample in SAMPLES:
        base = load_image(sample.path)
        for k in range(variants_per_image):
            images.append(DemoImage(_variant(base, k, rng, size), f"{Path(sample.name).stem.lower()}_v{k}", sample,
                                    held_out=(k % held_out_every == held_out_every - 1)))
    return images


def _variant(image: Image.Image, k: int, rng: random.Random, size: int) -> Image.Image:
    width, height = image.size
    if k > 0:
        scale = rng.uniform(0.7, 0.95)
        w, h = int(width * scale), int(height * scale)
        left, top = rng.randint(0, width - w), rng.randint(0, height - h)
        image = image.crop((left, top, left + w, top + h))
    if k % 2 == 1:
        image = ImageOps.mirror(image)
    if k % 4 == 2:
        image = image.rotate(rng.uniform(-10, 10), fillcolor=(0, 0, 0))
    image = image.copy()
    image.thumbnail((size, size))
    return image


def caption(sample: SampleImage) -> str:
    return f"{MODALITY_PHRASES[sample.modality].capitalize()} of the {sample.body_part}: {sample.description}."


# ------------------------------------------------------------------------------------ general (LLaVA stand-in)
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (230, 200, 40)}


def general_images(n: int = 72, seed: int = 1) -> list[tuple[Image.Image, str, str]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        shape, colour = SHAPES[i % 3], list(COLOURS)[(i // 3) % 4]
        image = Image.new("RGB", (224, 224), tuple(rng.randrange(200, 256) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        for y in range(0, 224, rng.choice((8, 16, 224))):  # stripes or plain: a texture to ignore
            draw.line([(0, y), (224, y)], fill=(rng.randrange(150, 200),) * 3)
        x, y, r = rng.randrange(60, 164), rng.randrange(60, 164), rng.randrange(25, 50)
        box = [x - r, y - r, x + r, y + r]
        if shape == "circle":
            draw.ellipse(box, fill=COLOURS[colour])
        elif shape == "square":
            draw.rectangle(box, fill=COLOURS[colour])
        else:
            draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=COLOURS[colour])
        out.append((image, shape, colour))
    return out


def write_general(out: Path) -> tuple[Path, Path]:
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    align, instruct = [], []
    for i, (image, shape, colour) in enumerate(general_images()):
        name = f"shape_{i:03d}.png"
        image.save(images_dir / name)
        align.append({"id": f"g{i}", "image": name, "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image concisely."},
            {"from": "gpt", "value": f"A {colour} {shape} on a light background."}]})
        instruct.append({"id": f"gi{i}", "image": name, "conversations": [
            {"from": "human", "value": "<image>\nWhat shape is shown?"}, {"from": "gpt", "value": f"A {shape}."},
            {"from": "human", "value": "What colour is it?"}, {"from": "gpt", "value": f"It is {colour}."}]})
    return _write_json(out / "align.json", align), _write_json(out / "instruct.json", instruct)


# ------------------------------------------------------------------------------------ PMC-style packages
def write_pmc_packages(images: list[DemoImage], out: Path, figures_per_article: int = 3) -> Path:
    from pmc_ingest.synthetic import ArticleSpec, FigureSpec, write_package

    train = [img for img in images if not img.held_out]
    for start in range(0, len(train), figures_per_article):
        chunk = train[start:start + figures_per_article]
        pmcid = f"PMC{7_100_000 + start // figures_per_article}"
        figures, mentions = [], []
        for k, img in enumerate(chunk, 1):
            figures.append(FigureSpec(f"F{k}", f"Figure {k}", f"<p>{caption(img.sample)}</p>", f"{img.name}", img.image))
            mentions.append(f'<p>The {img.sample.body_part} was imaged with {MODALITY_PHRASES[img.sample.modality]} '
                            f'(<xref ref-type="fig" rid="F{k}">Figure {k}</xref>).</p>')
        write_package(ArticleSpec(pmcid, title=f"Imaging case {pmcid}", body_xml="".join(mentions), figures=figures), out)
    return out


# ------------------------------------------------------------------------------------ VQA-RAD-layout set
def vqa_items(images: list[DemoImage], seed: int = 2):
    from downstream.synthetic import VQAItem

    rng = random.Random(seed)
    modalities = list(MODALITY_PHRASES)
    items = []
    for img in images:
        split = "test" if img.held_out else "train"
        truth = img.sample.modality
        other = rng.choice([m for m in modalities if m != truth])
        extra = {"organ": img.sample.body_part.upper(), "question_type": "MODALITY"}
        for asked, answer in ((truth, "yes"), (other, "no")):
            items.append(VQAItem(img.image, img.name, f"Is this a {QUESTION_MODALITY[asked]} image?", answer, "CLOSED",
                                 split, extra))
        items.append(VQAItem(img.image, img.name, "What modality is shown?", truth, "OPEN", split, extra))
        items.append(VQAItem(img.image, img.name, "Which part of the body is shown?", img.sample.body_part, "OPEN",
                             split, {**extra, "question_type": "ORGAN"}))
    return items


def build_demo_data(out: str | Path) -> dict:
    """Everything the demo curriculum reads, under ``out``; returns counts for the log."""
    from downstream.synthetic import write_vqa_rad_original
    from pmc_ingest.alignment import write_alignment
    from pmc_ingest.instruct_template import write_template_instructions
    from pmc_ingest.pairs import IngestOptions, ingest_pmc

    out = Path(out)
    general_align, general_instruct = write_general(out / "general")
    images = render_variants()
    write_pmc_packages(images, out / "pmc_oa")
    report = ingest_pmc([out / "pmc_oa"], out / "pmc_pairs", IngestOptions(min_image_side=32), progress=False)
    n_align = write_alignment(out / "pmc_pairs", out / "pmc_pairs" / "alignment.json", seed=0)
    n_instruct = write_template_instructions(out / "pmc_pairs", out / "pmc_pairs" / "instruct.json", seed=0)
    write_vqa_rad_original(out / "vqa_rad", vqa_items(images))
    return {"general_images": 72, "scan_views": len(images), "held_out_views": sum(i.held_out for i in images),
            "pmc_articles": report.articles_read, "pairs": report.pairs_kept, "alignment": n_align,
            "instruct": n_instruct}


def _write_json(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=1))
    return path
