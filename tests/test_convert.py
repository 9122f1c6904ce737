"""LLaVA-format checkpoints (LLaVA-1.5 Llama, LLaVA-Med v1.5 Mistral, a stage-1 mm_projector.bin) → HF LLaVA.

The checkpoints are written here in LLaVA's own key layout (``llava_arch.LlavaMetaModel``: the LM's
``model`` holds ``mm_projector`` and ``vision_tower.vision_tower``), with tiny configs. The reference is
LLaVA's forward written out from its parts: the causal LM, the CLIP tower (second-to-last layer, CLS
dropped) and the ``Sequential(Linear, GELU, Linear)`` projector, image features spliced in where LLaVA's
``IMAGE_TOKEN_INDEX`` sits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

WORDS = "what is shown in the image a chest x ray of lung left right yes no".split()
N_PATCHES = (32 // 8) ** 2


def _tokenizer(folder: Path):
    """A word-level tokenizer with bos/eos/unk and no pad token, like LLaMA's; no ``<image>`` token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(folder)
    return tokenizer


def _parts(family: str, vocab: int, seed: int = 0):
    from transformers import (CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                              MistralForCausalLM)

    torch.manual_seed(seed)
    kwargs = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    lm = LlamaForCausalLM(LlamaConfig(**kwargs)) if family == "llama" else MistralForCausalLM(
        MistralConfig(sliding_window=None, **kwargs))
    tower = CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=3, num_attention_heads=4))
    projector = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 64))
    return lm.eval(), tower.eval(), projector.eval()


def write_llava_checkpoint(folder: Path, family: str, tower_in_checkpoint: bool, safetensors: bool, seed: int = 0):
    """A LLaVA-format folder; returns the parts it was made of. Without the tower's weights in it,
    ``mm_vision_tower`` names a local CLIP folder (as LLaVA-1.5's released checkpoints name a hub one)."""
    folder.mkdir(parents=True)
    tokenizer = _tokenizer(folder)
    lm, tower, projector = _parts(family, len(tokenizer), seed)
    state = {k: v for k, v in lm.state_dict().items()}
    state.update({f"model.mm_projector.{k}": v for k, v in projector.state_dict().items()})
    clip_dir = folder.parent / f"{folder.name}-clip"
    tower.save_pretrained(clip_dir)
    if tower_in_checkpoint:
        state.update({f"model.vision_tower.vision_tower.vision_model.{k}": v for k, v in tower.state_dict().items()})
    config = lm.config.to_dict()
    config.update(architectures=["LlavaLlamaForCausalLM" if family == "llama" else "LlavaMistralForCausalLM"],
                  model_type=f"llava_{family}", mm_vision_tower="openai/clip-vit-large-patch14-336"
                  if tower_in_checkpoint else str(clip_dir), mm_projector_type="mlp2x_gelu", mm_hidden_size=32,
                  mm_vision_select_layer=-2, mm_vision_select_feature="patch", mm_use_im_start_end=False,
                  mm_use_im_patch_token=False, image_aspect_ratio="pad", tune_mm_mlp_adapter=False)
    (folder / "config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in state.items()}
    if safetensors:
        from safetensors.torch import save_file

        save_file(state, str(folder / "model.safetensors"))
    else:
        torch.save(state, folder / "pytorch_model.bin")
    return tokenizer, lm, tower, projector, clip_dir


@torch.no_grad()
def llava_reference_logits(lm, tower, projector, before: list[int], after: list[int], pixels: torch.Tensor):
    """LLaVA's encode_images + prepare_inputs_labels_for_multimodal for one image, then the LM."""
    features = projector(tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:])[0]
    embed = lm.get_input_embeddings()
    embeds = torch.cat([embed(torch.tensor(before)), features, embed(torch.tensor(after))])
    return lm(inputs_embeds=embeds[None]).logits[0]


@torch.no_grad()
def converted_logits(folder: Path, before: list[int], after: list[int], pixels: torch.Tensor):
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    ids = torch.tensor([before + [model.config.image_token_id] * N_PATCHES + after])
    return model(input_ids=ids, pixel_values=pixels).logits[0]


@pytest.mark.parametrize("family,tower_in_checkpoint,safetensors,template", [
    ("llama", False, False, "vicuna_v1"),      # LLaVA-1.5: pytorch_model.bin, tower named in config.json
    ("mistral", True, True, "mistral_instruct"),  # LLaVA-Med v1.5: safetensors with model.vision_tower.*
])
def test_a_llava_checkpoint_converts_to_an_hf_folder_with_the_same_logits(tmp_path, family, tower_in_checkpoint,
                                                                         safetensors, template):
    from transformers import AutoConfig, AutoProcessor

    from medvlm.convert import convert
    from medvlm.model import read_metadata

    src = tmp_path / f"llava-{family}"
    tokenizer, lm, tower, projector, clip_dir = write_llava_checkpoint(src, family, tower_in_checkpoint, safetensors)
    if tower_in_checkpoint:  # the CLIP folder gives only the config: its weights must not be the ones used
        from transformers import CLIPVisionModel

        torch.manual_seed(99)
        CLIPVisionModel(tower.config).save_pretrained(clip_dir)
    dst = convert(src, tmp_path / "hf", vision=str(clip_dir) if tower_in_checkpoint else None)

    before = [tokenizer.bos_token_id] + tokenizer.encode("what is shown", add_special_tokens=False)
    after = tokenizer.encode("is it a chest x ray", add_special_tokens=False)
    pixels = torch.randn(1, 3, 32, 32)
    expected = llava_reference_logits(lm, tower, projector, before, after, pixels)
    got = converted_logits(dst, before, after, pixels)
    assert got.shape[0] == expected.shape[0] and got.shape[1] % 64 == 0
    assert torch.allclose(got[:, :expected.shape[1]], expected, atol=1e-5)
    processor = AutoProcessor.from_pretrained(dst)
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == AutoConfig.from_pretrained(dst).image_token_id
    assert processor.tokenizer.pad_token == "<pad>"
    assert read_metadata(dst)["template"] == template


