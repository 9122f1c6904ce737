"""Stage-1 concept-alignment conversations from the pairs table (LLaVA JSON, as LLaVA-Med's
``llava_med_alignment_500k.json``): a human turn with ``<image>`` and one brief-description instruction
drawn (seeded) from ``prompts/brief_description.txt``, and the caption as the gpt turn — a fig-group
member's own sub-caption when it has one, since that is what its image shows.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from medvlm.fileio import atomic_path

from .pairs import figure_caption

PROMPTS_FILE = Path(__file__).parent / "prompts" / "brief_description.txt"


def read_prompts(path: str | Path | None = None) -> list[str]:
    path = Path(path) if path else PROMPTS_FILE
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
               if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"{path}: no prompts (one per line expected)")
    return prompts


def alignment_record(row: dict, prompt: str) -> dict:
    target = figure_caption(row)
    return {
        "id": f"{row['pmcid']}_{row['figure_id']}",
        "image": row["image_path"],
        "conversations": [{"from": "human", "value": f"{prompt}\n<image>"}, {"from": "gpt", "value": target}],
    }


def canonical_modalities(values: list[str]) -> list[str]:
    """``ct`` → ``CT``, ``x-ray`` → ``X-ray`` (tags match case-insensitively); an unknown tag is an error
    naming the allowed ones, never a silent empty output."""
    from .modality import MODALITY_KEYWORDS

    known = {name.lower(): name for name in MODALITY_KEYWORDS}
    unknown = [v for v in values if v.strip().lower() not in known]
    if unknown:
        raise ValueError(f"--modality {', '.join(map(repr, unknown))}: unknown modality tag; allowed: "
                         f"{', '.join(MODALITY_KEYWORDS)} (any case)")
    return [known[v.strip().lower()] for v in values]


def write_alignment(pairs_dir: str | Path, out_file: str | Path, seed: int = 0, modalities: list[str] | None = None,
                    prompts_file: str | Path | None = None, limit: int | None = None) -> int:
    """Write the alignment JSON next to nothing else; image paths stay relative to ``pairs_dir``."""
    from .pairs import load_pairs

    prompts = read_prompts(prompts_file)
    rng = random.Random(seed)
    pairs = load_pairs(pairs_dir)
    if modalities:
        wanted = set(canonical_modalities(modalities))
        pairs = pairs.filter(lambda m: m in wanted, input_columns="modality")
    out_file = Path(out_file)
    count = 0
    with atomic_path(out_file) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write("[")
        for row in pairs:
            if limit is not None and count >= limit:
                break
            fh.write(("," if count else "") + "\n" + json.dumps(alignment_record(row, rng.choice(prompts)), ensure_ascii=False))
            count += 1
        fh.write("\n]\n")
    return count
