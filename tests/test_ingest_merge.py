"""``ingest merge``: shard outputs → one table; images repeated across shards removed by sha256 (earliest
article kept), optionally perceptual near-duplicates; counts add up (issue 14 item 4)."""

from __future__ import annotations

import hashlib
import json

import pytest
from PIL import Image, ImageFilter

from pmc_ingest.merge import MergeOptions, merge_pairs
from pmc_ingest.pairs import IngestOptions, ingest_pmc, load_pairs
from pmc_ingest.synthetic import ArticleSpec, FigureSpec, write_package

CAPTION = "<p>Axial contrast-enhanced CT of the chest shows a mass in the right upper lobe.</p>"


def _scan(seed: int, size=(256, 256)) -> Image.Image:
    """A structured image: a perceptual hash sees its shapes, not only its mean colour."""
    image = Image.new("RGB", size, (20, 20, 20))
    for k in range(6):
        x, y = (seed * 53 + k * 71) % (size[0] - 60), (seed * 29 + k * 97) % (size[1] - 60)
        image.paste((200 - 25 * k, 40 * k % 255, 90), (x, y, x + 30 + 5 * k, y + 25 + 4 * k))
    return image


@pytest.fixture
def shards(tmp_path):
    x, y, z = _scan(1), _scan(2), _scan(3)
    y_copy = y.resize((240, 240)).filter(ImageFilter.GaussianBlur(0.6))   # a re-encoded, resized copy
    articles = [ArticleSpec("PMC1000001", figures=[FigureSpec("F1", "Figure 1", CAPTION, "x", x)]),
                ArticleSpec("PMC1000002", figures=[FigureSpec("F1", "Figure 1", CAPTION, "x", x),
                                                   FigureSpec("F2", "Figure 2", CAPTION, "y", y)]),
                ArticleSpec("PMC1000003", figures=[FigureSpec("F1", "Figure 1", CAPTION, "z", z),
                                                   FigureSpec("F2", "Figure 2", CAPTION, "y2", y_copy)])]
    for spec in articles:
        write_package(spec, tmp_path / "oa")
    outs = [tmp_path / f"shard{i}" for i in range(2)]
    for i, out in enumerate(outs):  # sorted sources: shard 0 = PMC1000001, PMC1000003; shard 1 = PMC1000002
        ingest_pmc([tmp_path / "oa"], out, IngestOptions(shard=f"{i}/2"), progress=False)
    return outs


def test_merge_removes_images_repeated_across_shards_keeping_the_earliest_article(shards, tmp_path):
    out = tmp_path / "merged"
    report = merge_pairs(shards, out)
    rows = list(load_pairs(out))
    assert [(r["pmcid"], r["figure_id"]) for r in rows] == [
        ("PMC1000001", "F1"), ("PMC1000002", "F2"), ("PMC1000003", "F1"), ("PMC1000003", "F2")]
    assert (report.rows_in, report.duplicates_removed, report.pairs_kept) == (5, 1, 4)
    for row in rows:
        assert hashlib.sha256((out / row["image_path"]).read_bytes()).hexdigest() == row["image_sha256"]
    saved = json.loads((out / "report.json").read_text())
    assert saved["totals"]["articles_read"] == 3 and saved["totals"]["pairs_kept"] == saved["rows_in"] == 5
    assert saved["pairs_kept"] == saved["rows_in"] - saved["duplicates_removed"]
    assert [i["rows"] for i in saved["inputs"]] == [3, 2]


def test_near_duplicates_are_removed_on_request(shards, tmp_path):
    report = merge_pairs(shards, tmp_path / "merged", MergeOptions(near_duplicates=True))
    assert (report.duplicates_removed, report.near_duplicates_removed, report.pairs_kept) == (1, 1, 3)
    kept = {(r["pmcid"], r["figure_id"]) for r in load_pairs(tmp_path / "merged")}
    assert ("PMC1000002", "F2") in kept and ("PMC1000003", "F2") not in kept  # the earlier copy stays


def test_merge_refuses_to_write_into_an_input(shards):
    with pytest.raises(ValueError, match="is one of the inputs"):
        merge_pairs(shards, shards[0])


def test_merge_command_prints_counts_and_where_the_output_went(shards, tmp_path, capsys):
    from medvlm.cli import main

    assert main(["ingest", "merge", *map(str, shards), "--out", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "5 rows in, 1 exact and 0 near duplicates removed, 4 pairs kept" in out and str(tmp_path / "m") in out
