"""The training loop: one function per phase, the step itself on one screen (`fit`).

    train(cfg, batches=None, val_batches=None) -> run dir
        prepare: checks (before any work) -> process group -> model -> DeepSpeed engine -> resume
        fit:     lr -> forward -> losses -> backward -> clip -> step -> EMA -> log -> checkpoint
        finish:  close logs, destroy the process group

Batches come from `omni.data.loader.BatchStream` over `data.train` / `data.val`, or from the
caller: an iterable of `omni.layout.Batch` for this rank, or a factory `(rank, world_size) ->
iterable` (tests feed fixed global batches this way, sliced by rank).

Randomness that shapes the loss (the diffusion head's noise and timesteps) is seeded per
micro-batch from `(train.seed, global micro-batch index)`, where the index counts micro-batches
over steps, accumulation and ranks. So a global batch split over 2 ranks, or over 2
accumulation steps on 1 rank, draws the same noise for the same rows, and a resumed run
draws exactly what the uninterrupted one would have.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from omni.config import Config
from omni.layout import Batch
from omni.train import checkpointing
from omni.train.engine import (
    Dist,
    autocast,
    close_distributed,
    deepspeed_config,
    init_distributed,
    resolve_precision,
)
from omni.train.runlock import RunLock
from omni.utils import atomic_write_text, is_rank0, seed_everything

BatchSource = Iterable[Batch] | Callable[[int, int], Iterable[Batch]]


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. the loss keeps diverging); the message names the way out."""


@dataclass
class Meter:
    """Sums over one log interval, reduced across ranks before printing.

    What the model computes (losses, text-token counts) is summed on the device and read back
    only when a line is logged (`totals`): reading it every micro-batch would make the host wait
    for the GPU to finish the step, five times over. Host numbers (lr, image-token and token
    counts of the host-side batch) are summed on the host.
    """

    start_step: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    t0: float = field(default_factory=time.perf_counter)
    on_device: torch.Tensor | None = None  # (4,) float64: loss, text loss x count, text count, image loss x count
    tokens: torch.Tensor | int = 0  # real (non-padding) positions, a host tensor until read

    def add(self, **values: float) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)

    def add_micro(self, out: dict[str, torch.Tensor], batch: Batch, lr: float) -> None:
        """One trained micro-batch: losses weighted by their token counts, so means are per token."""
        n_image = batch.image_target_index.numel()  # a shape: known on the host
        n_text = out["n_text_tokens"].to(out["loss"].device, torch.float64)
        part = torch.stack([out["loss"].detach().double(), out["loss_text"].double() * n_text, n_text,
                            out["loss_image"].double() * n_image])  # (4,)
        self.on_device = part if self.on_device is None else self.on_device + part
        self.tokens = self.tokens + (batch.doc_ids > 0).sum()
        self.add(micro=1, lr=lr, n_image=n_image)

    def totals(self) -> dict[str, float]:
        """Every sum of the interval as host numbers: the interval's one read of the device sums."""
        out = dict(self.sums)
        if self.on_device is not None:
            out.update(zip(("loss", "text", "n_text", "image"), self.on_device.tolist()))
        out["tokens"] = float(self.tokens)
        return out


@dataclass
class Run:
    cfg: Config
    dist: Dist
    run_dir: Path
    precision: str
    engine: Any
    model: Any  # engine.module: the one place the engine is unwrapped
    ema: Any
    source: Iterable[Batch]
    val_source: BatchSource | None
    monitor: Any
    stop: checkpointing.StopSignal
    gas: int
    step: int = 0  # optimizer steps done
    micro: int = 0  # good micro-batches in the current step
    consumed: int = 0  # batches drawn from the source by this rank
    skip: int = 0  # batches to fast-forward on resume (sources without load_state_dict)
    bad_total: int = 0
    bad_in_row: int = 0
    stopping: bool = False
    meter: Meter = field(default_factory=Meter)
    lock: Any = None  # omni.train.runlock.RunLock held by rank 0
    frozen: dict | None = None  # checkpointing.frozen_record: frozen weights left to train.init_from


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------


def train(cfg: Config, batches: BatchSource | None = None, val_batches: BatchSource | None = None) -> Path:
    """Train as `cfg` says (one process, or every rank of a torchrun/deepspeed launch); returns the run dir."""
    run = prepare(cfg, batches, val_batches)
    ok = False
    try:
        fit(run)
        ok = True
    finally:
        finish(run, ok)
    return run.run_dir


