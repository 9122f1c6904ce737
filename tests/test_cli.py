"""The ``medvlm`` command: help, a stage from YAML, chat on a DICOM, clear errors."""

from __future__ import annotations

import subprocess
import sys

import yaml

from medvlm.cli import main
from medvlm.sample_images import sample_path


def test_help_lists_every_command(capsys):
    try:
        main(["--help"])
    except SystemExit:
        pass
    out = capsys.readouterr().out
    for command in ("train", "chat", "demo", "ingest"):
        assert command in out


def _write_stage(tmp_path, colour_set, **extra):
    data, images = colour_set
    stage = {"name": "cli", "model": {"preset": "tiny"}, "trainable": "projector+llm",
             "data": [{"path": str(data), "images": str(images)}], "output_dir": str(tmp_path / "out"),
             "max_steps": 4, "batch_size": 4, "lr": 1e-3, "log_steps": 1, **extra}
    path = tmp_path / "stage.yaml"
    path.write_text(yaml.safe_dump(stage))
    return path


def test_train_then_chat_about_a_dicom(tmp_path, colour_set, capsys):
    path = _write_stage(tmp_path, colour_set)
    assert main(["train", str(path), "--set", "max_steps=3"]) == 0
    out = capsys.readouterr().out
    checkpoint = tmp_path / "out" / "checkpoint"
    assert f"checkpoint: {checkpoint}" in out
    assert main(["chat", "--model", str(checkpoint), "--image", str(sample_path("CT_small.dcm", "pydicom")),
                 "--max-new-tokens", "5", "What is shown?"]) == 0
    answer = capsys.readouterr().out.strip()
    assert isinstance(answer, str)


def test_unknown_key_is_a_one_line_error(tmp_path, colour_set, capsys):
    path = _write_stage(tmp_path, colour_set, learning_rate=0.1)
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'learning_rate'" in err and err.count("\n") == 1


def _run_cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "medvlm.cli", *args], capture_output=True, text=True, timeout=timeout,
                          env={**__import__("os").environ, "MEDVLM_NO_PROGRESS": "1"})


def _losses(out):
    import json

    return [r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]


def test_deepspeed_zero2_and_zero3_match_single_process(tmp_path, colour_set):
    """ZeRO-2/3 on CPU (gloo, one process) through the same trainer give the plain run's loss curve."""
    curves = {}
    for name, extra in (("plain", {}), ("zero2", {"deepspeed": "zero2"}), ("zero3", {"deepspeed": "zero3"})):
        run = tmp_path / name
        run.mkdir()
        path = _write_stage(run, colour_set, **extra)
        proc = _run_cli("train", str(path))
        assert proc.returncode == 0, proc.stderr[-3000:]
        curves[name] = _losses(run / "out")
        from transformers import LlavaForConditionalGeneration

        LlavaForConditionalGeneration.from_pretrained(run / "out" / "checkpoint")  # consolidated, loads plainly
    assert len(curves["plain"]) == 4
    for name in ("zero2", "zero3"):
        assert all(abs(a - b) < 1e-3 for a, b in zip(curves["plain"], curves[name])), (name, curves)
