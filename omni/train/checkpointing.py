"""Training checkpoints: DeepSpeed's sharded state plus omni's per-rank state, crash-safe.

    RUN/checkpoints/latest                 tag of the newest *complete* checkpoint (atomic rename)
    RUN/checkpoints/step00000500/          DeepSpeed files (model, ZeRO optimizer shards, scheduler)
        omni_rank{r}.json                  step, data-loader position, RNG states, fault counters
        ema_rank{r}.safetensors            EMA weights held by rank r (omni.train.ema)
        config.yaml                        the resolved run config
        frozen.json                        only when the frozen weights were left out (below)
        COMPLETE                           written last, by rank 0, after every rank finished

A crash mid-save leaves a tag without COMPLETE and `latest` still naming the previous one;
resume ignores incomplete tags and the next prune removes them. Only the last `keep_last`
complete checkpoints are kept.

Frozen weights (`train.save_frozen=false`, the default): when every frozen parameter is a weight of
`train.init_from` (LoRA's base layers, what `train.trainable` leaves out), DeepSpeed writes only the
trained ones (`exclude_frozen_parameters`), so a LoRA checkpoint of a 7B model holds megabytes of
adapters and their optimizer state rather than the 14 GB base again. frozen.json names those
parameters and the checkpoint they come from, with a fingerprint of its weight files; resume (whose
model is built from train.init_from anyway) and export check it and read them from there, and a
changed or missing checkpoint is refused by name rather than silently giving other weights.
"""

from __future__ import annotations

import base64
import json
import random
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omni.utils import atomic_write_text

CKPT_DIR = "checkpoints"
COMPLETE = "COMPLETE"
FROZEN = "frozen.json"


# ------------------------------------------------------------------------------------------------
# Frozen weights left to train.init_from
# ------------------------------------------------------------------------------------------------


def init_name(name: str) -> str:
    """A parameter's name in the checkpoint it was loaded from: LoRA's `P.base_layer.weight` is `P.weight`."""
    return name.replace(".base_layer.", ".")


