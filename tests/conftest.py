"""Shared fixtures: small conversation sets built in the test, real DICOM files from installed packages."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

os.environ.setdefault("MEDVLM_NO_PROGRESS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def make_colour_set(root: Path, n: int = 24, text_only: int = 0) -> tuple[Path, Path]:
    """A conversation JSON where the answer is the colour of a plain image: learnable in a few steps."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        name = list(COLOURS)[i % 3]
        Image.new("RGB", (64 + i, 48), COLOURS[name]).save(images / f"{i}.png")
        records.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is this?"},
            {"from": "gpt", "value": f"It is {name}."}]})
    for i in range(text_only):
        records.append({"id": f"t{i}", "conversations": [
            {"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Red is a colour."}]})
    path = root / "conversations.json"
    path.write_text(json.dumps(records))
    return path, images


@pytest.fixture
def colour_set(tmp_path):
    return make_colour_set(tmp_path / "data")


@pytest.fixture(scope="session")
def tiny_bundle_factory():
    from medvlm.model import build_tiny

    return build_tiny


def label_spans(labels: list[int]) -> list[list[int]]:
    """The runs of labelled (trained) token ids, in order: one per assistant reply."""
    from medvlm.conversation import IGNORE_INDEX

    spans, current = [], []
    for label in labels:
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            current.append(label)
    return spans + ([current] if current else [])


def free_port() -> int:
    """A local TCP port nobody listens on (at the time of asking)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process_group(process, sig: int, grace: float = 20.0) -> None:
    """Stop a server started with ``start_new_session=True``: ``sig`` to its whole group, SIGKILL if it lingers."""
    import signal
    import subprocess

    os.killpg(process.pid, sig)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def stage_config(data: Path, images: Path, out: Path, **overrides):
    from medvlm.config import load_stage

    base = {"name": "test", "model": {"preset": "tiny"}, "data": [{"path": str(data), "images": str(images)}],
            "output_dir": str(out), "epochs": 2, "batch_size": 4, "lr": 1e-3, "log_steps": 1, "seed": 7}
    base.update(overrides)
    return load_stage(data=base)


@pytest.fixture
def registered():
    """``registered(register, table, unit)``: a toy unit registered the way a real one is, removed after the test."""
    added = []

    def add(register, table: dict, unit):
        register(unit)
        added.append((table, unit.name))
        return unit

    yield add
    for table, name in added:
        table.pop(name, None)
