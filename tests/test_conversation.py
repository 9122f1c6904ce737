"""Templates and label masking: exactly the assistant replies carry labels."""

from __future__ import annotations

import pytest

from medvlm.conversation import (IGNORE_INDEX, TEMPLATES, ConversationError, Template, chat_template_jinja, encode,
                                 register_template, template_names)
from tests.conftest import label_spans as _label_spans

TWO_TURNS = [
    {"from": "human", "value": "What is shown?\n<image>"},
    {"from": "gpt", "value": "An axial CT of the chest."},
    {"from": "human", "value": "Is there an effusion?"},
    {"from": "gpt", "value": "Yes, on the left."},
]


@pytest.fixture(scope="module")
def bundle():
    from medvlm.model import build_tiny

    return build_tiny()


def test_llava_v1_labels_are_exactly_the_gpt_turns(bundle):
    tok = bundle.tokenizer
    enc = encode("llava_v1", TWO_TURNS, tok, bundle.image_token_id, bundle.num_image_tokens, has_image=True)
    spans = [tok.decode(s) for s in _label_spans(enc.labels)]
    assert spans == [" An axial CT of the chest.</s>", " Yes, on the left.</s>"]
    assert enc.input_ids.count(bundle.image_token_id) == bundle.num_image_tokens == 196
    assert enc.input_ids[0] == tok.bos_token_id
    prompt = tok.decode([t for t in enc.input_ids if t != bundle.image_token_id])
    assert "USER: \nWhat is shown? ASSISTANT: An axial CT" in prompt  # <image> moved to the front


def test_plain_template_keeps_only_image_and_caption(bundle):
    tok = bundle.tokenizer
    conv = [{"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": "Chest X-ray."}]
    enc = encode("plain", conv, tok, bundle.image_token_id, bundle.num_image_tokens, has_image=True)
    assert [tok.decode(s) for s in _label_spans(enc.labels)] == ["Chest X-ray.\n"]
    text = tok.decode([t for t in enc.input_ids if t != bundle.image_token_id], skip_special_tokens=True)
    assert "Describe" not in text


def test_generation_prompt_is_the_training_prompt_prefix(bundle):
    tok = bundle.tokenizer
    train = encode("llava_v1", TWO_TURNS[:2], tok, bundle.image_token_id, bundle.num_image_tokens, True)
    infer = encode("llava_v1", TWO_TURNS[:1], tok, bundle.image_token_id, bundle.num_image_tokens, True,
                   add_generation_prompt=True)
    assert train.input_ids[:len(infer.input_ids)] == infer.input_ids
    assert train.labels[len(infer.input_ids)] != IGNORE_INDEX


def test_text_only_record_has_no_image_tokens(bundle):
    conv = [{"from": "human", "value": "Define edema."}, {"from": "gpt", "value": "Swelling from fluid."}]
    enc = encode("llava_v1", conv, bundle.tokenizer, bundle.image_token_id, bundle.num_image_tokens, has_image=False)
    assert bundle.image_token_id not in enc.input_ids and enc.num_images == 0


@pytest.mark.parametrize("conv, has_image, message", [
    ([{"from": "human", "value": "<image> <image> two?"}, {"from": "gpt", "value": "x"}], True, "2 '<image>' tokens"),
    ([{"from": "human", "value": "no token"}, {"from": "gpt", "value": "x"}], True, "no '<image>' token"),
    ([{"from": "gpt", "value": "x"}], False, "must start with a 'human' turn"),
    ([{"from": "human", "value": "a"}, {"from": "robot", "value": "x"}], False, "expected 'human' or 'gpt'"),
    ([{"from": "human", "value": "<image> q"}, {"from": "gpt", "value": "x"}], False, "no 'image' field"),
])
def test_malformed_conversations_fail_naming_the_record(bundle, conv, has_image, message):
    with pytest.raises(ConversationError, match=message) as info:
        encode("llava_v1", conv, bundle.tokenizer, bundle.image_token_id, bundle.num_image_tokens, has_image,
               record_id="rec-42")
    assert "rec-42" in str(info.value) or "human" in message


MULTI_TURN = [
    {"from": "human", "value": "<image>\nWhat is shown?"},
    {"from": "gpt", "value": "An axial CT of the chest."},
    {"from": "human", "value": "Is there an effusion?"},
    {"from": "gpt", "value": "Yes, on the left."},
    {"from": "human", "value": "Which side is larger?"},
]


