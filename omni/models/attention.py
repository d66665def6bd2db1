"""The attention kernel the backbone runs: `model.backbone.attn_implementation` -> transformers' name.

`sdpa` (the default) maps to `omni_sdpa`, PyTorch's scaled-dot-product attention as transformers
runs it, except under CPU bf16 autocast: there it computes in fp32. CPU autocast casts SDPA's
inputs to bf16, and on CPUs without bf16 matrix units the bf16 kernel is the slower one: at the
tiny preset's shapes (16 rows x 160 tokens, with the packed-document mask) forward + backward of
one layer took 17 ms in bf16 and 11 ms in fp32 with 4 heads of 64, 27 ms and 14 ms with 8 heads
of 32 (AMD EPYC, 2 cores). Projections and MLPs stay in bf16. On GPUs, and without autocast, it is
plain `sdpa`: same kernel, same numbers. The mask is built exactly as for `sdpa`.

`grouped` maps to `omni_grouped`: in training and evaluation forwards over packed rows, each
document attends on its own, documents of similar length batched together (`DocumentGroups`), so
the masked-out pairs between documents are never computed; everywhere else (generation with its
KV cache, a forward given a mask) it is `omni_sdpa`. Same function as the dense mask (the same
pairs, fp32 scores), other rounding; its backward is written out (`_GroupedAttention`). At the
tiny preset's shapes (16 rows x 160 positions, 40-65 documents of 27-112 positions; AMD EPYC, 2
cores) the demo's forward + backward steps at 0.81-0.87x of SDPA with the dense mask
(docs/performance.md, "Grouped attention").

Registered with transformers' `AttentionInterface` / `AttentionMaskInterface` (its extension
points for custom kernels), so masks, caches and saving behave as for `sdpa`; the name is not
written into saved Hugging Face configs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

OMNI_SDPA = "omni_sdpa"
OMNI_GROUPED = "omni_grouped"
GROUPED = "grouped"


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


def _omni_grouped(module, query, key, value, attention_mask, doc_groups=None, **kwargs):
    if doc_groups is None:
        return _omni_sdpa(module, query, key, value, attention_mask, **kwargs)
    if kwargs.get("dropout", 0.0) and module.training:
        raise ValueError("attn_implementation=grouped has no attention dropout; use sdpa")
    return grouped_attention(query, key, value, doc_groups, kwargs.get("scaling")), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(OMNI_SDPA, _omni_sdpa)
    AttentionMaskInterface.register(OMNI_SDPA, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    AttentionInterface.register(OMNI_GROUPED, _omni_grouped)
    AttentionMaskInterface.register(OMNI_GROUPED, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


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
    if impl not in ("sdpa", GROUPED):
        return impl
    _register()
    return OMNI_SDPA if impl == "sdpa" else OMNI_GROUPED


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
    """`dense`, `flex`, `varlen` or `grouped`: the form of the packed-document structure for a
    transformers kernel name."""
    if hf_impl == FLEX:
        return "flex"
    if hf_impl in VARLEN:
        return "varlen"
    if hf_impl == OMNI_GROUPED:
        return "grouped"
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


def run_starts(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) doc ids -> (B*L,) bool: where a run of equal ids starts in the flattened rows. Every
    row starts a run, even if its first id equals the row above's last (ids restart in each row)."""
    L = doc_ids.shape[1]
    flat = doc_ids.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[::L] = True
    return starts


def varlen_kwargs(doc_ids: torch.Tensor) -> dict[str, torch.Tensor | int]:
    """Keyword arguments of transformers' flash-attention varlen path for rows flattened to one.

    Every run of equal doc ids (padding runs too: they see only themselves) is one sequence;
    cu_seq_lens are its offsets in the flattened (1, B*L) row. max_length is L, an upper bound,
    so nothing is read back to the host.
    """
    L = doc_ids.shape[1]
    starts = run_starts(doc_ids)  # (B*L,)
    ends = torch.cat([starts[1:], starts.new_ones(1)])  # (B*L,) the last position of each sequence
    cu = torch.cat([doc_ids.new_zeros(1), (ends.nonzero().flatten() + 1)]).to(torch.int32)  # (S + 1,)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": L, "max_length_k": L}


