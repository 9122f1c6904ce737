"""Instruction-generation throughput against a local OpenAI-compatible server (tests/openai_server.py)
that answers each request after a fixed latency, at concurrency 1 and 16, through the real client.

    python benchmarks/instruct.py [--pairs 64] [--latency 0.05]

The last line is the ratio of requests/s at concurrency 16 to concurrency 1.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image  # noqa: E402

from pmc_ingest.instruct import InstructOptions, generate_instructions  # noqa: E402
from pmc_ingest.pairs import IngestOptions, ingest_pmc  # noqa: E402
from pmc_ingest.synthetic import ArticleSpec, FigureSpec, write_package  # noqa: E402
from tests.openai_server import FakeOpenAI  # noqa: E402


def _serve(conn, latency: float) -> None:
    with FakeOpenAI(delay=latency) as server:
        conn.send(server.base_url)
        server.thread.join()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--latency", type=float, default=0.05, help="server seconds per request")
    args = parser.parse_args()
    os.environ.setdefault("OPENAI_API_KEY", "benchmark")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for i in range(args.pairs):
            image = Image.new("RGB", (96, 96), (i % 256, 90, 40))
            image.putpixel((i % 96, 1), (255, 0, 0))
            write_package(ArticleSpec(f"PMC{3_000_000 + i}", figures=[FigureSpec(
                "F1", "Figure 1", f"<p>Axial CT image number {i} shows a lesion in the liver.</p>", f"f{i}", image)]), tmp / "oa")
        ingest_pmc([tmp / "oa"], tmp / "pairs", IngestOptions(), progress=False)
        rates = {}
        # the server runs in its own process so it does not share the client's interpreter lock
        parent, child = multiprocessing.Pipe()
        process = multiprocessing.Process(target=_serve, args=(child, args.latency), daemon=True)
        process.start()
        base_url = parent.recv()
        try:
            for concurrency in (1, 16):
                options = InstructOptions(model="gpt-4o", base_url=base_url, max_concurrency=concurrency)
                summary = generate_instructions(tmp / "pairs", tmp / f"out{concurrency}", options, progress=False)
                rates[concurrency] = summary.requests_per_second
                print(f"concurrency {concurrency:>2}: {summary.sent} requests, {rates[concurrency]:.1f} requests/s")
        finally:
            process.terminate()
        print("model FLOPs: none on this side (the endpoint computes); MFU n/a")
        print(f"requests/s ratio concurrency 16 / 1: {rates[16] / rates[1]:.2f}x")


if __name__ == "__main__":
    main()
