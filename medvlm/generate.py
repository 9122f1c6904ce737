"""Batched generation for evaluation and ``medvlm chat``.

Prompts are built by the same template code as training (``conversation.encode`` with a generation
prompt), left-padded into batches, and decoded greedily with the KV cache; each sequence stops at its
own end-of-sequence token (``generate`` keeps finished rows padded while others continue). Each distinct
image is decoded once and goes through the vision tower once per call (``features.select_features``),
however many questions ask about it; the projected features enter ``generate`` as ``inputs_embeds``.
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
               system: str | None = None) -> list[int]:
    """Token ids of a single-turn prompt ending where the assistant's answer begins."""
    encoded = encode(template or bundle.template, prompt_messages(question, has_image), bundle.tokenizer,
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
                     feature_cache=None) -> list[str]:
    """Greedy answers for ``questions`` (one image or ``None`` each), ``batch_size`` at a time.

    ``feature_cache`` (a ``features.FeatureCache``, e.g. on disk) keeps vision features across calls:
    evaluating again — another checkpoint of the same curriculum, whose vision tower is frozen and so
    identical — then decodes no image at all."""
    if len(questions) != len(images):
        raise ValueError(f"{len(questions)} questions but {len(images)} images")
    model = bundle.model
    model.eval()
    device = next(model.parameters()).device
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    pad_id = bundle.tokenizer.pad_token_id
    stop = _stop_ids(bundle)
    answers: list[str] = []
    starts = list(range(0, len(questions), batch_size))
    loader = PixelLoader(bundle, image_aspect_ratio)
    features_by_image: dict = {}
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="generate", unit="batch")
    try:
        for start in starts:
            chunk_q = questions[start:start + batch_size]
            chunk_i = images[start:start + batch_size]
            loader.prefetch(i for i in images[start + batch_size:start + 2 * batch_size] if i is not None)
            rows = [prompt_ids(bundle, q, img is not None, template, system) for q, img in zip(chunk_q, chunk_i)]
            ids, mask = _left_pad(rows, pad_id)
            ids, mask = ids.to(device), mask.to(device)
            with_image = [img for img in chunk_i if img is not None]
            if with_image:
                # the vision tower runs once per distinct image, however many questions ask about it
                features = torch.stack([_features(bundle, features_by_image, loader, img, device, dtype, feature_cache)
                                        for img in with_image])
                kwargs = {"inputs_embeds": embeds_with_image_features(model, ids, features)}
            else:
                kwargs = {"input_ids": ids}
            out = model.generate(**kwargs, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 num_beams=1, eos_token_id=stop, pad_token_id=pad_id, use_cache=True)
            new_tokens = out[:, ids.shape[1]:] if "input_ids" in kwargs else out
            answers.extend(t.strip() for t in bundle.tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        loader.close()
    return answers


def _features(bundle, cache: dict, loader: PixelLoader, image, device, dtype, feature_cache=None) -> torch.Tensor:
    key = PixelLoader._key(image)
    if key is not None and key in cache:
        return cache[key]
    stored_key = feature_cache.key_for(image) if feature_cache is not None and key is not None else None
    features = feature_cache.get(stored_key) if stored_key is not None else None
    if features is None:
        pixels = loader.get(image).unsqueeze(0).to(device=device, dtype=dtype)
        features = select_features(bundle.model, pixels)[0]
        if stored_key is not None:
            feature_cache.put(stored_key, features)
    features = features.to(device=device, dtype=dtype)
    if key is not None:
        cache[key] = features
    return features


def _pixels(bundle, image, image_aspect_ratio: str) -> torch.Tensor:
    if isinstance(image, torch.Tensor):
        return image
    if not isinstance(image, Image.Image):
        image = load_image(image)
    return preprocess_image(image, bundle.image_processor, image_aspect_ratio)
