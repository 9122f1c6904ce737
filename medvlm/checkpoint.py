"""Checkpoints that survive crashes: atomic writes, a completion marker, keep-last-N, fallback on corruption.

Layout of a stage's ``output_dir``::

    resume/checkpoint-000120/   accelerate state (model, optimizer, scheduler, RNG) + trainer_state.json + COMPLETE
    checkpoint/                 the exported HF folder (LoRA merged) the next stage or a user loads

Every write goes to a hidden temporary folder first and is renamed into place only after the
``COMPLETE`` marker is written, so a run killed mid-write never leaves a folder that looks finished.
``checkpoint/COMPLETE`` is the one record that a stage finished (``final_checkpoint``): the trainer's
"already finished" and the curriculum's "done" both read it.

LoRA under ZeRO-3 (``merge_lora_gathered``): each adapter layer's parameters are gathered with DeepSpeed's
``GatheredParameters`` and peft merges the adapter into its base weight, one layer at a time; the adapter
layers are then unloaded, so the consolidated state dict is a plain LLaVA one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from .fileio import atomic_write_text, atomic_write_json

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"
PREFIX = "checkpoint-"


def mark_complete(folder: Path) -> None:
    marker = folder / COMPLETE_MARKER
    with open(marker, "w") as fh:
        fh.write(time.strftime("%Y-%m-%dT%H:%M:%S"))
        fh.flush()
        os.fsync(fh.fileno())


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE_MARKER).is_file()


def final_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """A stage's exported ``checkpoint/`` when it is complete, else ``None``."""
    folder = Path(output_dir) / "checkpoint"
    return folder if is_complete(folder) else None


def atomic_folder(final: Path, write: Callable[[Path], None], is_main: bool = True,
                  barrier: Callable[[], None] = lambda: None) -> Path:
    """Run ``write(tmp)`` on every rank, then (rank 0) mark complete and rename ``tmp`` → ``final``."""
    final = Path(final)
    tmp = final.parent / f".tmp-{final.name}"
    if is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    write(tmp)
    barrier()
    if is_main:
        mark_complete(tmp)
        if final.exists():
            old = final.parent / f".old-{final.name}"
            if old.exists():
                shutil.rmtree(old)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
    barrier()
    return final


class ResumeCheckpoints:
    """The ``resume/`` folder of one stage: save, list, prune and pick the latest usable checkpoint."""

    def __init__(self, output_dir: str | os.PathLike, keep_last: int = 2):
        self.root = Path(output_dir) / "resume"
        self.keep_last = max(1, keep_last)

    def path_for(self, step: int) -> Path:
        return self.root / f"{PREFIX}{step:06d}"

    def complete(self) -> list[Path]:
        """Finished checkpoints, newest first (half-written ones have no marker and are ignored)."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and is_complete(p)]
        return sorted(found, key=lambda p: int(p.name[len(PREFIX):]), reverse=True)

    def save(self, step: int, write_state: Callable[[Path], None], trainer_state: dict, is_main: bool,
             barrier: Callable[[], None]) -> Path:
        def write(tmp: Path) -> None:
            write_state(tmp)
            if is_main:
                atomic_write_json(tmp / STATE_FILE, trainer_state)

        path = atomic_folder(self.path_for(step), write, is_main, barrier)
        if is_main:
            self.prune()
        return path

    def prune(self) -> None:
        for old in self.complete()[self.keep_last:]:
            shutil.rmtree(old, ignore_errors=True)

    def load_latest(self, load_state: Callable[[Path], None]) -> dict | None:
        """Load the newest checkpoint that loads; warn and fall back to older ones when one is corrupt."""
        for path in self.complete():
            try:
                state = json.loads((path / STATE_FILE).read_text())
                load_state(path)
            except Exception as exc:  # noqa: BLE001 - any failure means "not usable", try the previous one
                logger.warning("checkpoint %s is unusable (%s: %s); falling back to the previous one",
                               path, type(exc).__name__, exc)
                continue
            state["path"] = str(path)
            return state
        return None


def trim_log(log_file: Path, last_step: int) -> None:
    """Drop ``log.jsonl`` lines of steps after ``last_step`` (lost with a crash; a resumed run logs them again)."""
    if not log_file.is_file():
        return
    lines = log_file.read_text().splitlines()
    kept = [line for line in lines if _step_of(line) is None or _step_of(line) <= last_step]
    if len(kept) != len(lines):
        atomic_write_text(log_file, "".join(f"{line}\n" for line in kept))


def _step_of(line: str) -> int | None:
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return None  # a line cut by the kill
    return step if isinstance(step, int) else None


def merge_lora_gathered(peft_model):
    """ZeRO-3: merge every LoRA adapter into its base weight, gathering one layer at a time, then unload the
    adapter layers in place. Collective: every rank calls it. Returns the plain (still partitioned) model."""
    import deepspeed
    from peft.tuners.lora import LoraLayer

    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0):
                module.merge()
    return peft_model.unload()


def strip_peft_prefix(state_dict: dict | None) -> dict | None:
    """State-dict keys of a (merged, unloaded) peft-wrapped model → the plain model's keys (``None``: the
    consolidated state dict exists on rank 0 only)."""
    if state_dict is None:
        return None
    prefix = "base_model.model."
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}


def projector_weights(state_dict: dict | None) -> dict | None:
    """The projector's tensors (``linear_1.weight``, ...) from a consolidated plain state dict."""
    if state_dict is None:
        return None
    marker = "multi_modal_projector."
    return {k.split(marker, 1)[1]: v.contiguous() for k, v in state_dict.items() if marker in k}
