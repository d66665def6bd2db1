"""Sequence layout: tokenized interleaved documents -> the tensors the model reads.

One pure function, `layout`, with no model or tokenizer inside. A document is a list of
segments; each row of a batch packs one or more documents:

    [bos] text ... <boi> x1 ... xN <eoi> text ... [eos]   [bos] next document ...   pad pad

Rules (DESIGN.md section 3):
- text positions carry token ids; image positions carry the placeholder id and a continuous token;
- labels are aligned to the predicting position: labels[b, p] is the token hidden[b, p] predicts;
- `<boi>` is predicted (the model decides to draw); `<eoi>` is forced, so it has no label;
- image token j is a diffusion target conditioned on hidden[p_j - 1] (the position before it);
- position ids restart at 0 for every document; `doc_ids` numbers documents 1, 2, ... in a row
  (0 = padding) so attention never crosses a document boundary.

Parallel image decoding (`model.parallel_image`, docs/parallel.md): a drawn image is cut into
groups (sizes from the schedule) and each group is preceded by one position query per token:

    <boi> q1 q2 x1 x2 q3 q4 x3 x4 ... <eoi>        (groups of 2)

A query carries no token (its input is the learned embedding of its target's cell), has its
target's position id, sees the committed positions before it (so everything before its group)
and is seen by nothing: the committed positions compute exactly what they would without queries.
Image token j is then conditioned on the hidden state of its own query instead of position
p_j - 1. The sampler feeds the same thing one group per pass.
"""

from __future__ import annotations

import itertools
import zlib
from dataclasses import dataclass, fields

import numpy as np
import torch

IGNORE = -100


@dataclass
class TextSegment:
    ids: list[int]
    loss: bool = True  # are these tokens predicted (trained on)?


@dataclass
class ImageSegment:
    tokens: torch.Tensor  # (N, d) continuous image tokens
    loss: bool = True  # are <boi> and the image tokens predicted?
    # With `loss`: is <boi> predicted too? False trains the drawing, not the decision to draw (the
    # image-only condition of an edit document, where "draw after an image" would be a false rule).
    predict_boi: bool = True


Segment = TextSegment | ImageSegment
TokenizedDoc = list[Segment]


@dataclass(frozen=True)
class SpecialIds:
    bos: int
    eos: int
    pad: int
    boi: int
    eoi: int
    img: int


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, L) long; image positions hold the placeholder id
    position_ids: torch.Tensor  # (B, L) long; restart per document
    doc_ids: torch.Tensor  # (B, L) long; 1.. per document in a row, 0 = padding
    labels: torch.Tensor  # (B, L) long; next text token to predict from this position, or -100
    image_mask: torch.Tensor  # (B, L) bool; positions that carry a continuous image token
    image_tokens: torch.Tensor  # (M, d) float; image tokens in row-major order of image_mask
    image_target_index: torch.Tensor  # (K,) long; which image tokens are diffusion targets
    image_cond_index: torch.Tensor  # (K,) long; flat index b*L + p of the conditioning position
    # (B, L) long; a position query's target cell, -1 at every other position (all -1 without
    # model.parallel_image)
    query_cells: torch.Tensor | None = None
    # The targets drawn together (`group_index`: (G, k) and (K,)); without model.parallel_image
    # every target is its own group
    image_group_index: torch.Tensor | None = None
    image_group_pos: torch.Tensor | None = None
    # (K,) long: for each target, the image token at the same cell of the previous image of its
    # document (an index into image_tokens), -1 where there is none (the document's first image, an
    # image of another size, parallel decoding); what model.image_reference conditions on
    image_ref_index: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.query_cells is None:
            self.query_cells = torch.full_like(self.input_ids, -1)
        if self.image_ref_index is None:
            self.image_ref_index = torch.full_like(self.image_target_index, -1)
        if self.image_group_index is None:
            self.image_group_index, self.image_group_pos = group_index([1] * self.image_target_index.numel())

    def to(self, device, non_blocking: bool = False) -> Batch:
        return Batch(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)})

    @property
    def n_text_targets(self) -> int:
        return int((self.labels != IGNORE).sum())

    @property
    def n_image_targets(self) -> int:
        return int(self.image_target_index.numel())

    @property
    def n_tokens(self) -> int:
        return int((self.doc_ids > 0).sum())


def doc_length(doc: TokenizedDoc, add_bos: bool = True, add_eos: bool = True, queries: bool = False) -> int:
    """Number of positions `doc` occupies in a row (`queries`: with a position query per drawn token)."""
    n = int(add_bos) + int(add_eos)
    for seg in doc:
        if isinstance(seg, TextSegment):
            n += len(seg.ids)
        else:
            n += seg.tokens.shape[0] * (2 if queries and seg.loss else 1) + 2
    return n


