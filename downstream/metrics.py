"""Medical VQA metrics: four suites side by side, every number with a bootstrap 95% interval.

``llava_med`` — exactly what microsoft/LLaVA-Med's ``llava/eval/run_eval.py`` computes at release v1.0.0,
re-implemented (not copied) with its quirks:

- normalisation (``normalize_word``): lower-case; the characters ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !``
  become spaces (or vanish when the text has "p " / " p" forms or a digit,digit), periods not next to a
  digit are removed — but at most 32 of them, because ``re.sub`` receives ``re.UNICODE`` as its *count*
  argument —, number words none..ten become digits, articles a/an/the are dropped, the VQA contraction
  table is applied, remaining commas are removed. The script normalises the prediction and the ground
  truth once, and each metric normalises again (we do the same, since normalising twice differs);
- closed questions (``answer_type == "CLOSED"``): a hit when the prediction contains the *substring*
  "yes" or "no" and the ground truth is a substring of it; any other prediction is a miss — so
  "no" matches "nodule", "not" and "know", and a ground truth "no" matches "no, yes";
- open questions: ``exact match`` is a word ratio — distinct ground-truth words found in the prediction ÷
  the number of prediction words; token ``precision``/``recall``/``f1`` over word counts (recall is the
  paper's "open" number); ``open accuracy`` maps the prediction to the candidate answer whose distinct
  words it covers best (first on ties) and scores 1 when that candidate equals the ground truth.

``llava_med_2023`` — the same, as the script was before its fix #35 (December 2023): a closed prediction
that contains "yes"/"no" but not the ground truth is *dropped* from the denominator instead of counted
wrong, which inflates closed accuracy; 2023 papers may report this.

``llava_med_batch`` — what LLaVA-Med's README scores all three data sets with, ``llava/eval/run_eval_batch.py``
at v1.0.0 (the same normalisation, applied once by the script and again by each metric):

- closed questions: a hit when the normalised ground truth is a *substring* of the normalised prediction —
  no yes/no guard, so a prediction that never says yes or no can still hit; every closed question counts;
  ``closed_recall`` is the token recall on closed questions (its ``recall_closed``);
- open questions: ``open_substring_accuracy`` — the ground truth is a substring of the prediction (its
  "open accuracy"; the candidate-set rule is commented out there); ``exact match``, token
  ``precision``/``recall``/``f1`` as in ``llava_med``. Its BLEU scores (nltk) are not reproduced.

``strict`` — the numbers we stand behind: closed accuracy over *all* closed questions, a hit when the
normalised ground truth appears as whole words in the normalised prediction (and, for yes/no, the
opposite answer does not); open exact match is string equality after normalisation; token F1 and
recall count each token once per occurrence (SQuAD-style). Normalisation here: lower-case, punctuation
to spaces, articles dropped, whitespace collapsed.

Intervals: percentile bootstrap over questions (1,000 resamples, fixed seed); for paired comparisons
the same resampled questions score both runs.

Each suite is one registered unit (``register_suite(Suite(...))`` at the end of this file): its metric
names in table order (``closed_*`` metrics are averaged over closed questions, ``open_*`` over open ones),
row labels, and a function scoring one question. ``SUITES`` reads the registry, so the CLI, evaluation
and reports offer a new suite without further edits.
"""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from medvlm.registry import RegisteredNames, lookup, register

# ------------------------------------------------------------------------------------ LLaVA-Med normalisation
_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: "(?!<=" is a lookahead, as in the original
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")


@lru_cache(maxsize=1)
def _contractions() -> dict[str, str]:
    return json.loads((Path(__file__).parent / "data" / "vqa_contractions.json").read_text())["contractions"]


def llava_normalize(text: str) -> str:
    """LLaVA-Med v1.0.0's ``normalize_word``."""
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    text = _PERIOD_STRIP.sub("", out, 32)  # the original passes re.UNICODE (== 32) as the count
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    contractions = _contractions()
    words = [contractions.get(w, w) for w in words]
    return " ".join(words).replace(",", "")


def _word_counts(text: str) -> Counter:
    return Counter(text.lower().strip().split())


def llava_exact_match(prediction: str, reference: str) -> float:
    prediction, reference = llava_normalize(prediction), llava_normalize(reference)
    pred_words, ref_words = _word_counts(prediction), _word_counts(reference)
    total = sum(pred_words.values())
    if total == 0:
        return 0.0
    return sum(1 for w in ref_words if w in pred_words) / total


