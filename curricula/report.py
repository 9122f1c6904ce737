"""``medvlm curriculum show | status | report``: the plan without weights, a run's state, the ablation table."""

from __future__ import annotations

import json
import math
from pathlib import Path

from medvlm.checkpoint import final_checkpoint
from medvlm.fileio import read_json

from .kinds import KINDS
from .plan import Node, Plan, resolve

# Parameter counts of common sources, for planning without downloading anything (vision, language model).
KNOWN_SIZES = {
    "openai/clip-vit-large-patch14-336": 303_507_456, "openai/clip-vit-large-patch14": 303_179_776,
    "lmsys/vicuna-7b-v1.5": 6_738_415_616, "lmsys/vicuna-13b-v1.5": 13_015_864_320,
    "mistralai/Mistral-7B-Instruct-v0.2": 7_241_732_096,
}
KNOWN_LLAVA = {  # released HF-format LLaVA-1.5: (vision tower, projector, language model + head)
    "llava-hf/llava-1.5-7b-hf": (303_507_456, 20_979_712, 6_738_939_904),
    "llava-hf/llava-1.5-13b-hf": (303_507_456, 31_477_760, 13_015_864_320),
}


def model_parts(source: dict) -> dict[str, int] | None:
    """Parameter counts per part (vision, projector, llm) from configs — never loads weights (the tiny preset
    is built from its definition, random and small)."""
    from accelerate import init_empty_weights

    kind, value = next(iter(source.items()))
    try:
        if kind == "preset":  # built, not loaded: the preset is defined once, in medvlm/model.py
            from medvlm.model import load_model

            return _count_parts(load_model(source).model)
        if kind == "checkpoint" and (Path(value) / "config.json").is_file():
            from transformers import AutoConfig
            config = AutoConfig.from_pretrained(value)
        elif kind == "checkpoint" and value in KNOWN_LLAVA:
            vision, projector, llm = KNOWN_LLAVA[value]
            return {"vision": vision, "projector": projector, "llm": llm, "total": vision + projector + llm}
        elif kind == "compose" and value.get("vision") in KNOWN_SIZES and value.get("llm") in KNOWN_SIZES:
            vision, llm = KNOWN_SIZES[value["vision"]], KNOWN_SIZES[value["llm"]]
            hidden = 4096 if "7b" in value["llm"].lower() else 5120
            projector = 1024 * hidden + hidden + hidden * hidden + hidden
            return {"vision": vision, "projector": projector, "llm": llm, "total": vision + projector + llm}
        else:
            return None
    except (OSError, ValueError):
        return None
    from transformers import LlavaForConditionalGeneration

    with init_empty_weights():
        return _count_parts(LlavaForConditionalGeneration(config))


def _count_parts(model) -> dict[str, int]:
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    parts = {"vision": count(model.model.vision_tower), "projector": count(model.model.multi_modal_projector),
             "llm": count(model.model.language_model) + count(model.lm_head)}
    parts["total"] = sum(parts.values())
    return parts


def trainable_count(parts: dict | None, policy: str) -> int | None:
    if not parts or "projector" not in parts:
        return None
    chosen = {p.strip() for p in policy.split("+")}
    total = parts["projector"]
    if "llm" in chosen:
        total += parts["llm"]
    if "vision" in chosen:
        total += parts["vision"]
    return total


def _records(path: Path) -> int | None:
    if not path.is_file():
        return None
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as fh:
            return sum(1 for line in fh if line.strip())
    try:
        return len(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, MemoryError):
        return None


def show_plan(plan: Plan) -> str:
    parts = model_parts(plan.model)
    lines = [f"curriculum {plan.name}: {len(plan.variants)} variant(s), {len(plan.nodes)} distinct stage(s)",
             f"model: {json.dumps(plan.model)}" + (f" — {parts['total']:,} parameters" if parts else " — size unknown offline")]
    for label, nodes in plan.variants.items():
        lines.append(f"\nvariant: {label}")
        lines.append(f"  {'stage':<28} {'kind':<9} {'trainable':<14} {'records':>9} {'epochs':>6} {'steps':>8} {'trainable params':>17}  key")
        for node in nodes:
            lines.append("  " + _plan_row(node, plan, parts))
    return "\n".join(lines)


def _plan_row(node: Node, plan: Plan, parts) -> str:
    s = node.settings
    if node.kind == "eval":
        return f"{node.name:<28} {'eval':<9} {'-':<14} {'':>9} {'':>6} {'':>8} {'':>17}  {node.key[:10]}"
    records = None
    if node.kind == "train":
        counts = [_records(resolve(plan.base_dir, d["path"] if isinstance(d, dict) else d)) for d in s.get("data") or []]
        records = None if any(c is None for c in counts) else sum(counts)
    policy = s.get("trainable", "projector+llm")
    epochs = float(s.get("epochs", 9 if node.kind == "finetune" else 1))
    per_step = int(s.get("batch_size", 4)) * int(s.get("grad_accum", 1)) * plan.world_size
    steps = s.get("max_steps") or (math.ceil(records / per_step) * epochs if records else None)
    trainable = trainable_count(parts, policy) if "lora" not in policy else None
    fmt = lambda v: "?" if v is None else f"{int(v):,}"  # noqa: E731
    return (f"{node.name:<28} {node.kind:<9} {policy:<14} {fmt(records):>9} {epochs:>6g} {fmt(steps):>8} "
            f"{('LoRA' if 'lora' in policy else fmt(trainable)):>17}  {node.key[:10]}")


