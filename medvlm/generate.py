"""Batched generation for evaluation and ``medvlm chat``.

Prompts are built by the same template code as training (``conversation.encode`` with a generation
prompt) and decoded greedily with the KV cache, a batch at a time; each sequence stops at its own
end-of-sequence token (``generate`` keeps finished rows padded while others continue). Each distinct
image is decoded once and goes through the vision tower once per call (``features.select_features``),
however many questions ask about it, and questions about one image share one prefill of the prompt up
to the image (``shared_prefix_length``); the projected features enter the language model as embeddings.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
from PIL import Image

from .conversation import encode, prompt_messages
from .data import preprocess_image
from .features import embeds_with_image_features, select_features
from .imaging import load_image


def prompt_ids(bundle, question: str, has_image: bool, template: str | None = None,
               system: str | None = None, image_first: bool = True) -> list[int]:
    """Token ids of a single-turn prompt ending where the assistant's answer begins."""
    messages = prompt_messages(question, has_image, image_first)
    encoded = encode(template or bundle.template, messages, bundle.tokenizer,
                     bundle.image_token_id, bundle.num_image_tokens, has_image, add_generation_prompt=True,
                     system=system)
    return encoded.input_ids


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, longest - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, longest - len(row):] = 1
    return ids, mask


def _stop_ids(bundle) -> list[int]:
    """EOS plus the template's end-of-turn token when the tokenizer has one (ChatML's ``<|im_end|>``)."""
    tok = bundle.tokenizer
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    for marker in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
        token_id = tok.convert_tokens_to_ids(marker)
        if isinstance(token_id, int) and token_id != tok.unk_token_id and token_id >= 0:
            ids.add(token_id)
    return sorted(ids)


class PixelLoader:
    """Pixel values for images by path: each distinct file is decoded once per call (VQA sets ask several
    questions about one image), and the next batch's files are decoded on worker threads while the
    current batch generates (pydicom, Pillow and numpy release the interpreter lock while they work)."""

    def __init__(self, bundle, image_aspect_ratio: str = "pad", workers: int | None = None):
        from concurrent.futures import ThreadPoolExecutor

        self.bundle, self.aspect = bundle, image_aspect_ratio
        self.pool = ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1))
        self.futures: dict = {}

    def prefetch(self, images) -> None:
        for image in images:
            key = self._key(image)
            if key is not None and key not in self.futures:
                self.futures[key] = self.pool.submit(_pixels, self.bundle, image, self.aspect)

    def get(self, image) -> torch.Tensor:
        key = self._key(image)
        if key is None:
            return _pixels(self.bundle, image, self.aspect)
        self.prefetch([image])
        return self.futures[key].result()

    @staticmethod
    def _key(image):
        return str(image) if isinstance(image, (str, os.PathLike)) else None

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


@torch.no_grad()
def generate_answers(bundle, questions: Sequence[str], images: Sequence[Image.Image | str | os.PathLike | torch.Tensor | None],
                     max_new_tokens: int = 64, batch_size: int = 16, template: str | None = None,
                     system: str | None = None, image_aspect_ratio: str = "pad", progress: bool = False,
                     feature_cache=None, share_prefix: bool = True, generation: dict | None = None,
                     image_first: bool = True) -> list[str]:
    """Answers for ``questions`` (one image or ``None`` each), ``batch_size`` at a time, in order: greedy
    unless ``generation`` overrides ``model.generate`` arguments (sampling, stop strings; see
    downstream/protocols.py); ``image_first=False`` puts the image after the question.

    Questions about the same image go into the same batch. With ``share_prefix`` (exact, on by default),
    when every prompt of a batch starts with the same tokens up to and including its image tokens (the
    system prompt and the image, as in LLaVA's templates), that prefix runs through the language model
    once per distinct image and every question about the image reuses its key/value cache: only the
    question tokens are prefilled per question.

    ``feature_cache`` (a ``features.FeatureCache``, e.g. on disk) keeps vision features across calls:
    evaluating again — another checkpoint of the same curriculum, whose vision tower is frozen and so
    identical — then decodes no image at all."""
    if len(questions) != len(images):
        raise ValueError(f"{len(questions)} questions but {len(images)} images")
    bundle.model.eval()
    run = _Generation(bundle, image_aspect_ratio, feature_cache, max_new_tokens, share_prefix, generation)
    order = _grouped_by_image(images)
    answers: list[str] = [""] * len(questions)
    starts = range(0, len(order), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="generate", unit="batch")
    try:
        for start in starts:
            batch = order[start:start + batch_size]
            run.prefetch([images[i] for i in order[start:start + 2 * batch_size]])   # this batch's and the next's
            rows = [prompt_ids(bundle, questions[i], images[i] is not None, template, system, image_first)
                    for i in batch]
            for i, answer in zip(batch, run.answers(rows, [images[i] for i in batch])):
                answers[i] = answer
    finally:
        run.loader.close()
    return answers


