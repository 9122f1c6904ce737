"""LLaVA's own checkpoint format → Hugging Face ``LlavaForConditionalGeneration`` folders.

Released LLaVA-1.5 (``LlavaLlamaForCausalLM``, e.g. ``liuhaotian/llava-v1.5-7b``) and LLaVA-Med v1.5
(``LlavaMistralForCausalLM``, ``microsoft/llava-med-v1.5-mistral-7b``) checkpoints are a causal LM whose
``model`` also holds the vision tower and projector (LLaVA's ``llava_arch.LlavaMetaModel``), with the
multimodal settings as ``mm_*`` keys in ``config.json``. The key layout, from LLaVA's ``llava_arch.py``
and ``multimodal_encoder/clip_encoder.py`` and transformers' ``convert_llava_weights_to_hf.py``::

    model.embed_tokens / model.layers.* / model.norm   → model.language_model.*
    lm_head                                             → lm_head
    model.mm_projector.0 / model.mm_projector.2        → model.multi_modal_projector.linear_1 / linear_2
    model.vision_tower.vision_tower.vision_model.*     → model.vision_tower.vision_model.*

Config: ``mm_vision_select_layer`` → ``vision_feature_layer``; ``mm_vision_select_feature`` ``patch`` →
``default`` (CLS dropped), ``cls_patch`` → ``full``; only the ``mlp2x_gelu`` projector exists in HF
LLaVA. LLaVA splices image features in at ``IMAGE_TOKEN_INDEX = -200``, outside the vocabulary, so
``<image>`` (and ``<pad>`` when the tokenizer has no pad token) are added as tokens; their embedding rows
are the mean of the others (the image rows are replaced by features, the pad rows are masked).

Most LLaVA-1.5 checkpoints hold no vision weights (the tower loads from ``mm_vision_tower``, a hub id):
pass ``vision=`` a local CLIP folder then. A stage-1 ``mm_projector.bin`` on its own becomes a model with
``vision=`` and ``llm=`` folders. Weights are read from safetensors or with
``torch.load(weights_only=True)``; nothing in a checkpoint is executed. The template LLaVA trained with
is recorded in ``medvlm.json`` (``vicuna_v1`` for Llama/Vicuna, ``mistral_instruct`` for LLaVA-Med v1.5).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from .conversation import chat_template_jinja

LLAVA_ARCHITECTURES = {"LlavaLlamaForCausalLM": "llama", "LlavaMistralForCausalLM": "mistral"}
LLAVA_MODEL_TYPES = {"llava": "llama", "llava_llama": "llama", "llava_mistral": "mistral"}
FAMILY_TEMPLATES = {"llama": "vicuna_v1", "mistral": "mistral_instruct"}  # what LLaVA trained each with
# LLaVA training settings in config.json that are not the language model's
LLAVA_ONLY_KEYS = {"architectures", "model_type", "_name_or_path", "transformers_version", "image_aspect_ratio",
                   "image_grid_pinpoints", "tokenizer_model_max_length", "tokenizer_padding_side", "use_mm_proj",
                   "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "tune_mm_vision_resampler", "unfreeze_mm_vision_tower"}
# configs of the vision towers LLaVA checkpoints name in mm_vision_tower, for checkpoints that carry its weights
KNOWN_VISION = {
    "openai/clip-vit-large-patch14-336": dict(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                                              num_hidden_layers=24, num_attention_heads=16, projection_dim=768,
                                              hidden_act="quick_gelu", layer_norm_eps=1e-5),
    "openai/clip-vit-large-patch14": dict(image_size=224, patch_size=14, hidden_size=1024, intermediate_size=4096,
                                          num_hidden_layers=24, num_attention_heads=16, projection_dim=768,
                                          hidden_act="quick_gelu", layer_norm_eps=1e-5),
}


class ConvertError(ValueError):
    """A checkpoint that cannot be converted; the message names the file and what to do."""


# ------------------------------------------------------------------------------------------ detection
def read_config(path: str | os.PathLike) -> dict:
    file = Path(path) / "config.json"
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise ConvertError(f"{file}: cannot read the model config ({exc})") from exc


def is_llava_format(path: str | os.PathLike) -> bool:
    """A folder in LLaVA's own format (``mm_vision_tower`` in config.json, a ``Llava*ForCausalLM``)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        return False
    config = read_config(path)
    return "mm_vision_tower" in config or any(a in LLAVA_ARCHITECTURES for a in config.get("architectures") or [])


