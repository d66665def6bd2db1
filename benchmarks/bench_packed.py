"""Training throughput on packed rows of realistic documents, lever by lever.

    python -m benchmarks.bench_packed --device cuda --preset bench-1b     # GPU: full training steps
    python -m benchmarks.bench_packed --device cpu --quick                # CPU: forward only (flex has no CPU backward)

Rows: documents of 200-1,500 tokens (scaled by seq_len / 4096 for small presets), 60-80% of them
image tokens (whole images of the preset's token count), packed greedily into rows of
`--seq-len` (4,096 on GPU) with the remainder padded; beside them, single-document rows
(`bench_train.make_batch`, one interleaved document filling each row).

Each lever is one row of output, printed as soon as it is measured, and written to `--out`:
  dense        sdpa with the dense (B, 1, L, L) document mask (the default before this work)
  flex         FlexAttention with a BlockMask of the documents (model.backbone.attn_implementation=flex_attention)
  +head_bf16   ... and the diffusion head's matmuls in bf16 (model.head.bf16_train)
  +head_compile ... and the head's loss compiled (model.head.compile)
  +layers_compile ... and every backbone decoder layer compiled (train.compile)
  +liger       ... and Liger's fused RMSNorm / RoPE / SwiGLU (train.liger; skipped when not installed)
  +bf16_weights ... and bf16 parameters (what train.bf16_mode=deepspeed trains; here the step is plain
               AdamW on bf16 weights, without DeepSpeed's fp32 master copy, so it is an upper bound)
  backbone     the HF causal LM alone on the same ids (flex), for full / backbone at equal tokens

GPU: one step = forward + backward + clip + AdamW under bf16 autocast (as bench_train), best of n.
CPU: forward only (no grad), dense vs flex, interleaved; plus the BlockMask's computed-tile fraction.
MFU = model FLOPs (bench_train.train_flops: matmuls + useful attention pairs) / time / peak (H200: 989).
Imports only torch, transformers and omni's model code: no deepspeed, diffusers or webdataset.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import os
import tempfile
import time
from typing import Any

import torch

from benchmarks.common import write_result


def realistic_rows(model, rows: int, seq_len: int, seed: int = 0):
    """Packed rows of documents of 200-1,500 tokens (x seq_len / 4096), 60-80% image tokens."""
    from omni.layout import ImageSegment, TextSegment, doc_length, layout

    g = torch.Generator().manual_seed(seed)
    specials = set(vars(model.special).values())
    vocab = torch.tensor([i for i in range(len(model.tokenizer)) if i not in specials])
    n_img, d = model.image_tokenizer.num_tokens, model.image_tokenizer.token_dim
    scale = seq_len / 4096

    def rand(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=g))

    def text(n: int) -> TextSegment:
        return TextSegment(vocab[torch.randint(len(vocab), (max(n, 1),), generator=g)].tolist())

    def document() -> list:
        length = int(rand(200, 1500) * scale)
        images = max(1, round(rand(0.6, 0.8) * length / n_img))
        per_text = max(1, (length - images * (n_img + 2)) // (images + 1))
        doc = [text(per_text)]
        for _ in range(images):
            doc += [ImageSegment(torch.randn(n_img, d, generator=g)), text(per_text)]
        return doc

    batch_rows = []
    for _ in range(rows):
        row, used = [], 0
        while True:
            doc = document()
            n = doc_length(doc)
            if used + n > seq_len:
                break
            row.append(doc)
            used += n
        if not row:
            raise ValueError(f"seq_len={seq_len} cannot hold one document of images of {n_img} tokens")
        batch_rows.append(row)
    return layout(batch_rows, model.special, seq_len=seq_len, token_dim=d)


def gpu_rows_sparsity(tmp: str, rows: int = 4, seq_len: int = 4096) -> dict[str, Any]:
    """The GPU rows (bench-1b, 4 x 4,096 tokens) built on the meta device: their BlockMask's tile fraction."""
    from benchmarks.common import bench_config
    from omni.models.attention import block_fraction, document_block_mask
    from omni.models.model import OmniModel

    cfg = bench_config("bench-1b", tmp)
    with torch.device("meta"):
        model = OmniModel.from_config(cfg.model)
    batch = realistic_rows(model, rows, seq_len)
    one = torch.ones_like(batch.doc_ids)
    return {"tokens": batch.n_tokens, "documents": int(sum(int(r.max()) for r in batch.doc_ids)),
            "image_fraction": round(batch.image_tokens.shape[0] / batch.n_tokens, 3),
            "block_fraction_computed": round(block_fraction(document_block_mask(batch.doc_ids)), 4),
            "block_fraction_causal_only": round(block_fraction(document_block_mask(one)), 4)}


