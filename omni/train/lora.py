"""LoRA adapters on the backbone (`train.lora`), through peft.

`add_adapters` puts peft's LoRA layers on the backbone's linear layers named by
`train.lora.targets` (peft's `inject_adapter_in_model`: the module tree stays the omni model, each
target becomes a `lora.Linear` holding the original layer as `base_layer` and the adapter as
`lora_A` / `lora_B`). `train.trainable` then decides what trains beside the adapters
(`omni.train.build.select_trainable`). Checkpoints hold the adapted names, so a resume rebuilds
the same adapters first.

`merge_adapters` folds them into the weights of a state dict, W + (alpha / r) B A, the update
peft's own merge applies, so `omni export` writes a plain model that `generate`, `chat`, `serve`
and `eval` load as any other; equality with the adapted model is tested.
"""

from __future__ import annotations

import torch
from torch import nn

from omni.config import LoraConfig

ADAPTER = "default"  # peft's adapter name
A_SUFFIX, B_SUFFIX = f".lora_A.{ADAPTER}.weight", f".lora_B.{ADAPTER}.weight"


def is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def check(cfg: LoraConfig) -> None:
    if cfg.rank < 0 or (cfg.rank and (cfg.alpha <= 0 or not 0 <= cfg.dropout < 1 or not cfg.targets)):
        raise ValueError(f"train.lora: rank={cfg.rank}, alpha={cfg.alpha}, dropout={cfg.dropout}, targets={cfg.targets}: "
                         "use rank >= 1 (0 = no adapters), alpha > 0, dropout in [0, 1) and at least one target")


def add_adapters(backbone: nn.Module, cfg: LoraConfig) -> None:
    """LoRA on every linear layer of `backbone` whose name ends in one of `cfg.targets`."""
    check(cfg)
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in backbone.named_modules() if isinstance(m, nn.Linear)})
    unknown = [t for t in cfg.targets if t not in linear]
    if unknown:
        raise ValueError(f"train.lora.targets {unknown} name no linear layer of the backbone; its linear layers are "
                         f"{linear}")
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    peft_cfg = PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                              target_modules=list(cfg.targets), bias="none")
    inject_adapter_in_model(peft_cfg, backbone, adapter_name=ADAPTER)


def merge_adapters(state: dict[str, torch.Tensor], cfg: LoraConfig) -> dict[str, torch.Tensor]:
    """A state dict of an adapted model -> the plain model's: each `P.base_layer.weight` plus
    (alpha / r) `P.lora_B` @ `P.lora_A` becomes `P.weight` (`P.base_layer.bias` -> `P.bias`)."""
    scale = cfg.alpha / cfg.rank
    out = dict(state)
    prefixes = [k[: -len(A_SUFFIX)] for k in state if k.endswith(A_SUFFIX)]
    if cfg.rank and not prefixes:
        raise ValueError(f"train.lora.rank={cfg.rank}, but the checkpoint holds no adapter weights (*{A_SUFFIX})")
    for p in prefixes:
        a, b = out.pop(p + A_SUFFIX), out.pop(p + B_SUFFIX)
        base = out.pop(p + ".base_layer.weight")
        out[p + ".weight"] = (base.double() + scale * (b.double() @ a.double())).to(base.dtype)
        if p + ".base_layer.bias" in out:
            out[p + ".bias"] = out.pop(p + ".base_layer.bias")
    left = [k for k in out if ".base_layer." in k or is_adapter(k)]
    if left:
        raise ValueError(f"adapter weights without their pair in the checkpoint: {left[:3]}")
    return out
