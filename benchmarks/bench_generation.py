"""Image generation speed: batch 1/4/16, CFG on/off, KV cache vs recompute, head graph, step schedule.

    python -m benchmarks.bench_generation [--preset tiny] [--device cpu|cuda] [--quick]

Text-to-image sampling (mode "image", the call the eval benchmarks make hundreds of times) with a
random-weight model of the preset: speed does not depend on what the weights learned. The tiny
preset is measured with 4-pixel patches, so one image is 64 tokens (the size the KV-cache target
names); bench-1b (the GPU default) draws 256-token images with DDIM 50 and CFG 3. The runs:

- kv_cfg: KV cache, guidance with the unconditional rows in the same batch (omni's design);
- kv_nocfg: cfg_scale 1 (no unconditional rows);
- kv_cfg_two_pass: the unconditional rows as a second backbone pass and a second head call per
  diffusion step (what codebases that double the tokens do), the baseline of the CFG target;
- recompute_cfg: no KV cache, every step recomputes the whole prefix;
- kv_cfg_schedule (CPU) / kv_cfg_graph_schedule (CUDA): the head step schedule `step_schedule`
  (generation.image_steps_schedule, applied around the head by benchmarks.common.head_options);
- kv_cfg_graph (CUDA): the per-token diffusion loop replayed from a CUDA graph
  (generation.cuda_graphs); kv_cfg_graph_bf16_head: the same with the head's matmuls in bf16;
- kv_cfg_step_graph (CUDA): the whole image-token step (embed, backbone on the static KV cache, the
  head's loop under CFG) replayed from one CUDA graph (generation.cuda_graphs + static_cache,
  omni/inference/image_step.py); _schedule / _bf16_head: with the step schedule (the sampler's own
  generation.image_steps_schedule) / the head's matmuls in bf16. On CPU the same settings run the
  fused step eagerly: kv_cfg_fused.

CPU: every run at every batch size, timed in interleaved rounds (best of 3), one line per batch
size. CUDA (`run_plan`): kv_cfg and the three graphed runs at every batch size, the baselines at
batch 1 only, one timed call each, one line per run as it finishes, and runs that would start
past CUDA_BUDGET_S are skipped (named in the row), so the part ends inside 7 minutes.

Reported per run: seconds per batch and per image, image tokens/s, ms per token step (one step
draws one token of every row), ms per image token, the ratio to the memory-bandwidth floor and
the head steps per token; the split of kv_cfg (and on CPU recompute_cfg) time between the
backbone, the diffusion head and the rest (a separate run with timers around `model.decoder` and
`model.head.sample`). The floor is that of kv_cfg (fp32 head, constant steps):

    bytes per token step = backbone weights (no embeddings, no LM head)
                         + head weights used every diffusion step x steps + its adaLN weights once
                         + KV cache read at the mean context, every stream
    floor per batch      = image tokens x bytes per token step / bandwidth

On a GPU the bandwidth is the data-sheet HBM figure by device name (common.GPU_SPECS: H100 3.35
TB/s, H200 4.8 TB/s); on a CPU it is a measured tensor copy, and a tiny model's weights sit in
cache, so there it is no floor, only a scale. On a CPU the benchmark runs on one thread (see
common.cpu_threads).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
import time
from typing import Any

import torch

from benchmarks.common import (
    CORPUS,
    Stopwatch,
    bench_config,
    best_time,
    cpu_threads,
    device_peaks,
    head_options,
    interleaved_best,
    resolve_device,
)

PRESET_OVERRIDES = {"tiny": ["model.image.patch_size=4"]}  # 32 px / 4 = 8 x 8 = 64 tokens
# CUDA: runs that would start later are skipped, so the part ends inside its share of the GPU command
# (benchmarks/gpu.sh gives it less; alone it may take 330 s)
CUDA_BUDGET_S = float(os.environ.get("OMNI_GEN_BUDGET_S", "330"))
FUSED = {"cuda_graphs": True, "static_cache": True}  # the fused image-token step (graphed on CUDA)


def _model(preset: str, tmp: str, dev: torch.device):
    from omni.models.model import OmniModel

    cfg = bench_config(preset, tmp, PRESET_OVERRIDES.get(preset, []))
    torch.manual_seed(0)
    with torch.device(dev) if dev.type == "cuda" else contextlib.nullcontext():  # init ~1B weights on the GPU
        model = OmniModel.from_config(cfg.model)
    model = model.to(dev).eval()
    if dev.type == "cuda":
        model.backbone.to(torch.bfloat16)  # the head and in_proj stay fp32 (the head computes in fp32)
    return model, cfg


def weight_bytes(model, steps: int) -> dict[str, int]:
    """Bytes of weights one image-token step reads (see the module docstring)."""
    bb = model.backbone
    emb = {id(bb.get_input_embeddings().weight), id(bb.get_output_embeddings().weight)}
    backbone = sum(p.nbytes for p in bb.parameters() if id(p) not in emb)
    net = model.head.net
    ada = sum(p.nbytes for m in [*(b.ada for b in net.blocks), net.final_ada, *(net.time_ada or [])]
              for p in m.parameters())
    once = ada + sum(p.nbytes for p in [*net.cond_embed.parameters(), *net.time_embed.parameters()])
    per_step = sum(p.nbytes for p in net.parameters()) - once
    return {"backbone": backbone + sum(p.nbytes for p in model.in_proj.parameters()),
            "head_per_step": per_step, "head_once": once, "head_total": per_step * steps + once}


def kv_bytes_per_step(model, streams: int, context: float) -> float:
    hf = model.backbone.config.get_text_config()
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    kv_heads = hf.num_key_value_heads or hf.num_attention_heads
    elem = next(model.backbone.parameters()).element_size()
    return 2 * hf.num_hidden_layers * kv_heads * head_dim * context * elem * streams


def run(quick: bool = False, preset: str = "tiny", device: str | torch.device | None = None,
        peaks: dict[str, Any] | None = None, threads: int | None = None, matrix: str | None = None) -> dict[str, Any]:
    """Measure the generation matrix for one preset; JSON-able figures (see the module docstring).

    matrix: "cpu" or "cuda", the runs and timing of that device (default: the device's own); the
    tests run the CUDA matrix on a CPU to check its code path before a GPU session spends time on it.
    """
    dev = resolve_device(str(device) if device is not None else None)
    with cpu_threads(dev, threads) as n, tempfile.TemporaryDirectory() as tmp:
        out = _run(quick, preset, dev, peaks or device_peaks(dev), tmp, matrix or dev.type)
    return {**out, "threads": n}


def step_schedule(steps: int) -> str:
    """The schedule measured: DiSA-style, 5 plateaus from `steps` down to a fifth of it."""
    return f"anneal:{steps}:{max(1, steps // 5)}:5"


def run_plan(matrix: str, steps: int, batches: tuple[int, ...]) -> dict[int, dict[str, tuple]]:
    """Per batch size: run name -> (GenerationConfig changes, generate() kwargs, head options).

    CPU: the ratios of the targets at every batch size, and the step schedule. CUDA (bench-1b,
    where one eager image takes seconds): eager vs the head's graphed loop, the schedule and the
    bf16 head on the graphed path at every batch size; the two-pass and recompute baselines at
    batch 1 only, so the whole matrix stays under ~7 minutes on one GPU.
    """
    schedule = {"schedule": step_schedule(steps)}
    base = {"kv_cfg": ({}, {}, {}), "kv_nocfg": ({"cfg_scale": 1.0}, {}, {}),
            "kv_cfg_two_pass": ({}, {"cfg_batching": False}, {}), "recompute_cfg": ({"use_cache": False}, {}, {})}
    if matrix != "cuda":
        return {b: {**base, "kv_cfg_schedule": ({}, {}, schedule), "kv_cfg_fused": (FUSED, {}, {})} for b in batches}
    # The fused step does not call head.sample, so its schedule and head dtype are the sampler's own settings.
    step = {"kv_cfg_step_graph": (FUSED, {}, {}),
            "kv_cfg_step_graph_schedule": ({**FUSED, "image_steps_schedule": step_schedule(steps)}, {}, {}),
            "kv_cfg_step_graph_bf16_head": ({**FUSED, "head_dtype": "bfloat16"}, {}, {})}
    graphed = {"kv_cfg_graph": ({"cuda_graphs": True}, {}, {}),
               "kv_cfg_graph_schedule": ({"cuda_graphs": True}, {}, schedule),
               "kv_cfg_graph_bf16_head": ({"cuda_graphs": True}, {}, {"dtype": torch.bfloat16})}
    first = {"kv_cfg": base.pop("kv_cfg")}  # most important first: a run over the time budget is skipped
    return {b: {**first, **step, **graphed, **(base if b == batches[0] else {})} for b in batches}


def _run(quick: bool, preset: str, dev: torch.device, peaks: dict[str, Any], tmp: str, matrix: str) -> dict[str, Any]:
    from omni.inference.generate import generate

    model, cfg = _model(preset, tmp, dev)
    n_tok = model.image_tokenizer.num_tokens
    steps = 5 if quick else cfg.generation.image_steps
    scale = cfg.generation.cfg_scale if cfg.generation.cfg_scale != 1.0 else 3.0
    base = dataclasses.replace(cfg.generation, image_steps=steps, cfg_scale=scale, use_cache=True,
                               max_new_tokens=n_tok + 2)
    batches = (1, 4) if quick else (1, 4, 16)
    cuda = matrix == "cuda"  # the GPU matrix: sequential runs, each printed, under a time budget
    # CPU: best of 3 in interleaved rounds (a shared machine). CUDA: one timed call per run after
    # one untimed call per batch size (allocator, kernels) and per graphed run (the capture).
    repeats = 1 if quick or cuda else 3
    plan = run_plan(matrix, steps, batches)
    t0 = time.perf_counter()

    def call(b: int, settings: dict, kwargs: dict, head: dict, stats: dict | None = None) -> None:
        prompts = [[CORPUS[i % 6]] for i in range(b)]
        with head_options(model, stats=stats, **head):
            generate(model, prompts, dataclasses.replace(base, **settings), seeds=list(range(b)), mode="image",
                     **kwargs)

    call(2, {}, {}, {})  # warm-up: lazy imports, first allocations
    prompt_positions = len(model.tokenizer.encode(CORPUS[0])) + 1
    bw = peaks["bandwidth_gbs"] * 1e9
    wb = weight_bytes(model, steps)
    table: dict[str, Any] = {}
    for b in batches:
        runs = plan[b]
        context = prompt_positions + 1 + n_tok / 2  # mean positions in the cache while drawing
        step_bytes = wb["backbone"] + wb["head_total"] + kv_bytes_per_step(model, 2 * b, context)
        floor = n_tok * step_bytes / bw  # fp32 head, constant steps: the floor of kv_cfg
        row: dict[str, Any] = {"bandwidth_floor_s": round(floor, 5)}
        stats = {name: {} for name in runs}
        fns = {name: (lambda r=r, b=b, st=stats[name]: call(b, *r, stats=st)) for name, r in runs.items()}
        if cuda:  # one run at a time, each printed as it finishes: a run cut short still reports
            best = {}
            for name, fn in fns.items():
                if time.perf_counter() - t0 > CUDA_BUDGET_S:
                    row.setdefault("skipped", []).append(name)
                    print(f"  batch {b:>2} {name:<24} skipped: past the {CUDA_BUDGET_S} s budget", flush=True)
                    continue
                warm = 1 if name == "kv_cfg" or runs[name][0].get("cuda_graphs") else 0
                best[name] = best_time(fn, dev, repeats=repeats, warmup=warm)
                _record(row, name, best[name], b, n_tok, floor, _head_steps(stats[name], runs[name][0], base, n_tok))
                print(f"  batch {b:>2} {name:<24} " + _line(row[name]), flush=True)
        else:
            best = interleaved_best(fns, dev, repeats=repeats, warmup=0)
            for name, seconds in best.items():
                _record(row, name, seconds, b, n_tok, floor, _head_steps(stats[name], runs[name][0], base, n_tok))
        for name in ("kv_cfg", "recompute_cfg"):  # where the time goes (a separate, timed-around run)
            if name not in row or (cuda and (name != "kv_cfg" or time.perf_counter() - t0 > CUDA_BUDGET_S)):
                continue
            watch = Stopwatch(dev)
            model.decoder = watch.wrap("backbone", model.decoder)
            model.head.sample = watch.wrap("head", model.head.sample)
            try:
                total = best_time(lambda b=b, r=runs[name]: call(b, *r), dev, repeats=1, warmup=0)
            finally:
                del model.decoder, model.head.sample
            row[name]["split"] = {k: round(watch.seconds.get(k, 0.0) / total, 3) for k in ("backbone", "head")}
            row[name]["split"]["other"] = round(1 - sum(row[name]["split"].values()), 3)
        ratios = {"kv_cache_speedup": ("recompute_cfg", "kv_cfg"), "cfg_one_batch_speedup": ("kv_cfg_two_pass", "kv_cfg"),
                  "cfg_cost": ("kv_cfg", "kv_nocfg"), "cuda_graph_speedup": ("kv_cfg", "kv_cfg_graph"),
                  "schedule_speedup": ("kv_cfg", "kv_cfg_schedule"),
                  "graph_schedule_speedup": ("kv_cfg_graph", "kv_cfg_graph_schedule"),
                  "bf16_head_speedup": ("kv_cfg_graph", "kv_cfg_graph_bf16_head"),
                  "step_graph_speedup": ("kv_cfg", "kv_cfg_step_graph"),
                  "step_graph_vs_head_graph": ("kv_cfg_graph", "kv_cfg_step_graph"),
                  "step_graph_schedule_speedup": ("kv_cfg_step_graph", "kv_cfg_step_graph_schedule"),
                  "step_graph_bf16_head_speedup": ("kv_cfg_step_graph", "kv_cfg_step_graph_bf16_head"),
                  "fused_speedup": ("kv_cfg", "kv_cfg_fused")}
        for key, (slow, fast) in ratios.items():
            if slow in row and fast in row:
                row[key] = round(row[slow]["seconds"] / row[fast]["seconds"], 2)
        table[str(b)] = row
        if not cuda:  # one line per batch size as it finishes
            print(f"  batch {b}: " + ", ".join(f"{name} {row[name]['seconds_per_image']:.3f}" for name in runs)
                  + " s/image", flush=True)
    return {
        "preset": preset,
        "device": str(dev),
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "precision": "backbone bf16, head fp32 (bf16 in *_bf16_head)" if dev.type == "cuda" else "fp32",
        "matrix": matrix,
        "image_tokens_per_image": n_tok,
        "token_dim": model.image_tokenizer.token_dim,
        "prompt_positions": prompt_positions,
        "sampler": base.sampler,
        "image_steps": steps,
        "image_steps_schedule": step_schedule(steps),
        "cfg_scale": scale,
        "repeats": repeats,
        "weight_bytes_per_token_step": wb,
        "bandwidth_gbs": peaks["bandwidth_gbs"],
        "batches": table,
    }


def _head_steps(stats: dict, settings: dict, base, n_tok: int) -> dict:
    """The head steps run: counted around head.sample, or (the fused step, which does not call it)
    from the sampler's own schedule, one draw per token."""
    if not settings.get("static_cache"):
        return stats
    from omni.config import steps_for_token

    cfg = dataclasses.replace(base, **settings)
    return {"steps": sum(steps_for_token(cfg, i, n_tok) for i in range(n_tok)), "calls": n_tok}


def _record(row: dict, name: str, seconds: float, b: int, n_tok: int, floor: float, stats: dict) -> None:
    row[name] = {"seconds": round(seconds, 4), "seconds_per_image": round(seconds / b, 4),
                 "image_tokens_per_s": round(b * n_tok / seconds, 1),
                 "ms_per_token_step": round(1000 * seconds / n_tok, 3),  # one step draws b tokens
                 "ms_per_image_token": round(1000 * seconds / (b * n_tok), 3),
                 "over_floor": round(seconds / floor, 2),
                 "head_steps_per_token": round(stats["steps"] / stats["calls"], 2) if stats.get("calls") else None}


def _line(r: dict) -> str:
    return (f"{r['seconds_per_image']:.3f} s/image, {r['ms_per_token_step']:.2f} ms/token step, "
            f"{r['ms_per_image_token']:.3f} ms/image token, {r['over_floor']:.1f}x floor, "
            f"{r['head_steps_per_token']} head steps/token")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", default=None)
    parser.add_argument("--quick", action="store_true", help="batches 1 and 4, 5 diffusion steps, one repeat")
    a = parser.parse_args()
    print(json.dumps(run(quick=a.quick, preset=a.preset, device=a.device), indent=2))
