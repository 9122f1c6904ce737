"""The shared trainer: loss goes down, only the intended parts change, checkpoints resume exactly."""

from __future__ import annotations

import json

import pytest
import torch

from medvlm.trainer import Trainer
from tests.conftest import stage_config


def _params(model, prefix: str) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith(prefix)}


def _changed(before: dict, after_model) -> bool:
    after = dict(after_model.named_parameters())
    return any(not torch.equal(before[n], after[n].detach()) for n in before)


def _losses(out) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]


def _run_and_check(tmp_path, colour_set, trainable, expect_changed, expect_frozen, template="llava_v1", **kw):
    data, images = colour_set
    from medvlm.model import build_tiny

    bundle = build_tiny()
    before = {part: _params(bundle.model, part) for part in expect_changed + expect_frozen}
    config = stage_config(data, images, tmp_path / "out", trainable=trainable, template=template, epochs=3, **kw)
    result = Trainer(config, bundle).run()
    model = bundle.model
    losses = _losses(tmp_path / "out")
    assert losses[-1] < losses[0] - 0.3, losses
    for part in expect_changed:
        assert _changed(before[part], model), f"{part} should have trained"
    for part in expect_frozen:
        assert not _changed(before[part], model), f"{part} should be frozen"
    return result


def test_stage1_projector_only_lowers_loss_and_trains_only_the_projector(tmp_path, colour_set):
    result = _run_and_check(tmp_path, colour_set, "projector", ["model.multi_modal_projector"],
                            ["model.vision_tower", "model.language_model", "lm_head"], template="plain")
    assert (result.checkpoint / "mm_projector.safetensors").is_file()


def test_stage2_projector_and_llm_train_while_the_vision_tower_stays_frozen(tmp_path, colour_set):
    result = _run_and_check(tmp_path, colour_set, "projector+llm",
                            ["model.multi_modal_projector", "model.language_model", "lm_head"], ["model.vision_tower"])
    assert not (result.checkpoint / "mm_projector.safetensors").exists()


def test_checkpoint_loads_in_plain_transformers_with_identical_logits(tmp_path, colour_set):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from medvlm.model import build_tiny

    data, images = colour_set
    bundle = build_tiny()
    result = Trainer(stage_config(data, images, tmp_path / "out", max_steps=2), bundle).run()
    model = LlavaForConditionalGeneration.from_pretrained(result.checkpoint)
    processor = AutoProcessor.from_pretrained(result.checkpoint)
    inputs = processor(images=[torch.zeros(3, 64, 64).numpy().transpose(1, 2, 0).astype("uint8")],
                       text=["USER: <image>\nWhat colour is this? ASSISTANT:"], return_tensors="pt")
    bundle.model.eval(), model.eval()
    with torch.no_grad():
        expected = bundle.model(**inputs).logits
        got = model(**inputs).logits
    assert torch.equal(expected, got)


def test_lora_stage_trains_lm_adapters_only_and_exports_a_merged_plain_folder(tmp_path, colour_set):
    from transformers import LlavaForConditionalGeneration

    from medvlm.model import build_tiny

    data, images = colour_set
    bundle = build_tiny()
    trainer = Trainer(stage_config(data, images, tmp_path / "out", trainable="lora", max_steps=3), bundle)
    trainer.setup()
    peft_model = trainer.model
    lora_names = [n for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" in n]
    assert lora_names and all("language_model" in n for n in lora_names), "LoRA must target the LM only"
    assert not any("vision_tower" in n for n in lora_names)
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    trainer.train()
    # export merged LoRA into bundle.model; the folder must hold plain LLaVA weights, no adapter keys
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "checkpoint" / "model.safetensors"), "pt") as fh:
        assert not [k for k in fh.keys() if "lora_" in k or "modules_to_save" in k]
    merged = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out" / "checkpoint").eval()
    with torch.no_grad():
        got = merged(input_ids=ids).logits
        expected = bundle.model.eval()(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-5)


