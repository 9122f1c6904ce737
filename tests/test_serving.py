"""An exported checkpoint serves with standard tools: ``transformers serve`` (transformers' own
OpenAI-compatible server) answers an image + question, through the ``openai`` client, exactly as
``medvlm chat`` does greedily. (Production serving is ``vllm serve CKPT``; see the README.)"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import free_port, stop_process_group

QUESTION = "What does the image show?"
LOG_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\] \[(WARNING|INFO)\]")


@contextlib.contextmanager
def transformers_serve(checkpoint: Path, log: Path, timeout: float = 240.0):
    """``transformers serve CHECKPOINT`` on a free port; yields its base URL once /health answers."""
    import urllib.request

    port = free_port()
    command = [str(Path(sys.executable).parent / "transformers"), "serve", str(checkpoint), "--port", str(port),
               "--device", "cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with open(log, "w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"transformers serve did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop_process_group(server, signal.SIGTERM)


def test_transformers_serve_answers_as_medvlm_chat_does(tmp_path, capsys):
    from openai import OpenAI

    from medvlm.cli import main
    from medvlm.model import build_tiny, save_folder

    checkpoint = save_folder(build_tiny(), tmp_path / "checkpoint")
    image = tmp_path / "scan.png"   # square: medvlm pads to square, the HF processor resizes; equal here
    Image.new("RGB", (96, 96), (200, 40, 40)).save(image)
    assert main(["chat", "--model", str(checkpoint), "--image", str(image), "--max-new-tokens", "12", QUESTION]) == 0
    # stdout is the answer, after any library log line (DeepSpeed announces its accelerator on import)
    expected = "\n".join(line for line in capsys.readouterr().out.splitlines() if not LOG_LINE.match(line)).strip()

    buffer = io.BytesIO(image.read_bytes())
    data_url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    with transformers_serve(checkpoint, tmp_path / "serve.log") as base_url:
        client = OpenAI(base_url=base_url, api_key="unused")
        response = client.chat.completions.create(
            model=str(checkpoint), max_tokens=12, temperature=0,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url}},
                                                   {"type": "text", "text": QUESTION}]}])
    assert expected
    assert response.choices[0].message.content.strip() == expected
