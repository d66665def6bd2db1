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


# --------------------------------------------------------------------------------------------
# Packed rows without a dense mask
# --------------------------------------------------------------------------------------------
# Which form a packed row's document structure takes depends on the kernel the backbone runs
# (`model.backbone.attn_implementation`): sdpa / eager read a dense additive (B, 1, L, L) mask,
# flex_attention a BlockMask (blocks of 128 x 128 that no query of a document can see are never
# computed), flash_attention_2 the cumulative document lengths of varlen attention (causal only).

FLEX = "flex_attention"
VARLEN = ("flash_attention_2", "flash_attention_3")


def mask_kind(hf_impl: str) -> str:
    """`dense`, `flex` or `varlen`: the form of the packed-document mask for a transformers kernel name."""
    if hf_impl == FLEX:
        return "flex"
    if hf_impl in VARLEN:
        return "varlen"
    return "dense"


def document_block_mask(doc_ids: torch.Tensor, blocks: torch.Tensor | None = None, block_size: int = 128,
                        queries: torch.Tensor | None = None):
    """FlexAttention BlockMask of the causal, document-local pattern `attention_bias` draws densely.

    doc_ids (B, L): 1.. per document, 0 = padding (which sees only itself). blocks (B, L): positions
    with the same positive number also see each other both ways (bidirectional prompt images).
    queries (B, L) bool: position queries of parallel decoding, seen by no other position.
    Built without a host read, so it adds no sync to the step.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    B, L = doc_ids.shape
    docs = doc_ids.contiguous()

    def same_doc_causal(b, h, q, kv):
        return ((docs[b, q] == docs[b, kv]) & (q >= kv) & (docs[b, kv] > 0)) | (q == kv)

    base = same_doc_causal
    if blocks is not None:
        blk = blocks.contiguous()

        def base(b, h, q, kv):
            return same_doc_causal(b, h, q, kv) | ((blk[b, q] > 0) & (blk[b, q] == blk[b, kv]))

    mask_mod = base
    if queries is not None:
        hidden = queries.contiguous()

        def mask_mod(b, h, q, kv):
            return (base(b, h, q, kv) & ~hidden[b, kv]) | (q == kv)

    return create_block_mask(mask_mod, B, None, L, L, device=doc_ids.device, BLOCK_SIZE=block_size)


def block_fraction(block_mask) -> float:
    """Fraction of the (query block, key block) tiles a BlockMask computes (partial or full)."""
    computed = block_mask.kv_num_blocks.sum()
    if block_mask.full_kv_num_blocks is not None:
        computed = computed + block_mask.full_kv_num_blocks.sum()
    B, H, nq = block_mask.kv_num_blocks.shape
    nk = block_mask.kv_indices.shape[-1]
    return float(computed) / (B * H * nq * nk)


def varlen_kwargs(doc_ids: torch.Tensor) -> dict[str, torch.Tensor | int]:
    """Keyword arguments of transformers' flash-attention varlen path for rows flattened to one.

    Every run of equal doc ids (padding runs too: they see only themselves) is one sequence;
    cu_seq_lens are its offsets in the flattened (1, B*L) row. max_length is L, an upper bound,
    so nothing is read back to the host.
    """
    L = doc_ids.shape[1]
    flat = doc_ids.reshape(-1)  # (B*L,)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[::L] = True  # every row starts a sequence, even if its first doc id equals the last row's
    ends = torch.cat([starts[1:], starts.new_ones(1)])  # (B*L,) the last position of each sequence
    cu = torch.cat([flat.new_zeros(1), (ends.nonzero().flatten() + 1)]).to(torch.int32)  # (S + 1,)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": L, "max_length_k": L}
