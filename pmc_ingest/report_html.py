"""``medvlm report pairs`` / ``medvlm report instruct``: look at ingest output as a page of figures.

- pairs page (``PAIRS/pairs.html``): counts of pairs, articles and licenses, the modality histogram, the
  ingest filter counts (``report.json``), then a seeded sample of figures: thumbnail, label, license,
  caption, panel sub-captions and the sentences that mention the figure;
- instruct page (``INSTRUCT/instruct.html``): the instruction-generation summary (``summary.json``),
  then a seeded sample of conversations, each next to the figure and the caption it was written from
  (looked up in the pairs table by ``pmcid_figureid``).

Counts and the histogram cover the whole table (columns read without the images); only the sample is
rendered, so the page stays small for a 15M-row corpus. One self-contained HTML file each.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

from medvlm.htmlpage import Raw, Thumbnails, bar_chart, esc, item, paragraph, section, table, write_page

from .instruct import _caption, pair_id
from .pairs import load_pairs


class ReportError(FileNotFoundError):
    """Input folders a report cannot read; the message names the folder and what to pass."""


def _sample(n: int, k: int, seed: int) -> list[int]:
    return sorted(random.Random(seed).sample(range(n), min(k, n)))


def _image_path(root: Path, relative: str | None) -> Path | None:
    """The image under ``root``; ``None`` for a path that would leave it."""
    if not relative:
        return None
    path = (root / relative).resolve()
    return path if path.is_relative_to(root.resolve()) else None


def _counts(values) -> dict[str, int]:
    return dict(Counter("untagged" if v in (None, "") else str(v) for v in values).most_common())


def _column_counts(dataset, name: str) -> dict[str, int]:
    """Value counts of one column, computed by Arrow on the memory-mapped table (no Python list of rows)."""
    import pyarrow.compute as pc

    counts = pc.value_counts(dataset.data.column(name)).to_pylist()
    return _counts_from_pairs((c["values"], c["counts"]) for c in counts)


def _counts_from_pairs(pairs) -> dict[str, int]:
    total: Counter = Counter()
    for value, count in pairs:
        total["untagged" if value in (None, "") else str(value)] += count
    return dict(total.most_common())


def write_pairs_report(pairs_dir: str | Path, out: str | Path | None = None, sample: int = 100, seed: int = 0) -> Path:
    pairs_dir = Path(pairs_dir)
    pairs = load_pairs(pairs_dir)
    thumbs = Thumbnails()
    import pyarrow.compute as pc

    modalities, licenses = _column_counts(pairs, "modality"), _column_counts(pairs, "license")
    articles = pc.count_distinct(pairs.data.column("pmcid")).as_py()
    parts = [paragraph(f"{len(pairs)} figure-caption pairs from {articles} articles in {pairs_dir}."),
             section("Modalities", bar_chart(modalities, "pairs by modality tag", "pairs"),
                     table(["modality", "pairs"], modalities.items(), "modalities")),
             section("Licenses", table(["license", "pairs"], licenses.items(), "licenses"))]
    ingest = pairs_dir / "report.json"
    if ingest.is_file():
        filtered = json.loads(ingest.read_text()).get("filtered") or {}
        parts.append(section("Filtered out during ingest", table(["reason", "figures"], filtered.items(), "filtered")))
    rows = [pairs[i] for i in _sample(len(pairs), sample, seed)]
    parts.append(section(f"Figures ({len(rows)} of {len(pairs)}, seed {seed})", *[_pair_item(r, pairs_dir, thumbs) for r in rows]))
    return write_page(Path(out) if out else pairs_dir / "pairs.html", "PMC figure-caption pairs", parts)


def _pair_item(row: dict, root: Path, thumbs: Thumbnails) -> Raw:
    meta = f"{row['pmcid']} · {row.get('label') or row['figure_id']} · {row.get('license') or 'license unknown'} · " \
           f"{row.get('modality') or 'untagged'} · {row.get('journal') or ''} {row.get('year') or ''}"
    subs = row.get("subcaption") or []
    mentions = row.get("inline_mentions") or []
    return item(thumbs.tag(_image_path(root, row["image_path"]), row["figure_id"]), paragraph(meta, "meta"),
                paragraph(row["caption"], "caption"),
                Raw("".join(f"<p class='subcaption'>▸ {esc(s)}</p>" for s in subs)),
                Raw("<p class='meta'>Mentioned in the text:</p><ul class='mentions'>"
                    + "".join(f"<li>{esc(m)}</li>" for m in mentions) + "</ul>") if mentions else Raw(""))


def write_instruct_report(instruct_dir: str | Path, pairs_dir: str | Path, out: str | Path | None = None,
                          sample: int = 100, seed: int = 0) -> Path:
    instruct_dir, pairs_dir = Path(instruct_dir), Path(pairs_dir)
    data = instruct_dir / "instruct.json" if instruct_dir.is_dir() else instruct_dir
    if not data.is_file():
        raise ReportError(f"{instruct_dir}: no instruct.json; pass the folder `medvlm ingest instruct --out` wrote")
    records = json.loads(data.read_text(encoding="utf-8"))
    pairs = {pair_id(row): row for row in load_pairs(pairs_dir)}
    thumbs = Thumbnails()
    modalities = _counts(pairs.get(r["id"], {}).get("modality") for r in records)
    turns = Counter(len(r["conversations"]) // 2 for r in records)
    parts = [paragraph(f"{len(records)} conversations in {data}; captions and images from {pairs_dir}."),
             section("Conversations", table(["question-answer rounds", "conversations"], sorted(turns.items()), "rounds"),
                     bar_chart(modalities, "conversations by figure modality", "conversations"))]
    summary = instruct_dir / "summary.json" if instruct_dir.is_dir() else None
    if summary and summary.is_file():
        flat = {k: v for k, v in json.loads(summary.read_text()).items() if not isinstance(v, (dict, list))}
        parts.append(section("Generation summary", table(["field", "value"], flat.items(), "summary")))
    shown = [records[i] for i in _sample(len(records), sample, seed)]
    parts.append(section(f"Conversations ({len(shown)} of {len(records)}, seed {seed})",
                         *[_conversation_item(r, pairs.get(r["id"]), pairs_dir, thumbs) for r in shown]))
    return write_page(Path(out) if out else data.with_suffix(".html"), "Generated instruction data", parts)


def _conversation_item(record: dict, pair: dict | None, root: Path, thumbs: Thumbnails) -> Raw:
    caption = _caption(pair) if pair else "(no pair with this id in the pairs table)"
    turns = "".join(f"<p class='turn {esc(t['from'])}'><b>{'User' if t['from'] == 'human' else 'Assistant'}:</b> "
                    f"{esc(t['value'].replace('<image>', '').strip())}</p>" for t in record["conversations"])
    return item(thumbs.tag(_image_path(root, record.get("image")), record["id"]), paragraph(record["id"], "meta"),
                Raw(f"<p class='caption'><b>Caption:</b> {esc(caption)}</p>"), Raw(f"<div class='conversation'>{turns}</div>"))
