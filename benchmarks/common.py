"""Shared pieces of the benchmarks: VQA sets shaped like the real ones, and model shapes.

``write_vqa_set`` writes VQA-RAD's original layout with the statistics of VQA-RAD, SLAKE or PathVQA
(``LIKE``: questions per image, closed share, question and answer lengths, from the sets' papers and
releases) and JPEG images as the sets ship them (real CT/MR/X-ray/ultrasound pixels from pydicom's
sample files, cropped and re-encoded so every image is distinct), or DICOM files decoded on every read.
``proportioned_bundle`` is the sequence shape of CLIP-L/336 + a 7B LM (576 image tokens, vision : LM
parameters ≈ 1 : 23) at widths a CPU can train.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from medvlm.sample_images import SAMPLES

@dataclass(frozen=True)
class SetShape:
    """What a benchmark set copies from a real one: questions per image (mean; spread of a negative binomial
    with ``dispersion``, VQA sets are skewed: most images have a few questions, some dozens), the closed
    (yes/no) share, and question / open-answer lengths in words."""

    images: int
    questions: int
    closed: float
    question_words: float
    answer_words: float
    dispersion: float = 1.5

    @property
    def per_image(self) -> float:
        return self.questions / self.images


# Published totals (VQA-RAD: Lau et al. 2018; SLAKE English: Liu et al. 2021; PathVQA: He et al. 2020);
# lengths are the papers' averages, rounded.
LIKE = {
    "vqa-rad": SetShape(images=315, questions=3515, closed=0.58, question_words=7.0, answer_words=1.6),
    "slake": SetShape(images=642, questions=7033, closed=0.36, question_words=8.0, answer_words=1.8),
    "pathvqa": SetShape(images=4998, questions=32799, closed=0.50, question_words=8.5, answer_words=2.2),
}

FINDINGS = ("a mass", "an effusion", "free air", "a fracture", "a lesion", "edema", "a nodule", "calcification",
            "an infarct", "pneumothorax", "a cyst", "hemorrhage")
ORGANS = ("left lung", "right lung", "liver", "kidney", "brain", "heart", "spleen", "bladder", "colon", "spine")
OPEN_STARTS = ("What is the location of", "Where is", "What organ shows", "Which side has", "What abnormality is seen near",
               "How large is", "What structure is next to", "What is the density of")
CLOSED_STARTS = ("Is there", "Does the image show", "Is this", "Are there signs of", "Can you see", "Is the patient with")
FILLERS = ("in this image", "on this scan", "in the upper region", "on the left side", "in the lower part", "near the midline",
           "compared to normal", "at this level")
ANSWER_WORDS = ("left", "right", "upper", "lower", "lobe", "lung", "liver", "kidney", "brain", "mass", "cyst", "fluid",
                "bone", "air", "edema", "small", "large", "two", "CT", "MRI", "contrast")


def _sentence(rng: random.Random, start: str, words: float) -> str:
    """``start`` + a finding/organ + fillers until about ``words`` words (a Poisson-like spread around it)."""
    target = max(3, round(rng.gauss(words, words / 3)))
    parts = [start, rng.choice(FINDINGS + ORGANS)]
    while len(" ".join(parts).split()) < target:
        parts.append(rng.choice(FILLERS))
    return " ".join(parts) + "?"


def questions_per_image(rng: random.Random, shape: SetShape, images: int) -> list[int]:
    """Counts for ``images`` images: 1 + a negative binomial (Poisson with a gamma-distributed rate), then
    scaled so their mean is the set's (a small sample's draw would otherwise miss it by a lot)."""
    import numpy as np

    draw = np.random.default_rng(rng.randrange(2**32))
    mean = shape.per_image - 1
    counts = [1 + int(draw.poisson(rng.gammavariate(shape.dispersion, mean / shape.dispersion))) for _ in range(images)]
    target = round(shape.per_image * images)
    counts = [max(1, round(c * target / sum(counts))) for c in counts]
    while sum(counts) != target:      # rounding: adjust the largest counts by one
        i = max(range(images), key=counts.__getitem__) if sum(counts) > target else rng.randrange(images)
        counts[i] += 1 if sum(counts) < target else -1
    return counts


def _source_images() -> list:
    from medvlm.imaging import load_image

    return [(sample, load_image(sample.path)) for sample in SAMPLES]


def _write_image(rng: random.Random, sample, pixels, path: Path, image_format: str) -> str:
    """A distinct image: a random crop of a real scan re-encoded as JPEG (quality 90, the sets' format), or a
    copy of the DICOM file with a new instance UID (same pixels, decoded on every read)."""
    if image_format == "dicom":
        ds = pydicom.dcmread(sample.path)
        ds.SOPInstanceUID = generate_uid()
        ds.save_as(path.with_suffix(".dcm"))
        return path.with_suffix(".dcm").name
    width, height = pixels.size
    scale = rng.uniform(0.8, 1.0)
    w, h = int(width * scale), int(height * scale)
    left, top = rng.randrange(width - w + 1), rng.randrange(height - h + 1)
    image = pixels.crop((left, top, left + w, top + h))
    longest = rng.choice((512, 640, 768, 1024))       # VQA-RAD/SLAKE/PathVQA images are roughly this size
    image = image.resize((max(1, w * longest // max(w, h)), max(1, h * longest // max(w, h))))
    image.convert("RGB").save(path.with_suffix(".jpg"), quality=90)
    return path.with_suffix(".jpg").name


def write_vqa_set(root: Path, like: str = "vqa-rad", images: int = 48, image_format: str = "jpeg",
                  test_fraction: float = 0.13, seed: int = 0) -> Path:
    """``images`` images with questions drawn like ``like``'s (``LIKE``), in VQA-RAD's original layout (what
    ``downstream.datasets.load_vqa("vqa-rad", root)`` reads); about ``test_fraction`` of each image's questions
    are test questions. Closed answers are yes/no, open ones words of the right count."""
    shape = LIKE[like]
    rng = random.Random(seed)
    image_dir = root / "VQA_RAD Image Folder"
    image_dir.mkdir(parents=True, exist_ok=True)
    sources = _source_images()
    records = []
    for index, count in enumerate(questions_per_image(rng, shape, images)):
        sample, pixels = sources[index % len(sources)]
        name = _write_image(rng, sample, pixels, image_dir / f"synpic{index:05d}", image_format)
        for _ in range(count):
            closed = rng.random() < shape.closed
            question = _sentence(rng, rng.choice(CLOSED_STARTS if closed else OPEN_STARTS), shape.question_words)
            words = max(1, round(rng.gauss(shape.answer_words, shape.answer_words / 2)))
            answer = rng.choice(("yes", "no")) if closed else " ".join(rng.choice(ANSWER_WORDS) for _ in range(words))
            records.append({"qid": len(records) + 1, "image_name": name, "image_organ": sample.body_part.upper(),
                            "answer": answer, "answer_type": "CLOSED" if closed else "OPEN", "question_type": "PRES",
                            "question": question,
                            "phrase_type": "test_freeform" if rng.random() < test_fraction else "freeform"})
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(records))
    return root


def proportioned_bundle(target_ratio: float = 23.0, image_size: int = 336, patch_size: int = 14,
                        vision_width: int = 64, lm_width: int = 256):
    """A narrow CLIP tower at ``image_size``/``patch_size`` (336/14: CLIP-L/336's 576 image tokens) with a Llama
    LM deep enough that vision : LM parameters ≈ 1 : ``target_ratio``, as CLIP-L/336 (0.30B) : Vicuna-7B (6.7B).
    The sequence shape is the real one; only the widths shrink to fit a CPU."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from medvlm.model import LLAVA_V1_JINJA, IMAGE_TOKEN, LlavaBundle, build_tiny_tokenizer, make_image_processor, make_processor

    tokenizer = build_tiny_tokenizer()
    vision = CLIPVisionConfig(image_size=image_size, patch_size=patch_size, hidden_size=vision_width,
                              intermediate_size=4 * vision_width, num_hidden_layers=2, num_attention_heads=4)
    image_tokens = (image_size // patch_size) ** 2
    best = None
    for layers in range(1, 40):
        text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=lm_width, intermediate_size=4 * lm_width,
                           num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
                           max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                             image_seq_length=image_tokens, vision_feature_layer=-2, vision_feature_select_strategy="default")
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration(config)
        n_vision = sum(p.numel() for p in model.model.vision_tower.parameters())
        n_lm = sum(p.numel() for p in model.model.language_model.parameters()) + model.lm_head.weight.numel()
        if best is None or abs(n_lm / n_vision - target_ratio) < abs(best[1] - target_ratio):
            best = (model, n_lm / n_vision)
        if n_lm / n_vision > target_ratio:
            break
    model = best[0]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    processor = make_processor(make_image_processor(image_size), tokenizer, patch_size, LLAVA_V1_JINJA)
    return LlavaBundle(model, processor, "llava_v1", {"template": "llava_v1"}), best[1]


def parameter_split(model) -> tuple[int, int, int]:
    """(vision tower, projector, language model + head) parameter counts."""
    inner = model.model
    vision = sum(p.numel() for p in inner.vision_tower.parameters())
    projector = sum(p.numel() for p in inner.multi_modal_projector.parameters())
    lm = sum(p.numel() for p in inner.language_model.parameters()) + model.lm_head.weight.numel()
    return vision, projector, lm
