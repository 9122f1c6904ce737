"""``medvlm curriculum run``: run a plan's stages in order, each from its parent's checkpoint, resumable.

Run directory::

    manifest.json        resolved config, input hashes, package versions, git revision, per-stage status/timings
    summary.json         every eval stage's metrics by variant and data set (+ "before"/"after" for baselines)
    features/            vision features shared by every eval (the tower is frozen: keyed by its weights)
    stages/NAME-KEY/     one folder per distinct stage: checkpoint/, log.jsonl, metrics.json, loss.png, stage.json
    .lock, .lock.owner   held while a run is going on: a second run on the same directory is refused

A stage that produces weights is done when its ``checkpoint/COMPLETE`` marker exists — the trainer's own
record, the only one (``stage.json`` holds its metrics for reports). An eval stage is done when its
``stage.json`` is written. Re-running a finished run does nothing. After a crash or a SIGTERM (Slurm
preemption: the trainer saves, the run exits with status 3), running again (``--resume``) skips finished
stages and the trainer resumes the unfinished one from its last checkpoint. A crashed stage is recorded
``failed`` with its error in the manifest. A stage whose settings, inputs or parent changed has a new
key, so it and every stage after it run again; folders no longer in the plan are listed as stale.

Under ``accelerate launch`` / ``torchrun`` every rank runs this loop (training is collective; in an eval
stage every rank answers its share of the questions and rank 0 scores them); the lock and every shared
file are rank 0's.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from importlib import metadata
from pathlib import Path

from medvlm.checkpoint import final_checkpoint
from medvlm.fileio import FolderLock, atomic_write_json, read_json
from medvlm.trainer import plot_loss  # noqa: F401 - re-exported: reports and older callers import it from here

from .kinds import KINDS
from .plan import Node, Plan, build_plan, load_curriculum, require_inputs, resolve

PACKAGES = ("medvlm", "torch", "transformers", "peft", "accelerate", "deepspeed", "datasets", "pydicom")


class StageInterrupted(Exception):
    """A stage stopped by SIGTERM/SIGINT with its state saved; the command exits 3 and a rerun resumes it."""

    exit_code = 3

    def __init__(self, node: Node, checkpoint: Path):
        super().__init__(f"stage {node.name} interrupted; its state is saved in {checkpoint}. "
                         "Run the same command again (or with --resume) to continue from there.")


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
        """done | failed | partial | pending — "done" from the checkpoint's COMPLETE marker (eval: stage.json)."""
        folder = self.folder(node)
        record = read_json(folder / "stage.json")
        if KINDS[node.kind].produces_weights:
            if final_checkpoint(folder) is not None:
                return "done"
        elif record.get("status") == "done":
            return "done"
        if record.get("status") == "failed":
            return "failed"
        if (folder / "resume").is_dir() or (folder / "log.jsonl").is_file():
            return "partial"
        return "pending"

    # ------------------------------------------------------------------------------------ run
    def run(self, only: str | None = None, from_stage: str | None = None) -> dict:
        lock = FolderLock(self.run_dir, "curriculum run") if self.is_main else contextlib.nullcontext()
        with lock:
            if from_stage:
                self._forget_from(from_stage, self.plan.nodes)
            self._write_manifest()
            todo = [n for n in self.plan.nodes if (not only or n.stage == only) and self.state(n) != "done"]
            require_inputs(todo, self.plan.base_dir)
            for node in self.plan.nodes:
                if not only or node.stage == only:
                    self._run_stage(node)
            summary = self.summary()
            if self.is_main:
                atomic_write_json(self.run_dir / "summary.json", summary)
                print(f"[curriculum] done; summary at {self.run_dir / 'summary.json'}")
        return summary

    def _run_stage(self, node: Node) -> None:
        state = self.state(node)
        if state == "done":
            print(f"[curriculum] {node.name}: done, skipping ({self.folder(node)})")
            return
        parent = node.model_parent
        if parent is not None and self.state(parent) != "done":
            raise RuntimeError(f"stage {node.name} needs {parent.name} finished first; run without --only")
        print(f"[curriculum] {node.name}: {'starting' if state == 'pending' else 'resuming'} in {self.folder(node)}")
        started = time.time()
        self._set_status(node, "running", started=started, error=None)
        self.folder(node).mkdir(parents=True, exist_ok=True)  # a kind writes into its folder from the start
        try:
            metrics = KINDS[node.kind].run(self, node)
        except StageInterrupted:
            self._set_status(node, "interrupted")
            raise
        except Exception as exc:
            error = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
            self._record(node, {"status": "failed", "error": error})
            self._set_status(node, "failed", error=error)
            raise
        seconds = round(time.time() - started, 2)
        self._record(node, {"status": "done", "seconds": seconds, "metrics": metrics})
        self._set_status(node, "done", seconds=seconds)
        _barrier()

    def _record(self, node: Node, entry: dict) -> None:
        if self.is_main:
            atomic_write_json(self.folder(node) / "stage.json", {"name": node.name, "key": node.key, **entry})

    def trained(self, node: Node, result) -> dict:
        """A train/finetune stage's result → its brief metrics; an interrupted one stops the run."""
        if result.interrupted:
            raise StageInterrupted(node, result.checkpoint)
        return _brief(result.metrics)

    def record_scores(self, node: Node, result: dict) -> None:
        """An eval node's scores → the model card of the checkpoint it evaluated (``medvlm/modelcard.py``) and
        the trackers of the curriculum's ``defaults`` (TensorBoard files in the eval stage's folder)."""
        parent = node.model_parent
        if not self.is_main or parent is None or not result.get("suites"):
            return
        from medvlm.modelcard import add_evaluation, evaluation_record
        from medvlm.tracking import log_scores, numbers

        dataset, split = node.dataset["name"], node.settings.get("split", "test")
        add_evaluation(self.folder(parent) / "checkpoint", evaluation_record(dataset, split, result))
        report_to = (self.config.get("defaults") or {}).get("report_to", ["tensorboard"])
        log_scores(report_to, self.plan.name, node.name, self.folder(node), numbers(result["suites"], f"eval/{dataset}"))

    def _forget_from(self, stage: str, nodes: list[Node]) -> None:
        names = [n.stage for n in nodes]
        if stage not in names:
            raise ValueError(f"--from {stage!r}: no such stage; stages are {sorted(set(names))}")
        start = names.index(stage)
        if self.is_main:
            for node in nodes[start:]:
                shutil.rmtree(self.folder(node), ignore_errors=True)
        _barrier()

    def model_source(self, node: Node) -> dict:
        parent = node.model_parent
        return {"checkpoint": str(self.folder(parent) / "checkpoint")} if parent else self.root_source()

    def root_source(self) -> dict:
        """The curriculum's model; a LLaVA-format checkpoint is converted once into ``converted/``."""
        from medvlm.convert import ensure_converted

        return ensure_converted(self.plan.model, self.run_dir / "converted", self.is_main)

    def evaluate(self, node: Node, source: dict, out: Path) -> dict:
        """One eval node: ``source``'s answers on the node's data set split → its suites' metrics."""
        from downstream.datasets import load_vqa
        from downstream.evaluate import evaluate_model
        from downstream.protocols import EvalSettings
        from medvlm.device import load_for_inference

        dataset = node.dataset
        records, report = load_vqa(dataset["name"], resolve(self.plan.base_dir, dataset["root"]),
                                   node.settings.get("split", "test"), dataset.get("lang", "en"))
        bundle = load_for_inference(source)
        result = evaluate_model(bundle, records, out, EvalSettings.from_mapping(node.settings), progress=False,
                                feature_cache_dir=self.run_dir / "features" if node.settings.get("feature_cache", True) else None)
        result["skipped"] = dict(report.skipped)
        return result

    # ------------------------------------------------------------------------------------ records
    def summary(self) -> dict:
        """``{"variants": {label: {dataset: {"after": suites, "before": suites?}}}, "before"/"after": …}``."""
        variants: dict = {}
        for label, nodes in self.plan.variants.items():
            per_set = {}
            for node in nodes:
                record = read_json(self.folder(node) / "stage.json")
                if node.kind != "eval" or record.get("status") != "done":
                    continue
                metrics = record["metrics"]
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
        atomic_write_json(self.manifest_path, self.manifest)

    def _set_status(self, node: Node, status: str, **extra) -> None:
        if not self.is_main:
            return
        entry = self.manifest.setdefault("stages", {}).setdefault(node.folder_name, {})
        entry.update(status=status, **extra)
        atomic_write_json(self.manifest_path, self.manifest)


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


def run_curriculum(path: str | Path, run_dir: str | Path, overrides: list[str] | None = None,
                   only: str | None = None, from_stage: str | None = None, base_dir: str | Path | None = None,
                   resume: bool = False) -> dict:
    """Plan ``path`` (relative data paths against ``base_dir``, default the YAML's folder) and run it.

    ``resume``: continue the run already in ``run_dir`` (refused when there is none). Without it a rerun
    continues too — finished stages are never redone — ``resume`` only insists that there is a run."""
    if resume and not (Path(run_dir) / "manifest.json").is_file():
        raise FileNotFoundError(f"--resume: {run_dir} holds no curriculum run (no manifest.json); "
                                "run without --resume to start one, or check --run-dir")
    data = load_curriculum(path, overrides)
    plan = build_plan(data, base_dir or Path(path).resolve().parent)
    return CurriculumRunner(plan, run_dir, data).run(only=only, from_stage=from_stage)
