"""Frozen vision features, computed once and reused on every later step, epoch and stage.

In every LLaVA stage the vision tower is frozen, so for a given image its selected-layer features (LLaVA:
the second-to-last layer, CLS dropped) never change. ``FeatureCache`` keeps them — in memory, and on
disk when given a folder — under a key that hashes the image file's bytes, the tower's weights and
feature selection, and the preprocessing (image processor settings + ``image_aspect_ratio``). A training
step then only runs the projector on cached features and passes ``inputs_embeds`` to the unchanged
``LlavaForConditionalGeneration`` (no patched classes). The loss equals the uncached path's.

Skipped automatically when the vision tower trains or under DeepSpeed ZeRO-3 (partitioned tower weights).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from .fileio import atomic_path
from .model import unwrap_peft


def tower_fingerprint(model) -> str:
    """A hash of the vision tower's weights and the feature selection; changes if either does."""
    base = unwrap_peft(model)
    config = base.config
    digest = hashlib.sha256(f"{config.vision_feature_layer}|{config.vision_feature_select_strategy}".encode())
    for name, tensor in sorted(base.model.vision_tower.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def preprocessing_signature(image_processor, image_aspect_ratio: str) -> str:
    return hashlib.sha256((image_processor.to_json_string() + image_aspect_ratio).encode()).hexdigest()


@torch.no_grad()
def select_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Exactly what ``LlavaModel.get_image_features`` feeds its projector: the configured hidden layer,
    without the CLS token for the ``default`` strategy."""
    base = unwrap_peft(model)
    config = base.config
    tower = base.model.vision_tower
    dtype = next(tower.parameters()).dtype
    outputs = tower(pixel_values.to(dtype), output_hidden_states=True)
    layers = config.vision_feature_layer
    if isinstance(layers, int):
        selected = outputs.hidden_states[layers]
    else:
        selected = torch.cat([outputs.hidden_states[i] for i in layers], dim=-1)
    if config.vision_feature_select_strategy == "default":
        selected = selected[:, 1:]
    return selected


class FeatureCache:
    """Image key → selected vision features (memory, plus ``folder`` on disk when given)."""

    def __init__(self, model, image_processor, image_aspect_ratio: str = "pad", folder: str | os.PathLike | None = None):
        self.prefix = hashlib.sha256((tower_fingerprint(model) + preprocessing_signature(
            image_processor, image_aspect_ratio)).encode()).hexdigest()[:16]
        self.memory: dict[str, torch.Tensor] = {}
        self.folder = Path(folder) if folder else None
        self._file_keys: dict[tuple[str, int, int], str] = {}
        self.hits = self.misses = 0

    def key_for(self, path: str | os.PathLike) -> str:
        """Key of one image file: its bytes' hash (memoised by path, size and mtime) + the cache prefix."""
        stat = os.stat(path)
        memo = (str(path), stat.st_size, stat.st_mtime_ns)
        if memo not in self._file_keys:
            with open(path, "rb") as fh:
                self._file_keys[memo] = hashlib.sha256(fh.read()).hexdigest()
        return f"{self.prefix}-{self._file_keys[memo]}"

    def has(self, key: str) -> bool:
        return key in self.memory or (self.folder is not None and self._disk_path(key).is_file())

    def get(self, key: str) -> torch.Tensor | None:
        if key in self.memory:
            return self.memory[key]
        if self.folder is not None and self._disk_path(key).is_file():
            from safetensors.torch import load_file

            tensor = load_file(str(self._disk_path(key)))["features"]
            self.memory[key] = tensor
            return tensor
        return None

    def put(self, key: str, features: torch.Tensor) -> None:
        features = features.detach().cpu()
        self.memory[key] = features
        if self.folder is not None:
            from safetensors.torch import save_file

            with atomic_path(self._disk_path(key), fsync=False) as tmp:  # a cache: rebuilt if lost
                save_file({"features": features.contiguous()}, str(tmp))

    def _disk_path(self, key: str) -> Path:
        return self.folder / key[17:19] / f"{key}.safetensors"

    def features_for(self, model, keys: list[str], pixel_values: torch.Tensor | None, missing: list[int],
                     device: torch.device) -> torch.Tensor:
        """Features for ``keys`` in order; ``pixel_values`` rows belong to the positions in ``missing``."""
        if missing:
            computed = select_features(model, pixel_values.to(device))
            for row, index in enumerate(missing):
                self.put(keys[index], computed[row])
            self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        return torch.stack([self.get(k) for k in keys]).to(device)


def embeds_with_image_features(model, input_ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Token embeddings with the projected image features scattered into the image-token positions,
    as ``LlavaModel.forward`` does for ``pixel_values``."""
    base = unwrap_peft(model)
    embeds = base.get_input_embeddings()(input_ids)
    projected = base.model.multi_modal_projector(features.to(embeds.dtype))
    mask = (input_ids == base.config.image_token_id).unsqueeze(-1).expand_as(embeds)
    if int(mask.sum()) != projected.numel():
        raise ValueError(f"{int(mask.sum()) // embeds.shape[-1]} image tokens but features for "
                         f"{projected.shape[0]}×{projected.shape[1]}; check num_image_tokens")
    return embeds.masked_scatter(mask, projected.to(embeds.dtype))
