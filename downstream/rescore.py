"""``medvlm eval score``: re-score anybody's prediction file against a ground-truth file.

Reads LLaVA-Med's formats (answer files with ``question_id``/``text``; the converted ``test.json`` with
``id``/``conversations``/``answer_type``) and medvlm's ``answers.jsonl`` (``id``/``prediction``/``gt``).
Nothing is written.

Matching is by id, so the two files may be in any order. A question id that appears more than once
(LLaVA-Med's script pairs the files by position and never notices) is matched by occurrence: the k-th
answer carrying that id scores the k-th question carrying it — the same pairing as LLaVA-Med's when the
files are in the same order — and the result names the repeated ids under ``repeated_ids``. An id that
appears a different number of times in the two files is refused with the ids named, as is a missing or
unknown id: a silent "last one wins" would change the score (47.4 → 48.5 closed accuracy seen on one file).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict, deque
from pathlib import Path
from typing import Iterator, Sequence

from .metrics import SUITES, Item, ScoreInputError, evaluate_items, read_candidates

__all__ = ["ScoreInputError", "read_json_lines", "read_predictions", "read_ground_truth", "score_files"]

PAIRING_RULE = "the k-th answer with an id scores the k-th question with that id (file order)"


def read_json_lines(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-empty line; a line that is not a JSON object names file:line."""
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ScoreInputError(f"{path}:{line_no}: not valid JSON ({exc.msg}, column {exc.colno}); "
                                      "fix or remove that line") from exc
            if not isinstance(item, dict):
                raise ScoreInputError(f"{path}:{line_no}: expected a JSON object per line")
            yield line_no, item


def read_predictions(path: str | Path) -> list[tuple[str, str]]:
    """(id, answer) in file order: ``question_id``/``text`` (LLaVA-Med answer files) or ``id``/``prediction`` (ours)."""
    predictions = []
    for line_no, item in read_json_lines(path):
        key = item.get("question_id", item.get("id"))
        text = item.get("text", item.get("prediction"))
        if key is None or text is None:
            raise ScoreInputError(f"{path}:{line_no}: expected question_id+text (LLaVA-Med) or id+prediction (medvlm)")
        predictions.append((str(key), str(text)))
    return predictions


def read_ground_truth(path: str | Path) -> list[Item]:
    """LLaVA-Med's test JSON (``id``, ``conversations``, ``answer_type``) or our answers.jsonl."""
    from .evaluate import GROUP_KEYS

    path = Path(path)
    if path.suffix == ".jsonl":
        items = []
        for line_no, row in read_json_lines(path):
            if not {"id", "gt", "answer_type"} <= row.keys():
                raise ScoreInputError(f"{path}:{line_no}: expected id, gt and answer_type (a medvlm answers.jsonl)")
            items.append(Item(str(row["id"]), "", str(row["gt"]), str(row["answer_type"]).lower(),
                              {k: row[k] for k in GROUP_KEYS if k in row}))
        return items
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ScoreInputError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}); expected LLaVA-Med's test.json "
                              "(a list) or a medvlm answers.jsonl") from exc
    if not isinstance(records, list):
        raise ScoreInputError(f"{path}: expected a JSON list of LLaVA-Med test records")
    items = []
    for index, record in enumerate(records):
        turns = record.get("conversations") or record.get("conversatons")
        kind = str(record.get("answer_type", "")).upper()
        if kind not in ("OPEN", "CLOSED"):
            continue  # LLaVA-Med's script ignores other types too
        if "id" not in record or not turns or len(turns) < 2:
            raise ScoreInputError(f"{path}: record {index} has no id or no answer turn (conversations[1])")
        items.append(Item(str(record["id"]), "", str(turns[1]["value"]), kind.lower()))
    return items


def _pair(predictions: list[tuple[str, str]], truth: list[Item]) -> list[str]:
    """Ids that appear more than once; sets each item's prediction or raises naming the mismatched ids."""
    def names(ids: list[str]) -> str:
        return f"{ids[:5]}{'…' if len(ids) > 5 else ''} ({len(ids)})"

    want, have = Counter(i.id for i in truth), Counter(k for k, _ in predictions)
    missing = [k for k in want if k not in have]
    extra = [k for k in have if k not in want]
    uneven = [f"{k} ({have[k]} answers, {want[k]} questions)" for k in want if k in have and have[k] != want[k]]
    if missing or extra or uneven:
        parts = [f"{label} {names(ids)}" for label, ids in (("missing predictions for", missing),
                 ("predictions for unknown ids", extra), ("repeated ids with unequal counts", uneven)) if ids]
        raise ScoreInputError("ids do not match: " + "; ".join(parts) + ". Score the answer file written for this test file")
    queues: dict[str, deque] = defaultdict(deque)
    for key, text in predictions:
        queues[key].append(text)
    for item in truth:
        item.prediction = queues[item.id].popleft()
    return sorted(k for k, n in want.items() if n > 1)


def score_files(pred_path: str | Path, gt_path: str | Path, candidates_path: str | Path | None = None,
                suites: Sequence[str] = SUITES) -> dict:
    """Every suite on the matched files; ``repeated_ids`` says which ids were matched by occurrence."""
    truth = read_ground_truth(gt_path)
    repeated = _pair(read_predictions(pred_path), truth)
    candidates = read_candidates(candidates_path) if candidates_path else None
    result = evaluate_items(truth, suites, candidates, by_group=False)
    if repeated:
        result["repeated_ids"] = {"count": len(repeated), "ids": repeated, "rule": PAIRING_RULE}
    return result
