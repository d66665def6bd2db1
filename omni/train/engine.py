"""DeepSpeed set-up in one place: process group, precision, batch geometry, optimizer, engine.

Everything DeepSpeed needs is derived from the omni `Config` here and nowhere else:

    init_distributed()            -> Dist(rank, world_size, local_rank)   (gloo on CPU, nccl on GPU)
    deepspeed_config(cfg, world)  -> the DeepSpeed JSON (ZeRO stage, offload, batch sizes, clipping),
                                     with a user JSON merged over it (conflicts are errors)
    setup_engine(cfg, model, world_size) -> (engine, ds_config)

Precision: by default parameters, gradients and optimizer state stay fp32 and bf16 is
`torch.autocast` around the forward pass (see `autocast`). `train.bf16_mode=deepspeed` uses
DeepSpeed's own bf16 mode instead (bf16 parameters and gradients, fp32 master weights; half the
ZeRO-3 all-gather bytes), still under autocast so fp32 inputs meet bf16 weights; the diffusion
head then keeps its schedule in fp32 but its weights are bf16 like every other parameter.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from omni.config import CONFIG_DIR, Config
from omni.utils import cpu_has_bf16, rank, world_size


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    created: bool  # this call created the process group (so the loop destroys it at exit)
    env_added: tuple[str, ...] = ()  # launcher variables a single process set for itself


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loopback_name() -> str:
    """The loopback interface's name (`lo` on Linux, `lo0` on macOS)."""
    names = [name for _, name in socket.if_nameindex()] if hasattr(socket, "if_nameindex") else []
    return next((n for n in names if n.startswith("lo")), "lo")


def init_distributed() -> Dist:
    """Join (or create) the process group the launcher set up; a plain `python` start is world 1.

    torchrun and the deepspeed launcher export RANK/WORLD_SIZE/MASTER_ADDR/...; without them
    DeepSpeed would try MPI discovery, so a single process fills them in itself.
    """
    import deepspeed
    import torch.distributed as dist

    added: dict[str, str] = {}
    if "RANK" not in os.environ:
        added = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                 "MASTER_PORT": str(_free_port())}
        if "GLOO_SOCKET_IFNAME" not in os.environ and not torch.cuda.is_available():
            added["GLOO_SOCKET_IFNAME"] = _loopback_name()
        if "MASTER_ADDR" not in os.environ:
            added["MASTER_ADDR"] = "127.0.0.1"
        os.environ.update(added)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    created = not dist.is_initialized()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if created and added:
        # A single process needs no rendezvous: an in-memory store instead of torch's TCP store
        # (which listens on every interface), and gloo's own sockets on the loopback only.
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        # One CPU process reduces nothing, so DeepSpeed's shared-memory all-reduce op is never
        # used; it would still be built (a C++ compile of ~18 s on this project's 2-core machine)
        # in every fresh environment. Marking it unavailable leaves DeepSpeed on torch's gloo.
        ops = getattr(deepspeed.ops, "__compatible_ops__", None) if backend == "gloo" else None
        if isinstance(ops, dict):
            ops["deepspeed_shm_comm"] = False
    if created:
        deepspeed.init_distributed(dist_backend=backend)
    return Dist(rank(), world_size(), local_rank, created, tuple(added))


def close_distributed(d: Dist, barrier: bool = True) -> None:
    """Destroy the process group we created: gloo otherwise sometimes aborts at interpreter exit.

    `barrier=False` after an error: the other ranks may never arrive.
    """
    import torch.distributed as dist

    if d.created and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()
        _forget_deepspeed_groups()
    for key in d.env_added:
        os.environ.pop(key, None)


def _forget_deepspeed_groups() -> None:
    """DeepSpeed caches the process group and its sub-groups in module globals; a later
    in-process run (omni demo, tests) would reuse the destroyed ones."""
    import deepspeed.comm.comm as ds_comm
    from deepspeed.utils import groups

    ds_comm.cdb = None
    for name in ("_WORLD_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP", "mpu", "mesh_device", "_TENSOR_MODEL_PARALLEL_GROUP",
                 "_MODEL_PARALLEL_GROUP", "_DATA_PARALLEL_GROUP", "_MPU_TENSOR_MODEL_PARALLEL_WORLD_SIZE",
                 "_MPU_TENSOR_MODEL_PARALLEL_RANK"):
        if hasattr(groups, name):
            setattr(groups, name, None)
    for name in ("_EXPERT_PARALLEL_GROUP", "_EXPERT_PARALLEL_GROUP_RANKS", "_EXPERT_DATA_PARALLEL_GROUP",
                 "_EXPERT_DATA_PARALLEL_GROUP_RANKS", "_ALL_TO_ALL_GROUP"):
        if isinstance(getattr(groups, name, None), dict):
            getattr(groups, name).clear()


