"""attn_implementation=grouped: each packed document attends on its own.

The kernel computes the dense document mask's function (the same pairs), so it is checked against
it: in fp64 the outputs and the gradients of queries, keys and values equal dense SDPA's to 1e-12
on layouts with every feature of the mask (padding, documents at and across the groups' length
steps, a document id repeated across a row boundary, bidirectional prompt-image blocks, parallel
decoding's position queries); the whole model's hidden states, losses and gradients equal the
`sdpa` model's in fp32; compiled layers equal eager ones; generation, which has no packed rows,
runs `omni_sdpa` and answers as the `sdpa` model does.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from omni.models.attention import document_groups, grouped_attention
from omni.models.model import OmniModel, attention_bias


def _rows() -> torch.Tensor:
    """(4, 40) doc ids: row 0 one document filling the row; row 1 starting with id 1 again (a
    document must not run on from the row above), documents of 1, 15, 16 and 17 positions, then
    padding; row 2 all padding but one position; row 3 two documents and padding between none."""
    rows = [
        [1] * 40,
        [1] * 1 + [2] * 15 + [3] * 16 + [0] * 8,
        [1] + [0] * 39,
        [1] * 17 + [2] * 23,
    ]
    return torch.tensor(rows)


def _blocks(doc_ids: torch.Tensor) -> torch.Tensor:
    """Prompt-image blocks inside documents: positions 3-7 of row 3's first document, 20-25 of
    row 0 (block numbers per row, as `prompt_image_blocks` numbers them)."""
    blocks = torch.zeros_like(doc_ids)
    blocks[0, 20:26] = 1
    blocks[3, 3:8] = 1
    blocks[3, 25:30] = 2
    return blocks


def _dense_reference(q, k, v, doc_ids, blocks, queries):
    """Dense SDPA over the (B, L) rows with `attention_bias`; q, k, v (1, H, B * L, D) as the
    grouped kernel takes them -> (1, B * L, H, D)."""
    B, L = doc_ids.shape
    H, D = q.shape[1], q.shape[3]

    def rows(t):
        return t[0].reshape(H, B, L, D).transpose(0, 1)  # (B, H, L, D)

    mask = attention_bias(doc_ids, q.dtype, blocks, queries)
    out = F.scaled_dot_product_attention(rows(q), rows(k), rows(v), attn_mask=mask)  # (B, H, L, D)
    return out.transpose(1, 2).reshape(1, B * L, H, D)


@pytest.mark.parametrize("order", ["positions first", "heads first"])
@pytest.mark.parametrize("features", ["causal", "blocks", "blocks+queries"])
def test_grouped_attention_equals_the_dense_mask_with_gradients(features, order):
    """`order`: the projections as transformers makes them, (1, N, H, D) seen transposed (the
    kernel reads them in place), or contiguous (1, H, N, D) (it copies them into that order)."""
    torch.manual_seed(0)
    doc_ids = _rows()
    blocks = _blocks(doc_ids) if "blocks" in features else None
    queries = None
    if "queries" in features:
        queries = torch.zeros_like(doc_ids, dtype=torch.bool)
        queries[0, 30:34] = True
        queries[3, 36:40] = True
    N, H, D = doc_ids.numel(), 3, 8
    if order == "heads first":
        q, k, v = (torch.randn(1, H, N, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    else:
        q, k, v = (torch.randn(1, N, H, D, dtype=torch.float64, requires_grad=True).transpose(1, 2) for _ in range(3))
    layout = document_groups(doc_ids, blocks, queries)
    # padding positions take one slot each; documents of 1, 15 and 16 share S=16, 17 and 23 S=32
    assert {S: n for _, n, S, _ in layout.groups} == {1: 47, 16: 4, 32: 2, 48: 1}  # 7 documents, none run on
    valid = layout.slots[layout.slots >= 0]
    assert sorted(valid.tolist()) == list(range(N))  # every position in exactly one slot
    out = grouped_attention(q, k, v, layout)  # (1, N, H, D)
    ref = _dense_reference(q, k, v, doc_ids, blocks, queries)
    assert out.shape == (1, N, H, D)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), go)
    ref_grads = torch.autograd.grad(ref, (q, k, v), go)
    for name, g, r in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-12, rtol=0, msg=lambda m, n=name: f"d{n}: {m}")


def test_grouped_attention_under_bf16_autocast():
    """As the demo trains: bf16 projections under CPU autocast, the backward run inside the autocast
    region too. Scores and gradients are fp32 inside; the output is bf16 and the input gradients
    take the inputs' dtype; both equal the fp32 computation to bf16 rounding."""
    torch.manual_seed(0)
    doc_ids = _rows()
    blocks = _blocks(doc_ids)
    N, H, D = doc_ids.numel(), 4, 16
    leaves = [torch.randn(1, N, H, D).to(torch.bfloat16).requires_grad_() for _ in range(3)]
    layout = document_groups(doc_ids, blocks)
    go = torch.randn(1, N, H, D)
    with torch.autocast("cpu", torch.bfloat16):
        out = grouped_attention(*(t.transpose(1, 2) for t in leaves), layout)
        assert out.dtype == torch.bfloat16
        out.float().backward(go)
    ref_leaves = [t.detach().float().requires_grad_() for t in leaves]
    ref = _dense_reference(*(t.transpose(1, 2) for t in ref_leaves), doc_ids, blocks, None)
    ref.backward(go)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    for t, r in zip(leaves, ref_leaves):
        assert t.grad.dtype == torch.bfloat16
        torch.testing.assert_close(t.grad.float(), r.grad, atol=3e-2, rtol=3e-2)