def llava_f1(prediction: str, reference: str) -> tuple[float, float, float]:
    """(f1, precision, recall) as ``calculate_f1score``."""
    prediction, reference = llava_normalize(prediction), llava_normalize(reference)
    pred_words, ref_words = _word_counts(prediction), _word_counts(reference)
    if not pred_words or not ref_words:
        return 0.0, 0.0, 0.0
    tp = sum(c for w, c in pred_words.items() if w in ref_words)
    fp = sum(c for w, c in pred_words.items() if w not in ref_words)
    fn = sum(c for w, c in ref_words.items() if w not in pred_words)
    if tp == 0:
        return 0.0, 0.0, 0.0
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return 2 * precision * recall / (precision + recall), precision, recall


def llava_open_accuracy(prediction: str, reference: str, candidates: Sequence[str]) -> float:
    """``calculate_appearance_with_normalization``: nearest candidate answer by word coverage == truth?"""
    prediction, reference = llava_normalize(prediction), llava_normalize(reference)
    pred_words = _word_counts(prediction)
    best, best_score = None, -1.0
    for candidate in candidates:
        normalised = llava_normalize(str(candidate))
        cand_words = _word_counts(normalised)
        score = sum(1 for w in pred_words if w in cand_words) / len(cand_words) if cand_words else 0.0
        if score > best_score:
            best, best_score = normalised, score
    return 1.0 if best == reference else 0.0


def llava_closed_hit(prediction: str, reference: str, drop_wrong_yes_no: bool = False) -> float | None:
    """1/0 as the script scores a closed question; ``None`` = dropped (the 2023 behaviour)."""
    if "yes" in prediction or "no" in prediction:
        if reference in prediction:
            return 1.0
        return None if drop_wrong_yes_no else 0.0
    return 0.0


class ScoreInputError(ValueError):
    """Files to score that cannot be read or matched; the message names the file, line or ids."""


