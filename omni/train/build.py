"""Building the model to train: fresh, from a pretrained backbone, or partitioned for ZeRO-3.

Three starting points, one result (an `OmniModel` whose `requires_grad` flags say what trains):

- from scratch: every rank builds the same model from `train.seed` (DeepSpeed then partitions
  it for ZeRO-3). Fine up to a few hundred million parameters.
- pretrained, ZeRO 0-2: Hugging Face `from_pretrained` on every rank; these stages keep a full
  replica of the weights on every rank anyway.
- pretrained, ZeRO-3: the backbone is constructed inside `deepspeed.zero.Init`, so each rank
  only ever allocates its 1/N partition, and rank 0 streams the safetensors files one tensor at
  a time into the partitions (`GatheredParameters(modifier_rank=0)`). No rank holds the full
  model in host RAM; a 7B backbone needs about 28 GB / N per rank for fp32 weights.

`deepspeed.zero.Init` patches tensor constructors; with torch 2.13 it raises a TypeError
("Signature mismatch ... tensor_pynew") unless transformers was imported before entering it,
so this module imports transformers first.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from omni.config import Config
from omni.model import OmniModel, build_backbone
from omni.tokenizers.image import build_image_tokenizer
from omni.tokenizers.text import TextTokenizer


def build_model(cfg: Config, ds_config: dict) -> OmniModel:
    """The model to train, with initial weights; the same on every rank.

    The new modules (in_proj, diffusion head) are seeded after the backbone exists, so their
    initial weights depend on `train.seed` only, not on how the backbone was made.
    """
    mcfg = cfg.model
    if mcfg.tokenizer is None:
        raise ValueError(
            "model.tokenizer is not set: train one with `omni data tokenizer` or point it at a local "
            "Hugging Face tokenizer directory"
        )
    tokenizer = TextTokenizer.from_pretrained(mcfg.tokenizer)
    torch.manual_seed(cfg.train.seed)
    if mcfg.backbone.pretrained is not None and cfg.train.zero_stage == 3:
        backbone = load_backbone_partitioned(Path(mcfg.backbone.pretrained), len(tokenizer), mcfg, ds_config)
    else:
        backbone = build_backbone(mcfg, len(tokenizer))
    torch.manual_seed(cfg.train.seed + 1)
    model = OmniModel(mcfg, tokenizer, build_image_tokenizer(mcfg.image), backbone=backbone)
    select_trainable(model, cfg)
    return model


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    raise FileNotFoundError(
        f"{path} has no model.safetensors(.index.json); omni loads pretrained weights only from safetensors"
    )


def load_backbone_partitioned(path: Path, vocab_size: int, mcfg, ds_config: dict) -> nn.Module:
    """A HF causal LM built partitioned across ranks, filled from `path` by rank 0, tensor by tensor.

    Rows of the token embedding (and untied LM head) beyond the checkpoint's vocabulary are
    the new tokens (<boi>, <eoi>, <img> ...); they start at the mean of the pretrained rows.
    """
    import transformers  # noqa: F401  (must precede zero.Init, see module docstring)
    import deepspeed
    import torch.distributed as dist
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    if not (path / "config.json").exists():
        raise FileNotFoundError(f"model.backbone.pretrained={str(path)!r} is not a Hugging Face model directory")
    hf_cfg = AutoConfig.from_pretrained(str(path))
    old_vocab = hf_cfg.vocab_size
    hf_cfg.vocab_size = max(old_vocab, vocab_size)
    # dtype comes from ds_config (no bf16/fp16 section -> fp32): an explicit dtype=torch.float32
    # is ignored on accelerators without fp16 (the CPU), a precedence slip in DeepSpeed 0.19's
    # Init._set_dtype that yields bf16. mem_efficient_linear=False: otherwise Init replaces
    # torch.nn.functional.linear for the rest of the process.
    with deepspeed.zero.Init(config_dict_or_path=ds_config, mem_efficient_linear=False):
        backbone = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation=mcfg.backbone.attn_implementation)
    params = dict(backbone.named_parameters())
    is_rank0 = dist.get_rank() == 0
    where = _tensor_files(path) if is_rank0 else {}
    for name, p in params.items():
        # Every rank takes part in each gather; only rank 0 reads the file and writes the tensor.
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            if is_rank0 and name in where:
                with safe_open(str(where[name]), framework="pt") as f:
                    _copy_rows(p.data, f.get_tensor(name), name)
    if is_rank0:
        tied = getattr(hf_cfg, "tie_word_embeddings", False)
        missing = [n for n in params if n not in where and not (tied and n.startswith("lm_head"))]
        if missing:
            raise ValueError(f"{path} lacks weights for {missing[:5]} ({len(missing)} in all)")
    return backbone


def _tensor_files(path: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it."""
    from safetensors import safe_open

    out = {}
    for file in _weight_files(path):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: file for k in f.keys()})
    return out


def _copy_rows(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    """Copy `src` into `dst`; extra leading rows of `dst` (new tokens) get the mean of `src`'s rows."""
    if src.shape[1:] != dst.shape[1:] or src.dim() == 0 or src.shape[0] > dst.shape[0]:
        if src.shape != dst.shape:
            raise ValueError(f"{name}: checkpoint shape {tuple(src.shape)} does not fit the model's {tuple(dst.shape)}")
    n = src.shape[0] if src.dim() else 0
    if src.dim() and n < dst.shape[0]:
        dst[:n].copy_(src)
        dst[n:].copy_(src.float().mean(0, keepdim=True).expand(dst.shape[0] - n, *src.shape[1:]))
    else:
        dst.copy_(src)


# ------------------------------------------------------------------------------------------------
# What trains
# ------------------------------------------------------------------------------------------------


def new_token_ids(model: OmniModel, cfg: Config) -> list[int]:
    """Token ids the pretrained backbone never saw: omni's image tokens and rows past its vocabulary."""
    ids = {model.special.boi, model.special.eoi, model.special.img}
    pretrained = cfg.model.backbone.pretrained
    old_vocab = json.loads((Path(pretrained) / "config.json").read_text())["vocab_size"] if pretrained else 0
    ids.update(range(old_vocab, len(model.tokenizer)))
    return sorted(ids)


def select_trainable(model: OmniModel, cfg: Config) -> None:
    """`train.trainable`: `all`, or `new` = in_proj, diffusion head and the new token rows (Orthus stage 1).

    With `new`, the embedding matrices stay trainable but a gradient mask zeroes every
    pretrained row, so AdamW (no weight decay on embeddings) never moves them.
    """
    if cfg.train.trainable == "all":
        return
    if cfg.model.backbone.pretrained is None:
        raise ValueError(
            "train.trainable=new freezes the backbone, which only makes sense for a pretrained one: "
            "set model.backbone.pretrained or use train.trainable=all"
        )
    model.requires_grad_(False)
    model.in_proj.requires_grad_(True)
    model.head.requires_grad_(True)
    rows = torch.tensor(new_token_ids(model, cfg))
    embeddings = {id(m.weight): m.weight for m in (model.backbone.get_input_embeddings(), model.lm_head)}
    for weight in embeddings.values():
        weight.requires_grad_(True)
        n = getattr(weight, "ds_shape", weight.shape)[0]
        mask = torch.zeros(n, 1)
        mask[rows[rows < n]] = 1.0
        weight.register_hook(lambda g, mask=mask: g * mask.to(g.device, g.dtype))
        weight.omni_row_mask = True  # engine.param_groups: no weight decay, or frozen rows would shrink
