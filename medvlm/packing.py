"""Shared-image packing: the questions about one image trained as one sequence, exactly.

In a VQA finetune many questions share an image (VQA-RAD ~11 per image, SLAKE ~11, PathVQA ~6.6), and each
unpacked question costs the language model the whole prompt prefix again: the system prompt and the
image's tokens (576 for CLIP-L/336) before its ~20-40 question and answer tokens. A packed row holds

    prefix (shared tokens, up to and including the image tokens) | segment 1 | segment 2 | ... | padding

where segment *k* is the rest of question *k*'s conversation (question, answer, later turns). Three things
make every question's logits exactly those it gets alone:

- **attention**: a token of segment *k* sees the prefix and the earlier tokens of segment *k* only (a 4D
  mask built by transformers' own mask interface, ``masking_utils``: a boolean mask for SDPA, an additive
  one for eager, a ``BlockMask`` for FlexAttention); padding sees only the prefix and padding;
- **positions**: every segment's position ids continue from the prefix's end, as if it followed it alone;
- **loss**: each supervised token of each question is predicted from the same position as unpacked (the
  last prefix position predicts the first token of every segment, so it may serve several targets); the
  LM head runs at those positions only (``logits_to_keep``) and the loss is the mean over the same
  (logit, target) pairs as unpacked training over the same questions.

Questions whose prompts do not share a prefix ending in the image (text-only records, a different system
prompt) get a row each, unchanged. ``PackedCollator`` builds the rows; ``packed_loss`` runs the model and
the loss; the trainer switches between it and the unpacked path with ``pack_by_image`` (``data.py``'s
``ImageGroupedBatchSampler`` forms the batches from images). Nothing is written to disk.
"""

from __future__ import annotations

from typing import Callable

import torch

from .config import ConfigError
from .conversation import IGNORE_INDEX
from .generate import shared_prefix_length

PREFIX, PADDING = 0, -1          # segment ids; questions are numbered from 1 within a row
MASKABLE = ("sdpa", "eager", "flex_attention")   # attention implementations that take a custom mask


class PackingError(ConfigError):
    """Packing cannot run with this model or data; the message says what to change."""


def check_packable(model) -> None:
    """Refuse attention implementations that cannot take a custom 4D mask (FlashAttention-2/3 take only
    padding masks or packed sequences that share nothing)."""
    implementation = _text_config(model)._attn_implementation
    if implementation not in MASKABLE:
        raise PackingError(f"pack_by_image needs attn_implementation sdpa, eager or flex_attention (a shared-prefix "
                           f"mask); this model uses {implementation!r}: load it with attn_implementation='sdpa' "
                           "or set pack_by_image: false")


def _text_config(model):
    while hasattr(model, "module"):    # DDP / DeepSpeed engine wrappers (their own `config` is not the model's)
        model = model.module
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.config.text_config


# ---------------------------------------------------------------------------------------------- layout
def pack_group(rows: list[list[int]], labels: list[list[int]], image_token_id: int) -> dict:
    """One packed row for questions whose token rows share a prefix ending in the image tokens.

    Returns ``input_ids``, ``segment_ids``, ``position_ids`` (lists) and ``pairs``: one ``(position, target)``
    per supervised token of every question, in question order, with ``position`` in the packed row.
    ``rows`` of one question, or rows without such a prefix, need ``len(rows) == 1`` (a row of its own)."""
    prefix = shared_prefix_length(rows, image_token_id) if len(rows) > 1 else 0
    if prefix is None:
        raise PackingError("questions packed together must share the prompt up to and including the image")
    input_ids, segment_ids = list(rows[0][:prefix]), [PREFIX] * prefix
    position_ids = list(range(prefix))
    pairs = []
    for number, (row, row_labels) in enumerate(zip(rows, labels), 1):
        start = len(input_ids)
        input_ids.extend(row[prefix:])
        segment_ids.extend([number] * (len(row) - prefix))
        position_ids.extend(range(prefix, len(row)))
        for p in range(len(row) - 1):            # position p predicts token p + 1 (the causal shift)
            target = row_labels[p + 1]
            if target != IGNORE_INDEX:
                pairs.append((p if p < prefix else start + p - prefix, target))
    return {"input_ids": input_ids, "segment_ids": segment_ids, "position_ids": position_ids, "pairs": pairs}


def group_by_prefix(rows: list[list[int]], image_keys: list, image_token_id: int) -> list[list[int]]:
    """Indices of ``rows`` grouped so each group packs into one row: same image and the same tokens up to
    and including its image tokens; text-only rows and rows that share nothing stay alone. Groups are in
    first-seen order, questions keep their order within a group."""
    groups: dict = {}
    for index, (row, key) in enumerate(zip(rows, image_keys)):
        image_positions = [p for p, token in enumerate(row) if token == image_token_id]
        if key is None or not image_positions:
            groups[("alone", index)] = [index]
            continue
        prefix = tuple(row[:image_positions[-1] + 1])
        groups.setdefault((key, prefix), []).append(index)
    return list(groups.values())


