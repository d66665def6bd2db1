"""Training-step throughput: the full model against its backbone alone, on the same tokens.

    python -m benchmarks.bench_train [--preset tiny] [--device cpu|cuda] [--quick]

One step = forward + backward + gradient clipping + AdamW, in plain single-process PyTorch
(what one rank does under DeepSpeed ZeRO-0; the engine's own overhead is not measured here).

- full: OmniModel on rows that are each one interleaved document of [caption, image, text]
  units ([bos] caption <boi> N image tokens <eoi> text caption <boi> ... [eos]), filled to
  seq_len exactly; text cross-entropy on the text positions, the diffusion loss on every image
  token with the preset's noise copies;
- backbone: the preset's Hugging Face causal LM alone on the same ids and positions,
  cross-entropy on every position;
- head_only: the diffusion head's loss on the same targets with a random condition, to show
  its share of the full step.

The three are timed in interleaved rounds (best of n), so machine-load drift hits them alike.
Both models see exactly the same rows, so full/backbone is the price of the image path
(in_proj, diffusion head with its noise copies, LM loss on fewer positions) at equal tokens.
One document per row keeps attention plainly causal (SDPA's flash kernel on a GPU); packed
documents (make_batch(packed=True)) need a dense (B, 1, L, L) mask, which rules flash out.

Model FLOPs per step (the numerator of MFU; matmuls only, useful attention only):
    6 * N_layers * T                          backbone matmuls (N_layers: parameters outside embeddings)
  + 12 * n_layers * d_q * P                   attention scores and values; P = (query, key) pairs
                                              inside each document's causal triangle
  + 6 * D * V * T_text                        LM head (full: labelled positions; backbone: all T)
  + 6 * d_tok * D * M                         in_proj of the M image tokens (full only)
  + 6 * (N_head - N_cond) * K * C + 6 * N_cond * K
                                              diffusion head: K targets x C noise copies; its
                                              condition embedding runs once per target
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import (
    bench_config,
    count_params,
    cpu_threads,
    device_peaks,
    interleaved_best,
    resolve_device,
    sync,
)

# Documents per row: caption / image / text lengths (tokens), per preset.
DOC_SHAPES = {"tiny": (12, 8), "bench-1b": (32, 16)}


def make_batch(model, rows: int, seq_len: int, caption: int, tail: int, seed: int = 0, packed: bool = False):
    """Rows of [caption, image, text] units filled to seq_len exactly.

    packed=False: each row is one interleaved document (units back to back, text at the end), so
    attention is plainly causal and SDPA can pick its flash kernel. packed=True: each unit is its
    own document and the leftover a text document, which needs the dense document mask.
    """
    from omni.layout import ImageSegment, TextSegment, doc_length, layout

    g = torch.Generator().manual_seed(seed)
    specials = set(vars(model.special).values())
    vocab = [i for i in range(len(model.tokenizer)) if i not in specials]
    n_img, d = model.image_tokenizer.num_tokens, model.image_tokenizer.token_dim

    def text(n: int) -> TextSegment:
        return TextSegment([vocab[i] for i in torch.randint(len(vocab), (n,), generator=g).tolist()])

    def unit() -> list:
        return [text(caption), ImageSegment(torch.randn(n_img, d, generator=g)), text(tail)]

    unit_len = doc_length(unit(), add_bos=False, add_eos=False)
    batch_rows = []
    for _ in range(rows):
        if packed:
            docs = [unit() for _ in range(seq_len // (unit_len + 2))]
            free = seq_len - len(docs) * (unit_len + 2)
            docs += [[text(free - 2)]] if free >= 3 else []
        else:
            n = (seq_len - 2) // unit_len
            segments = [seg for _ in range(n) for seg in unit()]
            free = seq_len - 2 - n * unit_len
            docs = [segments + ([text(free)] if free else [])]
        if not docs or not docs[0]:
            raise ValueError(f"seq_len={seq_len} cannot hold one unit of {caption}+{n_img}+{tail} tokens")
        batch_rows.append(docs)
    return layout(batch_rows, model.special, seq_len=seq_len, token_dim=d)


def attention_pairs(doc_ids: torch.Tensor) -> int:
    """(query, key) pairs a causal, document-local mask lets through."""
    total = 0
    for row in doc_ids:
        _, counts = torch.unique_consecutive(row[row > 0], return_counts=True)
        total += int((counts * (counts + 1) // 2).sum())
    return total


def train_flops(model, batch) -> dict[str, float]:
    """Model FLOPs of one training step of the full model and of the backbone alone (see module doc)."""
    hf = model.backbone.config.get_text_config()
    D, V, layers = hf.hidden_size, hf.vocab_size, hf.num_hidden_layers
    d_q = hf.num_attention_heads * (getattr(hf, "head_dim", None) or D // hf.num_attention_heads)
    emb = model.backbone.get_input_embeddings().weight.numel()
    n_layers = count_params(model.backbone.model) - emb
    T, T_text = batch.n_tokens, batch.n_text_targets
    M, K, C = batch.image_tokens.shape[0], batch.n_image_targets, model.cfg.head.noise_copies
    net = model.head.net
    # Weights a target uses once (its condition embedding; with the head's own time path also its
    # adaLN modulations), the rest once per noise copy.
    once = [net.cond_embed, *([*(b.ada[-1] for b in net.blocks), net.final_ada[-1]] if net.time_width else [])]
    n_cond = sum(m.weight.numel() for m in once)
    n_head = count_params(net)
    common = 6 * n_layers * T + 12 * layers * d_q * attention_pairs(batch.doc_ids)
    head = 6 * (n_head - n_cond) * K * C + 6 * n_cond * K
    return {
        "full": float(common + 6 * D * V * T_text + 6 * model.image_tokenizer.token_dim * D * M + head),
        "backbone": float(common + 6 * D * V * T),
        "head": float(head),
    }


@contextlib.contextmanager
def saved_activation_bytes(params: set[int]):
    """Bytes autograd saves for backward inside the block (distinct storages, parameters excluded)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield seen


