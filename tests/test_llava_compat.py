"""LLaVA / LLaVA-Med data compatibility: the misspelt key, the pad colour and RGB conversion as LLaVA does."""

from __future__ import annotations

import json

from PIL import Image

from medvlm.imaging import load_image, mean_colour


def test_llava_med_misspelt_conversatons_key_is_read(tmp_path):
    from medvlm.config import DataSource
    from medvlm.data import ConversationDataset
    from medvlm.model import build_tiny

    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "a.png")
    records = [{"id": "r1", "image": "a.png",
                "conversatons": [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "Red."}]}]
    (tmp_path / "data.json").write_text(json.dumps(records))
    dataset = ConversationDataset([DataSource(str(tmp_path / "data.json"), str(tmp_path))], build_tiny(), "llava_v1")
    assert len(dataset) == 1 and dataset.report.total == 1 and not dataset.report.as_dict().get("skipped")


def test_pad_colour_truncates_like_llava():
    class Processor:
        image_mean = [0.48145466, 0.4578275, 0.40821073]   # CLIP's

    assert mean_colour(Processor()) == (122, 116, 104)   # LLaVA's expand2square colour; rounding gave 123, 117


def test_transparent_png_is_converted_like_llava_not_composited_on_white(tmp_path):
    Image.new("RGBA", (4, 4), (10, 20, 30, 0)).save(tmp_path / "t.png")
    assert load_image(tmp_path / "t.png").getpixel((0, 0)) == (10, 20, 30)


def test_reference_curricula_use_the_reference_templates_and_batches(tmp_path):
    from pathlib import Path

    from curricula.plan import build_plan, load_curriculum

    folder = Path(__file__).parent.parent / "curricula"
    expected = {"llava_1_5.yaml": {"pretrain": ("plain", 256), "finetune": ("vicuna_v1", 128)},
                "llava_med_v1_5.yaml": {"bio_align": ("plain", 128), "bio_instruct": ("mistral_instruct", 64)},
                "llava_med_from_llava.yaml": {"bio_align": ("plain", 128), "bio_instruct": ("vicuna_v1", 64)}}
    for name, stages in expected.items():
        data = load_curriculum(folder / name)
        plan = build_plan(data, tmp_path, hash_inputs=False)
        for node in plan.nodes:
            if node.name in stages:
                s = node.settings
                assert (s["template"], s["batch_size"] * s.get("grad_accum", 1) * data["world_size"]) == stages[node.name]


def test_llava_med_v1_5_curriculum_finetunes_and_evaluates_with_its_protocol(tmp_path):
    from pathlib import Path

    from curricula.plan import build_plan, load_curriculum
    from downstream.protocols import EvalSettings

    data = load_curriculum(Path(__file__).parent.parent / "curricula" / "llava_med_v1_5.yaml")
    nodes = build_plan(data, tmp_path, hash_inputs=False).nodes
    assert {n.settings.get("protocol") for n in nodes if n.kind in ("finetune", "eval")} == {"llava_med_v1_5"}
    evaluation = next(n for n in nodes if n.kind == "eval")
    assert EvalSettings.from_mapping(evaluation.settings).spec.template == "mistral_instruct"
