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

from pathlib import Path
from typing import Sequence

import torch

from medvlm.fileio import atomic_write_json, atomic_write_jsonl

from .datasets import VQARecord
from .metrics import SUITES, Item, evaluate_items, format_table, paired_difference
from .protocols import EvalSettings, clean_answer, format_question, generation_arguments
GROUP_KEYS = ("question_type", "image_organ", "content_type", "modality", "location", "organ")


def _groups(record: VQARecord) -> dict:
    return {k: record.metadata[k] for k in GROUP_KEYS if record.metadata.get(k) not in (None, "")}


def evaluate_model(bundle, records: Sequence[VQARecord], out_dir: str | Path, settings: EvalSettings | None = None,
                   *, candidates: Sequence[str] | None = None, progress: bool = True,
                   feature_cache_dir: str | Path | None = None, **overrides) -> dict:
    """Answer every record, score it, and write answers.jsonl / metrics.json / report.md to ``out_dir``.

    ``settings`` (protocol, suites, batch size, token limit, closed mode, option suffix, seed) default to
    ``EvalSettings()``; keyword ``overrides`` replace single fields (``batch_size=8``).

    ``feature_cache_dir`` keeps vision features on disk, keyed by image, tower weights and preprocessing,
    so repeated evaluations (other checkpoints with the same frozen tower) skip image decoding.

    Under a launcher (``WORLD_SIZE`` > 1) every rank answers its share of the questions — whole images
    (``generate.shard_by_image``) — and rank 0 gathers the answers through files in ``out_dir``
    (``device.FileExchange``: no rank waits inside a collective), scores them and writes the outputs;
    every rank returns the same result. ``metrics.json`` records the device, dtype and attention
    implementation that produced the answers, and the number of processes."""
    from medvlm.device import FileExchange, data_parallel, describe, shared_token
    from medvlm.generate import shard_by_image

    settings = (settings or EvalSettings()).with_(**overrides)
    suites = list(settings.suites or SUITES)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rank, world_size = data_parallel()
    answer = dict(settings=settings, progress=progress and rank == 0, feature_cache_dir=feature_cache_dir)
    settings = {**settings.describe(settings.spec.template or bundle.template), "questions": len(records),
                **describe(bundle.model), "processes": world_size}
    if world_size == 1:
        return _score_and_write(records, _predict(bundle, records, **answer), out_dir, suites, candidates, settings)
    exchange = FileExchange(out_dir, shared_token(), rank, world_size)
    try:
        indices = shard_by_image([r.image for r in records], rank, world_size)
        share = _predict(bundle, [records[i] for i in indices], **answer)
        parts = exchange.gather([[i, prediction] for i, prediction in zip(indices, share)])
        result = None
        if rank == 0:
            by_position = dict(pair for part in parts for pair in part)
            predictions = [by_position[i] for i in range(len(records))]
            result = _score_and_write(records, predictions, out_dir, suites, candidates, settings)
    except BaseException as exc:
        exchange.fail(exc)
        raise
    return exchange.publish(result)


def _predict(bundle, records: Sequence[VQARecord], settings: EvalSettings, progress: bool,
             feature_cache_dir) -> list[str]:
    """One prediction per record, in order (ids may repeat, as in LLaVA-Med's converted files): closed
    questions by likelihood or generation, the rest by generation, with the prompt layout, decoding and
    answer clean-up of ``settings.protocol``."""
    from medvlm.conversation import get_template
    from medvlm.generate import generate_answers

    protocol, batch_size = settings.spec, settings.batch_size
    template = get_template(protocol.template or bundle.template)
    predictions: dict[int, str] = {}   # keyed by position in ``records``
    closed = [i for i, r in enumerate(records) if r.answer_type == "closed"]
    generate_all = settings.closed_mode == "generate"
    to_generate = [i for i, r in enumerate(records) if generate_all or r.answer_type == "open"]
    if not generate_all and closed:
        choices = likelihood_choice(bundle, [format_question(protocol, records[i].question, "closed",
                                                             settings.option_suffix) for i in closed],
                                    [records[i].image for i in closed], ["yes", "no"],
                                    batch_size=batch_size, template=template.name, image_first=protocol.image_first)
        predictions.update(zip(closed, choices))
    questions = [format_question(protocol, records[i].question, records[i].answer_type, settings.option_suffix)
                 for i in to_generate]
    feature_cache = None
    if feature_cache_dir is not None:
        from medvlm.features import FeatureCache

        feature_cache = FeatureCache(bundle.model, bundle.image_processor, "pad", feature_cache_dir)
    torch.manual_seed(settings.seed)
    answers = generate_answers(bundle, questions, [records[i].image for i in to_generate], max_new_tokens=settings.tokens,
                               batch_size=batch_size, template=template.name, progress=progress,
                               feature_cache=feature_cache, image_first=protocol.image_first,
                               generation=generation_arguments(protocol, bundle.tokenizer, template.stop_strings))
    answers = [clean_answer(a, template.stop_strings, template.answer_prefix) for a in answers]
    predictions.update(zip(to_generate, answers))
    return [predictions[i] for i in range(len(records))]


def _score_and_write(records: Sequence[VQARecord], predictions: list[str], out_dir: Path, suites, candidates,
                     settings: dict) -> dict:
    rows = [{"id": r.id, "question": r.question, "gt": r.answer, "prediction": p,
             "answer_type": r.answer_type, "image": r.image, **_groups(r)} for r, p in zip(records, predictions)]
    atomic_write_jsonl(out_dir / "answers.jsonl", rows)
    items = [Item(r.id, p, r.answer, r.answer_type, _groups(r)) for r, p in zip(records, predictions)]
    result = evaluate_items(items, suites, candidates)
    result["settings"] = settings
    atomic_write_json(out_dir / "metrics.json", result)
    (out_dir / "report.md").write_text(f"# VQA evaluation\n\n{format_table(result, suites)}\n")
    return result


@torch.no_grad()
def likelihood_choice(bundle, questions: Sequence[str], images: Sequence, options: Sequence[str],
                      batch_size: int = 16, template: str | None = None, image_first: bool = True) -> list[str]:
    """For each question, the option with the highest log-likelihood of being the whole reply."""
    from medvlm.conversation import IGNORE_INDEX, encode, prompt_messages
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
                conv = prompt_messages(question, image is not None, image_first) + [{"from": "gpt", "value": option}]
                rows.append(encode(template or bundle.template, conv, bundle.tokenizer, bundle.image_token_id,
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
from .rescore import ScoreInputError, read_ground_truth, read_json_lines, read_predictions, score_files  # noqa: E402,F401


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
    return [Item(str(r["id"]), r["prediction"], r["gt"], r["answer_type"]) for _, r in read_json_lines(path)]


def format_comparison(result: dict) -> str:
    lines = ["| suite | metric | A | B | B − A [95% CI] |", "|---|---|---|---|---|"]
    for suite, metrics in result.items():
        for metric, d in metrics.items():
            if d["difference"] is None:
                continue
            lines.append(f"| {suite} | {metric} | {d['a']:.1f} | {d['b']:.1f} | "
                         f"{d['difference']:+.1f} [{d['ci'][0]:+.1f}, {d['ci'][1]:+.1f}] |")
    return "\n".join(lines)