def _variant(base, attn: str, **head) -> Any:
    from omni.models.model import OmniModel

    cfg = copy.deepcopy(base)
    cfg.model.backbone.attn_implementation = attn
    for k, v in head.items():
        setattr(cfg.model.head, k, v)
    torch.manual_seed(0)
    return OmniModel.from_config(cfg.model)


def _emit(out: dict, name: str, row: dict) -> None:
    out["rows"][name] = row
    print(json.dumps({"lever": name, **row}), flush=True)


def run(device: str = "cpu", preset: str = "tiny", quick: bool = False, seq_len: int | None = None,
        rows: int | None = None, repeats: int | None = None, peak_tflops: float | None = None,
        only: list[str] | None = None) -> dict[str, Any]:
    from benchmarks.bench_train import attention_pairs, make_batch, optimizer, stepper, train_flops
    from benchmarks.common import GPU_SPECS, bench_config, interleaved_best, resolve_device
    from omni.models.attention import block_fraction, document_block_mask

    dev = resolve_device(device)
    gpu = dev.type == "cuda"
    if not gpu:
        torch.set_num_threads(1)  # see benchmarks.common.cpu_threads
    seq_len = seq_len or (4096 if gpu else (256 if quick else 512))
    rows = rows or (4 if gpu else 2)
    repeats = repeats or (3 if quick else 5)
    peak = peak_tflops
    if peak is None and gpu:
        name = torch.cuda.get_device_name(dev)
        peak = next((v[0] for k, v in GPU_SPECS.items() if k in name), None)
    tmp = tempfile.mkdtemp()
    base = bench_config(preset, tmp, [f"model.backbone.max_position_embeddings={max(seq_len, 512)}"])
    out: dict[str, Any] = {"preset": preset, "device": str(dev), "seq_len": seq_len, "rows_per_batch": rows,
                           "peak_tflops": peak, "torch": torch.__version__, "rows": {}}
    dense = _variant(base, "sdpa").to(dev)
    packed = realistic_rows(dense, rows, seq_len).to(dev)
    single = make_batch(dense, rows, seq_len, 32 if preset == "bench-1b" else 12, 16 if preset == "bench-1b" else 8)
    single = single.to(dev)
    docs = int(sum(int(r.max()) for r in packed.doc_ids))
    bm = document_block_mask(packed.doc_ids)
    flops = train_flops(dense, packed)
    out["batch"] = {"tokens": packed.n_tokens, "documents": docs, "image_fraction":
                    round(packed.image_tokens.shape[0] / max(packed.n_tokens, 1), 3),
                    "attention_pairs": attention_pairs(packed.doc_ids),
                    "block_fraction_computed": round(block_fraction(bm), 4),
                    "block_fraction_causal_only": round(block_fraction(document_block_mask(
                        (packed.doc_ids > -1).long())), 4),
                    "model_tflop_per_step": round(flops["full"] / 1e12, 4)}
    print(json.dumps({"batch": out["batch"]}), flush=True)

    if not gpu:  # forward only: dense mask vs BlockMask on the same weights
        out["bench_1b_rows"] = gpu_rows_sparsity(tmp)
        print(json.dumps({"bench_1b_rows": out["bench_1b_rows"]}), flush=True)
        flex = _variant(base, "flex_attention").to(dev)
        flex.load_state_dict(dense.state_dict())
        dense.eval(), flex.eval()

        def fwd(model, batch):
            def f():
                with torch.no_grad():
                    torch.manual_seed(0)
                    return model(batch)["loss"]
            return f

        with torch.no_grad():
            diff = abs(fwd(dense, packed)().item() - fwd(flex, packed)().item())
        secs = interleaved_best({"dense": fwd(dense, packed), "flex": fwd(flex, packed),
                                 "dense_single": fwd(dense, single), "flex_single": fwd(flex, single)},
                                dev, repeats=repeats, warmup=1)
        for k, v in secs.items():
            _emit(out, f"forward_{k}", {"seconds": round(v, 4), "tokens_per_s": round(packed.n_tokens / v, 1)})
        out["flex_over_dense_forward_speedup"] = round(secs["dense"] / secs["flex"], 3)
        out["flex_minus_dense_loss"] = diff
        print(json.dumps({"flex_over_dense_forward_speedup": out["flex_over_dense_forward_speedup"],
                          "abs_loss_difference": diff}), flush=True)
        return out

    amp = lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    levers: list[tuple[str, dict, dict]] = [
        ("dense", {"attn": "sdpa"}, {}),
        ("flex", {"attn": "flex_attention"}, {}),
        ("flex+head_bf16", {"attn": "flex_attention"}, {"bf16_train": True}),
        ("flex+head_bf16+head_compile", {"attn": "flex_attention"}, {"bf16_train": True, "compile": True}),
    ]
    if importlib.util.find_spec("liger_kernel") is not None:
        levers.append(("flex+head_bf16+head_compile+liger", {"attn": "flex_attention", "liger": True},
                       {"bf16_train": True, "compile": True}))
    levers.append(("flex+head_bf16+head_compile+bf16_weights", {"attn": "flex_attention", "bf16": True},
                   {"bf16_train": True, "compile": True}))
    # last: its compile may not fit gpu.sh's stage limit on a cold machine (the rows above are kept)
    levers.append(("flex+head_bf16+head_compile+layers_compile", {"attn": "flex_attention", "layers": True},
                   {"bf16_train": True, "compile": True}))
    for name, opt, head in levers:
        if only and name not in only:
            continue
        model = _variant(base, opt["attn"], **head).to(dev).train()
        if opt.get("liger"):
            from omni.models.backbone import fuse_with_liger

            fuse_with_liger(model.backbone)
        if opt.get("layers"):
            from omni.models.backbone import compile_layers

            compile_layers(model.backbone)
        if opt.get("bf16"):
            model = model.to(torch.bfloat16)
        opt_ = optimizer(model, dev, 1e-4)
        for label, batch in (("packed", packed), ("single", single)):
            step = stepper(model, lambda b=batch, m=model: m(b)["loss"], opt_, amp)
            t0 = time.perf_counter()
            step()  # compile / autotune outside the timing
            torch.cuda.synchronize(dev)
            first = time.perf_counter() - t0
            torch.cuda.reset_peak_memory_stats(dev)
            sec = interleaved_best({name: step}, dev, repeats=repeats, warmup=1)[name]
            f = train_flops(model, batch)["full"]
            _emit(out, f"{name}/{label}", {
                "seconds": round(sec, 4), "first_step_seconds": round(first, 2),
                "tokens_per_s": round(batch.n_tokens / sec, 1),
                "mfu": round(f / sec / (peak * 1e12), 4) if peak else None,
                "peak_memory_gib": round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)})
        del model, opt_
        torch.cuda.empty_cache()
    if not only or "backbone" in only:
        from omni.models.backbone import build_backbone

        cfg = copy.deepcopy(base)
        cfg.model.backbone.attn_implementation = "flex_attention"
        bb = build_backbone(cfg.model, dense.backbone.config.vocab_size).to(dev).train()
        ids, pos, mask = packed.input_ids, packed.position_ids, document_block_mask(packed.doc_ids)

        def bb_loss():
            logits = bb(input_ids=ids, attention_mask=mask, position_ids=pos).logits
            return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())

        step = stepper(bb, bb_loss, optimizer(bb, dev, 1e-4), amp)
        step()
        sec = interleaved_best({"bb": step}, dev, repeats=repeats, warmup=1)["bb"]
        f = train_flops(dense, packed)["backbone"]
        _emit(out, "backbone/packed", {"seconds": round(sec, 4), "tokens_per_s": round(packed.n_tokens / sec, 1),
                                       "mfu": round(f / sec / (peak * 1e12), 4) if peak else None})
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--device", default=None)
    p.add_argument("--preset", default=None, help="tiny on CPU, bench-1b on CUDA")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--rows", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--only", default=None, help="comma-separated lever names")
    p.add_argument("--out", default=os.environ.get("OUT"), help="directory for packed-<device>-<preset>.json")
    a = p.parse_args(argv)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    preset = a.preset or ("bench-1b" if device.startswith("cuda") else "tiny")
    with contextlib.suppress(AttributeError):
        torch.backends.cuda.matmul.allow_tf32 = True  # any fp32 matmul left may use TF32 in this benchmark
    result = run(device, preset, a.quick, a.seq_len, a.rows, a.repeats, a.peak_tflops,
                 a.only.split(",") if a.only else None)
    write_result(a.out, f"packed-{device.split(':')[0]}-{preset}{'-quick' if a.quick else ''}.json", result)


if __name__ == "__main__":
    main()
