"""Templates and label masking: exactly the assistant replies carry labels."""

from __future__ import annotations

import pytest

from medvlm.conversation import IGNORE_INDEX, ConversationError, encode

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


def _label_spans(labels: list[int]) -> list[list[int]]:
    spans, current = [], []
    for label in labels:
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            current.append(label)
    return spans + ([current] if current else [])


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
