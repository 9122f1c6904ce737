"""Crashes, preemption, corrupt checkpoints, bad input and multi-process training."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import make_colour_set

ROOT = Path(__file__).resolve().parents[1]


def _stage_yaml(tmp_path: Path, name: str, data, images, **extra) -> Path:
    stage = {"name": name, "model": {"preset": "tiny"}, "trainable": "projector+llm",
             "data": [{"path": str(data), "images": str(images)}], "output_dir": str(tmp_path / name),
             "epochs": 4, "batch_size": 4, "lr": 1e-3, "log_steps": 1, "save_steps": 1, "seed": 11, **extra}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(stage))
    return path


def _env() -> dict:
    return {**os.environ, "MEDVLM_NO_PROGRESS": "1", "PYTHONPATH": str(ROOT)}


def _train(path: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medvlm.cli", "train", str(path)], capture_output=True, text=True,
                          timeout=timeout, env=_env())


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "checkpoint" / "model.safetensors"))


def _steps_logged(out: Path) -> int:
    log = out / "log.jsonl"
    if not log.is_file():
        return 0
    return sum(1 for line in log.read_text().splitlines() if '"loss"' in line)


def _start_and_wait(path: Path, out: Path, steps: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "medvlm.cli", "train", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_env())
    deadline = time.time() + 240
    while _steps_logged(out) < steps:
        if proc.poll() is not None or time.time() > deadline:
            raise AssertionError(f"training ended or stalled before step {steps}: {proc.stdout.read()[-2000:]}")
        time.sleep(0.05)
    return proc


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.allclose(wa[key], wb[key], atol=1e-6), key


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_gives_the_uninterrupted_weights(tmp_path):
    data, images = make_colour_set(tmp_path / "data", n=22)   # 6 batches per epoch, the last one short
    reference = _stage_yaml(tmp_path, "reference", data, images)
    assert _train(reference).returncode == 0
    killed = _stage_yaml(tmp_path, "killed", data, images)
    step = random.Random().randint(3, 20)                    # anywhere, mid-epoch included
    proc = _start_and_wait(killed, tmp_path / "killed", step)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (tmp_path / "killed" / "checkpoint").exists()
    resumed = _train(killed)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    _assert_same_weights(tmp_path / "reference", tmp_path / "killed")


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_exits_cleanly(tmp_path):
    data, images = make_colour_set(tmp_path / "data", n=16)
    reference = _stage_yaml(tmp_path, "reference", data, images, save_steps=0)
    assert _train(reference).returncode == 0
    path = _stage_yaml(tmp_path, "preempted", data, images, save_steps=0)  # only the signal saves mid-epoch
    proc = _start_and_wait(path, tmp_path / "preempted", 2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 3, output[-2000:]
    assert "received SIGTERM" in output and "resume with the same command" in output
    saved = list((tmp_path / "preempted" / "resume").glob("checkpoint-*/COMPLETE"))
    assert saved
    assert _train(path).returncode == 0
    _assert_same_weights(tmp_path / "reference", tmp_path / "preempted")


def test_half_written_and_corrupt_checkpoints_are_not_used(tmp_path, caplog, colour_set):
    from medvlm.model import build_tiny
    from medvlm.trainer import Trainer
    from tests.conftest import stage_config

    data, images = colour_set
    out = tmp_path / "out"
    Trainer(stage_config(data, images, out, max_steps=4, save_steps=1, keep_last=3), build_tiny()).run()
    resume = out / "resume"
    assert sorted(p.name for p in resume.iterdir()) == ["checkpoint-000001", "checkpoint-000002", "checkpoint-000003"]
    (out / "checkpoint" / "COMPLETE").unlink()       # pretend the run did not finish
    (out / "metrics.json").unlink()
    half = resume / "checkpoint-000009"               # interrupted while being written: no COMPLETE marker
    half.mkdir()
    (half / "trainer_state.json").write_text("{}")
    latest = resume / "checkpoint-000003" / "model.safetensors"
    latest.write_bytes(latest.read_bytes()[:100])     # a corrupt latest checkpoint
    trainer = Trainer(stage_config(data, images, out, max_steps=4, save_steps=1, keep_last=3), build_tiny())
    with caplog.at_level("WARNING"):
        trainer.setup()
    assert trainer.state.global_step == 2          # fell back past the corrupt one, ignored the half-written one
    assert "checkpoint-000003 is unusable" in caplog.text


def test_a_tampered_optimizer_pickle_is_refused(tmp_path, caplog, colour_set):
    import pickle

    from medvlm.model import build_tiny
    from medvlm.trainer import Trainer
    from tests.conftest import stage_config

    data, images = colour_set
    out = tmp_path / "out"
    Trainer(stage_config(data, images, out, max_steps=3, save_steps=1, keep_last=3), build_tiny()).run()
    (out / "checkpoint" / "COMPLETE").unlink()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(out / "resume" / "checkpoint-000002" / "optimizer.bin", "wb") as fh:
        pickle.dump({"state": Evil()}, fh)
    trainer = Trainer(stage_config(data, images, out, max_steps=3, save_steps=1, keep_last=3), build_tiny())
    with caplog.at_level("WARNING"):
        trainer.setup()
    assert not marker.exists()                        # torch.load(weights_only=True) never ran the pickle
    assert trainer.state.global_step == 1 and "unusable" in caplog.text


def test_a_checkpoint_with_custom_code_is_never_executed(tmp_path):
    from medvlm.model import build_tiny, load_checkpoint, save_folder

    folder = save_folder(build_tiny(), tmp_path / "ckpt")
    marker = tmp_path / "executed"
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForImageTextToText": "modeling_evil.Evil",
                          "AutoConfig": "modeling_evil.EvilConfig"}
    (folder / "config.json").write_text(json.dumps(config))
    load_checkpoint(folder)
    assert not marker.exists()


def test_overlength_records_are_skipped_or_truncated_and_counted(tmp_path):
    from medvlm.data import ConversationDataset
    from medvlm.model import build_tiny
    from medvlm.config import DataSource

    data, images = make_colour_set(tmp_path / "d", n=6)
    records = json.loads(data.read_text())
    records[0]["conversations"][1]["value"] = "red " * 400
    data.write_text(json.dumps(records))
    bundle = build_tiny()
    skip = ConversationDataset([DataSource(str(data), str(images))], bundle, "llava_v1", max_length=300)
    assert len(skip) == 5 and skip.report.skipped == {"too_long": 1}
    cut = ConversationDataset([DataSource(str(data), str(images))], bundle, "llava_v1", max_length=300,
                              overlength="truncate")
    assert len(cut) == 6 and cut.report.truncated == 1 and len(cut[0]["input_ids"]) == 300


def test_empty_answers_are_skipped_and_counted(tmp_path):
    from medvlm.config import DataSource
    from medvlm.data import ConversationDataset
    from medvlm.model import build_tiny

    data, images = make_colour_set(tmp_path / "d", n=6)
    records = json.loads(data.read_text())
    records[1]["conversations"][1]["value"] = "   "
    data.write_text(json.dumps(records))
    dataset = ConversationDataset([DataSource(str(data), str(images))], build_tiny(), "llava_v1")
    assert len(dataset) == 5 and dataset.report.skipped == {"empty_answer": 1}


def test_compressed_dicom_without_its_decoder_says_what_to_install(tmp_path):
    from medvlm.sample_images import sample_path

    path = sample_path("emri_small_jpeg_ls_lossless.dcm", "pydicom-data")
    script = ("import sys\n"
              "for name in ('libjpeg', 'jpeg_ls', 'pylibjpeg', 'openjpeg', 'rle'):\n"
              "    sys.modules[name] = None  # as if the decoder packages were not installed\n"
              "from medvlm.imaging import load_image, ImageLoadError\n"
              f"try:\n    load_image({str(path)!r})\nexcept ImageLoadError as exc:\n    print('ERROR:', exc)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=_env())
    assert "ERROR:" in out.stdout, out.stderr[-2000:]
    assert "emri_small_jpeg_ls_lossless.dcm" in out.stdout and "pip install pylibjpeg" in out.stdout


@pytest.mark.slow
def test_two_processes_with_ddp_zero2_and_zero3_match_one_process(tmp_path):
    """Same global batch (1 × 4 vs 2 × 2), random batches: the same data per step, so the same losses."""
    from transformers import LlavaForConditionalGeneration

    data, images = make_colour_set(tmp_path / "data", n=16)
    common = {"epochs": 1, "max_steps": 4, "save_steps": 0, "group_by_length": False, "save_projector": True}
    single = _stage_yaml(tmp_path, "single", data, images, **common)
    assert _train(single).returncode == 0
    curves = {"single": _losses(tmp_path / "single")}
    for name, extra in (("ddp", {}), ("zero2", {"deepspeed": "zero2"}), ("zero3", {"deepspeed": "zero3"})):
        path = _stage_yaml(tmp_path, name, data, images, batch_size=2, **common, **extra)
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "-m", "medvlm.cli", "train", str(path)], capture_output=True, text=True,
                              timeout=600, env=_env())
        assert proc.returncode == 0, proc.stderr[-3000:]
        curves[name] = _losses(tmp_path / name)
        assert "[medvlm rank 0]" in proc.stdout and "[medvlm rank 1]" not in proc.stdout  # rank 0 reports
    assert len(curves["single"]) == 4
    for name in ("ddp", "zero2", "zero3"):
        assert curves[name] == pytest.approx(curves["single"], abs=2e-3), (name, curves)
    from safetensors.torch import load_file

    projectors = [load_file(str(tmp_path / name / "checkpoint" / "mm_projector.safetensors")) for name in ("single", "zero3")]
    assert projectors[0].keys() == projectors[1].keys() == {"linear_1.weight", "linear_1.bias", "linear_2.weight",
                                                            "linear_2.bias"}
    for key, value in projectors[0].items():                  # ZeRO-3's projector file: whole, not a partition
        assert torch.allclose(projectors[1][key], value, atol=2e-3), key
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "zero3" / "checkpoint")  # consolidated
    single_weights = _weights(tmp_path / "single")
    for name, param in model.state_dict().items():
        if name in single_weights:
            assert torch.allclose(param, single_weights[name], atol=2e-3), name


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]


def _torchrun(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "-m", "medvlm.cli", "train", str(path)], capture_output=True, text=True, timeout=600,
                          env=_env())


@pytest.mark.slow
def test_lora_under_zero3_on_two_processes_matches_one_process_and_exports_a_merged_plain_folder(tmp_path):
    """The shipped LLaVA-1.5 LoRA recipe (curricula/examples/finetune_lora.yaml: r 128, α 256, lr 2e-4,
    projector_lr 2e-5, gradient checkpointing, ZeRO-3) on the tiny model: 2 processes × 2 = 1 process × 4.
    Random batches and no dropout, so both runs see the same data and the same arithmetic."""
    from transformers import LlavaForConditionalGeneration

    from medvlm.model import build_tiny

    data, images = make_colour_set(tmp_path / "data", n=16)
    recipe = yaml.safe_load((ROOT / "curricula" / "examples" / "finetune_lora.yaml").read_text())["stages"][0]
    recipe = {k: v for k, v in recipe.items() if k not in ("name", "kind", "data", "batch_size", "deepspeed")}
    common = {**recipe, "lora": {**recipe["lora"], "dropout": 0.0}, "max_steps": 4, "save_steps": 0,
              "group_by_length": False}
    single = _stage_yaml(tmp_path, "single", data, images, **common)
    assert _train(single).returncode == 0
    zero3 = _stage_yaml(tmp_path, "zero3", data, images, batch_size=2, deepspeed="zero3", **common)
    proc = _torchrun(zero3)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _losses(tmp_path / "zero3") == pytest.approx(_losses(tmp_path / "single"), abs=2e-3)
    assert not [k for k in _weights(tmp_path / "zero3") if "lora_" in k or "base_layer" in k or "modules_to" in k]
    merged, reference = (LlavaForConditionalGeneration.from_pretrained(tmp_path / name / "checkpoint").state_dict()
                         for name in ("zero3", "single"))
    untrained = build_tiny().model.state_dict()
    assert merged.keys() == reference.keys()
    for name, value in reference.items():
        assert torch.allclose(merged[name], value, atol=2e-3), name
    q_proj = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(merged[q_proj], untrained[q_proj])   # the adapter was merged in, not dropped