def fit(run: Run) -> None:
    """lr -> forward -> losses -> backward -> clip -> step -> EMA -> log -> checkpoint."""
    engine, t = run.engine, run.cfg.train
    batches = iter(run.source)
    for _ in range(run.skip):  # resume of a source that cannot restore its own position
        next(batches)
    if t.val_every and run.step == 0:
        validate(run)  # the held-out loss at initialisation: the baseline learning is measured against
    while run.step < t.steps:
        batch = next_batch(run, batches)
        lr = engine.get_lr()[0]
        out = forward(run, batch)
        # The step's one host read: is the loss finite (and did a rank get a stop signal)?
        bad, stop = agree(run, ~torch.isfinite(out["loss"].detach()), run.stop.received is not None)
        run.stopping |= stop
        if bad:  # skip: no backward, no optimizer step; the next batch takes its place
            count_bad(run)
            continue
        run.bad_in_row = 0
        engine.backward(out["loss"])  # accumulation + ZeRO gradient reduction
        engine.step()  # at the accumulation boundary: clip, AdamW, LR schedule
        run.meter.add_micro(out, batch, lr)
        run.micro += 1
        if engine.global_steps == run.step:
            continue  # still accumulating
        run.step, run.micro = engine.global_steps, 0
        run.ema.update()
        run.monitor.advance(run.step)
        if run.step % t.log_every == 0 or run.step == t.steps or run.stopping:
            log_train(run)
        paused = time.perf_counter()  # validation and saving do not count against tokens/s
        if t.val_every and (run.step % t.val_every == 0 or run.step == t.steps):
            validate(run)
        if run.step % t.save_every == 0 or run.step == t.steps or run.stopping:
            save(run)
        run.meter.t0 += time.perf_counter() - paused
        if run.stopping:
            run.monitor.print(f"stopped by {run.stop.received or 'a signal'} at step {run.step}; checkpoint saved")
            return


# ------------------------------------------------------------------------------------------------
# Step parts
# ------------------------------------------------------------------------------------------------


def next_batch(run: Run, batches: Iterator[Batch]) -> Batch:
    try:
        batch = next(batches)
    except StopIteration:
        raise TrainingError(
            f"the batch source ran out after {run.consumed} batches at step {run.step} of {run.cfg.train.steps}; "
            "use data.resampled=true or fewer train.steps"
        ) from None
    run.consumed += 1
    return batch


def forward(run: Run, batch: Batch, index: int | None = None) -> dict[str, torch.Tensor]:
    """The model's loss dict under autocast, with noise seeded by the global micro-batch index."""
    d = run.dist
    if index is None:
        index = (run.step * run.gas + run.micro) * d.world_size + d.rank
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(run.cfg.train.seed * 1_000_003 + index)
        with autocast(run.precision, run.engine.device):
            return run.engine(to_device(batch, run.engine.device))


def to_device(batch: Batch, device: torch.device) -> Batch:
    """The batch on the engine's device. On CUDA through pinned memory, so the copy does not make
    the host wait for the GPU (a copy from pageable memory synchronizes the stream first)."""
    if device.type != "cuda" or batch.input_ids.device.type != "cpu":
        return batch.to(device)
    pinned = Batch(**{f.name: getattr(batch, f.name).pin_memory() for f in dataclasses.fields(batch)})
    return pinned.to(device, non_blocking=True)


def agree(run: Run, *flags: bool | torch.Tensor) -> list[bool]:
    """OR each flag (a bool or a 0-d device tensor) over all ranks, so every rank skips / stops at
    the same micro-batch. One host read in all: the flags travel as one tensor."""
    dev = run.engine.device
    t = torch.stack([f.to(dev, torch.float32) if torch.is_tensor(f) else torch.full((), float(f), device=dev)
                     for f in flags])
    if run.dist.world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def count_bad(run: Run) -> None:
    run.bad_total += 1
    run.bad_in_row += 1
    run.meter.add(bad=1)
    run.monitor.print(f"step {run.step + 1}: non-finite loss, batch skipped ({run.bad_in_row} in a row)")
    if run.bad_in_row >= run.cfg.train.max_bad_steps:
        last = checkpointing.latest_tag(run.run_dir / checkpointing.CKPT_DIR)
        raise TrainingError(
            f"stopping at step {run.step + 1}: {run.bad_in_row} consecutive batches gave a non-finite loss "
            f"(train.max_bad_steps={run.cfg.train.max_bad_steps}). Last good checkpoint: "
            f"{last if last else 'none (no checkpoint saved yet)'}; lower train.lr or check the data, then resume"
        )