# ------------------------------------------------------------------------------------------------
# Precision and batch geometry
# ------------------------------------------------------------------------------------------------


def hardware_has_bf16() -> bool:
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_has_bf16()


def resolve_precision(requested: str) -> str:
    """`auto` -> bf16 where the hardware computes it natively, else fp32; bf16 without it is an error."""
    if requested == "fp32":
        return "fp32"
    has = hardware_has_bf16()
    if requested == "bf16" and not has:
        where = "this GPU" if torch.cuda.is_available() else "this CPU (no AMX / AVX512-BF16)"
        raise ValueError(f"train.precision=bf16 but {where} has no native bf16; use train.precision=fp32 or auto")
    return "bf16" if has else "fp32"


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The forward-pass autocast: bf16 matmuls in the backbone, fp32 master weights everywhere."""
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def batch_geometry(cfg: Config, world_size: int) -> tuple[int, int, int]:
    """(micro batch per rank, gradient accumulation, global batch) in rows; impossible ones raise."""
    micro = cfg.data.batch_size
    if micro < 1:
        raise ValueError(f"data.batch_size={micro}: a rank needs at least one row per micro-batch")
    if cfg.train.global_batch_size is None:
        gas = cfg.train.grad_accum
        if gas < 1:
            raise ValueError(f"train.grad_accum={gas}: must be at least 1")
        return micro, gas, micro * gas * world_size
    total = cfg.train.global_batch_size
    per_step = micro * world_size
    if total < per_step or total % per_step:
        raise ValueError(
            f"train.global_batch_size={total} cannot be split over {world_size} rank(s) x data.batch_size={micro}: "
            f"it must be a multiple of {per_step} (e.g. {max(1, round(total / per_step)) * per_step})"
        )
    return micro, total // per_step, total


# ------------------------------------------------------------------------------------------------
# DeepSpeed JSON
# ------------------------------------------------------------------------------------------------


def _leaves(d: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def merge_user_config(owned: dict[str, Any], user: dict[str, Any], source: str,
                      tuning: dict[str, Any] | None = None) -> dict[str, Any]:
    """Merge the user's DeepSpeed JSON: it may add keys and override omni's `tuning` defaults
    (bucket sizes, prefetch), but a key the omni config `owned` (stage, batch sizes, clipping,
    offload) set to a different value is an error naming both values."""
    for key in ("optimizer", "scheduler", "bf16", "fp16"):
        if key in user and not (key in ("bf16", "fp16") and not user[key].get("enabled", False)):
            raise ValueError(
                f"{source} sets {key!r}; omni builds the optimizer, LR schedule and precision from train.* "
                f"(lr, betas, weight_decay, warmup_steps, precision). Remove {key!r} from the JSON"
            )
    flat = dict(_leaves(owned))
    conflicts = [
        f"{k}={v!r} (omni config gives {flat[k]!r})" for k, v in _leaves(user) if k in flat and flat[k] != v
    ]
    if conflicts:
        raise ValueError(
            f"{source} conflicts with the omni config: {'; '.join(conflicts)}. Set these through train.* / "
            "data.* overrides (train.zero_stage, train.grad_clip, data.batch_size, ...) or drop them from the JSON"
        )
    return _merge(_merge(tuning or {}, user), owned)


def deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON for this run (the user's `train.deepspeed_config` merged over it)."""
    t = cfg.train
    if t.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"train.zero_stage={t.zero_stage}: DeepSpeed ZeRO stages are 0, 1, 2 and 3")
    if t.offload and t.zero_stage == 0:
        raise ValueError("train.offload=true needs train.zero_stage >= 1 (ZeRO offloads partitioned optimizer state)")
    if t.offload_params and t.zero_stage != 3:
        raise ValueError("train.offload_params=true needs train.zero_stage=3 (only ZeRO-3 partitions parameters)")
    micro, gas, total = batch_geometry(cfg, world_size)
    bf16_weights = t.bf16_mode == "deepspeed"
    if bf16_weights and resolve_precision(t.precision) != "bf16":
        raise ValueError(f"train.bf16_mode=deepspeed needs bf16, but train.precision={t.precision!r} resolves to fp32 "
                         "here; set train.precision=bf16 on bf16 hardware, or train.bf16_mode=autocast")
    zero: dict[str, Any] = {"stage": t.zero_stage}
    if t.offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    if t.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    owned: dict[str, Any] = {  # what the omni config decides
        "train_batch_size": total,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": float(t.grad_clip),
        "zero_optimization": zero,
    }
    if bf16_weights:  # bf16 parameters and gradients, fp32 master weights in DeepSpeed's optimizer
        owned["bf16"] = {"enabled": True}
    tuning: dict[str, Any] = {  # omni's defaults; a user JSON may change them
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # omni logs; DeepSpeed stays quiet
        "wall_clock_breakdown": False,
    }
    if t.zero_stage >= 1:
        tuning["zero_optimization"] = {"contiguous_gradients": True, "overlap_comm": torch.cuda.is_available(),
                                       "reduce_bucket_size": int(5e7)}
    if t.zero_stage == 3:
        # Small tensors stay resident (norms, biases); large layers are fetched one at a time.
        tuning["zero_optimization"].update(stage3_param_persistence_threshold=int(1e5),
                                           stage3_prefetch_bucket_size=int(5e7))
    if t.offload or t.offload_params:
        tuning["zero_force_ds_cpu_optimizer"] = False
        for key in ("offload_optimizer", "offload_param"):
            if key in zero:
                tuning["zero_optimization"][key] = {"pin_memory": torch.cuda.is_available()}
    user: dict[str, Any] = {}
    if t.deepspeed_config:
        path = Path(t.deepspeed_config)
        if not path.exists() and not path.is_absolute() and (CONFIG_DIR.parent / path).exists():
            path = CONFIG_DIR.parent / path  # presets name configs/ds/*.json, shipped in the package
        if not path.exists():
            raise FileNotFoundError(f"train.deepspeed_config={str(path)!r} does not exist")
        try:
            user = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"train.deepspeed_config={str(path)!r} is not valid JSON: {e}") from e
    for key, field, on in (("offload_optimizer", "offload", t.offload), ("offload_param", "offload_params", t.offload_params)):
        if key in user.get("zero_optimization", {}) and not on:
            raise ValueError(f"{t.deepspeed_config} sets zero_optimization.{key}; turn it on with train.{field}=true "
                             "(omni picks the optimizer to match)")
    return merge_user_config(owned, user, str(t.deepspeed_config), tuning)


