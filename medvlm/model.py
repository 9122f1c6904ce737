"""Build, load and save LLaVA models as plain Hugging Face ``LlavaForConditionalGeneration``.

Three sources (``ModelSource`` in ``config.py``):
- ``checkpoint``: a folder that ``LlavaForConditionalGeneration.from_pretrained`` reads (ours, or a
  released HF-format LLaVA such as ``llava-hf/llava-1.5-7b-hf``);
- ``compose``: a CLIP vision encoder folder + a causal LM folder (or a ``.gguf`` file, read through
  transformers' ``gguf_file``) + a fresh ``mlp2x_gelu`` projector, LLaVA-1.5's architecture: features of
  the second-to-last vision layer, CLS token dropped, ``<image>`` added to the tokenizer;
- ``preset: tiny``: CLIP 224/16 (hidden 128, 2 layers) + Llama (hidden 128, 2 layers) + a byte-level
  BPE tokenizer trained on the fly; seconds to build, for tests and the demo.

Every folder we save loads with ``LlavaForConditionalGeneration.from_pretrained`` and
``AutoProcessor.from_pretrained`` alone. ``medvlm.json`` next to the weights records the prompt
template the model was trained with; it is optional metadata, never needed to load the weights.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .conversation import chat_template_jinja

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
METADATA_FILE = "medvlm.json"
PROJECTOR_FILE = "mm_projector.safetensors"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TRAINABLE_PARTS = ("projector", "llm", "lora", "vision")

# The Jinja saved with checkpoints is the template definition training renders (medvlm.conversation).
LLAVA_V1_JINJA = chat_template_jinja("llava_v1")


def unwrap_peft(model):
    """The model inside a peft wrapper (LoRA keeps it, adapters injected), or ``model`` itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@dataclass
class LlavaBundle:
    """A model with everything needed to feed it: processor (image processor + tokenizer) and template."""

    model: Any
    processor: Any
    template: str = "llava_v1"
    metadata: dict = field(default_factory=dict)

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def image_processor(self):
        return self.processor.image_processor

    @property
    def config(self):
        return self.base_model.config

    @property
    def base_model(self):
        """The ``LlavaForConditionalGeneration`` inside a peft wrapper, or the model itself."""
        return unwrap_peft(self.model)

    def use_template(self, name: str) -> None:
        """Talk in template ``name`` from now on: its Jinja becomes the chat template saved with the model,
        so the exported template renders what training rendered (``chat_template`` keeps the LM's own)."""
        jinja = chat_template_jinja(name)
        if jinja is not None:
            self.tokenizer.chat_template = self.processor.chat_template = jinja
        self.template = name

    @property
    def image_token_id(self) -> int:
        return int(self.config.image_token_id)

    @property
    def num_image_tokens(self) -> int:
        return num_image_tokens(self.config)


def num_image_tokens(config) -> int:
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    return patches + (1 if config.vision_feature_select_strategy == "full" else 0)


# --------------------------------------------------------------------------------------- sources
def load_model(source: dict, dtype: torch.dtype | None = None, trust_remote_code: bool = False,
               attn_implementation: str | None = None, quantize: str | None = None) -> LlavaBundle:
    """Dispatch on a model source dict: ``{checkpoint: DIR}``, ``{compose: {...}}`` or ``{preset: tiny}``.

    A ``checkpoint`` in LLaVA's own format (``LlavaLlamaForCausalLM``/``LlavaMistralForCausalLM``) is
    converted in memory (``convert.py``); ``vision: CLIP_DIR`` beside it names its vision tower when the
    checkpoint has no tower weights and its ``mm_vision_tower`` is not a local folder."""
    if quantize not in (None, "none"):
        return load_quantized(source, quantize, trust_remote_code=trust_remote_code)
    extra = {"vision"} if isinstance(source, dict) and "checkpoint" in source else set()
    if not isinstance(source, dict) or len(set(source) - extra) != 1:
        raise ValueError(f"model source must have exactly one of checkpoint/compose/preset, got {source!r}")
    kind, value = next((k, v) for k, v in source.items() if k not in extra)
    if kind == "checkpoint":
        return load_checkpoint(value, dtype=dtype, trust_remote_code=trust_remote_code,
                               attn_implementation=attn_implementation, vision=source.get("vision"))
    if kind == "compose":
        return compose(**value, dtype=dtype, trust_remote_code=trust_remote_code, attn_implementation=attn_implementation)
    if kind == "preset":
        if value != "tiny":
            raise ValueError(f"unknown preset {value!r}; the only preset is 'tiny'")
        return build_tiny()
    raise ValueError(f"unknown model source {kind!r}; use checkpoint, compose or preset")