def test_grouped_attention_takes_fewer_key_heads():
    """Grouped-query attention: each key/value head serves H / H_kv query heads, as repeat_kv does."""
    torch.manual_seed(0)
    doc_ids = _rows()
    N = doc_ids.numel()
    q = torch.randn(1, 4, N, 8, dtype=torch.float64)
    k, v = (torch.randn(1, 2, N, 8, dtype=torch.float64) for _ in range(2))
    layout = document_groups(doc_ids)
    ref = grouped_attention(q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), layout)
    torch.testing.assert_close(grouped_attention(q, k, v, layout), ref, atol=0, rtol=0)


def test_grouped_attention_refuses_rows_it_was_not_laid_out_for():
    doc_ids = _rows()
    layout = document_groups(doc_ids)
    q = torch.randn(4, 2, 40, 8)  # the padded rows, not the layout's one sequence
    with pytest.raises(ValueError, match="one sequence of 160 positions"):
        grouped_attention(q, q, q, layout)


def _pair(cfg, bidirectional: bool):
    cfg = copy.deepcopy(cfg)
    cfg.model.prompt_image_attention = "bidirectional" if bidirectional else "causal"
    cfg.model.backbone.attn_implementation = "sdpa"
    torch.manual_seed(0)
    dense = OmniModel.from_config(cfg.model)
    for p in dense.parameters():  # leave the zero-initialised start, so every block computes
        p.data.add_(torch.randn_like(p) * 0.02)
    cfg.model.backbone.attn_implementation = "grouped"
    grouped = OmniModel.from_config(cfg.model)
    grouped.load_state_dict(dense.state_dict())
    return dense, grouped


@pytest.mark.parametrize("bidirectional", [False, True])
def test_grouped_model_trains_as_the_dense_mask_model(tiny_cfg, bidirectional):
    """Hidden states, the losses and every parameter's gradient equal (fp32)."""
    from test_packed_attention import _packed

    dense, grouped = _pair(tiny_cfg, bidirectional)
    batch = _packed(dense)
    out, grads, hidden = {}, {}, {}
    for name, model in (("dense", dense), ("grouped", grouped)):
        model.train()
        torch.manual_seed(1)
        hidden[name] = model.hidden_states(batch)  # padding too: it sees only itself in both
        torch.manual_seed(1)
        out[name] = model(batch)
        model.zero_grad()
        out[name]["loss"].backward()
        grads[name] = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert (hidden["grouped"] - hidden["dense"]).abs().max() < 1e-5
    for k in ("loss", "loss_text", "loss_image"):
        assert abs(out["grouped"][k].item() - out["dense"][k].item()) < 1e-5, k
    assert grads["grouped"].keys() == grads["dense"].keys()
    for k, g in grads["dense"].items():
        torch.testing.assert_close(grads["grouped"][k], g, atol=1e-6, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.slow  # compiles four decoder layers (~50 s on a cold inductor cache)
def test_grouped_compiled_layers_equal_eager(tiny_cfg):
    from test_packed_attention import _packed

    from omni.models.backbone import compile_layers

    _, eager = _pair(tiny_cfg, bidirectional=True)
    compiled = copy.deepcopy(eager)
    assert compile_layers(compiled.backbone) > 0
    for seq_len in (96, 96, 128):  # the grouped sequence is the rows' B x L positions: one shape per (B, L)
        batch = _packed(eager, seq_len)
        losses = []
        for model in (eager, compiled):
            model.train()
            torch.manual_seed(1)
            losses.append(model(batch)["loss"])
        losses[1].backward()
        assert abs(losses[0].item() - losses[1].item()) < 1e-5


def test_grouped_model_generates_as_the_dense_model(tiny_cfg):
    """Generation has no packed rows: the grouped model's backbone runs omni_sdpa there, and a
    prompt image, text and a drawn image come out as the `sdpa` model's."""
    from PIL import Image

    from omni.inference.generate import generate, generation_config

    dense, grouped = _pair(tiny_cfg, bidirectional=True)
    picture = Image.new("RGB", (32, 32), (200, 40, 40))
    answers = []
    for model in (dense, grouped):
        model.eval()
        cfg = generation_config(model, max_new_tokens=24, image_steps=2)
        answers.append(generate(model, [[picture, "what is it?"], ["a red circle."]], cfg, seeds=[0, 1], mode="auto")
                       + generate(model, [["a red circle."]], cfg, seeds=[2], mode="image"))
    for a, b in zip(*answers):
        assert a.ids == b.ids
        assert len(a.image_tokens) == len(b.image_tokens)
        for x, y in zip(a.image_tokens, b.image_tokens):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    assert answers[0][2].image_tokens  # the image mode drew