def with_queries(tok: list[int], pred: list[bool], img: list[int], groups: list[int], pad: int,
                 order: str = "raster", per_image: dict[int, list[int]] | None = None):
    """Insert position queries before each group of every drawn image of one flattened document.

    -> (tok, pred, img, pos, query_cell, orders): query positions hold `pad` (their input is the
    query embedding), are never predicted, carry their target's position id and cell; committed
    positions keep their raster position ids. `order` "strided" or "blocks" (`config.draw_order`) commits an
    image's tokens in drawing order: its j-th committed token is image token img[start] + j, and
    orders[img[start]] = the cells in that order (`layout` permutes the image's tokens to match).
    `per_image` gives an image its own schedule instead of `groups`, by its first image-token index.
    """
    from omni.config import draw_order, group_sizes

    out = ([], [], [], [], [])
    orders: dict[int, list[int]] = {}
    p, n = 0, len(tok)
    while p < n:
        if img[p] < 0 or not pred[p]:  # text, or a prompt image's token (read, not drawn)
            for lst, v in zip(out, (tok[p], pred[p], img[p], p, -1)):
                lst.append(v)
            p += 1
            continue
        end = p
        while end < n and img[end] >= 0 and pred[end]:
            end += 1
        schedule = (per_image or {}).get(img[p], groups)
        cells = draw_order(end - p, schedule, order)
        if order != "raster":
            orders[img[p]] = cells
        j = 0
        for k in group_sizes(schedule, end - p):
            group = cells[j:j + k]
            for c in group:  # the queries of this group, then its tokens
                for lst, v in zip(out, (pad, False, -1, p + c, c)):
                    lst.append(v)
            for i, c in enumerate(group):
                for lst, v in zip(out, (tok[p + c], pred[p + c], img[p] + j + i, p + c, -1)):
                    lst.append(v)
            j += k
        p = end
    return (*out, orders)


