"""Model cards: a Hugging Face Hub ``README.md`` in every exported checkpoint, and ``medvlm push``.

The card answers, where the Hub and every reader look, what produced these weights:
- the base vision tower and language model (``medvlm.json``'s ``source`` and ``config.json``);
- every stage that led here, in order: its data files with sha256, size and usable records, its
  hyperparameters, optimizer steps, final loss and seconds;
- evaluation results as ``model-index`` entries (one per data set × suite × metric, the bootstrap 95%
  interval in the metric's name) and as a Markdown table;
- license notes: the licenses of the PMC figures the stages trained on (read from the pairs table the
  images came from), non-commercial ones called out;
- how to load it with plain transformers, chat with it, and serve it.

``push`` publishes a checkpoint folder (card included) to a Hub repository with ``huggingface_hub``, or
copies it to a local folder (``--repo /path`` or ``file://``: a shared-disk model store); ``dry_run`` only
lists what would go.

The facts live in ``medvlm.json`` under ``lineage`` (stage records) and ``evaluations``; a stage loads its
parent's ``medvlm.json`` with the weights, so its card lists the parent's stages, then its own. New
weights start without evaluations. ``README.md`` is rendered from those facts (huggingface_hub's
``ModelCard`` / ``ModelCardData``) and, like ``medvlm.json``, replaced atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

from .fileio import atomic_write_json, atomic_write_text, read_json
from .model import METADATA_FILE

logger = logging.getLogger(__name__)
CARD_FILE = "README.md"
HYPERPARAMETERS = ("epochs", "max_steps", "batch_size", "grad_accum", "lr", "projector_lr", "weight_decay",
                   "warmup_ratio", "max_grad_norm", "max_length", "precision", "deepspeed", "seed")
CARD_METRICS = ("closed_accuracy", "open_recall", "open_f1", "open_exact_match")
NON_COMMERCIAL = re.compile(r"\bNC\b|non-?commercial", re.I)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# ------------------------------------------------------------------------------------ facts
def file_sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def data_file_record(path: str, images: str | None) -> dict:
    """A training data file as the card lists it: name, sha256 and size, and the PMC licenses of its images."""
    file = Path(path)
    record: dict[str, Any] = {"path": str(path), "images": images, "sha256": None, "bytes": None}
    if not file.is_file():  # the card never stops an export: a vanished file is recorded as such
        return record
    record.update(sha256=file_sha256(file), bytes=file.stat().st_size)
    try:
        licenses = pmc_licenses(file, Path(images) if images else file.parent)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        logger.warning("model card: PMC licenses for %s not read (%s)", file, exc)
        licenses = {}
    if licenses:
        record["licenses"] = licenses
    return record


def pmc_licenses(data_file: Path, image_root: Path) -> dict[str, int]:
    """``{license: figures}`` over the figures ``data_file`` uses, when ``image_root`` holds the pairs table
    (``pairs-*.parquet``) they came from; empty otherwise (e.g. a downstream VQA set)."""
    shards = sorted(image_root.glob("pairs-*.parquet"))
    if not shards:
        return {}
    import pyarrow.parquet as pq

    by_image: dict[str, str] = {}
    for shard in shards:
        table = pq.read_table(shard, columns=["image_path", "license"]).to_pydict()
        by_image.update(zip(table["image_path"], table["license"]))
    used = {r.get("image") for r in _records(data_file)}
    return dict(Counter(by_image[p] or "unknown" for p in used if p in by_image).most_common())


def _records(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return json.loads(text)


def stage_record(config, metrics: dict) -> dict:
    """One ``lineage`` entry from a ``StageConfig`` and the trainer's ``metrics.json`` content."""
    hyper = {k: getattr(config, k) for k in HYPERPARAMETERS if getattr(config, k) is not None}
    if "lora" in config.trainable:
        hyper["lora"] = {"r": config.lora.r, "alpha": config.lora.alpha, "dropout": config.lora.dropout}
    data_report = metrics.get("data") or {}
    return {
        "name": config.name, "trainable": config.trainable, "template": config.template,
        "start": config.model, "data": [data_file_record(s.path, s.images) for s in config.data],
        "records": data_report.get("records"), "skipped": sum((data_report.get("skipped") or {}).values()),
        "hyperparameters": hyper, "steps": metrics.get("global_step"), "final_loss": metrics.get("final_loss"),
        "seconds": metrics.get("train_seconds"),
    }


