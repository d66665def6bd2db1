"""The demo's whole training step on the CPU, as `omni demo` runs it: loader, forward, backward,
clipping, optimizer, EMA, logging. Variants, each a fresh `omni train` of the demo's main stage:

  before        torch AdamW foreach, DeepSpeed's gradient all-reduce kept (one process, ZeRO-0)
  fused         torch AdamW fused (one kernel over every tensor), all-reduce kept
  now           fused, and no all-reduce on one process (omni.train.engine.setup_engine)

    python -m benchmarks.bench_step [--data DEMO_OUT] [--steps 200] [--out DIR]

`--data` reads an `omni demo` output directory's shards, tokenizer and autoencoder (the demo's own
data); without it a small copy of the demo's data is built first (~1 min). The variants run in the
order before, fused, now, now, fused, before, so the machine's drift hits them alike; the figure of
a run is the median logged s/step after its first interval (which holds the compile). Also timed:
the data loader alone (ms per batch, and the layout's share of it).

    python -m benchmarks.bench_step --split [--data DEMO_OUT] [--steps 200]

instead says where one step of today's engine goes: the loop's parts timed in place (loader,
forward, backward, `engine.step` = clipping + AdamW, EMA, the rest), then torch's profiler over the
last `--profile-steps` steps, the kernels with the most self CPU time (docs/performance.md, "Where
the demo's step goes").
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from benchmarks.common import write_result

VARIANTS = ("before", "fused", "now")


@contextlib.contextmanager
def variant(name: str):
    """The engine as it was built before (`before`), with the fused optimizer only, or as it is."""
    from omni.train import engine as engine_mod

    if name == "now":
        yield
        return
    adamw, setup = torch.optim.AdamW, engine_mod.setup_engine

    class ForeachAdamW(adamw):
        def __init__(self, *args, fused=None, **kwargs):
            super().__init__(*args, foreach=True, **kwargs)

    def keep_all_reduce(cfg, model, world_size):
        engine, ds_config = setup(cfg, model, world_size)
        engine.enable_backward_allreduce = True
        return engine, ds_config

    with mock.patch.object(engine_mod, "setup_engine", keep_all_reduce), \
            (mock.patch("torch.optim.AdamW", ForeachAdamW) if name == "before" else contextlib.nullcontext()):
        yield


def demo_data(root: Path) -> Path:
    """A small copy of the demo's data in `root` (the tiny preset's mix, fewer documents)."""
    from omni import demo

    paths = demo.data_paths(root)
    cfg = demo.train_config(root, paths, [])
    demo.build_data(root, n_train=6000, n_val=100, force=False, ae_steps=300, train_mix=demo.shapes_train_mix(cfg),
                    n_vqa=50, heldout_scale=0.05)
    return root


def train_run(data: Path, out: Path, steps: int, name: str) -> dict[str, Any]:
    from omni import demo
    from omni.train.loop import train

    log_every = 25
    cfg = demo.train_config(data, demo.data_paths(data), [
        f"train.out_dir={out}", f"train.steps={steps}", f"train.log_every={log_every}", "train.val_every=0",
        f"train.save_every={steps}", "train.warmup_steps=20"])
    with variant(name):
        t = time.perf_counter()
        train(cfg)
        wall = time.perf_counter() - t
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    per_step = [r["s_per_step"] for r in recs if r["kind"] == "train" and r["step"] > log_every]
    return {"variant": name, "median_s_per_step": round(statistics.median(per_step), 4),
            "best_s_per_step": round(min(per_step), 4), "wall_s": round(wall, 1),
            "final_loss": round(recs[-1]["loss"], 4) if recs else None}


def loader_ms(data: Path, batches: int = 200) -> dict[str, float]:
    """The demo's training stream alone: ms per batch, and the layout's part of it."""
    from omni import demo
    from omni.data import loader
    from omni.models.model import OmniModel

    cfg = demo.train_config(data, demo.data_paths(data), [])
    model = OmniModel.from_config(cfg.model)
    spent: collections.Counter = collections.Counter()
    layout = loader.layout

    def timed_layout(*args, **kwargs):
        t = time.perf_counter()
        try:
            return layout(*args, **kwargs)
        finally:
            spent["layout"] += time.perf_counter() - t

    with mock.patch.object(loader, "layout", timed_layout):
        it = iter(loader.BatchStream(cfg.data, model.tokenizer, model.image_tokenizer, seed=0, groups=model.groups,
                                     order=model.order, choices=model.group_choices))
        next(it)
        spent.clear()
        t = time.perf_counter()
        for _ in range(batches):
            next(it)
        total = time.perf_counter() - t
    return {"ms_per_batch": round(1e3 * total / batches, 2), "layout_ms_per_batch": round(1e3 * spent["layout"] / batches, 2)}


PARTS = ("loader", "forward", "backward", "optimizer", "ema")


@contextlib.contextmanager
def timed_parts(first: int, last: int, profile_steps: int = 0):
    """Patch `omni.train.loop` so the parts of every step from `first` to `last - profile_steps` are
    timed (ms a step in the yielded dict once the run is over), and the last `profile_steps` steps
    run under torch's profiler (the 8 kernels with the most self CPU time, with their share)."""
    from omni.train import loop

    spent: collections.Counter = collections.Counter()
    state: dict[str, Any] = {"on": False}
    result: dict[str, Any] = {}
    stop_timing = last - profile_steps

    def timed(part: str, fn):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if state["on"]:
                    spent[part] += time.perf_counter() - t
        return wrapper

    def advance_hook(advance):
        def wrapper(step: int) -> None:
            if step == first:
                state.update(on=True, t0=time.perf_counter())
            if step == stop_timing:
                state["on"] = False
                n = stop_timing - first
                wall = time.perf_counter() - state["t0"]
                ms = {part: round(1e3 * spent[part] / n, 2) for part in PARTS}
                ms["rest"] = round(1e3 * (wall - sum(spent.values())) / n, 2)
                result.update(steps_timed=n, ms_per_step=round(1e3 * wall / n, 2), parts_ms=ms)
                if profile_steps:
                    state["prof"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                    state["prof"].__enter__()
            if step == last and state.get("prof") is not None:
                prof = state.pop("prof")
                prof.__exit__(None, None, None)
                events = prof.key_averages()
                total = sum(e.self_cpu_time_total for e in events) or 1.0
                top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
                result["kernels"] = [{"name": e.key[:80], "self_share": round(e.self_cpu_time_total / total, 3),
                                      "calls_per_step": round(e.count / profile_steps, 1)} for e in top]
            advance(step)
        return wrapper

    prepare = loop.prepare

    def prepare_timed(*args, **kwargs):
        run = prepare(*args, **kwargs)
        run.engine.backward = timed("backward", run.engine.backward)
        run.engine.step = timed("optimizer", run.engine.step)
        run.ema.update = timed("ema", run.ema.update)
        run.monitor.advance = advance_hook(run.monitor.advance)
        return run

    with mock.patch.object(loop, "prepare", prepare_timed), \
            mock.patch.object(loop, "next_batch", timed("loader", loop.next_batch)), \
            mock.patch.object(loop, "forward", timed("forward", loop.forward)):
        yield result


def split_run(data: Path, out: Path, steps: int, profile_steps: int = 20) -> dict[str, Any]:
    """One run of the demo's main stage as `omni train` runs it today, split by part and kernel."""
    from omni import demo
    from omni.train.loop import train

    warm = 25  # the first steps hold the compile
    if steps < warm + profile_steps + 10:
        raise ValueError(f"--split needs --steps >= {warm + profile_steps + 10}, got {steps}")
    cfg = demo.train_config(data, demo.data_paths(data), [
        f"train.out_dir={out}", f"train.steps={steps}", "train.log_every=25", "train.val_every=0",
        f"train.save_every={steps}", "train.warmup_steps=20"])
    with timed_parts(warm, steps, profile_steps) as result:
        train(cfg)
    return {"preset": "tiny", "threads": torch.get_num_threads(), "torch": torch.__version__, **result}


def run(data: Path | None, steps: int = 200) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = data or demo_data(root / "data")
        out: dict[str, Any] = {"preset": "tiny", "threads": torch.get_num_threads(), "torch": torch.__version__,
                               "steps_per_run": steps, "loader": loader_ms(data)}
        print(json.dumps({"loader": out["loader"]}), flush=True)
        runs = []
        for i, name in enumerate(VARIANTS + VARIANTS[::-1]):
            runs.append(train_run(data, root / f"run{i}", steps, name))
            print(json.dumps(runs[-1]), flush=True)
    out["runs"] = runs
    med = {v: statistics.median(r["median_s_per_step"] for r in runs if r["variant"] == v) for v in VARIANTS}
    out["s_per_step"] = {v: round(s, 4) for v, s in med.items()}
    out["ratio_to_before"] = {v: round(s / med["before"], 3) for v, s in med.items()}
    print(json.dumps({"s_per_step": out["s_per_step"], "ratio_to_before": out["ratio_to_before"]}), flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--data", type=Path, help="an `omni demo` output directory (default: build a small copy)")
    p.add_argument("--steps", type=int, default=200, help="training steps per run")
    p.add_argument("--out", default=os.environ.get("OUT"), help="directory for step-cpu-tiny.json")
    p.add_argument("--split", action="store_true",
                   help="one run of today's step, split by part and kernel (step-split-cpu-tiny.json)")
    p.add_argument("--profile-steps", type=int, default=20, help="with --split: steps under the profiler")
    a = p.parse_args(argv)
    if a.data is not None and not (a.data / "data" / "tokenizer" / "tokenizer.json").exists():
        p.error(f"--data {a.data}: not an `omni demo` output directory (no data/tokenizer inside); "
                "run `omni demo --out DIR` first, or leave --data out")
    if a.split:
        with tempfile.TemporaryDirectory() as tmp:
            data = a.data or demo_data(Path(tmp) / "data")
            result = split_run(data, Path(tmp) / "run", a.steps, a.profile_steps)
        print(json.dumps(result, indent=1), flush=True)
        write_result(a.out, "step-split-cpu-tiny.json", result)
        return
    write_result(a.out, "step-cpu-tiny.json", run(a.data, a.steps))


if __name__ == "__main__":
    main()