def reduce_sums(run: Run, keys: list[str], sums: dict[str, float]) -> dict[str, float]:
    values = torch.tensor([sums.get(k, 0.0) for k in keys], dtype=torch.float64, device=run.engine.device)
    if run.dist.world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(values)
    return dict(zip(keys, values.tolist()))


def data_stats(run: Run) -> dict[str, int]:
    """Bad-sample counts of the data source, summed over ranks."""
    stats = dict(getattr(run.source, "stats", {}) or {})
    if run.dist.world_size > 1:
        import torch.distributed as dist

        gathered: list[dict] = [{} for _ in range(run.dist.world_size)]
        dist.all_gather_object(gathered, stats)
        stats = {}
        for g in gathered:
            for k, v in g.items():
                stats[k] = stats.get(k, 0) + int(v)
    return stats


def log_train(run: Run) -> None:
    m, elapsed = run.meter, time.perf_counter() - run.meter.t0
    keys = ["loss", "micro", "text", "n_text", "image", "n_image", "tokens", "lr", "bad"]
    s = reduce_sums(run, keys, m.totals())
    steps = max(1, run.step - m.start_step)
    record = {
        "loss": s["loss"] / max(s["micro"], 1),
        "loss_text": s["text"] / max(s["n_text"], 1),
        "loss_image": s["image"] / max(s["n_image"], 1),
        "lr": s["lr"] / max(s["micro"], 1),
        "tokens_per_s": s["tokens"] / max(elapsed, 1e-9),
        "s_per_step": elapsed / steps,
        "tokens": int(s["tokens"]),
        "bad_steps": run.bad_total,
        "data": data_stats(run),
    }
    run.monitor.train_line(run.step, record)
    run.meter = Meter(start_step=run.step)


@torch.no_grad()
def validate(run: Run) -> None:
    """Mean held-out losses over `train.val_batches` batches, with fixed noise so runs compare."""
    if run.val_source is None:
        return
    source = run.val_source(run.dist.rank, run.dist.world_size) if callable(run.val_source) else run.val_source
    held = []
    for batch in source:
        if len(held) == run.cfg.train.val_batches:
            break
        held.append(batch)
    n = len(held)
    if run.dist.world_size > 1:  # every rank must run the same number of (collective) forwards
        import torch.distributed as dist

        t = torch.tensor([len(held)], device=run.engine.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        n = int(t.item())
    run.engine.eval()
    sums: dict[str, float] = {}
    for i, batch in enumerate(held[:n]):
        out = forward(run, batch, index=-(i * run.dist.world_size + run.dist.rank) - 1)
        for k in ("text", "image"):
            w = out[f"n_{k}_tokens"].item()
            sums[k] = sums.get(k, 0.0) + out[f"loss_{k}"].item() * w
            sums[f"n_{k}"] = sums.get(f"n_{k}", 0.0) + w
    run.engine.train()
    s = reduce_sums(run, ["text", "n_text", "image", "n_image"], sums)
    text, image = s["text"] / max(s["n_text"], 1), s["image"] / max(s["n_image"], 1)
    w = run.cfg.model
    record = {"loss": w.loss_weight_text * text + w.loss_weight_image * image, "loss_text": text,
              "loss_image": image, "batches": n * run.dist.world_size}
    run.monitor.record("val", run.step, record)
    run.monitor.print(f"step {run.step} validation: loss {record['loss']:.4f} text {text:.4f} image {image:.4f}")


def save(run: Run) -> None:
    data = run.source.state_dict() if hasattr(run.source, "state_dict") else None
    state = {"step": run.step, "consumed": run.consumed, "data": data, "bad_total": run.bad_total}
    tag = checkpointing.save(run.engine, run.run_dir, run.step, state, run.ema, run.cfg.to_yaml(),
                             run.dist.rank, run.dist.world_size, run.cfg.train.keep_last, run.frozen)
    run.monitor.print(f"step {run.step}: checkpoint {tag}")


# ------------------------------------------------------------------------------------------------
# Before and after
# ------------------------------------------------------------------------------------------------


def check_shards(patterns: list[str], key: str) -> None:
    """Every local shard named in `key` exists (URLs and pipe: commands are the loader's to open)."""
    from omni.data.shards import expand_shards

    if not patterns:
        raise ValueError(f"{key} is empty: list shard paths (make some with `omni data shapes --out DIR`)")
    try:
        expand_shards(patterns)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{key}: {e}") from None


def preflight(cfg: Config, batches: BatchSource | None) -> tuple[str, dict]:
    """Everything that can be wrong with the request, checked before any process group or model."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    precision = resolve_precision(cfg.train.precision)
    ds_config = deepspeed_config(cfg, world_size)  # batch geometry, ZeRO options, user JSON
    if batches is None:
        check_shards(cfg.data.train, "data.train")
        if cfg.train.val_every and cfg.data.val:
            check_shards(cfg.data.val, "data.val")
    if cfg.train.trainable == "new" and cfg.model.backbone.pretrained is None and cfg.train.init_from is None:
        raise ValueError("train.trainable=new freezes the backbone, so it needs model.backbone.pretrained "
                         "or train.init_from")
    if cfg.train.lora.rank and cfg.model.backbone.pretrained is None and cfg.train.init_from is None:
        raise ValueError(f"train.lora.rank={cfg.train.lora.rank} freezes the backbone's weights and trains adapters on "
                         "them, so it needs weights worth keeping: model.backbone.pretrained or train.init_from")
    if cfg.train.init_from is not None:
        from omni.models.checkpoint import check_checkpoint_dir

        check_checkpoint_dir(cfg.train.init_from)
    if cfg.train.steps < 1 or cfg.train.save_every < 1 or cfg.train.log_every < 1:
        raise ValueError("train.steps, train.save_every and train.log_every must be at least 1")
    return precision, ds_config


def _source(spec: BatchSource | None, cfg: Config, model, d: Dist, split: str):
    if spec is not None:
        return spec(d.rank, d.world_size) if callable(spec) else spec
    if split == "val" and not cfg.data.val:
        return None
    from omni.data.loader import BatchStream

    return BatchStream(cfg.data, model.tokenizer, model.image_tokenizer, split=split, rank=d.rank,
                       world_size=d.world_size, seed=cfg.train.seed, groups=model.groups,
                       order=model.order, choices=model.group_choices)


def write_run_files(cfg: Config, run_dir: Path, model, ds_config: dict, precision: str, d: Dist) -> None:
    """The resolved config, versions and DeepSpeed JSON, saved beside the run's outputs."""
    import deepspeed
    import transformers

    from omni import __version__

    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())
    atomic_write_text(run_dir / "ds_config.json", json.dumps(ds_config, indent=2))
    atomic_write_text(run_dir / "backbone_config.json", model.backbone.config.to_json_string())
    model.tokenizer.save_pretrained(run_dir / "tokenizer")  # export needs no path outside the run
    versions = {
        "omni": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "deepspeed": deepspeed.__version__, "python": platform.python_version(), "host": platform.node(),
        "world_size": d.world_size, "precision": precision,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
    }
    atomic_write_text(run_dir / "versions.json", json.dumps(versions, indent=2))


