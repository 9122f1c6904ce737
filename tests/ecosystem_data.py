"""Real-format inputs for the model-card, report, web-chat and serving tests: a PMC pairs table ingested from
synthetic OA packages (one CC BY and one CC BY-NC article, with inline mentions), its alignment and
instruction conversations, a trained tiny checkpoint and an evaluation folder written by ``evaluate_model``."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

MRI_CAPTION = "<p>Axial T2-weighted MRI of the brain shows a hyperintense lesion in the left frontal lobe.</p>"
CT_CAPTION = "<p>Axial contrast-enhanced CT image of the chest shows a 3 cm mass in the right upper lobe.</p>"
HISTO_CAPTION = "<p>Histopathology of the resected kidney, H&amp;E stain, magnification 200x.</p>"


def _image(seed: int, size=(96, 80)) -> Image.Image:
    return Image.new("RGB", size, ((seed * 70) % 255, (seed * 130) % 255, (seed * 40) % 255))


def write_pairs(root: Path) -> Path:
    """``root/pairs``: the pairs table (pairs-*.parquet, images/) of three figures from two articles."""
    from pmc_ingest.pairs import IngestOptions, ingest_pmc
    from pmc_ingest.synthetic import ArticleSpec, FigureSpec, write_package

    oa = root / "oa"
    write_package(ArticleSpec("PMC2000001", body_xml='<p>The lesion is shown (<xref ref-type="fig" rid="F1">Figure 1'
                                                     '</xref>) next to the chest CT (<xref ref-type="fig" rid="F2">'
                                                     'Figure 2</xref>).</p>', figures=[
        FigureSpec("F1", "Figure 1", MRI_CAPTION, "f1", _image(1)),
        FigureSpec("F2", "Figure 2", CT_CAPTION, "f2", _image(2), image_format="PNG")]), oa)
    write_package(ArticleSpec("PMC2000002", license_url="https://creativecommons.org/licenses/by-nc/4.0/", figures=[
        FigureSpec("F1", "Figure 1", HISTO_CAPTION, "k", _image(3))]), oa)
    out = root / "pairs"
    ingest_pmc([oa], out, IngestOptions(min_image_side=32), progress=False)
    return out


def write_alignment_data(pairs: Path) -> Path:
    from pmc_ingest.alignment import write_alignment

    write_alignment(pairs, pairs / "alignment.json", seed=0)
    return pairs / "alignment.json"


def write_instruct_dir(pairs: Path, out: Path) -> Path:
    """An instruction folder as ``medvlm ingest instruct`` leaves it (``instruct.json``), written offline."""
    from pmc_ingest.instruct_template import write_template_instructions

    out.mkdir(parents=True, exist_ok=True)
    write_template_instructions(pairs, out / "instruct.json", seed=0)
    return out


def write_vqa(root: Path) -> Path:
    """A VQA-RAD set in its original release layout: closed and open questions about four test images."""
    from downstream.synthetic import VQAItem, write_vqa_rad_original

    items = []
    for k, (organ, modality) in enumerate((("HEAD", "MRI"), ("CHEST", "CT"), ("CHEST", "X-ray"), ("ABD", "CT"))):
        extra = {"organ": organ, "question_type": "MODALITY"}
        for split in ("train", "test"):
            name = f"{split}_{k}"
            items += [VQAItem(_image(k + 10), name, f"Is this a {modality} image?", "yes", "CLOSED", split, extra),
                      VQAItem(_image(k + 10), name, "Is there a fracture?", "no", "CLOSED", split, extra),
                      VQAItem(_image(k + 10), name, "What modality is shown?", modality, "OPEN", split, extra)]
    return write_vqa_rad_original(root / "vqa_rad", items)


def write_eval(root: Path, bundle) -> Path:
    """``root/eval``: what ``medvlm eval`` writes (answers.jsonl, metrics.json, report.md) for ``bundle``."""
    from downstream.datasets import load_vqa
    from downstream.evaluate import evaluate_model

    records, _ = load_vqa("vqa-rad", write_vqa(root), "test")
    evaluate_model(bundle, records, root / "eval", batch_size=8, max_new_tokens=6, progress=False)
    return root / "eval"