def load_checkpoint(path: str | os.PathLike, dtype: torch.dtype | None = None, trust_remote_code: bool = False,
                    attn_implementation: str | None = None, vision: str | None = None) -> LlavaBundle:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from .convert import is_llava_format, load_llava_format

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path}: not a model folder (no config.json); pass a folder written by save_pretrained or a stage's checkpoint/"
        )
    if is_llava_format(path):
        return load_llava_format(path, vision=vision, dtype=dtype, attn_implementation=attn_implementation)
    model = LlavaForConditionalGeneration.from_pretrained(
        path, dtype=dtype or "auto", trust_remote_code=trust_remote_code, use_safetensors=True,
        attn_implementation=attn_implementation,
    )
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    metadata = read_metadata(path)
    return LlavaBundle(model, processor, metadata.get("template", "llava_v1"), metadata)


def read_metadata(path: str | os.PathLike) -> dict:
    file = Path(path) / METADATA_FILE
    return json.loads(file.read_text()) if file.is_file() else {}


# --------------------------------------------------------------------------------------- QLoRA
QUANTIZE_CHOICES = ("none", "4bit")
# kept in full precision: the tower (frozen, feeds the feature cache), the projector (trained fully, as
# LLaVA's QLoRA keeps mm_projector) and the LM head / embeddings (the rows of added tokens)
NOT_QUANTIZED = ["model.vision_tower", "model.multi_modal_projector", "lm_head", "model.language_model.embed_tokens"]