def prepare(cfg: Config, batches: BatchSource | None = None, val_batches: BatchSource | None = None) -> Run:
    """Checks, process group, model, engine, resume: everything `fit` needs."""
    from omni.train.build import with_init_model

    precision, ds_config = preflight(cfg, batches)
    cfg, from_checkpoint = with_init_model(cfg)  # train.init_from: the checkpoint's model shapes
    run_dir = Path(cfg.train.out_dir)
    resume_tag = checkpointing.find_resume(run_dir, cfg.train.resume)
    changes = checkpointing.resume_changes(resume_tag, cfg) if resume_tag is not None else []
    lock = RunLock(run_dir).acquire() if is_rank0() else None  # one omni train per output directory
    d = None
    try:
        d = init_distributed()
        run = _prepare_on_ranks(cfg, d, precision, ds_config, resume_tag, from_checkpoint, batches, val_batches)
    except BaseException:
        if d is not None:
            close_distributed(d, barrier=False)  # a refused resume must not leave the process group behind
        if lock is not None:
            lock.release()
        raise
    run.lock = lock
    if lock is not None and lock.took_over is not None:
        run.monitor.print(f"took over a stale lock of process {lock.took_over.get('pid')} (no longer running)")
    if changes:
        run.monitor.print(f"resumed with changed settings, now in effect: {'; '.join(changes)}")
    return run


