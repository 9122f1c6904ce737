"""Chat templates and the conversion of a LLaVA conversation into token ids and labels.

A conversation is the LLaVA list ``[{"from": "human"|"gpt", "value": str}, ...]``. A template turns it
into *segments*: ``(text, is_target)`` pairs. Segments are tokenized one by one and concatenated, so
the label mask is exact by construction (no re-tokenizing prefixes and hoping the lengths agree, which
is where LLaVA's own masking breaks for tokenizers that merge across turn boundaries). ``<image>`` in a
segment becomes ``num_image_tokens`` copies of the model's image token id, which is what
``LlavaForConditionalGeneration`` scatters the projected vision features into.

Templates:
- ``llava_v1`` (LLaVA-1.5 / LLaVA-Med ``vicuna_v1``): ``SYSTEM USER: q ASSISTANT: a</s>USER: ...``;
  targets are each reply plus the end-of-sequence token.
- ``plain`` (LLaVA stage-1 pretraining): the image tokens then the caption and ``\\n``; no system
  prompt, the human text is dropped, the caption is the target.
- ``chat_template``: the language model's own Jinja chat template (e.g. ChatML for SmolLM2/Qwen);
  assistant spans are found by rendering the conversation prefix by prefix.

Inference uses the same segmenter with ``add_generation_prompt=True`` so that the prompt a model sees
at evaluation is token-for-token the prompt it was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"

LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
TEMPLATES = ("llava_v1", "plain", "chat_template")
ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class ConversationError(ValueError):
    """A conversation record that cannot be turned into a training example."""


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    num_images: int


def normalise_turns(conversations: Sequence[dict[str, Any]], record_id: str = "?") -> list[tuple[str, str]]:
    """Return ``[(role, text)]`` with roles ``user``/``assistant``, checking LLaVA's alternation rules."""
    turns: list[tuple[str, str]] = []
    for i, turn in enumerate(conversations):
        role = ROLE_ALIASES.get(str(turn.get("from", turn.get("role", ""))).lower())
        if role is None:
            raise ConversationError(
                f"record {record_id}: turn {i} has 'from'={turn.get('from')!r}; expected 'human' or 'gpt'"
            )
        value = turn.get("value", turn.get("content"))
        if not isinstance(value, str):
            raise ConversationError(f"record {record_id}: turn {i} has no string 'value'")
        turns.append((role, value))
    if not turns or turns[0][0] != "user":
        raise ConversationError(f"record {record_id}: a conversation must start with a 'human' turn")
    for i in range(1, len(turns)):
        if turns[i][0] == turns[i - 1][0]:
            raise ConversationError(f"record {record_id}: turns {i - 1} and {i} are both '{turns[i][0]}'")
    return turns


def segments(
    template: str,
    turns: list[tuple[str, str]],
    tokenizer: Any = None,
    add_generation_prompt: bool = False,
    system: str | None = None,
) -> list[tuple[str, bool]]:
    """Split a conversation into ``(text, is_target)`` segments for ``template``."""
    if template == "llava_v1":
        return _llava_v1_segments(turns, tokenizer, add_generation_prompt, system)
    if template == "plain":
        return _plain_segments(turns, add_generation_prompt)
    if template == "chat_template":
        return _chat_template_segments(turns, tokenizer, add_generation_prompt, system)
    raise ConversationError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")


def _llava_v1_segments(turns, tokenizer, add_generation_prompt, system):
    eos = tokenizer.eos_token if tokenizer is not None and tokenizer.eos_token else "</s>"
    out: list[tuple[str, bool]] = []
    prefix = (system if system is not None else LLAVA_V1_SYSTEM) + " "
    for role, text in turns:
        if role == "user":
            out.append((f"{prefix}USER: {text} ASSISTANT:", False))
            prefix = ""
        else:
            out.append((f" {text}{eos}", True))
    if add_generation_prompt and turns[-1][0] == "assistant":
        raise ConversationError("cannot add a generation prompt after an assistant turn")
    return out


def _plain_segments(turns, add_generation_prompt):
    # LLaVA's pretraining format keeps only the image and the caption.
    image = IMAGE_PLACEHOLDER if IMAGE_PLACEHOLDER in turns[0][1] else ""
    out = [(image, False)]
    if not add_generation_prompt:
        if len(turns) < 2:
            raise ConversationError("the 'plain' template needs a human turn and a gpt turn (the caption)")
        out.append((turns[1][1].strip() + "\n", True))
    return out


