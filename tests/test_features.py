"""The frozen-feature cache gives exactly the uncached loss and skips the vision tower after first use."""

from __future__ import annotations

import torch

from medvlm.trainer import Trainer
from tests.conftest import stage_config


def test_cached_features_give_the_uncached_loss(tmp_path, colour_set):
    from medvlm.features import FeatureCache, embeds_with_image_features
    from medvlm.model import build_tiny

    data, images = colour_set
    bundle = build_tiny()
    trainer = Trainer(stage_config(data, images, tmp_path / "out", feature_cache=False), bundle)
    trainer.setup()
    batch = next(iter(trainer.loader))
    model = trainer.model
    with torch.no_grad():
        plain = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      pixel_values=batch["pixel_values"], labels=batch["labels"]).loss
        cache = FeatureCache(model, bundle.image_processor)
        keys = [f"k{i}" for i in range(batch["pixel_values"].shape[0])]
        first = cache.features_for(model, keys, batch["pixel_values"], list(range(len(keys))), torch.device("cpu"))
        again = cache.features_for(model, keys, None, [], torch.device("cpu"))  # served from the cache
        embeds = embeds_with_image_features(model, batch["input_ids"], again)
        cached = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert torch.equal(first, again) and cache.hits == len(keys) and cache.misses == len(keys)
    assert abs(float(plain) - float(cached)) < 1e-5


def test_training_with_and_without_the_cache_ends_at_the_same_weights(tmp_path, colour_set):
    from medvlm.model import build_tiny

    data, images = colour_set
    with_cache, without = build_tiny(), build_tiny()
    a = Trainer(stage_config(data, images, tmp_path / "a", epochs=2), with_cache)
    a.run()
    assert a.feature_cache is not None and a.feature_cache.misses == 24 and a.feature_cache.hits == 24
    Trainer(stage_config(data, images, tmp_path / "b", epochs=2, feature_cache=False), without).run()
    for (name, p), (_, q) in zip(with_cache.model.named_parameters(), without.model.named_parameters()):
        assert torch.allclose(p, q, atol=1e-5), name


def test_disk_cache_survives_a_new_process_and_is_keyed_by_the_tower(tmp_path, colour_set):
    from medvlm.features import FeatureCache
    from medvlm.model import build_tiny

    data, images = colour_set
    bundle = build_tiny()
    cache = FeatureCache(bundle.model, bundle.image_processor, folder=tmp_path / "features")
    image = next(images.iterdir())
    key = cache.key_for(image)
    cache.put(key, torch.ones(196, 128))
    reopened = FeatureCache(bundle.model, bundle.image_processor, folder=tmp_path / "features")
    assert reopened.has(key) and torch.equal(reopened.get(key), torch.ones(196, 128))
    other = build_tiny(seed=1)  # a different tower: different keys, nothing reused
    assert not FeatureCache(other.model, other.image_processor, folder=tmp_path / "features").has(
        FeatureCache(other.model, other.image_processor).key_for(image))


def test_cache_is_off_when_the_vision_tower_trains(tmp_path, colour_set):
    data, images = colour_set
    trainer = Trainer(stage_config(data, images, tmp_path / "out", trainable="projector+vision", max_steps=1))
    trainer.setup()
    assert trainer.feature_cache is None


def test_loss_on_answer_positions_only_equals_the_full_logits_loss_and_gradients(tmp_path, colour_set):
    from medvlm.conversation import IGNORE_INDEX
    from medvlm.model import build_tiny
    from medvlm.trainer import answer_positions

    data, images = colour_set
    trainer = Trainer(stage_config(data, images, tmp_path / "out", feature_cache=False, trainable="projector+llm"),
                      build_tiny())
    trainer.setup()
    batch = next(iter(trainer.loader))
    labels = batch["labels"].clone()
    labels[0, labels[0] != IGNORE_INDEX] = IGNORE_INDEX        # a row with nothing to learn
    labels[1, (labels[1] != IGNORE_INDEX).nonzero()[0]] = IGNORE_INDEX  # rows of different answer lengths
    model = trainer.model
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "pixel_values": batch["pixel_values"]}
    full = model(**inputs, labels=labels).loss
    full.backward()
    full_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    keep, targets = answer_positions(labels)
    assert int(keep.sum()) == int((labels[:, 1:] != IGNORE_INDEX).sum()) == len(targets) and not keep[0].any()
    logits = model(**inputs, logits_to_keep=keep).logits
    assert logits.shape == (len(targets), model.config.text_config.vocab_size)
    sparse = torch.nn.functional.cross_entropy(logits.float(), targets)
    sparse.backward()
    assert abs(float(full) - float(sparse)) < 1e-6
    for name, grad in full_grads.items():
        assert torch.allclose(grad, dict(model.named_parameters())[name].grad, atol=1e-6), name
    assert answer_positions(torch.full_like(labels, IGNORE_INDEX)) is None
