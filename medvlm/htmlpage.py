"""Self-contained static HTML pages (the ``medvlm report`` pages): one file, no server, no network.

Images are inlined as base64 JPEG thumbnails (DICOM read through ``imaging.load_image``); an image that
cannot be read becomes a visible, counted "image unavailable" box, never a broken ``<img>``. Charts are
matplotlib PNGs, inlined the same way. Every text from data is HTML-escaped; pages are written to a
temporary name and renamed, so a rerun never leaves a half-written page.
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path
from typing import Iterable, Sequence

from .fileio import atomic_write_text

STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;max-width:1200px;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.5em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.3em .5em;vertical-align:top;text-align:left}
th{background:#f3f3f3}.item{display:flex;gap:1em;border-bottom:1px solid #eee;padding:.8em 0}
.item img,.missing{width:200px;min-width:200px;object-fit:contain}.missing{height:120px;background:#fdd;
display:flex;align-items:center;justify-content:center}.wrong{background:#fff1f1}.right{background:#f1fff3}
.turn{margin:.2em 0}.human{color:#1a4b8c}.gpt{color:#1d6b2b}.meta{color:#666;font-size:.9em}
"""


class Raw(str):
    """Markup made by this module (or from escaped parts): inserted as is."""


def esc(value) -> str:
    return value if isinstance(value, Raw) else html.escape("" if value is None else str(value))


class Thumbnails:
    """``<img>`` tags for image files, each a base64 JPEG thumbnail; counts the files that could not be read."""

    def __init__(self, size: int = 256):
        self.size = size
        self.unavailable = 0

    def tag(self, path: str | os.PathLike | None, alt: str = "") -> Raw:
        from PIL import Image

        from .imaging import load_image

        try:
            image = load_image(path) if path else None
        except (OSError, ValueError):
            image = None
        if image is None:
            self.unavailable += 1
            return Raw(f'<div class="missing" title="{esc(path)}">image unavailable</div>')
        image.thumbnail((self.size, self.size), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, "JPEG", quality=85)
        return Raw(f'<img alt="{esc(alt)}" src="data:image/jpeg;base64,{base64.b64encode(buffer.getvalue()).decode()}">')


def chart(fig) -> Raw:
    """A matplotlib figure as an inline PNG ``<img>`` (the figure is closed)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return Raw(f'<img class="chart" alt="chart" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">')


def bar_chart(counts: dict[str, int], title: str, xlabel: str) -> Raw:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 0.35 * max(3, len(counts)) + 0.8))
    names = list(counts)
    ax.barh(names[::-1], [counts[n] for n in names][::-1], color="#4a78b5")
    ax.set(title=title, xlabel=xlabel)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    return chart(fig)


def table(headers: Sequence[str], rows: Iterable[Sequence], cls: str = "") -> Raw:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return Raw(f'<table class="{esc(cls)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>')


def section(title: str, *parts: str) -> Raw:
    return Raw(f"<h2>{esc(title)}</h2>" + "".join(esc(p) for p in parts))


def paragraph(text: str, cls: str = "") -> Raw:
    return Raw(f'<p class="{esc(cls)}">{esc(text)}</p>')


def item(image: Raw, *parts: str, cls: str = "") -> Raw:
    """One row of the page: a thumbnail on the left, text on the right."""
    return Raw(f'<div class="item {esc(cls)}">{image}<div>{"".join(esc(p) for p in parts)}</div></div>')


def write_page(path: str | os.PathLike, title: str, parts: Sequence[str]) -> Path:
    """The whole page, written atomically."""
    text = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{STYLE}</style></head><body><h1>{esc(title)}</h1>{''.join(esc(p) for p in parts)}</body></html>\n")
    return atomic_write_text(path, text)