@pytest.mark.parametrize("template", [n for n, t in TEMPLATES.items() if t.jinja is not None])
@pytest.mark.parametrize("generation", [False, True])
def test_exported_chat_template_gives_the_training_ids(bundle, template, generation):
    """The Jinja saved with a checkpoint, applied the Hugging Face way (HF message parts, then the
    tokenizer on the text), yields the token ids the trainer and evaluator use, for multi-turn chats."""
    tok = bundle.tokenizer
    turns = MULTI_TURN if generation else MULTI_TURN[:4]
    if template == "plain":
        turns = MULTI_TURN[:2] if not generation else MULTI_TURN[:1]
    ours = encode(template, turns, tok, bundle.image_token_id, 1, True, add_generation_prompt=generation)
    messages = [{"role": "user" if t["from"] == "human" else "assistant",
                 "content": [{"type": "text", "text": t["value"]}] if i else
                 [{"type": "image"}, {"type": "text", "text": t["value"].replace("<image>\n", "")}]}
                for i, t in enumerate(turns)]
    text = tok.apply_chat_template(messages, chat_template=chat_template_jinja(template), tokenize=False,
                                   add_generation_prompt=generation)
    assert tok(text)["input_ids"] == ours.input_ids


def test_multi_turn_separator_has_no_space_after_eos(bundle):
    """LLaVA's TWO style: ``a1</s>USER: q2`` (the old exported template wrote ``a1</s> USER: q2``)."""
    text = bundle.tokenizer.apply_chat_template(
        [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}],
        chat_template=chat_template_jinja("vicuna_v1"), tokenize=False, add_generation_prompt=True)
    assert text.endswith(" USER: q1 ASSISTANT: a1</s>USER: q2 ASSISTANT:")
    assert text.startswith("A chat between a curious user and")


def test_unknown_template_names_the_choices(bundle):
    with pytest.raises(ConversationError, match="vicuna_v1.*mistral_instruct"):
        encode("vicuna", TWO_TURNS, bundle.tokenizer, bundle.image_token_id, 1, True)


def test_v0_keeps_the_image_where_the_record_puts_it(bundle):
    tok = bundle.tokenizer
    enc = encode("v0", TWO_TURNS[:2], tok, bundle.image_token_id, 1, True)
    text = tok.decode(enc.input_ids)
    assert "### Human: What is shown?\n<image>\n### Assistant: An axial CT" in text
    assert [tok.decode(s) for s in _label_spans(enc.labels)] == [" An axial CT of the chest.\n### "]


def test_template_registry_lists_the_reference_templates():
    assert {"vicuna_v1", "llava_v1", "v0", "simple", "mistral_instruct", "plain", "chat_template"} <= set(
        template_names())


TOY_JINJA = ("{%- for m in messages -%}{%- if m['role'] == 'user' -%}{{ 'Q: ' + m['content'] + '\\n' }}"
             "{%- else -%}{{ 'A: ' + m['content'] + eos_token + '\\n' }}{%- endif -%}{%- endfor -%}"
             "{%- if add_generation_prompt -%}{{ 'A:' }}{%- endif -%}")


def test_a_toy_template_is_one_registered_unit(tmp_path, colour_set, registered):
    """Registered once, a template is accepted by config validation, trained with, and saved as the
    checkpoint's chat template, which renders the ids training used."""
    from transformers import AutoTokenizer

    from medvlm.trainer import Trainer
    from tests.conftest import stage_config

    registered(register_template, TEMPLATES, Template("toy", TOY_JINJA, source="a test"))
    data, images = colour_set
    result = Trainer(stage_config(data, images, tmp_path / "out", template="toy", max_steps=1)).run()
    saved = AutoTokenizer.from_pretrained(result.checkpoint)
    assert saved.chat_template == TOY_JINJA
    ours = encode("toy", TWO_TURNS, saved, saved.convert_tokens_to_ids("<image>"), 1, True)
    messages = [{"role": "user", "content": "<image>\nWhat is shown?"}, *({"role": "user" if t["from"] == "human" else
                "assistant", "content": t["value"]} for t in TWO_TURNS[1:])]
    assert saved.apply_chat_template(messages, tokenize=False).startswith("Q: <image>\nWhat is shown?\nA: An axial")
    assert saved(saved.apply_chat_template(messages, tokenize=False))["input_ids"] == ours.input_ids
    with pytest.raises(ValueError, match="registered already"):
        register_template(Template("toy", None))
