"""Quality of head step schedules and the bf16 head on a built-in text-to-image benchmark.

    python -m benchmarks.schedule_quality --ckpt /tmp/demo_base/model --benchmark shapes-t2i \
        --data /tmp/demo_base/data/shapes --limit 40 --seeds 0 1000 2000 \
        --variants constant anneal:20:5 anneal:30:10 constant@bfloat16

Each variant is `SCHEDULE[@HEAD_DTYPE]` (generation.image_steps_schedule, generation.head_dtype);
every variant runs with every base seed, and the table gives the mean and spread (min..max) of
the benchmark's overall score, the mean head steps per token and the seconds per run. A variant
holds quality when its mean lies within the seed spread of `constant`.

The sampler applies both settings itself; this script wraps `model.head.sample`
(benchmarks.common.head_options) so that it can count the head steps run. `--limit 0` takes the
whole benchmark; `--batch-size 64 --samples-per-prompt 4` are the demo's evaluation settings.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import yaml

from benchmarks.common import head_options
from omni.config import GenerationConfig

DTYPES = {"float32": None, "bfloat16": torch.bfloat16}


def main(argv: list[str] | None = None) -> int:
    from omni.eval.harness import evaluate
    from omni.inference.generate import load

    p = argparse.ArgumentParser(prog="python -m benchmarks.schedule_quality", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--benchmark", default="shapes-t2i")
    p.add_argument("--data", default=None)
    p.add_argument("--limit", type=int, default=40, help="prompts (0: all)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1000, 2000])
    p.add_argument("--variants", nargs="+", default=["constant", "anneal:20:5", "anneal:30:10"])
    p.add_argument("--gen", nargs="*", default=[], help="KEY=VALUE generation overrides for every variant")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=16, help="rows sampled together (the demo evaluates 64)")
    p.add_argument("--samples-per-prompt", type=int, default=None,
                   help="images per prompt (the benchmark's default; the demo draws 4 for shapes-t2i)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    model = load(a.ckpt, device="cpu")
    gen = {k: yaml.safe_load(v) for k, v in (x.split("=", 1) for x in a.gen)}
    rows = []
    for variant in a.variants:
        schedule, _, dtype = variant.partition("@")
        GenerationConfig(image_steps_schedule=schedule)  # refuse a bad schedule before running anything
        scores, seconds, metrics, stats = [], [], {}, {}
        for seed in a.seeds:
            with tempfile.TemporaryDirectory() as out, head_options(model, schedule, DTYPES[dtype or "float32"], stats):
                t = time.perf_counter()
                res = evaluate(model, a.benchmark, out, data=a.data, limit=a.limit or None, seed=seed, gen_overrides=gen,
                               batch_size=a.batch_size, samples_per_prompt=a.samples_per_prompt, progress=False,
                               report=False)
                seconds.append(time.perf_counter() - t)
            scores.append(res["overall"])
            for k, v in res.get("metrics", {}).items():  # continuous metrics (e.g. Frechet distance) if any
                metrics.setdefault(k, []).append(v)
            extra = "".join(f", {k} {v:.3f}" for k, v in res.get("metrics", {}).items())
            print(f"  {variant:<24} seed {seed:>5}: overall {res['overall']:.3f}{extra} ({res['n_samples']} samples, "
                  f"{seconds[-1]:.1f} s)", flush=True)
        rows.append({"variant": variant, "mean": statistics.mean(scores), "min": min(scores), "max": max(scores),
                     "metrics": {k: (statistics.mean(v), min(v), max(v)) for k, v in metrics.items()},
                     "steps_per_token": stats["steps"] / stats["calls"], "seconds": statistics.mean(seconds)})
    print(f"\n{a.benchmark}, {a.limit} prompts, seeds {a.seeds}, {a.ckpt}")
    names = list(rows[0]["metrics"])
    print("| variant | overall mean (min..max) | " + "".join(f"{k} mean (min..max) | " for k in names)
          + "head steps / token | s / run |")
    print("|---" * (4 + len(names)) + "|")
    for r in rows:
        cells = [f"{r['mean']:.3f} ({r['min']:.3f}..{r['max']:.3f})",
                 *(f"{m:.3f} ({lo:.3f}..{hi:.3f})" for m, lo, hi in (r["metrics"][k] for k in names))]
        print(f"| {r['variant']} | " + " | ".join(cells) + f" | {r['steps_per_token']:.1f} | {r['seconds']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