def _image_key(image):
    """Identity of an image within one call: its path, or the object itself (alive for the call)."""
    return str(image) if isinstance(image, (str, os.PathLike)) else ("object", id(image))


def _grouped_by_image(images) -> list[int]:
    """Question indices with the questions about one image next to each other (first-seen image order);
    text-only questions last."""
    first_seen: dict = {}
    for index, image in enumerate(images):
        if image is not None:
            first_seen.setdefault(_image_key(image), index)
    # a stable sort: questions keep their order within an image's group and among the text-only ones
    return sorted(range(len(images)), key=lambda i: (1, i) if images[i] is None else (0, first_seen[_image_key(images[i])]))


def shard_by_image(images, rank: int, world_size: int) -> list[int]:
    """The question indices rank ``rank`` of ``world_size`` answers in a data-parallel evaluation: whole
    images (all questions about one image on one rank, so its decode, vision features and shared prefix
    are computed once), contiguous runs of the image-grouped order cut where the question count reaches
    each rank's equal share; text-only questions are spread the same way, one by one."""
    order = _grouped_by_image(images)
    groups: list[list[int]] = []
    for index in order:
        same = groups and images[index] is not None and images[groups[-1][0]] is not None \
            and _image_key(images[index]) == _image_key(images[groups[-1][0]])
        if same:
            groups[-1].append(index)
        else:
            groups.append([index])
    mine, done = [], 0
    for group in groups:
        # the group goes to the rank whose share its middle question falls in
        owner = min(world_size - 1, (2 * done + len(group)) * world_size // (2 * max(1, len(images))))
        if owner == rank:
            mine.extend(group)
        done += len(group)
    return sorted(mine)


def shared_prefix_length(rows: list[list[int]], image_token_id: int) -> int | None:
    """Length of the token prefix that ends with the last image token and that every row shares, or
    ``None`` when the rows have no such prefix (no image, prefixes differ, or nothing after it)."""
    first = rows[0]
    image_positions = [p for p, token in enumerate(first) if token == image_token_id]
    if not image_positions:
        return None
    length = image_positions[-1] + 1
    if any(len(row) <= length or row[:length] != first[:length] for row in rows):
        return None
    return length


class _Generation:
    """One ``generate_answers`` call: its pixel loader, the vision features of the images seen so far and
    the prefix key/value caches of the current batch's images."""

    def __init__(self, bundle, image_aspect_ratio: str, feature_cache, max_new_tokens: int, share_prefix: bool,
                 generation: dict | None = None):
        self.bundle, self.model = bundle, bundle.model
        self.base = bundle.base_model
        self.device = next(self.model.parameters()).device
        self.dtype = next(p for p in self.model.parameters() if p.is_floating_point()).dtype
        self.pad_id = bundle.tokenizer.pad_token_id
        self.generate_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                    eos_token_id=_stop_ids(bundle), pad_token_id=self.pad_id, use_cache=True)
        self.generate_kwargs.update(generation or {})
        self.loader = PixelLoader(bundle, image_aspect_ratio)
        self.feature_cache, self.share_prefix = feature_cache, share_prefix
        self.features_by_image: dict = {}
        self.prefix_cache: dict = {}

    def answers(self, rows: list[list[int]], images: list) -> list[str]:
        prefix = None
        if self.share_prefix and all(image is not None for image in images):
            prefix = shared_prefix_length(rows, self.base.config.image_token_id)
        out = self._from_shared_prefix(rows, images, prefix) if prefix else self._left_padded(rows, images)
        return [t.strip() for t in self.bundle.tokenizer.batch_decode(out, skip_special_tokens=True)]

    def _left_padded(self, rows, images) -> torch.Tensor:
        ids, mask = _left_pad(rows, self.pad_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        with_image = [image for image in images if image is not None]
        if not with_image:
            return self.model.generate(input_ids=ids, attention_mask=mask, **self.generate_kwargs)[:, ids.shape[1]:]
        embeds = embeds_with_image_features(self.model, ids, self.features(with_image))
        return self.model.generate(inputs_embeds=embeds, attention_mask=mask, **self.generate_kwargs)

    def _from_shared_prefix(self, rows, images, length: int) -> torch.Tensor:
        """Prefill the shared prefix once per distinct image, then generate every row from a copy of its
        image's cache. Each row is laid out as ``prefix, padding, question``: the padding sits between the
        cached prefix and the question, masked out, and ``generate`` numbers positions by the attention
        mask's running count, so every token keeps the position it has in the unpadded prompt."""
        from transformers import DynamicCache

        keys = [_image_key(image) for image in images]
        prefix_ids = torch.tensor(rows[0][:length], device=self.device)
        missing = list(dict.fromkeys(k for k in keys if k not in self.prefix_cache))
        if missing:
            by_key = dict(zip(keys, images))
            embeds = embeds_with_image_features(self.model, prefix_ids.expand(len(missing), -1),
                                                self.features([by_key[k] for k in missing]))
            cache = self.base.model.language_model(inputs_embeds=embeds, use_cache=True).cache
            layers = [(layer_keys, layer_values) for layer_keys, layer_values, *_ in cache]
            for row, key in enumerate(missing):
                self.prefix_cache[key] = [(k[row:row + 1], v[row:row + 1]) for k, v in layers]
        self.prefix_cache = {k: self.prefix_cache[k] for k in dict.fromkeys(keys)}  # keep this batch's only
        per_row = [self.prefix_cache[k] for k in keys]
        cache = DynamicCache(ddp_cache_data=[(torch.cat([r[layer][0] for r in per_row]),
                                              torch.cat([r[layer][1] for r in per_row]))
                                             for layer in range(len(per_row[0]))], config=self.base.config)
        questions, question_mask = _left_pad([row[length:] for row in rows], self.pad_id)
        ids = torch.cat([prefix_ids.expand(len(rows), -1), questions.to(self.device)], dim=1)
        mask = torch.cat([torch.ones(len(rows), length, dtype=torch.long), question_mask], dim=1).to(self.device)
        out = self.model.generate(input_ids=ids, attention_mask=mask, cache=cache, **self.generate_kwargs)
        return out[:, ids.shape[1]:]

    def prefetch(self, images) -> None:
        """Start decoding the images whose features are neither computed nor in ``feature_cache``."""
        self.loader.prefetch(image for image in images if image is not None
                             and _image_key(image) not in self.features_by_image
                             and not self._has_stored_features(image))

    def _has_stored_features(self, image) -> bool:
        stored = self._stored_key(image)
        return stored is not None and self.feature_cache.has(stored)

    def features(self, images) -> torch.Tensor:
        """Selected vision features for ``images`` (stacked); each distinct image goes through the vision
        tower once per call — the new ones of a batch in one forward — or comes from ``feature_cache``."""
        keys = [_image_key(image) for image in images]
        by_key = dict(zip(keys, images))
        todo = []
        for key in dict.fromkeys(keys):
            if key in self.features_by_image:
                continue
            stored = self._stored_key(by_key[key])
            features = self.feature_cache.get(stored) if stored is not None else None
            if features is None:
                todo.append((key, stored))
            else:
                self.features_by_image[key] = features.to(device=self.device, dtype=self.dtype)
        if todo:
            pixels = torch.stack([self.loader.get(by_key[key]) for key, _ in todo]).to(self.device, self.dtype)
            for (key, stored), features in zip(todo, select_features(self.model, pixels)):
                if stored is not None:
                    self.feature_cache.put(stored, features)
                self.features_by_image[key] = features
        return torch.stack([self.features_by_image[key] for key in keys])

    def _stored_key(self, image):
        if self.feature_cache is None or not isinstance(image, (str, os.PathLike)):
            return None
        return self.feature_cache.key_for(image)


def _pixels(bundle, image, image_aspect_ratio: str) -> torch.Tensor:
    if isinstance(image, torch.Tensor):
        return image
    if not isinstance(image, Image.Image):
        image = load_image(image)
    return preprocess_image(image, bundle.image_processor, image_aspect_ratio)
