"""The interleaved sampler behind `omni.inference.generate` (generate, chat, eval, serve).

Every row of a batch continues one document:

    [bos] prompt ... | text ... <boi> x1 ... xN <eoi> text ... [eos]

A row is either in text mode (the LM head picks the next token) or in image mode (the diffusion
head draws the next continuous token from the hidden state one position before it). Sampling
<boi> switches a row to image mode; after N tokens <eoi> is forced and text resumes. Rows switch
independently, so one batch can hold rows writing text beside rows drawing.

Streams. The model sees "streams" (batch rows of a forward pass), not answer rows: each answer row
has a conditional stream and, while it draws under classifier-free guidance, an unconditional one.
The unconditional stream is a copy of the conditional one taken when <boi> is sampled (Orthus
starts its unconditional branch there too). Its mask hides everything before that <boi> except
[bos], and its positions restart at 1, so it computes exactly what a separate pass over
`[bos] <boi> x1 ...` would: the condition the model was trained on when the caption was dropped.
Both streams share one batch and one KV cache; streams join and leave by indexing the cache's
batch dimension, so CFG costs extra rows only while a row is drawing, never a second pass.

Image-guided CFG (edits, InstructPix2Pix; generation.image_cfg_scale set). A third stream sees
the last picture of the row's context (the one being edited) and none of its text:
`[bos] <boi> src <eoi> <boi> x1 ...`, positions contiguous, exactly an edit document with its
instruction dropped (omni.data.loader.edit_condition, "text"; a dropped document keeps one round,
so in a second round the source is the first round's result). It is a new stream, not a copy: the
picture's keys in the conditional cache saw the text before it (a chat history, a first round),
so it is prefilled from its own items when the row starts an image (one extra prefill of one
picture per drawn image), then merged into the batch like a joining row. The head combines the
three predictions u + s_img (i - u) + s (c - i) (omni.heads.diffusion.guide). A context without
pictures has i = u, so such rows keep two streams and plain CFG whatever image_cfg_scale says.

The previous picture as a reference (model.image_reference). A row that starts an image takes
the tokens of the last picture in its context (an edit's source, a story's last frame; what
`layout.reference_table` points at in training) and adds the projection of the one at the cell it
draws next to the conditional and image-only streams' conditioning vectors; the unconditional
stream, which sees no picture, gets none. The fused image step takes them as a third static input.

Prompts of different lengths share a batch through left padding, explicit position ids and an
additive 4D mask (built here, so the cached and the recomputed paths use the same one). Every row
has its own torch.Generator for text sampling and diffusion noise, so a row's result does not
depend on the rest of the batch.

Continuous batching (omni serve). Rows join and leave between steps: `add` queues a row with
its own prompt, settings, mode, seed and events; `step` prefills the rows queued since the last
step together (left-padded among themselves), then merges them into the running batch: whichever
side is shorter gets left padding, in its streams and its KV cache, and padding is masked the way
prompt padding always was (it sits before `bos` and `lo`). Rows that finish or are cancelled
leave through the same cache gather that CFG rows use, and the padding every remaining stream
shares is trimmed, so the batch is as long as its longest live row, not as old as the server.
Settings are per row: text sampling reads the row's own temperature / top-k / top-p and banned
ids, and the diffusion head runs once per distinct (cfg scale, steps, temperature, sampler) among
the rows drawing in that step. Only use_cache and cfg_batching belong to the whole sampler.

Decode steps without host traffic. A step that feeds one position per stream (every step after
a prefill) takes its inputs from the group's `_StepState`: ids, position ids, cells and mask
inputs as device tensors, advanced in place while every stream continues as predicted (an image
being drawn), so an image-token step makes no tensor from Python data and reads nothing back;
they are rebuilt from the streams' lists only when rows start or end something (prefill, <boi>,
the first image token, text tokens, joins, leaves, trims). Text rows' sampled ids are read back
once per step for the whole batch. The cache grows in place into spare room (`GrowingKV` in
omni/models/kv_cache.py); `generation.static_cache` swaps it for a preallocated one of fixed
capacity, written in place at a device index (the mask then spans that capacity); with
`generation.cuda_graphs` on top, a steady image-token step of the whole batch (embed, backbone,
the head's loop under CFG) runs as one unit, replayed from a CUDA graph on CUDA
(omni/inference/image_step.py). Every variant gives the same tokens (tests/test_decode_step.py).

Parallel image decoding (model.parallel_image; docs/parallel.md). A model trained with position
queries draws a group of image tokens per pass: a drawing row feeds the tokens it committed last
(or <boi>) and then one query per token of its next group; the head draws the group at once from
the queries' hidden states. Queries, and the padding that evens out the streams when rows feed
different numbers of positions in a step, are hidden from every later position (`_Stream.hide`),
so the committed positions compute what they would without them (`layout.with_queries` is the
same rule in training). They stay in the cache as hidden entries; steps then feed several
positions per stream, built from the lists (no one-position fast path, no static cache).

Shape legend: S streams in a forward, Q positions fed, T positions in total (cached + fed),
D backbone width, V vocabulary, d image-token dim, N image tokens per image.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from omni.config import GenerationConfig, draw_order, group_sizes, parse_groups, steps_for_token
from omni.inference.image_step import ImageStep
from omni.inference.prompts import Item, Prompt, context_length, encode_prompts
from omni.inference.rows import GenerationEvents, _Group, _Row, _StepState, _Stream
from omni.layout import group_index
from omni.models.attention import additive_mask, see_own_block
from omni.models.kv_cache import KVOps, StaticKV, round_capacity
from omni.models.model import image_cells, image_cells_from_positions
from omni.tokenizers.base import to_pil


class Sampler:
    """The decode loop, as a batch that rows join and leave between steps.

    `add` queues a row with its own prompt, settings, seed and events; `step` prefills the rows
    that joined since the last step (together, left-padded among themselves), merges them into
    the running batch, samples one position for every row and returns the rows that finished.
    `run` is the offline use: add every prompt, step until all are done.

    use_cache=False recomputes every position at every step (the reference the cache is tested
    against); cfg.static_cache preallocates the cache, cfg.cuda_graphs with it fuses (and on CUDA
    graphs) the image-token step; cfg_batching=False runs the unconditional streams as a second forward pass and a
    second diffusion-head call per step (the baseline the one-batch design is measured against).
    """

    def __init__(self, model, cfg: GenerationConfig | None = None, mode: str | None = None,
                 seeds: Sequence[int] | None = None, events: GenerationEvents | None = None,
                 cfg_batching: bool = True):
        self.model = model
        self.cfg = cfg or GenerationConfig()  # defaults of `add` and `run`
        self.mode = mode or self.cfg.mode
        self.seeds = list(seeds) if seeds is not None else None
        self.events = events or GenerationEvents()
        self.use_cache = self.cfg.use_cache  # one batch, one cache: every row follows the sampler's choice
        self.static = self.use_cache and self.cfg.static_cache  # a preallocated cache (models/kv_cache.py)
        self.kv = KVOps(model.backbone.config, self.static)
        self.cfg_batching = cfg_batching
        self.sp = model.special
        self.bidirectional = model.cfg.prompt_image_attention == "bidirectional"
        self.n_tokens = model.image_tokenizer.num_tokens
        self.device = model.device
        if model.image_ref is not None:  # the reference of a row whose context holds no picture
            self.zero_token = torch.zeros(model.image_tokenizer.token_dim, device=self.device)
        self.ctx = context_length(model)
        self.groups = [_Group()] + ([] if cfg_batching else [_Group()])
        self.live: list[_Row] = []  # rows in the batch
        self.joining: list[_Row] = []  # rows added since the last step
        self.cached = 0  # positions of every stream already in the caches
        self.joined: list[_Row] = []  # live rows and the joiners being prefilled (static capacity)
        if getattr(model, "_image_step_graphs", None) is None:  # shared by every sampler of this model
            model._image_step_graphs = OrderedDict()
        self.image_step = ImageStep(self._step_compute, model._image_step_graphs)  # fused (graphed on CUDA) step
        self.new_image_only: list[_Row] = []  # rows whose image-only stream waits for its prefill
        self.parallel = model.groups is not None  # drawn with position queries, a group per pass
        if self.parallel and self.static:
            raise ValueError("generation.static_cache does not support a model trained with model.parallel_image "
                             "(its steps feed a varying number of positions); set generation.static_cache=false")

    # -- rows join -----------------------------------------------------------------------------
    def add(self, prompt: Prompt, cfg: GenerationConfig | None = None, mode: str | None = None, seed: int = 0,
            events: GenerationEvents | None = None, index: int = 0) -> _Row:
        """Queue one prompt; it joins the batch at the next `step`. The row is returned as a handle."""
        return self._row(encode_prompts(self.model, [prompt])[0], cfg or self.cfg, mode or self.mode, seed,
                         events or self.events, index)

    def _row(self, items: list[Item], cfg: GenerationConfig, mode: str, seed: int, events: GenerationEvents,
             index: int) -> _Row:
        need = self.n_tokens + 2 if mode == "image" else 1
        if len(items) + need > self.ctx:
            raise ValueError(
                f"prompt {index} takes {len(items)} positions and needs {need} more to answer, but the "
                f"context holds {self.ctx}: {len(items) + need - self.ctx} too many; shorten the prompt"
            )
        stream = self._stream(items)
        budget = min(cfg.max_new_tokens, self.ctx - len(items))
        if mode == "image":
            budget = max(budget, need)  # image mode always draws its one image
        banned = {self.sp.img, self.sp.eoi, self.sp.bos} | ({self.sp.pad} - {self.sp.eos})
        if mode == "text":
            banned.add(self.sp.boi)
        row = _Row(index=index, seed=int(seed), gen=torch.Generator(device=self.device).manual_seed(int(seed)),
                   budget=budget, cond=stream, cfg=cfg, mode=mode, events=events,
                   banned=torch.tensor(sorted(banned), device=self.device), settings=self._settings(cfg, mode, seed),
                   spec=self._groups(cfg))
        self.joining.append(row)
        return row

    def _groups(self, cfg: GenerationConfig) -> list[int] | None:
        """A row's group schedule: generation.parallel_image, else the one the model was trained with."""
        if cfg.parallel_image is None:
            return self.model.groups
        spec = parse_groups(cfg.parallel_image, "generation.parallel_image")
        if (spec is None) != (self.model.groups is None):
            trained = self.model.cfg.parallel_image
            raise ValueError(f"generation.parallel_image={cfg.parallel_image!r} does not fit this model, trained with "
                             f"model.parallel_image={trained!r}: a model draws with position queries only if it was "
                             "trained with them; leave generation.parallel_image unset"
                             + ("" if spec is None else " or retrain with model.parallel_image"))
        return spec

    def _stream(self, items: list[Item]) -> _Stream:
        """A fresh stream over `items` (starting with [bos]), positions 0.. and causal."""
        images = [x for _, x in items]
        blocks = [0] * len(items)
        if self.bidirectional:  # number the runs of prompt image positions, as in training
            for j in range(1, len(items)):
                if images[j] is not None:
                    blocks[j] = blocks[j - 1] or max(blocks) + 1
        return _Stream([t for t, _ in items], images, list(range(len(items))), [0] * len(items), bos=0, start=0,
                       next_pos=len(items), blocks=blocks)

    def _last_picture(self, cond: _Stream) -> list[Item] | None:
        """The last picture of a stream's context as items (<boi> x1..xN <eoi>, raster order); None
        when the context holds none."""
        ids = cond.ids
        ends = [j for j in range(cond.bos + 1, len(ids)) if ids[j] == self.sp.eoi]
        if not ends:
            return None
        start = max(j for j in range(cond.bos + 1, ends[-1]) if ids[j] == self.sp.boi)
        tokens = sorted((cond.pos[j], j) for j in range(start + 1, ends[-1]) if not cond.hide[j])  # raster order
        return [(ids[start], None), *[(ids[j], cond.images[j]) for _, j in tokens], (self.sp.eoi, None)]

    def _image_only(self, cond: _Stream) -> _Stream | None:
        """The image-only stream of a row about to draw: [bos] and the last picture of its context
        (<boi> x1..xN <eoi>), no text; None when the context holds no picture (then i = u)."""
        picture = self._last_picture(cond)
        return None if picture is None else self._stream([(self.sp.bos, None), *picture])

    def _reference(self, cond: _Stream) -> torch.Tensor | None:
        """model.image_reference: the tokens (N, d) of the picture before the one a row starts (the
        previous image of its document, as `layout.reference_table` takes it in training); None
        when there is none or it has another size."""
        picture = self._last_picture(cond)
        if picture is None or len(picture) - 2 != self.n_tokens:
            return None
        return torch.stack([x for _, x in picture[1:-1]]).to(self.device)  # (N, d)

    def _references(self, rows: list[_Row]) -> torch.Tensor:
        """Each drawing row's reference token for the cell it draws next (n, d); zeros for none."""
        return torch.stack([r.reference[len(r.current)] if r.reference is not None else self.zero_token
                            for r in rows])

    def _prefill_image_only(self, rows: list[_Row]) -> None:
        """Prefill the new image-only streams of `rows` together and merge them into the batch
        (left-padded to its length, as joining rows are); <boi> is fed to them with the others."""
        group = _Group(self._left_pad([r.image_only for r in rows]))
        self._forward(group, 0)
        self._merge(group)

    def _rows(self, encoded: list[list[Item]]) -> list[_Row]:
        """Rows of `encoded` prompts with the sampler's settings, left-padded to one width."""
        seeds = self.seeds or [self.cfg.seed + i for i in range(len(encoded))]
        rows = [self._row(items, self.cfg, self.mode, seeds[i], self.events, i) for i, items in enumerate(encoded)]
        self._left_pad([r.cond for r in rows])
        return rows

    def _left_pad(self, streams: list[_Stream]) -> list[_Stream]:
        """Left-pad `streams` in place to one length (padding sees only itself), for one forward."""
        width = max(len(s.ids) for s in streams)
        for s in streams:
            s.shift(width - len(s.ids), self.sp.pad)
        return streams

    def _merge(self, group: _Group) -> None:
        """Bring a prefilled group of joiners into the batch: the shorter side gets left padding
        (its keys are masked: padding sits before `bos` and `lo`) so every stream has one length."""
        T = len(self.live[0].cond.ids) if self.live else 0
        L = len(group.streams[0].ids)
        if T < L:
            for grp in self.groups:
                for s in grp.streams:
                    s.shift(L - T, self.sp.pad)
                grp.cache = self.kv.pad_front(grp.cache, L - T, T)
        elif L < T:
            for s in group.streams:
                s.shift(T - L, self.sp.pad)
            group.cache = self.kv.pad_front(group.cache, T - L, L)
        main = self.groups[0]
        if main.cache is not None and group.cache is not None:
            if self.static:  # one capacity for the rows of both
                cap = max(main.cache.capacity, group.cache.capacity)
                main.cache, group.cache = self.kv.fit(main.cache, cap), self.kv.fit(group.cache, cap)
            main.cache = self.kv.concat(main.cache, group.cache)
        elif not main.streams:
            main.cache = group.cache
        main.streams = main.streams + group.streams

    def _capacity(self, rows: list[_Row]) -> int:
        """Static cache positions that hold every row of `rows` to the end of its budget, so the
        cache never grows inside a row (a graph replays on the same tensors)."""
        T = max(len(r.cond.ids) for r in rows)
        return round_capacity(T + max(r.budget - r.n_new for r in rows) + 4)  # + forced <boi>/<eoi>

    def _trim(self) -> None:
        """Drop the left padding every stream shares (it grows as rows join a long-running batch)."""
        streams = [s for grp in self.groups for s in grp.streams]
        m = min(s.bos for s in streams)
        if m < 16:  # not worth a copy of the cache
            return
        for s in streams:
            s.shift(-m, self.sp.pad)
        for grp in self.groups:
            if grp.cache is not None:
                grp.cache = self.kv.drop_front(grp.cache, m, self.cached)
        self.cached -= m

    # -- the model -----------------------------------------------------------------------------
    def _forward(self, group: _Group, start: int) -> torch.Tensor:
        """Feed positions [start, T) of every stream of `group`; their hidden states (S, Q, D).

        A cached step feeding one position per stream (every decode step) takes its inputs from
        the group's device-side `_StepState` (`_step_inputs`); prefill, recompute and the first
        step after rows change build them from the streams' lists (`_list_inputs`), as does every
        step of parallel decoding."""
        T = len(group.streams[0].ids)
        if self.use_cache and group.cache is not None and T - start == 1 and not self.parallel:
            embeds, pos, bias = self._step_inputs(group, T)
        else:
            group.state = None
            embeds, pos, bias = self._list_inputs(group, start, T)
        cache = None
        if self.use_cache:  # a prefill starts an empty growing cache (a static one is made sized, above)
            cache = group.cache if group.cache is not None else self.kv.empty()
        hidden, cache = self.model.decoder(embeds, attention_mask=bias, position_ids=pos, cache=cache,
                                           use_cache=self.use_cache)
        group.cache = cache if self.use_cache else None
        return hidden  # (S, Q, D)

    def _list_inputs(self, group: _Group, start: int, T: int) -> tuple[torch.Tensor, ...]:
        """Embeddings (S, Q, D), position ids (S, Q) and mask (S, 1, Q, K) from the streams' lists."""
        streams = group.streams
        dev = self.device
        ids = torch.tensor([s.ids[start:] for s in streams], device=dev)  # (S, Q)
        pos = torch.tensor([s.pos[start:] for s in streams], device=dev)  # (S, Q)
        lo = torch.tensor([s.lo[start:] for s in streams], device=dev)  # (S, Q)
        bos = torch.tensor([s.bos for s in streams], device=dev)  # (S,)
        image_mask = torch.tensor([[x is not None for x in s.images[start:]] for s in streams], device=dev)
        tokens = [x for s in streams for x in s.images[start:] if x is not None]
        image_tokens = (torch.stack(tokens) if tokens
                        else torch.zeros(0, self.model.image_tokenizer.token_dim, device=dev))  # (M, d)
        hide = torch.tensor([s.hide for s in streams], device=dev) if self.parallel else None  # (S, T)
        cells = None
        if self.model.image_pos is not None:  # a cell counts from its image's start, maybe in the cache
            every = torch.tensor([s.ids for s in streams], device=dev)  # (S, T)
            if self.parallel:  # committed in drawing order: the cell from the position id (as in training)
                cells = image_cells_from_positions(every, torch.tensor([s.pos for s in streams], device=dev),
                                                   self.sp.boi, self.sp.img)[:, start:]
            else:
                cells = image_cells(every, self.sp.img)[:, start:]
        embeds = self.model.embed(ids, image_tokens, image_mask, cells)  # (S, Q, D)
        if self.parallel:
            embeds = self.model.embed_queries(embeds, torch.tensor([s.qcell[start:] for s in streams], device=dev))
        K = T
        if self.static:  # keys: the whole capacity; positions past T are stale and hidden by k <= q
            if group.cache is None:
                group.cache = StaticKV.empty(self.model.backbone.config, len(streams), self._capacity(self.joined),
                                             embeds.dtype, dev)
            group.cache.write = torch.arange(start, T, device=dev)  # (Q,)
            K = group.cache.capacity
        q = torch.arange(start, T, device=dev)[None, :, None]  # (1, Q, 1)
        k = torch.arange(K, device=dev)[None, None, :]  # (1, 1, K)
        allowed = (k <= q) & ((k >= lo[:, :, None]) | (k == bos[:, None, None]))  # (S, Q, K)
        if self.bidirectional:
            blocks = torch.tensor([s.blocks + [0] * (K - T) for s in streams], device=dev)  # (S, K)
            allowed = see_own_block(allowed, blocks[:, start:T], blocks)
        if hide is not None:  # queries and in-sequence padding: seen by nothing after them
            allowed = allowed & (~hide[:, None, :] | (k == q))
        return embeds, pos, additive_mask(allowed, embeds.dtype)  # ..., (S, 1, Q, K)

    # -- the one-position step from device state -------------------------------------------------
    # Host work here is list reads and comparisons; the device sees only in-place updates of the
    # state's tensors while every stream continues as predicted (an image being drawn), so an
    # image-token step makes no tensor from Python data and reads nothing back (test_decode_step).
    def _step_inputs(self, group: _Group, T: int) -> tuple[torch.Tensor, ...]:
        """Embeddings (S, 1, D), position ids (S, 1) and mask (S, 1, 1, K) of a one-position step."""
        st = self._advance(group, T)
        if st is None:  # a row started/ended something, joined or left, or wrote text: rebuild, once
            host = self._host_meta(group.streams, group.state)
            st = group.state = self._new_state(host, (tuple(id(s) for s in group.streams), T), T, group)
            if self.static:
                group.cache.write = st.write
        if not self.static and st.keys.shape[0] != T:  # a growing cache: keys 0..T-1 (a device fill)
            st.keys = torch.arange(T, device=self.device)
        embeds = self._embed_step(st, self._step_tokens(group.streams))
        return embeds, st.pos, self._step_mask(st, embeds.dtype)

    def _advance(self, group: _Group, T: int) -> _StepState | None:
        """The group's state moved one position on, in place, if every stream continues as the
        state predicts (same streams, T - 1 -> T, the next cell of the same image); else None."""
        st = group.state
        if st is None or st.key != (tuple(id(s) for s in group.streams), T - 1):
            return None
        if self.static and st.keys.shape[0] != group.cache.capacity:
            return None
        if self._host_meta(group.streams, st) != [st.predict(h) for h in st.host]:
            return None
        st.advance(T, st.key[0])
        if self.static:
            group.cache.write = st.write
        return st

    def _step_mask(self, st: _StepState, dtype: torch.dtype) -> torch.Tensor:
        """(S, 1, 1, K) additive mask of the fed position: keys [lo, itself] and bos; a static
        cache also hides its positions past the one written (k <= q), stale or never written."""
        allowed = (st.keys >= st.lo) | (st.keys == st.bos)  # (S, 1, K)
        if self.static:
            allowed = allowed & (st.keys <= st.write)
        return additive_mask(allowed, dtype)

    def _step_tokens(self, streams: list[_Stream]) -> torch.Tensor | None:
        """(S, d) the continuous token each stream feeds (zeros for text streams), None if none does."""
        tokens = [s.images[-1] for s in streams if s.images[-1] is not None]
        if not tokens:
            return None
        if len(tokens) < len(streams):
            zero = tokens[0].new_zeros(tokens[0].shape)
            tokens = [s.images[-1] if s.images[-1] is not None else zero for s in streams]
        return torch.stack(tokens)  # (S, d)

    def _host_meta(self, streams: list[_Stream], st: _StepState | None) -> list[tuple]:
        """Per stream, what its last position is: (token id, is image, position id, lo, bos, cell)."""
        img = self.sp.img
        prev = {} if st is None else dict(zip(st.key[0], st.host))
        out = []
        for s in streams:
            tok = s.ids[-1]
            cell = 0
            if tok == img:  # the cell counts the placeholders right before this one (image_cells)
                p = prev.get(id(s))
                if p is not None and p[1] and s.ids[-2] == img:
                    cell = p[5] + 1
                else:
                    j = len(s.ids) - 2
                    while j >= 0 and s.ids[j] == img:
                        j -= 1
                    cell = len(s.ids) - 2 - j
            out.append((tok, s.images[-1] is not None, s.pos[-1], s.lo[-1], s.bos, cell))
        return out

    def _new_state(self, host: list[tuple], key: tuple, T: int, group: _Group) -> _StepState:
        dev = self.device
        cols = list(zip(*host))
        K = group.cache.capacity if self.static else T
        return _StepState(
            key=key, host=host,
            ids=torch.tensor(cols[0], device=dev)[:, None], is_img=torch.tensor(cols[1], device=dev)[:, None],
            pos=torch.tensor(cols[2], device=dev)[:, None], cells=torch.tensor(cols[5], device=dev)[:, None],
            lo=torch.tensor(cols[3], device=dev)[:, None, None], bos=torch.tensor(cols[4], device=dev)[:, None, None],
            write=torch.tensor([T - 1], device=dev), keys=torch.arange(K, device=dev),
        )

    def _embed_step(self, st: _StepState, x: torch.Tensor | None) -> torch.Tensor:
        """`model.embed` of one position per stream, by selection instead of masked_scatter (which
        needs the number of image positions): x (S, d) the streams' tokens (`_step_tokens`)."""
        model = self.model
        emb = model.backbone.get_input_embeddings()(st.ids)  # (S, 1, D)
        if x is None:
            return emb
        img = model.in_proj(x.to(emb.device, torch.float32)).to(emb.dtype)  # (S, D)
        if model.image_pos is not None:
            img = img + model.image_pos(st.cells[:, 0]).to(emb.dtype)
        return torch.where(st.is_img[..., None], img[:, None], emb)  # (S, 1, D)

    # -- the fused image-token step (generation.cuda_graphs with static_cache) --------------------
    def _image_step(self) -> dict[int, torch.Tensor] | None:
        """The steady-state image-token step of every live row through `ImageStep` (embed,
        backbone, the head's loop under CFG; one CUDA graph replay on CUDA): row id -> its token
        (d,). None when this step is not one (then the ordinary path runs; see image_step.py)."""
        if not (self.static and self.cfg_batching and self.live):
            return None
        key = None
        for r in self.live:
            if not r.drawing or r.feed or not r.current or r.finish is not None or not r.cfg.cuda_graphs:
                return None
            if r.image_only is not None:
                return None  # image-guided rows (a third stream) draw on the ordinary path
            c = r.cfg
            k = (c.cfg_scale if r.use_cfg else 1.0, steps_for_token(c, len(r.current), self.n_tokens),
                 c.image_temperature, c.sampler, c.head_dtype)
            if key not in (None, k):
                return None  # rows with different head settings: one head call each, eagerly
            key = k
        group = self.groups[0]
        want = [r.cond for r in self.live] + ([r.uncond for r in self.live] if key[0] != 1.0 else [])
        if len(want) != len(group.streams) or any(a is not b for a, b in zip(want, group.streams)):
            return None
        T = len(want[0].ids)
        if self.cached != T - 1:
            return None
        st = self._advance(group, T)  # last: it moves the state on
        if st is None:
            return None
        scale, steps, temperature, sampler, dtype = key
        head = self.model.head
        run = head.sampling_run(steps, sampler, temperature, scale, self.device, True, getattr(torch, dtype))
        noise = head.sampling_noise(len(self.live), steps, sampler, temperature, [r.gen for r in self.live],
                                    self.device)  # (n, B, d), eagerly: each row's own generator
        refs = self._references(self.live) if self.model.image_ref is not None else None  # (B, d)
        x = self.image_step(key, st, group.cache, self._step_tokens(group.streams), noise, run, refs)  # (B, d)
        return {id(r): xi for r, xi in zip(self.live, x)}

    def _step_compute(self, st: _StepState, cache, tokens: torch.Tensor, noise: torch.Tensor, run,
                      refs: torch.Tensor | None = None) -> torch.Tensor:
        """The math of the fused step (what a graph captures): tokens (S, d) -> drawn tokens (B, d);
        `refs` (B, d): the conditional rows' reference tokens (model.image_reference)."""
        embeds = self._embed_step(st, tokens)  # (S, 1, D)
        hidden, _ = self.model.decoder(embeds, attention_mask=self._step_mask(st, embeds.dtype), position_ids=st.pos,
                                       cache=cache, use_cache=True)
        with torch.autocast(device_type=embeds.device.type, enabled=False):
            z = hidden[:, -1].float()  # (S, D) = [cond rows; uncond rows], as `sample` stacks it
            if refs is not None:  # the unconditional rows see no picture: no reference
                B = refs.shape[0]
                z = torch.cat([self.model.reference(z[:B], refs), z[B:]])
            return run(z, noise)

    def _regroup(self, groups: list[_Group], rows: list[_Row]) -> None:
        """Put the live streams in their groups; copy/drop cache rows to match (one gather per group)."""
        where = {id(s): (g, i) for g, grp in enumerate(groups) for i, s in enumerate(grp.streams)}
        conds = [r.cond for r in rows]
        unconds = [r.uncond for r in rows if r.uncond is not None]
        image_only = [r.image_only for r in rows if r.image_only is not None]
        wanted = [conds + unconds + image_only] if len(groups) == 1 else [conds, unconds + image_only]
        caches = []
        for g, (grp, streams) in enumerate(zip(groups, wanted)):
            src = [where[id(s.src if s.src is not None else s)] for s in streams]
            unchanged = src == [(g, i) for i in range(len(grp.streams))]
            if not self.use_cache or unchanged:
                caches.append(grp.cache)
            else:
                caches.append(self._gather(groups, src) if streams else None)
        for grp, streams, cache in zip(groups, wanted, caches):  # assign only after every gather read
            grp.streams, grp.cache = streams, cache
        for s in unconds:
            s.src = None

    def _gather(self, groups: list[_Group], src: list[tuple[int, int]]):
        """A new cache whose rows are the cache rows `src` = [(group, row), ...]."""
        offsets, n = [], 0
        for grp in groups:
            offsets.append(n)
            n += len(grp.streams)
        index = torch.tensor([offsets[g] + i for g, i in src], device=self.device)  # at row start/end only
        return self.kv.gather([grp.cache for grp in groups if grp.streams], index)

    # -- decisions -----------------------------------------------------------------------------
    def _pick(self, row: _Row, logits: torch.Tensor) -> torch.Tensor:
        """Next text token from logits (V,), a device scalar: greedy, or temperature / top-k / top-p
        sampling. `_decide` reads the tokens of all text rows back at once."""
        cfg = row.cfg
        logits = logits.float().index_fill(0, row.banned, float("-inf"))
        if cfg.temperature == 0:
            return logits.argmax()
        logits = logits / cfg.temperature
        if cfg.top_k > 0:
            kth = torch.topk(logits, min(cfg.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if cfg.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            probs = sorted_logits.softmax(-1)
            drop = probs.cumsum(-1) - probs > cfg.top_p  # keep the smallest set reaching top_p
            logits = logits.index_fill(0, order[drop], float("-inf"))
        return torch.multinomial(logits.softmax(-1), 1, generator=row.gen)[0]

    def _flush_text(self, row: _Row) -> None:
        if row.text_ids:
            text = self.model.tokenizer.decode(row.text_ids)
            if text:
                row.segments.append(text)
        row.text_ids, row.streamed = [], ""

    def _finish(self, row: _Row, reason: str) -> None:
        self._flush_text(row)
        row.finish = reason

    def _start_image(self, row: _Row) -> None:
        self._flush_text(row)
        row.drawing, row.current, row.committed = True, [], 0
        if row.spec is not None:  # parallel: group sizes, and the cells in drawing order
            row.plan = group_sizes(row.spec, self.n_tokens)
            row.order = draw_order(self.n_tokens, row.spec, self.model.order)
        row.n_new += 1
        if self.model.image_ref is not None:  # before <boi> joins the context
            row.reference = self._reference(row.cond)
        row.ids.append(self.sp.boi)
        row.feed.append((self.sp.boi, None))
        if row.use_cfg:
            row.uncond = row.cond.unconditional()
            if row.cfg.image_cfg_scale is not None:
                row.image_only = self._image_only(row.cond)
                if row.image_only is not None:
                    self.new_image_only.append(row)
        row.events.image_start(row.index, self.n_tokens)

    def _text_token(self, row: _Row, tok: int) -> None:
        cfg = row.cfg
        if tok == self.sp.eos:
            return self._finish(row, "eos")
        if tok == self.sp.boi:
            if row.n_images >= cfg.max_images:
                return self._finish(row, "max_images")
            if row.n_new + self.n_tokens + 2 > row.budget:
                return self._finish(row, "max_tokens")
            return self._start_image(row)
        row.n_new += 1
        row.ids.append(tok)
        row.text_ids.append(tok)
        row.run = row.run + 1 if tok == row.last else 1
        row.last = tok
        if row.stream_text:
            text = self.model.tokenizer.decode(row.text_ids)
            if text.startswith(row.streamed) and len(text) > len(row.streamed):
                row.events.text(row.index, text[len(row.streamed):])
                row.streamed = text
        if cfg.repetition_stop and row.run >= cfg.repetition_stop:
            return self._finish(row, "repetition")
        if row.n_new >= row.budget:
            return self._finish(row, "max_tokens")
        row.feed.append((tok, None))

    def _image_token(self, row: _Row, x: torch.Tensor) -> bool:
        """Record one image token; True when it completes the image."""
        row.current.append(x)
        row.ids.append(self.sp.img)
        row.n_new += 1
        row.events.image_token(row.index, len(row.current), self.n_tokens)
        if len(row.current) < self.n_tokens:
            row.feed.append((self.sp.img, x))
            return False
        drawn = torch.stack(row.current)  # (N, d) in drawing order
        if row.order:  # parallel: back to raster order for the picture (identity for the raster order)
            drawn = drawn[torch.tensor(row.order).argsort().to(drawn.device)]
        row.image_tokens.append(drawn)  # (N, d)
        row.n_images += 1
        row.drawing, row.current, row.uncond, row.image_only, row.reference = False, [], None, None, None
        if row.mode != "image":
            row.ids.append(self.sp.eoi)
            row.n_new += 1
            row.feed += [(self.sp.img, x), (self.sp.eoi, None)]  # <eoi> is forced, never sampled
        return True

    def _decide(self, ready: list[_Row], hidden: dict[int, torch.Tensor],
                drawn: dict[int, torch.Tensor] | None = None) -> None:
        """Sample the next text or image token of every row that has nothing left to feed
        (`drawn`: the tokens the fused image step already drew, by row id)."""
        model = self.model
        for r in ready:
            if r.mode == "image" and not r.drawing:
                self._start_image(r)  # image mode: <boi> is forced right after the prompt
        texts = [r for r in ready if not r.drawing]
        if texts:
            logits = model.lm_head(torch.stack([hidden[id(r.cond)] for r in texts]))  # (b, V)
            picked = torch.stack([self._pick(r, lg) for r, lg in zip(texts, logits)]).tolist()  # one read per step
            for r, tok in zip(texts, picked):
                self._text_token(r, tok)
        drawing = [r for r in ready if r.drawing and not r.feed]
        # One diffusion-head call per distinct image setting; a row's noise comes from its own generator.
        # The step count is the row's own (its schedule at its token index), so a row's samples never
        # depend on the other rows in the batch.
        by_setting: dict[tuple, list[_Row]] = {}
        for r in drawing:
            c = r.cfg
            steps = steps_for_token(c, len(r.current), self.n_tokens)
            image_scale = c.image_cfg_scale if r.image_only is not None else None
            key = (c.cfg_scale if r.use_cfg else 1.0, image_scale, steps, c.image_temperature, c.sampler,
                   c.cuda_graphs, c.head_dtype)
            by_setting.setdefault(key, []).append(r)
        def tokens_of(stream) -> torch.Tensor:
            """A stream's conditioning vectors (n, D): its last position's (n = 1) or, drawing in
            parallel, its queries' (n = k); one generator entry per token drawn, in order."""
            h = hidden[id(stream)]
            return h if h.dim() == 2 else h[None]

        done = []
        for (scale, image_scale, steps, temperature, sampler, graphs, dtype), rows in by_setting.items():
            if drawn is not None:
                done += [r for r in rows if self._image_token(r, drawn[id(r)])]
                continue
            conds = [tokens_of(r.cond) for r in rows]
            cond = torch.cat(conds)  # (n, D)
            counts = [c.shape[0] for c in conds]
            guided = scale != 1.0 or image_scale is not None
            uncond = torch.cat([tokens_of(r.uncond) for r in rows]) if guided else None
            image = torch.cat([tokens_of(r.image_only) for r in rows]) if image_scale is not None else None
            if model.image_ref is not None:  # the conditional and image-only streams see the source; u does not
                refs = self._references(rows)  # (n, d): one token a pass
                cond = model.reference(cond, refs)
                if image is not None:
                    image = model.reference(image, refs)
            gens = [r.gen for r, n in zip(rows, counts) for _ in range(n)]
            groups = None
            if model.head.cfg.group_attention:  # a row's group is denoised together, as in training
                groups = tuple(t.to(self.device) for t in group_index(counts))
            x = model.head.sample(cond, uncond, cfg_scale=scale, steps=steps, temperature=temperature,
                                  sampler=sampler, generator=gens, cuda_graph=graphs,
                                  cfg_batching=self.cfg_batching, dtype=getattr(torch, dtype),
                                  image_cond=image, image_cfg_scale=image_scale, groups=groups)  # (n, d)
            for r, xs in zip(rows, x.split(counts)):
                completed = [self._image_token(r, xi) for xi in xs]  # only a group's last can complete
                if completed[-1]:
                    done.append(r)
        if done:
            pixels = model.image_tokenizer.decode(torch.stack([r.image_tokens[-1] for r in done]))  # (k, C, H, W)
            for r, im in zip(done, to_pil(pixels)):
                r.segments.append(im)
                r.events.image_done(r.index, im)
                if r.mode == "image":
                    self._finish(r, "eos")

    # -- loop ----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[_Row]:
        """One decode step of every row (joiners are prefilled first); the rows that finished."""
        hidden, drawn = {}, None
        if self.live:
            drawn = self._image_step()
        if self.live and drawn is None:
            for grp in self.groups:
                if grp.streams:
                    h = self._forward(grp, self.cached if self.use_cache else 0)  # (S, Q, D)
                    for s, hs in zip(grp.streams, h):  # the queries' states, or the last position's
                        hidden[id(s)] = hs[-s.n_queries:] if s.n_queries else hs[-1]
        if self.joining:
            joiners, self.joining = self.joining, []
            group = _Group(self._left_pad([r.cond for r in joiners]))
            self.joined = self.live + joiners  # the rows a static cache must hold (_capacity)
            hidden.update({id(r.cond): h[-1] for r, h in zip(joiners, self._forward(group, 0))})
            self._merge(group)
            self.live += joiners
            if self.static:  # after the merge's padding: room for every row's whole budget
                for grp in self.groups:
                    grp.cache = self.kv.fit(grp.cache, self._capacity(self.live))
        if not self.live:
            return []
        self.cached = len(self.live[0].cond.ids)
        stop: dict[int, bool] = {}  # poll each events object once: one shared by a generate() call stops it all
        for r in self.live:
            if id(r.events) not in stop:
                stop[id(r.events)] = r.events.should_stop()
            if stop[id(r.events)]:
                self._finish(r, "cancelled")
        self._decide([r for r in self.live if r.finish is None and not r.feed], hidden, drawn)
        finished = [r for r in self.live if r.finish is not None]
        self.live = [r for r in self.live if r.finish is None]
        if not self.live:
            self.groups = [_Group() for _ in self.groups]
            self.cached = 0
            self.new_image_only = []
            return finished
        fresh = [r for r in self.new_image_only if r.finish is None and r.image_only is not None]
        self.new_image_only = []
        if fresh:
            self._prefill_image_only(fresh)
        self._regroup(self.groups, self.live)
        if self.parallel:
            self._feed_groups()
        else:
            for r in self.live:
                tok, x = r.feed.pop(0)
                for s in (r.cond, r.uncond, r.image_only):
                    if s is not None:
                        s.append(tok, x)
        self._trim()
        return finished

    def _feed_groups(self) -> None:
        """Parallel decoding: every row appends all it has to feed and, while drawing, the queries
        of its next group; streams feeding fewer positions get hidden padding first, so all streams
        keep one length and each one's last positions are its own (its queries, or its last token)."""
        plans = []
        for r in self.live:
            items, r.feed = r.feed, []
            cells = []  # each committed image token's cell, in the order the row drew them
            for tok, _ in items:
                if tok == self.sp.img:
                    cells.append(r.order[r.committed])
                    r.committed += 1
                else:
                    cells.append(None)
            k = r.plan.pop(0) if r.drawing and r.plan else 0
            queries = r.order[len(r.current):len(r.current) + k]
            plans.append((r, items, cells, queries))
        width = max(len(items) + len(queries) for _, items, _, queries in plans)
        for r, items, cells, queries in plans:
            for s in (r.cond, r.uncond, r.image_only):
                if s is None:
                    continue
                for _ in range(width - len(items) - len(queries)):
                    s.append_pad(self.sp.pad)
                for (tok, x), cell in zip(items, cells):
                    if cell is None:
                        s.append(tok, x)
                        if tok == self.sp.boi:
                            s.image_base = s.next_pos  # the position id of the image's cell 0
                    else:  # a committed image token at its raster position (drawing order may differ)
                        s.append_at(tok, x, s.image_base + cell)
                for cell in queries:
                    s.append_query(cell, s.image_base + cell, self.sp.pad)
                s.n_queries = len(queries)

    @torch.no_grad()
    def run(self, prompts: Sequence[Prompt], progress: bool = False) -> list[_Row]:
        """Generate for every prompt with the sampler's settings: the offline path (generate())."""
        rows = self._rows(encode_prompts(self.model, prompts))
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=max(r.budget for r in rows), desc="generate", unit="tok", leave=False)
        while self.live or self.joining:
            self.step()
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        return rows

    def _settings(self, cfg: GenerationConfig, mode: str, seed: int) -> dict:
        return {
            "sampler": cfg.sampler,
            "image_steps": cfg.image_steps,
            "image_steps_schedule": cfg.image_steps_schedule,
            "head_dtype": cfg.head_dtype,
            "cfg_scale": cfg.cfg_scale,
            "image_cfg_scale": cfg.image_cfg_scale,
            "temperature": cfg.temperature,
            "image_temperature": cfg.image_temperature,
            "top_k": cfg.top_k,
            "top_p": cfg.top_p,
            "seed": int(seed),
            "mode": mode,
            "max_new_tokens": cfg.max_new_tokens,
            "max_images": cfg.max_images,
            "repetition_stop": cfg.repetition_stop,
            "use_cache": self.use_cache,
            # the schedule drawn with: the request's, else the model's own (the first of its alternatives)
            "parallel_image": (cfg.parallel_image if cfg.parallel_image is not None
                               else self.model.cfg.parallel_image.split("|")[0]),
            "checkpoint": getattr(self.model, "checkpoint_path", None),
        }
