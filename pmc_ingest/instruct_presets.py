"""Instruction-generation presets (``medvlm ingest instruct --preset NAME``): the prompt a pair is sent
with and how a reply becomes a training record.

- ``medvlm`` (default): ``prompts/instruct_system.txt`` + ``instruct_fewshot.jsonl``; replies validated by
  ``instruct.validate_reply`` (refusals, malformed turns and answers that quote the caption for
  ``quote_words`` words reject the whole reply); the image after the first question.
- ``llava_med``: LLaVA-Med v1.0.0's recipe (``llava/instruct/instruct_generate.py`` and
  ``instruct_postprocess.py``): its system prompt and eight few-shot examples (``prompts/llava_med_*``),
  the context ``Figure Caption:\\n{label}: {caption}`` with mentions as ``\\t- `` bullets, the reply split
  at ``User:``/``Assistant:``, turn-level cleaning (a turn whose reply admits not seeing the image is
  dropped; stock openings such as "Based on the caption, " are cut and the rest capitalised as LLaVA-Med
  does; a reply still naming the "caption" or "description" is dropped; ``prompts/llava_med_cleaning.json``
  holds the phrase lists), ``<image>`` before or after the first question at random (seeded per pair),
  records with ``pair_id``-style ids and LLaVA-Med's ``domain`` flags. One deliberate difference: the image
  is placed after cleaning, so a record whose first turn was dropped still has its ``<image>`` (LLaVA-Med
  placed it first and could lose it).

Why ``medvlm`` stays the default: it rejects answers that copy the caption (LLaVA-Med's recipe keeps them,
and a model trained on them learns to recite captions rather than look), keeps each reply as the model
wrote it (``capitalize()`` lower-cases "CT" to "ct"), and never emits a record without its image token.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

PROMPTS = Path(__file__).parent / "prompts"
LLAVA_MED_DOMAINS = {"X-ray": "chest_xray", "MRI": "mri", "CT": "ct_scan", "histopathology": "histology",
                     "gross pathology": "gross"}


@dataclass(frozen=True)
class Preset:
    name: str
    system_file: Path
    fewshot_file: Path
    build_messages: Callable[[dict, str, list[dict], bool], list[dict]]
    # (pair, reply text, quote_words, seed) → (record, None) or (None, rejection reason)
    to_record: Callable[[dict, str, int, int], tuple[dict | None, str | None]]


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown instruction preset {name!r}; choose one of {', '.join(PRESETS)}") from None


# ------------------------------------------------------------------------------------ medvlm
def _medvlm_messages(pair, system, fewshot, with_mentions):
    from .instruct import build_messages

    return build_messages(pair, system, fewshot, with_mentions)


def _medvlm_record(pair, text, quote_words, seed):
    from .instruct import _caption, to_record, validate_reply

    turns, reason = validate_reply(text, _caption(pair), quote_words)
    return (None, reason) if reason else (to_record(pair, turns), None)


# ------------------------------------------------------------------------------------ llava_med
def llava_med_context(label: str, caption: str, mentions: list[str], with_mentions: bool) -> str:
    """``PromptGenerator.context_gen``: the label before the caption, mentions as tab-indented bullets."""
    text = f"Figure Caption:\n{label}: {caption}"
    if with_mentions and mentions:
        text += "\n\nFigure Context:\n\t- " + "\n\t- ".join(mentions)
    return text


def _llava_med_messages(pair, system, fewshot, with_mentions):
    from .instruct import _caption

    messages = [{"role": "system", "content": system}]
    for example in fewshot:
        messages.append({"role": "user", "content": llava_med_context(
            example["fig_label"], example["caption"], example.get("mentions", []), with_mentions)})
        messages.append({"role": "assistant", "content": example["conversation"]})
    query = llava_med_context(pair.get("label") or "", _caption(pair), list(pair.get("inline_mentions") or []),
                              with_mentions)
    return messages + [{"role": "user", "content": query}]


def split_turns(text: str) -> list[tuple[str, str]]:
    """``format_conv``: the reply cut at ``User:``, each piece at ``Assistant:`` (pieces that do not split
    into exactly a question and an answer are skipped)."""
    turns = []
    for piece in (text or "").split("User:")[1:]:
        parts = piece.split("Assistant:")
        if len(parts) == 2:
            turns.append((parts[0].strip(), parts[1].strip()))
    return turns


def clean_turns(turns: list[tuple[str, str]], rules: dict) -> list[tuple[str, str]]:
    """``clean_conv``: drop, trim or keep each (question, reply) turn by LLaVA-Med's phrase lists."""
    still = rules["drop_turn_if_reply_still_contains"]
    kept = []
    for question, reply in turns:
        if any(phrase in reply.lower() for phrase in rules["drop_turn_if_reply_contains"]):
            continue
        prefix = next((p for p in rules["strip_reply_prefixes"] if reply.lower().startswith(p)), None)
        if prefix is not None:
            reply = reply[len(prefix):].capitalize()
        else:
            for phrase in rules["remove_from_reply"]:
                reply = reply.replace(phrase, "")
        if not any(word in reply for word in still):
            kept.append((question, reply))
    return kept


def llava_med_domain(modality: str | None) -> dict:
    """LLaVA-Med's ``domain`` flags from medvlm's modality tag (plain radiographs count as chest X-ray)."""
    flags = {d: False for d in ("chest_xray", "mri", "histology", "gross", "ct_scan")}
    if modality in LLAVA_MED_DOMAINS:
        flags[LLAVA_MED_DOMAINS[modality]] = True
    return flags


def _llava_med_record(pair, text, quote_words, seed):
    from .instruct import REFUSAL, pair_id

    if not text or not text.strip():
        return None, "empty"
    if REFUSAL.match(text):
        return None, "refusal"
    turns = clean_turns(split_turns(text), _cleaning_rules())
    if not turns:
        return None, "no_turn_left" if split_turns(text) else "unparseable"
    pid = pair_id(pair)
    first = turns[0][0]
    first = f"{first}\n<image>" if random.Random(f"{seed}:{pid}").getrandbits(1) else f"<image>\n{first}"
    conversations = []
    for i, (question, reply) in enumerate(turns):
        conversations += [{"from": "human", "value": first if i == 0 else question}, {"from": "gpt", "value": reply}]
    return {"id": pid, "pair_id": pid, "image": pair["image_path"], "pmcid": pair["pmcid"],
            "domain": llava_med_domain(pair.get("modality")), "modality": pair.get("modality"),
            "conversations": conversations}, None


_RULES: dict = {}


def _cleaning_rules() -> dict:
    if not _RULES:
        _RULES.update(json.loads((PROMPTS / "llava_med_cleaning.json").read_text(encoding="utf-8")))
    return _RULES


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("medvlm", PROMPTS / "instruct_system.txt", PROMPTS / "instruct_fewshot.jsonl", _medvlm_messages,
           _medvlm_record),
    Preset("llava_med", PROMPTS / "llava_med_system.txt", PROMPTS / "llava_med_fewshot.jsonl", _llava_med_messages,
           _llava_med_record),
)}
