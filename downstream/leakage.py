"""Images shared between splits: exact duplicates (sha256 of the file) and near duplicates (64-bit
difference hash within a Hamming distance), between a set's train and test splits or between a
pretraining pairs table and a downstream test split. VQA-RAD, for one, asks train and test questions
about the same images; numbers on such a test split measure partly memorisation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from .datasets import dhash, image_bytes_hash


def _fingerprints(paths: Iterable[str | Path]) -> dict[str, tuple[str, int | None]]:
    out = {}
    for path in sorted(set(map(str, paths))):
        try:
            out[path] = (image_bytes_hash(path), dhash(path))
        except (OSError, ValueError):
            out[path] = (image_bytes_hash(path), None)
    return out


def leakage_report(train_images: Iterable[str | Path], test_images: Iterable[str | Path], max_distance: int = 4) -> dict:
    """Counts and lists of test images found in the training images, exactly or nearly."""
    train, test = _fingerprints(train_images), _fingerprints(test_images)
    train_hashes = {sha: path for path, (sha, _) in train.items()}
    train_dhashes = [(d, path) for path, (_, d) in train.items() if d is not None]
    exact, near = [], []
    for path, (sha, d) in test.items():
        if sha in train_hashes:
            exact.append({"test": path, "train": train_hashes[sha]})
            continue
        if d is None:
            continue
        for other, other_path in train_dhashes:
            if bin(d ^ other).count("1") <= max_distance:
                near.append({"test": path, "train": other_path, "distance": bin(d ^ other).count("1")})
                break
    return {"test_images": len(test), "train_images": len(train), "exact_duplicates": len(exact),
            "near_duplicates": len(near), "exact": exact, "near": near, "max_distance": max_distance}
