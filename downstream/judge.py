"""``medvlm eval judge``: GPT-judged chat evaluation, as LLaVA-Bench and LLaVA-Med's 50-image chat set.

The model answers each question of a LLaVA-Med ``llava_med_eval_qa50_qa.jsonl``-style file (or a given
answer file is read); a judge model on any OpenAI-compatible endpoint sees the figure's caption (and its
in-text mentions), the question, the reference answer (``gpt4_answer``: GPT-4 text-only from the caption,
as the papers, or ``--reference FILE``) as Assistant 1 and the model's answer as Assistant 2, and scores
both 1–10 on its first line. The instruction (``load_rubric``) is LLaVA-Bench's rule by default (LLaVA is
Apache-2.0, so it ships here); ``llava_med`` is LLaVA-Med's ``eval_multimodal_chat_gpt_score.py`` prompt,
which LLaVA-Med's licence (Microsoft Research License Terms) does not let medvlm ship, so it is read from
the user's own checkout (``pmc_ingest.reference_text``) — use it to compare with LLaVA-Med's numbers; or
the user's own rubric file. Requests go
through ``pmc_ingest.chat_client`` (cache before done, retries, budget), so an interrupted judging run
resumes without paying twice.

Scores (``summarize``): LLaVA-Med's relative score — the mean over questions of model / reference × 100
(``summarize_gpt_review.py``) — and LLaVA-Bench's ratio of mean scores, overall, per question type
(conversation / detailed description) and per domain (chest X-ray, MRI, histology, gross, CT), each with a
bootstrap 95% interval over questions. A reply whose first line is not two numbers counts as unscored.

Written to the output folder: ``answers.jsonl`` (the model's), ``judge_cache.jsonl`` (every raw judge
reply), ``scores.jsonl`` (question, both answers, both scores, the judge's reply), ``metrics.json`` and
``report.md``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medvlm.fileio import atomic_write_jsonl, atomic_write_text

from .metrics import ScoreInputError

DOMAINS = ("chest_xray", "mri", "histology", "gross", "ct_scan")
RUBRICS = ("llava_bench", "llava_med")
# LLaVA-Bench's judge rule and system message, word for word from haotian-liu/LLaVA (llava/eval/table/rule.json,
# "llava_bench_conv" — "llava_bench_detail" and "llava_bench_complex" are the same text — and
# llava/eval/eval_gpt_review_bench.py), copyright the LLaVA authors, used under the Apache License, Version
# 2.0 (https://www.apache.org/licenses/LICENSE-2.0); LLaVA ships no NOTICE file. medvlm changed nothing.
JUDGE_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
LLAVA_BENCH_RULE = (
    "We would like to request your feedback on the performance of two AI assistants in response to the "
    "user question displayed above. The user asks the question on observing an image. For your "
    "reference, the visual content in the image is represented with a few sentences describing the "
    "image. \n"
    "Please rate the helpfulness, relevance, accuracy, level of details of their responses. Each "
    "assistant receives an overall score on a scale of 1 to 10, where a higher score indicates better "
    "overall performance.\n"
    "Please first output a single line containing only two values indicating the scores for Assistant 1 "
    "and 2, respectively. The two scores are separated by a space.\n"
    "In the subsequent line, please provide a comprehensive explanation of your evaluation, avoiding any "
    "potential bias and ensuring that the order in which the responses were presented does not affect "
    "your judgment."
)


class JudgeError(ScoreInputError):
    """A question or answer file that cannot be judged; the message names the file, line and fix."""


@dataclass
class ChatQuestion:
    id: str
    question: str
    image: str | None
    type: str
    domain: str | None
    caption: str
    label: str
    mentions: list[str]
    reference: str | None


def read_questions(path: str | Path) -> list[ChatQuestion]:
    """LLaVA-Med qa50 lines (``question_id``, ``text``, ``image``, ``type``, ``domain``, ``fig_caption``,
    ``fig_label``, ``in_text_mention``, ``gpt4_answer``) or LLaVA-Bench lines (``category``, ``caption``)."""
    out = []
    for line_no, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            qid, text = row["question_id"], row["text"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise JudgeError(f"{path}:{line_no}: expected a JSON line with question_id and text ({exc})") from None
        mentions = row.get("in_text_mention") or []
        out.append(ChatQuestion(
            str(qid), text, row.get("image"), str(row.get("type") or row.get("category") or "all"),
            _domain(row.get("domain")), str(row.get("fig_caption") or row.get("caption") or ""),
            str(row.get("fig_label") or ""), [m["tokens"] if isinstance(m, dict) else str(m) for m in mentions],
            row.get("gpt4_answer")))
    return out


def _domain(value) -> str | None:
    """LLaVA-Med stores ``{"chest_xray": false, "mri": true, …}``; the first true one, as its summary does."""
    if isinstance(value, dict):
        return next((d for d in DOMAINS if value.get(d)), None)
    return str(value) if value else None


def read_answers(path: str | Path) -> dict[str, str]:
    """``question_id`` → ``text`` of a LLaVA answer file (also a reference answer file)."""
    from .rescore import read_predictions

    answers: dict[str, str] = {}
    for key, text in read_predictions(path):
        if key in answers:
            raise JudgeError(f"{path}: question {key} is answered twice; keep one answer per question")
        answers[key] = text
    return answers


@dataclass(frozen=True)
class Rubric:
    """What the judge is told: ``name`` (recorded in metrics.json), its system message, and the instruction
    after ``[System]`` in the user message."""
    name: str
    system: str
    instruction: str


LLAVA_BENCH = Rubric("llava_bench", JUDGE_SYSTEM, LLAVA_BENCH_RULE)


def load_rubric(name: str = "llava_bench", file: str | Path | None = None,
                llava_med_repo: str | Path | None = None) -> Rubric:
    """``llava_bench`` (shipped, Apache-2.0), ``llava_med`` (LLaVA-Med's ``eval_multimodal_chat_gpt_score.py``
    system message and rubric, read from the user's checkout: its licence does not let medvlm ship them) or
    the instruction in ``file`` (with LLaVA-Bench's system message)."""
    from pmc_ingest import reference_text

    if file is not None:
        text = Path(file).read_text(encoding="utf-8").strip()
        if not text:
            raise JudgeError(f"{file}: the rubric file is empty; write the judge's instruction in it")
        return Rubric(f"file:{Path(file).name}", JUDGE_SYSTEM, text)
    if name == "llava_med":
        system, instruction = reference_text.llava_med_judge_prompt(llava_med_repo)
        return Rubric("llava_med", system, instruction)
    if name != "llava_bench":
        raise ValueError(f"unknown rubric {name!r}; choose one of {', '.join(RUBRICS)} or give --rubric-file")
    return LLAVA_BENCH


def judge_messages(item: ChatQuestion, reference: str, answer: str, rubric: Rubric = LLAVA_BENCH) -> list[dict]:
    context = "\n\t- ".join(item.mentions)
    label = f"{item.label}: " if item.label else ""
    user = (f"[Context]\nFigure Caption:\n{label}{item.caption}\n\nFigure Context:\n\t- {context}\n\n"
            f"[Question]\n{item.question}\n\n"
            f"[Assistant 1]\n{reference}\n\n[End of Assistant 1]\n\n"
            f"[Assistant 2]\n{answer}\n\n[End of Assistant 2]\n\n"
            f"[System]\n{rubric.instruction}\n\n")
    return [{"role": "system", "content": rubric.system}, {"role": "user", "content": user}]


def parse_scores(text: str) -> tuple[float, float] | None:
    """The two scores on the reply's first line (commas tolerated, as LLaVA's parse_score); else ``None``."""
    first = (text or "").strip().split("\n", 1)[0].replace(",", " ")
    numbers = re.findall(r"-?\d+(?:\.\d+)?", first)
    if len(numbers) != 2 or len(first.split()) != 2:
        return None
    return float(numbers[0]), float(numbers[1])


def summarize(rows: list[dict], resamples: int = 1000, seed: int = 0) -> dict:
    """Relative scores overall, per type and per domain; rows carry ``type``, ``domain`` and ``scores``."""
    groups: dict[str, list[dict]] = {"overall": list(rows)}
    for row in rows:
        for key in (f"type:{row['type']}", f"domain:{row['domain']}" if row.get("domain") else None):
            if key:
                groups.setdefault(key, []).append(row)
    return {name: _group_scores(members, resamples, seed) for name, members in groups.items()}


def _group_scores(rows: list[dict], resamples: int, seed: int) -> dict:
    scored = [r["scores"] for r in rows if r.get("scores") and r["scores"][0] > 0]
    out = {"questions": len(rows), "scored": len(scored)}
    if not scored:
        return out
    pairs = np.array(scored, dtype=float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(pairs), size=(resamples, len(pairs)))
    ratios = pairs[:, 1] / pairs[:, 0]
    mean_ratio = ratios[idx].mean(axis=1) * 100
    ratio_of_means = pairs[idx, 1].sum(axis=1) / pairs[idx, 0].sum(axis=1) * 100
    out.update(reference_score=round(float(pairs[:, 0].mean()), 3), model_score=round(float(pairs[:, 1].mean()), 3),
               relative_score=round(float(ratios.mean() * 100), 2), relative_score_ci=_ci(mean_ratio),
               ratio_of_means=round(float(pairs[:, 1].sum() / pairs[:, 0].sum() * 100), 2),
               ratio_of_means_ci=_ci(ratio_of_means))
    return out


def _ci(values: np.ndarray) -> list[float]:
    return [round(float(np.percentile(values, 2.5)), 2), round(float(np.percentile(values, 97.5)), 2)]


def judge_options(**settings):
    """The instruction client's options with the judge's defaults (GPT-4o, temperature 0 as LLaVA-Med)."""
    from pmc_ingest.instruct import InstructOptions

    return dataclasses.replace(InstructOptions(), **{"temperature": 0.0, **settings})


def run_judge(questions: list[ChatQuestion], answers: dict[str, str], out_dir: str | Path, options,
              references: dict[str, str] | None = None, progress: bool = True, answered_with: dict | None = None,
              rubric: Rubric = LLAVA_BENCH) -> dict:
    """Judge ``answers`` against the references with ``rubric``; writes scores.jsonl, metrics.json, report.md.
    ``answered_with`` (what produced the answers: ``medvlm.device.describe`` of the model) goes into metrics.json."""
    from pmc_ingest.chat_client import Budget, ClientError, Request, ResponseCache, SendStats, load_price, send_all
    from pmc_ingest.instruct import request_key

    api_key = os.environ.get(options.api_key_env)
    if not api_key:
        raise ClientError(f"no API key for the judge: set {options.api_key_env} (any value for a local server)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = []
    for item in questions:
        reference = (references or {}).get(item.id, item.reference)
        if reference is None or item.id not in answers:
            raise JudgeError(f"question {item.id}: no {'reference answer' if reference is None else 'model answer'}; "
                             "give --reference FILE or a question file with gpt4_answer, and answer every question")
        messages = judge_messages(item, reference, answers[item.id], rubric)
        params = {"temperature": options.temperature, "max_tokens": options.max_tokens}
        jobs.append((item, reference, messages, request_key(options.model, messages, item.id, params)))
    cache = ResponseCache(out_dir / "judge_cache.jsonl")
    budget = Budget(options.budget_usd, options.max_tokens_total,
                    load_price(options.model, options.prices_file, required=options.budget_usd is not None))
    stats = SendStats()
    todo = [Request(key, messages, item.id) for item, _, messages, key in jobs if not cache.done(key)]
    send_all(todo, options, api_key, cache, budget, stats, progress)
    rows = []
    for item, reference, _, key in jobs:
        reply = cache.entries[key].get("text", "") if cache.done(key) else None
        rows.append({"question_id": item.id, "type": item.type, "domain": item.domain, "question": item.question,
                     "reference": reference, "answer": answers[item.id], "judge_reply": reply,
                     "scores": parse_scores(reply) if reply is not None else None})
    result = {"judge_model": options.model, "rubric": rubric.name, "summary": summarize(rows),
              "unanswered_by_judge": sum(r["judge_reply"] is None for r in rows),   # unsent ones included
              "failures": dict(stats.failures)}
    if answered_with:
        result["answered_with"] = answered_with
    _write(out_dir, rows, result)
    if stats.stop_reason or not any(r["scores"] for r in rows):
        raise ClientError(f"judging {'stopped: ' + stats.stop_reason if stats.stop_reason else 'scored nothing'} "
                          f"({result['unanswered_by_judge']} of {len(rows)} unanswered, failures {result['failures']}); "
                          f"fix the judge endpoint and rerun: scored replies are cached ({out_dir / 'metrics.json'})")
    return result


def _write(out_dir: Path, rows: list[dict], result: dict) -> None:
    texts = {"scores.jsonl": "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
             "metrics.json": json.dumps(result, indent=2), "report.md": format_report(result)}
    for name, text in texts.items():
        atomic_write_text(out_dir / name, text)


def format_report(result: dict) -> str:
    lines = [f"# Judged chat evaluation ({result['judge_model']})", "",
             "| group | questions | scored | reference | model | relative score [95% CI] | ratio of means [95% CI] |",
             "|---|---|---|---|---|---|---|"]
    for name, s in result["summary"].items():
        if "relative_score" not in s:
            lines.append(f"| {name} | {s['questions']} | 0 | – | – | – | – |")
            continue
        lines.append(f"| {name} | {s['questions']} | {s['scored']} | {s['reference_score']} | {s['model_score']} | "
                     f"{s['relative_score']} [{s['relative_score_ci'][0]}, {s['relative_score_ci'][1]}] | "
                     f"{s['ratio_of_means']} [{s['ratio_of_means_ci'][0]}, {s['ratio_of_means_ci'][1]}] |")
    return "\n".join(lines) + "\n"


def answer_questions(bundle, questions: list[ChatQuestion], image_folder: str | Path | None, out_dir: str | Path,
                     settings=None, progress: bool = True) -> dict[str, str]:
    """The model's answers (``settings``: an ``EvalSettings``, its protocol's layout and decoding), written
    to ``answers.jsonl`` in LLaVA's answer-file format."""
    import torch

    from medvlm.conversation import get_template
    from medvlm.generate import generate_answers

    from .protocols import EvalSettings, clean_answer, generation_arguments

    settings = settings or EvalSettings()
    protocol = settings.spec
    template = get_template(protocol.template or bundle.template)
    images = [str(Path(image_folder or ".") / q.image) if q.image else None for q in questions]
    missing = [p for p in images if p is not None and not Path(p).is_file()]
    if missing:
        raise JudgeError(f"image {missing[0]} not found ({len(missing)} missing); pass the folder with --images")
    torch.manual_seed(settings.seed)
    texts = generate_answers(bundle, [q.question + protocol.question_suffix for q in questions], images,
                             max_new_tokens=settings.tokens, batch_size=settings.batch_size, template=template.name,
                             progress=progress, image_first=protocol.image_first,
                             generation=generation_arguments(protocol, bundle.tokenizer, template.stop_strings))
    answers = {q.id: clean_answer(t, template.stop_strings, template.answer_prefix) for q, t in zip(questions, texts)}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_jsonl(out_dir / "answers.jsonl",
                       ({"question_id": q.id, "prompt": q.question, "text": answers[q.id]} for q in questions))
    return answers
