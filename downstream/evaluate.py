"""Evaluate a checkpoint on a VQA split, re-score anybody's predictions, compare two runs.

``evaluate_model`` writes, in its output folder:
- ``answers.jsonl``: one line per question ``{id, question, gt, prediction, answer_type, image, …groups}``;
- ``metrics.json``: every suite (``llava_med``, ``llava_med_2023``, ``strict``) overall and per group, with
  bootstrap intervals, plus how the answers were produced;
- ``report.md``: the table.

Closed questions can be answered by generation (default, optionally with LLaVA-Med's option suffix
"Please choose from the following two options: [yes, no]") or by likelihood: each candidate answer is
scored by the model's log-probability of the whole reply (answer tokens + end of turn) in one batched
forward pass, the best is the prediction — no free text to parse.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch

from .datasets import VQARecord
from .metrics import SUITES, Item, evaluate_items, format_table, paired_difference

OPTION_SUFFIX = " Please choose from the following two options: [yes, no]."
GROUP_KEYS = ("question_type", "image_organ", "content_type", "modality", "location", "organ")


def _groups(record: VQARecord) -> dict:
    return {k: record.metadata[k] for k in GROUP_KEYS if record.metadata.get(k) not in (None, "")}


def evaluate_model(bundle, records: Sequence[VQARecord], out_dir: str | Path, suites: Sequence[str] = SUITES,
                   batch_size: int = 16, max_new_tokens: int = 32, closed_mode: str = "generate",
                   option_suffix: bool = False, candidates: Sequence[str] | None = None, progress: bool = True,
                   feature_cache_dir: str | Path | None = None) -> dict:
    """Answer every record, score it, and write answers.jsonl / metrics.json / report.md to ``out_dir``.

    ``feature_cache_dir`` keeps vision features on disk, keyed by image, tower weights and preprocessing,
    so repeated evaluations (other checkpoints with the same frozen tower) skip image decoding."""
    from medvlm.generate import generate_answers

    if closed_mode not in ("generate", "likelihood"):
        raise ValueError("closed_mode must be 'generate' or 'likelihood'")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    predictions: dict[str, str] = {}
    closed = [r for r in records if r.answer_type == "closed"]
    to_generate = list(records) if closed_mode == "generate" else [r for r in records if r.answer_type == "open"]
    if closed_mode == "likelihood" and closed:
        choices = likelihood_choice(bundle, [r.question for r in closed], [r.image for r in closed], ["yes", "no"],
                                    batch_size=batch_size)
        predictions.update({r.id: c for r, c in zip(closed, choices)})
    questions = [r.question + (OPTION_SUFFIX if option_suffix and r.answer_type == "closed" else "") for r in to_generate]
    feature_cache = None
    if feature_cache_dir is not None:
        from medvlm.features import FeatureCache

        feature_cache = FeatureCache(bundle.model, bundle.image_processor, "pad", feature_cache_dir)
    answers = generate_answers(bundle, questions, [r.image for r in to_generate], max_new_tokens=max_new_tokens,
                               batch_size=batch_size, progress=progress, feature_cache=feature_cache)
    predictions.update({r.id: a for r, a in zip(to_generate, answers)})
    rows = [{"id": r.id, "question": r.question, "gt": r.answer, "prediction": predictions[r.id],
             "answer_type": r.answer_type, "image": r.image, **_groups(r)} for r in records]
    _write_jsonl(out_dir / "answers.jsonl", rows)
    items = [Item(r.id, predictions[r.id], r.answer, r.answer_type, _groups(r)) for r in records]
    result = evaluate_items(items, suites, candidates)
    result["settings"] = {"closed_mode": closed_mode, "option_suffix": option_suffix, "batch_size": batch_size,
                          "max_new_tokens": max_new_tokens, "questions": len(records)}
    _write_json(out_dir / "metrics.json", result)
    (out_dir / "report.md").write_text(f"# VQA evaluation\n\n{format_table(result, suites)}\n")
    return result


@torch.no_grad()
def likelihood_choice(bundle, questions: Sequence[str], images: Sequence, options: Sequence[str],
                      batch_size: int = 16) -> list[str]:
    """For each question, the option with the highest log-likelihood of being the whole reply."""
    from medvlm.conversation import IGNORE_INDEX, encode
    from medvlm.generate import _pixels

    model = bundle.model.eval()
    device = next(model.parameters()).device
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    chosen: list[str] = []
    for start in range(0, len(questions), batch_size):
        qs, ims = questions[start:start + batch_size], images[start:start + batch_size]
        rows, pixel_list = [], []
        for question, image in zip(qs, ims):
            pixels = _pixels(bundle, image, "pad") if image is not None else None
            for option in options:
                conv = [{"from": "human", "value": ("<image>\n" if image is not None else "") + question},
                        {"from": "gpt", "value": option}]
                rows.append(encode(bundle.template, conv, bundle.tokenizer, bundle.image_token_id,
                                   bundle.num_image_tokens, image is not None))
                if pixels is not None:
                    pixel_list.append(pixels)
        longest = max(len(r.input_ids) for r in rows)
        pad = bundle.tokenizer.pad_token_id
        ids = torch.full((len(rows), longest), pad, dtype=torch.long)
        labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row.input_ids)] = torch.tensor(row.input_ids)
            labels[i, :len(row.labels)] = torch.tensor(row.labels)
            mask[i, :len(row.input_ids)] = 1
        kwargs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
        if pixel_list:
            kwargs["pixel_values"] = torch.stack(pixel_list).to(device=device, dtype=dtype)
        logits = model(**kwargs).logits.float()
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
        targets = labels[:, 1:].to(device)
        valid = targets != IGNORE_INDEX
        picked = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        scores = (picked * valid).sum(-1).view(len(qs), len(options))
        chosen.extend(options[int(i)] for i in scores.argmax(-1))
    return chosen


# ------------------------------------------------------------------------------------ re-scoring files
class ScoreInputError(ValueError):
    """Prediction and ground-truth files that cannot be matched; the message names the ids."""


def read_predictions(path: str | Path) -> dict[str, str]:
    """``question_id``/``text`` (LLaVA-Med answer files) or ``id``/``prediction`` (ours), keyed by id."""
    predictions = {}
    for line_no, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        item = json.loads(line)
        key = item.get("question_id", item.get("id"))
        text = item.get("text", item.get("prediction"))
        if key is None or text is None:
            raise ScoreInputError(f"{path}:{line_no}: expected question_id+text (LLaVA-Med) or id+prediction (medvlm)")
        predictions[str(key)] = str(text)
    return predictions


def read_ground_truth(path: str | Path) -> list[Item]:
    """LLaVA-Med's test JSON (``id``, ``conversations``, ``answer_type``) or our answers.jsonl."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        return [Item(str(r["id"]), "", str(r["gt"]), str(r["answer_type"]).lower(),
                     {k: r[k] for k in GROUP_KEYS if k in r}) for r in rows]
    items = []
    for record in json.loads(text):
        turns = record.get("conversations") or record.get("conversatons")
        kind = str(record.get("answer_type", "")).upper()
        if kind not in ("OPEN", "CLOSED"):
            continue  # LLaVA-Med's script ignores other types too
        items.append(Item(str(record["id"]), "", str(turns[1]["value"]), kind.lower()))
    return items