def evaluation_record(dataset: str, split: str, result: dict) -> dict:
    """One ``evaluations`` entry from ``downstream.evaluate.evaluate_model``'s result."""
    return {"dataset": dataset, "split": split, "suites": result["suites"], "settings": result.get("settings", {})}


# ------------------------------------------------------------------------------------ writing
def add_stage(folder: str | os.PathLike, record: dict) -> Path:
    """Append this stage to the lineage the weights carry, drop evaluations of earlier weights, write the card."""
    meta = _read_meta(folder)
    meta["lineage"] = [*meta.get("lineage", []), record]
    meta["evaluations"] = []
    return _save(folder, meta)


def add_evaluation(folder: str | os.PathLike, record: dict) -> Path:
    """Record (or replace) this data set/split's scores for the weights in ``folder`` and rewrite the card."""
    meta = _read_meta(folder)
    keep = [e for e in meta.get("evaluations", []) if (e["dataset"], e["split"]) != (record["dataset"], record["split"])]
    meta["evaluations"] = [*keep, record]
    return _save(folder, meta)


def write_card(folder: str | os.PathLike) -> Path:
    """(Re)render ``README.md`` from ``medvlm.json`` as it is."""
    return _save(folder, _read_meta(folder))


def _read_meta(folder) -> dict:
    return read_json(Path(folder) / METADATA_FILE, {})


def _save(folder, meta: dict) -> Path:
    """Render first, then write the facts and the card (each atomically)."""
    folder = Path(folder)
    card = str(render_card(meta, read_json(folder / "config.json", {})))
    atomic_write_json(folder / METADATA_FILE, meta)
    return atomic_write_text(folder / CARD_FILE, card)


# ------------------------------------------------------------------------------------ rendering
def base_models(meta: dict) -> tuple[str | None, str | None, str | None]:
    """(vision tower, language model, starting checkpoint) the first stage started from: ``compose:V+L``
    (``L/file.gguf`` for a GGUF LM) names both parts, ``preset:tiny`` or a checkpoint the whole."""
    source = str(meta.get("source") or "")
    if source.startswith("compose:"):
        vision, _, llm = source[len("compose:"):].partition("+")
        if llm.endswith(".gguf"):
            llm = llm.rsplit("/", 1)[0]
        return vision, llm, None
    lineage = meta.get("lineage") or []
    start = (lineage[0].get("start") or {}) if lineage else {}
    return None, None, source or start.get("checkpoint") or start.get("preset")


def render_card(meta: dict, config: dict):
    """The ``ModelCard`` for a checkpoint's metadata and ``config.json``."""
    from huggingface_hub import ModelCard, ModelCardData

    vision, llm, start = base_models(meta)
    hub_bases = [b for b in (vision, llm, start) if b and HUB_ID.match(b) and not Path(b).exists()]
    data = ModelCardData(
        library_name="transformers", pipeline_tag="image-text-to-text", license="other",
        license_name="see-license-notes", base_model=hub_bases or None,
        tags=["medvlm", "llava", "medical", "biomedical", "vision-language"],
        model_name=_model_name(meta), eval_results=_eval_results(meta.get("evaluations") or []) or None,
    )
    body = "\n\n".join([
        f"# {_model_name(meta)}",
        "A LLaVA-style vision-language model (`LlavaForConditionalGeneration`) for biomedical images, "
        "trained with medvlm. Research use only: not a medical device, not for diagnosis.",
        _architecture_section(meta, config, vision, llm, start),
        _stages_section(meta.get("lineage") or []),
        _evaluation_section(meta.get("evaluations") or []),
        _license_section(meta.get("lineage") or []),
        _usage_section(meta),
    ])
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n")


def _model_name(meta: dict) -> str:
    lineage = meta.get("lineage") or []
    return f"medvlm {lineage[-1]['name']}" if lineage else "medvlm checkpoint"