# ------------------------------------------------------------------------------------------------
# Optimizer
# ------------------------------------------------------------------------------------------------


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on weight matrices; none on norms, biases and embeddings (GPT-2/LLaMA practice),
    nor on matrices whose frozen rows a gradient mask protects (decoupled decay would still shrink them)."""
    no_decay_ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding) or "norm" in type(module).__name__.lower():
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay = [], []
    for p in model.parameters():  # shared (tied) parameters appear once
        if not p.requires_grad:
            continue
        shape = getattr(p, "ds_shape", p.shape)
        masked = getattr(p, "omni_row_mask", False)  # partly frozen (train.trainable=new)
        (no_decay if id(p) in no_decay_ids or len(shape) < 2 or masked else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1 over `warmup` steps, then cosine down to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------------------------
# The one function
# ------------------------------------------------------------------------------------------------


def setup_engine(cfg: Config, model: nn.Module, world_size: int):
    """Wrap `model` in a DeepSpeed engine built from `cfg` -> (engine, ds_config).

    The optimizer is torch's fused AdamW (bit-exact resume; DeepSpeed's CPU Adam when the optimizer
    state is offloaded) with weight-decay groups; the schedule is warmup + cosine, stepped by
    DeepSpeed after every optimizer step. `model` must already hold its initial weights and
    have `requires_grad` set for what trains (omni.train.build).
    """
    import deepspeed

    t = cfg.train
    ds_config = deepspeed_config(cfg, world_size)
    if t.activation_checkpointing:  # recompute each decoder layer in backward (transformers >= 5 name first)
        bb = model.backbone
        if hasattr(bb, "activation_checkpointing_enable"):
            bb.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            bb.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    groups = param_groups(model, t.weight_decay)
    if not groups:
        raise ValueError("no parameter requires a gradient: check train.trainable")
    if t.offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(groups, lr=t.lr, betas=t.betas, adamw_mode=True)
    else:
        # fused: one kernel over every tensor (CPU and GPU); the tiny preset's update alone 8.1 -> 1.8 ms
        # on 2 cores against foreach, the demo's whole step 0.932x (benchmarks/bench_step.py)
        optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=t.betas, fused=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, t.warmup_steps, t.steps, t.min_lr_ratio)
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=schedule, config=copy.deepcopy(ds_config)
    )
    if world_size == 1 and t.zero_stage == 0:
        # One process: ZeRO-0's gradient all-reduce is an identity that still flattens every
        # gradient into a buffer and copies it back, each step (the same gradients without it).
        engine.enable_backward_allreduce = False
    return engine, ds_config