# --------------------------------------------------------------------------------------------
# Documents attended one by one (attn_implementation=grouped)
# --------------------------------------------------------------------------------------------
@dataclass
class DocumentGroups:
    """Packed rows' documents laid out for `grouped_attention`.

    The backbone runs over the (B, L) rows as one sequence of N = B * L positions (the same shape
    every step, so compiled layers compile once). A document of n positions takes S = n rounded up
    to `multiple` slots, a padding position (doc id 0, which sees only itself, as in the dense mask)
    one slot; the documents of one S form a group. `slots` (slots,) is each slot's position b * L +
    l, or -1 past a document's end; the groups' slots follow one another. `groups` holds (first
    slot, documents n, length S, additive mask (n, 1, S, S)) per group.
    """

    length: int  # N = B * L
    slots: torch.Tensor
    groups: list[tuple[int, int, int, torch.Tensor]]
    _index: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict)  # heads -> gather indices


def document_groups(doc_ids: torch.Tensor, blocks: torch.Tensor | None = None, queries: torch.Tensor | None = None,
                    multiple: int = 16) -> DocumentGroups:
    """The layout of `grouped_attention` for packed rows: the pattern `attention_bias` draws densely.

    doc_ids (B, L): 1.. per document (a run of equal ids), 0 = padding. blocks (B, L): positions
    with the same positive number also see each other both ways (bidirectional prompt images).
    queries (B, L) bool: position queries (parallel decoding), seen by no other position. Reads the
    document lengths back to the host (one read: a CPU training step's, where this kernel pays).
    """
    dev = doc_ids.device
    ids = doc_ids.reshape(-1)  # (N,)
    N = ids.shape[0]
    starts = run_starts(doc_ids) | (ids == 0)  # every padding position is a document of its own
    first = starts.nonzero().flatten()  # (docs,)
    lengths = torch.diff(first, append=first.new_tensor([N]))  # (docs,)
    padded = torch.where(ids[first] == 0, 1, (lengths + multiple - 1) // multiple * multiple)
    blk = None if blocks is None else torch.cat([blocks.reshape(-1), blocks.new_zeros(1)])
    hidden = None if queries is None else torch.cat([queries.reshape(-1), queries.new_zeros(1)])
    slots, groups, slot = [], [], 0
    for S in sorted(set(padded.tolist())):
        pick = padded == S
        a, n = first[pick], lengths[pick]  # (docs of this group,)
        cols = torch.arange(S, device=dev)
        valid = cols < n[:, None]  # (n, S)
        idx = torch.where(valid, a[:, None] + cols, -1)  # (n, S)
        # (n, S, S); a slot past a document's end sees only itself (below), so no gradient leaves it
        allowed = torch.ones(S, S, dtype=torch.bool, device=dev).tril() & valid[:, None, :] & valid[:, :, None]
        if blk is not None:
            allowed = see_own_block(allowed, blk[idx], blk[idx])  # idx -1 reads the appended 0
        if hidden is not None:
            allowed = allowed & ~hidden[idx][:, None, :]
        allowed = allowed | torch.eye(S, dtype=torch.bool, device=dev)
        groups.append((slot, len(a), S, additive_mask(allowed, torch.float32)))
        slots.append(idx.flatten())
        slot += idx.numel()
    return DocumentGroups(N, torch.cat(slots), groups)


class _GroupedAttention(torch.autograd.Function):
    """The groups' attention with its backward written out: query, key and value rows (N * H, D),
    position-major as transformers lays them out, -> output rows (N * H, D), the groups computed
    one after another into preallocated buffers.

    Forward: gather every slot's query, key and value (`into`; a slot past a document's end reads
    row 0), per group P = softmax(scale q k^T + mask) and P v written into the slots' output, then
    each row's output from its slot (`back`). Backward: the output gradient gathered to the slots
    (`into`), per group dV = P^T dO, dS = softmax'(dO v^T) scaled, dQ = dS k and dK = dS^T q written
    into buffers, then each row's gradients from its slot (`back`). Both gathers are permutations
    up to the extra slots: an extra slot sees only itself and no real slot sees it, so what it
    computes, and its gradients, reach no row. Written out rather than left to autograd: no
    concatenation of the groups' outputs, no split of their gradients, no copies of the heads into
    another order (each a pass over the whole)."""

    @staticmethod
    def forward(ctx, q, k, v, layout: DocumentGroups, index: tuple[torch.Tensor, torch.Tensor], heads: int,
                scale: float, fp: torch.dtype):
        into, back = index
        H, D = heads, q.shape[-1]
        qs, ks, vs = (t.index_select(0, into).to(fp) for t in (q, k, v))  # (slots * H, D)
        out = torch.empty_like(qs)
        probs = []
        for first, n, S, mask in layout.groups:
            a, b = first * H, (first + n * S) * H
            qg, kg, vg = (t[a:b].view(n * H, S, D) for t in (qs, ks, vs))
            scores = torch.bmm(qg, kg.transpose(1, 2)).view(n, H, S, S)
            p = torch.softmax(scores.mul_(scale).add_(mask.to(fp)), -1).view(n * H, S, S)
            torch.bmm(p, vg, out=out[a:b].view(n * H, S, D))
            probs.append(p)
        ctx.save_for_backward(qs, ks, vs, into, back, *probs)
        ctx.layout, ctx.heads, ctx.scale, ctx.dtypes = layout, heads, scale, (q.dtype, k.dtype, v.dtype)
        return out.index_select(0, back)  # (N * H, D)

    @staticmethod
    def backward(ctx, grad):
        qs, ks, vs, into, back, *probs = ctx.saved_tensors
        H, D, scale = ctx.heads, qs.shape[-1], ctx.scale
        dout = grad.index_select(0, into).to(qs.dtype)  # (slots * H, D)
        dq, dk, dv = torch.empty_like(qs), torch.empty_like(ks), torch.empty_like(vs)
        with torch.autocast(grad.device.type, enabled=False):  # a backward run under autocast: fp32 too
            for (first, n, S, _), p in zip(ctx.layout.groups, probs):
                a, b = first * H, (first + n * S) * H
                qg, kg, vg, dog = (t[a:b].view(n * H, S, D) for t in (qs, ks, vs, dout))
                torch.bmm(p.transpose(1, 2), dog, out=dv[a:b].view(n * H, S, D))
                ds = torch._softmax_backward_data(torch.bmm(dog, vg.transpose(1, 2)), p, -1, p.dtype).mul_(scale)
                torch.bmm(ds, kg, out=dq[a:b].view(n * H, S, D))
                torch.bmm(ds.transpose(1, 2), qg, out=dk[a:b].view(n * H, S, D))
        return (*(g.index_select(0, back).to(dt) for g, dt in zip((dq, dk, dv), ctx.dtypes)),
                None, None, None, None, None)


def _gather_index(layout: DocumentGroups, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather indices of `grouped_attention` for H heads over position-major rows p * H + h (the
    (N * H, D) view of transformers' (1, N, H, D) projections): `into` (slots * H,), the row of each
    group's (n, H, S) slots in turn (row 0 past a document's end), and `back` (N * H,), the slot of
    each row."""
    N, H = layout.length, heads
    dev = layout.slots.device
    head = torch.arange(H, device=dev)[None, :, None]  # (1, H, 1)
    into, valid = [], []
    for first, n, S, _ in layout.groups:
        pos = layout.slots[first:first + n * S].view(n, 1, S)  # (n, 1, S): position, or -1
        into.append(torch.where(pos >= 0, pos * H + head, 0).flatten())
        valid.append((pos >= 0).expand(n, H, S).flatten())
    into, valid = torch.cat(into), torch.cat(valid)
    back = torch.empty(N * H, dtype=torch.long, device=dev)
    back[into[valid]] = valid.nonzero().flatten()
    return into, back


@torch.compiler.disable  # the groups' shapes change every step: eager, between the compiled layers' halves
def grouped_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: DocumentGroups,
                      scaling: float | None = None) -> torch.Tensor:
    """Attention of the documents of `layout`, each on its own: (1, H, N, D) x3 -> (1, N, H, D), as
    transformers' kernels return it. Scores in fp32 (as `omni_sdpa` under CPU autocast); the output
    in the query's dtype, or autocast's."""
    _, H, N, D = query.shape
    if query.shape[0] != 1 or N != layout.length:
        raise ValueError(f"grouped attention takes the layout's one sequence of {layout.length} positions "
                         f"(OmniModel.hidden_states), got queries {tuple(query.shape)}")
    if key.shape[1] != H:  # grouped-query attention: each key head serves H / H_kv query heads
        key = key.repeat_interleave(H // key.shape[1], dim=1)
        value = value.repeat_interleave(H // value.shape[1], dim=1)
    dtype = torch.get_autocast_dtype(query.device.type) if torch.is_autocast_enabled(query.device.type) else query.dtype
    scale = D**-0.5 if scaling is None else scaling
    if H not in layout._index:  # built once per step, shared by the layers
        layout._index[H] = _gather_index(layout, H)
    fp = torch.promote_types(query.dtype, torch.float32)  # fp32 scores; fp64 stays fp64 (tests)
    with torch.autocast(query.device.type, enabled=False):
        # (1, H, N, D) -> (N * H, D): a view of the projections as transformers makes them (a copy otherwise)
        q, k, v = (t.transpose(1, 2).reshape(N * H, D) for t in (query, key, value))
        out = _GroupedAttention.apply(q, k, v, layout, layout._index[H], H, scale, fp)  # (N * H, D)
    return out.view(1, N, H, D).to(dtype)