def _eval_results(evaluations: list[dict]) -> list:
    from huggingface_hub import EvalResult

    results = []
    for ev in evaluations:
        for suite, values in ev["suites"].items():
            for metric in CARD_METRICS:
                if values.get(metric) is None:
                    continue
                ci = values.get(f"{metric}_ci")
                interval = f" (95% CI {ci[0]}–{ci[1]})" if ci else ""
                results.append(EvalResult(
                    task_type="visual-question-answering", task_name="Medical VQA", dataset_type=ev["dataset"],
                    dataset_name=ev["dataset"], dataset_split=ev["split"], metric_type=metric,
                    metric_value=values[metric], metric_config=suite, metric_name=f"{suite} {metric}{interval}"))
    return results


def _architecture_section(meta, config, vision, llm, start) -> str:
    vision_cfg, text_cfg = config.get("vision_config") or {}, config.get("text_config") or {}
    rows = [
        f"- Vision tower: {vision or 'from the starting checkpoint'} ({vision_cfg.get('model_type', '?')}, "
        f"image {vision_cfg.get('image_size', '?')} px, patch {vision_cfg.get('patch_size', '?')}, "
        f"hidden {vision_cfg.get('hidden_size', '?')}, {vision_cfg.get('num_hidden_layers', '?')} layers)",
        f"- Language model: {llm or 'from the starting checkpoint'} ({text_cfg.get('model_type', '?')}, "
        f"hidden {text_cfg.get('hidden_size', '?')}, {text_cfg.get('num_hidden_layers', '?')} layers, "
        f"vocabulary {text_cfg.get('vocab_size', '?')})",
        f"- Projector: {config.get('projector_hidden_act', '?')} MLP; prompt template `{meta.get('template', '?')}`",
    ]
    if start:
        rows.insert(0, f"- Started from: `{start}`")
    return "## Model\n\n" + "\n".join(rows)


