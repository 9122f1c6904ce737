"""Downstream finetuning: a VQA set's training split → single-turn conversations → the shared trainer.

LLaVA-Med found 9 epochs best for VQA-RAD, SLAKE and PathVQA; that is the default here, with LLaVA-Med's
global batch of 64 when neither ``batch_size`` nor ``grad_accum`` is set (8 per device, gradient
accumulation making up the rest for the number of processes).
Everything else comes from the stage config (``--set`` overrides or a curriculum's stage), with
``projector+llm`` trainable and lr 2e-5 unless told otherwise, as LLaVA-Med's finetune scripts do.

Training questions are laid out as the evaluation protocol they will be scored with poses them
(``protocol``, downstream/protocols.py): the image before or after the question, LLaVA-Med's yes/no
option suffix on closed questions, LLaVA-1.5's short-answer instruction.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from medvlm.config import StageConfig, apply_overrides, from_dict
from medvlm.conversation import prompt_messages
from medvlm.trainer import TrainResult, train_stage

from .datasets import load_vqa, to_conversations
from .protocols import format_question, get_protocol

DEFAULT_EPOCHS = 9
GLOBAL_BATCH = 64        # LLaVA-Med's finetune scripts
PER_DEVICE_BATCH = 8


def prepare_finetune_data(dataset: str, root: str | Path, out_dir: str | Path, split: str = "train",
                          lang: str = "en", protocol: str = "medvlm") -> tuple[Path, Path, dict]:
    """Write ``train.json`` (LLaVA conversations, questions laid out as ``protocol`` poses them) for
    ``split``; returns (json, image root, load report)."""
    records, report = load_vqa(dataset, root, split=split, lang=lang)
    if not records:
        raise ValueError(f"{root}: no usable {dataset} {split} questions ({dict(report.skipped)})")
    image_root = Path(root) if Path(root).is_dir() else Path(root).parent
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{dataset}_{split}.json"
    layout = get_protocol(protocol)
    conversations = to_conversations(records, image_root)
    for record, conversation in zip(records, conversations):
        question = format_question(layout, record.question, record.answer_type)
        conversation["conversations"][0] = prompt_messages(question, True, layout.image_first)[0]
    path.write_text(json.dumps(conversations, indent=1))
    info = {"layout": report.layout, "questions": report.loaded, "skipped": dict(report.skipped)}
    return path, image_root, info


def finetune(dataset: str, root: str | Path, model: dict, output_dir: str | Path, overrides: list[str] | None = None,
             base: dict | None = None, lang: str = "en") -> TrainResult:
    """One finetune run on one set; ``base`` holds stage settings, ``overrides`` are ``key=value`` strings."""
    output_dir = Path(output_dir)
    base = dict(base or {})
    protocol = base.pop("protocol", "medvlm")
    data, image_root, info = prepare_finetune_data(dataset, root, output_dir / "data", lang=lang, protocol=protocol)
    given = set(base) | {item.split("=", 1)[0].strip() for item in overrides or []}
    batch = {} if given & {"batch_size", "grad_accum"} else _global_batch()
    settings = {"name": f"finetune-{dataset}", "trainable": "projector+llm", "lr": 2e-5, "epochs": DEFAULT_EPOCHS,
                **batch, **base}
    settings.update(model=model, output_dir=str(output_dir), data=[{"path": str(data), "images": str(image_root)}])
    config = from_dict(StageConfig, apply_overrides(settings, overrides or []))
    length = (f"{config.max_steps} steps (max_steps overrides epochs)" if config.max_steps
              else f"{config.epochs:g} epochs")
    print(f"finetune {dataset}: {info['questions']} training questions ({info['layout']}), "
          f"{length}; skipped {info['skipped'] or 'none'}")
    return train_stage(config)


def _global_batch() -> dict:
    """Per-device batch and accumulation giving LLaVA-Med's global batch for this launch's processes."""
    world = max(1, int(os.environ.get("WORLD_SIZE", "1")))
    return {"batch_size": PER_DEVICE_BATCH, "grad_accum": max(1, GLOBAL_BATCH // (PER_DEVICE_BATCH * world))}
