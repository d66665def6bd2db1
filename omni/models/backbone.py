"""The Hugging Face decoder inside OmniModel: build it, rebuild it from a checkpoint, adapt it.

Every way a backbone comes into being goes through this file:

    build_backbone(cfg, vocab)          a fresh Llama / Qwen2 from the config fields, or a local HF directory
    backbone_from_config(hf_cfg, attn)  a fresh model from a HF config (weights loaded by the caller)
    rebuild_backbone(dir, attn)         the same, from the `backbone_config.json` an omni checkpoint
                                        or training run wrote beside its weights
    prepare_chameleon_backbone(bb)      Chameleon as OmniModel uses it (its VQGAN lives in the image
                                        tokenizer; its VQ image-token logits are suppressed)

The backbone keeps its Hugging Face parameter names, so pretrained weights load unchanged.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import inspect
from pathlib import Path

import torch
from torch import nn

from omni.config import ModelConfig
from omni.models.attention import hf_attention
from omni.models.checkpoint import read_backbone_config


def check_attention(impl: str) -> None:
    """flash_attention_2 needs the optional flash-attn package (CUDA only): say so up front."""
    if impl == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ValueError(
            "model.backbone.attn_implementation=flash_attention_2 needs flash-attn, which is not "
            "installed (GPU machines: pip install -e .[gpu]); use sdpa (the default) or eager"
        )


def build_backbone(cfg: ModelConfig, vocab_size: int) -> nn.Module:
    """A HF causal LM, built from the config fields or loaded from a local directory."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    bb = cfg.backbone
    check_attention(bb.attn_implementation)
    if bb.arch == "chameleon":
        raise ValueError(
            "model.backbone.arch=chameleon is built from a converted checkpoint: run "
            "`omni convert chameleon --src HF_DIR --out DIR`, then load or train from DIR"
        )
    if bb.pretrained is not None:
        path = Path(bb.pretrained)
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"model.backbone.pretrained={bb.pretrained!r} is not a Hugging Face model directory "
                "(config.json missing); download it once and point at the local copy"
            )
        model = AutoModelForCausalLM.from_pretrained(
            str(path), attn_implementation=hf_attention(bb.attn_implementation), dtype=torch.float32,
            trust_remote_code=False
        )
        if model.get_input_embeddings().weight.shape[0] < vocab_size:
            model.resize_token_embeddings(vocab_size, mean_resizing=True)
        return model
    kwargs = {
        "vocab_size": vocab_size,
        "hidden_size": bb.hidden_size,
        "num_hidden_layers": bb.num_layers,
        "num_attention_heads": bb.num_heads,
        "num_key_value_heads": bb.num_kv_heads or bb.num_heads,
        "intermediate_size": bb.intermediate_size,
        "max_position_embeddings": bb.max_position_embeddings,
        "rope_theta": bb.rope_theta,
        "rms_norm_eps": bb.rms_norm_eps,
        "tie_word_embeddings": bb.tie_word_embeddings,
    }
    hf_cfg = LlamaConfig(**kwargs) if bb.arch == "llama" else Qwen2Config(**kwargs)
    # _from_config mutates the config it is given: pass a copy.
    return AutoModelForCausalLM.from_config(copy.deepcopy(hf_cfg), attn_implementation=hf_attention(bb.attn_implementation))


def backbone_from_config(hf_cfg, attn_implementation: str) -> nn.Module:
    """A fresh HF backbone from its config; Chameleon is registered as image-text-to-text, not causal LM."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    auto = AutoModelForImageTextToText if hf_cfg.model_type == "chameleon" else AutoModelForCausalLM
    return auto.from_config(hf_cfg, attn_implementation=hf_attention(attn_implementation))


def rebuild_backbone(directory: str | Path, attn_implementation: str) -> nn.Module:
    """The backbone described by `directory/backbone_config.json` (an omni checkpoint or run dir)."""
    return backbone_from_config(read_backbone_config(directory), attn_implementation)


@functools.cache
def cache_kwarg(model_cls: type) -> str:
    """What the backbone calls its KV cache: `cache` from transformers 5.2x (which warns on the old
    name), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model_cls.forward).parameters else "past_key_values"


