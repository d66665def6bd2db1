"""Shard format, writing, streaming reads (specs, splits, shuffle, resampling) and adapters."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from omni.data.adapters import from_comm, from_mmc4, iter_adapted, to_base64_png
from omni.data.document import BadSample, Document, Stats, decode_document, decode_record
from omni.data.shards import SampleStream, epoch_shards, expand_shards, iter_tar, read_documents, write_shards


def _img(color=(255, 0, 0), size=32) -> Image.Image:
    a = np.full((size, size, 3), 255, np.uint8)
    a[8:16, 8:16] = color
    return Image.fromarray(a)


def _docs(n: int, prefix: str = "doc") -> list[Document]:
    out = []
    for i in range(n):
        segs = [f"text {i}.", _img((i % 256, 0, 0))] if i % 3 else [f"only text {i}."]
        out.append(Document.from_segments(segs, {"task": "t2i" if i % 3 else "text", "i": i}, key=f"{prefix}{i:05d}"))
    return out


@pytest.fixture
def shards(tmp_path):
    paths = write_shards(_docs(103), tmp_path, "train", shard_size=10, progress=False)
    return tmp_path, paths


def test_written_shards_follow_the_documented_schema(shards):
    _, paths = shards
    assert [p.name for p in paths] == [f"train-{i:06d}.tar" for i in range(11)]
    seen = 0
    with tarfile.open(paths[0]) as tar:
        names = tar.getnames()
        assert names[:3] == ["doc00000.json", "doc00001.json", "doc00001.0.png"]
        for name in names:
            if not name.endswith(".json"):
                continue
            record = json.loads(tar.extractfile(name).read())
            assert set(record) == {"texts", "images", "meta"}
            assert len(record["texts"]) == len(record["images"])
            for t, im in zip(record["texts"], record["images"]):
                assert (t is None) != (im is None)
                if im is not None:
                    png = Image.open(io.BytesIO(tar.extractfile(f"{name[:-5]}.{im}").read()))
                    assert png.size == (32, 32) and png.mode == "RGB"
            seen += 1
    assert seen == 10


def test_writing_is_byte_reproducible_and_round_trips(tmp_path):
    a = write_shards(_docs(12), tmp_path / "a", shard_size=5, progress=False)
    b = write_shards(_docs(12), tmp_path / "b", shard_size=5, progress=False)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    back = list(read_documents(str(tmp_path / "a")))
    assert [d.key for d in back] == [d.key for d in _docs(12)]
    for orig, got in zip(_docs(12), back):
        assert got.texts == orig.texts and got.meta == orig.meta
        for x, y in zip(orig.images, got.images):
            assert (x is None and y is None) or np.array_equal(np.asarray(x), np.asarray(y))


def test_interrupted_writer_leaves_no_partial_shard(tmp_path):
    def broken():
        yield from _docs(7)
        raise RuntimeError("generator failed")

    with pytest.raises(RuntimeError):
        write_shards(broken(), tmp_path, shard_size=5, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-000000.tar"]


def test_shard_specs_paths_braces_dirs_globs_and_pipes(shards):
    out, paths = shards
    urls = [str(p) for p in paths]
    assert expand_shards(str(out)) == urls
    assert expand_shards(f"{out}/train-{{000000..000010}}.tar") == urls
    assert expand_shards(f"{out}/train-00000*.tar") == urls[:10]
    assert expand_shards(f"{urls[0]}::{urls[1]}") == urls[:2]
    with pytest.raises(FileNotFoundError, match="omni data shapes"):
        expand_shards(f"{out}/nope.tar")
    piped = list(read_documents(f"pipe:cat {urls[0]}"))
    assert [d.key for d in piped] == [f"doc{i:05d}" for i in range(10)]


def test_plain_webdataset_reads_the_shards(shards):
    import webdataset as wds

    _, paths = shards
    ds = wds.WebDataset([str(p) for p in paths[:2]], shardshuffle=False).decode("pil")
    samples = list(ds)
    assert len(samples) == 20
    with_image = [s for s in samples if "0.png" in s]
    assert with_image and all(s["0.png"].size == (32, 32) for s in with_image)
    assert all(set(s["json"]) == {"texts", "images", "meta"} for s in samples)


def test_two_ranks_two_workers_read_each_sample_once_per_epoch(shards):
    out, _ = shards
    urls = expand_shards(str(out))
    for epoch in range(2):
        keys: Counter = Counter()
        for rank in range(2):
            for worker in range(2):
                stream = SampleStream(urls, seed=3, rank=rank, world_size=2, worker=worker, num_workers=2,
                                      shuffle_buffer=16, loop=False)
                stream.load_state([epoch, 0])
                keys.update(s["__key__"] for s in stream)
        assert len(keys) == 103 and set(keys.values()) == {1}
    # the shard order changes between epochs, identically on every rank
    assert epoch_shards(urls, 0, seed=3) != epoch_shards(urls, 1, seed=3)
    assert sorted(epoch_shards(urls, 0, seed=3)) == sorted(urls)


def test_looping_stream_covers_every_epoch_exactly(shards):
    out, _ = shards
    stream = SampleStream(expand_shards(str(out)), shuffle_buffer=8, loop=True, seed=1)
    it = iter(stream)
    first = [next(it)["__key__"] for _ in range(103)]
    second = [next(it)["__key__"] for _ in range(103)]
    assert sorted(first) == sorted(second) == sorted(d.key for d in _docs(103))
    assert first != second  # reshuffled
    assert stream.state() == [1, 103]


def test_resampled_stream_keeps_streaming(shards):
    out, _ = shards
    stream = SampleStream(expand_shards(str(out)), resampled=True, shuffle_buffer=8, seed=0, rank=1,
                          world_size=2, worker=1, num_workers=2)
    it = iter(stream)
    keys = Counter(next(it)["__key__"] for _ in range(500))  # about 5x the dataset from one worker
    assert sum(keys.values()) == 500 and max(keys.values()) > 1
    assert stream.state()[0] > 5  # epochs of 3 drawn shards each


def test_shuffle_is_seeded(shards):
    out, _ = shards
    urls = expand_shards(str(out))
    read = lambda seed: [s["__key__"] for s in SampleStream(urls, seed=seed, shuffle_buffer=20, loop=False)]
    assert read(0) == read(0) != read(1)
    assert sorted(read(0)) == sorted(read(1))


def test_truncated_and_missing_shards_are_counted(tmp_path, shards):
    _, paths = shards
    data = paths[0].read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2 + 100])
    stats = Stats()
    keys = [s["__key__"] for s in iter_tar(str(cut), stats.add)]
    assert stats.counts == {"truncated_tar": 1}
    assert 2 <= len(keys) < 10 and keys == [f"doc{i:05d}" for i in range(len(keys))]
    stats = Stats()
    assert list(iter_tar("pipe:cat /nonexistent/x.tar", stats.add)) == []
    assert stats.counts and set(stats.counts) <= {"truncated_tar", "bad_shard"}


def test_compressed_tar_is_read(tmp_path, shards):
    _, paths = shards
    gz = tmp_path / "x.tar.gz"
    subprocess.run(["gzip", "-c", str(paths[0])], stdout=gz.open("wb"), check=True)
    assert [s["__key__"] for s in iter_tar(str(gz))] == [f"doc{i:05d}" for i in range(10)]


def test_decode_rejects_each_format_violation():
    good = _docs(2)[1].to_sample()
    assert decode_document(good).texts == ["text 1.", None]
    cases = {
        "bad_json": {"json": b"{not json"},
        "missing_keys": {"json": b'{"texts": []}'},
        "length_mismatch": {"json": b'{"texts": ["a", null], "images": [null]}'},
        "bad_item": {"json": b'{"texts": ["a"], "images": ["0.png"]}'},
        "empty": {"json": b'{"texts": [], "images": []}'},
        "missing_image": {"json": good["json"]},
        "bad_image": {"json": good["json"], "0.png": b"\x89PNG garbage"},
    }
    for reason, sample in cases.items():
        with pytest.raises(BadSample) as e:
            decode_document(dict(sample, __key__="k"))
        assert e.value.reason == reason
    assert decode_record({"json": b'{"texts": ["a"], "images": [null]}'})["meta"] == {}


def test_mmc4_adapter_puts_images_before_their_sentence(tmp_path):
    red, blue = _img((255, 0, 0), 40), _img((0, 0, 255), 24)
    record = {
        "text_list": ["first.", "second.", "third."],
        "image_info": [
            {"matched_text_index": 1, "image_base64": to_base64_png(red)},
            {"matched_text_index": 0, "image_base64": to_base64_png(blue)},
            {"matched_text_index": 2, "raw_url": "http://example.com/x.jpg"},  # no bytes: dropped
        ],
        "url": "http://example.com",
    }
    doc = from_mmc4(record, image_size=32, key="m")
    assert [type(s).__name__ for s in doc.segments] == ["Image", "str", "Image", "str"]
    first, second = (np.asarray(doc.segments[i], dtype=float) for i in (0, 2))
    assert first[..., 2].mean() > first[..., 0].mean()  # the blue image (matched to sentence 0)
    assert second[..., 0].mean() > second[..., 2].mean()  # then the red one
    assert doc.segments[1] == "first." and doc.segments[3] == "second. third."
    assert all(im.size == (32, 32) for im in doc.images if im is not None)
    assert doc.meta["task"] == "interleaved"
    # bad records are skipped and counted; the rest is converted
    path = tmp_path / "mmc4.jsonl"
    bad = {"text_list": ["x"], "image_info": [{"matched_text_index": 0, "image_base64": "!!!notbase64"}]}
    path.write_text("\n".join(json.dumps(r) for r in [record, {"nope": 1}, bad, record]) + "\nnot json\n")
    stats = Stats()
    docs = list(iter_adapted("mmc4", [path], image_size=32, stats=stats))
    assert len(docs) == 2
    # the URL-only image of each converted record is dropped and counted, never downloaded
    assert stats.counts == {"missing_keys": 1, "bad_image": 1, "bad_json": 1, "image_not_embedded": 2}


def test_comm_adapter_reads_typed_items(tmp_path):
    _img((0, 255, 0)).save(tmp_path / "g.png")
    items = [
        {"type": "text", "text": "step one."},
        {"type": "image", "image": "data:image/png;base64," + to_base64_png(_img())},
        {"type": "text", "text": "step two."},
        {"type": "image", "path": "g.png"},
    ]
    doc = from_comm({"items": items, "title": "t"}, key="c", root=tmp_path)
    assert doc.texts == ["step one.", None, "step two.", None]
    assert doc.images[3].getpixel((10, 10)) == (0, 255, 0)
    assert doc.meta == {"task": "interleaved", "source": "comm", "title": "t"}
    assert from_comm(items[:1]).texts == ["step one."]
    with pytest.raises(BadSample, match="bad_item"):
        from_comm([{"type": "video"}])
    stats = Stats()  # an image known by URL only: dropped from the document, counted, not downloaded
    doc = from_comm([{"type": "text", "text": "x"}, {"type": "image", "image": "https://example.com/a.png"}], stats=stats)
    assert doc.texts == ["x"] and stats.counts == {"image_not_embedded": 1}


MALFORMED = [  # records of the wrong shape; each must be skipped and counted, never raise
    5, "a string", None, [5], [None], {"items": "x"}, {"items": [{"type": "text", "text": 3}]},
    [{"type": "image", "path": 5}], [{"type": "image", "path": ""}], [{"type": "image", "path": "/etc/hostname"}],
    [{"type": "image", "path": "../g.png"}], [{"type": "image", "path": "sub/../../g.png"}],
    [{"type": "image", "path": "sub"}], [{"type": "image", "image": "!!notbase64"}],
    {"text_list": "x"}, {"text_list": ["a"], "image_info": "oops"}, {"text_list": ["a"], "image_info": [5]},
    {"text_list": ["a"], "image_info": [{"matched_text_index": 0, "image_base64": 7}]},
]


@pytest.mark.parametrize("fmt", ["comm", "mmc4"])
def test_adapters_skip_and_count_every_malformed_record(tmp_path, fmt):
    (tmp_path / "sub").mkdir()
    _img((0, 255, 0)).save(tmp_path / "g.png")
    good = ([{"type": "text", "text": "ok."}, {"type": "image", "path": "sub/../g.png"}] if fmt == "comm"
            else {"text_list": ["ok."], "image_info": [{"matched_text_index": 0, "image_base64": to_base64_png(_img())}]})
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [good, *MALFORMED, good]) + "\n")
    stats = Stats()
    docs = list(iter_adapted(fmt, [path], image_size=32, stats=stats, root=tmp_path))
    # every malformed record is counted; the mmc4 image entry whose base64 is not a string is dropped
    # (and counted) like a URL-only one, so that record converts (its text only)
    assert sum(stats.counts.values()) == len(MALFORMED)
    assert stats.counts.get("image_not_embedded", 0) == (fmt == "mmc4")
    assert len(docs) == 2 + (fmt == "mmc4")
    assert all("ok." in d.texts and d.images.count(None) == 1 for d in (docs[0], docs[-1]))
    if fmt == "mmc4":
        assert docs[1].texts == ["a"]
    if fmt == "comm":
        assert stats.counts["bad_path"] == 3  # /etc/hostname, ../g.png, sub/../../g.png: never read
        assert stats.counts["missing_image"] == 1  # a directory named as an image


def test_comm_image_paths_stay_inside_root(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    _img((0, 0, 255)).save(root / "sub" / "b.png")
    _img((0, 255, 0)).save(tmp_path / "outside.png")
    doc = from_comm([{"type": "image", "path": "sub/./b.png"}], key="k", root=root)
    assert doc.images[0].getpixel((10, 10)) == (0, 0, 255)
    for name in (str(tmp_path / "outside.png"), "../outside.png", "sub/../../outside.png"):
        with pytest.raises(BadSample, match="bad_path.*outside --root"):
            from_comm([{"type": "image", "path": name}], key="k", root=root)


def test_convert_with_no_usable_record_fails_naming_the_format(tmp_path, capsys):
    from omni.cli import main

    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps([{"type": "text", "text": "comm, not mmc4."}]) + "\n")
    assert main(["data", "convert", "--format", "mmc4", "--input", str(path), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "no mmc4 document could be converted" in err and "is --format right?" in err
    assert main(["data", "convert", "--format", "comm", "--input", str(path), "--out", str(tmp_path / "o")]) == 0
    assert "1 documents in 1 shard(s)" in capsys.readouterr().out


def _task_streams(urls, shared, report=None):
    from omni.data.shards import select_task

    return {t: SampleStream(urls, seed=5, shuffle_buffer=8, loop=True, select=select_task([t]), shared=shared,
                            report=report if t == "digit" else None)
            for t in ("digit", "t2i", "text")}


def _interleaved_reads(streams, n: int, seed: int = 0) -> dict[str, list[str]]:
    """Advance the streams in a random interleaving, as the loader's task mixer does."""
    rng = np.random.default_rng(seed)
    its = {t: iter(s) for t, s in streams.items()}
    got: dict[str, list[str]] = {t: [] for t in streams}
    for _ in range(n):
        t = list(streams)[rng.integers(len(streams))]
        got[t].append(next(its[t])["__key__"])
    return got


