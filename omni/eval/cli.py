"""`omni eval`: run a benchmark on a checkpoint, resumably, and write results + report.

    omni eval --ckpt runs/tiny/export --benchmark shapes-t2i --out runs/eval/t2i --limit 60
    omni eval --ckpt CKPT --benchmark opening --data OpenING-benchmark/test_data.jsonl \
              --judge http://localhost:8000/v1 --judge-model Qwen2-VL-7B-Instruct
    omni eval --list
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a checkpoint on a benchmark (results.json + report.html, resumable)",
        description="Evaluate a checkpoint. Interrupt and rerun with the same --out to resume: finished "
        "samples are not regenerated.",
    )
    p.add_argument(
        "--ckpt", help="inference checkpoint directory (model.safetensors, config.yaml, tokenizer/)"
    )
    p.add_argument("--benchmark", help="benchmark name (see --list)")
    p.add_argument(
        "--data",
        help="local benchmark files: held-out shards for the built-ins, the published "
        "file for adapters (e.g. evaluation_metadata.jsonl, test_data.jsonl)",
    )
    p.add_argument("--out", help="run directory (default runs/eval/BENCHMARK-CKPTNAME)")
    p.add_argument("--limit", type=int, help="evaluate only the first N prompts")
    p.add_argument("--batch-size", type=int, default=16, help="prompts generated together (default 16)")
    p.add_argument("--seed", type=int, help="base seed; sample i uses seed + i (default: the checkpoint's)")
    p.add_argument("--samples-per-prompt", type=int, help="images per prompt (GenEval: 4)")
    p.add_argument(
        "--gen",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="generation setting override, e.g. --gen cfg_scale=3.0 --gen image_steps=50",
    )
    p.add_argument(
        "--judge",
        metavar="URL",
        help="OpenAI-compatible endpoint for model-judged aspects, "
        "e.g. http://localhost:8000/v1 (without it those aspects are 'not computed')",
    )
    p.add_argument("--judge-model", help="model name sent to the judge endpoint")
    p.add_argument(
        "--judge-key-env",
        default="OMNI_JUDGE_API_KEY",
        help="environment variable holding the judge's API key (default OMNI_JUDGE_API_KEY)",
    )
    p.add_argument("--overwrite", action="store_true", help="delete the run directory and start afresh")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    p.set_defaults(func=run)


def _gen_overrides(items: list[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--gen {item!r} must look like KEY=VALUE (e.g. --gen cfg_scale=3.0)")
        out[key.strip()] = yaml.safe_load(raw)
    return out


def run(args: argparse.Namespace) -> int:
    from omni.eval.harness import evaluate
    from omni.eval.registry import benchmarks

    if args.list:
        for name, cls in benchmarks().items():
            print(f"{name:18s} {cls.description}")
        return 0
    if not args.ckpt or not args.benchmark:
        raise ValueError("omni eval needs --ckpt DIR and --benchmark NAME (see omni eval --list)")
    judge = None
    if args.judge:
        from omni.eval.judges.http import HTTPJudge

        if not args.judge_model:
            raise ValueError("--judge needs --judge-model NAME (the model the endpoint serves)")
        judge = HTTPJudge(args.judge, args.judge_model, api_key_env=args.judge_key_env)
    out = args.out or str(Path("runs") / "eval" / f"{args.benchmark}-{Path(args.ckpt).resolve().name}")
    results = evaluate(
        args.ckpt,
        args.benchmark,
        out,
        data=args.data,
        limit=args.limit,
        judge=judge,
        gen_overrides=_gen_overrides(args.gen),
        batch_size=args.batch_size,
        seed=args.seed,
        samples_per_prompt=args.samples_per_prompt,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    summary = {
        "benchmark": results["benchmark"],
        "overall": results["overall"],
        "tasks": {t: {k: v for k, v in m.items()} for t, m in results["tasks"].items()},
        "metrics": results["metrics"],
    }
    print(json.dumps(summary, indent=1))
    print(f"results: {Path(out) / 'results.json'}\nreport:  {Path(out) / 'report.html'}", file=sys.stderr)
    return 0
