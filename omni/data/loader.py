"""The training data stream: shards -> documents -> tokens -> packed `Batch`es, resumable exactly.

Per (rank, worker) the pipeline is

    SampleStream per task (shards of this worker, shuffle buffer)      omni.data.shards
      -> decode + check (bad samples skipped and counted)
      -> task mixing: draw a task by data.task_weights, take that task's next document
      -> template: loss flags (omni.data.templates); CFG drop of t2i captions and of edit
         instructions / source images (`edit_condition`)
      -> tokenize (text tokenizer, image tokenizer), cut over-long documents at an image boundary
      -> pack: first fit into `batch_size` rows of `seq_len`; a document that fits no row closes
         the batch and opens the next one, or (data.pack_lookahead = N) waits for the next batch
         while up to N more documents are tried in the gaps, and the batch closes at the N+1-th
         that fits nowhere; the waiting documents open the next batch, in the order they came
      -> omni.layout.layout -> Batch

Exact resume. Every random choice is a function of saved state: the stream positions (epoch,
samples yielded), the mixer's PCG64 state, and per-document hashes of (seed, rank, worker,
task, epoch, position) for CFG drops. Packing consumes documents in order, so the state after a
batch is the state just before pulling the document that opened the next batch; each batch
carries that state from its worker. With a lookahead it is the state just before the first
waiting document was pulled, plus which of the documents pulled since went into the batch
(`skip`, counted from there): a restore pulls them again (with their skip counts) and drops them.
With W workers the DataLoader delivers batches round-robin, worker 0, 1, ..., W-1, 0, ...; the
main process keeps the state of each worker's last delivered batch and which worker is next. A restore starts each worker from its saved state and rotates
the worker numbering so the worker that was next delivers first. "Exact" covers the batches
(every tensor) and the skip counters, given the same shards, config (seq_len, batch_size,
num_workers, weights, seed), rank and world size; it costs replaying (without decoding images)
up to one epoch of tar bytes per task stream.

Weights: with `data.task_weights` empty the documents come in their natural mix; otherwise each
task with a positive weight is its own stream over the same shards (filtering by meta["task"])
and tasks are drawn with those probabilities, so the mix in batches is the weights regardless
of how many documents of each task the shards hold (tasks not named are not used).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import logging
import multiprocessing
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from omni.config import DataConfig
from omni.data import templates as T
from omni.data.document import BadSample, Document, Stats, decode_document
from omni.data.shards import SampleStream, SharedShards, expand_shards, read_documents, select_task
from omni.layout import Batch, ImageSegment, SpecialIds, TextSegment, TokenizedDoc, doc_length, layout

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # a tokenizer thread pool must not meet a fork
log = logging.getLogger("omni.data")
ALL = "*"  # the stream name when no task weights are given
STATE_VERSION = 1


def _uniform(*parts: Any) -> float:
    """A reproducible U[0, 1) from any values: randomness that needs no saved state."""
    h = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64


# --------------------------------------------------------------------------------------------
# Document -> tokens
# --------------------------------------------------------------------------------------------


class PendingImage(ImageSegment):
    """An image segment whose tokens are computed later, for a whole batch in one call.

    `tokens` is an (N, 0) placeholder so `doc_length` and cutting work before encoding.
    """

    def __init__(self, image: Image.Image, n_tokens: int, loss: bool, predict_boi: bool = True):
        super().__init__(torch.empty((n_tokens, 0)), loss, predict_boi)
        self.image = image


EDIT_DROPS = ("text", "both")  # the dropped forms of an edit document (`edit_condition`)


def edit_condition(doc: Document, drop: str | None) -> tuple[list, list[bool], list[bool]]:
    """An edit document's segments, loss flags and <boi>-predicted flags under image-guided
    classifier-free guidance (InstructPix2Pix): `drop` None keeps the document whole; "text" drops
    the instruction and "both" drops the instruction and the source image (data.edit_drop_text,
    data.edit_drop_both). A dropped document keeps only its first round. Laid out:

        kept:     [bos] <boi> src <eoi> instruction <boi> edited <eoi> [eos]   (the template's flags)
        "text":   [bos] <boi> src <eoi> <boi> edited <eoi> [eos]
        "both":   [bos] <boi> edited <eoi> [eos]

    the positions, ids and attention a sampler's unconditional streams must reproduce: the image
    stream is the prompt with its text removed (the source image's tokens read clean, positions
    counting from [bos] = 0 with no gap), the null stream is exactly a dropped t2i caption's form
    (only [bos] before the <boi>; the sampler's `unconditional()` copy). The edited image's tokens
    are diffusion targets in both; the [eos] is not trained (as in a dropped t2i caption: the
    unconditional streams only ever draw), and in the "text" form neither is the <boi> after the
    source image (after an image comes a caption in the caption task; "draw after any image" would
    be a false rule). The "both" form trains its <boi> after [bos], as the dropped t2i caption does."""
    segments, flags = doc.segments, T.loss_flags(doc)
    boi = [True] * len(segments)
    if drop is None:
        return segments, flags, boi
    if drop not in EDIT_DROPS:
        raise ValueError(f"unknown edit drop {drop!r}; choose from {EDIT_DROPS} or None")
    if len(segments) < 3 or not isinstance(segments[0], Image.Image) or not isinstance(segments[2], Image.Image):
        raise BadSample("bad_item", f"{doc.key!r}: an edit document is image, instruction, image, ...")
    if drop == "text":
        return [segments[0], segments[2]], [False, True], [True, False]
    return [segments[2]], [True], [True]


def prepare_document(doc: Document, encode_text, image_tokenizer, drop_prompt: bool = False,
                     edit_drop: str | None = None) -> TokenizedDoc:
    """Template + text tokenizer: segments with their loss flags (images still pending).

    `drop_prompt` is the classifier-free-guidance drop: the prompt segments (the t2i caption)
    are removed, leaving `[bos] <boi> image <eoi> [eos]`, the unconditional branch's layout. Its
    `[eos]` is not trained on: the unconditional branch only ever draws, and "an image, then the
    end" would contradict the caption task, whose prompt is that same image (it made captions
    come back empty).

    `edit_drop` ("text" / "both" / None) is an edit document's image-guided CFG drop: `edit_condition`.
    """
    segments, flags = doc.segments, T.loss_flags(doc)
    boi = [True] * len(segments)
    if edit_drop is not None:
        segments, flags, boi = edit_condition(doc, edit_drop)
    elif drop_prompt:
        k = T.split_index(doc.task, segments)
        segments, flags = segments[k:], flags[k:]
    size, n_tokens = image_tokenizer.cfg.image_size, image_tokenizer.num_tokens
    out: TokenizedDoc = []
    for seg, loss, predict_boi in zip(segments, flags, boi):
        if isinstance(seg, str):
            ids = encode_text(seg)
            if ids:
                out.append(TextSegment(list(ids), loss))
        elif seg.size != (size, size):
            raise BadSample("bad_image_size", f"{doc.key!r}: image is {seg.size[0]}x{seg.size[1]}, the tokenizer needs {size}x{size}")
        else:
            out.append(PendingImage(seg, n_tokens, loss, predict_boi))
    if drop_prompt or edit_drop is not None:
        out.append(TextSegment([], loss=False))  # no tokens; layout leaves the [eos] after it untrained
    return out


def encode_images(rows: list[list[TokenizedDoc]], image_tokenizer) -> list[list[TokenizedDoc]]:
    """Replace every PendingImage in `rows` by real tokens: one tokenizer call for the batch."""
    pending = [seg for row in rows for doc in row for seg in doc if isinstance(seg, PendingImage)]
    if not pending:
        return rows
    tokens = image_tokenizer.encode([p.image for p in pending])  # (n_images, N, d)
    index = {id(p): j for j, p in enumerate(pending)}
    return [[[ImageSegment(tokens[index[id(seg)]], seg.loss, seg.predict_boi) if isinstance(seg, PendingImage) else seg
              for seg in doc] for doc in row] for row in rows]


def tokenize_document(doc: Document, tokenizer, image_tokenizer, drop_prompt: bool = False,
                      edit_drop: str | None = None) -> TokenizedDoc:
    """Document -> TokenizedDoc with the training loss flags (for scoring or inspection)."""
    pending = prepare_document(doc, tokenizer.encode, image_tokenizer, drop_prompt, edit_drop)
    return encode_images([[pending]], image_tokenizer)[0][0]


def fit_length(doc: TokenizedDoc, seq_len: int, queries: bool = False) -> tuple[TokenizedDoc | None, str | None]:
    """Cut a document longer than `seq_len` after its last image that still fits (`queries`:
    counting the position queries of parallel image decoding, `layout.doc_length`).

    Returns (document, None) when it fits, (prefix, "too_long_cut") when cut, (None,
    "too_long_dropped") when no prefix ends at an image (or a segment boundary, for text-only
    documents) and holds something to train on.
    """
    if doc_length(doc, queries=queries) <= seq_len:
        return doc, None
    has_images = any(isinstance(s, ImageSegment) for s in doc)
    for k in range(len(doc) - 1, 0, -1):
        prefix = doc[:k]
        if has_images and not isinstance(prefix[-1], ImageSegment):
            continue
        if doc_length(prefix, queries=queries) <= seq_len and any(s.loss for s in prefix):
            return prefix, "too_long_cut"
    return None, "too_long_dropped"


class Packer:
    """First-fit packing of documents, in arrival order, into `batch_size` rows of `seq_len`."""

    def __init__(self, seq_len: int, batch_size: int, pack: bool = True):
        self.seq_len, self.batch_size, self.pack = seq_len, batch_size, pack
        self.rows: list[list[TokenizedDoc]] = []
        self.used: list[int] = []

    def add(self, doc: TokenizedDoc, n: int) -> bool:
        """Place `doc` (n positions); False when the batch is full for it."""
        if self.pack:
            for r, u in enumerate(self.used):
                if u + n <= self.seq_len:
                    self.rows[r].append(doc)
                    self.used[r] += n
                    return True
        if len(self.rows) < self.batch_size:
            self.rows.append([doc])
            self.used.append(n)
            return True
        return False

    def take(self) -> list[list[TokenizedDoc]]:
        rows, self.rows, self.used = self.rows, [], []
        return rows


# --------------------------------------------------------------------------------------------
# One worker
# --------------------------------------------------------------------------------------------


@dataclass
class _Settings:
    """Everything a worker needs; plain values so it forks (or pickles) cleanly."""

    urls: list[str]
    tokenizer: Any
    image_tokenizer: Any
    ids: SpecialIds
    seq_len: int
    batch_size: int
    pack: bool
    seed: int
    rank: int
    world_size: int
    shuffle_buffer: int
    resampled: bool
    loop: bool
    cfg_drop: float
    edit_drop_text: float
    edit_drop_both: float
    weights: dict[str, float] | None  # None: natural mix
    tasks: set[str] | None  # only these tasks (val split with weights); None: all
    max_warnings: int
    lookahead: int = 0  # data.pack_lookahead
    groups: list[int] | None = None  # parallel image decoding: position queries per group (layout)
    order: str = "raster"  # ... and the order the groups take the cells in
    choices: list[list[int]] | None = None  # ... or schedules trained together, one per image (layout)


@dataclass
class _Item:
    worker: int
    batch: Batch
    state: dict[str, Any] = field(default_factory=dict)


def _documents(stream: SampleStream, task: str, stats: Stats) -> Iterator[tuple[Document, str]]:
    """Decoded documents of one task stream (its `select` already parsed and filtered the json)."""
    for sample in stream:
        try:
            doc = decode_document(sample, sample["__record__"])
        except BadSample as e:
            stats.add(e.reason, e.detail)
            continue
        yield doc, f"{task}/{stream.epoch}/{stream.pos}"


def run_worker(s: _Settings, worker: int, num_workers: int, state: dict[str, Any] | None) -> Iterator[_Item]:
    """Batches of one (rank, worker), each with the state to resume right after it."""
    stats = Stats(s.max_warnings)
    names = sorted(s.weights) if s.weights else [ALL]
    shared = SharedShards() if len(names) > 1 else None  # one parse of each shard for every task stream
    streams = {
        name: SampleStream(
            s.urls, seed=s.seed, rank=s.rank, world_size=s.world_size, worker=worker, num_workers=num_workers,
            shuffle_buffer=s.shuffle_buffer, resampled=s.resampled, loop=s.loop,
            # read and json errors are counted by the first stream only: every stream reads them
            report=stats.add if i == 0 else None,
            select=select_task(s.tasks if name == ALL else [name]), shared=shared,
        )
        for i, name in enumerate(names)
    }
    rng = np.random.Generator(np.random.PCG64([s.seed, s.rank, worker, 0x6D6978]))
    if state:
        for name, st in state["streams"].items():
            streams[name].load_state(st)
        rng.bit_generator.state = state["mixer"]
        stats.load(state["stats"])
    sources = {n: _documents(streams[n], n, stats) for n in names}
    encode_text = functools.lru_cache(maxsize=1 << 16)(s.tokenizer.encode)  # templated texts repeat
    active = list(state["active"]) if state else list(names)  # task streams not yet run dry

    def snapshot() -> dict[str, Any]:
        return {"streams": {n: st.state() for n, st in streams.items()}, "mixer": rng.bit_generator.state,
                "stats": stats.as_dict(), "active": list(active)}

    def next_doc() -> tuple[Document, str] | None:
        while active:
            if len(active) == 1:
                name = active[0]
            else:
                w = np.array([s.weights[n] for n in active], dtype=np.float64)
                name = active[min(int(np.searchsorted(np.cumsum(w / w.sum()), rng.random(), side="right")), len(active) - 1)]
            try:
                return next(sources[name])
            except StopIteration:
                active.remove(name)
                if s.loop and s.weights:
                    log.warning("no usable %r documents for rank %d worker %d; that task is left out", name, s.rank, worker)
        return None

    packer = Packer(s.seq_len, s.batch_size, s.pack)
    token_dim = s.image_tokenizer.token_dim

    def emit() -> Batch:
        return layout(encode_images(packer.take(), s.image_tokenizer), s.ids, s.seq_len, token_dim=token_dim,
                      groups=s.groups, order=s.order, choices=s.choices)

    # The lookahead: documents that fit no row wait in `waiting` for the next batch; `wait_state` is
    # the state just before the first of them was pulled and `packed` the pulls since then (counted
    # from it) that went into this batch. A restored state's `skip` names the pulls to drop again.
    waiting: list[tuple[TokenizedDoc, int]] = []
    wait_state: dict[str, Any] = {}
    first_wait = 0
    packed: list[int] = []
    pulls = 0
    replayed = set(state.get("skip", ())) if state else set()

    def batch_state() -> dict[str, Any]:
        return {**wait_state, "skip": list(packed)} if packed else wait_state

    def open_with_waiting() -> None:
        """The emptied packer takes the waiting documents: at most batch_size, each fits a row of its own."""
        for t, m in waiting:
            if not packer.add(t, m):
                raise AssertionError("a waiting document did not fit an empty batch")
        waiting.clear()
        packed.clear()

    while True:
        snap = snapshot()
        got = next_doc()
        if got is None:
            break
        pull, pulls = pulls, pulls + 1
        doc, tag = got
        drop = T.template(doc.task) in T.CFG_TASKS and s.cfg_drop > 0 and _uniform(s.seed, s.rank, worker, tag, "cfg") < s.cfg_drop
        edit_drop = None
        if T.template(doc.task) == "edit" and s.edit_drop_text + s.edit_drop_both > 0:
            u = _uniform(s.seed, s.rank, worker, tag, "edit")
            edit_drop = "both" if u < s.edit_drop_both else "text" if u < s.edit_drop_both + s.edit_drop_text else None
        try:
            tdoc = prepare_document(doc, encode_text, s.image_tokenizer, drop_prompt=drop, edit_drop=edit_drop)
        except BadSample as e:
            stats.add(e.reason, e.detail)
            continue
        tdoc, problem = fit_length(tdoc, s.seq_len, queries=s.groups is not None)
        if problem:
            stats.add(problem, f"{doc.key!r} is longer than seq_len={s.seq_len}")
        if tdoc is None or pull in replayed:  # a replayed pull went into the batch before the restore
            continue
        n = doc_length(tdoc, queries=s.groups is not None)
        if packer.add(tdoc, n):
            if waiting:
                packed.append(pull - first_wait)
            continue
        if not waiting:
            wait_state, first_wait = snap, pull
        waiting.append((tdoc, n))
        if len(waiting) > s.lookahead:
            yield _Item(worker, emit(), batch_state())
            open_with_waiting()
    if packer.rows:
        yield _Item(worker, emit(), batch_state() if waiting else snapshot())
    if waiting:
        open_with_waiting()
        yield _Item(worker, emit(), snapshot())


class _Pipeline(torch.utils.data.IterableDataset):
    """The DataLoader face of `run_worker`: physical worker p plays logical worker (p + offset) % W."""

    def __init__(self, settings: _Settings, states: dict[int, dict[str, Any]], offset: int):
        self.settings, self.states, self.offset = settings, states, offset

    def __iter__(self) -> Iterator[_Item]:
        info = torch.utils.data.get_worker_info()
        if info is None:
            yield from run_worker(self.settings, 0, 1, self.states.get(0))
            return
        logical = (info.id + self.offset) % info.num_workers
        yield from run_worker(self.settings, logical, info.num_workers, self.states.get(logical))


def _keep(item: _Item) -> _Item:
    return item


def worker_context() -> Any:
    """How loader workers start: from a forkserver where the platform has one, never as a fork
    of the training process. A fork copies the locks that the process's other threads (tqdm's
    monitor, queue feeders, a tokenizer's or the runtime's thread pools) hold at that instant, and
    a worker that then needs one waits forever: a two-worker stream once hung for 900 s in CI that
    way. The forkserver is a clean process with this module imported, started once per process;
    workers fork from it and receive the pipeline pickled. None (the platform default, spawn)
    elsewhere."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return None
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["omni.data.loader"])  # takes effect when the server starts
    return ctx


