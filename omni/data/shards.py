"""Webdataset shards: writing them, and streaming them back with an exact, resumable position.

Writing: `ShardWriter` / `write_shards` put documents into `PREFIX-000000.tar`, ... with fixed
member metadata (mtime 0, uid 0), so the same documents always give byte-identical shards; each
shard appears under its final name only when complete (written beside it, then renamed).

Reading: shard specs are local paths, directories (every `*.tar` inside), globs, brace
patterns (`dir/train-{000000..000009}.tar`, `a.tar::b.tar`) or `pipe:` URLs, opened with
webdataset's `gopen` and grouped into samples by webdataset's key rule (the member name up to
the first dot). `SampleStream` is the stream of one (rank, worker):

- an *epoch* is a list of shards: without resampling, every rank shuffles the full list with the
  same seed and takes `order[rank::world][worker::workers]` (split by node, then by worker), so
  each sample is read exactly once per epoch across ranks and workers; with resampling, each
  (rank, worker) draws its own shards with replacement (as many per epoch as it would otherwise
  own), so streaming never ends and shard counts need not divide evenly;
- samples pass through a shuffle buffer seeded by (seed, rank, worker, epoch), flushed at the end
  of each epoch;
- the position is (epoch, samples yielded in that epoch). Restoring replays that epoch's raw bytes
  (no image decoding) and drops what was already yielded, so the stream after a restore is the
  stream without interruption. The replay costs reading up to one epoch of tar bytes.
"""

from __future__ import annotations

import glob
import io
import os
import random
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from itertools import chain
from pathlib import Path
from typing import Any

from omni.data.document import BadSample, Document, Stats, decode_document, decode_record
from omni.data.tario import Prepended, TarError, members, read_exact, tarfile_members
from omni.utils import share_like_open

Report = Callable[[str, str], None]  # (reason, detail) -> None


# --------------------------------------------------------------------------------------------
# Shard specs
# --------------------------------------------------------------------------------------------


def expand_shards(specs: str | Path | Iterable[str | Path]) -> list[str]:
    """Shard specs -> the ordered list of shard URLs; an error names a spec that matches nothing."""
    import braceexpand

    if isinstance(specs, (str, Path)):
        specs = [specs]
    urls: list[str] = []
    for spec in specs:
        for part in str(spec).split("::"):
            for url in braceexpand.braceexpand(part):
                if "://" in url or url.startswith("pipe:"):
                    urls.append(url)
                elif os.path.isdir(url):
                    found = sorted(glob.glob(os.path.join(url, "*.tar")))
                    if not found:
                        raise FileNotFoundError(f"shard directory {url!r} holds no *.tar files")
                    urls += found
                elif any(c in url for c in "*?["):
                    found = sorted(glob.glob(url))
                    if not found:
                        raise FileNotFoundError(f"shard pattern {url!r} matches no files")
                    urls += found
                else:
                    if not os.path.exists(url):
                        raise FileNotFoundError(
                            f"shard {url!r} does not exist; write shards with `omni data shapes --out DIR` "
                            "or `omni data digits --out DIR` and point data.train/data.val at them"
                        )
                    urls.append(url)
    return urls


def brace_pattern(paths: list[Path]) -> str:
    """`[d/train-000000.tar, d/train-000001.tar]` -> `d/train-{000000..000001}.tar`."""
    if len(paths) == 1:
        return str(paths[0])
    first, last = paths[0].name, paths[-1].name
    stem, num = first.rsplit("-", 1)
    return str(paths[0].parent / f"{stem}-{{{num.split('.')[0]}..{last.rsplit('-', 1)[1].split('.')[0]}}}.tar")


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


