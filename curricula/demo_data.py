"""The demo's data, made at run time from real medical images that ship with pydicom and pydicom-data.

Each real DICOM (CT, MRI, X-ray, ultrasound; see ``medvlm.sample_images``) is rendered once and varied
by crops, flips and small rotations, so the tiny model sees several views per modality. Captions and
question/answer turns state the modality and body part, as PMC captions and VQA-RAD questions do.
Variants of some source files are held out entirely for evaluation (unseen images).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from medvlm.imaging import load_image
from medvlm.sample_images import SAMPLES, SampleImage

MODALITY_PHRASES = {
    "CT": "computed tomography (CT)",
    "MRI": "magnetic resonance imaging (MRI)",
    "X-ray": "a plain radiograph (X-ray)",
    "ultrasound": "ultrasound",
}


@dataclass
class DemoImage:
    file: str           # relative to the image folder
    sample: SampleImage
    held_out: bool


def render_variants(out_dir: Path, variants_per_image: int = 6, size: int = 224, seed: int = 0,
                    held_out_every: int = 3) -> list[DemoImage]:
    """Write PNG variants of every sample image; every ``held_out_every``-th variant is held out."""
    rng = random.Random(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    images: list[DemoImage] = []
    for sample in SAMPLES:
        base = load_image(sample.path)
        for k in range(variants_per_image):
            image = _variant(base, k, rng, size)
            name = f"{Path(sample.name).stem}_v{k}.png"
            image.save(out_dir / name)
            images.append(DemoImage(name, sample, held_out=(k % held_out_every == held_out_every - 1)))
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
    if k % 3 == 2:
        image = image.rotate(rng.uniform(-10, 10), fillcolor=(0, 0, 0))
    image.thumbnail((size, size))
    return image


def caption(sample: SampleImage) -> str:
    return f"{MODALITY_PHRASES[sample.modality].capitalize()} of the {sample.body_part}: {sample.description}."


def alignment_records(images: list[DemoImage]) -> list[dict]:
    prompts = ["Describe the image concisely.", "Provide a brief description of the given image.",
               "Summarize the visual content of the image."]
    return [{"id": f"align-{i}", "image": img.file,
             "conversations": [{"from": "human", "value": f"<image>\n{prompts[i % len(prompts)]}"},
                               {"from": "gpt", "value": caption(img.sample)}]}
            for i, img in enumerate(images) if not img.held_out]


def instruction_records(images: list[DemoImage]) -> list[dict]:
    records = []
    for i, img in enumerate(images):
        if img.held_out:
            continue
        s = img.sample
        records.append({"id": f"instruct-{i}", "image": img.file, "conversations": [
            {"from": "human", "value": "<image>\nWhat imaging modality was used for this image?"},
            {"from": "gpt", "value": f"This image was acquired with {MODALITY_PHRASES[s.modality]}."},
            {"from": "human", "value": "Which part of the body is shown?"},
            {"from": "gpt", "value": f"The image shows the {s.body_part}."},
        ]})
    return records


def vqa_questions(image: DemoImage, modalities: list[str]) -> list[dict]:
    """VQA-RAD-style questions: closed yes/no about each modality, and open ones."""
    s = image.sample
    questions = [{"question": f"Is this a {m} image?", "answer": "yes" if m == s.modality else "no",
                  "answer_type": "CLOSED"} for m in modalities]
    questions.append({"question": "What modality is shown?", "answer": s.modality, "answer_type": "OPEN"})
    questions.append({"question": "What part of the body is shown?", "answer": s.body_part, "answer_type": "OPEN"})
    return questions


def write_json(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=1))
    return path
