"""``medvlm convert SRC DST``: a LLaVA-format checkpoint → a Hugging Face LLaVA folder (medvlm/convert.py)."""

from __future__ import annotations


def register(sub) -> None:
    convert = sub.add_parser("convert", help="LLaVA-1.5 / LLaVA-Med v1.5 / mm_projector.bin → an HF LLaVA folder")
    convert.add_argument("src", help="a LLaVA-format checkpoint folder (LlavaLlamaForCausalLM, LlavaMistralForCausalLM) "
                                     "or a stage-1 mm_projector.bin")
    convert.add_argument("dst", help="output folder (new or empty); written completely or not at all")
    convert.add_argument("--vision", help="local CLIP folder, when the checkpoint's mm_vision_tower is a hub id "
                                          "whose weights are not in the checkpoint (or for a projector alone)")
    convert.add_argument("--llm", help="the language model folder a projector alone was trained with")
    convert.set_defaults(handler=run_convert)


def run_convert(args) -> int:
    from medvlm.convert import convert
    from medvlm.model import read_metadata

    out = convert(args.src, args.dst, vision=args.vision, llm=args.llm)
    print(f"converted {args.src} → {out} (template {read_metadata(out).get('template')}); it loads with "
          "LlavaForConditionalGeneration.from_pretrained and as a model source {checkpoint: DIR}")
    return 0