def group_index(sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows that come in consecutive groups of `sizes` (tokens drawn together, the head's group
    attention): index (G, k) of each group's rows, -1 padding a group shorter than the longest (k),
    and pos (R,), each row's place in the flattened (G, k) (`omni.heads.diffusion.Groups`)."""
    s = torch.tensor(sizes, dtype=torch.long)  # (G,)
    j = torch.arange(max(sizes, default=1))  # (k,)
    valid = j[None] < s[:, None]  # (G, k)
    index = torch.where(valid, (torch.cumsum(s, 0) - s)[:, None] + j[None], -1)
    pos = (torch.arange(len(sizes))[:, None] * len(j) + j[None])[valid]
    return index, pos


def pick_schedule(tokens: torch.Tensor, choices: list[list[int]]) -> list[int]:
    """One of `choices` for an image, from a checksum of its first token's values (n, d): the same
    image always gets the same schedule, and different images spread evenly over them."""
    first = tokens[0].detach().float().cpu().contiguous().numpy()
    return choices[zlib.crc32(first.tobytes()) % len(choices)]


def reference_table(sizes: list[int], offset: int = 0) -> list[int]:
    """The images of one document, (sum(sizes),) -> for each of its image tokens the index of the
    token at the same cell of the previous image of the document (plus `offset`), or -1: the first
    image has no previous one, and an image of another size no cell-to-cell match."""
    table: list[int] = []
    start = prev_start = prev_n = 0
    for i, n in enumerate(sizes):
        table += range(offset + prev_start, offset + prev_start + n) if i > 0 and n == prev_n else [-1] * n
        prev_start, prev_n, start = start, n, start + n
    return table


def doc_positions(doc: TokenizedDoc, ids: SpecialIds, add_bos: bool = True, add_eos: bool = True):
    """Flatten one document: (token ids, predicted?, image-token index or -1, image tensors).

    The layout rule in one place: training (`layout`) and the sampler's prompts both use it.
    """
    tok, pred, img, images = [], [], [], []
    n_img = 0  # image tokens in this document so far
    if add_bos:
        tok.append(ids.bos), pred.append(False), img.append(-1)
    last_loss = False
    for seg in doc:
        if isinstance(seg, TextSegment):
            tok += seg.ids
            pred += [seg.loss] * len(seg.ids)
            img += [-1] * len(seg.ids)
        else:
            n = seg.tokens.shape[0]
            tok += [ids.boi] + [ids.img] * n + [ids.eoi]
            pred += [seg.loss and seg.predict_boi] + [seg.loss] * n + [False]  # <eoi> is forced, never predicted
            img += [-1] + list(range(n_img, n_img + n)) + [-1]
            images.append(seg.tokens)
            n_img += n
        last_loss = seg.loss
    if add_eos:
        tok.append(ids.eos), pred.append(last_loss), img.append(-1)
    return tok, pred, img, images


def layout(
    rows: list[list[TokenizedDoc]],
    ids: SpecialIds,
    seq_len: int | None = None,
    add_bos: bool = True,
    add_eos: bool = True,
    token_dim: int | None = None,
    groups: list[int] | None = None,
    order: str = "raster",
    choices: list[list[int]] | None = None,
) -> Batch:
    """Lay out `rows` (each a list of documents packed together) into a padded Batch.

    seq_len pads every row to that length (an over-long row is an error: pack or cut first);
    None pads to the longest row. `groups` (parallel image decoding, `config.parse_groups`): put
    position queries before each group of every drawn image, its cells taken in `order`
    (`with_queries`). `choices` (several schedules, `config.parse_group_choices`): each drawn image
    takes one of them instead, picked by its tokens' content (`pick_schedule`), so a batch trains
    them all and a document always gets the same ones (exact resumption needs no random state).
    """
    flat = []
    for row in rows:
        docs = []
        for d in row:
            tok, pred, img, images = doc_positions(d, ids, add_bos, add_eos)
            if groups is None:
                pos, qcell = list(range(len(tok))), [-1] * len(tok)
            else:
                starts = list(itertools.accumulate((t.shape[0] for t in images), initial=0))  # first token of each
                per_image = None
                if choices is not None and len(choices) > 1:
                    per_image = {s: pick_schedule(t, choices) for s, t in zip(starts, images)}
                tok, pred, img, pos, qcell, orders = with_queries(tok, pred, img, groups, ids.pad, order, per_image)
                if orders:  # strided / blocks: an image's tokens stored in the order they are committed
                    images = [t[orders[b]] if b in orders else t for b, t in zip(starts, images)]
            docs.append((tok, pred, img, images, pos, qcell))
        flat.append(docs)
    lengths = [sum(len(t) for t, *_ in row) for row in flat]
    L = seq_len if seq_len is not None else max(lengths, default=1)
    for r, n in enumerate(lengths):
        if n > L:
            raise ValueError(f"row {r} holds {n} positions but seq_len is {L}; pack fewer documents or cut")
    # Every row's documents joined and padded to L as Python lists, then one conversion per field
    # for the whole batch (per-document tensor ops cost more than the arithmetic on 2-core CPUs).
    fields_ = ("tok", "pred", "img", "off", "doc", "pos", "qcell")
    pads = (ids.pad, False, -1, 0, 0, 0, -1)
    cols: dict[str, list] = {f: [] for f in fields_}
    all_tokens: list[torch.Tensor] = []
    refs: list[int] = []  # per image token of the batch: its reference token (reference_table) or -1
    n_img = 0  # image tokens laid out so far
    for row, n in zip(flat, lengths):
        for d, (tok, pred, img, images, pos, qcell) in enumerate(row, start=1):
            sizes = [t.shape[0] for t in images]
            for f, v in zip(fields_, (tok, pred, img, [n_img] * len(tok), [d] * len(tok), pos, qcell)):
                cols[f] += v
            refs += reference_table(sizes, n_img)
            all_tokens.extend(images)
            n_img += sum(sizes)
        for f, v in zip(fields_, pads):
            cols[f] += [v] * (L - n)
    B = len(rows)
    tok, pred, local, off, doc, pos, qcell = (np.array(cols[f], dtype=bool if f == "pred" else np.int64).reshape(B, L)
                                              for f in fields_)
    is_img = local >= 0
    img = np.where(is_img, local + off, -1)  # (B, L) the batch's image-token index, -1: none
    # Position p is predicted from position p - 1 of the same document (queries never sit between
    # two text positions, so text labels are as without them).
    follows = (doc[:, 1:] == doc[:, :-1]) & (doc[:, 1:] > 0) & pred[:, 1:]  # (B, L-1) p+1 is a target
    labels = np.full((B, L), IGNORE, dtype=np.int64)
    labels[:, :-1] = np.where(follows & ~is_img[:, 1:], tok[:, 1:], IGNORE)
    if groups is None:
        img_target = follows & is_img[:, 1:]
        b, p = img_target.nonzero()  # row-major: each document's targets in order, documents in order
        targets, conds = img[:, 1:][img_target], b * L + p
        ref_index = torch.from_numpy(np.array(refs, dtype=np.int64)[targets])
        group_fields = {}
    else:  # a drawn token is conditioned on its query: the k-th query of an image, its k-th token
        targets = img[pred & is_img]  # committed positions, row-major
        conds = (qcell.reshape(-1) >= 0).nonzero()[0]  # the queries, same order
        # A group's queries are one run of positions (a document starts with [bos], never a query).
        cuts = (np.diff(conds) > 1).nonzero()[0] + 1
        sizes = np.diff(np.concatenate([[0], cuts, [len(conds)]])).tolist() if len(conds) else []
        ref_index = None
        group_fields = dict(zip(("image_group_index", "image_group_pos"), group_index(sizes)))
    if all_tokens:
        image_tokens = torch.cat([t.float() for t in all_tokens])  # (M, d)
    else:
        image_tokens = torch.zeros((0, token_dim or 0))
    return Batch(
        input_ids=torch.from_numpy(tok),
        position_ids=torch.from_numpy(pos),
        doc_ids=torch.from_numpy(doc),
        labels=torch.from_numpy(labels),
        image_mask=torch.from_numpy(is_img),
        image_tokens=image_tokens,
        image_target_index=torch.from_numpy(targets.astype(np.int64)),
        image_cond_index=torch.from_numpy(conds.astype(np.int64)),
        query_cells=torch.from_numpy(qcell),
        image_ref_index=ref_index,
        **group_fields,
    )
