"""Hand-checked layouts: every output tensor for one image, two images, image first, text only, packing."""

import pytest
import torch

from omni.layout import ImageSegment, SpecialIds, TextSegment, doc_length, layout
from omni.models.model import attention_bias

IDS = SpecialIds(bos=1, eos=2, pad=0, boi=90, eoi=91, img=92)
X = -100  # IGNORE


def img(n, start=0.0):
    """n image tokens of dim 2 whose values tell them apart."""
    return torch.arange(start, start + 2 * n, dtype=torch.float32).view(n, 2)


def test_one_image_caption_then_image():
    doc = [TextSegment([10, 11], loss=False), ImageSegment(img(3))]
    b = layout([[doc]], IDS)
    #          bos  10  11  boi img img img eoi eos
    assert b.input_ids.tolist() == [[1, 10, 11, 90, 92, 92, 92, 91, 2]]
    assert b.position_ids.tolist() == [list(range(9))]
    assert b.doc_ids.tolist() == [[1] * 9]
    # 11 predicts <boi> (the model decides to draw); <eoi> is forced (no label); eoi predicts eos.
    assert b.labels.tolist() == [[X, X, 90, X, X, X, X, 2, X]]
    assert b.image_mask.tolist() == [[False] * 4 + [True] * 3 + [False] * 2]
    assert torch.equal(b.image_tokens, img(3))
    # image token j is conditioned on the position before it: boi(3)->x1, x1(4)->x2, x2(5)->x3
    assert b.image_target_index.tolist() == [0, 1, 2]
    assert b.image_cond_index.tolist() == [3, 4, 5]


def test_image_first_vqa_no_image_loss():
    doc = [ImageSegment(img(2), loss=False), TextSegment([20, 21], loss=False), TextSegment([30])]
    b = layout([[doc]], IDS)
    #          bos boi img img eoi 20 21 30 eos
    assert b.input_ids.tolist() == [[1, 90, 92, 92, 91, 20, 21, 30, 2]]
    assert b.labels.tolist() == [[X, X, X, X, X, X, 30, 2, X]]
    assert b.image_target_index.numel() == 0 and b.image_cond_index.numel() == 0
    assert b.image_tokens.shape == (2, 2)


def test_two_images_interleaved_targets_in_order():
    doc = [TextSegment([10]), ImageSegment(img(2, 0)), TextSegment([11]), ImageSegment(img(2, 100))]
    b = layout([[doc]], IDS, seq_len=14)
    # bos 10 boi i i eoi 11 boi i i eoi eos pad pad
    assert b.input_ids.tolist() == [[1, 10, 90, 92, 92, 91, 11, 90, 92, 92, 91, 2, 0, 0]]
    assert b.labels.tolist() == [[10, 90, X, X, X, 11, 90, X, X, X, 2, X, X, X]]
    assert b.image_cond_index.tolist() == [2, 3, 7, 8]
    assert torch.equal(b.image_tokens[b.image_target_index], torch.cat([img(2, 0), img(2, 100)]))
    assert b.doc_ids.tolist() == [[1] * 12 + [0, 0]]


def test_text_only():
    b = layout([[[TextSegment([5, 6, 7])]]], IDS, token_dim=4)
    assert b.input_ids.tolist() == [[1, 5, 6, 7, 2]]
    assert b.labels.tolist() == [[5, 6, 7, 2, X]]
    assert b.image_tokens.shape == (0, 4)
    assert not b.image_mask.any()


def test_packed_documents_restart_positions_and_never_cross():
    d1 = [TextSegment([10, 11])]
    d2 = [TextSegment([12], loss=False), ImageSegment(img(2))]
    b = layout([[d1, d2], [d2]], IDS, seq_len=12)
    # row 0: bos 10 11 eos | bos 12 boi i i eoi eos | pad
    assert b.input_ids[0].tolist() == [1, 10, 11, 2, 1, 12, 90, 92, 92, 91, 2, 0]
    assert b.position_ids[0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 0]
    assert b.doc_ids[0].tolist() == [1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 0]
    # eos of doc 1 (pos 3) must not predict bos of doc 2
    assert b.labels[0].tolist() == [10, 11, 2, X, X, 90, X, X, X, 2, X, X]
    # image targets of row 0 condition on row 0 positions, row 1 on row 1 (flat index 12 + p)
    assert b.image_cond_index.tolist() == [6, 7, 12 + 2, 12 + 3]
    assert b.image_target_index.tolist() == [0, 1, 2, 3]
    assert doc_length(d1) == 4 and doc_length(d2) == 7
    bias = attention_bias(b.doc_ids, torch.float32)[:, 0]  # (B, L, L)
    allowed = bias == 0
    # a text token of doc 2 never sees doc 1, and causality holds
    assert not allowed[0, 5, :4].any() and allowed[0, 5, 4:6].all() and not allowed[0, 5, 6:].any()
    assert not allowed[0, 2, 4:].any() and allowed[0, 2, :3].all()


def test_overlong_row_is_an_error():
    with pytest.raises(ValueError, match="seq_len is 4"):
        layout([[[TextSegment([5, 6, 7, 8])]]], IDS, seq_len=4)


def test_single_unpadded_doc_uses_plain_causal():
    b = layout([[[TextSegment([5, 6])]]], IDS)
    assert attention_bias(b.doc_ids, torch.float32) is None
