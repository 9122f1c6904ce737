"""QLoRA: ``trainable: lora`` + ``quantize: 4bit`` (bitsandbytes NF4, double quantisation, bf16 compute).

bitsandbytes ≥ 0.45 quantises on the CPU too, so the whole path runs here on the tiny preset: the
language model's linear layers are 4-bit, the projector trains in fp32, and the export is a plain bf16
folder whose weights are the de-quantised base plus the LoRA update.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import stage_config


def test_4bit_config_is_qloras_nf4_double_quant_bf16_compute_language_model_only():
    from medvlm.model import bnb_4bit_config

    config = bnb_4bit_config()
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.bfloat16
    assert {"model.vision_tower", "model.multi_modal_projector", "lm_head"} <= set(config.llm_int8_skip_modules)


@pytest.mark.parametrize("extra", [{"trainable": "projector+llm"}, {"trainable": "lora", "deepspeed": "zero2"}])
def test_4bit_needs_lora_without_deepspeed(tmp_path, colour_set, extra):
    from medvlm.config import ConfigError

    with pytest.raises(ConfigError, match="quantize: 4bit trains LoRA adapters"):
        stage_config(*colour_set, tmp_path, quantize="4bit", **extra)


def test_without_bitsandbytes_4bit_says_what_to_install(monkeypatch):
    import importlib.util

    from medvlm.model import load_model

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(RuntimeError, match=r"pip install 'bitsandbytes>=0.45'"):
        load_model({"preset": "tiny"}, quantize="4bit")


def test_a_qlora_stage_trains_4bit_lm_fp32_projector_and_exports_bf16(tmp_path, colour_set):
    import bitsandbytes as bnb
    from transformers import LlavaForConditionalGeneration

    from medvlm.trainer import Trainer

    trainer = Trainer(stage_config(*colour_set, tmp_path / "out", trainable="lora", quantize="4bit", max_steps=3,
                                   batch_size=4, lr=1e-3))
    trainer.setup()
    inner = trainer.bundle.model.get_base_model().model
    assert isinstance(inner.language_model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    four_bit = [n for n, m in trainer.bundle.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert four_bit and all(".language_model.layers." in n for n in four_bit)   # the LM's linear layers only
    projector = [p for n, p in trainer.bundle.model.named_parameters() if "multi_modal_projector" in n and p.requires_grad]
    assert projector and all(p.dtype == torch.float32 for p in projector)
    result = trainer.train()
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.metrics["final_loss"]))
    exported = LlavaForConditionalGeneration.from_pretrained(result.checkpoint)
    assert getattr(exported.config, "quantization_config", None) is None
    assert exported.model.language_model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert type(exported.model.language_model.layers[0].self_attn.q_proj) is torch.nn.Linear


@torch.no_grad()
def test_the_merged_export_is_the_dequantised_base_plus_the_lora_update():
    import bitsandbytes as bnb

    from medvlm.model import apply_trainable, dequantized_merge, load_model

    bundle = apply_trainable(load_model({"preset": "tiny"}, quantize="4bit"), "lora", {"r": 4})
    layer = bundle.model.get_base_model().model.language_model.layers[1].mlp.down_proj
    for adapter in layer.lora_B.values():  # LoRA B starts at zero: give the update a value
        adapter.weight.normal_(0, 0.02)
    base = layer.base_layer.weight
    expected = bnb.functional.dequantize_4bit(base.data, base.quant_state).to(torch.bfloat16)
    expected += layer.get_delta_weight("default").to(torch.bfloat16)
    merged = dequantized_merge(bundle.model)
    assert torch.equal(merged.model.language_model.layers[1].mlp.down_proj.weight, expected)
    assert not hasattr(merged, "peft_config")
