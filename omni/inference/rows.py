"""Per-row state of the sampler: what a caller gets back (GenerationResult), the hooks it can
listen on (GenerationEvents), and the bookkeeping of one answer row and its model streams.

A row (one prompt being answered) owns a conditional stream and, while it draws under CFG, an
unconditional one (and, under image-guided CFG, an image-only one); a stream is one batch row of
the model (positions, what each may attend to).
Groups are the streams that run in one forward call and share a KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from omni.config import GenerationConfig


@dataclass
class GenerationResult:
    segments: list[str | Image.Image]  # generated text pieces and images, in order
    settings: dict  # everything needed to reproduce this row (sampler, steps, cfg, seed, checkpoint, ...)
    finish_reason: str  # "eos" | "max_tokens" | "max_images" | "repetition" | "cancelled"
    ids: list[int] = field(default_factory=list)  # generated ids; image positions hold the placeholder id
    image_tokens: list[torch.Tensor] = field(default_factory=list)  # (N, d) per generated image

    @property
    def text(self) -> str:
        return " ".join(s for s in self.segments if isinstance(s, str))

    @property
    def images(self) -> list[Image.Image]:
        return [s for s in self.segments if isinstance(s, Image.Image)]


class GenerationEvents:
    """Hooks the sampler calls as it goes; chat streams text and draws progress bars from them.

    `row` is the index of the prompt in the batch. Subclass and override what you need.
    """

    def text(self, row: int, delta: str) -> None:
        """New text of the row's current text segment (the part not reported yet)."""

    def image_start(self, row: int, total: int) -> None:
        """The row sampled <boi>; `total` image tokens follow."""

    def image_token(self, row: int, done: int, total: int) -> None:
        """`done` of `total` image tokens of the current image are drawn."""

    def image_done(self, row: int, image: Image.Image) -> None:
        """The row finished an image."""

    def should_stop(self) -> bool:
        """Polled once per step; True cancels every unfinished row that reports to this object
        (finish_reason "cancelled"): all of a generate() call, or one row of a server batch."""
        return False


# --------------------------------------------------------------------------------------------
# Sampler state
# --------------------------------------------------------------------------------------------


@dataclass
class _Stream:
    """One batch row of the model: its positions, and what each position may attend to."""

    ids: list[int]
    images: list  # continuous token (d,) at image positions, else None
    pos: list[int]  # position id of each position
    lo: list[int]  # a query here sees keys [lo, itself] plus `bos`
    bos: int  # index of [bos] (= left padding)
    start: int  # `lo` for positions appended from now on
    next_pos: int
    blocks: list[int]  # > 0: a prompt image's positions, which see each other (prompt_image_blocks)
    src: _Stream | None = None  # set on a fresh copy until its cache rows are copied
    # Parallel image decoding: positions no later position sees (position queries, and the padding
    # that evens out the streams of a step), and each query's target cell (-1 elsewhere).
    hide: list[bool] | None = None
    qcell: list[int] | None = None
    n_queries: int = 0  # queries at the end of the positions fed last
    image_base: int = 0  # position id of cell 0 of the image being drawn (the one after its <boi>)

    def __post_init__(self) -> None:
        if self.hide is None:
            self.hide = [False] * len(self.ids)
        if self.qcell is None:
            self.qcell = [-1] * len(self.ids)

    def append(self, tok: int, image) -> None:
        self._put(tok, image, self.next_pos, self.start, False, -1)
        self.next_pos += 1

    def append_at(self, tok: int, image, pos: int) -> None:
        """A position with an explicit position id (an image token committed out of raster order)."""
        self._put(tok, image, pos, self.start, False, -1)
        self.next_pos = max(self.next_pos, pos + 1)

    def append_query(self, cell: int, pos: int, pad_id: int) -> None:
        """A position query for image cell `cell`, at its target's position id `pos`."""
        self._put(pad_id, None, pos, self.start, True, cell)

    def append_pad(self, pad_id: int) -> None:
        """Padding inside the sequence (a stream feeding fewer positions than others): sees only itself."""
        self._put(pad_id, None, 0, len(self.ids), True, -1)

    def _put(self, tok: int, image, pos: int, lo: int, hide: bool, qcell: int) -> None:
        self.ids.append(tok)
        self.images.append(image)
        self.pos.append(pos)
        self.lo.append(lo)
        self.blocks.append(0)  # generated positions are causal
        self.hide.append(hide)
        self.qcell.append(qcell)

    def unconditional(self) -> _Stream:
        """A copy that, from the next position on, sees only [bos] and what follows: the CFG branch."""
        return _Stream(list(self.ids), list(self.images), list(self.pos), list(self.lo), self.bos,
                       start=len(self.ids), next_pos=1, blocks=list(self.blocks), src=self,
                       hide=list(self.hide), qcell=list(self.qcell), image_base=self.image_base)

    def shift(self, n: int, pad_id: int) -> None:
        """n > 0: put n padding positions in front (each sees only itself); n < 0: drop -n of them."""
        if n > 0:
            self.ids[:0] = [pad_id] * n
            self.images[:0] = [None] * n
            self.pos[:0] = [0] * n
            self.blocks[:0] = [0] * n
            self.hide[:0] = [False] * n
            self.qcell[:0] = [-1] * n
            self.lo = list(range(n)) + [x + n for x in self.lo]
        else:
            m = -n
            assert self.bos >= m, "only padding can be dropped"
            del self.ids[:m], self.images[:m], self.pos[:m], self.blocks[:m], self.hide[:m], self.qcell[:m]
            self.lo = [x - m for x in self.lo[m:]]
        self.bos += n
        self.start += n