def test_a_llava_checkpoint_loads_as_a_model_source_and_converts_once_into_a_work_folder(tmp_path):
    from medvlm.convert import ensure_converted
    from medvlm.model import load_model

    src = tmp_path / "llava-med"
    write_llava_checkpoint(src, "mistral", tower_in_checkpoint=False, safetensors=True)
    bundle = load_model({"checkpoint": str(src)})            # in memory, e.g. for medvlm train / eval
    assert type(bundle.model).__name__ == "LlavaForConditionalGeneration" and bundle.num_image_tokens == N_PATCHES
    source = ensure_converted({"checkpoint": str(src)}, tmp_path / "run" / "converted")
    folder = Path(source["checkpoint"])
    assert folder.parent == tmp_path / "run" / "converted" and (folder / "COMPLETE").is_file()
    stamp = (folder / "COMPLETE").stat().st_mtime_ns
    assert ensure_converted({"checkpoint": str(src)}, tmp_path / "run" / "converted") == source
    assert (folder / "COMPLETE").stat().st_mtime_ns == stamp   # not converted again
    assert ensure_converted({"preset": "tiny"}, tmp_path / "x") == {"preset": "tiny"}


def test_a_stage1_mm_projector_bin_becomes_a_model_with_that_projector(tmp_path):
    from medvlm.convert import convert
    from medvlm.model import load_checkpoint, projector_state_dict

    _, lm, tower, projector, clip_dir = write_llava_checkpoint(tmp_path / "llava", "llama", False, True)
    llm_dir = tmp_path / "vicuna"
    lm.save_pretrained(llm_dir)
    _tokenizer(llm_dir)
    torch.save({f"model.mm_projector.{k}": v for k, v in projector.state_dict().items()}, tmp_path / "mm_projector.bin")
    with pytest.raises(ValueError, match="--vision CLIP_DIR --llm LM_DIR"):
        convert(tmp_path / "mm_projector.bin", tmp_path / "nope")
    dst = convert(tmp_path / "mm_projector.bin", tmp_path / "hf", vision=str(clip_dir), llm=str(llm_dir))
    loaded = projector_state_dict(load_checkpoint(dst).model)
    assert torch.equal(loaded["linear_1.weight"], projector[0].weight) and torch.equal(loaded["linear_2.bias"], projector[2].bias)


def test_init_projector_accepts_llavas_mm_projector_bin(tmp_path):
    from medvlm.model import build_tiny, load_projector, projector_state_dict

    trained = build_tiny(seed=3)
    llava_names = {f"model.mm_projector.{0 if k.startswith('linear_1') else 2}.{k.split('.', 1)[1]}": v
                   for k, v in projector_state_dict(trained.model).items()}
    (tmp_path / "stage1").mkdir()
    torch.save(llava_names, tmp_path / "stage1" / "mm_projector.bin")
    for source in (tmp_path / "stage1", tmp_path / "stage1" / "mm_projector.bin"):
        fresh = build_tiny(seed=4)
        load_projector(fresh.model, source)
        for key, value in projector_state_dict(trained.model).items():
            assert torch.equal(projector_state_dict(fresh.model)[key], value), key


class Payload:  # a pickled object: torch.load(weights_only=True) must refuse to build it
    def __reduce__(self):
        return (print, ("code ran",))


def test_a_pickle_with_code_is_refused_not_executed(tmp_path, capsys):
    from medvlm.convert import ConvertError, read_weights

    torch.save({"model.mm_projector.0.weight": Payload()}, tmp_path / "mm_projector.bin")
    with pytest.raises(ConvertError, match="weights_only"):
        read_weights(tmp_path / "mm_projector.bin")
    assert "code ran" not in capsys.readouterr().out


def test_a_tower_that_is_neither_local_nor_in_the_checkpoint_asks_for_vision(tmp_path):
    from medvlm.convert import ConvertError, convert

    src = tmp_path / "llava"
    write_llava_checkpoint(src, "llama", tower_in_checkpoint=False, safetensors=True)
    config = json.loads((src / "config.json").read_text())
    config["mm_vision_tower"] = "openai/clip-vit-large-patch14-336"
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConvertError, match="--vision DIR"):
        convert(src, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_medvlm_convert_writes_the_folder_and_refuses_a_non_llava_folder_in_one_line(tmp_path, capsys):
    from medvlm.cli.app import main

    src = tmp_path / "llava"
    write_llava_checkpoint(src, "llama", tower_in_checkpoint=False, safetensors=True)
    assert main(["convert", str(src), str(tmp_path / "hf")]) == 0
    assert "template vicuna_v1" in capsys.readouterr().out and (tmp_path / "hf" / "model.safetensors").is_file()
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert main(["convert", str(tmp_path / "plain"), str(tmp_path / "out")]) == 4   # BAD_INPUT
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a LLaVA-format checkpoint" in err and not (tmp_path / "out").exists()
