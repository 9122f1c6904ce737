"""``medvlm report eval RUN``: an evaluation folder as one static HTML page (``RUN/report.html``).

Reads what ``evaluate.evaluate_model`` wrote (``answers.jsonl``, ``metrics.json``) and shows:
- accuracy by answer type: every suite's closed accuracy and open metrics with their 95% intervals, and
  the same per group (question type, organ… where the data set has them);
- a confusion matrix of the closed questions (scikit-learn's ``confusion_matrix``): rows the ground-truth
  answer, columns the answer the prediction gives under the ``strict`` rule (the whole-word answer it
  contains, or "unparsed" when it names none or both of yes/no);
- every question with its image, question, ground truth and prediction, wrong answers first (closed:
  the ``strict`` hit; open: ``strict`` exact match, then lowest token F1 first).
"""

from __future__ import annotations

import json
from pathlib import Path

from medvlm.htmlpage import Raw, Thumbnails, esc, item, paragraph, section, table, write_page

from .metrics import Item, per_question_scores, strict_closed_hit, strict_normalize

UNPARSED = "unparsed"
METRICS = ("closed_accuracy", "open_recall", "open_f1", "open_exact_match")


class ReportInputError(FileNotFoundError):
    """An evaluation folder without the files the page is made from."""


def read_run(run: str | Path) -> tuple[list[dict], dict]:
    run = Path(run)
    answers, metrics = run / "answers.jsonl", run / "metrics.json"
    for path in (answers, metrics):
        if not path.is_file():
            raise ReportInputError(f"{run}: no {path.name}; pass a folder written by `medvlm eval` (or a curriculum eval stage)")
    rows = [json.loads(line) for line in answers.read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows, json.loads(metrics.read_text())


def closed_label(prediction: str, labels: list[str]) -> str:
    """The one ground-truth label the prediction states under the strict rule, else ``unparsed``."""
    hits = [label for label in labels if strict_closed_hit(prediction, label)]
    return hits[0] if len(hits) == 1 else UNPARSED


def confusion(rows: list[dict]) -> tuple[list[str], list[str], list[list[int]]]:
    """(row labels, column labels, counts) over the closed questions."""
    from sklearn.metrics import confusion_matrix

    closed = [r for r in rows if r["answer_type"] == "closed"]
    labels = sorted({strict_normalize(r["gt"]) for r in closed})
    truth = [strict_normalize(r["gt"]) for r in closed]
    predicted = [closed_label(r["prediction"], labels) for r in closed]
    if not closed:
        return [], [UNPARSED], []
    matrix = confusion_matrix(truth, predicted, labels=[*labels, UNPARSED])
    return labels, [*labels, UNPARSED], matrix[:len(labels)].tolist()  # no truth is "unparsed": drop that row


def ordered_rows(rows: list[dict]) -> list[tuple[dict, bool]]:
    """(row, correct) with wrong answers first; within each, the lowest open F1 first, then file order."""
    items = [Item(str(r["id"]), r["prediction"], r["gt"], r["answer_type"]) for r in rows]
    scores = per_question_scores(items, "strict")
    marked = []
    for i, row in enumerate(rows):
        closed = row["answer_type"] == "closed"
        correct = bool(scores["closed_accuracy"][i]) if closed else bool(scores["open_exact_match"][i])
        f1 = 1.0 if closed else float(scores["open_f1"][i])
        marked.append((correct, f1, i, row))
    marked.sort(key=lambda m: (m[0], m[1], m[2]))
    return [(row, correct) for correct, _, _, row in marked]


def write_eval_report(run: str | Path, out: str | Path | None = None, limit: int | None = None) -> Path:
    run = Path(run)
    rows, metrics = read_run(run)
    ordered = ordered_rows(rows)
    wrong = sum(not correct for _, correct in ordered)
    labels, columns, matrix = confusion(rows)
    thumbs = Thumbnails(size=192)
    shown = ordered[:limit] if limit else ordered
    parts = [paragraph(f"{len(rows)} questions from {run}: {wrong} answered wrong under the strict rule. "
                       f"Settings: {json.dumps(metrics.get('settings', {}))}"),
             section("Accuracy by answer type", _suite_table(metrics["suites"])),
             *_group_sections(metrics.get("groups") or {}),
             section("Closed questions: confusion matrix (strict)",
                     paragraph("Rows: ground truth; columns: the answer the prediction states."),
                     table(["truth \\ predicted", *columns], [[label, *counts] for label, counts in zip(labels, matrix)],
                           "confusion")),
             section(f"Predictions, wrong first ({len(shown)} of {len(rows)})",
                     *[_question_item(row, correct, thumbs) for row, correct in shown])]
    return write_page(Path(out) if out else run / "report.html", "VQA evaluation", parts)


def _cell(values: dict, metric: str) -> str:
    if values.get(metric) is None:
        return "–"
    ci = values.get(f"{metric}_ci")
    return f"{values[metric]:.1f} [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else f"{values[metric]:.1f}"


def _suite_table(suites: dict) -> Raw:
    rows = [[suite, values.get("n_closed", "–"), values.get("n_open", "–"), *[_cell(values, m) for m in METRICS]]
            for suite, values in suites.items()]
    return table(["suite", "closed questions", "open questions", *[m.replace("_", " ") for m in METRICS]], rows,
                 "accuracy")


def _group_sections(groups: dict) -> list[Raw]:
    out = []
    for key, values in groups.items():
        rows = [[value, suites.get("strict", {}).get("n_closed", "–"), suites.get("strict", {}).get("n_open", "–"),
                 *[_cell(suites.get("strict", {}), m) for m in METRICS]] for value, suites in values.items()]
        out.append(section(f"By {key.replace('_', ' ')} (strict)",
                           table([key, "closed", "open", *[m.replace("_", " ") for m in METRICS]], rows, "groups")))
    return out


def _question_item(row: dict, correct: bool, thumbs: Thumbnails) -> Raw:
    verdict = "right" if correct else "wrong"
    return item(thumbs.tag(row.get("image"), str(row["id"])),
                paragraph(f"#{row['id']} · {row['answer_type']} · {verdict}", "meta"),
                Raw(f"<p><b>Q:</b> {esc(row['question'])}</p><p><b>Truth:</b> {esc(row['gt'])}</p>"
                    f"<p><b>Prediction:</b> {esc(row['prediction'])}</p>"), cls=verdict)