def _stages_section(lineage: list[dict]) -> str:
    if not lineage:
        return "## Training\n\nNo training stage recorded (weights as built or converted)."
    parts = ["## Training\n\nStages, in the order they ran:"]
    for i, stage in enumerate(lineage, 1):
        hyper = ", ".join(f"{k}={v}" for k, v in stage.get("hyperparameters", {}).items())
        lines = [f"### {i}. {stage['name']}",
                 f"- Trainable: `{stage.get('trainable')}`; template: `{stage.get('template') or 'the model’s own'}`",
                 f"- Hyperparameters: {hyper}",
                 f"- {stage.get('steps')} optimizer steps, final loss {_fmt(stage.get('final_loss'))}, "
                 f"{_fmt(stage.get('seconds'))} s; {stage.get('records', '?')} records, {stage.get('skipped', 0)} skipped",
                 "", "| data file | sha256 | bytes |", "|---|---|---|"]
        lines += [f"| `{Path(d['path']).name}` | `{d['sha256'] or 'missing at export'}` | {d['bytes'] or '–'} |"
                  for d in stage.get("data", [])]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def _evaluation_section(evaluations: list[dict]) -> str:
    if not evaluations:
        return "## Evaluation\n\nNot evaluated yet (the card is updated when a curriculum evaluates these weights)."
    lines = ["## Evaluation\n\nPercentages with bootstrap 95% intervals; suites as defined in medvlm's "
             "`downstream/metrics.py` (`strict` are the numbers to quote).\n",
             "| data set | split | suite | " + " | ".join(CARD_METRICS) + " |",
             "|---|---|---|" + "---|" * len(CARD_METRICS)]
    for ev in evaluations:
        for suite, values in ev["suites"].items():
            cells = [_metric_cell(values, m) for m in CARD_METRICS]
            lines.append(f"| {ev['dataset']} | {ev['split']} | {suite} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _metric_cell(values: dict, metric: str) -> str:
    if values.get(metric) is None:
        return "–"
    ci = values.get(f"{metric}_ci")
    return f"{values[metric]:.1f} [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else f"{values[metric]:.1f}"


def _license_section(lineage: list[dict]) -> str:
    totals: Counter = Counter()
    for stage in lineage:
        for data in stage.get("data", []):
            totals.update(data.get("licenses") or {})
    text = ("## License notes\n\nThe license of these weights is for their publisher to set; it must respect "
            "the base models' licenses and the terms of every data set listed under Training.")
    if not totals:
        return text + " No PMC pairs table was found next to the training data, so figure licenses are not listed."
    rows = "\n".join(f"| {name} | {count} |" for name, count in totals.most_common())
    text += f"\n\nPMC Open Access figures used in training, by article license:\n\n| license | figures |\n|---|---|\n{rows}"
    non_commercial = sum(c for name, c in totals.items() if NON_COMMERCIAL.search(name))
    if non_commercial:
        text += (f"\n\n{non_commercial} figure(s) come from articles under non-commercial (NC) licenses: "
                 "commercial use of these weights may not be compatible with them.")
    return text


def _usage_section(meta: dict) -> str:
    return f"""## How to use

```python
from transformers import AutoProcessor, LlavaForConditionalGeneration

model = LlavaForConditionalGeneration.from_pretrained("PATH_OR_REPO")
processor = AutoProcessor.from_pretrained("PATH_OR_REPO")   # chat template: `{meta.get('template', '?')}`
```

With medvlm: `medvlm chat --model PATH "What does the image show?" --image scan.dcm` (`--web` opens a
browser chat). Serving with an OpenAI-compatible API: `vllm serve PATH` in production, or
`transformers serve PATH` for a quick check."""


def _fmt(value) -> str:
    return "?" if value is None else (f"{value:.4g}" if isinstance(value, float) else str(value))


# ------------------------------------------------------------------------------------ push
class PushError(ValueError):
    """A push that cannot start (no checkpoint, bad repo name, target that is not a model folder)."""


def checkpoint_files(folder: str | os.PathLike) -> list[tuple[str, int]]:
    """(relative path, bytes) of what a push uploads: everything but hidden files and the completion marker."""
    from .checkpoint import COMPLETE_MARKER

    folder = Path(folder)
    files = [p for p in folder.rglob("*") if p.is_file() and p.name != COMPLETE_MARKER
             and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    return sorted((p.relative_to(folder).as_posix(), p.stat().st_size) for p in files)


def push(folder: str | os.PathLike, repo: str, dry_run: bool = False, private: bool = False,
         message: str | None = None) -> dict:
    """Upload ``folder`` to Hub repo ``repo`` (or copy it to a local folder); writes the card first if missing.
    Returns ``{"target", "files", "uploaded", "url", "card_written_at_push"}``."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise PushError(f"{folder}: not a checkpoint folder (no config.json); pass a stage's checkpoint/")
    local = _local_target(repo)
    if local is None:
        _check_repo_id(repo)
    if not (folder / CARD_FILE).is_file() and not dry_run:
        write_card(folder)
    files = checkpoint_files(folder)
    result = {"target": str(local or repo), "files": files, "uploaded": False, "url": None,
              "card_written_at_push": not (folder / CARD_FILE).is_file()}
    if dry_run:
        return result
    message = message or f"Upload {_model_name(_read_meta(folder))} with medvlm"
    result["url"] = str(_copy_to(folder, local, files)) if local else _upload(folder, repo, files, private, message)
    result["uploaded"] = True
    return result


def _local_target(repo: str) -> Path | None:
    if repo.startswith("file://"):
        return Path(repo[len("file://"):])
    return Path(repo) if repo.startswith(("/", "./", "../", "~")) else None


def _check_repo_id(repo: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError as exc:
        raise PushError(f"--repo {repo!r}: not a Hub repository id ({exc}); use owner/name, or /path for a local folder") from exc


def _copy_to(folder: Path, target: Path, files: list[tuple[str, int]]) -> Path:
    import shutil

    from .checkpoint import atomic_folder

    target = target.expanduser()
    if target.exists() and any(target.iterdir()) and not (target / "config.json").is_file():
        raise PushError(f"{target}: exists and is not a model folder; choose an empty or new folder")

    def write(tmp: Path) -> None:
        for name, _ in files:
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(folder / name, tmp / name)

    return atomic_folder(target, write)


def _upload(folder: Path, repo: str, files: list[tuple[str, int]], private: bool, message: str) -> str:
    from huggingface_hub import HfApi

    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    api = HfApi()
    try:
        api.create_repo(repo, private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo, allow_patterns=[name for name, _ in files],
                                   commit_message=message)
    except (HfHubHTTPError, LocalTokenNotFoundError, OSError) as exc:
        raise RuntimeError(f"push to {repo} failed ({' '.join(str(exc).split())}); log in with `hf auth login` "
                           "or set HF_TOKEN, and check the repository name and your write access") from exc
    return str(getattr(commit, "commit_url", commit))
