"""Chat templates and the conversion of a LLaVA conversation into token ids and labels.

A conversation is the LLaVA list ``[{"from": "human"|"gpt", "value": str}, ...]``. Every template is
defined once, as the Jinja chat template that is saved with checkpoints; training renders that same
Jinja, so the prompt a model is trained on, the prompt medvlm evaluates with and the prompt a user gets
from ``processor.apply_chat_template`` are one text. Labels come from the rendering itself: the text a
reply adds after the generation prompt (``ASSISTANT:``, ``[/INST]``…) is the target span, and a token is
a target when the last character it covers lies in a target span. The text is tokenized as LLaVA's
``preprocess_*`` do — whole, but for a separate call per piece between images (``tokenizer_image_token``)
— so ids equal the reference ids for legacy and non-legacy Llama tokenizers alike
(tests/test_templates_golden.py).

Templates (``TEMPLATES``; the reference each reproduces is in its ``source``):
- ``vicuna_v1``: LLaVA-1.5 (``--version v1``) and LLaVA-Med v1.5 eval's default: ``SYS USER: q ASSISTANT: a</s>``.
- ``llava_v1``: LLaVA's ``conv_llava_v1`` — the same shape with the "curious human" system wording.
- ``v0``: LLaVA-Med v1.0.0 training (FastChat v0): ``SYS\\n\\n### Human: q\\n### Assistant: a\\n### ``;
  the image stays where the record puts it, replies are trained together with the ``###`` that ends them.
- ``simple``: LLaVA-Med v1.0.0 ``model_vqa_med`` evaluation: ``SYS###Human: Hi!###Assistant: Hi there!…``
  one-shot, then ``Human: q###``; the model writes ``Assistant: a###`` itself.
- ``mistral_instruct``: LLaVA-Med v1.5 (Mistral-7B-Instruct): ``[INST] q [/INST] a </s>``, empty system.
- ``plain``: LLaVA stage-1 pretraining: the image, then the caption and ``\\n``.
- ``chatml``: ChatML (``<|im_start|>role\\n…<|im_end|>\\n``), fixed, for a language model that has none.
- ``chat_template``: the language model's own Jinja chat template (e.g. ChatML for SmolLM2/Qwen).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Sequence

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"

LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class ConversationError(ValueError):
    """A conversation record that cannot be turned into a training example."""


@dataclass(frozen=True)
class Template:
    """One chat format: its Jinja (``None``: the tokenizer's own) and how LLaVA places the image."""

    name: str
    jinja: str | None
    image_first: bool = True          # LLaVA-1.5 moves <image> to the front ("<image>\n" + question)
    stop_strings: tuple[str, ...] = ()  # besides EOS: text that ends a reply (the ``###`` of v0/simple)
    answer_prefix: str = ""           # what a generated reply starts with, removed from answers
    source: str = ""


def _lit(text: str) -> str:
    """``text`` as a Jinja string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


# Message content: a string (medvlm, LLaVA JSON) or HF parts ``[{"type": "image"}, {"type": "text", ...}]``
# joined by "\n", so ``<image>`` then a question renders as LLaVA's ``<image>\nquestion``.
_CONTENT = (
    "{%- macro content(m) -%}{%- if m['content'] is string -%}{{ m['content'] }}{%- else -%}"
    "{%- for part in m['content'] -%}{%- if not loop.first -%}{{ '\\n' }}{%- endif -%}"
    "{%- if part['type'] == 'image' -%}{{ '<image>' }}{%- else -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}{%- endmacro -%}"
)


def _system(default: str) -> str:
    return (
        "{%- if messages and messages[0]['role'] == 'system' -%}{%- set system = content(messages[0]) -%}"
        "{%- set loop_messages = messages[1:] -%}{%- else -%}"
        f"{{%- set system = {_lit(default)} -%}}{{%- set loop_messages = messages -%}}{{%- endif -%}}"
    )


def _two_sep_jinja(system: str) -> str:
    """LLaVA's ``SeparatorStyle.TWO``: ``SYS USER: q ASSISTANT: a</s>USER: …`` (sep " ", sep2 EOS)."""
    return _CONTENT + _system(system) + (
        "{{ system + ' ' }}{%- for m in loop_messages -%}"
        "{%- if m['role'] == 'user' -%}{{ 'USER: ' + content(m) + ' ' }}"
        "{%- else -%}{{ 'ASSISTANT: ' + content(m) + eos_token }}{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
    )


_V0_JINJA = _CONTENT + _system(LLAVA_V1_SYSTEM) + (
    "{{ system + '\\n\\n' }}{%- for m in loop_messages -%}"
    "{{ '### ' + ('Human' if m['role'] == 'user' else 'Assistant') + ': ' + content(m) + '\\n' }}"
    "{%- endfor -%}{{ '### Assistant:' if add_generation_prompt else '### ' }}"
)

_SIMPLE_JINJA = _CONTENT + _system(LLAVA_V1_SYSTEM) + (
    "{{ system + '###Human: Hi!###Assistant: Hi there!  How can I help you today?\\n###' }}"
    "{%- for m in loop_messages -%}"
    "{{ ('Human' if m['role'] == 'user' else 'Assistant') + ': ' + content(m) + '###' }}{%- endfor -%}"
)

_MISTRAL_INSTRUCT_JINJA = _CONTENT + _system("") + (
    "{%- for m in loop_messages -%}{%- if m['role'] == 'user' -%}"
    "{%- set text = content(m) -%}{%- if loop.first and system -%}"
    "{%- set text = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + text -%}{%- endif -%}"
    "{{ '[INST] ' + text + ' [/INST]' }}"
    "{%- else -%}{{ ' ' + content(m) + ' ' + eos_token }}{%- endif -%}{%- endfor -%}"
)

_PLAIN_JINJA = _CONTENT + (
    "{%- for m in messages -%}{%- if m['role'] == 'user' -%}"
    "{{ '<image>' if '<image>' in content(m) else '' }}"
    "{%- elif m['role'] == 'assistant' -%}{{ content(m) + '\\n' }}{%- endif -%}{%- endfor -%}"
)

_CHATML_JINJA = _CONTENT + _system("You are a helpful assistant.") + (
    "{{ '<|im_start|>system\\n' + system + '<|im_end|>\\n' }}{%- for m in loop_messages -%}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + content(m) + '<|im_end|>\\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

TEMPLATES: dict[str, Template] = {t.name: t for t in (
    Template("vicuna_v1", _two_sep_jinja(VICUNA_V1_SYSTEM),
             source="LLaVA-1.5 conv_vicuna_v1 (train --version v1; model_vqa --conv-mode vicuna_v1)"),
    Template("llava_v1", _two_sep_jinja(LLAVA_V1_SYSTEM), source="LLaVA conv_llava_v1 ('curious human' wording)"),
    Template("v0", _V0_JINJA, image_first=False, stop_strings=("###",),
             source="LLaVA-Med v1.0.0 training (--version v0, conv_v1_2 roles, _add_speaker_and_signal)"),
    Template("simple", _SIMPLE_JINJA, image_first=False, stop_strings=("###",), answer_prefix="Assistant:",
             source="LLaVA-Med v1.0.0 model_vqa_med --conv-mode simple"),
    Template("mistral_instruct", _MISTRAL_INSTRUCT_JINJA,
             source="LLaVA-Med v1.5 conv_mistral_instruct (SeparatorStyle.LLAMA_2, empty system)"),
    Template("plain", _PLAIN_JINJA, source="LLaVA stage-1 pretraining (conv_llava_plain)"),
    Template("chatml", _CHATML_JINJA, source="ChatML (Qwen/SmolLM style) for a language model without its own template"),
    Template("chat_template", None, source="the language model's own chat template"),
)}


def register_template(template: Template) -> Template:
    """Add a chat format: configs, ``--template``, training and the exported chat template then accept it."""
    from .registry import register

    return register(TEMPLATES, template.name, template)


def template_names():
    """The names accepted by ``template:`` in configs and ``--template`` on the command line, read live."""
    from .registry import RegisteredNames

    return RegisteredNames(TEMPLATES)


def get_template(name: str) -> Template:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ConversationError(f"unknown template {name!r}; choose one of {', '.join(TEMPLATES)}") from None


def chat_template_jinja(name: str) -> str | None:
    """The Jinja saved with a checkpoint trained with template ``name`` (``None``: keep the LM's own)."""
    return get_template(name).jinja


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


def render(
    template: str,
    turns: list[tuple[str, str]],
    tokenizer: Any,
    add_generation_prompt: bool = False,
    system: str | None = None,
) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as text, and the character spans of the replies (the training targets).

    Each reply's span is what rendering it adds after the generation prompt of the turn before, so the
    spans are exactly what the model is asked to produce at inference."""
    spec = get_template(template)
    jinja = spec.jinja if spec.jinja is not None else getattr(tokenizer, "chat_template", None)
    if not jinja:
        raise ConversationError("template 'chat_template' needs a tokenizer that has a chat_template")
    if spec.jinja is None and not system:
        system = None
    messages = [] if system is None else [{"role": "system", "content": system}]
    spans: list[tuple[int, int]] = []
    rendered = ""
    for role, text in turns:
        if role == "assistant":
            before = _render(tokenizer, jinja, messages, True)
            messages.append({"role": role, "content": text})
            after = _render(tokenizer, jinja, messages, False)
            _check_prefix(before, rendered, template)
            _check_prefix(after, before, template)
            spans.append((len(before), len(after)))
            rendered = after
        else:
            messages.append({"role": role, "content": text})
    if add_generation_prompt and turns[-1][0] == "assistant":
        raise ConversationError("cannot add a generation prompt after an assistant turn")
    if turns[-1][0] == "user":
        rendered_tail = _render(tokenizer, jinja, messages, add_generation_prompt)
        _check_prefix(rendered_tail, rendered, template)
        rendered = rendered_tail
    return rendered, spans


def _render(tokenizer, jinja: str, messages, add_generation_prompt: bool) -> str:
    """What ``tokenizer.apply_chat_template(messages, tokenize=False)`` renders, through the same
    transformers function and variables, without its per-call overhead (this runs per turn per record)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template([messages], chat_template=jinja, add_generation_prompt=add_generation_prompt,
                                        **tokenizer.special_tokens_map)
    return rendered[0]


def _check_prefix(text: str, prefix: str, template: str) -> None:
    if not text.startswith(prefix):
        raise ConversationError(
            f"template {template!r} renders earlier turns differently once later turns exist, so reply spans "
            "cannot be located; use one of " + ", ".join(n for n, t in TEMPLATES.items() if t.jinja)
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
    spec = get_template(template)
    turns = normalise_turns(conversations, record_id)
    if has_image:
        turns = _place_image(turns, record_id, spec.image_first)
    elif any(IMAGE_PLACEHOLDER in text for _, text in turns):
        raise ConversationError(f"record {record_id}: has '<image>' in its text but no 'image' field")
    if add_generation_prompt and turns[-1][0] == "assistant":
        turns = turns[:-1]
    text, spans = render(template, turns, tokenizer, add_generation_prompt, system)
    return tokenize_with_labels(text, spans, tokenizer, image_token_id, num_image_tokens)


def tokenize_with_labels(text: str, spans: list[tuple[int, int]], tokenizer: Any, image_token_id: int,
                         num_image_tokens: int) -> Encoded:
    """Tokenize ``text`` as LLaVA's ``tokenizer_image_token`` does: each piece between ``<image>``s in its
    own call (after the tokenizer's own BOS), ``num_image_tokens`` image ids in between; a token is a
    target when the last character it covers lies in one of ``spans``."""
    if not getattr(tokenizer, "is_fast", False):
        raise ConversationError(f"{type(tokenizer).__name__}: training needs a fast tokenizer (token offsets)")
    bos = [] if tokenizer.bos_token and text.startswith(tokenizer.bos_token) else _special_prefix_ids(tokenizer)
    ids, labels = list(bos), [IGNORE_INDEX] * len(bos)
    starts = [a for a, _ in sorted(spans)]
    ends = [b for _, b in sorted(spans)]
    offset = 0
    pieces = text.split(IMAGE_PLACEHOLDER)
    for i, piece in enumerate(pieces):
        if i:
            ids.extend([image_token_id] * num_image_tokens)
            labels.extend([IGNORE_INDEX] * num_image_tokens)
        if piece:
            encoded = tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True)
            for token_id, (first, stop) in zip(encoded["input_ids"], encoded["offset_mapping"]):
                last = offset + max(first, stop - 1)
                k = bisect.bisect_right(starts, last) - 1
                ids.append(token_id)
                labels.append(token_id if stop > first and k >= 0 and last < ends[k] else IGNORE_INDEX)
        offset += len(piece) + len(IMAGE_PLACEHOLDER)
    return Encoded(input_ids=ids, labels=labels, num_images=len(pieces) - 1)


def _place_image(turns: list[tuple[str, str]], record_id: str, front: bool) -> list[tuple[str, str]]:
    """Check the record has one ``<image>``, in the first human turn; LLaVA-1.5 templates move it to the
    front (``<image>\\n`` + text, as its ``preprocess_multimodal``), v0/simple keep it where it is."""
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
    if not front:
        return turns
    first = turns[0][1].replace(IMAGE_PLACEHOLDER, "").strip()
    return [("user", f"{IMAGE_PLACEHOLDER}\n{first}")] + turns[1:]


def _special_prefix_ids(tokenizer: Any) -> list[int]:
    """The ids the tokenizer itself prepends (e.g. Llama's BOS); empty for tokenizers that add none."""
    ids = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and ids[:1] == [bos] else []


def prompt_messages(question: str, has_image: bool, image_first: bool = True) -> list[dict[str, str]]:
    """A single-turn LLaVA conversation for inference and finetuning: ``<image>\\nq`` or ``q\\n<image>``
    (LLaVA-Med v1.0.0's ``model_vqa_med`` puts the question first)."""
    if not has_image:
        value = question
    elif image_first:
        value = f"{IMAGE_PLACEHOLDER}\n{question}"
    else:
        value = f"{question}\n{IMAGE_PLACEHOLDER}"
    return [{"from": "human", "value": value}]