@dataclass
class _Row:
    index: int  # the `row` the events hear: the prompt's index in a generate() call
    seed: int
    gen: torch.Generator
    budget: int  # generated positions allowed
    cond: _Stream
    cfg: GenerationConfig  # this row's sampling settings
    mode: str
    events: GenerationEvents
    banned: torch.Tensor  # text ids this row never samples
    settings: dict  # recorded in the result
    uncond: _Stream | None = None
    image_only: _Stream | None = None  # image-guided CFG: the context's last picture, no text
    reference: torch.Tensor | None = None  # model.image_reference: the context's last picture (N, d) while drawing
    feed: list = field(default_factory=list)  # items waiting to be fed, oldest first
    drawing: bool = False
    n_new: int = 0
    n_images: int = 0
    ids: list[int] = field(default_factory=list)
    text_ids: list[int] = field(default_factory=list)  # the text segment being written
    streamed: str = ""
    current: list = field(default_factory=list)  # image tokens of the image being drawn
    segments: list = field(default_factory=list)
    image_tokens: list = field(default_factory=list)
    last: int = -1
    run: int = 0
    finish: str | None = None
    spec: list[int] | None = None  # parallel image decoding: the group schedule (None: one token a pass)
    plan: list[int] = field(default_factory=list)  # group sizes of the image being drawn, still to come
    order: list[int] = field(default_factory=list)  # its cells in drawing order (config.draw_order)
    committed: int = 0  # its tokens fed back so far

    @property
    def use_cfg(self) -> bool:
        guided = self.cfg.cfg_scale != 1.0 or self.cfg.image_cfg_scale not in (None, 1.0)
        return guided and self.mode != "text"

    @property
    def stream_text(self) -> bool:  # decode text as it comes only if someone listens
        return type(self.events).text is not GenerationEvents.text

    def result(self) -> GenerationResult:
        return GenerationResult(segments=self.segments, settings=self.settings, finish_reason=self.finish or "eos",
                                ids=self.ids, image_tokens=self.image_tokens)


@dataclass
class _Group:
    """Streams that run in one forward call and share one KV cache."""

    streams: list[_Stream] = field(default_factory=list)
    cache: Any = None
    state: Any = None  # _StepState of the last one-position forward, reused while streams continue


@dataclass
class _StepState:
    """Device-side inputs of a one-position forward (every stream feeds one position), kept between
    steps so that an image-token step makes no tensor from host data and reads nothing back.

    `host` mirrors what the device tensors hold, per stream (token id, is image, position id, lo,
    bos, cell): the sampler compares it with what the streams' lists say the next position is.
    When every stream continues as predicted (same streams, T + 1, position + 1, cell + 1 of the same
    image), the tensors advance in place (`advance`); otherwise (a row starts or ends an image,
    joins, leaves, writes text, or padding moves) they are rebuilt from the lists, once.
    """

    key: tuple  # (id of each stream, T): what the tensors describe
    host: list[tuple[int, bool, int, int, int, int]]
    ids: torch.Tensor  # (S, 1) token id fed
    pos: torch.Tensor  # (S, 1) position id
    is_img: torch.Tensor  # (S, 1) bool: an image position (embedded from its continuous token)
    cells: torch.Tensor  # (S, 1) the image position's cell (0 elsewhere)
    lo: torch.Tensor  # (S, 1, 1) the new position sees keys [lo, itself] and bos
    bos: torch.Tensor  # (S, 1, 1)
    write: torch.Tensor  # (1,) cache index of the position fed (T - 1)
    keys: torch.Tensor  # (K,) key indices 0..K-1 (K = T, or the static capacity)

    @staticmethod
    def predict(h: tuple[int, bool, int, int, int, int]) -> tuple[int, bool, int, int, int, int]:
        tok, img, pos, lo, bos, cell = h
        return tok, img, pos + 1, lo, bos, cell + 1 if img else 0

    def advance(self, T: int, stream_ids: tuple) -> None:
        """One more position of the same image for every stream: in place, no host data."""
        self.pos.add_(1)
        self.cells.add_(self.is_img.long())
        self.write.add_(1)
        self.key = (stream_ids, T)
        self.host = [self.predict(h) for h in self.host]