def fingerprint(root: Path) -> str:
    """SHA-256 over a checkpoint's weight files: each one's name, size, safetensors header and 64
    slices of 64 KiB spread over it. Cheap on a 14 GB model, and any retraining or replacement of
    the weights changes it (a copy to another place does not)."""
    import hashlib

    from omni.train.build import _weight_files

    h = hashlib.sha256()
    for file in _weight_files(root):
        size = file.stat().st_size
        h.update(f"{file.name}:{size}".encode())
        with open(file, "rb") as f:
            head = int.from_bytes(f.read(8), "little")
            h.update(f.read(min(head, size)))
            for i in range(64):
                f.seek(size * i // 64)
                h.update(f.read(65536))
    return h.hexdigest()


def frozen_record(cfg, module) -> dict[str, Any] | None:
    """What frozen.json holds when checkpoints may leave the frozen weights out: every frozen
    parameter is a tensor of `train.init_from`, and train.save_frozen is off. None otherwise
    (then every weight is saved, as without frozen ones)."""
    if cfg.train.save_frozen or not cfg.train.init_from:
        return None
    frozen = sorted(n for n, p in module.named_parameters() if not p.requires_grad)
    if not frozen:
        return None
    from omni.train.build import _tensor_files

    root = Path(cfg.train.init_from).resolve()
    where = _tensor_files(root)
    if any(init_name(n) not in where for n in frozen):
        return None  # e.g. a frozen module the checkpoint lacks (started fresh): saved as usual
    return {"init_from": str(root), "fingerprint": fingerprint(root), "parameters": frozen}


def check_frozen(tag: Path, init_from: str | None) -> dict[str, Any] | None:
    """The tag's frozen.json, once its weights are where it says, or at `init_from` (resume: the
    run's train.init_from now; export: its --init-from) when given; None for a tag that holds every
    weight."""
    path = tag / FROZEN
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    root = Path(init_from).resolve() if init_from else Path(record["init_from"])
    what = (f"checkpoint {tag} leaves its {len(record['parameters'])} frozen weights to the checkpoint the run "
            f"started from, {record['init_from']}")
    fix = ("or point train.init_from at a copy of it (omni export: --init-from COPY)" if init_from else
           "or give omni export the copy's place: --init-from COPY")
    try:
        now = fingerprint(root)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{what}, and {root} cannot be read ({e}): restore it there, {fix}") from None
    if now != record["fingerprint"]:
        raise ValueError(f"{what}, and the weights in {root} are not those any more (their fingerprint changed): "
                         f"restore the original checkpoint there, {fix}")
    return {**record, "init_from": str(root)}


def frozen_weights(record: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The frozen parameters a tag left out, read from their checkpoint as fp32 (by training names)."""
    from safetensors import safe_open

    from omni.train.build import _tensor_files

    where = _tensor_files(Path(record["init_from"]))
    by_file: dict[Path, list[str]] = {}
    for name in record["parameters"]:
        by_file.setdefault(where[init_name(name)], []).append(name)
    out = {}
    for file, names in by_file.items():  # each weight file opened once
        with safe_open(str(file), framework="pt") as f:
            for name in names:
                t = f.get_tensor(init_name(name))
                out[name] = t.float() if t.is_floating_point() else t
    return out


def tag_name(step: int) -> str:
    return f"step{step:08d}"


def complete_tags(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoint tag directories, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and (p / COMPLETE).exists())


def latest_tag(ckpt_dir: Path) -> Path | None:
    """The tag `latest` names if it is complete, else the newest complete one."""
    latest = ckpt_dir / "latest"
    if latest.exists():
        tag = ckpt_dir / latest.read_text().strip()
        if (tag / COMPLETE).exists():
            return tag
    tags = complete_tags(ckpt_dir)
    return tags[-1] if tags else None


def saved_step(run_dir: Path) -> int:
    """The step of the run's newest complete checkpoint (0: none)."""
    tag = latest_tag(Path(run_dir) / CKPT_DIR)
    return int(json.loads((tag / COMPLETE).read_text())["step"]) if tag else 0


def find_resume(run_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint to start from: None (fresh), `auto` (the run's latest, if any) or a tag dir."""
    ckpt_dir = run_dir / CKPT_DIR
    if resume is None:
        if complete_tags(ckpt_dir):
            raise ValueError(
                f"{run_dir} already holds checkpoints; continue it with `--resume auto` (train.resume=auto) "
                "or choose a new train.out_dir"
            )
        return None
    if resume == "auto":
        return latest_tag(ckpt_dir)
    tag = Path(resume)
    if not (tag / COMPLETE).exists():
        raise FileNotFoundError(f"train.resume={resume!r} is not a complete checkpoint directory (no {COMPLETE} file)")
    return tag


# ------------------------------------------------------------------------------------------------
# RNG state as JSON (no pickle)
# ------------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *[x.item() if hasattr(x, "item") else x for x in np_state[2:]]],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8))


# ------------------------------------------------------------------------------------------------
# Save / load
# ------------------------------------------------------------------------------------------------


def save(engine, run_dir: Path, step: int, rank_state: dict[str, Any], ema, config_yaml: str,
         rank: int, world_size: int, keep_last: int, frozen: dict[str, Any] | None = None) -> Path:
    """Write checkpoint `step` (all ranks call this); returns the tag directory. With `frozen`
    (`frozen_record`), the frozen weights are left out and frozen.json says where they are."""
    import torch.distributed as dist

    ckpt_dir = run_dir / CKPT_DIR
    tag = ckpt_dir / tag_name(step)
    if (tag / COMPLETE).exists():
        return tag  # already saved at this step (e.g. a signal right after a periodic save)
    engine.save_checkpoint(str(ckpt_dir), tag=tag.name, client_state={"omni_step": step}, save_latest=False,
                           exclude_frozen_parameters=frozen is not None)
    atomic_write_text(tag / f"omni_rank{rank}.json", json.dumps({**rank_state, "rng": rng_state()}))
    ema.save(tag)
    dist.barrier()
    if rank == 0:
        atomic_write_text(tag / "config.yaml", config_yaml)
        if frozen is not None:
            atomic_write_text(tag / FROZEN, json.dumps(frozen, indent=1))
        info = {"step": step, "world_size": world_size, "zero_stage": engine.zero_optimization_stage(),
                "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write_text(tag / COMPLETE, json.dumps(info))
        atomic_write_text(ckpt_dir / "latest", tag.name)
        prune(ckpt_dir, keep_last, keep=tag)
    dist.barrier()
    return tag


def prune(ckpt_dir: Path, keep_last: int, keep: Path) -> None:
    """Remove all but the newest `keep_last` complete tags, and incomplete tags older than `keep`."""
    complete = complete_tags(ckpt_dir)
    doomed = complete[: max(0, len(complete) - max(1, keep_last))]
    doomed += [p for p in ckpt_dir.iterdir() if p.is_dir() and not (p / COMPLETE).exists() and p.name < keep.name]
    for p in doomed:
        if p != keep:
            shutil.rmtree(p, ignore_errors=True)


def load(engine, tag: Path, ema, rank: int, world_size: int, cfg=None) -> dict[str, Any]:
    """Restore engine (weights, optimizer, scheduler, step), EMA and RNG; returns this rank's state.
    With `cfg`, its optimizer settings replace the checkpoint's (`apply_optimizer_settings`)."""
    from omni.train.safe_load import no_code_torch_load

    info = json.loads((tag / COMPLETE).read_text())
    saved_world = int(info["world_size"])
    resharded = saved_world != world_size and info["zero_stage"] > 0
    # Frozen weights left out: the model was built from train.init_from, which must still be them.
    if cfg is not None and not cfg.train.init_from and (tag / FROZEN).exists():
        was = json.loads((tag / FROZEN).read_text())["init_from"]
        raise ValueError(f"checkpoint {tag} leaves its frozen weights to the checkpoint the run started from, but "
                         f"this resume sets no train.init_from: resume with train.init_from={was} (or a copy of it)")
    frozen = check_frozen(tag, cfg.train.init_from if cfg is not None else None)
    load_fn = None if frozen is None else _loader(set(frozen["parameters"]))
    load_dir, load_tag = (universal_checkpoint(tag, rank), "universal") if resharded else (tag.parent, tag.name)
    engine._config.load_universal_checkpoint = resharded  # DeepSpeed re-partitions from per-parameter files
    try:
        with no_code_torch_load():  # DeepSpeed's own loader would unpickle any object
            load_path, _ = engine.load_checkpoint(str(load_dir), tag=load_tag, load_optimizer_states=True,
                                                  load_lr_scheduler_states=True, custom_load_fn=load_fn)
    finally:
        engine._config.load_universal_checkpoint = False
    if load_path is None:
        raise FileNotFoundError(f"DeepSpeed could not load the checkpoint in {tag}")
    if cfg is not None:
        apply_optimizer_settings(engine, cfg)
    # A new rank past the saved ones takes a saved rank's RNG (noise is seeded per micro-batch anyway).
    state = json.loads((tag / f"omni_rank{min(rank, saved_world - 1)}.json").read_text())
    set_rng_state(state.pop("rng"))
    if saved_world != world_size:
        state["resharded_from"] = saved_world
        ema.load_resharded(tag)  # ZeRO-3 EMA shards are cut anew for this world size
    else:
        ema.load(tag)
    return state


def _loader(frozen: set[str]):
    """DeepSpeed's module load for a tag without its frozen weights: strict about everything else."""

    def load(src, dst):
        result = dst.load_state_dict(src, strict=False)
        missing = [k for k in result.missing_keys if k not in frozen]
        if missing or result.unexpected_keys:
            raise ValueError(f"the checkpoint's weights do not fit the model: missing {missing[:5]}, "
                             f"unexpected {result.unexpected_keys[:5]}")

    return load


def universal_checkpoint(tag: Path, rank: int) -> Path:
    """`tag` converted to DeepSpeed's universal checkpoint (per-parameter fp32 weights and optimizer
    moments, loadable by any number of ranks) in `tag/universal`; rank 0 converts once, under the
    same no-code loading, and every rank waits for it. Returns the folder holding `universal/`."""
    import shutil
    import types

    import torch.distributed as dist

    out = tag / "universal"
    if rank == 0 and not (out / COMPLETE).exists():
        from deepspeed.checkpoint import ds_to_universal

        from omni.train.safe_load import no_code_torch_load

        shutil.rmtree(out, ignore_errors=True)
        args = types.SimpleNamespace(input_folder=str(tag), output_folder=str(out), num_extract_workers=1,
                                     num_merge_workers=1, keep_temp_folder=False, strict=True,
                                     inject_missing_state=True)  # omni's saves carry no Megatron info
        with no_code_torch_load():
            ds_to_universal.main(args)
        atomic_write_text(out / COMPLETE, json.dumps({"from": tag.name}))
    if dist.is_initialized():
        dist.barrier()
    return tag


# ------------------------------------------------------------------------------------------------
# Settings that differ on resume
# ------------------------------------------------------------------------------------------------

# Bookkeeping: where the run lives and how it was started, not how it trains.
_NOT_SETTINGS = ("train.resume", "train.out_dir", "name")
# DeepSpeed's optimizer state carries these: after loading they are re-applied from the config.
_OPTIMIZER = ("train.lr", "train.betas", "train.weight_decay")
# Fixed by what the checkpoint holds: a different value cannot take effect.
_FIXED = {
    "train.zero_stage": "the checkpoint's files are ZeRO-{old} partitions",
    "train.trainable": "the optimizer state holds the parameters that train.trainable={old} trained",
    "train.lora.rank": "the checkpoint holds adapters of rank {old} (0: none)",
    "train.lora.targets": "the checkpoint holds adapters on {old}",
}


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "task_weights":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def resume_changes(tag: Path, cfg) -> list[str]:
    """Settings of `cfg` that differ from the checkpoint's config.yaml, as `key old -> new` lines.

    Every change either takes effect (the loop reads the new config; the optimizer's lr, betas
    and weight decay are re-applied after loading, see `apply_optimizer_settings`) or is refused
    here with the reason, so the run's config.yaml never records a value that is not in effect.
    """
    import yaml

    from omni.train.build import RUN_MODEL_FIELDS

    path = tag / "config.yaml"
    if not path.exists():
        return []
    old = _flat(yaml.safe_load(path.read_text()) or {})
    new = _flat(cfg.to_dict())
    changed = {k: (old.get(k), v) for k, v in new.items()
               if k not in _NOT_SETTINGS and k in old and _plain(old[k]) != _plain(v)}
    for key, (was, now) in changed.items():
        model_field = key.startswith("model.") and key[len("model."):] not in RUN_MODEL_FIELDS
        if key in _FIXED or model_field:
            why = _FIXED.get(key, "the checkpoint's weights have the old model's shapes").format(old=was)
            raise ValueError(
                f"cannot resume {tag} with {key}={now!r}: {why}. Resume with {key}={was!r}, or start a new run "
                f"(a new train.out_dir, with train.init_from=<an exported checkpoint> to keep the weights)"
            )
    return [f"{k} {was!r} -> {now!r}" for k, (was, now) in changed.items()]


def _plain(x: Any) -> Any:
    return [_plain(v) for v in x] if isinstance(x, (list, tuple)) else x


def apply_optimizer_settings(engine, cfg) -> None:
    """Loading restores the optimizer's lr, betas and weight decay from the checkpoint; put back
    the config's, so `train.lr=...` on resume changes the schedule from here on (warmup/cosine
    position kept) and config.yaml stays true. Groups without decay keep 0."""
    from omni.train.engine import param_groups

    t = cfg.train
    schedule = engine.lr_scheduler
    factor = schedule.lr_lambdas[0](schedule.last_epoch)
    schedule.base_lrs = [t.lr for _ in schedule.base_lrs]
    decays = [g["weight_decay"] for g in param_groups(engine.module, t.weight_decay)]  # the order setup_engine used
    groups = engine.optimizer.param_groups
    for i, group in enumerate(groups):
        group["initial_lr"] = t.lr
        group["lr"] = t.lr * factor
        group["betas"] = tuple(t.betas)
        if len(decays) == len(groups):
            group["weight_decay"] = decays[i]
    schedule._last_lr = [g["lr"] for g in engine.optimizer.param_groups]


# ------------------------------------------------------------------------------------------------
# Preemption
# ------------------------------------------------------------------------------------------------


class StopSignal:
    """SIGTERM / SIGINT set a flag; the loop saves at the next step boundary and exits cleanly.

    A second SIGINT falls through to the default handler (Ctrl-C twice kills at once).
    """

    def __init__(self):
        self.received: str | None = None
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a worker thread): no handlers
                pass

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def close(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
