"""Shared pieces of the benchmarks: a VQA-RAD-layout set whose images are real DICOM files, model shapes."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from medvlm.sample_images import SAMPLES

QUESTIONS = (
    ("Is this a {m} image?", "CLOSED"),
    ("What imaging modality is shown?", "OPEN"),
    ("Which part of the body is shown?", "OPEN"),
)


def write_dicom_vqa_rad(root: Path, copies: int = 4, seed: int = 0) -> Path:
    """VQA-RAD's original layout with the real DICOM files themselves in the image folder (decoded with
    pydicom on every read, as a data set of DICOMs would be); ``copies`` byte-distinct copies of each."""
    rng = random.Random(seed)
    image_dir = root / "VQA_RAD Image Folder"
    image_dir.mkdir(parents=True, exist_ok=True)
    records, qid = [], 0
    modalities = sorted({s.modality for s in SAMPLES})
    for sample in SAMPLES:
        for copy in range(copies):
            name = f"{Path(sample.name).stem}_{copy}.dcm"
            ds = pydicom.dcmread(sample.path)
            ds.SOPInstanceUID = generate_uid()  # distinct files (as distinct studies would be), same pixels
            ds.save_as(image_dir / name)
            split = "test" if copy == copies - 1 else "train"
            for template, kind in QUESTIONS:
                qid += 1
                asked = rng.choice(modalities)
                question = template.format(m=asked)
                if kind == "CLOSED":
                    answer = "yes" if asked == sample.modality else "no"
                elif "modality" in template:
                    answer = sample.modality
                else:
                    answer = sample.body_part
                records.append({"qid": qid, "image_name": name, "image_organ": sample.body_part.upper(),
                                "answer": answer, "answer_type": kind, "question_type": "MODALITY",
                                "question": question, "phrase_type": "test_freeform" if split == "test" else "freeform"})
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(records))
    return root


def proportioned_bundle(target_ratio: float = 23.0):
    """The tiny preset's vision tower with a Llama LM deep enough that vision : LM parameters ≈ 1 : 23,
    as CLIP-L/336 (0.30B) : Vicuna-7B (6.7B)."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from medvlm.model import LLAVA_V1_JINJA, IMAGE_TOKEN, LlavaBundle, build_tiny_tokenizer, make_image_processor, make_processor

    tokenizer = build_tiny_tokenizer()
    vision = CLIPVisionConfig(image_size=224, patch_size=16, hidden_size=128, intermediate_size=512,
                              num_hidden_layers=2, num_attention_heads=4)
    best = None
    for layers in range(2, 40):
        text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=1024, num_hidden_layers=layers,
                           num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id)
        config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                             image_seq_length=196, vision_feature_layer=-2, vision_feature_select_strategy="default")
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
    processor = make_processor(make_image_processor(224), tokenizer, 16, LLAVA_V1_JINJA)
    return LlavaBundle(model, processor, "llava_v1", {"template": "llava_v1"}), best[1]


def parameter_split(model) -> tuple[int, int, int]:
    """(vision tower, projector, language model + head) parameter counts."""
    inner = model.model
    vision = sum(p.numel() for p in inner.vision_tower.parameters())
    projector = sum(p.numel() for p in inner.multi_modal_projector.parameters())
    lm = sum(p.numel() for p in inner.language_model.parameters()) + model.lm_head.weight.numel()
    return vision, projector, lm
