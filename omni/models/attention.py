"""The attention kernel the backbone runs: `model.backbone.attn_implementation` -> transformers' name.

`sdpa` (the default) maps to `omni_sdpa`, PyTorch's scaled-dot-product attention as transformers
runs it, except under CPU bf16 autocast: there it computes in fp32. CPU autocast casts SDPA's
inputs to bf16, and on CPUs without bf16 matrix units the bf16 kernel is the slower one: at the
tiny preset's shapes (16 rows x 160 tokens, with the packed-document mask) forward + backward of
one layer took 17 ms in bf16 and 11 ms in fp32 with 4 heads of 64, 27 ms and 14 ms with 8 heads
of 32 (AMD EPYC, 2 cores). Projections and MLPs stay in bf16. On GPUs, and without autocast, it is
plain `sdpa`: same kernel, same numbers. The mask is built exactly as for `sdpa`.

Registered with transformers' `AttentionInterface` / `AttentionMaskInterface` (its extension
points for custom kernels), so masks, caches and saving behave as for `sdpa`; the name is not
written into saved Hugging Face configs.
"""

from __future__ import annotations

import torch

OMNI_SDPA = "omni_sdpa"


def _omni_sdpa(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    dtype = torch.get_autocast_dtype("cpu")
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    with torch.autocast("cpu", enabled=False):
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                              **kwargs)
    return out.to(dtype), weights


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(OMNI_SDPA, _omni_sdpa)
    AttentionMaskInterface.register(OMNI_SDPA, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean (B, Q, T) "query may see key" -> additive (B, 1, Q, T) mask of 0 / finfo.min.

    Additive, not boolean: transformers' eager attention silently mishandles custom boolean 4D
    masks. Training (`OmniModel.attention_bias`) and the sampler both end here.
    """
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def see_own_block(allowed: torch.Tensor, q_blocks: torch.Tensor, k_blocks: torch.Tensor) -> torch.Tensor:
    """Let positions of one prompt image (same positive block number) see each other both ways.

    q_blocks (B, Q), k_blocks (B, T): block number per position, 0 outside prompt images.
    """
    mine = q_blocks[:, :, None]  # (B, Q, 1)
    return allowed | ((mine > 0) & (mine == k_blocks[:, None, :]))


def hf_attention(impl: str) -> str:
    """The transformers attention name for a config's `attn_implementation`."""
    if impl != "sdpa":
        return impl
    _register()
    return OMNI_SDPA
