"""Config validation, conversation file reading and the length-grouped sampler."""

from __future__ import annotations

import json

import pytest

from medvlm.config import ConfigError, load_stage
from medvlm.data import DataError, LengthGroupedBatchSampler, choose_grouping, read_records, resolve_image
from medvlm.data import padding_fraction as _padding


def _refusal(tmp_path, text: str = "name: s\n", overrides: list[str] | None = None) -> str:
    """The one-line ``ConfigError`` that loading a stage file of ``text`` (plus ``overrides``) gives."""
    path = tmp_path / "stage.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_stage(path, overrides)
    return str(caught.value)


def test_unknown_key_names_the_nearest_valid_one(tmp_path):
    assert "unknown config key 'learning_rate'" in _refusal(tmp_path, "name: s\nlearning_rate: 1e-3\n")
    assert "did you mean 'epochs'" in _refusal(tmp_path, "name: s\nepoch: 3\n")


def test_nested_unknown_key_and_wrong_type_are_reported(tmp_path):
    assert "'lora.rank'" in _refusal(tmp_path, "lora: {rank: 8}\n")
    assert "'batch_size' must be an integer" in _refusal(tmp_path, "batch_size: four\n")


def test_yaml_scientific_notation_and_overrides(tmp_path):
    path = tmp_path / "stage.yaml"
    path.write_text("lr: 2e-5\ndata: [{path: conv.json, images: imgs}]\n")
    config = load_stage(path, ["lr=1e-4", "lora.r=16", "data.0.images=other"])
    assert config.lr == 1e-4 and config.lora.r == 16
    assert config.data[0].path == str(tmp_path / "conv.json")  # relative to the YAML file
    assert config.data[0].images == str(tmp_path / "other")


def test_reads_llava_json_and_jsonl(tmp_path):
    record = {"id": "1", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nq"},
                                                            {"from": "gpt", "value": "a"}]}
    (tmp_path / "a.json").write_text(json.dumps([record, record]))
    (tmp_path / "b.jsonl").write_text(json.dumps(record) + "\n\n" + json.dumps(record) + "\n")
    assert len(read_records(tmp_path / "a.json")) == 2 and len(read_records(tmp_path / "b.jsonl")) == 2
    (tmp_path / "c.jsonl").write_text(json.dumps(record) + "\n{broken\n")
    with pytest.raises(DataError, match="c.jsonl:2"):
        read_records(tmp_path / "c.jsonl")


def test_image_paths_cannot_escape_their_folder(tmp_path):
    with pytest.raises(DataError, match="escapes the image folder"):
        resolve_image(tmp_path, "../../etc/passwd", "r1")
    assert resolve_image(tmp_path, "sub/x.png", "r1") == (tmp_path / "sub" / "x.png").resolve()


def test_sampler_is_deterministic_per_epoch_and_separates_modalities():
    lengths = [10 + i for i in range(40)] + [-(5 + i) for i in range(20)]
    sampler = LengthGroupedBatchSampler(lengths, batch_size=4, seed=3)
    first = list(sampler)
    assert first == list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first
    assert sorted(i for b in first for i in b) == list(range(60))
    for batch in first:
        signs = {lengths[i] > 0 for i in batch}
        assert len(signs) == 1


def test_length_grouping_cuts_padding_at_least_in_half():
    import random

    rng = random.Random(0)
    # LLaVA-Med-like spread: short VQA answers to long multi-turn conversations
    lengths = [int(rng.lognormvariate(5.0, 0.8)) + 200 for _ in range(2000)]
    grouped = _padding(lengths, LengthGroupedBatchSampler(lengths, 16, seed=0))
    plain = _padding(lengths, LengthGroupedBatchSampler(lengths, 16, seed=0, group_by_length=False))
    assert grouped <= plain / 2, (grouped, plain)


def test_auto_grouping_only_when_padding_would_matter():
    uniform = [200 + (i % 3) for i in range(200)]           # single-turn VQA: nearly equal lengths
    varied = [50 + (i * 37) % 900 for i in range(200)]      # conversations of very different lengths
    assert choose_grouping("auto", uniform, 8, 0) is False
    assert choose_grouping("auto", varied, 8, 0) is True
    assert choose_grouping(True, uniform, 8, 0) is True


@pytest.mark.parametrize("setting, message", [
    ("lr=-1", "'lr' must be > 0; got -1.0"), ("lr=.nan", "'lr' must be > 0"), ("epochs=0", "'epochs' must be > 0"),
    ("max_steps=-5", "'max_steps' must be >= 1"), ("batch_size=0", "'batch_size' must be >= 1; got 0"),
    ("grad_accum=0", "'grad_accum' must be >= 1"), ("warmup_ratio=1.5", "'warmup_ratio' must be in [0, 1)"),
    ("max_skip_rate=2", "'max_skip_rate' must be in [0, 1]"), ("lora.r=0", "'lora.r' must be >= 1"),
])
def test_values_out_of_range_are_refused_at_load_naming_the_field(tmp_path, setting, message):
    assert message in _refusal(tmp_path, overrides=[setting])


@pytest.mark.parametrize("setting, message", [
    ("trainable=projecter", "unknown part 'projecter'; did you mean 'projector'?"),
    ("trainable=projector+lmm", "unknown part 'lmm'; did you mean 'llm'?"),
    ("trainable=lora+llm", "not both"),
    ("template=plian", "'template: plian' is not a template; did you mean 'plain'?"),
    ("template=vicuna", "did you mean 'vicuna_v1'?"),
    ("model={preset: tiyn}", "did you mean 'tiny'?"),
])
def test_trainable_template_and_preset_are_checked_at_load_with_did_you_mean(tmp_path, setting, message):
    assert message in _refusal(tmp_path, overrides=[setting])


def test_every_registered_template_is_accepted():
    from medvlm.config import template_names

    for name in template_names():
        assert load_stage(data={"template": name}).template == name


def test_config_changes_name_each_changed_setting_and_ignore_harmless_ones_in_the_hash():
    from medvlm.config import config_changes, config_hash, to_dict

    a, b = to_dict(load_stage(data={"lr": 1e-3})), to_dict(load_stage(data={"lr": 2e-3, "log_steps": 5}))
    assert config_changes(a, b) == {"log_steps": "10 → 5", "lr": "0.001 → 0.002"}
    assert config_hash(a) != config_hash(b)
    assert config_hash(a) == config_hash(to_dict(load_stage(data={"lr": 1e-3, "log_steps": 5, "save_steps": 7})))
