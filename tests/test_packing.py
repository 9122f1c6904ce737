"""Shared-image packing (medvlm/packing.py): exact — every question gets the loss and gradients it gets alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from medvlm.config import DataSource
from medvlm.data import Collator, ConversationDataset, ImageGroupedBatchSampler
from medvlm.model import apply_trainable, build_tiny
from medvlm.packing import (PADDING, PREFIX, PackedCollator, PackingError, choose_packing, packed_attention_mask,
                            packed_loss)

QUESTIONS = [("What is shown?", "a lung"), ("Is this a CT scan of the chest?", "yes"),
             ("Where is the lesion?", "in the upper right lobe near the hilum"),
             ("Is there an abnormality in the left lung?", "no")]


def make_vqa_set(root: Path) -> tuple[Path, Path]:
    """Three images with 2, 3 and 4 questions (answers of different lengths), one two-turn record and
    one text-only record."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(3):
        Image.new("RGB", (50 + 7 * i, 40), (60 * i, 100, 200)).save(images / f"{i}.png")
        for q, (question, answer) in enumerate(QUESTIONS[:2 + i]):
            records.append({"id": f"{i}-{q}", "image": f"{i}.png", "conversations": [
                {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]})
    records.append({"id": "turns", "image": "1.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "a lung"},
        {"from": "human", "value": "Which side?"}, {"from": "gpt", "value": "left"}]})
    records.append({"id": "text", "conversations": [{"from": "human", "value": "Name an organ."},
                                                    {"from": "gpt", "value": "The liver."}]})
    path = root / "vqa.json"
    path.write_text(json.dumps(records))
    return path, images


@pytest.fixture
def vqa_items(tmp_path):
    """(bundle factory, the items of one batch holding every record)."""
    data, images = make_vqa_set(tmp_path)

    def items_for(bundle, feature_cache=None):
        dataset = ConversationDataset([DataSource(str(data), str(images))], bundle, bundle.template)
        dataset.feature_cache = feature_cache
        return dataset, dataset.__getitems__(list(range(len(dataset))))

    return items_for


def _gradients(model) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


def _unpacked_loss(model, items, pad_id) -> torch.Tensor:
    """transformers' own causal-LM loss over the padded batch: the reference."""
    batch = Collator(pad_id)(items)
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 pixel_values=batch["pixel_values"], labels=batch["labels"]).loss


def _assert_same_loss_and_gradients(bundle, items, inputs_of, atol):
    model = bundle.model
    reference = _unpacked_loss(model, items, bundle.tokenizer.pad_token_id)
    reference.backward()
    expected = _gradients(model)
    batch = PackedCollator(bundle.tokenizer.pad_token_id, bundle.image_token_id)(items)
    loss = packed_loss(model, batch, inputs_of(batch))
    loss.backward()
    got = _gradients(model)
    assert abs(float(loss.detach()) - float(reference.detach())) < atol
    assert expected.keys() == got.keys() and len(got) > 0
    for name in expected:
        assert expected[name] is not None and got[name] is not None, name
        assert bool(expected[name].any()), f"{name}: no gradient, the comparison would prove nothing"
        torch.testing.assert_close(got[name], expected[name], atol=atol, rtol=0, msg=name)


def _pixel_inputs(batch):
    return {"input_ids": batch["input_ids"], "pixel_values": batch["pixel_values"]}


def trainable_bundle(bundle, trainable: str):
    """``trainable`` applied; LoRA without dropout (exactness is per forward) and with non-zero B matrices,
    so the adapters' A matrices get gradients too."""
    bundle = apply_trainable(bundle, trainable, {"dropout": 0.0})
    torch.manual_seed(1)
    for name, param in bundle.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    return bundle