def show_status(run_dir: str | Path) -> str:
    """One line per stage: status (done from the checkpoint's COMPLETE marker), metrics or the error."""
    run_dir = Path(run_dir)
    manifest_path = run_dir / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{run_dir}: no manifest.json (not a curriculum run directory)")
    manifest = json.loads(manifest_path.read_text())
    lines = [f"run {manifest.get('name')} in {run_dir}"]
    for folder, entry in manifest.get("stages", {}).items():
        record = read_json(run_dir / "stages" / folder / "stage.json")
        status = _status(run_dir / "stages" / folder, entry, record)
        if status == "failed":
            detail = record.get("error") or entry.get("error") or ""
        else:
            metrics = record.get("metrics", {}) if status == "done" else {}
            detail = (f"loss {metrics['final_loss']:.4f}, {metrics.get('train_seconds', 0):.0f}s"
                      if "final_loss" in metrics else _eval_detail(metrics))
        lines.append(f"  {entry.get('name', folder):<30} {status:<11} {detail}".rstrip())
    return "\n".join(lines)


def _status(folder: Path, entry: dict, record: dict) -> str:
    status = entry.get("status") or "pending"
    if status == "stale":
        return status
    kind = KINDS.get(entry.get("kind", "train"))
    done = final_checkpoint(folder) is not None if kind is None or kind.produces_weights else record.get("status") == "done"
    if done:
        return "done"
    if record.get("status") == "failed" or entry.get("status") == "failed":
        return "failed"
    return "partial" if status == "done" else status   # "done" without its COMPLETE checkpoint is not done


def _eval_detail(metrics: dict) -> str:
    after = metrics.get("after", {}).get("suites", {}).get("strict", {})
    if not after:
        return ""
    text = f"closed {after.get('closed_accuracy')}%, open F1 {after.get('open_f1')}%"
    before = metrics.get("before", {}).get("suites", {}).get("strict", {})
    return text + (f" (before: closed {before.get('closed_accuracy')}%)" if before else "")


def ablation_table(summary: dict, suite: str = "strict") -> tuple[str, list[dict]]:
    """Markdown: a row per variant, a column per set × metric (closed accuracy, open recall), with CIs."""
    rows = []
    for label, per_set in summary["variants"].items():
        for dataset, data in per_set.items():
            s = data["after"].get(suite, {})
            rows.append({"variant": label, "dataset": dataset, "closed": s.get("closed_accuracy"),
                         "closed_ci": s.get("closed_accuracy_ci"), "open": s.get("open_recall"),
                         "open_ci": s.get("open_recall_ci")})
    datasets = sorted({r["dataset"] for r in rows})
    header = "| variant | " + " | ".join(f"{d} closed | {d} open recall" for d in datasets) + " |"
    lines = [header, "|---|" + "---|---|" * len(datasets)]
    for label in summary["variants"]:
        cells = []
        for d in datasets:
            row = next((r for r in rows if r["variant"] == label and r["dataset"] == d), None)
            cells += [_cell(row, "closed") if row else "–", _cell(row, "open") if row else "–"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append(f"\nsuite: {suite}; values in %, 95% bootstrap intervals")
    return "\n".join(lines), rows


def _cell(row: dict, metric: str) -> str:
    value, ci = row[metric], row[f"{metric}_ci"]
    if value is None:
        return "–"
    return f"{value:.1f} [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else f"{value:.1f}"


def ablation_chart(rows: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["variant"].replace(", ", "\n") + f"\n{r['dataset']}" for r in rows]
    values = [r["closed"] or 0.0 for r in rows]
    errors = [[max(0.0, v - (r["closed_ci"] or [v, v])[0]) for v, r in zip(values, rows)],
              [max(0.0, (r["closed_ci"] or [v, v])[1] - v) for v, r in zip(values, rows)]]
    fig, ax = plt.subplots(figsize=(max(5, 2.2 * len(rows)), 4.5))
    ax.bar(range(len(rows)), values, yerr=errors, capsize=4)
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set(ylabel="closed accuracy (%)", ylim=(0, 100), title="ablation")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def write_report(run_dir: str | Path, suite: str = "strict") -> str:
    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"{run_dir}: no summary.json; run the curriculum first")
    table, rows = ablation_table(json.loads(summary_path.read_text()), suite)
    (run_dir / "ablation.md").write_text(table + "\n")
    if rows:
        ablation_chart(rows, run_dir / "ablation.png")
    return table
