"""A local PMC Cloud Service mirror (``PMCID.N/`` folders + ``metadata/``) gives the legacy packages' pairs;
latest version only, retractions dropped, ``--license`` read from ``license_code`` (issue 14 items 1, 5)."""

from __future__ import annotations

import gzip
import json

import pytest

from pmc_ingest.cloud import normalise_license_code, read_id_list
from pmc_ingest.pairs import IngestOptions, ingest_pmc, load_pairs
from tests.cloud_data import RETRACTED, write_cloud_tree, write_legacy_packages

IGNORED = ("source", "version")  # where a row came from differs by layout, nothing else may


def comparable(pairs_dir) -> list[dict]:
    return sorted(({k: v for k, v in row.items() if k not in IGNORED} for row in load_pairs(pairs_dir)),
                  key=lambda r: (r["pmcid"], r["figure_id"]))


@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    return write_cloud_tree(tmp_path_factory.mktemp("cloud") / "pmc-oa-opendata")


@pytest.fixture(scope="module")
def cloud_out(cloud, tmp_path_factory):
    out = tmp_path_factory.mktemp("cloud_out")
    return out, ingest_pmc([cloud], out, IngestOptions(), progress=False)


def test_cloud_layout_gives_the_same_pairs_as_the_legacy_packages(cloud_out, tmp_path):
    out, report = cloud_out
    packages, oa_list = write_legacy_packages(tmp_path / "legacy")
    ingest_pmc([packages], tmp_path / "legacy_out", IngestOptions(oa_file_list=str(oa_list)), progress=False)
    rows = comparable(out)
    assert len(rows) == 8 and rows == comparable(tmp_path / "legacy_out")
    assert {r["pmcid"] for r in rows} == {"PMC6000000", "PMC6500000"}
    assert report.filtered["image_missing"] == 0


def test_only_the_latest_version_is_used_and_the_others_are_reported(cloud_out):
    out, report = cloud_out
    assert report.articles_skipped["superseded"] == 1 and report.superseded[0].endswith("PMC6000000.1")
    assert set(load_pairs(out).filter(lambda r: r["pmcid"] == "PMC6000000")["version"]) == {2}
    assert json.loads((out / "report.json").read_text())["articles_skipped"]["superseded"] == 1


def test_retracted_articles_are_dropped_and_counted(cloud_out):
    out, report = cloud_out
    assert report.articles_skipped["retracted"] == 1
    assert RETRACTED not in set(load_pairs(out)["pmcid"])


def test_metadata_fills_license_doi_and_pmid(cloud_out):
    out, _ = cloud_out
    rows = {(r["pmcid"], r["figure_id"]): r for r in load_pairs(out)}
    assert rows[("PMC6500000", "Fig1")]["license"] == "CC BY-NC"  # license_code wins over the JATS <license>
    first = rows[("PMC6000000", "Fig1")]
    assert (first["license"], first["pmid"], first["doi"]) == ("CC BY", "29899428", "10.1038/s41426-018-0113-2")


def test_license_filter_reads_license_code_before_any_figure(cloud, tmp_path):
    report = ingest_pmc([cloud], tmp_path / "out", IngestOptions(licenses=["CC BY"]), progress=False)
    assert report.articles_skipped["license_not_allowed"] == 1
    assert set(load_pairs(tmp_path / "out")["pmcid"]) == {"PMC6000000"}


def test_media_that_no_figure_cites_is_never_read(cloud, tmp_path, monkeypatch):
    from pathlib import Path

    read = []
    real = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: read.append(self.name) or real(self))
    ingest_pmc([cloud / "PMC6500000.1"], tmp_path / "out", IngestOptions(), progress=False)
    assert "PMC6500000.1.pdf" not in read and "mmc1.docx" not in read
    assert sorted(n for n in read if n.endswith(".jpg")) == [f"40425_2019_603_Fig{i}_HTML.jpg" for i in (1, 2, 3)]


def test_id_lists_accept_plain_ids_versions_and_the_s3_inventory(tmp_path):
    plain = tmp_path / "ids.txt"
    plain.write_text("# my selection\nPMC6500000\n6000000\nPMC11370360.1\nPMC11370360.2\n\n")
    assert read_id_list(plain) == (["PMC6000000", "PMC6500000", "PMC11370360.2"], ["PMC11370360.1"])
    inventory = tmp_path / "inventory.csv.gz"
    with gzip.open(inventory, "wt") as fh:
        fh.write('"pmc-oa-opendata","metadata/PMC8267076.1.json","2026-02-22T09:48:18.000Z","0323f9d4"\n'
                 '"pmc-oa-opendata","metadata/PMC8267077.2.json","2026-02-20T04:16:10.000Z","c30b4496"\n'
                 '"pmc-oa-opendata","metadata/PMC8267077.1.json","2026-02-20T04:16:10.000Z","c30b4497"\n')
    assert read_id_list(inventory) == (["PMC8267076.1", "PMC8267077.2"], ["PMC8267077.1"])
    bad = tmp_path / "bad.txt"
    bad.write_text("hello\n")
    with pytest.raises(ValueError, match="holds no PMCID"):
        read_id_list(bad)


def test_license_codes_normalise_like_pmcs():
    assert [normalise_license_code(c) for c in ("cc by", "CC-BY-NC", "CC BY-NC-ND 4.0", "cc0")] == [
        "CC BY", "CC BY-NC", "CC BY-NC-ND", "CC0"]