@pytest.mark.parametrize("trainable", ["projector+llm", "lora"])
def test_packed_loss_and_every_gradient_equal_unpacked_within_1e_5(vqa_items, trainable):
    bundle = trainable_bundle(build_tiny(), trainable)
    _, items = vqa_items(bundle)
    _assert_same_loss_and_gradients(bundle, items, _pixel_inputs, atol=1e-5)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_packed_equals_unpacked_with_feature_cache_and_gradient_checkpointing_within_1e_5(vqa_items, attention):
    from medvlm.features import FeatureCache, embeds_with_image_features

    bundle = apply_trainable(build_tiny(), "projector+llm")
    bundle.model.set_attn_implementation(attention)
    bundle.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    bundle.model.train()
    cache = FeatureCache(bundle.model, bundle.image_processor)
    _, items = vqa_items(bundle, cache)

    def cached_inputs(batch):
        features = cache.features_for(bundle.model, batch["image_keys"], batch["pixel_values"], batch["missing"], "cpu")
        return {"inputs_embeds": embeds_with_image_features(bundle.model, batch["input_ids"], features)}

    _assert_same_loss_and_gradients(bundle, items, cached_inputs, atol=1e-5)


def test_each_image_is_in_one_packed_row_once(vqa_items):
    bundle = build_tiny()
    _, items = vqa_items(bundle)
    batch = PackedCollator(bundle.tokenizer.pad_token_id, bundle.image_token_id)(items)
    image_tokens = (batch["input_ids"] == bundle.image_token_id).sum(dim=1).tolist()
    # three images (the two-turn record shares image 1's prefix) and the text-only record
    assert sorted(image_tokens) == [0] + [bundle.num_image_tokens] * 3
    assert batch["num_questions"] == len(items) == 11
    assert batch["pixel_values"].shape[0] == 3
    unpacked = Collator(bundle.tokenizer.pad_token_id)(items)
    assert batch["num_tokens"] - batch["num_pad_tokens"] < 0.5 * (unpacked["num_tokens"] - unpacked["num_pad_tokens"])


def test_every_segment_continues_the_prefix_positions(vqa_items):
    bundle = build_tiny()
    _, items = vqa_items(bundle)
    batch = PackedCollator(bundle.tokenizer.pad_token_id, bundle.image_token_id)(items)
    for segments, positions in zip(batch["segment_ids"], batch["position_ids"]):
        prefix = int((segments == PREFIX).sum())
        for number in set(segments.tolist()) - {PREFIX, PADDING}:
            assert positions[segments == number].tolist() == list(range(prefix, prefix + int((segments == number).sum())))


def test_a_segment_sees_the_prefix_and_itself_causally():
    bundle = build_tiny()
    segments = torch.tensor([[0, 0, 1, 1, 2, 2, 2, -1]])
    mask = packed_attention_mask(bundle.model, segments, torch.float32)[0, 0]
    seg = segments[0].tolist()
    for q in range(len(seg)):
        for k in range(len(seg)):
            visible = k <= q and (seg[k] == PREFIX or seg[k] == seg[q])
            assert bool(mask[q, k]) == visible, (q, k)


class _Engine(torch.nn.Module):
    """What DDP and DeepSpeed hand the loss: the model as ``.module``, and (DeepSpeed) a ``config`` dict."""

    def __init__(self, model):
        super().__init__()
        self.module, self.config = model, {"zero_optimization": {"stage": 3}}

    def forward(self, **kwargs):
        return self.module(**kwargs)


def test_packed_loss_runs_through_a_distributed_wrapper(vqa_items):
    bundle = build_tiny()
    _, items = vqa_items(bundle)
    batch = PackedCollator(bundle.tokenizer.pad_token_id, bundle.image_token_id)(items)
    with torch.no_grad():
        wrapped = packed_loss(_Engine(bundle.model), batch, _pixel_inputs(batch))
        assert float(wrapped) == float(packed_loss(bundle.model, batch, _pixel_inputs(batch)))


def test_flash_attention_is_refused_with_a_clear_message():
    bundle = build_tiny()
    bundle.model.config.text_config._attn_implementation = "flash_attention_2"
    with pytest.raises(PackingError, match="pack_by_image: false"):
        choose_packing(True, ["a.png", "a.png"], bundle.model)
    assert choose_packing("auto", ["a.png", "a.png"], bundle.model) is False


def test_auto_packs_when_images_have_several_questions():
    model = build_tiny().model
    assert choose_packing("auto", ["a.png", "a.png", "b.png", "b.png", None], model) is True
    assert choose_packing("auto", ["a.png", "b.png", "c.png", None], model) is False
    assert choose_packing(False, ["a.png", "a.png"], model) is False


