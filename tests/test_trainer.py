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
    logged = [r["step"] for r in map(json.loads, log.splitlines()) if "loss" in r]
    assert logged == list(range(1, 19))  # step 7, logged before the crash and again after the resume, once
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


def _corrupt(images, names) -> None:
    for name in names:
        (images / name).write_bytes(b"this is not a PNG file")


def test_images_that_fail_to_load_count_toward_max_skip_rate(tmp_path, colour_set):
    from medvlm.data import DataError

    data, images = colour_set
    _corrupt(images, ["0.png", "1.png", "2.png"])           # 3 of 24 records: 12.5% > 5%
    with pytest.raises(DataError, match=r"max_skip_rate.*do not load"):
        Trainer(stage_config(data, images, tmp_path / "out", epochs=1)).run()
    assert not (tmp_path / "out" / "checkpoint").exists()


def test_unloadable_images_within_the_limit_are_reported_in_the_data_report(tmp_path, colour_set):
    data, images = colour_set
    _corrupt(images, ["5.png"])
    result = Trainer(stage_config(data, images, tmp_path / "out", epochs=1, max_skip_rate=0.1)).run()
    assert result.metrics["data"]["skipped"] == {"image_unreadable": 1}
    assert result.metrics["data"]["skip_rate"] == pytest.approx(1 / 24, abs=1e-6)


def test_a_stage_where_no_batch_is_usable_stops_with_an_error(tmp_path, colour_set):
    from medvlm.data import DataError

    data, images = colour_set
    _corrupt(images, [f"{i}.png" for i in range(24)])
    with pytest.raises(DataError, match="no usable batch"):
        Trainer(stage_config(data, images, tmp_path / "out", max_skip_rate=1.0, max_steps=5)).run()
    assert not list((tmp_path / "out").glob("resume/checkpoint-*"))


def test_a_changed_config_in_the_same_output_dir_is_refused_naming_the_changed_keys(tmp_path, colour_set):
    from medvlm.config import ConfigError

    data, images = colour_set
    out = tmp_path / "out"
    Trainer(stage_config(data, images, out, max_steps=2)).run()
    with pytest.raises(ConfigError, match=r"different config \(batch_size 4 → 2; lr 0.001 → 0.002\).*--restart"):
        Trainer(stage_config(data, images, out, max_steps=2, lr=2e-3, batch_size=2)).run()


def test_harmless_changes_resume_with_a_warning(tmp_path, colour_set, caplog):
    data, images = colour_set
    out = tmp_path / "out"
    Trainer(stage_config(data, images, out, max_steps=4, save_steps=1)).run()
    (out / "checkpoint" / "COMPLETE").unlink()                  # as if killed before the export
    with caplog.at_level("WARNING"):
        result = Trainer(stage_config(data, images, out, max_steps=4, save_steps=2, log_steps=2)).run()
    assert "log_steps 1 → 2" in caplog.text and "save_steps 1 → 2" in caplog.text
    assert result.global_step == 4


def test_restart_starts_over_and_drops_the_old_run_only_when_the_new_one_completes(tmp_path, colour_set):
    data, images = colour_set
    out = tmp_path / "out"
    Trainer(stage_config(data, images, out, max_steps=2)).run()
    config = stage_config(data, images, out, max_steps=3, lr=2e-3)
    trainer = Trainer(config, restart=True)
    trainer.setup()
    aside = list(out.glob(".replaced-*"))
    assert len(aside) == 1 and (aside[0] / "checkpoint" / "COMPLETE").is_file() and trainer.state.global_step == 0
    result = trainer.train()
    assert result.global_step == 3 and not list(out.glob(".replaced-*"))
    assert json.loads((out / "stage_config.json").read_text())["lr"] == 2e-3


def test_train_writes_loss_png_fractional_epochs_and_an_fp32_precision_line(tmp_path, colour_set, capsys):
    data, images = colour_set                                   # 24 records, batch 4: 6 steps per epoch
    result = Trainer(stage_config(data, images, tmp_path / "out", max_steps=3)).run()
    assert (tmp_path / "out" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.metrics["epochs"] == 0.5
    out = capsys.readouterr().out
    assert "precision fp32" in out and "precision no" not in out


def test_max_length_above_the_tokenizers_own_limit_does_not_warn(tmp_path, capfd):
    from tests.conftest import make_colour_set

    data, images = make_colour_set(tmp_path / "d", n=4)
    records = json.loads(data.read_text())
    records[0]["conversations"][1]["value"] = "red and green " * 400   # > 1024 tokens, < 2048
    data.write_text(json.dumps(records))
    trainer = Trainer(stage_config(data, images, tmp_path / "out", max_length=2048, max_steps=1))
    trainer.setup()
    assert max(abs(n) for n in trainer.dataset.lengths) > 1024
    assert "longer than the specified maximum" not in capfd.readouterr().err


def test_a_second_run_into_an_output_dir_in_use_is_refused(tmp_path, colour_set):
    from medvlm.fileio import FolderInUse, FolderLock

    data, images = colour_set
    with FolderLock(tmp_path / "out", "training run"):
        with pytest.raises(FolderInUse, match="in use by another training run"):
            Trainer(stage_config(data, images, tmp_path / "out", max_steps=1)).run()


def test_images_over_the_pixel_cap_are_skipped_undecoded_and_counted(tmp_path, colour_set):
    from medvlm.data import DataError

    data, images = colour_set
    with pytest.raises(DataError, match=r"max_skip_rate.*image_too_large"):
        Trainer(stage_config(data, images, tmp_path / "out", epochs=1, max_image_pixels=1)).run()


def test_restart_with_an_unchanged_config_resumes_instead_of_starting_over(tmp_path, colour_set):
    """A requeued Slurm job reruns the same ``--restart`` command: its progress must survive."""
    data, images = colour_set
    out = tmp_path / "out"
    first = Trainer(stage_config(data, images, out, max_steps=2)).run()
    written = (first.checkpoint / "COMPLETE").stat().st_mtime_ns
    again = Trainer(stage_config(data, images, out, max_steps=2), restart=True).run()
    assert again.checkpoint == first.checkpoint and again.global_step == 2
    assert (again.checkpoint / "COMPLETE").stat().st_mtime_ns == written     # not trained again


def test_a_run_recorded_before_newer_settings_existed_still_counts_as_the_same_config(tmp_path, colour_set):
    data, images = colour_set
    out = tmp_path / "out"
    Trainer(stage_config(data, images, out, max_steps=2)).run()
    recorded = json.loads((out / "stage_config.json").read_text())
    for added_later in ("max_image_pixels", "pack_by_image", "quantize"):
        recorded.pop(added_later)
    recorded["tensorboard"] = False                                 # a setting since removed
    (out / "stage_config.json").write_text(json.dumps(recorded))
    assert Trainer(stage_config(data, images, out, max_steps=2)).run().global_step == 2
