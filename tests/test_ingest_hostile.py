"""pmc_ingest against hostile inputs and interrupted reruns (issue 20 items 1-4, 13 and 15 for ingest)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pytest
from PIL import Image

import pmc_ingest.pairs as pairs_module
from pmc_ingest.alignment import write_alignment
from pmc_ingest.pairs import IngestOptions, ingest_pmc, load_pairs
from pmc_ingest.synthetic import ArticleSpec, FigureSpec, article_xml, write_folder, write_package

CAPTION = "<p>Axial contrast-enhanced CT of the chest shows a mass.</p>"


def _img(seed: int, size=(160, 120)) -> Image.Image:
    image = Image.new("RGB", size, (seed * 40 % 255, seed * 90 % 255, seed * 20 % 255))
    image.putpixel((seed % size[0], 3), (255, 255, 255))
    return image


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    return buffer.getvalue()


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _spec(pmcid: str, *figures: tuple[str, int]) -> ArticleSpec:
    return ArticleSpec(pmcid, figures=[FigureSpec(f"F{i}", f"Figure {i}", CAPTION, name, _img(seed))
                                       for i, (name, seed) in enumerate(figures, 1)])


def _ingest_killed_at(article: int, sources: Path, out: Path) -> None:
    """An ingest of ``sources`` into ``out`` killed (Ctrl-C) as it reaches its ``article``-th article."""
    real, calls = pairs_module.process_source, []

    def dies(*args):
        calls.append(args[0])
        if len(calls) == article:
            raise KeyboardInterrupt
        return real(*args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pairs_module, "process_source", dies)
        with pytest.raises(KeyboardInterrupt):
            ingest_pmc([sources], out, IngestOptions(), progress=False)


def _files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


# ------------------------------------------------------------------------------------ item 1
def test_a_pmcid_with_path_traversal_cannot_write_outside_the_output(tmp_path):
    target = tmp_path / "escape"
    target.mkdir()
    xml = article_xml(_spec("PMC1000001", ("fig1", 1))).replace(
        '<article-id pub-id-type="pmc">1000001</article-id>',
        f'<article-id pub-id-type="pmc">PMC1/../../../../../../../../{target}/x</article-id>')
    _tar(tmp_path / "in" / "PMC1000001.tar.gz", {"PMC1000001/a.nxml": xml.encode(), "PMC1000001/fig1.jpg": _jpeg(_img(1))})
    report = ingest_pmc([tmp_path / "in"], tmp_path / "out", IngestOptions(), progress=False)
    assert _files_under(target) == set()
    row = load_pairs(tmp_path / "out")[0]
    assert row["pmcid"] == "PMC1000001"  # the id from the package name, not the hostile one
    assert report.warnings["invalid_pmcid"] == 1
    assert (tmp_path / "out" / row["image_path"]).resolve().is_relative_to((tmp_path / "out").resolve())


def test_figure_file_names_from_the_package_are_sanitised(tmp_path):
    xml = article_xml(_spec("PMC1000001", ("..", 1))).replace('xlink:href=".."', 'xlink:href="../../../../evil;rm -rf"')
    _tar(tmp_path / "in" / "PMC1000001.tar.gz", {"PMC1000001/a.nxml": xml.encode(),
                                                  "PMC1000001/evil;rm -rf.jpg": _jpeg(_img(1))})
    ingest_pmc([tmp_path / "in"], tmp_path / "out", IngestOptions(), progress=False)
    path = load_pairs(tmp_path / "out")[0]["image_path"]
    assert path.startswith("images/PMC1000001/evil_rm_-rf_") and ".." not in path and ";" not in path


# ------------------------------------------------------------------------------------ item 2
def test_an_aborted_rerun_keeps_the_previous_output_and_its_report(tmp_path):
    for i in range(3):
        write_package(_spec(f"PMC100000{i}", (f"f{i}", i + 1)), tmp_path / "in")
    out = tmp_path / "out"
    ingest_pmc([tmp_path / "in"], out, IngestOptions(), progress=False)
    before = {p.name: p.read_bytes() for p in out.glob("*.json")} | {p.name: p.read_bytes() for p in out.glob("*.parquet")}

    _ingest_killed_at(2, tmp_path / "in", out)
    after = {p.name: p.read_bytes() for p in out.glob("*.json")} | {p.name: p.read_bytes() for p in out.glob("*.parquet")}
    assert after == before
    assert json.loads((out / "report.json").read_text())["pairs_kept"] == len(load_pairs(out)) == 3


def test_a_rerun_failing_while_writing_shards_leaves_old_shards_and_report_consistent(tmp_path, monkeypatch):
    write_package(_spec("PMC1000001", ("f1", 1), ("f2", 2)), tmp_path / "in")
    out = tmp_path / "out"
    ingest_pmc([tmp_path / "in"], out, IngestOptions(), progress=False)
    monkeypatch.setattr(pairs_module.ShardWriter, "flush", lambda self: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        ingest_pmc([tmp_path / "in"], out, IngestOptions(), progress=False)
    assert json.loads((out / "report.json").read_text())["pairs_kept"] == len(load_pairs(out)) == 2


def test_a_rerun_after_an_abort_resumes_and_gives_the_uninterrupted_output(tmp_path):
    for i in range(4):
        write_package(_spec(f"PMC100000{i}", (f"f{i}", i + 1)), tmp_path / "in")
    ingest_pmc([tmp_path / "in"], tmp_path / "whole", IngestOptions(), progress=False)
    _ingest_killed_at(3, tmp_path / "in", tmp_path / "out")
    report = ingest_pmc([tmp_path / "in"], tmp_path / "out", IngestOptions(), progress=False)
    assert report.resumed_articles == 2 and report.articles_read == 4
    strip = lambda rows: [{k: v for k, v in r.items() if k != "source"} for r in rows]  # noqa: E731
    assert strip(load_pairs(tmp_path / "out")) == strip(load_pairs(tmp_path / "whole"))
    assert not (tmp_path / "out" / ".ingest-all").exists()  # the work folder goes once published


# ------------------------------------------------------------------------------------ item 3
@pytest.mark.parametrize("num_proc", [1, 2])
def test_bad_files_are_reported_and_skipped_and_the_run_goes_on(tmp_path, num_proc):
    root = tmp_path / "in"
    dangling = write_folder(_spec("PMC1000001", ("fig1", 1), ("fig2", 2)), root)
    (dangling / "fig1.jpg").unlink()
    (dangling / "fig1.jpg").symlink_to(tmp_path / "nowhere.jpg")
    directory = write_folder(_spec("PMC1000002", ("fig1", 3)), root)
    (directory / "fig1.jpg").unlink()
    (directory / "fig1.jpg").mkdir()
    (root / "PMC1000003.tar.gz").symlink_to(tmp_path / "gone.tar.gz")
    write_package(_spec("PMC1000004", ("good", 4)), root)
    report = ingest_pmc([root], tmp_path / "out", IngestOptions(num_proc=num_proc), progress=False)
    assert sorted((r["pmcid"], r["figure_id"]) for r in load_pairs(tmp_path / "out")) == [
        ("PMC1000001", "F2"), ("PMC1000004", "F1")]
    unreadable = [b for b in report.bad_inputs if b["reason"] == "image_unreadable"]
    assert len(unreadable) == 2 and report.filtered["image_unreadable"] == 2
    assert {Path(b["file"]).name for b in unreadable} == {"PMC1000001", "PMC1000002"}


# ------------------------------------------------------------------------------------ item 4
def test_same_pmcid_and_file_name_from_two_sources_never_overwrite(tmp_path):
    write_package(_spec("PMC1000001", ("fig1", 1)), tmp_path / "in" / "mirror_a")
    write_package(_spec("PMC1000001", ("fig1", 2)), tmp_path / "in" / "mirror_b")
    out = tmp_path / "out"
    ingest_pmc([tmp_path / "in"], out, IngestOptions(), progress=False)
    rows = list(load_pairs(out))
    assert len(rows) == 2 and rows[0]["image_path"] != rows[1]["image_path"]
    for row in rows:
        assert hashlib.sha256((out / row["image_path"]).read_bytes()).hexdigest() == row["image_sha256"]


def test_shards_written_into_one_folder_keep_each_hash_true(tmp_path):
    write_package(_spec("PMC1000001", ("fig1", 1)), tmp_path / "in" / "a")
    write_package(_spec("PMC1000001", ("fig1", 2)), tmp_path / "in" / "b")
    out = tmp_path / "out"
    for i in range(2):
        ingest_pmc([tmp_path / "in"], out, IngestOptions(shard=f"{i}/2"), progress=False)
    for row in load_pairs(out):
        assert hashlib.sha256((out / row["image_path"]).read_bytes()).hexdigest() == row["image_sha256"]


# ------------------------------------------------------------------------------------ item 15
def test_an_oversized_package_member_is_skipped_before_it_is_read(tmp_path, monkeypatch):
    big, small = _jpeg(_img(1, (900, 900))), _jpeg(_img(2))
    xml = article_xml(_spec("PMC1000001", ("big", 1), ("small", 2)))
    _tar(tmp_path / "in" / "PMC1000001.tar.gz", {"PMC1000001/a.nxml": xml.encode(), "PMC1000001/big.jpg": big,
                                                  "PMC1000001/small.jpg": small})
    extracted = []
    real = tarfile.TarFile.extractfile
    monkeypatch.setattr(tarfile.TarFile, "extractfile", lambda self, m: extracted.append(m.name) or real(self, m))
    limit = (len(big) + len(small)) // 2
    report = ingest_pmc([tmp_path / "in"], tmp_path / "out", IngestOptions(max_image_bytes=limit), progress=False)
    assert "PMC1000001/big.jpg" not in extracted
    assert report.filtered["image_too_large"] == 1 and report.pairs_kept == 1
    assert any(b["reason"] == "image_too_large" for b in report.bad_inputs)


def test_an_image_over_the_pixel_cap_is_not_decoded(tmp_path, monkeypatch):
    write_package(_spec("PMC1000001", ("wide", 1)), tmp_path / "in")
    write_package(ArticleSpec("PMC1000002", figures=[FigureSpec("F1", "Figure 1", CAPTION, "huge", _img(2, (1200, 1000)))]),
                  tmp_path / "in")
    decoded = []
    real_load = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self.size) or real_load(self))
    report = ingest_pmc([tmp_path / "in"], tmp_path / "out", IngestOptions(max_image_pixels=1_000_000), progress=False)
    assert report.filtered["image_too_large"] == 1 and report.pairs_kept == 1
    assert (1200, 1000) not in decoded


# ------------------------------------------------------------------------------------ item 13 (ingest part)
def test_alignment_modality_matches_any_case_and_refuses_unknown_tags(tmp_path):
    write_package(_spec("PMC1000001", ("ct", 1)), tmp_path / "in")
    ingest_pmc([tmp_path / "in"], tmp_path / "pairs", IngestOptions(), progress=False)
    assert write_alignment(tmp_path / "pairs", tmp_path / "a.json", modalities=["ct"]) == 1
    with pytest.raises(ValueError, match=r"'cat'.*allowed: CT, MRI"):
        write_alignment(tmp_path / "pairs", tmp_path / "b.json", modalities=["cat"])
    assert not (tmp_path / "b.json").exists()


def test_unsafe_paths_are_refused_by_the_last_check():
    from pmc_ingest.packages import inside, safe_name, safe_pmcid

    assert safe_pmcid("PMC1/../../x") is None and safe_pmcid(" pmc123 ") == "PMC123"
    assert safe_name("../../etc/passwd") == "passwd" and safe_name("..") == "file"
    with pytest.raises(ValueError, match="leave the output folder"):
        inside(Path(os.getcwd()), "images/../../x.jpg")


def test_an_unfinished_run_with_other_arguments_is_not_resumed(tmp_path):
    for i in range(3):
        write_package(_spec(f"PMC100000{i}", (f"f{i}", i + 1)), tmp_path / "in")
    _ingest_killed_at(3, tmp_path / "in", tmp_path / "out")
    report = ingest_pmc([tmp_path / "in"], tmp_path / "out", IngestOptions(min_caption_chars=10), progress=False)
    assert report.resumed_articles == 0 and report.articles_read == 3
