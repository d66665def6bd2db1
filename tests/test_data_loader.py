"""BatchStream: templates -> labels, packing, CFG drop, task mixing, splits, exact resume, bad data."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from omni.config import DataConfig, ImageTokenizerConfig
from omni.data import digits, shapes
from omni.data.document import Document
from omni.data.loader import BatchStream, fit_length
from omni.data.shards import ShardWriter, write_shards
from omni.layout import IGNORE, ImageSegment, TextSegment
from omni.tokenizers.base import to_pil
from omni.tokenizers.image import PatchTokenizer
from omni.tokenizers.text import train_sentencepiece

ITEMS = [f"item {i:04d}." for i in range(200)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [t for d in shapes.generate(400, seed=9) for t in d.texts if t]
    texts += [f"draw the digit {i}." for i in range(10)] + [f"this is the digit {i}." for i in range(10)] + ITEMS
    return train_sentencepiece(texts * 3, tmp_path_factory.mktemp("tok"), vocab_size=160)


@pytest.fixture(scope="module")
def itok():
    return PatchTokenizer(ImageTokenizerConfig())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_shards(shapes.generate(240, seed=4), root / "shapes", shard_size=60, progress=False)
    write_shards(itertools.islice(digits.documents("train"), 120), root / "digits", shard_size=40, progress=False)
    by_task: dict[str, list[Document]] = {}
    for d in shapes.generate(300, seed=5):
        by_task.setdefault(d.task, []).append(d)
    for task, docs in by_task.items():
        write_shards(docs, root / task, shard_size=1000, progress=False)
    write_shards(itertools.islice(digits.documents("heldout"), 60), root / "digit_tasks", progress=False)
    return root


def _cfg(**kw) -> DataConfig:
    base = {"seq_len": 160, "batch_size": 4, "num_workers": 0, "shuffle_buffer": 16, "resampled": False, "cfg_drop": 0.0}
    return DataConfig(**{**base, **kw})


def _docs(batch) -> list[dict]:
    """Split a Batch into its documents: token ids, label ids, image-target count, image tokens."""
    out = []
    L = batch.input_ids.shape[1]
    img_row = torch.cumsum(batch.image_mask.flatten(), 0) - 1  # flat position -> image token index
    targets = Counter()
    for c in batch.image_cond_index.tolist():
        targets[(c // L, int(batch.doc_ids[c // L, c % L]))] += 1
    for b in range(batch.input_ids.shape[0]):
        for d in range(1, int(batch.doc_ids[b].max()) + 1):
            pos = (batch.doc_ids[b] == d).nonzero().flatten()
            flat = b * L + pos[batch.image_mask[b, pos]]
            out.append({
                "ids": batch.input_ids[b, pos].tolist(),
                "positions": batch.position_ids[b, pos].tolist(),
                "labels": [x for x in batch.labels[b, pos].tolist() if x != IGNORE],
                "targets": targets[(b, d)],
                "image_tokens": batch.image_tokens[img_row[flat]],
            })
    return out


def _text(tok, ids) -> str:
    return tok.decode([i for i in ids if i not in (tok.boi_id, tok.eoi_id, tok.img_id, tok.bos_id, tok.eos_id)])


def _take(stream, n):
    it = iter(stream)
    return [next(it) for _ in range(n)]


@pytest.fixture(scope="module")
def source_images() -> set[str]:
    """Hashes of every image written in `data` for the per-task shards."""
    images = {hashlib.sha1(np.asarray(im).tobytes()).hexdigest() for d in shapes.generate(300, seed=5)
              for im in d.images if im is not None}
    return images | {hashlib.sha1(a.tobytes()).hexdigest() for a in digits.load_split("heldout")[0][:30]}


@pytest.mark.parametrize("task", ["t2i", "caption", "vqa", "story", "text", "digits"])
def test_batches_follow_the_task_templates(data, tok, itok, source_images, task):
    source = data / ("digit_tasks" if task == "digits" else task)
    stream = BatchStream(_cfg(val=[str(source)]), tok, itok, split="val")
    images = source_images
    n = 0
    for batch in stream:
        assert batch.input_ids.shape == (batch.input_ids.shape[0], 160) and batch.input_ids.shape[0] <= 4
        for doc in _docs(batch):
            n += 1
            ids, labels = doc["ids"], doc["labels"]
            assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and doc["positions"] == list(range(len(ids)))
            n_images = ids.count(tok.boi_id)
            assert ids.count(tok.img_id) == 16 * n_images and ids.count(tok.eoi_id) == n_images
            for t in doc["image_tokens"].reshape(-1, 16, itok.token_dim):
                pixels = np.asarray(to_pil(itok.decode(t[None]))[0])
                assert hashlib.sha1(pixels.tobytes()).hexdigest() in images  # the source image, exactly
            text_labels = [x for x in labels if x not in (tok.boi_id, tok.eos_id)]
            assert labels[-1] == tok.eos_id
            if task in ("t2i", "digits") and ids[1] != tok.boi_id:  # prompt, then the image is the answer
                assert labels == [tok.boi_id, tok.eos_id] and doc["targets"] == 16
            elif task in ("caption", "digits"):  # image prompt [and a request], the caption is trained on
                assert doc["targets"] == 0 and _text(tok, ids).endswith(_text(tok, text_labels))
                assert _text(tok, text_labels).startswith(("a ", "an ", "one ", "two ", "three ", "four ", "this is the digit"))
            elif task == "vqa":
                assert doc["targets"] == 0
                assert _text(tok, text_labels) in {*shapes.COLORS, *shapes.SHAPES, "one", "two", "three", "four",
                                                  "left", "right", "above", "below", "top left", "top right",
                                                  "bottom left", "bottom right"}
            elif task == "story":  # the opening text is the prompt; every later text and image is trained on
                first_boi = ids.index(tok.boi_id)
                assert labels.count(tok.boi_id) == n_images and doc["targets"] == 16 * n_images
                assert _text(tok, text_labels) == _text(tok, ids[first_boi:])
            elif task == "text":
                assert doc["targets"] == 0 and labels == ids[1:]
    assert n == (60 if task == "digits" else Counter(d.task for d in shapes.generate(300, seed=5))[task])


def test_cfg_drop_removes_the_caption_at_the_configured_rate(data, tok, itok):
    def docs(p, n):
        stream = BatchStream(_cfg(train=[str(data / "t2i")], cfg_drop=p, resampled=True), tok, itok)
        return [d for b in _take(stream, n) for d in _docs(b)]

    assert all(d["ids"][1] != tok.boi_id for d in docs(0.0, 3))
    half = docs(0.5, 12)
    dropped = [d for d in half if d["ids"][1] == tok.boi_id]
    assert 0.4 < len(dropped) / len(half) < 0.6, (len(dropped), len(half))
    for d in dropped:  # [bos] <boi> image <eoi> [eos]: the image is trained on, the [eos] is not
        assert len(d["ids"]) == 20 and d["ids"][-1] == tok.eos_id
        assert d["labels"] == [tok.boi_id] and d["targets"] == 16
    kept = [d for d in half if d["ids"][1] != tok.boi_id]
    assert all(d["labels"][-1] == tok.eos_id for d in kept)  # a captioned t2i still learns to end


def test_task_weights_set_the_mix_across_sources(data, tok, itok):
    cfg = _cfg(train=[str(data / "shapes"), str(data / "digits")], task_weights={"t2i": 1.0, "digit_read": 3.0},
               resampled=True)
    docs = [d for b in _take(BatchStream(cfg, tok, itok), 25) for d in _docs(b)]
    reads = sum(d["ids"][1] == tok.boi_id for d in docs)  # digit_read starts with its image; t2i with text
    assert all("digit" in _text(tok, d["ids"]) for d in docs if d["ids"][1] == tok.boi_id)
    assert 0.68 < reads / len(docs) < 0.82, (reads, len(docs))


def test_task_weights_naming_no_task_of_the_data_say_which_tasks_it_has(data, tok, itok):
    # a preset's weights (the shapes tasks) over a user's own shards (digits here): one clear error
    cfg = _cfg(train=[str(data / "digits")], task_weights={"t2i": 1.0, "vqa": 1.0}, resampled=True)
    with pytest.raises(ValueError, match=r"names the tasks \['t2i', 'vqa'\].*its documents' tasks: \{.*data.task_weights=\{\}") as e:
        next(iter(BatchStream(cfg, tok, itok)))
    assert "'digit_t2i': " in str(e.value) and "'digit_read': " in str(e.value)
    # weights that name one task of the data still train on it
    cfg = _cfg(train=[str(data / "digits")], task_weights={"t2i": 1.0, "digit_read": 1.0}, resampled=True)
    assert all(d["ids"][1] == tok.boi_id for d in _docs(next(iter(BatchStream(cfg, tok, itok)))))


def test_packing_fills_rows_and_cuts_or_drops_long_documents(data, tok, itok):
    text_only = BatchStream(_cfg(val=[str(data / "text")], batch_size=2), tok, itok, split="val")
    first = next(iter(text_only))
    assert first.doc_ids.max() > 2 and first.n_tokens > 0.8 * 2 * 160  # several short documents per row
    unpacked = BatchStream(_cfg(val=[str(data / "text")], batch_size=2, pack=False), tok, itok, split="val")
    assert int(next(iter(unpacked)).doc_ids.max()) == 1

    img = torch.zeros(16, 192)
    story = [TextSegment([5] * 6, False), ImageSegment(img), TextSegment([6] * 4), ImageSegment(img),
             TextSegment([7] * 4), ImageSegment(img)]
    assert fit_length(story, 200) == (story, None)
    cut, why = fit_length(story, 50)
    assert why == "too_long_cut" and cut == story[:4]  # ends at an image, fits: 1 + 6 + 18 + 4 + 18 + 1
    assert fit_length(story, 20) == (None, "too_long_dropped")  # the first image alone does not fit
    assert fit_length([TextSegment([1] * 30), TextSegment([2] * 30)], 40)[1] == "too_long_cut"


def test_two_ranks_two_workers_cover_the_data_once(tmp_path, tok, itok):
    docs = [Document.from_segments([t], {"task": "text"}, key=f"item{i:04d}") for i, t in enumerate(ITEMS)]
    write_shards(docs, tmp_path, shard_size=25, progress=False)
    seen: Counter = Counter()
    for rank in range(2):
        cfg = _cfg(val=[str(tmp_path)], num_workers=2, batch_size=3, seq_len=40)
        for batch in BatchStream(cfg, tok, itok, split="val", rank=rank, world_size=2):
            seen.update(_text(tok, d["ids"]) for d in _docs(batch))
    assert seen == Counter(ITEMS)


def _equal(a, b) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)


def test_workers_start_clean_while_another_thread_holds_a_lock(data, tok, itok, monkeypatch):
    """Loader workers are not forks of the training process: a fork copies the locks other threads
    hold at that instant, and a worker that needs one waits forever (a two-worker stream once
    hung for 900 s in CI). Here a thread of this process holds a lock the whole time and the
    pipeline's document step takes it, in this process only: a forked worker would inherit both
    the patch and the held lock and never deliver a batch; a clean worker delivers the batches
    the stream gives with no thread holding anything."""
    import threading

    from omni.data import loader

    cfg = _cfg(train=[str(data / "shapes")], num_workers=2, batch_size=3, seq_len=100, shuffle_buffer=8)
    reference = _take(BatchStream(cfg, tok, itok, seed=2), 3)
    held, release = threading.Lock(), threading.Event()

    def holder():
        with held:
            release.wait()

    prepare = loader.prepare_document

    def prepare_under_the_lock(*args, **kwargs):
        with held:
            return prepare(*args, **kwargs)

    threading.Thread(target=holder, daemon=True).start()
    monkeypatch.setattr(loader, "prepare_document", prepare_under_the_lock)
    got: list = []
    reader = threading.Thread(target=lambda: got.extend(_take(BatchStream(cfg, tok, itok, seed=2), 3)), daemon=True)
    reader.start()
    reader.join(timeout=120)
    release.set()
    assert not reader.is_alive(), "the two-worker stream delivered nothing in 120 s: its workers inherited a held lock"
    assert loader.worker_context().get_start_method() == "forkserver"
    assert len(got) == 3 and all(_equal(a, b) for a, b in zip(got, reference))


def test_pack_lookahead_fills_the_gaps_with_the_same_documents(data, tok, itok):
    """data.pack_lookahead: a document that fits no row waits for the next batch while later ones
    fill the gaps; read once, the stream holds exactly the same documents in fewer padded positions."""
    def read(lookahead):
        cfg = _cfg(val=[str(data / "shapes")], batch_size=4, seq_len=160, pack_lookahead=lookahead)
        batches = list(BatchStream(cfg, tok, itok, split="val"))
        docs = Counter(tuple(d["ids"]) + tuple(d["labels"]) for b in batches for d in _docs(b))
        full = batches[:-1]  # the last batch holds what is left
        pad = sum(int((b.doc_ids == 0).sum()) for b in full) / sum(b.doc_ids.numel() for b in full)
        return batches, docs, pad

    plain, docs, pad = read(0)
    ahead, docs_ahead, pad_ahead = read(3)
    assert docs_ahead == docs and sum(docs.values()) == 240
    # measured: 9.4% of the positions padded -> 5.4% (rows of 4, 160 positions)
    assert len(ahead) <= len(plain) and pad_ahead < 0.7 * pad, (len(ahead), len(plain), pad_ahead, pad)
    for bad in ({"pack_lookahead": 4}, {"pack_lookahead": -1}, {"pack_lookahead": 1, "pack": False}):
        with pytest.raises(ValueError, match="data.pack_lookahead"):
            BatchStream(_cfg(val=[str(data / "shapes")], **bad), tok, itok, split="val")


@pytest.mark.parametrize("workers,resampled,lookahead", [(0, False, 0), (2, False, 0), (0, True, 0), (0, False, 2),
                                                         (2, True, 2)])
def test_exact_resume(data, tok, itok, tmp_path, workers, resampled, lookahead):
    # a small digits set (epochs wrap within the run) plus a truncated copy of one of its shards,
    # so the skip counters are part of what must resume exactly
    # (in the short fixed phrasing: enough documents fit the 16 batches to wrap the epoch)
    small = write_shards(itertools.islice(digits.documents("train", phrasing="template"), 60), tmp_path, shard_size=20,
                         progress=False)
    bad = tmp_path / "bad.tar"
    bad.write_bytes(small[0].read_bytes()[: small[0].stat().st_size // 3])
    cfg = _cfg(train=[str(data / "shapes"), *map(str, small), str(bad)], num_workers=workers,
               batch_size=3, seq_len=100, shuffle_buffer=20, resampled=resampled, cfg_drop=0.3,
               task_weights={"t2i": 0.3, "vqa": 0.1, "story": 0.1, "digit_t2i": 0.2, "digit_read": 0.3},
               pack_lookahead=lookahead)
    k, m = 7, 9  # odd k: with 2 workers the resumed stream must start at worker 1
    straight = BatchStream(cfg, tok, itok, seed=3)
    reference = _take(straight, k + m)
    first = BatchStream(cfg, tok, itok, seed=3)
    assert all(_equal(a, b) for a, b in zip(_take(first, k), reference))
    state = json.loads(json.dumps(first.state_dict()))  # plain values
    resumed = BatchStream(cfg, tok, itok, seed=3)
    resumed.load_state_dict(state)
    rest = _take(resumed, m)
    assert all(_equal(a, b) for a, b in zip(rest, reference[k:]))
    assert resumed.stats == straight.stats and resumed.stats.get("truncated_tar", 0) >= 1
    streams = [st["streams"] for st in resumed.state_dict()["workers"].values()]
    assert any(pos[0] >= 1 for s in streams for pos in s.values())  # the resumed run crossed an epoch


def test_alternative_group_schedules_reach_the_batches_and_resume(data, tok, itok):
    """model.parallel_image="4|1|8": the training stream lays each drawn image out with one of the
    schedules (several occur), and a resumed stream gives the same batches."""
    from omni.config import group_sizes

    cfg = _cfg(train=[str(data / "t2i")], resampled=True, seq_len=224)
    kw = {"groups": [4], "choices": [[4], [1], [8]], "seed": 1}
    seen = set()
    straight = _take(BatchStream(cfg, tok, itok, **kw), 6)
    for batch in straight:
        for row in batch.query_cells.tolist():
            runs = [len(list(g)) for is_q, g in itertools.groupby(row, key=lambda c: c >= 0) if is_q]
            i = 0
            while i < len(runs):  # one image's runs: a schedule's group sizes covering 16 tokens
                for k in (4, 1, 8):
                    sizes = group_sizes([k], 16)
                    if runs[i:i + len(sizes)] == sizes:
                        seen.add(k)
                        i += len(sizes)
                        break
                else:
                    raise AssertionError(f"query runs {runs[i:]} follow none of the schedules")
    assert seen == {4, 1, 8}
    first = BatchStream(cfg, tok, itok, **kw)
    _take(first, 2)
    resumed = BatchStream(cfg, tok, itok, **kw)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert all(_equal(a, b) for a, b in zip(_take(resumed, 4), straight[2:]))


def test_state_dict_round_trips_and_rejects_a_different_setup(data, tok, itok, tmp_path):
    cfg = _cfg(train=[str(data / "shapes")], resampled=True)
    stream = BatchStream(cfg, tok, itok)
    _take(stream, 2)
    torch.save(stream.state_dict(), tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)
    assert state["batches"] == 2
    with pytest.raises(ValueError, match="num_workers=0"):
        BatchStream(_cfg(train=[str(data / "shapes")], num_workers=1, resampled=True), tok, itok).load_state_dict(state)
    with pytest.raises(ValueError, match="shard list"):
        BatchStream(_cfg(train=[str(data / "digits")], resampled=True), tok, itok).load_state_dict(state)
    with pytest.raises(ValueError, match="resampled"):
        BatchStream(_cfg(train=[str(data / "t2i")], num_workers=2), tok, itok)


def test_bad_data_is_skipped_counted_and_the_rest_is_read(tmp_path, tok, itok, caplog):
    good = list(shapes.generate(30, seed=8))
    good = [d for d in good if d.task != "story"][:20]
    sample = good[1].to_sample("x")
    planted = {
        "bad_json": {"json": b"{oops"},
        "missing_keys": {"json": json.dumps({"texts": ["a"]}).encode()},
        "length_mismatch": {"json": json.dumps({"texts": ["a", None], "images": [None]}).encode()},
        "bad_item": {"json": json.dumps({"texts": ["a", "b"], "images": [None, "0.png"]}).encode()},
        "missing_image": {"json": sample["json"]},
        "bad_image": {"json": sample["json"], "0.png": b"\x89PNG\r\n\x1a\n truncated"},
    }
    big = Image.new("RGB", (64, 64), "white")
    wrong_size = Document.from_segments(["a red circle.", big], {"task": "t2i"})
    too_long = Document.from_segments([" ".join(["red circle"] * 80), good[0].images[1]], {"task": "t2i"})
    story = next(d for d in shapes.generate(60, seed=8) if d.task == "story" and len(d) == 8)
    with ShardWriter(tmp_path, "train", shard_size=1000) as w:
        for i, doc in enumerate(good):
            w.write(doc.to_sample(f"good{i:03d}"))
            if i < len(planted):
                w.write(dict(list(planted.values())[i], __key__=f"bad{i:03d}"))
        w.write(wrong_size.to_sample("wrongsize"))
        w.write(too_long.to_sample("toolong"))
        w.write(story.to_sample("longstory"))
        w.write(planted["bad_json"] | {"__key__": "badjson2"})
        w.write(planted["bad_json"] | {"__key__": "badjson3"})
        w.write(good[2].to_sample("lastgood"))
    extra = write_shards(shapes.generate(10, seed=11), tmp_path / "extra", progress=False)[0].read_bytes()
    (tmp_path / "train-000001.tar").write_bytes(extra[: len(extra) // 2])  # truncated mid-member
    from omni.data.shards import iter_tar

    survivors = len(list(iter_tar(str(tmp_path / "train-000001.tar"))))
    assert 0 < survivors < 10
    cfg = _cfg(val=[str(tmp_path / "train-000000.tar"), str(tmp_path / "train-000001.tar")], seq_len=80,
               max_warnings=1, batch_size=2)
    stream = BatchStream(cfg, tok, itok, split="val")
    with caplog.at_level(logging.WARNING, logger="omni.data"):
        docs = [d for b in stream for d in _docs(b)]
    short = sum(1 for d in shapes.generate(10, seed=11) if d.task == "story")  # stories may be cut at 80
    assert len(docs) == len(good) + 1 + 1 + survivors  # good + lastgood + the cut story + before the break
    stats = dict(stream.stats)
    assert stats.pop("too_long_cut") >= 1 and stats.pop("too_long_dropped") >= 1 and short >= 0
    assert stats == {"bad_image": 1, "bad_image_size": 1, "bad_item": 1, "bad_json": 3, "length_mismatch": 1,
                     "missing_image": 1, "missing_keys": 1, "truncated_tar": 1}
    cut_story = [d for d in docs if d["ids"].count(tok.boi_id) >= 2 and d["ids"][1] != tok.boi_id
                 and _text(tok, d["ids"]).startswith(story.texts[0][:-1])]
    assert len(cut_story) == 1 and cut_story[0]["ids"][-2] == tok.eoi_id  # ends right after an image
    bad_json_lines = [r for r in caplog.records if "bad_json" in r.getMessage()]
    assert len(bad_json_lines) == 2 and "suppressed" in bad_json_lines[1].getMessage()  # rate-limited


def test_resume_at_reseeds_by_global_position_without_replaying_the_start(data, tok, itok):
    """After a resume on another number of processes the loader cannot split its per-rank position;
    it re-seeds by the global step: deterministic for a step, and not the run's first batches again."""
    cfg = _cfg(train=[str(data / "shapes")], resampled=True)

    def first_ids(step: int | None):
        stream = BatchStream(cfg, tok, itok, rank=0, world_size=2)
        if step is not None:
            assert "re-seeded at global step" in stream.resume_at(step, 0)
        return [b.input_ids.tolist() for b in _take(stream, 3)]

    fresh = first_ids(None)
    at_40, again = first_ids(40), first_ids(40)
    assert at_40 == again  # a position gives the same stream on every resume
    assert at_40 != fresh and first_ids(41) != at_40  # not the start, and each position its own
