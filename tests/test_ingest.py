"""pmc_ingest on PMC-shaped packages built here: exact pairs, sub-figures, mentions, filters and bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from pmc_ingest.jats import parse_article, split_panels
from pmc_ingest.pairs import IngestOptions, ingest_pmc, load_pairs
from pmc_ingest.synthetic import ArticleSpec, FigGroupSpec, FigureSpec, write_folder, write_package

REAL_PMC = Path(__file__).resolve().parent / "data" / "pmc_real"


def _img(seed: int, size=(160, 120)) -> Image.Image:
    image = Image.new("RGB", size, (seed * 40 % 255, seed * 90 % 255, seed * 20 % 255))
    for x in range(0, size[0], 7):
        image.putpixel((x, (x * seed) % size[1]), (255, 255, 255))
    return image


BODY = (
    '<p>A 54-year-old man presented with cough. Axial CT showed a mass (<xref ref-type="fig" rid="F1">Figure 1</xref>). '
    'Follow-up imaging is shown in <xref ref-type="fig" rid="F2">Figs. 2</xref>\u2013<xref ref-type="fig" rid="F4">4</xref>. '
    'The resected tissue is shown in <xref ref-type="fig" rid="F5a F5b">Figure 5</xref>. '
    'Other findings were unremarkable (<xref ref-type="bibr" rid="B1">1</xref>).</p>'
)


def main_article() -> ArticleSpec:
    return ArticleSpec(pmcid="PMC1000001", body_xml=BODY, figures=[
        FigureSpec("F1", "Figure 1", "<title>Chest CT.</title><p>Axial contrast-enhanced <italic>CT</italic> image shows "
                   "a 3 cm mass in the right upper lobe<xref ref-type=\"bibr\" rid=\"B1\">1</xref>.</p>", "pmc1_f1", _img(1)),
        FigureSpec("F2", "Figure 2", "<p>(A) Axial T2-weighted MRI of the brain shows a lesion. (B) Coronal FLAIR image "
                   "of the same lesion.</p>", "pmc1_f2", _img(2), image_format="PNG"),
        FigureSpec("F3", "Figure 3", "<p><bold>a</bold> Ultrasound of the liver shows a nodule. <bold>b</bold> Doppler "
                   "shows flow in the nodule.</p>", "pmc1_f3", _img(3), in_floats_group=True),
        FigureSpec("F4", "Figure 4", "<p>Follow-up chest radiograph after six months of therapy.</p>", "pmc1_f4", None),
        FigGroupSpec("G5", "Figure 5", "<p>Histopathology of the resected mass.</p>", [
            FigureSpec("F5a", "5a", "<p>H&amp;E stain, magnification 200x.</p>", "pmc1_f5a", _img(5)),
            FigureSpec("F5b", "5b", "<p>Immunohistochemistry for CK7.</p>", "pmc1_f5b", _img(6)),
        ]),
        FigureSpec("F6", "Figure 6", "<p>A thumbnail that is far too small to train on.</p>", "pmc1_f6", _img(7, (20, 20))),
        FigureSpec("F7", "Figure 7", "<p>CT.</p>", "pmc1_f7", _img(8)),
    ])


@pytest.fixture
def corpus(tmp_path) -> Path:
    root = tmp_path / "oa"
    write_package(main_article(), root)
    # the same image as PMC1000001's Figure 1: a duplicate across articles
    write_package(ArticleSpec("PMC1000002", figures=[FigureSpec(
        "F1", "Figure 1", "<p>Axial contrast-enhanced CT image of a lung mass.</p>", "dup", _img(1))]), root)
    write_package(ArticleSpec("PMC1000003"), root, nxml_override=b"<article><body><p>unclosed</body></article>")
    good = write_package(ArticleSpec("PMC1000004", figures=[FigureSpec(
        "F1", "Figure 1", "<p>Sagittal MRI of the lumbar spine.</p>", "x", _img(9))]), root / "tmp")
    (root / "PMC1000004.tar.gz").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    write_package(ArticleSpec("PMC1000005"), root)
    write_package(ArticleSpec("PMC1000006", license_url="https://creativecommons.org/licenses/by-nc/4.0/", figures=[
        FigureSpec("F1", "Figure 1", "<p>Gross specimen of the resected kidney, cut surface.</p>", "k", _img(10))]), root)
    (root / "tmp" / "PMC1000004.tar.gz").unlink()
    return root


def _rows(out: Path) -> dict[tuple[str, str], dict]:
    return {(r["pmcid"], r["figure_id"]): r for r in load_pairs(out)}


def test_pairs_are_exactly_the_expected_figures(corpus, tmp_path):
    out = tmp_path / "pairs"
    report = ingest_pmc([corpus], out, IngestOptions(), progress=False)
    rows = _rows(out)
    assert set(rows) == {("PMC1000001", f) for f in ("F1", "F2", "F3", "F5a", "F5b")} | {("PMC1000006", "F1")}
    f1 = rows[("PMC1000001", "F1")]
    assert f1["caption"] == "Chest CT. Axial contrast-enhanced CT image shows a 3 cm mass in the right upper lobe1."
    assert f1["label"] == "Figure 1" and f1["modality"] == "CT" and f1["subcaption"] == []
    assert f1["inline_mentions"] == ["Axial CT showed a mass (Figure 1)."]
    assert (f1["journal"], f1["year"], f1["license"], f1["pmid"]) == ("Journal of Synthetic Radiology", 2023, "CC BY", "12345678")
    assert (f1["width"], f1["height"]) == (160, 120)
    assert (out / f1["image_path"]).is_file()
    assert f1["image_path"] == f"images/PMC1000001/pmc1_f1_{f1['image_sha256'][:12]}.jpg"  # the hash keeps sources apart

    f2 = rows[("PMC1000001", "F2")]
    assert f2["subcaption"] == ["Axial T2-weighted MRI of the brain shows a lesion.", "Coronal FLAIR image of the same lesion."]
    assert f2["panel_labels"] == ["A", "B"] and f2["modality"] == "MRI"
    assert f2["inline_mentions"] == ["Follow-up imaging is shown in Figs. 2\u20134."]
    f3 = rows[("PMC1000001", "F3")]  # in <floats-group>, bold panel letters
    assert f3["caption"] == "a Ultrasound of the liver shows a nodule. b Doppler shows flow in the nodule."
    assert f3["subcaption"] == ["Ultrasound of the liver shows a nodule.", "Doppler shows flow in the nodule."]
    assert f3["inline_mentions"] == ["Follow-up imaging is shown in Figs. 2\u20134."]  # inside the 2–4 range

    f5a = rows[("PMC1000001", "F5a")]
    assert f5a["caption"] == "Histopathology of the resected mass. H&E stain, magnification 200x."
    assert f5a["is_subfigure"] and f5a["subcaption"] == ["H&E stain, magnification 200x."]
    assert f5a["modality"] == "histopathology"
    assert f5a["inline_mentions"] == ["The resected tissue is shown in Figure 5."]

    assert report.articles_read == 6 and report.pairs_kept == 6
    assert report.filtered == {"image_missing": 1, "image_too_small": 1, "caption_too_short": 1, "duplicate_image": 1}
    bad = {Path(b["file"]).name: b["reason"] for b in report.bad_inputs}
    assert bad["PMC1000003.tar.gz"] == "malformed_xml" and bad["PMC1000004.tar.gz"] == "unreadable_package"
    assert bad["PMC1000001.tar.gz"] == "image_missing"
    assert report.articles_without_figures == 1
    saved = json.loads((out / "report.json").read_text())
    assert saved["pairs_kept"] == 6 and saved["filtered"]["duplicate_image"] == 1


def test_license_allow_list_and_oa_file_list(corpus, tmp_path):
    report = ingest_pmc([corpus], tmp_path / "a", IngestOptions(licenses=["CC BY"]), progress=False)
    assert report.filtered["license_not_allowed"] == 1
    assert ("PMC1000006", "F1") not in _rows(tmp_path / "a")
    csv = tmp_path / "oa_file_list.csv"
    csv.write_text("File,Article Citation,Accession ID,Last Updated (YYYY-MM-DD HH:MM:SS),PMID,License\n"
                   "oa_package/aa/bb/PMC1000006.tar.gz,Synth J. 2023,PMC1000006,2023-01-01 00:00:00,999,CC0\n")
    report = ingest_pmc([corpus], tmp_path / "b", IngestOptions(oa_file_list=str(csv)), progress=False)
    assert report.articles_read == 1
    assert _rows(tmp_path / "b")[("PMC1000006", "F1")]["license"] == "CC0"


def test_folders_and_processes_give_the_same_rows_as_tarballs(tmp_path):
    write_folder(main_article(), tmp_path / "folders")
    single = ingest_pmc([tmp_path / "folders"], tmp_path / "one", IngestOptions(), progress=False)
    multi = ingest_pmc([tmp_path / "folders"], tmp_path / "two", IngestOptions(num_proc=2), progress=False)
    strip = lambda rows: {k: {c: v for c, v in r.items() if c != "source"} for k, r in rows.items()}  # noqa: E731
    assert single.pairs_kept == multi.pairs_kept == 5
    assert strip(_rows(tmp_path / "one")) == strip(_rows(tmp_path / "two"))


def test_shards_split_the_corpus_without_overlap(corpus, tmp_path):
    out = tmp_path / "pairs"
    for i in range(3):
        ingest_pmc([corpus], out, IngestOptions(shard=f"{i}/3"), progress=False)
    reports = [json.loads((out / f"report-{i:05d}-of-00003.json").read_text()) for i in range(3)]
    assert sum(r["articles_read"] for r in reports) == 6
    assert len(load_pairs(out)) == 7  # no global dedup across shards: PMC1000002's copy survives


def test_rerun_after_a_kill_gives_the_same_output(corpus, tmp_path):
    out = tmp_path / "pairs"
    ingest_pmc([corpus], out, IngestOptions(rows_per_shard=2), progress=False)
    first = sorted(p.name for p in out.glob("pairs-*.parquet"))
    (out / first[-1]).unlink()                       # a run killed before its last shard
    (out / ".pairs-all-00099.parquet.tmp").write_text("half")  # and a half-written temp file
    ingest_pmc([corpus], out, IngestOptions(rows_per_shard=2), progress=False)
    assert sorted(p.name for p in out.glob("pairs-*.parquet")) == first
    assert len(load_pairs(out)) == 6


def test_non_utf8_article_is_recovered_and_reported(tmp_path):
    spec = ArticleSpec("PMC1000007", figures=[FigureSpec("F1", "Figure 1", "<p>Axial CT of the na\u00efve patient.</p>",
                                                          "f", _img(11))])
    xml = spec and __import__("pmc_ingest.synthetic", fromlist=["article_xml"]).article_xml(spec)
    write_package(spec, tmp_path / "in", nxml_override=xml.encode("cp1252"))
    report = ingest_pmc([tmp_path / "in"], tmp_path / "out", IngestOptions(), progress=False)
    assert report.pairs_kept == 1 and report.warnings["non_utf8_text"] == 1
    assert "na\u00efve" in load_pairs(tmp_path / "out")[0]["caption"]


def test_panel_splitting_needs_markers_in_sequence():
    assert [p.label for p in split_panels("(A) CT. (B) MRI. (C) US.")] == ["A", "B", "C"]
    assert split_panels("Mice (n = 6) were infected (see text).") == []
    assert split_panels("(B) only one marker") == []


def test_alignment_conversations_are_llava_json(corpus, tmp_path):
    from medvlm.data import read_records
    from pmc_ingest.alignment import read_prompts, write_alignment

    ingest_pmc([corpus], tmp_path / "pairs", IngestOptions(), progress=False)
    count = write_alignment(tmp_path / "pairs", tmp_path / "align.json", seed=1)
    records = read_records(tmp_path / "align.json")
    assert count == len(records) == 6
    prompts = set(read_prompts())
    by_id = {r["id"]: r for r in records}
    f5b = by_id["PMC1000001_F5b"]
    human, gpt = f5b["conversations"]
    assert human["from"] == "human" and human["value"].endswith("\n<image>") and human["value"][:-8] in prompts
    assert gpt == {"from": "gpt", "value": "Immunohistochemistry for CK7."}  # the sub-figure's own caption
    assert re.fullmatch(r"images/PMC1000001/pmc1_f5b_[0-9a-f]{12}\.jpg", f5b["image"])
    again = write_alignment(tmp_path / "pairs", tmp_path / "again.json", seed=1)
    assert again == count and (tmp_path / "again.json").read_text() == (tmp_path / "align.json").read_text()
    only_ct = write_alignment(tmp_path / "pairs", tmp_path / "ct.json", modalities=["CT"])
    assert only_ct == 1


def test_real_pmc_articles_parse():
    """Two real PMC articles (CC BY 4.0, PMC's OAI-PMH JATS; see tests/data/pmc_real/README.md)."""
    articles = {path.stem: parse_article(path.read_bytes(), str(path)) for path in sorted(REAL_PMC.glob("*.xml"))}
    assert sorted(articles) == ["PMC6000000", "PMC6500000"]
    for pmcid, article in articles.items():
        assert article.pmcid == pmcid and article.license == "CC BY"
        for figure in article.figures:
            assert "  " not in figure.caption and " ," not in figure.caption  # inline markup spaced as written
            assert not re.search(r"</?[a-z][a-z-]*[ />]", figure.caption), figure.caption  # no markup left
    a, b = articles["PMC6000000"], articles["PMC6500000"]
    assert (a.pmid, a.journal, a.year) == ("29899428", "Emerging Microbes & Infections", 2018)
    assert [f.figure_id for f in a.figures] == ["Fig1", "Fig2", "Fig3", "Fig4", "Fig5"]
    assert [len(a.mentions[f.figure_id]) for f in a.figures] == [4, 3, 1, 3, 1]
    fig1 = a.figures[0]
    assert fig1.label == "Fig. 1" and fig1.graphics == ["41426_2018_113_Fig1_HTML"]
    assert [p.label for p in fig1.panels] == ["a", "b"]
    assert fig1.panels[1].text.startswith("Survival of infected mice.")
    assert "(Fig. 1a, b)" in a.mentions[fig1.figure_id][0]
    assert "mice. a, b Eight-week-old female BALB/c mice without infection. c–h Eight-week-old" in a.figures[1].caption
    assert [[p.label for p in f.panels] for f in b.figures] == [["a", "b", "c", "d"], ["a", "b", "c"], ["a", "b", "c"]]
    assert b.figures[0].panels[0].text.startswith("A spider plot of change in laryngeal disease burden")