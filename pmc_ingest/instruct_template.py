"""Instruction data from captions by a fixed template — the offline stand-in for GPT-written
conversations when no LLM endpoint is configured (the demo, smoke tests).

For each pair, a two-round conversation in LLaVA format:
1. a modality question ("What type of medical image is this?") answered from the pair's modality tag
   (pairs without a tag get no such round);
2. a findings question drawn (seeded) from ``FINDINGS_QUESTIONS``, answered with the caption with its
   leading figure label removed, or the sub-figure's own caption.

This teaches the format and the captions' content; it is *not* a substitute for LLaVA-Med's GPT-4 data,
whose questions go beyond what a caption states.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from medvlm.fileio import atomic_write_text

from .pairs import figure_caption

MODALITY_ANSWERS = {
    "CT": "This is a computed tomography (CT) image.", "MRI": "This is a magnetic resonance imaging (MRI) image.",
    "X-ray": "This is a plain radiograph (X-ray).", "ultrasound": "This is an ultrasound image.",
    "histopathology": "This is a histopathology (microscopy) image.", "endoscopy": "This is an endoscopic image.",
    "fundus": "This is a fundus photograph.", "dermoscopy": "This is a dermoscopy image.",
    "gross pathology": "This is a photograph of a gross pathology specimen.",
    "chart/diagram": "This is a chart or diagram, not a medical image.",
}
FINDINGS_QUESTIONS = ("What does the image show?", "Describe the findings in this image.",
                      "What can be seen in this image?")


def template_conversation(row: dict, rng: random.Random) -> dict:
    text = figure_caption(row)
    text = re.sub(r"^(fig(ure)?\.?\s*\d+[a-z]?[.:]?\s*)", "", text, flags=re.I).strip()
    turns = []
    if row.get("modality") in MODALITY_ANSWERS:
        turns += [{"from": "human", "value": "What type of medical image is this?"},
                  {"from": "gpt", "value": MODALITY_ANSWERS[row["modality"]]}]
    turns += [{"from": "human", "value": rng.choice(FINDINGS_QUESTIONS)}, {"from": "gpt", "value": text}]
    turns[0] = {"from": "human", "value": "<image>\n" + turns[0]["value"]}
    return {"id": f"{row['pmcid']}_{row['figure_id']}", "image": row["image_path"], "conversations": turns}


def write_template_instructions(pairs_dir: str | Path, out_file: str | Path, seed: int = 0) -> int:
    from .pairs import load_pairs

    rng = random.Random(seed)
    records = [template_conversation(row, rng) for row in load_pairs(pairs_dir)]
    out_file = Path(out_file)
    atomic_write_text(out_file, json.dumps(records, indent=1, ensure_ascii=False))
    return len(records)