class ShardWriter:
    """Write samples into `out_dir/PREFIX-000000.tar`, ... with `shard_size` samples each (numbered
    from `first`: a process that writes shard k alone passes first=k)."""

    def __init__(self, out_dir: str | Path, prefix: str = "train", shard_size: int = 500, first: int = 0):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.first = first
        self.shard_size = shard_size
        self.paths: list[Path] = []
        self.count = 0
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._in_shard = 0

    def _open(self) -> None:
        final = self.out_dir / f"{self.prefix}-{self.first + len(self.paths):06d}.tar"
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=self.out_dir)
        os.close(fd)
        self._tmp = Path(tmp)
        self._tar = tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT)  # noqa: SIM115 - closed in _finish
        self.paths.append(final)
        self._in_shard = 0

    def _finish(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        share_like_open(self._tmp)  # mkstemp makes it private; shards are meant to be shared
        os.replace(self._tmp, self.paths[-1])
        self._tar = self._tmp = None

    def write(self, item: Document | dict[str, Any]) -> None:
        """Add a Document (or a ready webdataset sample dict with `__key__`)."""
        sample = item.to_sample() if isinstance(item, Document) else item
        if self._tar is None or self._in_shard >= self.shard_size:
            self._finish()
            self._open()
        key = sample["__key__"]
        members = ["json"] + sorted(k for k in sample if k not in ("json", "__key__"))
        for suffix in members:
            data = sample[suffix]
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self._in_shard += 1
        self.count += 1

    def close(self) -> list[Path]:
        self._finish()
        return self.paths

    def __enter__(self) -> ShardWriter:  # noqa: PYI034
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        if self._tar is not None:  # an interrupted shard never appears under its final name
            self._tar.close()
            self._tmp.unlink(missing_ok=True)
            self.paths.pop()


def write_shards(
    docs: Iterable[Document],
    out_dir: str | Path,
    prefix: str = "train",
    shard_size: int = 500,
    total: int | None = None,
    progress: bool = True,
) -> list[Path]:
    """Write `docs` as shards; returns their paths. Shows a tqdm bar when `progress`."""
    from tqdm import tqdm

    with ShardWriter(out_dir, prefix, shard_size) as writer:
        for doc in tqdm(docs, total=total, desc=f"{prefix} shards", unit="doc", disable=not progress):
            writer.write(doc)
    return writer.paths


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _split_name(name: str) -> tuple[str | None, str]:
    """webdataset's key rule: `dir/KEY.0.png` -> (`dir/KEY`, `0.png`)."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot < 0:
        return None, ""
    return name[:dot], name[dot + 1 :]


def iter_tar(url: str, report: Report | None = None) -> Iterator[dict[str, Any]]:
    """Raw samples (`__key__`, `__url__`, suffix -> bytes) of one shard, in file order.

    A shard that cannot be opened is reported as `bad_shard`; a tar that breaks mid-way as
    `truncated_tar`, keeping the samples before the break (the partial one is dropped).
    Compressed tars (.tar.gz, ...) are read with `tarfile`.
    """
    from webdataset.gopen import gopen

    report = report or (lambda reason, detail: None)
    try:
        stream = gopen(url, "rb")
    except Exception as e:  # noqa: BLE001 - any failure to open is a bad shard, never a crash
        report("bad_shard", f"{url}: {type(e).__name__}: {e}")
        return
    failed = False
    try:
        head = read_exact(stream, 512)
        source = Prepended(head, stream)
        compressed = head[:2] == b"\x1f\x8b" or head[:3] in (b"BZh", b"\xfd7z")
        entries = tarfile_members(source) if compressed else members(source)
        current: dict[str, Any] | None = None
        for name, data in entries:
            key, suffix = _split_name(name)
            if key is None:
                continue
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key, "__url__": url}
            current[suffix.lower()] = data
        if current is not None:
            yield current
    except (TarError, tarfile.TarError, EOFError, OSError, ValueError, zlib.error) as e:
        failed = True
        report("truncated_tar", f"{url}: {type(e).__name__}: {e}")
    finally:
        try:
            stream.close()
        except Exception as e:  # noqa: BLE001 - a pipe: command that exited non-zero
            if not failed:
                report("bad_shard", f"{url}: {type(e).__name__}: {e}")


class SharedShards:
    """Parsed shards shared by the task streams of one loader worker.

    With `data.task_weights` every task has its own SampleStream, and each reads every shard and
    keeps its task's samples: with nine tasks each shard was parsed nine times (in the demo, 40%
    of the loader's time a step). The streams walk the same shard order at about the same pace,
    so one parse serves them all: a local shard of at most `max_shard` bytes (`budget // 8` by
    default) is parsed whole once, kept while the cache holds at most `budget` bytes of samples
    (least recently read dropped first; the last one read is always kept), and replayed to each
    stream, read errors included (each stream reports them as it would have). A shard that parsed cleanly also records its tasks, and a stream skips a
    shard that holds none of its own (a digits stream never reparses the shapes shards). What
    each stream yields, and its saved position, are exactly those of reading alone; larger or
    remote shards are streamed as before.
    """

    def __init__(self, budget: int = 64 << 20, max_shard: int | None = None):
        from collections import OrderedDict

        self.budget = budget
        self.max_shard = budget // 8 if max_shard is None else max_shard  # larger shards: streamed
        self._cache: OrderedDict[str, tuple[list[Any], int]] = OrderedDict()
        self._tasks: dict[str, frozenset] = {}  # url -> tasks of a cleanly parsed shard
        self.used = 0
        self.parses = 0  # shards parsed (cache misses), for tests and benchmarks

    def holds_none(self, url: str, tasks: set[str] | None) -> bool:
        """Is `url` known (parsed cleanly) to hold no sample of `tasks`? (None: every task.)"""
        known = self._tasks.get(url)
        return known is not None and tasks is not None and not (known & tasks)

    def _cacheable(self, url: str) -> bool:
        """A local file of at most `max_shard` bytes (a URL or pipe: is streamed)."""
        try:
            return os.path.isfile(url) and os.path.getsize(url) <= self.max_shard
        except OSError:
            return False

    def read(self, url: str, report: Report) -> Iterator[dict[str, Any]]:
        """The raw samples of `url` (each a fresh dict, `__record__` parsed when the json is
        good), reporting read errors where they fall, as `iter_tar` does."""
        entry = self._cache.get(url)
        if entry is None:
            if not self._cacheable(url):
                yield from iter_tar(url, report)
                return
            events: list[Any] = []
            for sample in iter_tar(url, lambda reason, detail: events.append((reason, detail))):
                events.append(sample)  # noqa: PERF402 - read errors land between the samples
            self.parses += 1
            tasks, clean = set(), True
            for ev in events:
                if isinstance(ev, tuple):
                    clean = False
                    continue
                try:
                    ev["__record__"] = decode_record(ev)
                    tasks.add(ev["__record__"]["meta"].get("task"))
                except BadSample:
                    clean = False  # the streams' `select` decodes it again and reports it
            if clean:
                self._tasks[url] = frozenset(tasks)
            entry = (events, sum(len(v) for ev in events if isinstance(ev, dict)
                                 for v in ev.values() if isinstance(v, bytes)))
            self._cache[url] = entry
            self.used += entry[1]
            while self.used > self.budget and len(self._cache) > 1:
                _, (_, n) = self._cache.popitem(last=False)
                self.used -= n
        else:
            self._cache.move_to_end(url)
        for ev in entry[0]:
            if isinstance(ev, tuple):
                report(*ev)
            else:
                yield dict(ev)


def epoch_shards(
    urls: list[str],
    epoch: int,
    *,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    worker: int = 0,
    num_workers: int = 1,
    shuffle: bool = True,
    resampled: bool = False,
) -> list[str]:
    """The shards one (rank, worker) reads in `epoch` (see the module docstring)."""
    if resampled:
        n = max(1, -(-len(urls) // (world_size * num_workers)))
        rng = random.Random(f"omni-resample/{seed}/{rank}/{worker}/{epoch}")
        return [rng.choice(urls) for _ in range(n)] if urls else []
    order = list(urls)
    if shuffle:  # the same permutation on every rank: the seed holds no rank
        random.Random(f"omni-shards/{seed}/{epoch}").shuffle(order)
    return order[rank::world_size][worker::num_workers]


def shuffled(items: Iterable[Any], bufsize: int, rng: random.Random) -> Iterator[Any]:
    """Streaming shuffle: keep `bufsize` items, emit a random one as each new one arrives."""
    if bufsize <= 1:
        yield from items
        return
    buf: list[Any] = []
    for x in items:
        buf.append(x)
        if len(buf) >= bufsize:
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    while buf:
        i = rng.randrange(len(buf))
        buf[i], buf[-1] = buf[-1], buf[i]
        yield buf.pop()


class SampleStream:
    """Raw samples of one (rank, worker) across epochs, with a saveable position."""

    def __init__(
        self,
        urls: list[str],
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        worker: int = 0,
        num_workers: int = 1,
        shuffle_buffer: int = 0,
        resampled: bool = False,
        loop: bool = True,
        report: Report | None = None,
        select: Callable[[dict[str, Any], Report], bool] | None = None,
        shared: SharedShards | None = None,
    ):
        self.urls = list(urls)
        self.select = select  # keeps a raw sample (before the shuffle buffer); may report problems
        # Shards parsed once for every task stream of a worker (select_task's `tasks` say which
        # shards this stream may skip).
        self.shared = shared
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.worker, self.num_workers = worker, num_workers
        self.shuffle_buffer, self.resampled, self.loop = shuffle_buffer, resampled, loop
        self.report = report or (lambda reason, detail: None)
        self.epoch = 0
        self.pos = 0  # samples yielded in the current epoch
        self._quiet = False  # replaying after a restore: read events were counted before saving
        self._has_any: bool | None = None  # cached answer of _any_selected

    def state(self) -> list[int]:
        return [self.epoch, self.pos]

    def load_state(self, state: list[int]) -> None:
        self.epoch, self.pos = int(state[0]), int(state[1])

    def _report(self, reason: str, detail: str) -> None:
        if not self._quiet:
            self.report(reason, detail)

    def _any_selected(self) -> bool:
        """Does any shard hold a sample `select` keeps? (Read once, in order, stopping at the first.)"""
        if self._has_any is None:
            quiet = lambda reason, detail: None  # the stream itself counts read errors
            keep = self.select or (lambda sample, report: True)
            self._has_any = any(keep(x, quiet) for u in self.urls for x in iter_tar(u, quiet))
        return self._has_any

    def _read(self, url: str) -> Iterable[dict[str, Any]]:
        if self.shared is None:
            return iter_tar(url, self._report)
        if self.shared.holds_none(url, getattr(self.select, "tasks", None)):
            return ()
        return self.shared.read(url, self._report)

    def shards(self, epoch: int) -> list[str]:
        return epoch_shards(
            self.urls, epoch, seed=self.seed, rank=self.rank, world_size=self.world_size,
            worker=self.worker, num_workers=self.num_workers,
            shuffle=self.shuffle_buffer > 1 or self.resampled, resampled=self.resampled,
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch, skip = self.epoch, self.pos
        empty = 0  # epochs in a row that yielded nothing
        while True:
            rng = random.Random(f"omni-buffer/{self.seed}/{self.rank}/{self.worker}/{epoch}")
            raw = chain.from_iterable(self._read(u) for u in self.shards(epoch))
            if self.select is not None:
                raw = (x for x in raw if self.select(x, self._report))
            self._quiet = skip > 0
            n = 0
            for sample in shuffled(raw, self.shuffle_buffer, rng):
                n += 1
                if n <= skip:
                    self._quiet = n < skip
                    continue
                self.epoch, self.pos = epoch, n
                yield sample
            self._quiet = False
            empty = empty + 1 if n == 0 else 0
            # Nothing (selected) in a whole epoch: stop instead of spinning. A resampled epoch
            # draws a few shards at random and may miss the only shards holding a task, so the
            # first empty epoch triggers one pass over every shard, in order, that stops at the
            # first selected sample: a task missing from the data costs one read of each shard
            # (it used to take 4 x shards empty epochs of random draws: quadratic in the shards).
            if empty and (not self.resampled or not self._any_selected()):
                return
            if empty >= max(8, 4 * len(self.urls)):  # present, but the random draws keep missing it
                return
            epoch, skip = epoch + 1, 0
            self.epoch, self.pos = epoch, 0
            if not self.loop:
                return


def select_task(tasks: Iterable[str] | None) -> Callable[[dict[str, Any], Report], bool]:
    """A SampleStream `select`: parse the json (kept as `__record__`), keep samples of `tasks`.

    Samples whose json is bad are reported and dropped here, before the shuffle buffer.
    """
    keep = set(tasks) if tasks is not None else None

    def select(sample: dict[str, Any], report: Report) -> bool:
        if "__record__" not in sample:  # SharedShards parses each good record once
            try:
                sample["__record__"] = decode_record(sample)
            except BadSample as e:
                report(e.reason, e.detail)
                return False
        return keep is None or sample["__record__"]["meta"].get("task") in keep

    select.tasks = keep  # SharedShards: a shard holding none of these is skipped
    return select


def read_documents(
    specs: str | Iterable[str],
    *,
    tasks: Iterable[str] | None = None,
    decode_images: bool = True,
    stats: Stats | None = None,
    **stream_kw: Any,
) -> Iterator[Document]:
    """Decoded documents of one epoch (pass `loop=True, resampled=True` to stream forever).

    Bad samples are skipped and counted in `stats`. With `decode_images=False` images stay None
    (enough for text-only work such as training a tokenizer). `stream_kw` go to SampleStream.
    """
    stats = stats if stats is not None else Stats()
    stream_kw.setdefault("loop", False)
    stream = SampleStream(expand_shards(specs), report=stats.add, select=select_task(tasks), **stream_kw)
    for sample in stream:
        record = sample["__record__"]
        if not decode_images:
            yield Document(list(record["texts"]), [None] * len(record["texts"]), record["meta"], sample["__key__"])
            continue
        try:
            yield decode_document(sample, record)
        except BadSample as e:
            stats.add(e.reason, e.detail)
