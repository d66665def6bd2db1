"""The demo's training step on the CPU, eager against compiled (train.compile, model.head.compile).

    python -m benchmarks.bench_compile [--threads 2] [--repeats 8] [--out DIR]

The tiny preset as `omni demo` trains it: 16 packed rows of 160 positions (bench_train.make_batch,
packed: caption, image, text documents with the dense document mask), the trainer's precision
(bf16 autocast where the CPU has native bf16, else fp32),
forward + backward + clip + AdamW. Three copies of one model, the same weights at the start:

  eager          the plain step
  layers         every backbone decoder layer compiled (train.compile=true)
  layers+head    ... and the diffusion head's loss compiled (model.head.compile=true)

Timed in interleaved rounds (best and median of `repeats`), so the machine's drift hits all three
alike; the first (compiling) step of each is reported apart. The losses of the three on one batch
with the same noise are reported as a check (bf16 autocast: equal to about 1e-3; fp32: ~1e-5).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
from typing import Any

import torch

from benchmarks.common import write_result


def run(threads: int = 2, repeats: int = 8) -> dict[str, Any]:
    from benchmarks.bench_train import make_batch, optimizer, stepper
    from benchmarks.common import bench_config, cpu_threads, train_autocast
    from omni.models.backbone import compile_layers
    from omni.models.model import OmniModel

    dev = torch.device("cpu")
    with cpu_threads(dev, threads) as n, tempfile.TemporaryDirectory() as tmp:
        cfg = bench_config("tiny", tmp)
        torch.manual_seed(0)
        base = OmniModel.from_config(cfg.model).train()
        for p in base.parameters():  # leave the zero-initialised start, so every block computes
            p.data.add_(torch.randn_like(p) * 0.02)
        batch = make_batch(base, cfg.data.batch_size, cfg.data.seq_len, 12, 8, packed=True)
        amp, precision = train_autocast(dev)
        models = {"eager": base, "layers": copy.deepcopy(base), "layers+head": copy.deepcopy(base)}
        compile_layers(models["layers"].backbone)
        compile_layers(models["layers+head"].backbone)
        models["layers+head"].head.cfg = copy.copy(models["layers+head"].head.cfg)
        models["layers+head"].head.cfg.compile = True

        def loss_of(model):
            def f():
                torch.manual_seed(1)
                return model(batch)["loss"]
            return f

        with torch.no_grad(), amp():
            losses = {k: round(float(loss_of(m)()), 5) for k, m in models.items()}
        steps = {k: stepper(m, loss_of(m), optimizer(m, dev, cfg.train.lr), amp) for k, m in models.items()}
        first = {}
        for k, step in steps.items():
            t = time.perf_counter()
            step()  # compiles forward and backward
            first[k] = round(time.perf_counter() - t, 2)
            print(json.dumps({"first_step_s": {k: first[k]}}), flush=True)
        for step in steps.values():
            step()
        times: dict[str, list[float]] = {k: [] for k in steps}
        for _ in range(repeats):
            for k, step in steps.items():
                t = time.perf_counter()
                step()
                times[k].append(time.perf_counter() - t)
    out: dict[str, Any] = {"preset": "tiny", "threads": n, "torch": torch.__version__, "precision": precision,
                           "rows": cfg.data.batch_size,
                           "seq_len": cfg.data.seq_len, "tokens": batch.n_tokens, "losses_same_batch": losses,
                           "first_step_s": first, "steps": {}}
    for k, ts in times.items():
        out["steps"][k] = {"best_s": round(min(ts), 4), "median_s": round(statistics.median(ts), 4)}
        print(json.dumps({"step": k, **out["steps"][k]}), flush=True)
    eager = out["steps"]["eager"]["median_s"]
    out["median_ratio_to_eager"] = {k: round(v["median_s"] / eager, 3) for k, v in out["steps"].items()}
    print(json.dumps({"median_ratio_to_eager": out["median_ratio_to_eager"]}), flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--threads", type=int, default=2, help="torch threads (the demo trains on 2)")
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--out", default=os.environ.get("OUT"), help="directory for compile-cpu-tiny.json")
    a = p.parse_args(argv)
    write_result(a.out, "compile-cpu-tiny.json", run(a.threads, a.repeats))


if __name__ == "__main__":
    main()
