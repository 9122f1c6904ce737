"""Optimizer steps/s of the tiny preset on this machine through the shared trainer: one process plain,
and DeepSpeed ZeRO-2 (one process, gloo), each in its own subprocess (DeepSpeed owns its process).

    python benchmarks/steps.py [--steps 60]

The last line is the ratio ZeRO-2 / plain.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import make_colour_set  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data, images = make_colour_set(tmp / "data", n=32)
        for name, extra in (("plain", {}), ("zero2", {"deepspeed": "zero2"})):
            stage = {"name": name, "model": {"preset": "tiny"}, "trainable": "projector+llm", "lr": 1e-4,
                     "data": [{"path": str(data), "images": str(images)}], "output_dir": str(tmp / name),
                     "max_steps": args.steps, "batch_size": 4, "log_steps": 10, "save_steps": 0, **extra}
            path = tmp / f"{name}.yaml"
            path.write_text(yaml.safe_dump(stage))
            subprocess.run([sys.executable, "-m", "medvlm.cli", "train", str(path)], check=True, capture_output=True,
                           env={**os.environ, "MEDVLM_NO_PROGRESS": "1", "PYTHONPATH": str(ROOT)})
            metrics = json.loads((tmp / name / "metrics.json").read_text())
            rates[name] = metrics["global_step"] / metrics["train_seconds"]
            print(f"{name:<6}: {rates[name]:.2f} steps/s (batch 4, {metrics['global_step']} steps, "
                  f"{metrics['samples_per_second']:.1f} samples/s)")
    print(f"steps/s ratio zero2/plain: {rates['zero2'] / rates['plain']:.2f}x")


if __name__ == "__main__":
    main()
