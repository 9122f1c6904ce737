"""``medvlm ingest pmc|merge|alignment|instruct``: PMC (Cloud Service or legacy) → pairs → training data."""

from __future__ import annotations

import sys
from pathlib import Path


def register(sub) -> None:
    ingest = sub.add_parser("ingest", help="PubMed Central OA packages → pairs → training data")
    steps = ingest.add_subparsers(title="ingest commands", metavar="STEP")
    _register_pmc(steps)
    _register_merge(steps)
    _register_alignment(steps)
    _register_instruct(steps)


def _register_pmc(steps) -> None:
    pmc = steps.add_parser("pmc", help="PMC articles → figure-caption pairs: s3://pmc-oa-opendata, a local "
                           "Cloud Service mirror (PMCID.N/ folders), or legacy .tar.gz / folders / .nxml")
    pmc.add_argument("inputs", nargs="+", help="s3://BUCKET[/PREFIX] (with --pmcids), or local folders, "
                     "article-version folders, packages or XML files")
    pmc.add_argument("--out", required=True, help="output folder: pairs-*.parquet, images/, report.json")
    pmc.add_argument("--pmcids", help="(s3://) PMCIDs to fetch, one per line (PMC123 or PMC123.2), or PMC's S3 "
                     "inventory CSV (.csv/.csv.gz)")
    pmc.add_argument("--endpoint-url", help="(s3://) any S3-compatible endpoint, e.g. a lab's MinIO mirror "
                     "(default: AWS, unsigned)")
    pmc.add_argument("--concurrency", type=int, default=16, help="(s3://) articles fetched at once")
    pmc.add_argument("--timeout", type=float, default=30.0, help="(s3://) seconds per request")
    pmc.add_argument("--retries", type=int, default=5, help="(s3://) retries per request, with backoff")
    pmc.add_argument("--signed", action="store_true", help="(s3://) sign requests with your AWS credentials "
                     "(private mirrors; PMC's bucket needs none)")
    pmc.add_argument("--oa-file-list", help="legacy oa_file_list.csv: keep only listed articles, take their licenses")
    pmc.add_argument("--license", dest="licenses", action="append",
                     help="allowed license (repeatable), e.g. --license 'CC BY' --license CC0; matched against "
                     "the metadata's license_code, else the JATS <license>")
    pmc.add_argument("--num-proc", type=int, default=1, help="parser processes")
    pmc.add_argument("--shard", help="i/n: process every n-th article starting at i (cluster array jobs)")
    pmc.add_argument("--min-caption-chars", type=int, default=20, help="skip figures with shorter captions")
    pmc.add_argument("--max-caption-chars", type=int, default=4000, help="skip figures with longer captions")
    pmc.add_argument("--min-image-side", type=int, default=64, help="skip images smaller than this (pixels)")
    pmc.add_argument("--max-image-mb", type=float, default=64.0, help="skip figure files larger than this, unread")
    pmc.add_argument("--max-image-pixels", type=int, default=64_000_000,
                     help="skip images with more pixels than this, undecoded")
    pmc.add_argument("--rows-per-shard", type=int, default=10_000, help="pairs per Parquet shard")
    pmc.set_defaults(handler=run_pmc)


def _register_merge(steps) -> None:
    merge = steps.add_parser("merge", help="shard outputs of `ingest pmc` → one pairs table, images repeated "
                             "across shards removed (earliest article kept)")
    merge.add_argument("inputs", nargs="+", metavar="OUT", help="folders `medvlm ingest pmc` wrote")
    merge.add_argument("--out", required=True, help="new output folder: pairs-*.parquet, images/ (hard links), "
                       "report.json")
    merge.add_argument("--near-duplicates", action="store_true",
                       help="also remove perceptual near-duplicates (phash; costs an image decode per pair)")
    merge.add_argument("--max-distance", type=int, default=4, help="phash bits that may differ in a near-duplicate")
    merge.add_argument("--num-proc", type=int, default=4, help="threads hashing images for --near-duplicates")
    merge.add_argument("--rows-per-shard", type=int, default=10_000, help="pairs per Parquet shard")
    merge.set_defaults(handler=run_merge)