def language_family(config: dict, where: str) -> str:
    for arch in config.get("architectures") or []:
        if arch in LLAVA_ARCHITECTURES:
            return LLAVA_ARCHITECTURES[arch]
    family = LLAVA_MODEL_TYPES.get(config.get("model_type", ""))
    if family is None:
        raise ConvertError(f"{where}: LLaVA checkpoint with architectures {config.get('architectures')} / model_type "
                           f"{config.get('model_type')!r}; medvlm converts LlavaLlamaForCausalLM and LlavaMistralForCausalLM")
    return family


# ------------------------------------------------------------------------------------------ weights
def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder (or one file): safetensors, else ``torch.load(weights_only=True)``."""
    from safetensors.torch import load_file

    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    files = [f for f in files if f.name != "training_args.bin"]
    if not files:
        raise ConvertError(f"{path}: no *.safetensors or *.bin weight files")
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        if file.suffix == ".safetensors":
            weights.update(load_file(str(file)))
            continue
        try:
            weights.update(torch.load(file, map_location="cpu", weights_only=True))
        except Exception as exc:  # pickles with code in them are refused by weights_only
            raise ConvertError(f"{file}: not a plain tensor file torch.load(weights_only=True) can read ({exc}); "
                               "medvlm never unpickles code — re-save it as safetensors") from exc
    return weights


def projector_key(key: str) -> str | None:
    """``model.mm_projector.0.weight`` → ``linear_1.weight`` (LLaVA's Sequential: 0 linear, 1 GELU, 2 linear);
    our own ``linear_1.weight`` unchanged; ``None`` for keys that are not the projector's."""
    if "mm_projector." in key:
        index, _, rest = key.split("mm_projector.", 1)[1].partition(".")
        return {"0": "linear_1", "2": "linear_2"}.get(index, index) + "." + rest
    return key if key.startswith(("linear_1.", "linear_2.")) else None


def hf_key(key: str) -> str | None:
    """LLaVA key → HF LLaVA key; ``None`` for tensors HF LLaVA has no place for (rotary caches)."""
    if key.endswith(".inv_freq"):
        return None
    if "mm_projector." in key:
        return "model.multi_modal_projector." + projector_key(key)
    if key.startswith("model.vision_tower."):  # LLaVA's CLIPVisionTower wraps HF's CLIPVisionModel
        rest = key.removeprefix("model.vision_tower.").removeprefix("vision_tower.").removeprefix("vision_model.")
        return "model.vision_tower." + rest
    if key.startswith("model."):
        return "model.language_model." + key.removeprefix("model.")
    return key


# ------------------------------------------------------------------------------------------ configs
def text_config(config: dict, family: str, vocab_size: int):
    from transformers import AutoConfig

    kept = {k: v for k, v in config.items() if not k.startswith("mm_") and k not in LLAVA_ONLY_KEYS}
    kept["vocab_size"] = vocab_size
    return AutoConfig.for_model(family, **kept)


def vision_parts(config: dict, weights: dict, vision: str | None, where: str):
    """``(vision_config, vision_state_dict or None, image_processor)`` for the tower the checkpoint names."""
    from transformers import AutoImageProcessor, CLIPVisionConfig

    from .model import make_image_processor

    named = config.get("mm_vision_tower") or config.get("vision_tower")
    folder = vision or (named if named and Path(named).is_dir() else None)
    has_weights = any(k.startswith("model.vision_tower.") for k in weights)
    if folder:
        vision_config = CLIPVisionConfig.from_pretrained(folder)
        state = None if has_weights else _tower_weights(folder)
        try:
            processor = AutoImageProcessor.from_pretrained(folder)
        except (OSError, ValueError):
            processor = make_image_processor(vision_config.image_size)
        return vision_config, state, processor
    if has_weights and named in KNOWN_VISION:
        vision_config = CLIPVisionConfig(**KNOWN_VISION[named])
        return vision_config, None, make_image_processor(vision_config.image_size)
    raise ConvertError(f"{where}: the checkpoint's vision tower {named!r} is not a local folder"
                       f"{'' if has_weights else ' and its weights are not in the checkpoint'}; "
                       "pass the CLIP folder with --vision DIR (model source: vision: DIR)")


def _tower_weights(folder: str) -> dict[str, torch.Tensor]:
    """A CLIP folder's vision weights under HF LLaVA's names (transformers reads either CLIP layout)."""
    from transformers import CLIPVisionModel

    tower = CLIPVisionModel.from_pretrained(folder, use_safetensors=True)
    return {"model.vision_tower." + key: value for key, value in tower.state_dict().items()}


def llava_config(config: dict, text, vision_config, image_token_id: int):
    from transformers import LlavaConfig

    projector = config.get("mm_projector_type", "linear")
    if projector != "mlp2x_gelu":
        raise ConvertError(f"mm_projector_type {projector!r}: HF LLaVA has the mlp2x_gelu projector only "
                           "(LLaVA-1.5, LLaVA-Med v1.5); this checkpoint cannot be represented")
    if config.get("mm_use_im_start_end"):
        raise ConvertError("mm_use_im_start_end: true (image start/end tokens) has no HF LLaVA equivalent")
    select = config.get("mm_vision_select_feature", "patch")
    strategy = {"patch": "default", "cls_patch": "full"}.get(select)
    if strategy is None:
        raise ConvertError(f"mm_vision_select_feature {select!r}: expected patch or cls_patch")
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    return LlavaConfig(
        vision_config=vision_config, text_config=text, image_token_id=image_token_id,
        image_seq_length=patches + (strategy == "full"), projector_hidden_act="gelu",
        vision_feature_layer=int(config.get("mm_vision_select_layer", -2)), vision_feature_select_strategy=strategy,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


# ------------------------------------------------------------------------------------------ loading
def load_llava_format(path: str | os.PathLike, vision: str | None = None, dtype: torch.dtype | None = None,
                      attn_implementation: str | None = None):
    """A LLaVA-format folder as a ``LlavaBundle`` holding a plain ``LlavaForConditionalGeneration``."""
    from accelerate import init_empty_weights
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    from .model import IMAGE_TOKEN, LlavaBundle, make_processor

    path = Path(path)
    config = read_config(path)
    family = language_family(config, str(path))
    weights = {new: value for key, value in read_weights(path).items() if (new := hf_key(key)) is not None}
    if "lm_head.weight" not in weights:  # tied embeddings are saved once
        weights["lm_head.weight"] = weights["model.language_model.embed_tokens.weight"]
    vision_config, tower, image_processor = vision_parts(config, weights, vision, str(path))
    weights.update(tower or {})
    if not any(k.startswith("model.multi_modal_projector.") for k in weights):
        raise ConvertError(f"{path}: no model.mm_projector.* weights; is this a LLaVA checkpoint?")

    tokenizer = AutoTokenizer.from_pretrained(path)
    old_vocab = weights["model.language_model.embed_tokens.weight"].shape[0]
    text = text_config(config, family, old_vocab)
    added = _add_special_tokens(tokenizer)
    dtype = dtype or _checkpoint_dtype(config, weights)
    llava = llava_config(config, text, vision_config, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    if attn_implementation:
        llava._attn_implementation = attn_implementation
    with init_empty_weights():
        model = LlavaForConditionalGeneration(llava)
    weights = {k: v.to(dtype) for k, v in weights.items()}
    model.load_state_dict(weights, strict=True, assign=True)
    if added or len(tokenizer) != old_vocab:
        _grow_embeddings(model, len(tokenizer), old_vocab)
    model.config.text_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    template = FAMILY_TEMPLATES[family]
    tokenizer.chat_template = chat_template_jinja(template)
    processor = make_processor(image_processor, tokenizer, vision_config.patch_size, tokenizer.chat_template)
    if llava.vision_feature_select_strategy == "full":
        processor.num_additional_image_tokens = 0
    metadata = {"template": template, "source": f"llava:{path}",
                "image_aspect_ratio": config.get("image_aspect_ratio", "pad"),
                "converted_from": {"architecture": (config.get("architectures") or ["?"])[0],
                                   "mm_vision_tower": config.get("mm_vision_tower")}}
    return LlavaBundle(model, processor, template, metadata)


def _checkpoint_dtype(config: dict, weights: dict) -> torch.dtype:
    name = config.get("torch_dtype") or config.get("dtype")
    if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    return next(iter(weights.values())).dtype


def _add_special_tokens(tokenizer) -> int:
    from .model import IMAGE_TOKEN, PAD_TOKEN, _special

    added = tokenizer.add_tokens([_special(IMAGE_TOKEN)], special_tokens=True)
    if tokenizer.pad_token is None:
        added += tokenizer.add_tokens([_special(PAD_TOKEN)], special_tokens=True)
        tokenizer.pad_token = PAD_TOKEN
    return added


@torch.no_grad()
def _grow_embeddings(model, new_size: int, old_size: int) -> None:
    """Room for the added tokens, padded to a multiple of 64 (tensor cores); new rows are the old mean."""
    model.resize_token_embeddings(new_size, pad_to_multiple_of=64, mean_resizing=False)
    for matrix in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        matrix[old_size:] = matrix[:old_size].float().mean(0).to(matrix.dtype)


# ------------------------------------------------------------------------------------------ converting
def convert(src: str | os.PathLike, dst: str | os.PathLike, vision: str | None = None, llm: str | None = None) -> Path:
    """Write ``src`` (a LLaVA-format folder, or a stage-1 ``mm_projector.bin`` with ``vision`` and ``llm``)
    as an HF LLaVA folder at ``dst``; ``dst`` appears complete or not at all."""
    from .checkpoint import atomic_folder
    from .model import save_folder

    src, dst = Path(src), Path(dst)
    if dst.resolve() == src.resolve():
        raise ConvertError(f"{dst}: the output folder must differ from the checkpoint being converted")
    if dst.exists() and any(dst.iterdir()) and not (dst / "COMPLETE").is_file():
        raise ConvertError(f"{dst}: exists and is not a finished conversion; choose an empty or new folder")
    bundle = _bundle_for(src, vision, llm)
    atomic_folder(dst, lambda tmp: save_folder(bundle, tmp, extra_metadata={"converted": str(src)}))
    return dst


def _bundle_for(src: Path, vision: str | None, llm: str | None):
    from .model import compose, load_projector

    if src.is_file() or (src.is_dir() and not (src / "config.json").is_file() and _projector_file(src)):
        if not (vision and llm):
            raise ConvertError(f"{src}: a projector alone needs the vision tower and LM it was trained with: "
                               "pass --vision CLIP_DIR --llm LM_DIR")
        bundle = compose(vision=vision, llm=llm)
        load_projector(bundle.model, _projector_file(src) if src.is_dir() else src)
        bundle.metadata["source"] = f"projector:{src}"
        return bundle
    if not is_llava_format(src):
        raise ConvertError(f"{src}: not a LLaVA-format checkpoint (config.json has no mm_vision_tower and no "
                           "Llava*ForCausalLM architecture); HF LLaVA folders load as they are")
    return load_llava_format(src, vision=vision)


def _projector_file(folder: Path) -> Path | None:
    for name in ("mm_projector.bin", "mm_projector.safetensors"):
        if (folder / name).is_file():
            return folder / name
    return None


def ensure_converted(source: dict, work_dir: str | os.PathLike, is_main: bool = True) -> dict:
    """A model source whose checkpoint is in LLaVA's format, converted once into ``work_dir`` (keyed by the
    checkpoint's path, its files' names, sizes and times, and ``vision``) and returned as
    ``{checkpoint: converted}``; other sources unchanged. Ranks other than the main one wait for the main
    rank's finished folder."""
    path = source.get("checkpoint") if isinstance(source, dict) else None
    if not path or not is_llava_format(path):
        return source
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in Path(path).iterdir() if f.is_file())
    key = hashlib.sha256(f"{Path(path).resolve()}\n{files}\n{source.get('vision')}".encode()).hexdigest()[:12]
    dst = Path(work_dir) / f"{Path(path).name}-{key}"
    if is_main and not (dst / "COMPLETE").is_file():
        shutil.rmtree(dst, ignore_errors=True)
        print(f"[medvlm] converting LLaVA-format checkpoint {path} → {dst}", flush=True)
        convert(path, dst, vision=source.get("vision"))
    _wait(dst / "COMPLETE")
    return {"checkpoint": str(dst)}


def _wait(marker: Path, poll: float = 2.0) -> None:
    import time

    while not marker.is_file():
        time.sleep(poll)
