"""``medvlm demo`` / ``make demo``: build the demo data (``demo_data.py``), run ``demo.yaml`` (the whole
LLaVA-Med chain on the tiny preset), print the before/after table. ``--ablation`` runs
``demo_ablation.yaml`` (finetune epochs 1 vs 9, with and without stage 4) and prints the ablation table.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .demo_data import build_demo_data
from .report import write_report
from .runner import run_curriculum

HERE = Path(__file__).parent


def run_demo(out: str | Path, ablation: bool = False) -> dict:
    out = Path(out)
    started = time.perf_counter()
    data_dir = out / "data"
    if not (data_dir / "READY").is_file():
        counts = build_demo_data(data_dir)
        (data_dir / "READY").write_text(json.dumps(counts))
    counts = json.loads((data_dir / "READY").read_text())
    print(f"demo data in {data_dir}: {counts}")
    yaml = HERE / ("demo_ablation.yaml" if ablation else "demo.yaml")
    summary = run_curriculum(yaml, out, base_dir=data_dir)
    if ablation:
        print(write_report(out))
        print(f"ablation table: {out / 'ablation.md'}, chart: {out / 'ablation.png'}")
    else:
        print(before_after_table(summary))
    print(f"demo finished in {time.perf_counter() - started:.0f}s; run directory {out} (summary.json, stages/*/loss.png)")
    return summary


def before_after_table(summary: dict) -> str:
    rows = [("closed accuracy (strict)", "closed_accuracy"), ("open recall (LLaVA-Med)", "open_recall"),
            ("open token F1 (strict)", "open_f1")]
    lines = ["| held-out test questions | before | after |", "|---|---|---|"]
    for label, key in rows:
        cells = []
        for when in ("before", "after"):
            data = summary.get(when, {})
            value, ci = data.get(key), data.get(f"{key}_ci")
            cells.append("–" if value is None else (f"{value:.1f} [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else f"{value:.1f}"))
        lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    after = summary.get("after", {})
    lines.append(f"\n{after.get('n_closed', 0)} closed (yes/no, balanced: chance 50%) and {after.get('n_open', 0)} open "
                 "questions on held-out views of the scans; %, 95% bootstrap intervals.")
    return "\n".join(lines)