def tied_elsewhere(model: nn.Module, key: str, present) -> bool:
    """True when parameter `key` is the same tensor as another parameter named in `present`.

    Tied weights (lm_head = embed_tokens) are stored once in safetensors and ZeRO checkpoints; the
    second name is then absent from the file and must not count as missing. Identity (not storage
    pointers) so it also holds for a model on the meta device.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    p = params.get(key)
    return p is not None and any(q is p and k in present for k, q in params.items() if k != key)


# --------------------------------------------------------------------------------------------
# Chameleon
# --------------------------------------------------------------------------------------------


class _SuppressImageTokenLogits:
    """Forward hook on the LM head: image-token logits -> dtype min, as Chameleon's own forward does.

    In omni images come from the diffusion head, so the LM head must never emit a VQ image token.
    A hook (not a wrapper module) keeps the head's parameter name `backbone.lm_head.weight`.
    """

    def __call__(self, module, args, output):
        ids = module.suppressed_token_ids.to(output.device)
        return output.index_fill(-1, ids, torch.finfo(output.dtype).min)


def prepare_chameleon_backbone(backbone: nn.Module) -> None:
    """Adapt a ChameleonForConditionalGeneration for OmniModel (called from OmniModel.__init__).

    - drops `model.vqmodel`: the image tokenizer owns the VQGAN (saved once, in DIR/vqgan/);
    - suppresses the logits of the VQ image tokens, exactly as Chameleon's forward does.
    """
    inner = backbone.model
    if getattr(inner, "vqmodel", None) is not None:
        del inner.vqmodel
    head = backbone.get_output_embeddings()
    if not hasattr(head, "suppressed_token_ids"):
        ids = torch.tensor(sorted(inner.vocabulary_mapping.image_tokens), dtype=torch.long)
        head.register_buffer("suppressed_token_ids", ids, persistent=False)
        head.register_forward_hook(_SuppressImageTokenLogits())


# --------------------------------------------------------------------------------------------
# Fused kernels (GPU)
# --------------------------------------------------------------------------------------------


def fuse_with_liger(backbone: nn.Module) -> None:
    """Swap the backbone's RMSNorm, RoPE and SwiGLU MLP for Liger's fused Triton kernels, in place.

    Parameter names and values are unchanged (checkpoints load either way). The LM loss is
    omni's own (`heads/lm.py`, on labelled positions only), so Liger's fused linear cross-entropy,
    which patches the HF forward with labels, does not apply and stays off.
    """
    if importlib.util.find_spec("liger_kernel") is None:
        raise ValueError("train.liger=true needs the liger-kernel package, which is not installed "
                         "(GPU machines: pip install liger-kernel); or set train.liger=false")
    if not torch.cuda.is_available():
        raise ValueError("train.liger=true runs Triton kernels, which need a CUDA device; set train.liger=false on CPU")
    from liger_kernel import transformers as liger

    arch = backbone.config.model_type
    apply = {"llama": liger.apply_liger_kernel_to_llama, "qwen2": liger.apply_liger_kernel_to_qwen2}.get(arch)
    if apply is None:
        raise ValueError(f"train.liger=true supports llama and qwen2 backbones, not {arch!r}; set train.liger=false")
    apply(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False,
          model=backbone)


def compile_layers(backbone: nn.Module) -> int:
    """torch.compile every decoder layer of a Hugging Face backbone in place (`nn.Module.compile`:
    parameter names, checkpoints and hooks unchanged); the layers' calls are compiled on first
    use. Returns how many layers were compiled. On the CPU inductor writes C++: without a
    compiler the layers stay eager, with a warning."""
    import logging
    import os
    import shutil

    layers = [m for m in backbone.modules() if type(m).__name__.endswith("DecoderLayer")]
    if not layers:
        raise ValueError(f"train.compile=true found no decoder layers in the {backbone.config.model_type!r} "
                         "backbone; set train.compile=false")
    cxx = os.environ.get("CXX")
    compiler = shutil.which(cxx) if cxx else shutil.which("g++") or shutil.which("clang++")
    if not torch.cuda.is_available() and not compiler:
        logging.getLogger("omni.train").warning(
            "train.compile=true: no C++ compiler (g++ or clang++, or $CXX) for inductor's CPU code; the "
            "backbone trains eager (slower). Install g++ (Debian: apt-get install g++) to compile it.")
        return 0
    for layer in layers:
        layer.compile()
    return len(layers)


def allow_tf32(on: bool) -> None:
    """CUDA only: fp32 matmuls on TF32 tensor cores (10-bit mantissa inputs, fp32 accumulation)."""
    if on and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