def test_image_grouped_batches_hold_whole_images_and_every_question_once():
    images = ["a"] * 5 + ["b"] * 2 + [None] + ["c"] * 3
    sampler = ImageGroupedBatchSampler(images, batch_size=4, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 3 and [len(b) for b in batches] == [4, 4, 3]
    order = [i for b in batches for i in b]
    assert sorted(order) == list(range(len(images)))
    runs = [images[i] for i in order]
    for image in ("a", "b", "c"):  # an image's questions follow each other
        first = runs.index(image)
        assert runs[first:first + runs.count(image)] == [image] * runs.count(image)
    assert batches == list(ImageGroupedBatchSampler(images, batch_size=4, seed=3))
    sampler.set_epoch(1)
    assert [i for b in sampler for i in b] != order


def test_a_batch_decodes_each_image_once(vqa_items, monkeypatch):
    import medvlm.data

    calls = []
    real = medvlm.data.load_image
    monkeypatch.setattr(medvlm.data, "load_image", lambda path, *cap: calls.append(path) or real(path, *cap))
    vqa_items(build_tiny())
    assert len(calls) == 3


@pytest.fixture(scope="module")
def smollm2_bundle(tmp_path_factory):
    """A LLaVA composed of a tiny CLIP tower and the real SmolLM2-135M (loaded once for the module)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from medvlm.model import compose
    from tests.test_compose_real_lm import _gguf_path

    vision = tmp_path_factory.mktemp("clip")
    CLIPVisionModel(CLIPVisionConfig(image_size=224, patch_size=16, hidden_size=128, intermediate_size=512,
                                     num_hidden_layers=2, num_attention_heads=4)).save_pretrained(vision)
    return compose(vision=str(vision), llm=str(_gguf_path()))


@pytest.mark.slow
@pytest.mark.parametrize("trainable", ["projector+llm", "lora"])
def test_packed_equals_unpacked_on_smollm2_within_1e_4(tmp_path, smollm2_bundle, trainable):
    import copy

    bundle = trainable_bundle(copy.deepcopy(smollm2_bundle), trainable)
    data, images = make_vqa_set(tmp_path / "data")
    dataset = ConversationDataset([DataSource(str(data), str(images))], bundle, bundle.template)
    items = dataset.__getitems__(list(range(len(dataset))))
    _assert_same_loss_and_gradients(bundle, items, _pixel_inputs, atol=1e-4)


def _first_loss(out: Path) -> float:
    return next(json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines() if '"loss"' in line)


def test_a_packed_stage_trains_on_the_same_loss_as_unpacked(tmp_path):
    from medvlm.trainer import Trainer
    from tests.conftest import stage_config

    data, images = make_vqa_set(tmp_path / "data")
    results = {}
    for packed in (False, True):  # one batch holding every question: the same questions either way
        config = stage_config(data, images, tmp_path / f"out-{packed}", max_steps=1, batch_size=16,
                              pack_by_image=packed, warmup_ratio=0.0)
        results[packed] = Trainer(config).run()
    assert abs(_first_loss(tmp_path / "out-True") - _first_loss(tmp_path / "out-False")) < 1e-5
    assert results[True].metrics["samples_seen"] == results[False].metrics["samples_seen"] == 11


@pytest.mark.slow
@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_a_packed_stage_under_deepspeed_trains_on_the_loss_of_the_unpacked_one(tmp_path, zero):
    """DeepSpeed in its own process (one rank; ZeRO-3 partitions the weights and turns the feature cache off,
    so the packed rows take the pixel path)."""
    from tests.test_reliability import _losses, _stage_yaml, _train

    data, images = make_vqa_set(tmp_path / "data")
    common = {"max_steps": 2, "batch_size": 16, "warmup_ratio": 0.0, "save_steps": 0}
    for name, extra in (("plain", {"pack_by_image": False}), (zero, {"pack_by_image": True, "deepspeed": zero})):
        proc = _train(_stage_yaml(tmp_path, name, data, images, **common, **extra), timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert "image-grouped, packed batches" in proc.stdout
    assert _losses(tmp_path / zero) == pytest.approx(_losses(tmp_path / "plain"), abs=1e-4)