def read_candidates(path: str | Path) -> list[str]:
    """LLaVA-Med's candidate file (``{"0": [answer, ...]}``, e.g. ``train_open_answers.json``) or a plain JSON
    list, in file order: open accuracy breaks ties towards the earlier candidate, as the script does."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ScoreInputError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}); expected {{\"0\": [answers]}}") from exc
    values = data.get("0") if isinstance(data, dict) else data
    if not isinstance(values, list):
        raise ScoreInputError(f"{path}: expected a candidate file {{\"0\": [answers]}} or a JSON list of answers")
    return [str(v) for v in values]


# ------------------------------------------------------------------------------------ strict
_STRICT_PUNCT = re.compile(r"[^\w\s]")


def strict_normalize(text: str) -> str:
    words = _STRICT_PUNCT.sub(" ", text.lower()).split()
    return " ".join(w for w in words if w not in _ARTICLES)


def strict_closed_hit(prediction: str, reference: str) -> float:
    pred, ref = strict_normalize(prediction), strict_normalize(reference)
    if not ref:
        return 0.0
    padded = f" {pred} "
    if f" {ref} " not in padded:
        return 0.0
    opposite = {"yes": "no", "no": "yes"}.get(ref)
    return 0.0 if opposite and f" {opposite} " in padded else 1.0


def strict_f1(prediction: str, reference: str) -> tuple[float, float, float]:
    pred, ref = Counter(strict_normalize(prediction).split()), Counter(strict_normalize(reference).split())
    common = sum((pred & ref).values())
    if common == 0:
        return 0.0, 0.0, 0.0
    precision, recall = common / sum(pred.values()), common / sum(ref.values())
    return 2 * precision * recall / (precision + recall), precision, recall


# ------------------------------------------------------------------------------------ scoring
@dataclass
class Item:
    id: str
    prediction: str
    answer: str
    answer_type: str               # "closed" | "open"
    groups: dict | None = None     # e.g. {"question_type": "PRES", "organ": "CHEST"}


@dataclass(frozen=True)
class Suite:
    name: str
    metrics: tuple[str, ...]                               # table order; closed_* over closed, open_* over open
    score: Callable[[Item, Sequence[str]], dict]           # (question, candidates) → {metric: value or None}
    labels: dict = field(default_factory=dict)             # metric → row label in tables (default: its name)


SUITE_REGISTRY: dict[str, Suite] = {}
SUITES = RegisteredNames(SUITE_REGISTRY)   # live: every registered suite, in registration order


def register_suite(suite: Suite) -> Suite:
    return register(SUITE_REGISTRY, suite.name, suite)


def per_question_scores(items: Sequence[Item], suite: str, candidates: Sequence[str] | None = None) -> dict[str, list]:
    """Metric name → per-question values (``None`` = not counted), aligned with ``items``."""
    unit = lookup(SUITE_REGISTRY, suite, "suite")
    if candidates is None:  # the answers themselves, in question order (ties go to the earlier one, as in a file)
        candidates = list(dict.fromkeys(i.answer for i in items))
    scores: dict[str, list] = defaultdict(list)
    for item in items:
        row = unit.score(item, candidates)
        for name in unit.metrics:
            scores[name].append(row.get(name))
    return scores


def _mean(values: Sequence) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def bootstrap_interval(values: Sequence, resamples: int = 1000, seed: int = 0) -> tuple[float, float] | None:
    """Percentile 95% interval of the mean over questions (``None`` values skipped in each resample)."""
    array = np.array([np.nan if v is None else v for v in values], dtype=float)
    if len(array) == 0 or np.all(np.isnan(array)):
        return None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(array), size=(resamples, len(array)))
    with warnings.catch_warnings():  # a resample may hold only dropped (None) questions
        warnings.simplefilter("ignore", RuntimeWarning)
        means = np.nanmean(array[idx], axis=1)
    means = means[~np.isnan(means)]
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def summarize(items: Sequence[Item], suite: str, candidates: Sequence[str] | None = None,
              resamples: int = 1000, seed: int = 0) -> dict:
    """``{metric: value%, metric_ci: [lo%, hi%], n_closed, n_open, n_closed_counted}`` for one suite."""
    scores = per_question_scores(items, suite, candidates)
    out: dict = {}
    for name, values in scores.items():
        relevant = [v for v, i in zip(values, items) if (i.answer_type == "closed") == name.startswith("closed")]
        mean = _mean(relevant)
        out[name] = None if mean is None else round(100 * mean, 2)
        interval = bootstrap_interval(relevant, resamples, seed)
        out[f"{name}_ci"] = None if interval is None else [round(100 * interval[0], 2), round(100 * interval[1], 2)]
    out["n_closed"] = sum(i.answer_type == "closed" for i in items)
    out["n_open"] = sum(i.answer_type == "open" for i in items)
    out["n_closed_counted"] = sum(v is not None for v, i in zip(scores["closed_accuracy"], items) if i.answer_type == "closed")
    return out


def evaluate_items(items: Sequence[Item], suites: Sequence[str] = SUITES, candidates: Sequence[str] | None = None,
                   by_group: bool = True) -> dict:
    """All suites, overall and per group value (question type, organ, modality… where present)."""
    result = {"suites": {s: summarize(items, s, candidates) for s in suites}}
    if by_group:
        groups: dict[str, dict[str, list[Item]]] = defaultdict(lambda: defaultdict(list))
        for item in items:
            for key, value in (item.groups or {}).items():
                if value not in (None, ""):
                    groups[key][str(value)].append(item)
        result["groups"] = {key: {value: {s: summarize(members, s, candidates, resamples=200) for s in suites}
                                  for value, members in sorted(values.items())}
                            for key, values in groups.items()}
    return result


def paired_difference(a: Sequence[Item], b: Sequence[Item], suite: str, metric: str,
                      resamples: int = 1000, seed: int = 0) -> dict:
    """Difference b − a of one metric on the same questions, with a paired-bootstrap 95% interval."""
    by_id = {i.id: i for i in b}
    missing = [i.id for i in a if i.id not in by_id]
    if missing or len(a) != len(b):
        raise ValueError(f"runs answer different questions (e.g. {missing[:3]}); compare runs on the same split")
    b_aligned = [by_id[i.id] for i in a]
    closed = metric.startswith("closed")
    keep = [k for k, i in enumerate(a) if (i.answer_type == "closed") == closed]
    sa = per_question_scores(a, suite)[metric]
    sb = per_question_scores(b_aligned, suite)[metric]
    xa = np.array([np.nan if sa[k] is None else sa[k] for k in keep], dtype=float)
    xb = np.array([np.nan if sb[k] is None else sb[k] for k in keep], dtype=float)
    if len(keep) == 0:
        return {"a": None, "b": None, "difference": None, "ci": None}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(keep), size=(resamples, len(keep)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        diffs = np.nanmean(xb[idx], axis=1) - np.nanmean(xa[idx], axis=1)
    diffs = diffs[~np.isnan(diffs)]
    return {"a": round(100 * float(np.nanmean(xa)), 2), "b": round(100 * float(np.nanmean(xb)), 2),
            "difference": round(100 * float(np.nanmean(xb) - np.nanmean(xa)), 2),
            "ci": [round(100 * float(np.percentile(diffs, 2.5)), 2), round(100 * float(np.percentile(diffs, 97.5)), 2)]}


def _suite_metrics(suite: str, data: dict) -> tuple[str, ...]:
    if suite in SUITE_REGISTRY:
        return SUITE_REGISTRY[suite].metrics
    return tuple(k for k in data if not k.endswith("_ci") and not k.startswith("n_"))   # a suite no longer registered


def format_table(result: dict, suites: Sequence[str] | None = None) -> str:
    """A Markdown table: a row per metric (the suites' own metrics and labels), a column per suite."""
    suites = list(suites or result["suites"])
    metrics = list(dict.fromkeys(m for s in suites for m in _suite_metrics(s, result["suites"][s])))
    labels = {m: SUITE_REGISTRY[s].labels.get(m, m) for s in reversed(suites) if s in SUITE_REGISTRY
              for m in SUITE_REGISTRY[s].metrics}
    lines = ["| metric | " + " | ".join(suites) + " |", "|---|" + "---|" * len(suites)]
    for metric in metrics:
        cells = []
        for suite in suites:
            data = result["suites"][suite]
            if metric not in data or data[metric] is None:
                cells.append("–")
            else:
                ci = data.get(f"{metric}_ci")
                cells.append(f"{data[metric]:.1f} [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else f"{data[metric]:.1f}")
        lines.append(f"| {labels.get(metric, metric)} | " + " | ".join(cells) + " |")
    counts = result["suites"][suites[0]]
    lines.append(f"\n{counts['n_closed']} closed, {counts['n_open']} open questions; values in %, 95% bootstrap intervals.")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ the registered suites
_OPEN_LLAVA = ("open_recall", "open_precision", "open_f1", "open_exact_match")


def _llava_normalised(item: Item) -> tuple[str, str]:
    return llava_normalize(item.prediction.lower()), llava_normalize(item.answer.lower())


def _llava_open(pred: str, ref: str) -> dict:
    f1, precision, recall = llava_f1(pred, ref)
    return {"open_recall": recall, "open_precision": precision, "open_f1": f1,
            "open_exact_match": llava_exact_match(pred, ref)}


def _llava_med_row(item: Item, candidates: Sequence[str], drop_wrong_yes_no: bool = False) -> dict:
    pred, ref = _llava_normalised(item)
    if item.answer_type == "closed":
        return {"closed_accuracy": llava_closed_hit(pred, ref, drop_wrong_yes_no)}
    return {**_llava_open(pred, ref), "open_candidate_accuracy": llava_open_accuracy(pred, ref, candidates)}


def _llava_med_2023_row(item: Item, candidates: Sequence[str]) -> dict:
    return _llava_med_row(item, candidates, drop_wrong_yes_no=True)


def _llava_med_batch_row(item: Item, candidates: Sequence[str]) -> dict:
    pred, ref = _llava_normalised(item)
    if item.answer_type == "closed":
        return {"closed_accuracy": float(ref in pred), "closed_recall": llava_f1(pred, ref)[2]}
    return {**_llava_open(pred, ref), "open_substring_accuracy": float(ref in pred)}


def _strict_row(item: Item, candidates: Sequence[str]) -> dict:
    if item.answer_type == "closed":
        return {"closed_accuracy": strict_closed_hit(item.prediction, item.answer)}
    f1, precision, recall = strict_f1(item.prediction, item.answer)
    return {"open_recall": recall, "open_precision": precision, "open_f1": f1,
            "open_exact_match": float(strict_normalize(item.prediction) == strict_normalize(item.answer))}


register_suite(Suite("llava_med", ("closed_accuracy", *_OPEN_LLAVA, "open_candidate_accuracy"), _llava_med_row))
register_suite(Suite("llava_med_2023", ("closed_accuracy", *_OPEN_LLAVA, "open_candidate_accuracy"),
                     _llava_med_2023_row))
register_suite(Suite("llava_med_batch", ("closed_accuracy", "closed_recall", *_OPEN_LLAVA, "open_substring_accuracy"),
                     _llava_med_batch_row))
register_suite(Suite("strict", ("closed_accuracy", *_OPEN_LLAVA), _strict_row))