def optimizer(module: torch.nn.Module, device: torch.device, lr: float) -> torch.optim.Optimizer:
    from omni.train.engine import param_groups

    kwargs = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(param_groups(module, 0.05), lr=lr, betas=(0.9, 0.95), **kwargs)


def stepper(module: torch.nn.Module, loss_fn: Callable[[], torch.Tensor], opt, amp) -> Callable[[], None]:
    params = [p for p in module.parameters() if p.requires_grad]

    def step() -> None:
        with amp():
            loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def memory(module, loss_fn, step, opt, amp, device) -> dict[str, Any]:
    """Parameters, gradients, optimizer state, saved activations; on CUDA the allocator's peak."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    with amp(), saved_activation_bytes(params) as seen:
        loss = loss_fn()
    act = sum(seen.values())
    loss.backward()
    grads = sum(p.grad.nbytes for p in module.parameters() if p.grad is not None)
    opt.zero_grad(set_to_none=True)
    out = {
        "params_bytes": sum(p.nbytes for p in module.parameters()),
        "grads_bytes": grads,
        "optimizer_bytes": sum(v.nbytes for s in opt.state.values() for v in s.values() if torch.is_tensor(v)),
        "saved_activations_bytes": act,
    }
    if device.type == "cuda":
        # Other models may be resident: count this one's parameters and optimizer state plus
        # whatever one step allocates on top (activations, gradients, temporaries).
        torch.cuda.empty_cache()
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        sync(device)
        growth = torch.cuda.max_memory_allocated(device) - before
        out["cuda_peak_allocated_bytes"] = out["params_bytes"] + out["optimizer_bytes"] + growth
    return out


def run(quick: bool = False, preset: str = "tiny", device: str | torch.device | None = None,
        peaks: dict[str, Any] | None = None, threads: int | None = None) -> dict[str, Any]:
    """Measure one preset; returns JSON-able figures (see the module docstring)."""
    dev = resolve_device(str(device) if device is not None else None)
    with cpu_threads(dev, threads) as n:
        out = _run(quick, preset, dev, peaks or device_peaks(dev))
    if dev.type == "cuda":
        torch.cuda.empty_cache()  # the models died with _run; give their memory back
    return {**out, "threads": n}


def _run(quick: bool, preset: str, dev: torch.device, peaks: dict[str, Any]) -> dict[str, Any]:
    from omni.models.backbone import build_backbone
    from omni.models.model import OmniModel, attention_bias

    bf16 = dev.type == "cuda"
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    caption, tail = DOC_SHAPES.get(preset, (12, 8))
    with tempfile.TemporaryDirectory() as tmp:
        cfg = bench_config(preset, tmp)
        torch.manual_seed(0)
        model = OmniModel.from_config(cfg.model).to(dev).train()  # reads the tokenizer from tmp
    torch.manual_seed(0)
    backbone = build_backbone(cfg.model, model.backbone.config.vocab_size).to(dev).train()
    rows = (4 if preset == "tiny" else 1) if quick else cfg.data.batch_size
    batch = make_batch(model, rows, cfg.data.seq_len, caption, tail).to(dev)
    flops = train_flops(model, batch)
    ids, pos = batch.input_ids, batch.position_ids
    mask = attention_bias(batch.doc_ids, torch.float32)  # None here: one document per row
    cond = torch.randn(batch.n_image_targets, model.backbone.config.hidden_size, device=dev, requires_grad=True)
    target = batch.image_tokens[batch.image_target_index]

    def full_loss() -> torch.Tensor:
        return model(batch)["loss"]

    def backbone_loss() -> torch.Tensor:
        logits = backbone(input_ids=ids, attention_mask=mask, position_ids=pos).logits  # (B, L, V)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())

    def head_loss() -> torch.Tensor:  # the diffusion head alone, on the full model's targets
        return model.head.loss(target, cond)

    opts = {"full": optimizer(model, dev, cfg.train.lr), "backbone": optimizer(backbone, dev, cfg.train.lr),
            "head_only": optimizer(model.head, dev, cfg.train.lr)}
    steps = {"full": stepper(model, full_loss, opts["full"], amp),
             "backbone": stepper(backbone, backbone_loss, opts["backbone"], amp),
             "head_only": stepper(model.head, head_loss, opts["head_only"], amp)}
    seconds = interleaved_best(steps, dev, repeats=3 if quick else 5, warmup=2)
    results: dict[str, Any] = {name: {"seconds": seconds[name]} for name in steps}
    results["full"]["memory"] = memory(model, full_loss, steps["full"], opts["full"], amp, dev)
    results["backbone"]["memory"] = memory(backbone, backbone_loss, steps["backbone"], opts["backbone"], amp, dev)
    n_full, n_backbone, n_img = count_params(model), count_params(backbone), model.image_tokenizer.num_tokens

    T = batch.n_tokens
    peak = peaks["peak_tflops"] * 1e12
    for name in ("full", "backbone"):
        r = results[name]
        r["tokens_per_s"] = round(T / r["seconds"], 1)
        r["model_tflops_per_step"] = round(flops[name] / 1e12, 4)
        r["achieved_tflops"] = round(flops[name] / r["seconds"] / 1e12, 4)
        r["mfu"] = round(flops[name] / r["seconds"] / peak, 4)
        r["seconds"] = round(r["seconds"], 4)
    results["head_only"]["seconds"] = round(results["head_only"]["seconds"], 4)
    return {
        "preset": preset,
        "device": str(dev),
        "precision": "bf16 autocast, fp32 weights and head" if bf16 else "fp32",
        "params": {"full": n_full, "backbone": n_backbone},
        "batch": {"rows": rows, "seq_len": cfg.data.seq_len, "tokens": T, "text_targets": batch.n_text_targets,
                  "image_tokens": batch.n_image_targets, "noise_copies": cfg.model.head.noise_copies,
                  "image_fraction": round(batch.n_image_targets / T, 3),
                  "doc": {"caption": caption, "image": n_img, "text": tail}},
        "flops": {k: round(v / 1e12, 4) for k, v in flops.items()} | {"unit": "TFLOP per step"},
        "peak_tflops": peaks["peak_tflops"],
        **results,
        "overhead_ratio": round(results["full"]["seconds"] / results["backbone"]["seconds"], 3),
        "flop_ratio": round(flops["full"] / flops["backbone"], 3),
        "head_share_of_full_step": round(results["head_only"]["seconds"] / results["full"]["seconds"], 3),
    }


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", default=None)
    parser.add_argument("--quick", action="store_true")
    a = parser.parse_args()
    print(json.dumps(run(quick=a.quick, preset=a.preset, device=a.device), indent=2))