# --------------------------------------------------------------------------------------------
# The stream training reads
# --------------------------------------------------------------------------------------------


def tasks_in(urls: list[str], limit: int = 2000) -> dict[str, int]:
    """Documents per meta["task"] among the first `limit` of these shards (json members only)."""
    found: collections.Counter = collections.Counter()
    for n, doc in enumerate(read_documents(urls, decode_images=False, stats=Stats(max_warnings=0)), 1):
        found[doc.task] += 1
        if n >= limit:
            break
    return dict(found.most_common())


class BatchStream:
    """Iterable of `omni.layout.Batch` for one rank; `state_dict` / `load_state_dict` resume exactly.

    split="train": shuffled, resampled per data.resampled, endless, CFG drops, task weights.
    split="val": data.val read once in order (every `iter` starts over), no CFG drops; with task
    weights only the weighted tasks, in their natural mix. `seed` is the base seed, the same on
    every rank (shard order must agree across ranks); rank and world_size split the shards.
    """

    def __init__(self, data_cfg: DataConfig, tokenizer, image_tokenizer, *, split: str = "train",
                 rank: int = 0, world_size: int = 1, seed: int = 0, groups: list[int] | None = None,
                 order: str = "raster", choices: list[list[int]] | None = None):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        specs = data_cfg.train if split == "train" else data_cfg.val
        if not specs:
            raise ValueError(f"data.{split} is empty; set it to shard paths, e.g. data.{split}=DIR/{split}-{{000000..000003}}.tar")
        self.cfg, self.split = data_cfg, split
        self.rank, self.world_size, self.num_workers = rank, world_size, data_cfg.num_workers
        self.urls = expand_shards(specs)
        train = split == "train"
        weights = {t: float(w) for t, w in data_cfg.task_weights.items() if w > 0}
        drops = {"data.edit_drop_text": data_cfg.edit_drop_text, "data.edit_drop_both": data_cfg.edit_drop_both}
        if any(not 0 <= p <= 1 for p in drops.values()) or sum(drops.values()) > 1:
            raise ValueError(f"edit drop rates {drops} must each lie in [0, 1] and sum to at most 1 "
                             "(InstructPix2Pix: 0.05 each)")
        if not 0 <= data_cfg.pack_lookahead < data_cfg.batch_size or (data_cfg.pack_lookahead and not data_cfg.pack):
            raise ValueError(f"data.pack_lookahead={data_cfg.pack_lookahead} must lie in [0, data.batch_size - 1 = "
                             f"{data_cfg.batch_size - 1}] (the documents waiting must fit an empty batch) and needs "
                             f"data.pack=true (pack={data_cfg.pack})")
        if data_cfg.task_weights and not weights:
            raise ValueError(f"data.task_weights {data_cfg.task_weights} gives no task a positive weight")
        resampled = data_cfg.resampled and train
        if train and not resampled and len(self.urls) < world_size * max(self.num_workers, 1):
            raise ValueError(
                f"{len(self.urls)} shard(s) cannot feed {world_size} rank(s) x {max(self.num_workers, 1)} worker(s) "
                "without resampling; set data.resampled=true or write more shards (--shard-size smaller)"
            )
        self.settings = _Settings(
            urls=self.urls, tokenizer=tokenizer, image_tokenizer=image_tokenizer,
            ids=SpecialIds(bos=tokenizer.bos_id, eos=tokenizer.eos_id, pad=tokenizer.pad_id,
                           boi=tokenizer.boi_id, eoi=tokenizer.eoi_id, img=tokenizer.img_id),
            seq_len=data_cfg.seq_len, batch_size=data_cfg.batch_size, pack=data_cfg.pack, seed=seed, rank=rank,
            world_size=world_size, shuffle_buffer=data_cfg.shuffle_buffer if train else 0, resampled=resampled,
            loop=train, cfg_drop=data_cfg.cfg_drop if train else 0.0,
            edit_drop_text=data_cfg.edit_drop_text if train else 0.0,
            edit_drop_both=data_cfg.edit_drop_both if train else 0.0, weights=weights if (weights and train) else None,
            tasks=set(weights) if (weights and not train) else None, max_warnings=data_cfg.max_warnings,
            lookahead=data_cfg.pack_lookahead,
            groups=groups, order=order, choices=choices,
        )
        self._reset()

    def _reset(self) -> None:
        self._workers: dict[int, dict[str, Any]] = {}
        self._next_worker = 0
        self.batches = 0  # batches delivered since the start (or since the restored state)

    def __iter__(self) -> Iterator[Batch]:
        if self.split == "val":
            self._reset()
        pipeline = _Pipeline(self.settings, dict(self._workers), self._next_worker)
        W = self.num_workers
        if W == 0:
            items: Any = iter(pipeline)
        else:
            items = torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=W, collate_fn=_keep,
                                                persistent_workers=False, multiprocessing_context=worker_context())
        for item in items:
            self._workers[item.worker] = item.state
            self._next_worker = (item.worker + 1) % max(W, 1)
            self.batches += 1
            yield item.batch
        if self.split == "train":
            weights = self.settings.weights
            if weights and not self.batches:
                found = tasks_in(self.urls)
                if found and not set(found) & set(weights):
                    raise ValueError(
                        f"data.task_weights names the tasks {sorted(weights)}, and none of data.train's documents has "
                        f"one of them (its documents' tasks: {found}, read from the first shards); to train on every "
                        "document in its natural mix set data.task_weights={} (or weigh its tasks, e.g. "
                        f"data.task_weights={{{next(iter(found))}: 1.0}})")
            raise RuntimeError(
                f"the training stream ended after {self.batches} batches: no readable documents left in "
                f"data.train ({len(self.urls)} shards); skipped so far: {self.stats}"
            )

    @property
    def stats(self) -> dict[str, int]:
        """Skipped / repaired samples per reason (omni.data.document.REASONS), all workers."""
        total: dict[str, int] = {}
        for st in self._workers.values():
            for k, v in st["stats"].items():
                total[k] = total.get(k, 0) + v
        return dict(sorted(total.items()))

    def resume_at(self, step: int, skipped: int) -> str:
        """Continue after a resume on another number of processes (`step` optimizer steps and
        `skipped` bad micro-batches, the same on every rank). Per-rank stream positions cannot be
        split anew, so the stream is re-seeded by that global position: a resampled stream (shards
        drawn with replacement, the default) continues with fresh draws and never replays what the
        run read first; an epoch stream starts a new shuffled pass. Returns what the log should say."""
        self._reset()
        position = step * 1_000_003 + skipped  # distinct for every (step, skipped) a run can reach
        self.settings = dataclasses.replace(self.settings, seed=self.settings.seed + position)
        self.batches = 0
        if self.settings.resampled:
            return f"resampled data stream re-seeded at global step {step} (fresh draws, no replay)"
        return f"data stream re-seeded at global step {step}: a new shuffled pass over the shards"

    def _fingerprint(self) -> str:
        return hashlib.blake2b("\n".join(self.urls).encode(), digest_size=8).hexdigest()

    def state_dict(self) -> dict[str, Any]:
        """Plain values (JSON- and torch.save(weights_only)-safe)."""
        return {
            "version": STATE_VERSION, "split": self.split, "rank": self.rank, "world_size": self.world_size,
            "num_workers": self.num_workers, "shards": self._fingerprint(), "next_worker": self._next_worker,
            "batches": self.batches, "workers": {str(w): st for w, st in self._workers.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r}; this omni reads version {STATE_VERSION}")
        for key, mine in (("num_workers", self.num_workers), ("rank", self.rank), ("world_size", self.world_size)):
            if state[key] != mine:
                raise ValueError(
                    f"loader state was saved with {key}={state[key]} but this run has {key}={mine}; "
                    f"exact resume needs the same value (set it back, or start the data stream fresh)"
                )
        if state["shards"] != self._fingerprint():
            raise ValueError("the shard list differs from the one the loader state was saved with; "
                             "exact resume needs the same data.train")
        self._workers = {int(w): st for w, st in state["workers"].items()}
        self._next_worker = int(state["next_worker"])
        self.batches = int(state["batches"])
