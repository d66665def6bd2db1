"""The demo's training step on the CPU with the dense document mask against grouped attention.

    python -m benchmarks.bench_grouped [--data DEMO_OUT] [--batches 40] [--out DIR]

`model.backbone.attn_implementation`: `sdpa` runs every packed row's 160 x 160 attention under
the dense (B, 1, L, L) document mask; `grouped` attends each document on its own, documents of
similar length batched (omni/models/attention.py). Both on the demo's own batches, both stages (the editing-first
stage's documents, then the mix), as `omni demo` trains them: decoder layers compiled, the head's
loss compiled, the trainer's precision (bf16 autocast where the CPU has native bf16, else fp32:
`train.precision=auto`), 2 threads. Two copies of one model, the same weights.

Per stage:
  step        forward + backward of the whole model, the two alternated batch by batch (the
              machine's drift hits both alike): median ms each and the median of the per-batch
              ratios grouped / sdpa, after `--warm` batches that hold the compile
  attention   the attention alone, forward + backward of the four layers' shapes (inputs in the
              step's precision, fp32 scores as both kernels compute them): median ms each over
              the same batches
  losses      both models' losses on the first batch with the same noise (equal to ~1e-5: the
              same function, summed in another order)
  layout      padding share of the positions, documents and groups per batch

`--data` reads an `omni demo` output directory (its shards, tokenizer and autoencoder); without it
a small copy of the demo's data is built first (~1 min, bench_step.demo_data).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import write_result

VARIANTS = ("sdpa", "grouped")


def models(cfg, compile: bool = True) -> dict[str, Any]:
    """The two variants of `cfg.model`, the same weights, compiled as the demo compiles them."""
    from omni.models.backbone import compile_layers
    from omni.models.model import OmniModel

    out = {}
    for v in VARIANTS:
        c = copy.deepcopy(cfg.model)
        c.backbone.attn_implementation = v
        c.head.compile = compile and c.head.compile
        torch.manual_seed(0)
        m = OmniModel.from_config(c).train()
        if compile:
            compile_layers(m.backbone)
        out[v] = m
    return out


def _attention_ms(batches, heads: int, head_dim: int, layers: int, amp, dtype: torch.dtype) -> dict[str, float]:
    """The attention alone: `layers` x (forward + backward) per batch, median ms per variant, under
    the step's autocast `amp` with inputs of `dtype`."""
    from omni.models.attention import _omni_sdpa, document_groups, grouped_attention
    from omni.models.model import attention_bias

    class Layer:  # what transformers' attention functions read from the module
        training, num_key_value_groups, is_causal = True, 1, True

    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for doc_ids, blocks in batches:
        B, L = doc_ids.shape
        for v in VARIANTS:
            # laid out as transformers' projections are: (rows, positions, heads, dim), seen transposed
            shape = (B, L, heads, head_dim) if v == "sdpa" else (1, B * L, heads, head_dim)
            leaves = [torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(3)]
            q, k, v_ = (t.transpose(1, 2) for t in leaves)
            t = time.perf_counter()
            with amp():
                if v == "sdpa":
                    mask = attention_bias(doc_ids, dtype, blocks)
                else:
                    groups = document_groups(doc_ids, blocks)
                for _ in range(layers):
                    out = (_omni_sdpa(Layer(), q, k, v_, mask, scaling=head_dim**-0.5)[0] if v == "sdpa" else
                           grouped_attention(q, k, v_, groups, head_dim**-0.5))
                    out.float().sum().backward()
            times[v].append(time.perf_counter() - t)
    return {v: round(1e3 * statistics.median(ts), 1) for v, ts in times.items()}


