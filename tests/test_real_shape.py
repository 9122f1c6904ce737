"""The real shapes end to end on a CPU, through ``medvlm curriculum run``: CLIP ViT-L/14-336's exact config
(random weights; 576 image tokens) + the real SmolLM2-135M LM, pad-to-square, stage 1, stage 2, a VQA
finetune and eval (curricula/examples/real_shape_cpu.yaml). Prints samples/s per stage and peak memory."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import make_colour_set
from tests.test_compose_real_lm import _gguf_path

ROOT = Path(__file__).resolve().parents[1]
YAML = ROOT / "curricula" / "examples" / "real_shape_cpu.yaml"


def _data(root: Path) -> Path:
    """2 conversations about 2 images (different aspect ratios: padded to square) and a VQA-RAD layout
    with 2 training images and 1 test image, 2 questions each."""
    from downstream.synthetic import VQAItem, write_vqa_rad_original

    make_colour_set(root / "general", n=2)
    items = []
    for i, split in enumerate(["train", "train", "test"]):
        image = Image.new("RGB", (300 + 60 * i, 200), (60 * i, 120, 200 - 50 * i))
        items += [VQAItem(image, f"scan{i}", "Is there a mass?", "yes" if i % 2 else "no", "CLOSED", split),
                  VQAItem(image, f"scan{i}", "Which organ is shown?", "lung", "OPEN", split)]
    write_vqa_rad_original(root / "vqa_rad", items)
    return root


@pytest.mark.slow
def test_real_shape_curriculum_runs_on_cpu(tmp_path):
    data, run_dir = _data(tmp_path / "data"), tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MEDVLM_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "medvlm.cli", "curriculum", "run", str(YAML), "--run-dir", str(run_dir),
                           "--base-dir", str(data), "--set", f"model.compose.llm={_gguf_path()}"],
                          capture_output=True, text=True, timeout=1200, env=env, cwd=ROOT)
    seconds = time.perf_counter() - started
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak_mib, cpu_seconds = usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime   # Linux: ru_maxrss in KiB

    stages = {p.name.split("-")[0]: p for p in (run_dir / "stages").iterdir()}
    config = json.loads((stages["finetune"] / "checkpoint" / "config.json").read_text())
    vision, text = config["vision_config"], config["text_config"]
    assert (vision["image_size"], vision["patch_size"], vision["hidden_size"], vision["num_hidden_layers"]) == (336, 14, 1024, 24)
    assert (vision["image_size"] // vision["patch_size"]) ** 2 == 576
    assert (text["hidden_size"], text["num_hidden_layers"]) == (576, 30)   # SmolLM2-135M
    speeds = {}
    for name in ("align", "instruct", "finetune"):
        metrics = json.loads((stages[name] / "metrics.json").read_text())
        assert metrics["global_step"] == 2
        speeds[name] = metrics["samples_per_second"]
    settings = json.loads((stages["eval"] / "metrics.json").read_text())["settings"]
    assert settings["questions"] == 2 and settings["device"] == "cpu" and settings["dtype"] == "float32"
    assert json.loads((run_dir / "summary.json").read_text())["variants"]
    print(f"\nreal shape on CPU: {seconds:.0f} s wall, {cpu_seconds:.0f} CPU s, samples/s {speeds}, "
          f"peak RSS {peak_mib:.0f} MiB")