def score_files(pred_path: str | Path, gt_path: str | Path, candidates_path: str | Path | None = None,
                suites: Sequence[str] = SUITES) -> dict:
    predictions = read_predictions(pred_path)
    truth = read_ground_truth(gt_path)
    truth_ids = {i.id for i in truth}
    missing = [i.id for i in truth if i.id not in predictions]
    extra = [k for k in predictions if k not in truth_ids]
    if missing or extra:
        raise ScoreInputError(f"ids do not match: missing predictions for {missing[:5]}{'…' if len(missing) > 5 else ''}, "
                              f"predictions for unknown ids {extra[:5]}{'…' if len(extra) > 5 else ''}")
    for item in truth:
        item.prediction = predictions[item.id]
    candidates = None
    if candidates_path:
        data = json.loads(Path(candidates_path).read_text(encoding="utf-8"))
        candidates = data["0"] if isinstance(data, dict) else data
    return evaluate_items(truth, suites, candidates, by_group=False)


def compare_runs(run_a: str | Path, run_b: str | Path, suites: Sequence[str] = SUITES) -> dict:
    """Each metric of two evaluations of the same questions, with the paired-bootstrap difference."""
    items_a, items_b = _answers_as_items(run_a), _answers_as_items(run_b)
    metrics = ("closed_accuracy", "open_recall", "open_f1", "open_exact_match")
    return {suite: {m: paired_difference(items_a, items_b, suite, m) for m in metrics} for suite in suites}


def _answers_as_items(run: str | Path) -> list[Item]:
    run = Path(run)
    path = run if run.is_file() else run / "answers.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run}: no answers.jsonl (pass an eval output folder or its answers.jsonl)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [Item(str(r["id"]), r["prediction"], r["gt"], r["answer_type"]) for r in rows]


def format_comparison(result: dict) -> str:
    lines = ["| suite | metric | A | B | B − A [95% CI] |", "|---|---|---|---|---|"]
    for suite, metrics in result.items():
        for metric, d in metrics.items():
            if d["difference"] is None:
                continue
            lines.append(f"| {suite} | {metric} | {d['a']:.1f} | {d['b']:.1f} | "
                         f"{d['difference']:+.1f} [{d['ci'][0]:+.1f}, {d['ci'][1]:+.1f}] |")
    return "\n".join(lines)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
