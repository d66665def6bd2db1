"""Parallel image decoding: seconds per image, one token per backbone pass vs a group per pass.

    python -m benchmarks.bench_parallel [--preset tiny] [--device cpu|cuda] [--groups 2,4,8,4+ga] [--quick] [KEY=VALUE ...]

Text-to-image sampling (mode "image", the preset's generation settings: tiny draws 16-token
images with 20 stochastic head steps under CFG 2) with random-weight models of the preset: the
baseline (`model.parallel_image=off`, one image token per pass from the position before it) and
one model per group size k (`model.parallel_image=k`, position queries, docs/parallel.md; `k+ga`:
with the head's group attention, `model.head.group_attention=true`; `k+ga64`: of width 64). Speed
does not depend on what the weights learned, only on the passes and the head calls a schedule
makes, which the benchmark also counts (backbone passes per image, head calls per image).

CPU: batch 1 and 16, every model timed in interleaved rounds (best of 3), one thread (see
common.cpu_threads); the speedup of each k is baseline seconds / its seconds in the same run.
CUDA (bench-1b: 256-token images, DDIM 50, CFG 3): one timed call per (model, batch), a row
printed as each finishes. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from typing import Any

import torch

from benchmarks.common import bench_config, cpu_threads, interleaved_best, machine_info, resolve_device, sync


def _model(preset: str, tmp: str, dev: torch.device, groups: str, overrides: tuple[str, ...] = ()):
    from omni.models.model import OmniModel

    k, _, ga = groups.partition("+ga")  # "4+ga": group attention; "4+ga64": of width 64
    extra = ["model.head.group_attention=true", f"model.head.group_attention_dim={ga or 0}"] if "+ga" in groups else []
    cfg = bench_config(preset, tmp, [f"model.parallel_image={k}", *extra, *overrides])
    torch.manual_seed(0)
    with torch.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        model = OmniModel.from_config(cfg.model)
    model = model.to(dev).eval()
    if dev.type == "cuda":
        model.backbone.to(torch.bfloat16)  # the head and in_proj stay fp32, as bench_generation runs them
    return model, cfg


def _counts(model, gen_cfg) -> dict[str, float]:
    """Backbone passes and head calls of one batch-1 image (the prompt's prefill not counted)."""
    from omni.inference.generate import generate

    passes, calls = [], []
    decoder, sample = model.decoder, model.head.sample
    model.decoder = lambda *a, **k: (passes.append(1), decoder(*a, **k))[1]
    model.head.sample = lambda *a, **k: (calls.append(1), sample(*a, **k))[1]
    try:
        generate(model, [["a red circle left of a blue square."]], gen_cfg, mode="image")
    finally:
        del model.decoder, model.head.sample
    return {"passes_per_image": len(passes) - 1, "head_calls_per_image": len(calls)}


def run(preset: str = "tiny", device: str | None = None, groups: tuple[str, ...] = ("2", "4", "8"),
        batches: tuple[int, ...] = (1, 16), quick: bool = False, threads: int | None = None,
        overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    from omni.inference.generate import generate

    dev = resolve_device(device)
    with cpu_threads(dev, threads) as n, tempfile.TemporaryDirectory() as tmp:
        names = ["off", *groups]
        models = {g: _model(preset, tmp, dev, g, overrides) for g in names}
        gen_cfg = models["off"][1].generation
        if quick:
            gen_cfg = type(gen_cfg)(**{**gen_cfg.__dict__, "image_steps": 4})
        out: dict[str, Any] = {"preset": preset, "device": str(dev), "threads": n, "groups": list(groups),
                               "overrides": list(overrides),
                               "image_tokens": models["off"][0].image_tokenizer.num_tokens,
                               "generation": {"image_steps": gen_cfg.image_steps, "cfg_scale": gen_cfg.cfg_scale,
                                              "sampler": gen_cfg.sampler},
                               "machine": machine_info(dev), "rows": []}
        for g in names:
            out[f"counts_{g}"] = _counts(models[g][0], gen_cfg)
            print(json.dumps({"groups": g, **out[f"counts_{g}"]}), flush=True)
        prompt = ["a red circle left of a blue square."]
        for b in batches:
            def call(g, b=b):
                return lambda: generate(models[g][0], [prompt] * b, gen_cfg, mode="image",
                                        seeds=list(range(b)))
            if dev.type == "cuda":
                best = {}
                for g in names:
                    call(g)()  # warm-up
                    sync(dev)
                    t = time.perf_counter()
                    call(g)()
                    sync(dev)
                    best[g] = time.perf_counter() - t
            else:
                best = interleaved_best({g: call(g) for g in names}, dev, repeats=1 if quick else 3)
            row = {"batch": b, **{f"s_per_image_{g}": round(best[g] / b, 5) for g in names},
                   **{f"speedup_{g}": round(best["off"] / best[g], 3) for g in groups}}
            out["rows"].append(row)
            print(json.dumps(row), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--preset", default=None, help="tiny (CPU default) or bench-1b (CUDA default)")
    p.add_argument("--device", default=None)
    p.add_argument("--groups", default="2,4,8",
                   help="group sizes to compare with one token per pass (K+ga: with the head's group attention)")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--quick", action="store_true", help="4 head steps, one round: a smoke run")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("overrides", nargs="*", help="config overrides for every model, e.g. model.head.time_width=64")
    a = p.parse_args()
    dev = resolve_device(a.device)
    preset = a.preset or ("bench-1b" if dev.type == "cuda" else "tiny")
    res = run(preset, a.device, tuple(a.groups.split(",")), tuple(int(b) for b in a.batches.split(",")), a.quick,
              overrides=tuple(a.overrides))
    text = json.dumps(res, indent=2)
    if a.out:
        from pathlib import Path

        Path(a.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