def _chat_template_segments(turns, tokenizer, add_generation_prompt, system):
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ConversationError("template 'chat_template' needs a tokenizer that has a chat_template")
    messages = [{"role": "system", "content": system}] if system else []
    out: list[tuple[str, bool]] = []
    rendered = ""
    for role, text in turns:
        if role == "user":
            messages.append({"role": role, "content": text})
            continue
        before = _render(tokenizer, messages, add_generation_prompt=True)
        messages.append({"role": role, "content": text})
        after = _render(tokenizer, messages, add_generation_prompt=False)
        _check_prefix(before, rendered, tokenizer)
        _check_prefix(after, before, tokenizer)
        out.append((before[len(rendered):], False))
        out.append((after[len(before):], True))
        rendered = after
    if turns[-1][0] == "user":
        tail = _render(tokenizer, messages, add_generation_prompt=add_generation_prompt)
        _check_prefix(tail, rendered, tokenizer)
        out.append((tail[len(rendered):], False))
    return out


def _render(tokenizer, messages, add_generation_prompt):
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _check_prefix(text: str, prefix: str, tokenizer) -> None:
    if not text.startswith(prefix):
        raise ConversationError(
            f"the chat template of {getattr(tokenizer, 'name_or_path', 'this tokenizer')} renders earlier turns "
            "differently once later turns exist, so assistant spans cannot be located; use template llava_v1"
        )


def encode(
    template: str,
    conversations: Sequence[dict[str, Any]],
    tokenizer: Any,
    image_token_id: int,
    num_image_tokens: int,
    has_image: bool,
    record_id: str = "?",
    system: str | None = None,
    add_generation_prompt: bool = False,
) -> Encoded:
    """Token ids and labels (``IGNORE_INDEX`` outside assistant replies) for one conversation."""
    turns = normalise_turns(conversations, record_id)
    if has_image:
        turns = _move_image_to_front(turns, record_id)
    elif any(IMAGE_PLACEHOLDER in text for _, text in turns):
        raise ConversationError(f"record {record_id}: has '<image>' in its text but no 'image' field")
    if add_generation_prompt and turns[-1][0] == "assistant":
        turns = turns[:-1]
    input_ids = list(_special_prefix_ids(tokenizer))
    labels = [IGNORE_INDEX] * len(input_ids)
    num_images = 0
    for text, is_target in segments(template, turns, tokenizer, add_generation_prompt, system):
        pieces = text.split(IMAGE_PLACEHOLDER)
        for j, piece in enumerate(pieces):
            if j > 0:
                input_ids.extend([image_token_id] * num_image_tokens)
                labels.extend([IGNORE_INDEX] * num_image_tokens)
                num_images += 1
            if piece:
                ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
                input_ids.extend(ids)
                labels.extend(ids if is_target else [IGNORE_INDEX] * len(ids))
    return Encoded(input_ids=input_ids, labels=labels, num_images=num_images)


def _move_image_to_front(turns: list[tuple[str, str]], record_id: str) -> list[tuple[str, str]]:
    """LLaVA puts ``<image>`` first or last in the first human turn; normalise to ``<image>\\n`` first."""
    count = sum(text.count(IMAGE_PLACEHOLDER) for _, text in turns)
    if count > 1:
        raise ConversationError(
            f"record {record_id}: has {count} '<image>' tokens for one image; keep exactly one, in the first human turn"
        )
    if count == 1 and IMAGE_PLACEHOLDER not in turns[0][1]:
        raise ConversationError(f"record {record_id}: '<image>' must be in the first human turn")
    if count == 0:
        raise ConversationError(
            f"record {record_id}: has an 'image' but no '<image>' token; put '<image>' in the first human turn"
        )
    first = turns[0][1].replace(IMAGE_PLACEHOLDER, "").strip()
    return [("user", f"{IMAGE_PLACEHOLDER}\n{first}")] + turns[1:]


def _special_prefix_ids(tokenizer: Any) -> list[int]:
    """The ids the tokenizer itself prepends (e.g. Llama's BOS); empty for tokenizers that add none."""
    ids = list(tokenizer("", add_special_tokens=True)["input_ids"])
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and ids[:1] == [bos] else []


def prompt_messages(question: str, has_image: bool) -> list[dict[str, str]]:
    """A single-turn LLaVA conversation for inference (the same shape downstream finetuning uses)."""
    value = f"{IMAGE_PLACEHOLDER}\n{question}" if has_image else question
    return [{"from": "human", "value": value}]
