"""Exponential moving average of the trained weights, kept where the weights live.

ZeRO 0-2 keep a full replica of every parameter on every rank, so rank 0 alone keeps the
EMA (one fp32 copy of the trainable weights). ZeRO-3 partitions parameters: each rank keeps
the EMA of its own partition (`param.ds_tensor`), so the EMA is as sharded as the model and
no rank ever gathers it. Checkpoints store what each rank holds as `ema_rank{r}.safetensors`
in the tag directory; `merge_ema_shards` reassembles full tensors on the CPU at export time.

ZeRO-3 partition layout (as DeepSpeed's zero_to_fp32 reads it): a parameter of `numel`
elements is flattened and padded to `world * ceil(numel / world)`; rank r holds the slice
`[r * part, (r + 1) * part)`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from omni.utils import atomic_path


class EMA:
    def __init__(self, model: nn.Module, decay: float, rank: int, world_size: int, zero3: bool):
        self.decay = decay
        self.rank = rank
        self.world_size = world_size
        self.zero3 = zero3
        self.active = decay > 0 and (zero3 or rank == 0)  # does this rank hold a share?
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.shadow: dict[str, torch.Tensor] = {}
        if self.active:
            self.shadow = {n: self._local(p).detach().float().clone() for n, p in self.params.items()}

    def _local(self, p: torch.Tensor) -> torch.Tensor:
        """What this rank holds of `p`: its ZeRO-3 partition, or the whole tensor."""
        return p.ds_tensor if self.zero3 else p.data

    @torch.no_grad()
    def update(self) -> None:
        """shadow <- decay * shadow + (1 - decay) * weights, after every optimizer step."""
        if not self.active:
            return
        for n, p in self.params.items():
            self.shadow[n].lerp_(self._local(p).float(), 1.0 - self.decay)

    # persistence ---------------------------------------------------------------------------------
    def save(self, tag_dir: Path) -> None:
        if not self.active:
            return
        shapes = {n: list(getattr(p, "ds_shape", p.shape)) for n, p in self.params.items()}
        meta = {
            "layout": "zero3-partition" if self.zero3 else "full",
            "world_size": str(self.world_size),
            "rank": str(self.rank),
            "decay": str(self.decay),
            "shapes": json.dumps(shapes),
        }
        tensors = {n: t.detach().cpu().contiguous() for n, t in self.shadow.items()}
        with atomic_path(Path(tag_dir) / f"ema_rank{self.rank}.safetensors") as tmp:
            save_file(tensors, str(tmp), metadata=meta)

    def load(self, tag_dir: Path) -> None:
        if not self.active:
            return
        path = Path(tag_dir) / f"ema_rank{self.rank}.safetensors"
        if not path.exists():
            raise FileNotFoundError(
                f"{path} is missing: the checkpoint was written without EMA (train.ema_decay=0) or with another "
                "ZeRO layout; resume with the same train.ema_decay and train.zero_stage"
            )
        with safe_open(str(path), framework="pt") as f:
            for n in self.shadow:
                self.shadow[n].copy_(f.get_tensor(n))


    @torch.no_grad()
    def load_resharded(self, tag_dir: Path) -> None:
        """Load EMA weights saved by another number of ranks: merge the saved shards, then keep this
        rank's ZeRO-3 partition (rank r holds elements [r * part, (r + 1) * part), zero-padded)."""
        if not self.active:
            return
        full = merge_ema_shards(Path(tag_dir))
        for n, shadow in self.shadow.items():
            flat = full[n].flatten().float()
            if not self.zero3:
                shadow.copy_(flat.view_as(shadow))
                continue
            part = shadow.numel()
            piece = flat[self.rank * part:(self.rank + 1) * part]
            shadow.zero_().view(-1)[: piece.numel()].copy_(piece)


def has_ema(tag_dir: Path) -> bool:
    return any(Path(tag_dir).glob("ema_rank*.safetensors"))


def merge_ema_shards(tag_dir: Path) -> dict[str, torch.Tensor]:
    """Full fp32 EMA tensors from a checkpoint tag directory, assembled on the CPU."""
    files = sorted(Path(tag_dir).glob("ema_rank*.safetensors"), key=lambda p: int(p.stem.split("rank")[1]))
    if not files:
        raise FileNotFoundError(f"{tag_dir} holds no EMA weights (the run had train.ema_decay=0); export with --raw")
    with safe_open(str(files[0]), framework="pt") as f:
        meta = f.metadata()
    if meta["layout"] == "full":
        with safe_open(str(files[0]), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safetensors handle)
    world = int(meta["world_size"])
    if len(files) != world:
        raise FileNotFoundError(f"{tag_dir} holds {len(files)} EMA shards but the run had {world} ranks")
    shapes = json.loads(meta["shapes"])
    handles = [safe_open(str(p), framework="pt") for p in files]
    out = {}
    for name, shape in shapes.items():
        numel = math.prod(shape)
        flat = torch.cat([h.get_tensor(name).flatten() for h in handles])  # (world * part,)
        out[name] = flat[:numel].view(shape).clone()
    return out
