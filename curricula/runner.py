"""``medvlm curriculum run``: run a plan's stages in order, each from its parent's checkpoint, resumable.

Run directory::

    manifest.json        resolved config, input hashes, package versions, git revision, per-stage status/timings
    summary.json         every eval stage's metrics by variant and data set (+ "before"/"after" for baselines)
    features/            vision features shared by every eval (the tower is frozen: keyed by its weights)
    stages/NAME-KEY/     one folder per distinct stage: checkpoint/, log.jsonl, metrics.json, loss.png, stage.json

A stage is done when its ``stage.json`` says so; re-running a finished run does nothing. After a crash,
running again (``--resume``) skips finished stages and the trainer resumes the unfinished one from its
last checkpoint. A stage whose settings, inputs or parent changed has a new key, so it and every stage
after it run again; folders no longer in the plan are listed as stale in the manifest.

Under ``accelerate launch`` / ``torchrun`` every rank runs this loop (training is collective); evaluation
and every shared file are rank 0's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from importlib import metadata
from pathlib import Path

from medvlm.config import StageConfig, from_dict

from .plan import Node, Plan, build_plan, load_curriculum, resolve

PACKAGES = ("medvlm", "torch", "transformers", "peft", "accelerate", "deepspeed", "datasets", "pydicom")


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class CurriculumRunner:
    def __init__(self, plan: Plan, run_dir: str | Path, config: dict):
        self.plan = plan
        self.run_dir = Path(run_dir)
        self.config = config
        self.is_main = _rank() == 0
        self.manifest_path = self.run_dir / "manifest.json"
        self.manifest = json.loads(self.manifest_path.read_text()) if self.manifest_path.is_file() else {}

    def folder(self, node: Node) -> Path:
        return self.run_dir / "stages" / node.folder_name

    def state(self, node: Node) -> str:
        folder = self.folder(node)
        stage_file = folder / "stage.json"
        if stage_file.is_file() and json.loads(stage_file.read_text()).get("status") == "done":
            return "done"
        if (folder / "resume").is_dir() or (folder / "log.jsonl").is_file():
            return "partial"
        return "pending"

    # ------------------------------------------------------------------------------------ run
    def run(self, only: str | None = None, from_stage: str | None = None) -> dict:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        nodes = self.plan.nodes
        if from_stage:
            self._forget_from(from_stage, nodes)
        self._write_manifest()
        for node in nodes:
            if only and node.stage != only:
                continue
            state = self.state(node)
            if state == "done":
                print(f"[curriculum] {node.name}: done, skipping ({self.folder(node)})")
                continue
            parent = node.model_parent
            if parent is not None and self.state(parent) != "done":
                raise RuntimeError(f"stage {node.name} needs {parent.name} finished first; run without --only")
            print(f"[curriculum] {node.name}: {'resuming' if state == 'partial' else 'starting'} in {self.folder(node)}")
            started = time.time()
            self._set_status(node, "running", started=started)
            metrics = self._run_node(node)
            seconds = round(time.time() - started, 2)
            if self.is_main:
                _write_json(self.folder(node) / "stage.json", {"status": "done", "name": node.name, "key": node.key,
                                                               "seconds": seconds, "metrics": metrics})
            self._set_status(node, "done", seconds=seconds)
            _barrier()
        summary = self.summary()
        if self.is_main:
            _write_json(self.run_dir / "summary.json", summary)
            print(f"[curriculum] done; summary at {self.run_dir / 'summary.json'}")
        return summary

    def _forget_from(self, stage: str, nodes: list[Node]) -> None:
        names = [n.stage for n in nodes]
        if stage not in names:
            raise ValueError(f"--from {stage!r}: no such stage; stages are {sorted(set(names))}")
        start = names.index(stage)
        if self.is_main:
            for node in nodes[start:]:
                shutil.rmtree(self.folder(node), ignore_errors=True)
        _barrier()

    def _model_source(self, node: Node) -> dict:
        parent = node.model_parent
        return {"checkpoint": str(self.folder(parent) / "checkpoint")} if parent else self.plan.model

    def _run_node(self, node: Node) -> dict:
        if node.kind == "train":
            return self._train(node)
        if node.kind == "finetune":
            return self._finetune(node)
        return self._eval(node)

    def _train(self, node: Node) -> dict:
        from medvlm.trainer import train_stage

        settings = dict(node.settings)
        settings["data"] = [_resolve_source(self.plan.base_dir, s) for s in settings.get("data") or []]
        settings.update(name=node.name, model=self._model_source(node), output_dir=str(self.folder(node)))
        result = train_stage(from_dict(StageConfig, settings))
        self._plot_loss(node)
        return _brief(result.metrics)

    def _finetune(self, node: Node) -> dict:
        from downstream.finetune import finetune

        settings = {k: v for k, v in node.settings.items() if k != "lang"}
        root = resolve(self.plan.base_dir, node.dataset["root"])
        result = finetune(node.dataset["name"], root, self._model_source(node), self.folder(node), base=settings,
                          lang=node.settings.get("lang", "en"))
        self._plot_loss(node)
        return _brief(result.metrics)

    def _eval(self, node: Node) -> dict:
        out = self.folder(node)
        metrics: dict = {}
        if self.is_main:
            metrics["after"] = self._evaluate(node, self._model_source(node), out)
            if node.settings.get("baseline"):
                metrics["before"] = self._evaluate(node, self.plan.model, out / "baseline")
        _barrier()
        return metrics

    def _evaluate(self, node: Node, source: dict, out: Path) -> dict:
        from downstream.datasets import load_vqa
        from downstream.evaluate import evaluate_model
        from downstream.metrics import SUITES
        from medvlm.model import load_model

        dataset = node.dataset
        records, report = load_vqa(dataset["name"], resolve(self.plan.base_dir, dataset["root"]),
                                   node.settings.get("split", "test"), dataset.get("lang", "en"))
        bundle = load_model(source)
        result = evaluate_model(bundle, records, out, node.settings.get("suites", SUITES),
                                batch_size=node.settings.get("batch_size", 16),
                                max_new_tokens=node.settings.get("max_new_tokens", 32),
                                closed_mode=node.settings.get("closed_mode", "generate"),
                                option_suffix=node.settings.get("option_suffix", False), progress=False,
                                feature_cache_dir=self.run_dir / "features" if node.settings.get("feature_cache", True) else None)
        result["skipped"] = dict(report.skipped)
        return result

    def _plot_loss(self, node: Node) -> None:
        if self.is_main:
            plot_loss(self.folder(node) / "log.jsonl", self.folder(node) / "loss.png", node.name)

    # ------------------------------------------------------------------------------------ records
    def summary(self) -> dict:
        """``{"variants": {label: {dataset: {"after": suites, "before": suites?}}}, "before"/"after": …}``."""
        variants: dict = {}
        for label, nodes in self.plan.variants.items():
            per_set = {}
            for node in nodes:
                stage_file = self.folder(node) / "stage.json"
                if node.kind != "eval" or not stage_file.is_file():
                    continue
                metrics = json.loads(stage_file.read_text())["metrics"]
                per_set[node.dataset["name"]] = {k: v["suites"] for k, v in metrics.items()}
            variants[label] = per_set
        summary: dict = {"name": self.plan.name, "variants": variants}
        if len(variants) == 1:  # the single-run shape: {"before": {...}, "after": {...}} per headline metrics
            only = next(iter(variants.values()))
            for when in ("before", "after"):
                values = {name: _headline(data[when]) for name, data in only.items() if when in data}
                if values:
                    summary[when] = values[next(iter(values))] if len(values) == 1 else values
        return summary

    def _write_manifest(self) -> None:
        if not self.is_main:
            return
        planned = {n.folder_name for n in self.plan.nodes}
        stages = self.manifest.get("stages", {})
        for node in self.plan.nodes:
            entry = stages.setdefault(node.folder_name, {})
            entry.update(name=node.name, kind=node.kind, key=node.key, inputs=node.inputs,
                         parent=node.parent.folder_name if node.parent else None, status=self.state(node))
        for name, entry in stages.items():
            if name not in planned:
                entry["status"] = "stale"
        self.manifest.update(
            name=self.plan.name, config=self.config, base_dir=str(self.plan.base_dir),
            variants={label: [n.folder_name for n in nodes] for label, nodes in self.plan.variants.items()},
            packages=_versions(), git_revision=_git_revision(), stages=stages)
        _write_json(self.manifest_path, self.manifest)

    def _set_status(self, node: Node, status: str, **extra) -> None:
        if not self.is_main:
            return
        entry = self.manifest.setdefault("stages", {}).setdefault(node.folder_name, {})
        entry.update(status=status, **extra)
        _write_json(self.manifest_path, self.manifest)


def _resolve_source(base_dir: Path, source) -> dict:
    source = {"path": source} if isinstance(source, str) else dict(source)
    source["path"] = str(resolve(base_dir, source["path"]))
    if source.get("images"):
        source["images"] = str(resolve(base_dir, source["images"]))
    return source


def _brief(metrics: dict) -> dict:
    keep = ("global_step", "epochs", "final_loss", "train_seconds", "samples_per_second", "trainable_parameters")
    return {k: metrics.get(k) for k in keep if k in metrics}


def _headline(suites: dict) -> dict:
    """The demo table: strict closed accuracy, llava_med open recall (the paper's number), strict open F1."""
    strict, llava = suites.get("strict", {}), suites.get("llava_med", {})
    return {"closed_accuracy": strict.get("closed_accuracy"), "closed_accuracy_ci": strict.get("closed_accuracy_ci"),
            "open_recall": llava.get("open_recall"), "open_recall_ci": llava.get("open_recall_ci"),
            "open_f1": strict.get("open_f1"), "open_f1_ci": strict.get("open_f1_ci"),
            "n_closed": strict.get("n_closed"), "n_open": strict.get("n_open")}


def plot_loss(log_file: Path, out: Path, title: str) -> Path | None:
    if not log_file.is_file():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_file.read_text().splitlines() if '"loss"' in line]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set(xlabel="optimizer step", ylabel="training loss", title=title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _git_revision() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def run_curriculum(path: str | Path, run_dir: str | Path, overrides: list[str] | None = None,
                   only: str | None = None, from_stage: str | None = None, base_dir: str | Path | None = None) -> dict:
    """Plan ``path`` (relative data paths against ``base_dir``, default the YAML's folder) and run it."""
    data = load_curriculum(path, overrides)
    plan = build_plan(data, base_dir or Path(path).resolve().parent)
    return CurriculumRunner(plan, run_dir, data).run(only=only, from_stage=from_stage)