@pytest.mark.parametrize("budget", [64 << 20, 1])
def test_task_streams_sharing_parsed_shards_read_what_they_read_alone(tmp_path, budget):
    """SharedShards (the loader's task streams): each stream yields, and saves as its position,
    exactly what it yields reading alone; a read error is reported as often; a shard is parsed once
    while the cache holds it; a clean shard with none of a stream's tasks is skipped."""
    from omni.data.shards import SharedShards

    a = write_shards(_docs(60), tmp_path / "a", "train", shard_size=10, progress=False)
    digits = [Document.from_segments([f"digit {i}.", _img()], {"task": "digit"}, key=f"dig{i:05d}") for i in range(12)]
    b = write_shards(digits, tmp_path / "b", "train", shard_size=6, progress=False)
    data = a[2].read_bytes()
    a[2].write_bytes(data[: len(data) // 2 + 100])  # a truncated shard among them
    urls = [str(p) for p in [*a, *b]]
    # budget 1: only the shard read last stays cached (each other one is parsed again when met again)
    shared = SharedShards(budget=budget, max_shard=1 << 20)
    alone_stats, shared_stats = Stats(), Stats()
    alone = _task_streams(urls, None, alone_stats.add)
    together = _task_streams(urls, shared, shared_stats.add)
    want, got = _interleaved_reads(alone, 400), _interleaved_reads(together, 400)
    assert got == want and all(len(v) > 60 for v in got.values())
    assert {t: s.state() for t, s in together.items()} == {t: s.state() for t, s in alone.items()}
    assert shared_stats.counts == alone_stats.counts and alone_stats.counts["truncated_tar"] >= 1
    epochs = max(s.state()[0] for s in together.values()) + 1
    if budget > 1:
        assert shared.parses == len(urls)  # every shard parsed once, however many streams and epochs
        assert shared.holds_none(str(a[0]), {"digit"}) and not shared.holds_none(str(a[0]), {"t2i"})
        assert not shared.holds_none(str(a[2]), {"digit"})  # a shard with read errors is always read
    else:
        assert shared.parses > 2 * len(urls) and len(shared._cache) == 1 and epochs >= 2


def test_shards_over_the_share_budget_are_streamed_not_cached(shards):
    from omni.data.shards import SharedShards, select_task

    out, paths = shards
    shared = SharedShards(budget=8 * min(p.stat().st_size for p in paths) - 8)  # every shard over budget / 8
    stream = SampleStream(expand_shards(str(out)), loop=False, select=select_task(["t2i"]), shared=shared)
    keys = [s["__key__"] for s in stream]
    assert len(keys) == sum(1 for d in _docs(103) if d.meta["task"] == "t2i")
    assert shared.parses == 0 and shared.used == 0
