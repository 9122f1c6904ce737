"""Downstream finetuning: a VQA set's training split → single-turn conversations → the shared trainer.

LLaVA-Med found 9 epochs best for VQA-RAD, SLAKE and PathVQA; that is the default here. Everything
else comes from the stage config (``--set`` overrides or a curriculum's stage), with ``projector+llm``
trainable and lr 2e-5 unless told otherwise, as LLaVA-Med's finetune scripts do.
"""

from __future__ import annotations

import json
from pathlib import Path

from medvlm.config import StageConfig, apply_overrides, from_dict
from medvlm.trainer import TrainResult, train_stage

from .datasets import load_vqa, to_conversations

DEFAULT_EPOCHS = 9


def prepare_finetune_data(dataset: str, root: str | Path, out_dir: str | Path, split: str = "train",
                          lang: str = "en") -> tuple[Path, Path, dict]:
    """Write ``train.json`` (LLaVA conversations) for ``split``; returns (json, image root, load report)."""
    records, report = load_vqa(dataset, root, split=split, lang=lang)
    if not records:
        raise ValueError(f"{root}: no usable {dataset} {split} questions ({dict(report.skipped)})")
    image_root = Path(root) if Path(root).is_dir() else Path(root).parent
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{dataset}_{split}.json"
    path.write_text(json.dumps(to_conversations(records, image_root), indent=1))
    info = {"layout": report.layout, "questions": report.loaded, "skipped": dict(report.skipped)}
    return path, image_root, info


def finetune(dataset: str, root: str | Path, model: dict, output_dir: str | Path, overrides: list[str] | None = None,
             base: dict | None = None, lang: str = "en") -> TrainResult:
    """One finetune run on one set; ``base`` holds stage settings, ``overrides`` are ``key=value`` strings."""
    output_dir = Path(output_dir)
    data, image_root, info = prepare_finetune_data(dataset, root, output_dir / "data", lang=lang)
    settings = {"name": f"finetune-{dataset}", "trainable": "projector+llm", "lr": 2e-5, "epochs": DEFAULT_EPOCHS,
                **(base or {})}
    settings.update(model=model, output_dir=str(output_dir), data=[{"path": str(data), "images": str(image_root)}])
    config = from_dict(StageConfig, apply_overrides(settings, overrides or []))
    length = (f"{config.max_steps} steps (max_steps overrides epochs)" if config.max_steps
              else f"{config.epochs:g} epochs")
    print(f"finetune {dataset}: {info['questions']} training questions ({info['layout']}), "
          f"{length}; skipped {info['skipped'] or 'none'}")
    return train_stage(config)

