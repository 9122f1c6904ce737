"""Derive the golden token ids and labels from the reference algorithms (run once; output is committed).

This is a from-reading re-implementation of LLaVA's (haotian-liu/LLaVA c121f04, llava/train/train.py,
llava/mm_utils.py, llava/conversation.py) and LLaVA-Med's (microsoft/LLaVA-Med v1.0.0,
llava/train/train.py and llava/eval/model_vqa_med.py) prompt building and label masking. It imports
nothing from medvlm, so the golden data does not depend on the code it checks. The tokenizer is the
SentencePiece model Mistral-7B ships (``mistral_common/data/tokenizer.model.v1``) with the semantics of
the slow ``LlamaTokenizer`` those repositories used: ``legacy=True`` (every piece of text between special
tokens encoded with SentencePiece's dummy-prefix space; Mistral's and LLaMA-1's tokenizers) and, for the
``non_legacy`` cases, ``legacy=False`` (a space only at the start of a call; Vicuna v1.5's, hence
LLaVA-1.5's), with preprocess_v1's ``not tokenizer.legacy`` length correction.

    .venv/bin/python tests/data/golden/derive_reference.py   # rewrites tests/data/golden/templates.json
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import mistral_common
import sentencepiece
from sentencepiece import sentencepiece_model_pb2

IGNORE, IMAGE = -100, -200  # LLaVA's IGNORE_INDEX and IMAGE_TOKEN_INDEX
SP = sentencepiece.SentencePieceProcessor(
    model_file=str(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"))
BOS, EOS = SP.bos_id(), SP.eos_id()
_PROTO = sentencepiece_model_pb2.ModelProto()
_PROTO.ParseFromString(SP.serialized_model_proto())
_PROTO.normalizer_spec.add_dummy_prefix = False          # what LlamaTokenizer(legacy=False) loads
SP_NO_PREFIX = sentencepiece.SentencePieceProcessor(model_proto=_PROTO.SerializeToString())
LEGACY = True                                             # switched by main() for the non_legacy cases
CURIOUS_HUMAN = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.")
CURIOUS_USER = ("A chat between a curious user and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the user's questions.")

CONVERSATIONS = {
    "single_image_last": ([{"from": "human", "value": "What modality is this?\n<image>"},
                           {"from": "gpt", "value": "A chest X-ray."}], True),
    "multi_image_first": ([{"from": "human", "value": "<image>\nDescribe the lesion."},
                           {"from": "gpt", "value": "A 2 cm nodule in the right upper lobe."},
                           {"from": "human", "value": "Is it calcified?"},
                           {"from": "gpt", "value": "No."}], True),
    "multi_text_only": ([{"from": "human", "value": "How many lobes does the right lung have?"},
                         {"from": "gpt", "value": "3"},
                         {"from": "human", "value": "And the left?"},
                         {"from": "gpt", "value": "Two: upper and lower."}], False),
}


def tok(text: str) -> list[int]:
    """``tokenizer(text).input_ids`` of a slow Llama tokenizer (legacy or not, per ``LEGACY``)."""
    ids = [BOS]
    pieces = re.split(r"(</s>)", text if LEGACY else "\u2581" + text)
    if not LEGACY and pieces[0] == "\u2581" and len(pieces) > 1:
        pieces = pieces[1:]                     # a call that starts with a special token loses the lone space
    for piece in pieces:
        if piece == "</s>":
            ids.append(EOS)
        elif piece and LEGACY:
            ids += SP.encode(piece)
        elif piece and piece.startswith("\u2581"):   # the unk trick of LlamaTokenizer._tokenize
            unk = len(SP_NO_PREFIX.encode("<unk>"))
            ids += SP_NO_PREFIX.encode("<unk>" + piece)[unk:]
        elif piece:
            ids += SP_NO_PREFIX.encode(piece)
    return ids


def tok_image(prompt: str) -> list[int]:
    """llava.mm_utils.tokenizer_image_token: chunks around <image>, BOS kept once, IMAGE between."""
    chunks = [tok(c) for c in prompt.split("<image>")]
    ids = [chunks[0][0]]
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(IMAGE)
        ids += chunk[1:]
    return ids


def tokenize(text: str, has_image: bool) -> list[int]:
    return tok_image(text) if has_image else tok(text)


def image_to_front(source):
    """LLaVA's preprocess_multimodal (LLaVA-1.5 code): ``<image>\\n`` + the rest, stripped."""
    out = []
    for s in source:
        v = s["value"]
        if "<image>" in v:
            v = ("<image>\n" + v.replace("<image>", "").strip()).strip()
        out.append({"from": s["from"], "value": v})
    return out


def two_sep_prompt(system, source, generation=False):
    """Conversation.get_prompt for SeparatorStyle.TWO (sep ' ', sep2 '</s>', roles USER/ASSISTANT)."""
    ret = system + " "
    for i, s in enumerate(source):
        role = "USER" if s["from"] == "human" else "ASSISTANT"
        ret += role + ": " + s["value"] + (" " if i % 2 == 0 else "</s>")
    return ret + ("ASSISTANT:" if generation else "")


def llama2_prompt(system, source):
    """Conversation.get_prompt for SeparatorStyle.LLAMA_2 with sep '' and sep2 '</s>' (mistral_instruct)."""
    ret = ""
    for i, s in enumerate(source):
        msg = s["value"]
        if i == 0 and system:
            msg = f"<<SYS>>\n{system}\n<</SYS>>\n\n" + msg
        ret += f"[INST] {msg} [/INST]" if i % 2 == 0 else " " + msg + " </s>"
    return ret


