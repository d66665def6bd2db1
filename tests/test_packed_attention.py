"""Packed rows without a dense mask: FlexAttention BlockMask and flash-attention varlen lengths.

CPU can run FlexAttention's forward (compiled by inductor, ~20 s the first time in a process) but
not its backward, so the parity checked here is forward: hidden states, logits and losses of the
flex path equal the dense-mask SDPA path within 1e-5 (fp32). Varlen needs flash-attn (CUDA): its
lengths are checked against the documents, its kernel only on a GPU.
"""

import copy
import dataclasses

import pytest
import torch

from omni.layout import ImageSegment, TextSegment, layout
from omni.models.attention import block_fraction, document_block_mask, varlen_kwargs
from omni.models.model import OmniModel, attention_bias

TOL = 1e-5  # fp32: flex and SDPA sum the same products in a different order


def _pair(cfg, bidirectional=False):
    """The same weights twice: dense-mask SDPA and FlexAttention."""
    cfg = copy.deepcopy(cfg)
    cfg.model.prompt_image_attention = "bidirectional" if bidirectional else "causal"
    cfg.model.backbone.attn_implementation = "sdpa"
    torch.manual_seed(0)
    dense = OmniModel.from_config(cfg.model)
    cfg.model.backbone.attn_implementation = "flex_attention"
    flex = OmniModel.from_config(cfg.model)
    flex.load_state_dict(dense.state_dict())
    assert flex.backbone.config._attn_implementation == "flex_attention"
    return dense, flex


def _packed(model, seq_len=96):
    """Two rows: three documents (caption + drawn image, VQA with a prompt image, text) and padding."""
    g = torch.Generator().manual_seed(0)
    n, d = model.image_tokenizer.num_tokens, model.image_tokenizer.token_dim
    tok = model.tokenizer
    t2i = [TextSegment(tok.encode("a red circle."), loss=False), ImageSegment(torch.randn(n, d, generator=g))]
    vqa = [ImageSegment(torch.randn(n, d, generator=g), loss=False), TextSegment(tok.encode("what color?"), loss=False),
           TextSegment(tok.encode("red"))]
    text = [TextSegment(tok.encode("the circle moves to the right."))]
    batch = layout([[t2i, vqa, text], [vqa, t2i]], model.special, seq_len=seq_len)
    assert (batch.doc_ids == 0).any() and batch.doc_ids.amax() == 3  # padding and three documents
    return batch


def _losses(model, batch):
    torch.manual_seed(1)  # the head's noise and timesteps
    return model(batch)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_flex_forward_equals_dense_mask(tiny_cfg, bidirectional):
    dense, flex = _pair(tiny_cfg, bidirectional)
    batch = _packed(dense)
    real = batch.doc_ids > 0
    for mode in ("eval", "train"):  # train: image input noise on, no gradients (CPU has no flex backward)
        getattr(dense, mode)(), getattr(flex, mode)()
        with torch.no_grad():
            torch.manual_seed(2)
            h_dense = dense.hidden_states(batch)
            torch.manual_seed(2)
            h_flex = flex.hidden_states(batch)
            assert (h_dense[real] - h_flex[real]).abs().max() < TOL
            logits_d, logits_f = dense.lm_head(h_dense[real]), flex.lm_head(h_flex[real])
            assert (logits_d - logits_f).abs().max() < TOL
            out_d, out_f = _losses(dense, batch), _losses(flex, batch)
        for k in ("loss", "loss_text", "loss_image"):
            assert abs(out_d[k].item() - out_f[k].item()) < TOL, k
        assert out_d["n_text_tokens"].item() == out_f["n_text_tokens"].item() > 0


def test_flex_sees_what_the_dense_mask_allows_and_nothing_else(tiny_cfg):
    """The BlockMask's pattern, expanded, is exactly the dense mask's (documents, causality,
    padding, bidirectional prompt images)."""
    from omni.models.model import prompt_image_blocks

    dense, _ = _pair(tiny_cfg)
    batch = _packed(dense)
    blocks = prompt_image_blocks(batch.image_mask, batch.image_target_index)
    assert blocks.amax() > 0
    for blk in (None, blocks):
        allowed = attention_bias(batch.doc_ids, torch.float32, blk)[:, 0] == 0  # (B, L, L)
        bm = document_block_mask(batch.doc_ids, blk, block_size=16)
        B, L = batch.doc_ids.shape
        q, kv = torch.arange(L)[:, None], torch.arange(L)[None]
        for b in range(B):
            assert torch.equal(bm.mask_mod(torch.tensor(b), torch.tensor(0), q, kv), allowed[b])


def test_block_fraction_counts_the_tiles_flex_computes():
    L = 512  # four 128-blocks per side, 16 tiles per row
    one_doc = torch.ones(1, L, dtype=torch.long)
    assert block_fraction(document_block_mask(one_doc)) == pytest.approx(10 / 16)  # the causal triangle
    four_docs = torch.arange(1, 5).repeat_interleave(128)[None]  # documents aligned with the blocks
    assert block_fraction(document_block_mask(four_docs)) == pytest.approx(4 / 16)  # the diagonal only


def test_varlen_lengths_are_the_documents_of_the_flattened_rows():
    doc_ids = torch.tensor([[1, 1, 1, 2, 2, 0],
                            [1, 1, 1, 1, 1, 1],
                            [1, 2, 3, 3, 0, 0]])
    kw = varlen_kwargs(doc_ids)
    assert kw["cu_seq_lens_q"].tolist() == [0, 3, 5, 6, 12, 13, 14, 16, 18]
    assert kw["cu_seq_lens_q"].dtype == torch.int32 and kw["cu_seq_lens_k"] is kw["cu_seq_lens_q"]
    assert kw["max_length_q"] == kw["max_length_k"] == 6  # the row length: an upper bound, no host read
    # two rows that end and start with the same document number are still two sequences
    assert varlen_kwargs(torch.ones(2, 4, dtype=torch.long))["cu_seq_lens_q"].tolist() == [0, 4, 8]


def test_flex_training_on_cpu_is_a_clear_error(tiny_cfg):
    _, flex = _pair(tiny_cfg)
    batch = _packed(flex)
    flex.train()
    with pytest.raises(ValueError, match="attn_implementation=flex_attention cannot train on the CPU.*sdpa"):
        flex(batch)


def test_flex_forward_reads_nothing_back_to_the_host(tiny_cfg):
    """The BlockMask path decides nothing on the host: no `.item()` in the model's forward
    (the dense path reads one flag: is every row one document, so SDPA may run plain causal)."""
    from host_reads import count_host_reads

    dense, flex = _pair(tiny_cfg)
    batch = _packed(dense)
    for m in (dense, flex):
        m.eval()
    with torch.no_grad():
        flex(batch)  # compile outside the count
        with count_host_reads() as flex_reads:
            flex(batch)
        with count_host_reads() as dense_reads:
            dense(batch)
    assert flex_reads.n == 0, flex_reads.where
    assert dense_reads.n == 1, dense_reads.where


def test_checkpoint_trained_with_flex_generates_with_sdpa(tmp_path, tiny_cfg):
    from omni.models.model import load_pretrained

    _, flex = _pair(tiny_cfg)
    flex.run_config = dataclasses.replace(tiny_cfg, model=flex.cfg)
    flex.save_pretrained(tmp_path / "ck")
    back = load_pretrained(tmp_path / "ck")
    assert back.cfg.backbone.attn_implementation == "flex_attention"
    assert back.backbone.config._attn_implementation != "flex_attention"
