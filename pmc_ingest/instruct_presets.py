"""Instruction-generation presets (``medvlm ingest instruct --preset NAME``): the prompt a pair is sent
with and how a reply becomes a training record.

- ``medvlm`` (default): ``prompts/instruct_system.txt`` + ``instruct_fewshot.jsonl``; replies validated by
  ``instruct.validate_reply`` (refusals, malformed turns and answers that quote the caption for
  ``quote_words`` words reject the whole reply); the image after the first question.
- ``llava_med``: LLaVA-Med v1.0.0's recipe (``llava/instruct/instruct_generate.py`` and
  ``instruct_postprocess.py``). Its system prompt, eight few-shot examples and cleaning phrase lists are
  LLaVA-Med's text, which its licence (Microsoft Research License Terms) does not let medvlm distribute, so
  they are read from the user's own checkout (``InstructOptions.llava_med_repo`` / ``--llava-med-repo DIR`` /
  ``$MEDVLM_LLAVA_MED_REPO``; ``reference_text.py`` parses the files, never runs them). The rest is medvlm's
  code: the context ``Figure Caption:\\n{label}: {caption}`` with mentions as ``\\t- `` bullets, the reply
  split at ``User:``/``Assistant:``, turn-level cleaning (a turn whose reply admits not seeing the image is
  dropped; stock openings that cite the caption are cut and the rest capitalised as LLaVA-Med does; a
  reply still naming the caption or description is dropped), ``<image>`` before or after the
  first question at random (seeded per pair), records with ``pair_id``-style ids and LLaVA-Med's ``domain``
  flags. One deliberate difference: the image is placed after cleaning, so a record whose first turn was
  dropped still has its ``<image>`` (LLaVA-Med placed it first and could lose it).

Why ``medvlm`` stays the default: it rejects answers that copy the caption (LLaVA-Med's recipe keeps them,
and a model trained on them learns to recite captions rather than look), keeps each reply as the model
wrote it (``capitalize()`` lower-cases "CT" to "ct"), and never emits a record without its image token.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from . import reference_text

if TYPE_CHECKING:
    from .instruct import InstructOptions

PROMPTS = Path(__file__).parent / "prompts"
LLAVA_MED_DOMAINS = {"X-ray": "chest_xray", "MRI": "mri", "CT": "ct_scan", "histopathology": "histology",
                     "gross pathology": "gross"}


@dataclass(frozen=True)
class Preset:
    name: str
    # options → (system prompt, few-shot examples); --system-prompt / --fewshot replace either
    prompt: Callable[[InstructOptions], tuple[str, list[dict]]]
    build_messages: Callable[[dict, str, list[dict], bool], list[dict]]
    # (pair, reply text, options) → (record, None) or (None, rejection reason)
    to_record: Callable[[dict, str, InstructOptions], tuple[dict | None, str | None]]


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown instruction preset {name!r}; choose one of {', '.join(PRESETS)}") from None


# ------------------------------------------------------------------------------------ medvlm
def _medvlm_prompt(options):
    from .instruct import read_fewshot

    system = Path(options.system_file or PROMPTS / "instruct_system.txt").read_text(encoding="utf-8").strip()
    return system, read_fewshot(options.fewshot_file or PROMPTS / "instruct_fewshot.jsonl")


def _medvlm_messages(pair, system, fewshot, with_mentions):
    from .instruct import build_messages

    return build_messages(pair, system, fewshot, with_mentions)


def _medvlm_record(pair, text, options):
    from .instruct import _caption, to_record, validate_reply

    turns, reason = validate_reply(text, _caption(pair), options.quote_words)
    return (None, reason) if reason else (to_record(pair, turns), None)


# ------------------------------------------------------------------------------------ llava_med
def _llava_med_prompt(options):
    """LLaVA-Med's system prompt (sent as written) and its ``fs`` examples from the user's checkout; the
    cleaning lists are read here too, so a wrong checkout fails before any request is sent."""
    from .instruct import read_fewshot

    reference_text.llava_med_cleaning_lists(options.llava_med_repo)
    system = (Path(options.system_file).read_text(encoding="utf-8") if options.system_file
              else reference_text.llava_med_system_prompt(options.llava_med_repo))
    if options.fewshot_file:
        return system, read_fewshot(options.fewshot_file)
    return system, [llava_med_example(e) for e in reference_text.llava_med_fewshot(options.llava_med_repo)]


def llava_med_example(example: dict) -> dict:
    """One of LLaVA-Med's ``fs`` examples as a few-shot example: its context fields, and its conversation as
    ``conv_to_str`` writes it (``User: `` / ``Assistant: `` turns joined by blank lines)."""
    try:
        turns = [("User: " if t["from"] == "human" else "Assistant: ") + t["value"] for t in example["conversations"]]
        mentions = [m["tokens"] if isinstance(m, dict) else str(m) for m in example.get("in_text_mention") or []]
        return {"fig_label": example["fig_label"], "caption": example["fig_caption"], "mentions": mentions,
                "conversation": "\n\n".join(turns)}
    except (KeyError, TypeError) as exc:
        raise reference_text.ReferenceTextError(
            f"a LLaVA-Med few-shot example lacks {exc} (fig_label, fig_caption, conversations with from/value); "
            "use an unmodified LLaVA-Med v1.0.0 checkout") from None


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
    """``clean_conv``: drop, trim or keep each (question, reply) turn by the phrase lists in ``rules``
    (``reference_text.llava_med_cleaning_lists``: LLaVA-Med's, read from the user's checkout)."""
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


def _llava_med_record(pair, text, options):
    from .instruct import REFUSAL, pair_id

    if not text or not text.strip():
        return None, "empty"
    if REFUSAL.match(text):
        return None, "refusal"
    turns = clean_turns(split_turns(text), reference_text.llava_med_cleaning_lists(options.llava_med_repo))
    if not turns:
        return None, "no_turn_left" if split_turns(text) else "unparseable"
    pid = pair_id(pair)
    first = turns[0][0]
    first = f"{first}\n<image>" if random.Random(f"{options.seed}:{pid}").getrandbits(1) else f"<image>\n{first}"
    conversations = []
    for i, (question, reply) in enumerate(turns):
        conversations += [{"from": "human", "value": first if i == 0 else question}, {"from": "gpt", "value": reply}]
    return {"id": pid, "pair_id": pid, "image": pair["image_path"], "pmcid": pair["pmcid"],
            "domain": llava_med_domain(pair.get("modality")), "modality": pair.get("modality"),
            "conversations": conversations}, None


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("medvlm", _medvlm_prompt, _medvlm_messages, _medvlm_record),
    Preset("llava_med", _llava_med_prompt, _llava_med_messages, _llava_med_record),
)}
