"""Building the model to train: fresh, from a pretrained backbone or omni checkpoint, partitioned for ZeRO-3.

Starting points (one result: an `OmniModel` whose `requires_grad` flags say what trains):

- from scratch: every rank builds the same model from `train.seed` (DeepSpeed then partitions
  it for ZeRO-3). Fine up to a few hundred million parameters.
- `model.backbone.pretrained` (a Hugging Face directory): the backbone's weights; in_proj and
  the diffusion head start fresh.
- `train.init_from` (an omni checkpoint: `omni convert`, `omni export`): every weight, and the
  model section of its config (`with_init_model`). A run may turn parallel image decoding on
  from a checkpoint drawn one token a pass, or give a parallel checkpoint another schedule,
  order or the head's group attention (PARALLEL_FIELDS): only the modules the checkpoint lacks
  (the position queries, the group attention) start fresh.

With ZeRO 0-2 the weights load on every rank (those stages keep a full replica per rank
anyway). With ZeRO-3 the backbone is constructed inside `deepspeed.zero.Init`, so each rank
only allocates its 1/N partition, and rank 0 streams the safetensors files one tensor at a
time into the partitions (`GatheredParameters(modifier_rank=0)`): no rank ever holds the full
model in host RAM (a 7B backbone is 28 GB of fp32 weights in all, 28/N GB per rank).

`deepspeed.zero.Init` patches `torch.Tensor.__new__`; with torch 2.13, if `torch._dynamo` is
first imported inside the context (transformers imports it lazily when a model class is first
used), dynamo's polyfill registration raises "TypeError: Signature mismatch ... tensor_pynew".
`_partitioned` imports torch._dynamo before entering the context.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import torch
import transformers
from torch import nn

from omni.config import Config, ModelConfig
from omni.models.backbone import (
    allow_tf32,
    backbone_from_config,
    build_backbone,
    compile_layers,
    fuse_with_liger,
    rebuild_backbone,
    tied_elsewhere,
)
from omni.models.checkpoint import check_checkpoint_dir, load_config_from_checkpoint
from omni.models.model import OmniModel
from omni.tokenizers.image import build_image_tokenizer
from omni.tokenizers.text import TextTokenizer

# Model fields a run may set apart from its train.init_from checkpoint: they shape the training
# objective or pick kernels and precision, not the weights.
RUN_MODEL_FIELDS = ("loss_weight_text", "loss_weight_image", "head.noise_copies", "head.grad_checkpointing",
                    "head.compile", "head.bf16_train", "backbone.attn_implementation")
# Parallel image decoding may be switched on by a run that starts from a checkpoint drawn one token
# a pass: these fields are then the run's, and the modules only that mode has (the position
# queries, the head's group attention) start new. The group attention's output projection starts
# at zero, so the head denoises as the checkpoint's did until it trains (docs/parallel.md). From a
# parallel checkpoint a parallel run takes its own schedule and order (they shape no weight) and
# may add the group attention; one the checkpoint has is kept (`_parallel_fields`).
PARALLEL_FIELDS = ("parallel_image", "parallel_order", "head.group_attention", "head.group_attention_dim")


def _flat(obj, prefix: str = "") -> dict[str, object]:
    """A nested dataclass as {"head.width": 32, ...}."""
    out: dict[str, object] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update(_flat(value, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = value
    return out


def _set(obj, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for name in parents:
        obj = getattr(obj, name)
    setattr(obj, leaf, value)


def with_init_model(cfg: Config) -> tuple[Config, list[str]]:
    """With `train.init_from`, the model is the checkpoint's: a copy of `cfg` whose `model` section
    comes from the checkpoint's config.yaml, except RUN_MODEL_FIELDS (loss weights, noise copies,
    kernels, the head's compile and bf16 matmuls), which stay the run's, and PARALLEL_FIELDS as
    `_parallel_fields` says. Also returns the fields the run's config had set otherwise.

    So a recipe written for any size (`--config orthus-stage2 train.init_from=STAGE1`) trains the
    checkpoint's shapes (head width, image size, scale, soft-VQ tau), and the run's saved config
    (what `omni export` rebuilds the model from) says what was really trained. `init_from` becomes
    absolute: export reads the image tokenizer's weights from it, from whatever directory it runs.
    """
    if cfg.train.init_from is None:
        return cfg, []
    root = check_checkpoint_dir(cfg.train.init_from).resolve()
    out = copy.deepcopy(cfg)
    out.train.init_from = str(root)
    out.model = copy.deepcopy(load_config_from_checkpoint(root).model)
    run = _flat(cfg.model)
    keep = {key: run[key] for key in RUN_MODEL_FIELDS}
    keep.update(_parallel_fields(_flat(out.model), run))
    for key, value in keep.items():
        _set(out.model, key, value)
    out.model.__post_init__()  # the combination is checked as a config file's would be
    # backbone.* (built from backbone_config.json) and the paths are the checkpoint's by construction.
    skip = {"tokenizer", "image.path"}
    differ = [
        f"model.{k}={v} (config: {run[k]})" for k, v in _flat(out.model).items()
        if not k.startswith("backbone.") and k not in skip and run[k] != v
    ]
    return out, differ


def _parallel_fields(ckpt: dict[str, object], run: dict[str, object]) -> dict[str, object]:
    """The PARALLEL_FIELDS a run from a checkpoint takes from its own config (flat dicts of both).

    From a one-token checkpoint, a run that turns parallel decoding on takes all of them. From a
    parallel checkpoint, a parallel run takes its schedule, its order when it names one (the
    default, raster, keeps the checkpoint's), and adds the head's group attention when it asks
    for it; one the checkpoint has is kept. A config cannot tell a default it was given from one it
    was not, so a field at its default never undoes the checkpoint's: parallel decoding left off
    keeps a parallel checkpoint's mode, and trained group-attention weights are never dropped.
    """
    if run["parallel_image"] == "off":
        return {}
    if ckpt["parallel_image"] == "off":
        return {key: run[key] for key in PARALLEL_FIELDS}
    out = {"parallel_image": run["parallel_image"]}
    if run["parallel_order"] != ModelConfig.parallel_order:  # the dataclass default
        out["parallel_order"] = run["parallel_order"]
    if run["head.group_attention"] and not ckpt["head.group_attention"]:
        out["head.group_attention"] = True
        out["head.group_attention_dim"] = run["head.group_attention_dim"]
    return out


def new_parallel_parameters(ckpt_model, model: OmniModel) -> set[str]:
    """Parameters of `model` a checkpoint with model config `ckpt_model` cannot have: all of the
    parallel-only ones (`parallel_only_parameters`) when it drew one token a pass, the head's group
    attention when it had none and the model has it; otherwise none."""
    if model.query_embed is None:
        return set()
    if ckpt_model.parallel_image == "off":
        return parallel_only_parameters(model)
    if ckpt_model.head.group_attention or not model.head.cfg.group_attention:
        return set()
    return {n for n in parallel_only_parameters(model) if not n.startswith("query_embed.")}


def build_model(cfg: Config, ds_config: dict) -> OmniModel:
    """The model to train, with initial weights; the same on every rank.

    The new modules (in_proj, diffusion head) are seeded after the backbone exists, so their
    initial weights depend on `train.seed` only, not on how the backbone was made.
    """
    mcfg, zero3 = cfg.model, cfg.train.zero_stage == 3
    if cfg.train.compile and zero3:
        raise ValueError("train.compile=true compiles the decoder layers, and ZeRO-3's parameter hooks do not "
                         "survive that; use train.zero_stage=0, 1 or 2, or train.compile=false")
    root = Path(cfg.train.init_from) if cfg.train.init_from else None
    if root is not None:
        check_checkpoint_dir(root)
        tokenizer = TextTokenizer.from_pretrained(root / "tokenizer")
    elif mcfg.tokenizer is None:
        raise ValueError(
            "model.tokenizer is not set: train one with `omni data tokenizer` or point it at a local "
            "Hugging Face tokenizer directory"
        )
    else:
        tokenizer = TextTokenizer.from_pretrained(mcfg.tokenizer)
    torch.manual_seed(cfg.train.seed)
    if root is not None:
        with _partitioned(zero3, ds_config):
            backbone = rebuild_backbone(root, mcfg.backbone.attn_implementation)
    elif mcfg.backbone.pretrained is not None and zero3:
        path = Path(mcfg.backbone.pretrained)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"model.backbone.pretrained={str(path)!r} is not a Hugging Face model directory")
        hf_cfg = transformers.AutoConfig.from_pretrained(str(path))
        hf_cfg.vocab_size = max(hf_cfg.vocab_size, len(tokenizer))
        with _partitioned(True, ds_config):
            backbone = backbone_from_config(hf_cfg, mcfg.backbone.attn_implementation)
        load_weights(backbone, path, allow_new_rows=True)
    else:
        backbone = build_backbone(mcfg, len(tokenizer))
    torch.manual_seed(cfg.train.seed + 1)
    model = OmniModel(mcfg, tokenizer, build_image_tokenizer(mcfg.image, root=root), backbone=backbone)
    if root is not None:
        new = new_parallel_parameters(load_config_from_checkpoint(root).model, model)
        if new:
            from omni.utils import rank

            what = "position queries, the head's group attention" if any(
                n.startswith("query_embed.") for n in new) else "the head's group attention"
            if rank() == 0:
                print(f"parallel image decoding ({mcfg.parallel_image}, {mcfg.parallel_order} order) from {root}: "
                      f"{len(new)} new tensors ({what})", flush=True)
        load_weights(model, root, allow_new_rows=False, new=new)
    if cfg.train.lora.rank:
        from omni.train.lora import add_adapters

        torch.manual_seed(cfg.train.seed + 2)
        add_adapters(model.backbone, cfg.train.lora)
    select_trainable(model, cfg)
    if cfg.train.liger:
        fuse_with_liger(model.backbone)
    if cfg.train.compile:
        compile_layers(model.backbone)
    allow_tf32(cfg.train.tf32)
    return model


def _partitioned(enabled: bool, ds_config: dict):
    """`deepspeed.zero.Init` for ZeRO-3 construction, else nothing.

    dtype comes from ds_config (no bf16/fp16 section -> fp32): an explicit dtype=torch.float32
    is ignored on accelerators without fp16 (the CPU), a precedence slip in DeepSpeed 0.19's
    Init._set_dtype that yields bf16. mem_efficient_linear=False: otherwise Init replaces
    torch.nn.functional.linear for the rest of the process.

    Weight initialisation is skipped (`no_init_weights`): every partitioned backbone is loaded
    from a file right after, and HF's post-init runs on already partitioned (empty) parameters,
    where zeroing the padding row of the embeddings (Chameleon: pad id 1) is an IndexError.
    """
    import contextlib

    if not enabled:
        return contextlib.nullcontext()
    import deepspeed
    import torch._dynamo  # noqa: F401  (must not be first imported inside Init, see the module docstring)
    from transformers.initialization import no_init_weights

    stack = contextlib.ExitStack()
    stack.enter_context(deepspeed.zero.Init(config_dict_or_path=ds_config, mem_efficient_linear=False))
    stack.enter_context(no_init_weights())
    return stack


# ------------------------------------------------------------------------------------------------
# Weights from safetensors, partition-aware
# ------------------------------------------------------------------------------------------------


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


def _tensor_files(path: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it."""
    from safetensors import safe_open

    out = {}
    for file in _weight_files(path):
        with safe_open(str(file), framework="pt") as f:
            out.update(dict.fromkeys(f.keys(), file))
    return out


def parallel_only_parameters(model: OmniModel) -> set[str]:
    """Names of the parameters only parallel image decoding has: the position queries' embedding
    and the head's group attention (every `GroupAttention`)."""
    from omni.heads.diffusion import GroupAttention

    names = set()
    for prefix, module in model.named_modules():
        if module is model.query_embed or isinstance(module, GroupAttention):
            names.update(f"{prefix}.{n}" for n, _ in module.named_parameters())
    return names


@torch.no_grad()
def load_weights(module: nn.Module, path: Path, allow_new_rows: bool, new: set[str] = frozenset()) -> None:
    """Copy the safetensors weights in `path` into `module`'s parameters, by name; those named in
    `new` may be absent from the file and then keep their initial values.

    ZeRO-3 partitioned parameters are gathered one at a time; rank 0 reads the file and writes,
    and the gather's exit re-partitions. Ordinary parameters are read on every rank. With
    `allow_new_rows`, extra leading rows (new tokens) start at the mean of the pretrained rows.
    Tied parameters absent from the file (lm_head = embed_tokens) are fine.
    """
    import deepspeed
    from safetensors import safe_open

    from omni.utils import rank

    is_rank0 = rank() == 0
    where = _tensor_files(path)
    params = dict(module.named_parameters(remove_duplicate=False))
    missing = [n for n in params if n not in where and n not in new and not tied_elsewhere(module, n, where)]
    if missing:
        raise ValueError(f"{path} lacks weights for {missing[:5]} ({len(missing)} in all)")
    for name, p in dict(module.named_parameters()).items():
        if name not in where:
            continue
        partitioned = hasattr(p, "ds_id")
        gather = deepspeed.zero.GatheredParameters([p], modifier_rank=0) if partitioned else _nothing()
        with gather:  # every rank takes part in each gather; only rank 0 reads and writes
            if is_rank0 or not partitioned:
                with safe_open(str(where[name]), framework="pt") as f:
                    _copy_rows(p.data, f.get_tensor(name), name, allow_new_rows)


def _nothing():
    import contextlib

    return contextlib.nullcontext()


def _copy_rows(dst: torch.Tensor, src: torch.Tensor, name: str, allow_new_rows: bool) -> None:
    """Copy `src` into `dst`; extra leading rows of `dst` (new tokens) get the mean of `src`'s rows."""
    grows = allow_new_rows and src.dim() >= 1 and src.shape[1:] == dst.shape[1:] and src.shape[0] < dst.shape[0]
    if src.shape != dst.shape and not grows:
        raise ValueError(f"{name}: checkpoint shape {tuple(src.shape)} does not fit the model's {tuple(dst.shape)}")
    n = src.shape[0] if src.dim() else 0
    if grows:
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
    if pretrained is not None and cfg.train.init_from is None:
        old_vocab = json.loads((Path(pretrained) / "config.json").read_text())["vocab_size"]
    else:  # an omni checkpoint already holds rows for every token
        old_vocab = len(model.tokenizer)
    ids.update(range(old_vocab, len(model.tokenizer)))
    return sorted(ids)


def select_trainable(model: OmniModel, cfg: Config) -> None:
    """`train.trainable`: `all`; `new` = in_proj, diffusion head, image cell and query embeddings and the new token rows (Orthus
    stage 1); or a list of parameter-name globs (`[in_proj.*, head.*]`).

    With `new`, the embedding matrices stay trainable but a gradient mask zeroes every
    pretrained row, so AdamW (no weight decay on these matrices) never moves them.

    With LoRA adapters (`train.lora.rank`) the adapters always train and the backbone's own weights
    are frozen under `all` (everything outside the backbone trains); `new` and globs work as
    without adapters, beside them.
    """
    _select_trainable(model, cfg)
    if cfg.train.lora.rank:
        from omni.train.lora import is_adapter

        for name, p in model.named_parameters():
            if is_adapter(name):
                p.requires_grad_(True)


def _select_trainable(model: OmniModel, cfg: Config) -> None:
    trainable = cfg.train.trainable
    if trainable == "all":
        if cfg.train.lora.rank:
            model.backbone.requires_grad_(False)
        return
    if isinstance(trainable, list):
        from fnmatch import fnmatchcase

        names = [n for n, _ in model.named_parameters()]
        for pattern in trainable:
            if not any(fnmatchcase(n, pattern) for n in names):
                raise ValueError(
                    f"train.trainable pattern {pattern!r} matches no parameter; names look like "
                    f"{', '.join(names[:2] + names[-2:])}"
                )
        for name, p in model.named_parameters():
            p.requires_grad_(any(fnmatchcase(name, pattern) for pattern in trainable))
        return
    model.requires_grad_(False)
    model.in_proj.requires_grad_(True)
    model.head.requires_grad_(True)
    if model.image_pos is not None:
        model.image_pos.requires_grad_(True)
    if model.query_embed is not None:
        model.query_embed.requires_grad_(True)
    rows = torch.tensor(new_token_ids(model, cfg))
    embeddings = {id(m.weight): m.weight for m in (model.backbone.get_input_embeddings(), model.lm_head)}
    for weight in embeddings.values():
        weight.requires_grad_(True)
        n = getattr(weight, "ds_shape", weight.shape)[0]
        mask = torch.zeros(n, 1)
        mask[rows[rows < n]] = 1.0
        weight.register_hook(lambda g, mask=mask: g * mask.to(g.device, g.dtype))
        weight.omni_row_mask = True  # engine.param_groups: no weight decay, or frozen rows would shrink
