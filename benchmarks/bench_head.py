"""The diffusion head alone, MAR's joint modulations against the head's own time path.

    python -m benchmarks.bench_head [--device cpu|cuda] [--time-width 64] [--quick] [--out DIR]

Two heads of the preset's shape (tiny: width 256 x 3 blocks, 256-wide condition; 16-dim tokens)
with random weights (speed does not depend on what they learned): `model.head.time_width=0`
(MAR's net: every adaLN modulation computed per noisy row) and `--time-width N` (the condition's
modulations once per token, an N-wide time path per row; docs/performance.md, "The head's own
time path"). Timed in interleaved rounds (best of n), ratios within one run:

- train: `DiffusionHead.loss` forward + backward for K targets x the preset's noise copies, under
  the trainer's autocast (bf16 where the device computes it natively, with the preset's
  `bf16_train`; fp32 on an AVX2-only CPU), compiled (`model.head.compile`, as the demo trains;
  eager with --quick);
- sample: `DiffusionHead.sample` of B tokens, the preset's generation steps, sampler and CFG
  (2B guided rows), at batch 1, 4, 16 and 64.

On a CPU the benchmark runs on one thread (common.cpu_threads). Each row is printed as it is
measured; `--out` writes head-<device>-<preset>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import torch

from benchmarks.common import (
    cpu_threads,
    interleaved_best,
    machine_info,
    resolve_device,
    train_autocast,
    write_result,
)
from omni.config import Config, load_config
from omni.heads.diffusion import DiffusionHead


def heads(preset: str, time_width: int, token_dim: int, device: torch.device,
          compile_loss: bool) -> tuple[dict[str, DiffusionHead], Config]:
    cfg = load_config(preset)
    out = {}
    for name, width in (("joint", 0), (f"time{time_width}", time_width)):
        torch.manual_seed(0)
        head_cfg = dataclasses.replace(cfg.model.head, time_width=width, compile=compile_loss)
        out[name] = DiffusionHead(head_cfg, token_dim,
                                  cfg.model.backbone.hidden_size).to(device)
    return out, cfg


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--time-width", type=int, default=64)
    p.add_argument("--targets", type=int, default=700, help="training targets K (the demo's mix: ~680 a step)")
    p.add_argument("--token-dim", type=int, default=16, help="image token size (the demo's patch autoencoder: 16)")
    p.add_argument("--quick", action="store_true", help="few repeats, small sizes: a schema check")
    p.add_argument("--out", default=os.environ.get("OUT"))
    args = p.parse_args()
    device = resolve_device(args.device)
    repeats = 2 if args.quick else 10
    with cpu_threads(device, None) as threads:
        models, cfg = heads(args.preset, args.time_width, args.token_dim, device, compile_loss=not args.quick)
        gen = cfg.generation
        dim = cfg.model.backbone.hidden_size
        result = {"preset": args.preset, "device": str(device), "threads": threads, "time_width": args.time_width,
                  "machine": machine_info(device), "train": {}, "sample": {}}

        k = 64 if args.quick else args.targets
        target, cond = torch.randn(k, args.token_dim, device=device), torch.randn(k, dim, device=device, requires_grad=True)

        amp, precision = train_autocast(device)
        result["precision"] = precision

        def train(head: DiffusionHead):
            def run():
                with amp():
                    loss = head.loss(target, cond)
                loss.backward()
            return run

        best = interleaved_best({n: train(h) for n, h in models.items()}, device, repeats, warmup=3)
        names = list(models)
        row = {n: round(best[n] * 1e3, 2) for n in names} | {"ratio": round(best[names[0]] / best[names[1]], 2)}
        result["train"] = {"targets": k, "copies": cfg.model.head.noise_copies, "ms": row}
        print(f"train, {k} targets x {cfg.model.head.noise_copies} copies, fwd+bwd ms: {row}", flush=True)

        steps = 5 if args.quick else gen.image_steps
        for b in (1, 4) if args.quick else (1, 4, 16, 64):
            c, u = torch.randn(b, dim, device=device), torch.randn(b, dim, device=device)

            def sample(head: DiffusionHead, c=c, u=u):
                return lambda: head.sample(c, u, cfg_scale=gen.cfg_scale, steps=steps, sampler=gen.sampler,
                                           temperature=gen.image_temperature)

            best = interleaved_best({n: sample(h) for n, h in models.items()}, device, repeats)
            row = {n: round(best[n] * 1e3, 3) for n in names} | {"ratio": round(best[names[0]] / best[names[1]], 2)}
            result["sample"][str(b)] = row
            print(f"sample batch {b}, {steps} steps, CFG {gen.cfg_scale}, ms: {row}", flush=True)
    write_result(args.out, f"head-{device.type}-{args.preset}{'-quick' if args.quick else ''}.json", result)


if __name__ == "__main__":
    main()