def mask_rounds(conversation, ids, has_image, sep, sep2="</s>"):
    """The masking loop shared by preprocess_v1 and preprocess_llama_2 (legacy tokenizer branch)."""
    target = list(ids)
    cur = 1
    target[:cur] = [IGNORE] * cur
    for i, rou in enumerate(conversation.split(sep2)):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len = len(tokenize(rou, has_image))
        instruction_len = len(tokenize(parts[0], has_image)) - 2
        if i != 0 and not LEGACY and sep2 == "</s>" and sep == " ASSISTANT: ":   # preprocess_v1 only
            round_len -= 1
            instruction_len -= 1
        target[cur:cur + instruction_len] = [IGNORE] * instruction_len
        cur += round_len
    target[cur:] = [IGNORE] * (len(target) - cur)
    assert cur == len(ids), f"reference reports a tokenization mismatch: {cur} vs {len(ids)}"
    return target


def preprocess_v1(system, source, has_image):
    source = image_to_front(source) if has_image else source
    conversation = two_sep_prompt(system, source)
    ids = tokenize(conversation, has_image)
    return ids, mask_rounds(conversation, ids, has_image, " ASSISTANT: ")


def preprocess_mistral(source, has_image):
    source = image_to_front(source) if has_image else source
    conversation = llama2_prompt("", source)
    ids = tokenize(conversation, has_image)
    return ids, mask_rounds(conversation, ids, has_image, "[/INST] ")


def preprocess_plain(source):
    conversation = "<image>" + source[1]["value"] + "\n"
    ids = tok_image(conversation)
    n = len(tok_image("<image>"))
    return ids, [IGNORE] * n + ids[n:]


def preprocess_v0(source, has_image):
    """LLaVA-Med v1.0.0 preprocess (version v0): header, '### Role: value\\n' sentences, '### ' tail;
    _mask_targets with the per-sentence lengths of separately tokenized strings. The image stays in
    place (LLaVA-Med v1.0.0's preprocess_multimodal does not move it)."""
    header = f"{CURIOUS_HUMAN}\n\n"
    sentences = ["### " + ("Human" if s["from"] == "human" else "Assistant") + ": " + s["value"] + "\n"
                 for s in source]
    conversation = header + "".join(sentences) + "### "
    ids = tokenize(conversation, has_image)
    target = list(ids)
    lens = [len(tokenize(t, has_image)) for t in [header] + sentences]
    cur = lens[0]
    target[:cur] = [IGNORE] * cur
    for length, s in zip(lens[1:], source):
        if s["from"] == "human":
            stop = min(cur + length, len(target))
            target[cur + 2:stop] = [IGNORE] * max(0, stop - (cur + 2))
        cur += length
    return ids, target[:len(ids)]


def simple_prompt(question: str, has_image: bool) -> str:
    """LLaVA-Med v1.0.0 model_vqa_med with --conv-mode simple: question, then '\\n' and the image;
    SeparatorStyle.SINGLE with the one-shot 'Hi!' exchange; no 'Assistant:' appended."""
    qs = question + ("\n<image>" if has_image else "")
    prompt = (CURIOUS_HUMAN + "###" + "Human: Hi!###" + "Assistant: Hi there!  How can I help you today?\n###"
              + "Human: " + qs + "###")
    return prompt


def main() -> None:
    golden: dict = {"tokenizer": "mistral_common/data/tokenizer.model.v1 (legacy Llama semantics)",
                    "image_id": IMAGE, "ignore_index": IGNORE, "conversations": {}, "cases": []}
    for name, (conv, has_image) in CONVERSATIONS.items():
        golden["conversations"][name] = {"turns": conv, "has_image": has_image}
        cases = {
            "vicuna_v1": preprocess_v1(CURIOUS_USER, conv, has_image),
            "llava_v1": preprocess_v1(CURIOUS_HUMAN, conv, has_image),
            "mistral_instruct": preprocess_mistral(conv, has_image),
            "v0": preprocess_v0(conv, has_image),
        }
        if has_image and len(conv) == 2:
            cases["plain"] = preprocess_plain(conv)
        for template, (ids, labels) in cases.items():
            golden["cases"].append({"template": template, "conversation": name, "kind": "train",
                                    "input_ids": ids, "labels": labels})
        first = image_to_front(conv[:1]) if has_image else conv[:1]
        question = conv[0]["value"].replace("<image>", "").strip()
        prompts = {"vicuna_v1": two_sep_prompt(CURIOUS_USER, first, generation=True),
                   "mistral_instruct": llama2_prompt("", first), "simple": simple_prompt(question, has_image)}
        for template, text in prompts.items():
            golden["cases"].append({"template": template, "conversation": name, "kind": "prompt", "text": text,
                                    "input_ids": tokenize(text, has_image)})
    global LEGACY
    LEGACY = False
    for name, (conv, has_image) in CONVERSATIONS.items():
        for template, system in (("vicuna_v1", CURIOUS_USER), ("llava_v1", CURIOUS_HUMAN)):
            ids, labels = preprocess_v1(system, conv, has_image)
            golden["cases"].append({"template": template, "conversation": name, "kind": "train",
                                    "tokenizer": "non_legacy", "input_ids": ids, "labels": labels})
        first = image_to_front(conv[:1]) if has_image else conv[:1]
        text = two_sep_prompt(CURIOUS_USER, first, generation=True)
        golden["cases"].append({"template": "vicuna_v1", "conversation": name, "kind": "prompt",
                                "tokenizer": "non_legacy", "text": text, "input_ids": tokenize(text, has_image)})
    LEGACY = True
    out = Path(__file__).with_name("templates.json")
    out.write_text(json.dumps(golden, indent=1) + "\n")
    print(f"wrote {out}: {len(golden['cases'])} cases")


if __name__ == "__main__":
    main()