def stage(pair: dict[str, Any], batches: list, warm: int) -> dict[str, Any]:
    """Both variants of `pair` (`models`) on `batches`, alternated; the first `warm` left out."""
    from benchmarks.common import train_autocast
    from omni.models.attention import document_groups
    from omni.models.model import prompt_image_blocks

    first = pair["sdpa"]
    amp, precision = train_autocast(torch.device("cpu"))
    with torch.no_grad(), amp():
        losses = {}
        for v, m in pair.items():
            torch.manual_seed(1)
            losses[v] = {k: round(float(x), 6) for k, x in m(batches[0]).items() if k.startswith("loss")}
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for i, batch in enumerate(batches):
        for v in VARIANTS if i % 2 == 0 else VARIANTS[::-1]:
            m = pair[v]
            m.zero_grad(set_to_none=True)
            torch.manual_seed(i)
            t = time.perf_counter()
            with amp():
                loss = m(batch)["loss"]
            loss.backward()
            times[v].append(time.perf_counter() - t)
    ratios = [g / s for s, g in zip(times["sdpa"][warm:], times["grouped"][warm:])]
    bb = first.backbone.config
    blocks = [(b.doc_ids, prompt_image_blocks(b.image_mask, b.image_target_index, b.image_tokens.shape[0])
               if first.cfg.prompt_image_attention == "bidirectional" else None) for b in batches[warm:]]
    layouts = [document_groups(d, bl) for d, bl in blocks]
    return {
        "first_step_s": {v: round(t[0], 2) for v, t in times.items()},
        "step_ms": {v: round(1e3 * statistics.median(t[warm:]), 1) for v, t in times.items()},
        "step_ratio_grouped_to_sdpa": round(statistics.median(ratios), 3),
        "attention_ms": _attention_ms(blocks, bb.num_attention_heads, bb.hidden_size // bb.num_attention_heads,
                                      bb.num_hidden_layers, amp,
                                      torch.bfloat16 if precision == "bf16" else torch.float32),
        "losses_first_batch": losses,
        "padding_share": round(statistics.mean(float((d == 0).float().mean()) for d, _ in blocks), 3),
        # padding positions are the one-slot group
        "documents_per_batch": round(statistics.mean(sum(n for _, n, S, _ in lay.groups if S > 1) for lay in layouts), 1),
        "groups_per_batch": round(statistics.mean(len(lay.groups) for lay in layouts), 1),
    }


def run(data: Path | None, n_batches: int = 40, warm: int = 8, threads: int = 2) -> dict[str, Any]:
    from benchmarks.bench_step import demo_data
    from benchmarks.common import cpu_threads, machine_info, train_autocast
    from omni import demo
    from omni.data.loader import BatchStream

    if n_batches <= warm + 1:
        raise ValueError(f"--batches must exceed --warm + 1 = {warm + 1}, got {n_batches}")
    with tempfile.TemporaryDirectory() as tmp, cpu_threads(torch.device("cpu"), threads) as n:
        data = (data or demo_data(Path(tmp) / "data")).resolve()
        paths = demo.data_paths(data)
        first, main = demo.stage_configs(data, paths, [], demo.edit_first_steps(demo.train_config(data, paths, []).train.steps))
        out: dict[str, Any] = {"preset": "tiny", "threads": n, "torch": torch.__version__, "batches": n_batches,
                               "warm": warm, "precision": train_autocast(torch.device("cpu"))[1],
                               "machine": machine_info(torch.device("cpu"))}
        for name, cfg in (("editing", first), ("mix", main)):
            pair = models(cfg)
            tok = pair["sdpa"]
            stream = iter(BatchStream(cfg.data, tok.tokenizer, tok.image_tokenizer, split="train", seed=0))
            out[name] = stage(pair, [next(stream) for _ in range(n_batches)], warm)
            print(json.dumps({name: out[name]}), flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--data", type=Path, help="an `omni demo` output directory (default: build a small copy)")
    p.add_argument("--batches", type=int, default=40, help="batches per stage, both variants on each")
    p.add_argument("--warm", type=int, default=8, help="first batches left out of the medians (the compile)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (the demo trains on 2)")
    p.add_argument("--out", default=os.environ.get("OUT"), help="directory for grouped-cpu-tiny.json")
    a = p.parse_args(argv)
    write_result(a.out, "grouped-cpu-tiny.json", run(a.data, a.batches, a.warm, a.threads))


if __name__ == "__main__":
    main()