def test_lora_adapter_and_merged_model_agree_before_export(tmp_path):
    from medvlm.model import apply_trainable, build_tiny, merged_model

    bundle = apply_trainable(build_tiny(), "lora", {"r": 4, "alpha": 8, "dropout": 0.0})
    for name, param in bundle.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)  # a trained-looking adapter, not the zero init
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    bundle.model.eval()
    with torch.no_grad():
        adapter_logits = bundle.model(input_ids=ids).logits
        merged = merged_model(bundle.model)
        merged_logits = merged(input_ids=ids).logits
    assert torch.allclose(adapter_logits, merged_logits, atol=1e-5)


def test_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one(tmp_path, colour_set):
    from medvlm.model import build_tiny

    data, images = colour_set
    full = build_tiny()
    Trainer(stage_config(data, images, tmp_path / "full", epochs=3, save_steps=2), full).run()

    class Crash(RuntimeError):
        pass

    crashing = Trainer(stage_config(data, images, tmp_path / "resumed", epochs=3, save_steps=2), build_tiny())
    crashing.setup()
    calls = {"n": 0}
    original = crashing._micro_step

    def crash_after_seven(batch):
        calls["n"] += 1
        if calls["n"] > 7:
            raise Crash("simulated crash")
        return original(batch)

    crashing._micro_step = crash_after_seven
    with pytest.raises(Crash):
        crashing.train()
    resumed = build_tiny()
    result = Trainer(stage_config(data, images, tmp_path / "resumed", epochs=3, save_steps=2), resumed).run()
    assert result.global_step == 18
    log = (tmp_path / "resumed" / "log.jsonl").read_text()
    assert '"step": 6' in log  # the crashed run reached step 6 and saved it
    for (name, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_padding_fraction_and_skips_are_reported(tmp_path):
    from tests.conftest import make_colour_set

    data, images = make_colour_set(tmp_path / "d", n=12, text_only=4)
    records = json.loads(data.read_text())
    records.append({"id": "bad", "image": "../../etc/passwd", "conversations": records[0]["conversations"]})
    data.write_text(json.dumps(records))
    result = Trainer(stage_config(data, images, tmp_path / "out", epochs=1, max_skip_rate=0.2)).run()
    assert result.metrics["data"]["skipped"] == {"image_path_escapes_root": 1}
    log = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    epoch_ends = [r for r in log if r.get("event") == "epoch_end"]
    assert len(epoch_ends) == 1 and 0.0 <= epoch_ends[0]["padding_fraction"] < 1.0


def test_a_skip_rate_above_the_limit_stops_before_training(tmp_path, colour_set):
    from medvlm.data import DataError

    data, images = colour_set
    records = json.loads(data.read_text())
    for r in records[:6]:
        r["image"] = "missing.png"
    data.write_text(json.dumps(records))
    with pytest.raises(DataError, match="max_skip_rate"):
        Trainer(stage_config(data, images, tmp_path / "out", max_skip_rate=0.1)).run()


def test_stage1_projector_loads_into_a_fresh_model_from_our_and_llava_key_names(tmp_path):
    from safetensors.torch import save_file

    from medvlm.model import build_tiny, load_projector, projector_state_dict, save_projector

    trained = build_tiny(seed=3)
    save_projector(trained.model, tmp_path / "ours" / "mm_projector.safetensors")
    llava_names = {f"model.mm_projector.{0 if k.startswith('linear_1') else 2}.{k.split('.', 1)[1]}": v
                   for k, v in projector_state_dict(trained.model).items()}
    save_file(llava_names, str(tmp_path / "llava.safetensors"))
    for source in (tmp_path / "ours", tmp_path / "llava.safetensors"):
        fresh = build_tiny(seed=4)
        load_projector(fresh.model, source)
        for key, value in projector_state_dict(trained.model).items():
            assert torch.equal(projector_state_dict(fresh.model)[key], value), (source, key)
