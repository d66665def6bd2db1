"""Inference checkpoints: one directory, no pickle.

    DIR/model.safetensors      all weights (HF names under `backbone.`, then in_proj., head.)
    DIR/config.yaml            the resolved omni config (model + generation defaults)
    DIR/backbone_config.json   the HF config of the backbone (rebuilds it without the source dir)
    DIR/tokenizer/             the text tokenizer (HF format + omni special tokens)
    DIR/vae/ | DIR/vqgan/ | DIR/autoencoder/   image tokenizer weights when it has any

The directory is written beside its destination and renamed into place, so an interrupted save
never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from omni.config import Config, from_dict
from omni.utils import share_like_open

WEIGHTS = "model.safetensors"
BACKBONE_CONFIG = "backbone_config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def _dedupe_shared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing storage (tied embeddings): keep the first name."""
    seen: dict[tuple, str] = {}
    out = {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)) if v.device.type != "meta" else (k,)
        if key in seen:
            continue
        seen[key] = k
        out[k] = v.detach().contiguous().cpu()
    return out


def check_checkpoint_out(path: str | Path, force: bool = False) -> Path:
    """An output directory a checkpoint may be written to: new, empty, or an omni checkpoint (which
    is replaced only after the new one is complete). Anything else would be deleted, so it is
    refused unless `force` (`--force`). Called before any work, so nothing is computed in vain."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"--out {path} is a file, not a directory; choose a directory for the checkpoint")
    if force or not path.is_dir() or not any(path.iterdir()):
        return path
    if (path / WEIGHTS).is_file() and (path / "config.yaml").is_file():
        return path  # an earlier checkpoint: replaced as a whole once the new one is written
    held = sorted(p.name for p in path.iterdir())
    raise FileExistsError(
        f"--out {path} is not empty ({', '.join(held[:4])}{', ...' if len(held) > 4 else ''}) and is not an omni "
        "checkpoint; writing there would delete it. Choose a new or empty directory, or pass --force to replace it"
    )


def save_pretrained(model, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None,
                    config: Config | None = None, write_weights=None, force: bool = False) -> Path:
    """Write `model` (or `state_dict` with its structure) as an inference checkpoint.

    `write_weights(path)`, when given, writes the weights file itself (omni.models.convert streams a
    large source checkpoint into it without holding the weights in memory). An existing `path`
    must be an omni checkpoint (or empty) unless `force` (see `check_checkpoint_out`).
    """
    path = check_checkpoint_out(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    share_like_open(tmp)  # mkdtemp makes it 0700
    try:
        if write_weights is not None:
            write_weights(tmp / WEIGHTS)
        else:
            state = _dedupe_shared(state_dict if state_dict is not None else model.state_dict())
            save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt", "omni": "1"})
        mcfg = copy.deepcopy(model.cfg)
        mcfg.tokenizer = "tokenizer"
        mcfg.backbone.pretrained = None
        model.tokenizer.save_pretrained(tmp / "tokenizer")
        model.image_tokenizer.save_pretrained(tmp)
        if mcfg.image.kind == "vae":
            mcfg.image.path = "vae"
        elif mcfg.image.kind == "patch-ae":
            mcfg.image.path = "autoencoder"
        elif mcfg.image.kind == "vq-features":
            mcfg.image.path = "vqgan"
        full = copy.deepcopy(config) if config is not None else Config()
        full.model = mcfg
        (tmp / "config.yaml").write_text(full.to_yaml())
        (tmp / BACKBONE_CONFIG).write_text(model.backbone.config.to_json_string())
        for item in tmp.rglob("*"):  # some writers (safetensors) create 0600 files
            share_like_open(item)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def check_checkpoint_dir(path: str | Path) -> Path:
    """Fail early, naming the fix, for anything that is not a safetensors checkpoint directory."""
    path = Path(path)
    if path.is_file() and path.suffix in PICKLE_SUFFIXES:
        raise ValueError(
            f"{path} is a pickle file; omni never unpickles weights (it can run arbitrary code). "
            "Convert it to safetensors (safetensors.torch.save_file) inside an omni checkpoint directory"
        )
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist; train one with `omni train` or `omni demo`")
    if not path.is_dir():
        raise ValueError(f"checkpoint {str(path)!r} is a file; give the checkpoint directory (the one holding {WEIGHTS})")
    if not (path / WEIGHTS).exists():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ValueError(
                f"{path} holds {', '.join(pickles)} but no {WEIGHTS}; omni never unpickles weights. "
                "Convert them to safetensors first"
            )
        hint = " (this looks like a DeepSpeed training directory: export it with `omni export`)" if (
            path / "latest"
        ).exists() else ""
        raise FileNotFoundError(f"{path} has no {WEIGHTS}{hint}")
    return path


def load_config_from_checkpoint(path: str | Path) -> Config:
    data = yaml.safe_load((Path(path) / "config.yaml").read_text()) or {}
    return from_dict(data)


def read_backbone_config(directory: str | Path):
    """The Hugging Face config saved as `directory/backbone_config.json` (checkpoints and run dirs)."""
    from transformers import AutoConfig

    hf_dict = json.loads((Path(directory) / BACKBONE_CONFIG).read_text())
    return AutoConfig.for_model(hf_dict.pop("model_type"), **hf_dict)


def load_weights_file(directory: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of `directory/model.safetensors` on the CPU (safetensors: no code runs)."""
    from safetensors import SafetensorError

    path = Path(directory) / WEIGHTS
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(
            f"{path} is not a readable safetensors file ({e}); it may be truncated or not a checkpoint: "
            "export it again (omni export) or copy it again"
        ) from None