def _prepare_on_ranks(cfg: Config, d: Dist, precision: str, ds_config: dict, resume_tag: Path | None,
                      from_checkpoint: list[str], batches: BatchSource | None, val_batches: BatchSource | None) -> Run:
    from omni.train.build import build_model
    from omni.train.ema import EMA
    from omni.train.engine import batch_geometry, setup_engine
    from omni.train.monitor import Monitor

    run_dir = Path(cfg.train.out_dir)
    _quiet_deepspeed()
    model = build_model(cfg, ds_config)
    engine, ds_config = setup_engine(cfg, model, d.world_size)
    model = engine.module
    ema = EMA(model, cfg.train.ema_decay, d.rank, d.world_size, zero3=cfg.train.zero_stage == 3)
    seed_everything(cfg.train.seed + d.rank)
    source = _source(batches, cfg, model, d, "train")
    val_source = val_batches if val_batches is not None else _source(None, cfg, model, d, "val")
    run = Run(cfg=cfg, dist=d, run_dir=run_dir, precision=precision, engine=engine, model=model, ema=ema,
              source=source, val_source=val_source, monitor=None, stop=checkpointing.StopSignal(),
              gas=batch_geometry(cfg, d.world_size)[1], frozen=checkpointing.frozen_record(cfg, model))
    if resume_tag is not None:
        state = checkpointing.load(engine, resume_tag, ema, d.rank, d.world_size, cfg=cfg)
        run.step, run.consumed, run.bad_total = engine.global_steps, state["consumed"], state["bad_total"]
        if state.get("resharded_from") is not None:
            resume_resharded(run, state["resharded_from"])
        elif state.get("data") is not None and hasattr(source, "load_state_dict"):
            source.load_state_dict(state["data"])
        else:
            run.skip = state["consumed"]
    if d.rank == 0:
        write_run_files(cfg, run_dir, model, ds_config, precision, d)
    run.meter = Meter(start_step=run.step)
    run.monitor = Monitor(run_dir, enabled=d.rank == 0, total_steps=cfg.train.steps, start_step=run.step)
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    n_train = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    run.monitor.print(
        f"omni train: {cfg.name}, {n_params / 1e6:.2f}M parameters ({n_train / 1e6:.2f}M trained), "
        f"{d.world_size} rank(s), ZeRO-{cfg.train.zero_stage}, {precision_note(cfg, precision)}, global batch "
        f"{ds_config['train_batch_size']} rows, run dir {run_dir}"
        + (f", resumed from {resume_tag} (step {run.step})" if resume_tag is not None else "")
    )
    if from_checkpoint:
        run.monitor.print(f"model shapes from train.init_from, where the config differs: {', '.join(from_checkpoint)}")
    if run.frozen is not None:
        run.monitor.print(f"checkpoints leave the {len(run.frozen['parameters'])} frozen weights in "
                          f"{run.frozen['init_from']} (train.save_frozen=true writes them too)")
    return run


def precision_note(cfg: Config, precision: str) -> str:
    """The header's precision, with why `auto` chose fp32 on a CPU: there bf16 has no native
    instructions (AMX or AVX512-BF16), and emulated bf16 matmuls are ~60x slower than fp32 ones
    (1.2 against 73 GFLOP/s on an AVX2-only AMD EPYC), so the run trains in fp32 -- on such a CPU
    the demo's step takes ~2.5-3x as long as on one with native bf16 (docs/demo.md, session 27)."""
    if cfg.train.precision == "auto" and precision == "fp32" and not torch.cuda.is_available():
        return "fp32 (train.precision=auto: this CPU has no native bf16)"
    return precision


def resume_resharded(run: Run, saved_world: int) -> None:
    """The data position after a resume on another number of processes. Every rank skipped the same
    batches (`agree`), so the global position is (optimizer steps, skipped batches): a source that
    can seek there (`resume_at`) continues from it (synthetic batches exactly, the shard loader
    re-seeded by it); any other starts its stream afresh. The log says which."""
    source, d = run.source, run.dist
    run.consumed = run.step * run.gas + run.bad_total
    if hasattr(source, "resume_at"):
        how = source.resume_at(run.step, run.bad_total) or "data position kept"
    else:
        run.consumed = 0
        how = "the data stream restarts (its position is per rank and cannot be split anew)"
    if d.rank == 0:
        print(f"resumed a checkpoint of {saved_world} rank(s) on {d.world_size} (DeepSpeed universal checkpoint); "
              f"{how}", flush=True)


def _quiet_deepspeed() -> None:
    """DeepSpeed's info logs and its calls to deprecated torch.distributed names drown the progress lines."""
    import logging
    import warnings

    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*is deprecated. Please use `torch\.distributed", category=FutureWarning)


def finish(run: Run, ok: bool) -> None:
    run.stop.close()
    if run.monitor is not None:
        run.monitor.close()
    if hasattr(run.engine, "destroy"):
        run.engine.destroy()
    close_distributed(run.dist, barrier=ok)
    if run.lock is not None:
        run.lock.release()