def bnb_4bit_config():
    """QLoRA's quantisation (Dettmers et al.; LLaVA's and LLaMA-Factory's 4-bit): NF4, double quantisation,
    bf16 compute; the language model's linear layers only."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=NOT_QUANTIZED)


def _require_bitsandbytes() -> None:
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise RuntimeError("quantize: 4bit needs bitsandbytes: pip install 'bitsandbytes>=0.45' "
                           "(or pip install 'medvlm[qlora]'), or set quantize: none")


def load_quantized(source: dict, quantize: str, trust_remote_code: bool = False) -> LlavaBundle:
    """A model source with its language model in 4-bit NF4 on this process's device (``cuda:$LOCAL_RANK``,
    else the CPU). An HF folder is quantised as it loads; other sources (a preset, ``compose``, a LLaVA-format
    folder) are built in bf16, written to a temporary folder and loaded from there."""
    import tempfile

    from transformers import AutoProcessor, LlavaForConditionalGeneration

    if quantize != "4bit":
        raise ValueError(f"quantize: {quantize!r}; choose one of {', '.join(QUANTIZE_CHOICES)}")
    _require_bitsandbytes()
    path = source.get("checkpoint") if isinstance(source, dict) else None
    from .convert import is_llava_format

    if path is None or is_llava_format(path):
        bundle = load_model(source, dtype=torch.bfloat16, trust_remote_code=trust_remote_code)
        with tempfile.TemporaryDirectory(prefix="medvlm-qlora-") as tmp:
            save_folder(bundle, tmp)
            quantized = load_quantized({"checkpoint": tmp}, quantize)
            quantized.metadata = {**bundle.metadata, "quantize": quantize}
            return quantized
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"
    model = LlavaForConditionalGeneration.from_pretrained(
        path, quantization_config=bnb_4bit_config(), dtype=torch.bfloat16, device_map={"": device},
        trust_remote_code=trust_remote_code, use_safetensors=True)
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    metadata = {**read_metadata(path), "quantize": quantize}
    return LlavaBundle(model, processor, metadata.get("template", "llava_v1"), metadata)


def is_quantized(model) -> bool:
    base = unwrap_peft(model)
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False))


def build_tiny(seed: int = 0) -> LlavaBundle:
    """The ``tiny`` preset: a randomly initialised LLaVA small enough to train on a laptop CPU."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tokenizer = build_tiny_tokenizer()
    vision = CLIPVisionConfig(
        image_size=224, patch_size=16, hidden_size=128, intermediate_size=512,
        num_hidden_layers=2, num_attention_heads=4, projection_dim=128,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(224 // 16) ** 2, projector_hidden_act="gelu",
        vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    processor = make_processor(make_image_processor(224), tokenizer, vision.patch_size, LLAVA_V1_JINJA)
    return LlavaBundle(model, processor, "llava_v1", {"template": "llava_v1", "source": "preset:tiny"})


def build_tiny_tokenizer(vocab_size: int = 2048):
    """A byte-level BPE tokenizer trained on ``data/tiny_corpus.txt``; deterministic for a given corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = (Path(__file__).parent / "data" / "tiny_corpus.txt").read_text().splitlines()
    specials = ["<unk>", "<s>", "</s>", PAD_TOKEN, IMAGE_TOKEN]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token=PAD_TOKEN,
        model_max_length=1024, padding_side="right",
    )
    tokenizer.add_tokens([_special(IMAGE_TOKEN)], special_tokens=True)
    tokenizer.chat_template = LLAVA_V1_JINJA
    return tokenizer


def _special(text: str):
    from tokenizers import AddedToken

    return AddedToken(text, special=True, normalized=False, lstrip=False, rstrip=False)


def make_image_processor(size: int):
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        do_center_crop=True, do_resize=True, do_normalize=True, do_convert_rgb=True,
    )


def make_processor(image_processor, tokenizer, patch_size: int, chat_template: str | None):
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=chat_template, image_token=IMAGE_TOKEN,
    )


def compose(
    vision: str,
    llm: str,
    gguf_file: str | None = None,
    template: str | None = None,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    seed: int = 0,
    attn_implementation: str | None = None,
    random_vision: bool = False,
) -> LlavaBundle:
    """LLaVA-1.5 from parts: CLIP tower + causal LM + a new 2-layer GELU projector.

    ``llm`` may be a folder, a hub-style folder plus ``gguf_file``, or a path ending in ``.gguf``.
    ``random_vision: true`` builds the tower from its config alone with random weights (``vision`` names a
    known tower, e.g. ``openai/clip-vit-large-patch14-336``, or a folder with a config.json): the real
    shapes without the download, for speed and memory checks.
    """
    if gguf_file is None and str(llm).endswith(".gguf"):
        llm, gguf_file = str(Path(llm).parent), Path(llm).name
    tokenizer, language_model = _load_language_model(llm, gguf_file, dtype, trust_remote_code, attn_implementation)
    vision_model = _load_vision_tower(vision, dtype, seed, attn_implementation, random_vision)
    _add_llava_tokens(tokenizer, language_model, gguf_file)
    model = _assemble_llava(vision_model, language_model, tokenizer, seed)
    if template is None:
        template = "chat_template" if getattr(tokenizer, "chat_template", None) else "vicuna_v1"
    processor = _compose_processor(vision, vision_model.config, tokenizer, template, random_vision)
    meta = {"template": template, "source": f"compose:{vision}+{llm}{'/' + gguf_file if gguf_file else ''}"}
    return LlavaBundle(model, processor, template, meta)


def _load_language_model(llm: str, gguf_file: str | None, dtype, trust_remote_code: bool, attn_implementation):
    """``compose`` step 1: the causal LM and its tokenizer (from a folder, or de-quantised from a GGUF file)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm_kwargs = {"trust_remote_code": trust_remote_code}
    if gguf_file:
        lm_kwargs["gguf_file"] = gguf_file
    tokenizer = AutoTokenizer.from_pretrained(llm, **lm_kwargs)
    if attn_implementation:
        lm_kwargs["attn_implementation"] = attn_implementation
    return tokenizer, AutoModelForCausalLM.from_pretrained(llm, dtype=dtype or torch.float32, **lm_kwargs)


def _load_vision_tower(vision: str, dtype, seed: int, attn_implementation, random_vision: bool):
    """``compose`` step 2: the CLIP tower, pretrained or (``random_vision``) random weights of its real shape."""
    from transformers import CLIPVisionModel

    attention = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if random_vision:
        torch.manual_seed(seed)
        return CLIPVisionModel(vision_tower_config(vision), **attention).to(dtype or torch.float32)
    return CLIPVisionModel.from_pretrained(vision, dtype=dtype or torch.float32, **attention)


def _add_llava_tokens(tokenizer, language_model, gguf_file: str | None) -> None:
    """``compose`` step 3: the image token (and a pad token when the LM has none), embeddings resized to fit."""
    added = tokenizer.add_tokens([_special(IMAGE_TOKEN)], special_tokens=True)
    if tokenizer.pad_token is None:
        # Real LMs often ship no pad token; padding with EOS would mask EOS out of the labels' learning.
        added += tokenizer.add_tokens([_special(PAD_TOKEN)], special_tokens=True)
        tokenizer.pad_token = PAD_TOKEN
    if added:
        language_model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    text_config = language_model.config
    if gguf_file:  # GGUF weights are de-quantised as they load: the LM is a plain float model from here on
        text_config.__dict__.pop("quantization_config", None)
        language_model.hf_quantizer = None
    text_config.pad_token_id = tokenizer.pad_token_id


def _assemble_llava(vision_model, language_model, tokenizer, seed: int):
    """``compose`` step 4: a ``LlavaForConditionalGeneration`` holding the two parts and a new projector
    (seeded by ``seed``), tied embeddings kept tied."""
    from accelerate import init_empty_weights
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    vision_config, text_config = vision_model.config, language_model.config
    config = LlavaConfig(
        vision_config=vision_config, text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(vision_config.image_size // vision_config.patch_size) ** 2,
        projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )
    with init_empty_weights():
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = vision_model
    model.model.language_model = language_model.model
    model.lm_head = language_model.lm_head
    torch.manual_seed(seed)
    model.model.multi_modal_projector = LlavaMultiModalProjector(config).to(language_model.dtype)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.language_model.embed_tokens.weight
    model.generation_config = language_model.generation_config
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def _compose_processor(vision: str, vision_config, tokenizer, template: str, random_vision: bool):
    """``compose`` step 5: the tower's image processor (or one built from its size) and the tokenizer, whose
    chat template becomes ``template``'s Jinja unless ``template`` is the tokenizer's own."""
    from transformers import AutoImageProcessor

    try:
        if random_vision:
            raise OSError("no processor files for a tower built from its config")
        image_processor = AutoImageProcessor.from_pretrained(vision)
    except (OSError, ValueError):
        image_processor = make_image_processor(vision_config.image_size)
    if chat_template_jinja(template) is not None or not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = chat_template_jinja(template) or LLAVA_V1_JINJA
    return make_processor(image_processor, tokenizer, vision_config.patch_size, tokenizer.chat_template)


def vision_tower_config(vision: str):
    """The ``CLIPVisionConfig`` of a tower LLaVA checkpoints name (``convert.KNOWN_VISION``) or of a folder."""
    from transformers import CLIPVisionConfig

    from .convert import KNOWN_VISION

    if vision in KNOWN_VISION:
        return CLIPVisionConfig(**KNOWN_VISION[vision])
    if (Path(vision) / "config.json").is_file():
        return CLIPVisionConfig.from_pretrained(vision)
    raise ValueError(f"vision {vision!r}: random_vision needs a known tower ({', '.join(KNOWN_VISION)}) "
                     "or a folder with a config.json")


# --------------------------------------------------------------------------------------- trainable parts
def parse_trainable(policy: str) -> set[str]:
    """``"projector+llm"`` → ``{"projector", "llm"}``; ``lora`` always trains the projector fully too."""
    parts = {p.strip() for p in policy.split("+") if p.strip()}
    unknown = parts - set(TRAINABLE_PARTS)
    if unknown or not parts:
        raise ValueError(
            f"trainable {policy!r}: unknown part(s) {sorted(unknown)}; combine {', '.join(TRAINABLE_PARTS)} with '+', "
            "e.g. 'projector', 'projector+llm', 'lora'"
        )
    if "lora" in parts and "llm" in parts:
        raise ValueError("trainable: choose 'llm' (full) or 'lora' (adapters), not both")
    if "lora" in parts:
        parts.add("projector")
    return parts


def apply_trainable(bundle: LlavaBundle, policy: str, lora: dict | None = None) -> LlavaBundle:
    """Freeze everything, then unfreeze the parts ``policy`` names; ``lora`` wraps the LM with peft."""
    parts = parse_trainable(policy)
    model = bundle.model
    if is_quantized(model):
        if "lora" not in parts:
            raise ValueError(f"trainable: {policy} with a 4-bit model: quantized weights cannot train; "
                             "use trainable: lora (QLoRA) or quantize: none")
        from peft import prepare_model_for_kbit_training

        # fp32 for every weight that is not 4-bit (projector, norms, head); gradient checkpointing is the
        # stage's own choice
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model.requires_grad_(False)
    inner = model.model
    if "projector" in parts:
        inner.multi_modal_projector.requires_grad_(True)
    if "llm" in parts:
        inner.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
    if "vision" in parts:
        inner.vision_tower.requires_grad_(True)
    if "lora" in parts:
        model = _wrap_lora(model, lora or {}, train_vision="vision" in parts)
    bundle.model = model
    return bundle


def _wrap_lora(model, settings: dict, train_vision: bool):
    from peft import LoraConfig, get_peft_model

    targets = settings.get("target_modules") or list(LORA_TARGETS)
    # A bare ["q_proj", "v_proj"] would also match CLIP's attention; restrict to the language model.
    pattern = r"model\.language_model\..*\.(" + "|".join(targets) + r")"
    modules_to_save = ["multi_modal_projector"] + (["vision_tower"] if train_vision else [])
    config = LoraConfig(
        r=int(settings.get("r", 8)), lora_alpha=int(settings.get("alpha", 16)),
        lora_dropout=float(settings.get("dropout", 0.05)), target_modules=pattern,
        modules_to_save=modules_to_save, bias="none", task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def trainable_summary(model) -> dict[str, int]:
    def size(p):  # ZeRO-3 partitions parameters; ds_numel is the full size
        return int(getattr(p, "ds_numel", p.numel()))

    total = sum(size(p) for p in model.parameters())
    trainable = sum(size(p) for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}


# --------------------------------------------------------------------------------------- saving
def merged_model(model):
    """A plain ``LlavaForConditionalGeneration`` with LoRA folded in (the model itself when no LoRA); a 4-bit
    (QLoRA) model comes back de-quantised to bf16."""
    if is_quantized(model):
        return dequantized_merge(model)
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


@torch.no_grad()
def dequantized_merge(model, dtype: torch.dtype = torch.bfloat16):
    """QLoRA export: each 4-bit weight de-quantised to ``dtype`` and its LoRA update added there — not
    re-quantised, as peft's merge into a 4-bit layer does — then the peft wrappers removed (the projector's
    trained copy kept); the result has no quantisation config and saves as a normal folder."""
    from peft.tuners.lora import LoraLayer

    base = unwrap_peft(model)
    base.dequantize(dtype=dtype)   # replaces every bnb Linear4bit, those inside LoRA wrappers included
    for module in base.modules():
        if isinstance(module, LoraLayer):
            layer = module.get_base_layer()
            for adapter in module.active_adapters:
                layer.weight += module.get_delta_weight(adapter).to(layer.weight.dtype)
    plain = model.unload() if hasattr(model, "unload") else base
    return plain.to(dtype)


def save_folder(bundle: LlavaBundle, out_dir: str | os.PathLike, state_dict: dict | None = None,
                extra_metadata: dict | None = None) -> Path:
    """Write an HF folder (weights as safetensors, config, processor, chat template) + ``medvlm.json``.

    LoRA adapters are merged first, so the folder needs neither peft nor medvlm to load.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = merged_model(bundle.model)
    bundle.model = model
    model.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
    bundle.processor.save_pretrained(out_dir)
    metadata = {**bundle.metadata, "template": bundle.template, **(extra_metadata or {})}
    (out_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2))
    return out_dir


def projector_state_dict(model) -> dict[str, torch.Tensor]:
    base = unwrap_peft(model)
    projector = base.model.multi_modal_projector
    if hasattr(projector, "modules_to_save"):  # peft wrapper: the trained copy
        projector = projector.modules_to_save["default"]
    return {k: v.detach().cpu().contiguous() for k, v in projector.state_dict().items()}


def save_projector(model, path: str | os.PathLike) -> Path:
    """Stage-1 output as LLaVA's ``mm_projector.bin``, in safetensors: the projector weights alone."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(projector_state_dict(model), str(path))
    return path


def load_projector(model, path: str | os.PathLike) -> None:
    """LLaVA's ``pretrain_mm_mlp_adapter``: put a stage-1 projector into a model before stage 2.

    ``path``: our ``mm_projector.safetensors`` (or its folder) or LLaVA's own ``mm_projector.bin``
    (read with ``torch.load(weights_only=True)``); LLaVA's keys (``model.mm_projector.0.weight``) and ours
    (``linear_1.weight``) both work."""
    from .convert import projector_key, read_weights

    path = Path(path)
    if path.is_dir():
        path = next((path / name for name in (PROJECTOR_FILE, "mm_projector.bin") if (path / name).is_file()),
                    path / PROJECTOR_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no projector file; pass a stage-1 {PROJECTOR_FILE} or LLaVA's mm_projector.bin")
    renamed = {new: value for key, value in read_weights(path).items() if (new := projector_key(key)) is not None}
    base = unwrap_peft(model)
    projector = base.model.multi_modal_projector
    try:
        projector.load_state_dict(renamed)
    except RuntimeError as exc:
        raise ValueError(f"{path}: projector weights do not fit this model ({exc}); was it trained for the same vision tower and LM?") from exc