class PackedCollator:
    """The packed counterpart of ``data.Collator``: items of one batch → one row per image (per shared
    prefix), right-padded, with segment ids, position ids and the loss pairs. Keeps the unpacked batch's
    keys (``input_ids``, ``attention_mask``, ``pixel_values`` one per row with an image, ``image_keys`` /
    ``missing`` for the feature cache, token counts, ``ids``, ``skipped``); ``num_questions`` counts the
    questions (rows count images)."""

    def __init__(self, pad_token_id: int, image_token_id: int):
        self.pad_token_id, self.image_token_id = pad_token_id, image_token_id

    def __call__(self, items: list[dict]) -> dict:
        skipped = [i["skip"] for i in items if "skip" in i]
        items = [i for i in items if "skip" not in i]
        if not items:
            return {"skipped": skipped, "empty": True}
        rows = [i["input_ids"].tolist() for i in items]
        keys = [i.get("image") for i in items]     # the image file's path; None for text-only records
        groups = group_by_prefix(rows, keys, self.image_token_id)
        packed = [pack_group([rows[j] for j in g], [items[j]["labels"].tolist() for j in g], self.image_token_id)
                  for g in groups]
        batch = self._pad(packed)
        firsts = [items[g[0]] for g in groups]              # one image per row: its first question's
        images = [i["pixel_values"] for i in firsts if i["pixel_values"] is not None]
        keyed = [i for i in firsts if "image_key" in i]
        if keyed:
            batch["image_keys"] = [i["image_key"] for i in keyed]
            batch["missing"] = [j for j, i in enumerate(keyed) if i["pixel_values"] is not None]
        batch.update(pixel_values=torch.stack(images) if images else None, ids=[i["id"] for i in items],
                     skipped=skipped, num_questions=len(items))
        return batch

    def _pad(self, packed: list[dict]) -> dict:
        longest = max(len(p["input_ids"]) for p in packed)
        shape = (len(packed), longest)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        segment_ids = torch.full(shape, PADDING, dtype=torch.long)
        position_ids = torch.zeros(shape, dtype=torch.long)
        positions, targets = [], []
        for row, p in enumerate(packed):
            n = len(p["input_ids"])
            input_ids[row, :n] = torch.tensor(p["input_ids"])
            segment_ids[row, :n] = torch.tensor(p["segment_ids"])
            position_ids[row, :n] = torch.tensor(p["position_ids"])
            positions.extend(row * longest + position for position, _ in p["pairs"])
            targets.extend(target for _, target in p["pairs"])
        keep = torch.zeros(shape, dtype=torch.bool)
        keep.view(-1)[torch.tensor(positions, dtype=torch.long)] = True
        # logits_to_keep=keep returns the kept positions in row-major order: where each pair's logit lands
        order = torch.cumsum(keep.view(-1), 0) - 1
        real = int((segment_ids != PADDING).sum())
        return {"input_ids": input_ids, "attention_mask": (segment_ids != PADDING).long(), "segment_ids": segment_ids,
                "position_ids": position_ids, "loss_keep": keep,
                "loss_index": order[torch.tensor(positions, dtype=torch.long)],
                "loss_targets": torch.tensor(targets, dtype=torch.long),
                "num_tokens": input_ids.numel(), "num_pad_tokens": input_ids.numel() - real}


# ---------------------------------------------------------------------------------------------- model side
def shared_prefix_overlay(segment_ids: torch.Tensor) -> Callable:
    """A ``masking_utils`` mask function: a query sees a key of the shared prefix or of its own segment
    (combined with the causal mask function, which orders them)."""

    def inner_mask(batch_idx, head_idx, q_idx, kv_idx):
        kv_segment = segment_ids[batch_idx, kv_idx]
        return (kv_segment == PREFIX) | (kv_segment == segment_ids[batch_idx, q_idx])

    return inner_mask


def packed_attention_mask(model, segment_ids: torch.Tensor, dtype: torch.dtype):
    """The 4D mask the language model's attention implementation takes (transformers passes a 4D mask
    through unchanged): built by transformers' mask interface from the causal and shared-prefix rules."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, and_masks, causal_mask_function

    check_packable(model)
    config = _text_config(model)
    rows, length = segment_ids.shape
    make = ALL_MASK_ATTENTION_FUNCTIONS[config._attn_implementation]
    return make(batch_size=rows, q_length=length, kv_length=length,
                mask_function=and_masks(causal_mask_function, shared_prefix_overlay(segment_ids)),
                attention_mask=None, allow_is_causal_skip=False, dtype=dtype, device=segment_ids.device, config=config)


def packed_loss(model, batch: dict, inputs: dict, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The causal-LM loss of a packed batch: the mean cross-entropy (fp32 logits) over every question's
    supervised tokens, the LM head at those positions only. ``inputs`` is ``{"input_ids", "pixel_values"}``
    or ``{"inputs_embeds"}`` (features from the cache); ``dtype`` the compute dtype for an additive mask."""
    mask = packed_attention_mask(model, batch["segment_ids"], dtype)
    outputs = model(**inputs, attention_mask=mask, position_ids=batch["position_ids"],
                    logits_to_keep=batch["loss_keep"], use_cache=False)
    logits = outputs.logits.float()[batch["loss_index"]]
    return torch.nn.functional.cross_entropy(logits, batch["loss_targets"])


def choose_packing(setting: bool | str, images: list[str | None], model, min_per_image: float = 1.5) -> bool:
    """``pack_by_image``: ``true`` packs (refusing a model whose attention takes no custom mask), ``false``
    does not, ``auto`` packs when the records with an image average ≥ ``min_per_image`` questions per
    distinct image and the model can."""
    if setting is True:
        check_packable(model)
        return True
    if setting != "auto":
        return False
    with_image = [image for image in images if image is not None]
    if not with_image or len(with_image) / len(set(with_image)) < min_per_image:
        return False
    return _text_config(model)._attn_implementation in MASKABLE