def _register_alignment(steps) -> None:
    align = steps.add_parser("alignment", help="pairs → stage-1 concept-alignment conversations (LLaVA JSON)")
    align.add_argument("--pairs", required=True, help="the folder `medvlm ingest pmc` wrote")
    align.add_argument("--out", required=True, help="output JSON file")
    align.add_argument("--modality", action="append", help="keep only this modality tag (repeatable), e.g. CT")
    align.add_argument("--prompts", help="file of brief-description instructions, one per line")
    align.add_argument("--seed", type=int, default=0, help="seed for choosing each pair's instruction")
    align.add_argument("--limit", type=int, help="at most this many conversations")
    align.set_defaults(handler=run_alignment)


def _register_instruct(steps) -> None:
    from pmc_ingest.instruct import InstructOptions
    from pmc_ingest.instruct_presets import PRESETS

    defaults = InstructOptions()
    instruct = steps.add_parser("instruct", help="pairs → GPT-written instruction conversations (any OpenAI-compatible URL)")
    instruct.add_argument("--pairs", required=True, help="the folder `medvlm ingest pmc` wrote")
    instruct.add_argument("--out", required=True, help="output folder: instruct.json, cache.jsonl, summary.json")
    instruct.add_argument("--model", default=defaults.model, help="model name the endpoint serves")
    instruct.add_argument("--base-url", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (default: OpenAI)")
    instruct.add_argument("--api-key-env", default=defaults.api_key_env, help="environment variable holding the key")
    instruct.add_argument("--max-concurrency", type=int, default=defaults.max_concurrency, help="requests in flight at once")
    instruct.add_argument("--max-retries", type=int, default=defaults.max_retries, help="retries of a rate-limited or failed request")
    instruct.add_argument("--timeout", type=float, default=defaults.timeout, help="seconds per request")
    instruct.add_argument("--temperature", type=float, default=defaults.temperature, help="sampling temperature")
    instruct.add_argument("--max-tokens", type=int, default=defaults.max_tokens, help="completion tokens per request")
    instruct.add_argument("--no-mentions", dest="with_mentions", action="store_false",
                          help="leave the inline mentions out of the prompt (LLaVA-Med's 60K vs 60K-IM)")
    instruct.add_argument("--preset", choices=list(PRESETS), default=defaults.preset,
                          help="prompt and record recipe: medvlm's, or LLaVA-Med's instruct_generate/postprocess "
                               "(its prompts read from --llava-med-repo)")
    instruct.add_argument("--llava-med-repo", help="your clone of microsoft/LLaVA-Med at tag v1.0.0, which --preset "
                                                   "llava_med reads its prompts from (default: $MEDVLM_LLAVA_MED_REPO)")
    instruct.add_argument("--budget-usd", type=float, help="never send a request that could cross this spend")
    instruct.add_argument("--max-tokens-total", type=int, help="never send a request that could cross this many tokens")
    instruct.add_argument("--max-consecutive-failures", type=int, default=defaults.max_consecutive_failures,
                          help="stop the run after this many failed requests in a row (a wrong URL or dead server)")
    instruct.add_argument("--prices", dest="prices_file", help="USD per 1M tokens per model (default: prompts/prices.json)")
    instruct.add_argument("--modality", dest="modalities", action="append", help="only pairs with this modality tag")
    instruct.add_argument("--limit", type=int, help="at most this many pairs")
    instruct.add_argument("--sample", type=int, help="a seeded random sample of this many pairs")
    instruct.add_argument("--seed", type=int, default=defaults.seed, help="seed of --sample")
    instruct.add_argument("--system-prompt", dest="system_file", help="replace prompts/instruct_system.txt")
    instruct.add_argument("--fewshot", dest="fewshot_file", help="replace prompts/instruct_fewshot.jsonl")
    instruct.add_argument("--dry-run", action="store_true", help="write the prompts (prompts.jsonl) and a token and dollar estimate; no network")
    instruct.set_defaults(handler=run_instruct)


def run_pmc(args) -> int:
    from medvlm.cli import errors
    from pmc_ingest.pairs import IngestOptions, ingest_pmc

    options = IngestOptions(
        min_caption_chars=args.min_caption_chars, max_caption_chars=args.max_caption_chars,
        min_image_side=args.min_image_side, max_image_bytes=int(args.max_image_mb * 2**20),
        max_image_pixels=args.max_image_pixels, licenses=args.licenses, num_proc=args.num_proc, shard=args.shard,
        oa_file_list=args.oa_file_list, rows_per_shard=args.rows_per_shard, pmcids=args.pmcids,
        endpoint_url=args.endpoint_url, concurrency=args.concurrency, timeout=args.timeout, retries=args.retries,
        signed=args.signed)
    report = ingest_pmc(args.inputs, args.out, options)
    print(report.summary())
    out = Path(args.out)
    print(f"pairs: {out / 'pairs-*.parquet'} ({len(report.shards)} shard(s)); images: {out / 'images'}; "
          f"report: {out / 'report*.json'}")
    if getattr(report, "retry_later", 0):
        return errors.INTERRUPTED  # published what it has; the same command retries the rest
    if report.pairs_kept == 0:
        print("medvlm: error: no pairs were kept; see the report for why (bad inputs, filters)", file=sys.stderr)
        return errors.RUN_FAILED
    return 0


def run_merge(args) -> int:
    from pmc_ingest.merge import MergeOptions, merge_pairs

    report = merge_pairs(args.inputs, args.out, MergeOptions(
        near_duplicates=args.near_duplicates, max_distance=args.max_distance, num_proc=args.num_proc,
        rows_per_shard=args.rows_per_shard))
    out = Path(args.out)
    print(report.summary())
    print(f"pairs: {out / 'pairs-*.parquet'} ({len(report.shards)} shard(s)); images: {out / 'images'}; "
          f"report: {out / 'report.json'}")
    return 0


def run_alignment(args) -> int:
    from pmc_ingest.alignment import write_alignment

    count = write_alignment(args.pairs, args.out, seed=args.seed, modalities=args.modality,
                            prompts_file=args.prompts, limit=args.limit)
    print(f"{count} alignment conversations written to {Path(args.out)} (image paths relative to {Path(args.pairs)})")
    return 0


def run_instruct(args) -> int:
    import dataclasses

    from pmc_ingest.instruct import InstructOptions, dry_run, generate_instructions

    fields = {f.name for f in dataclasses.fields(InstructOptions)}
    options = InstructOptions(**{k: v for k, v in vars(args).items() if k in fields and v is not None})
    if args.dry_run:
        out = Path(args.out) / "prompts.jsonl"
        info = dry_run(args.pairs, out, options)
        cost = (f" (about ${info['estimated_prompt_usd']:,.2f}, at most ${info['max_total_usd']:,.2f} with replies "
                f"at {args.model}'s price)" if info["max_total_usd"] is not None
                else f" (no price for {args.model} in the prices file, so no dollar estimate)")
        print(f"{info['requests']} prompts written to {out}; about {info['estimated_prompt_tokens']:,} prompt tokens, "
              f"at most {info['max_total_tokens']:,} tokens with replies{cost}")
        return 0
    summary = generate_instructions(args.pairs, args.out, options)
    out = Path(args.out)
    print(summary.text())
    print(f"instruction data: {out / 'instruct.json'} (images relative to {Path(args.pairs)}); "
          f"cache: {out / 'cache.jsonl'}; summary: {out / 'summary.json'}")
    return 0
