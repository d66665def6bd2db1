"""Export a training checkpoint as an inference checkpoint (`OmniModel.from_pretrained` format).

    omni export --run RUN --out CKPT [--ema | --raw] [--tag step00000500]

Runs on the CPU of any machine that sees the checkpoint directory, with no process group and
no GPU: ZeRO 1-3 shards are consolidated by DeepSpeed's `zero_to_fp32` readers, which
concatenate each rank's fp32 partition file by file, so a ZeRO-3 model is never gathered on a
GPU (the full-state gather that makes ZeRO-3 saves run out of memory). EMA weights, when the
run kept them, replace the trained parameters (`--ema`, the default when present). LoRA
adapters (`train.lora`) are merged into the weights they adapt (omni/train/lora.py).
The model skeleton is built on the meta device: only the exported tensors take host memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from omni.config import Config, from_dict
from omni.models.backbone import tied_elsewhere
from omni.models.checkpoint import save_pretrained
from omni.train.checkpointing import CKPT_DIR, COMPLETE, check_frozen, frozen_weights, latest_tag
from omni.train.ema import has_ema, merge_ema_shards


def resolve_tag(run_dir: Path, tag: str | None) -> Path:
    ckpt_dir = Path(run_dir) / CKPT_DIR
    if tag is None:
        found = latest_tag(ckpt_dir)
        if found is None:
            raise FileNotFoundError(f"{run_dir} holds no complete checkpoint under {CKPT_DIR}/; train first")
        return found
    path = ckpt_dir / tag
    if not (path / COMPLETE).exists():
        tags = ", ".join(p.name for p in sorted(ckpt_dir.glob("step*")))
        raise FileNotFoundError(f"{path} is not a complete checkpoint; available: {tags or 'none'}")
    return path


def consolidated_state(tag_dir: Path, zero_stage: int) -> dict[str, torch.Tensor]:
    """Full fp32 weights of a DeepSpeed checkpoint, assembled on the CPU."""
    from omni.train.safe_load import load_file, no_code_torch_load

    if zero_stage == 0:
        # Without ZeRO, DeepSpeed's model-states file holds the whole module state dict.
        state = load_file(tag_dir / "mp_rank_00_model_states.pt")
        return {k: v.float() if v.is_floating_point() else v for k, v in state["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with no_code_torch_load():  # zero_to_fp32 calls torch.load(weights_only=False)
        return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)


def skeleton(cfg: Config, run_dir: Path):
    """The run's OmniModel with weights on the meta device (structure, tokenizers, configs only)."""
    from omni.models.backbone import rebuild_backbone
    from omni.models.model import OmniModel
    from omni.tokenizers.image import build_image_tokenizer
    from omni.tokenizers.text import TextTokenizer

    tok_dir = run_dir / "tokenizer" if (run_dir / "tokenizer").exists() else Path(cfg.model.tokenizer)
    tokenizer = TextTokenizer.from_pretrained(tok_dir)
    # Real weights (save_pretrained copies them); relative paths are relative to the starting checkpoint.
    image_tokenizer = build_image_tokenizer(cfg.model.image, root=cfg.train.init_from)
    with torch.device("meta"):
        backbone = rebuild_backbone(run_dir, cfg.model.backbone.attn_implementation)
        model = OmniModel(cfg.model, tokenizer, image_tokenizer, backbone=backbone)
    return model


def exported_step(out: str | Path) -> int | None:
    """The training step an export holds (its export.json), or None when it does not say."""
    try:
        return int(json.loads((Path(out) / "export.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def export(run_dir: str | Path, out: str | Path, ema: bool | None = None, tag: str | None = None,
           force: bool = False, init_from: str | Path | None = None) -> Path:
    """Write checkpoint `tag` (default: latest) of `run_dir` to `out`; `ema=None` uses EMA when present.
    A non-empty `out` that is not an omni checkpoint is refused unless `force`. `init_from`: where
    the checkpoint the run started from is now, when it moved (its frozen weights, image tokenizer)."""
    from omni.models.checkpoint import check_checkpoint_out

    run_dir = Path(run_dir)
    check_checkpoint_out(out, force)
    tag_dir = resolve_tag(run_dir, tag)
    info = json.loads((tag_dir / COMPLETE).read_text())
    cfg_path = tag_dir / "config.yaml" if (tag_dir / "config.yaml").exists() else run_dir / "config.yaml"
    import yaml

    cfg = from_dict(yaml.safe_load(cfg_path.read_text()))
    if init_from is not None:
        if cfg.train.init_from is None:
            raise ValueError(f"--init-from {init_from}: the run in {run_dir} did not start from a checkpoint "
                             "(train.init_from is not set); leave the option out")
        cfg.train.init_from = str(Path(init_from).resolve())
    state = consolidated_state(tag_dir, info["zero_stage"])
    frozen = check_frozen(tag_dir, init_from)  # frozen weights left to the checkpoint the run started from
    if frozen is not None:
        state.update(frozen_weights(frozen))
    use_ema = has_ema(tag_dir) if ema is None else ema
    if use_ema:
        averaged = merge_ema_shards(tag_dir)
        unknown = sorted(set(averaged) - set(state))
        if unknown:
            raise ValueError(f"EMA weights {unknown[:3]} are not parameters of the checkpoint in {tag_dir}")
        state.update(averaged)
    if cfg.train.lora.rank:  # adapters folded into the weights: the export is a plain model
        from omni.train.lora import merge_adapters

        state = merge_adapters(state, cfg.train.lora)
    model = skeleton(cfg, run_dir)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not tied_elsewhere(model, k, state)]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ValueError(f"{tag_dir} does not match the run's model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, v in expected.items():
        if k in state and tuple(state[k].shape) != tuple(v.shape):
            raise ValueError(f"{k}: checkpoint shape {tuple(state[k].shape)} vs model {tuple(v.shape)}")
    state = {k: state[k] for k in expected if k in state}
    save_pretrained(model, out, state_dict=state, config=cfg, force=force)
    meta = {"run": str(run_dir.resolve()), "tag": tag_dir.name, "step": info["step"], "ema": bool(use_ema)}
    (Path(out) / "export.json").write_text(json.dumps(meta, indent=2))
    return Path(out)
