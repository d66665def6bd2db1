"""Corrupt tar headers: every field is checked, and a bad header is a shard truncated there.

Hand-crafted headers (a base-256 size of 2^62, a negative size, a size past the end of the file,
a name that is not UTF-8 or holds control characters, a non-numeric mode) must not raise out of
the reader: the samples before the bad header are kept, the shard is counted as `truncated_tar`
and named in the log, the next shard is read, a stream over it resumes exactly, and
`omni data inspect` reports instead of crashing.
"""

from __future__ import annotations

import itertools
import json
import logging
import tarfile

import pytest

from omni.data import digits
from omni.data.document import Stats
from omni.data.shards import SampleStream, iter_tar, read_documents, write_shards
from omni.data.tario import MAX_MEMBER_BYTES


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    docs = list(itertools.islice(digits.documents("train"), 20))
    return write_shards(docs, root, "train", shard_size=10, progress=False)


def header_offsets(path) -> list[int]:
    """Byte offsets of each member header (tarfile reads the good file)."""
    with tarfile.open(path) as tar:
        return [m.offset for m in tar.getmembers()]


def corrupt(src, dst, member: int, field: slice, value: bytes, fix_checksum: bool = True):
    """Copy `src` to `dst` with header `member`'s bytes `field` set to `value` (checksum recomputed)."""
    data = bytearray(src.read_bytes())
    at = header_offsets(src)[member]
    header = bytearray(data[at: at + 512])
    header[field] = value.ljust(field.stop - field.start, b"\0")
    if fix_checksum:
        header[148:156] = b" " * 8
        header[148:156] = f"{sum(header):06o}\0 ".encode()
    data[at: at + 512] = header
    dst.write_bytes(bytes(data))
    return dst


SIZE = slice(124, 136)
BAD_HEADERS = {
    "size_2_62": (SIZE, b"\x80" + (1 << 62).to_bytes(11, "big"), "member size 4611686018427387904 is over"),
    "negative_size": (SIZE, b"\xff" * 11 + b"\xfb", "negative member size -5"),
    "size_past_end": (SIZE, f"{(1 << 30):011o}".encode(), "member needs 1073741824 bytes"),
    "name_not_utf8": (slice(0, 100), b"doc\xff\xfe.json", "member name is not UTF-8"),
    "name_control_chars": (slice(0, 100), b"doc\x1b[2J.json", "member name holds control characters"),
    "mode_not_a_number": (slice(100, 108), b"zz", "bad number field"),
}


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_bad_header_is_a_truncated_shard_named_in_the_log(good, tmp_path, caplog, case):
    field, value, why = BAD_HEADERS[case]
    # member 4 = sample 2's json (each digits sample is json + one png)
    bad = corrupt(good[0], tmp_path / "bad.tar", member=4, field=field, value=value)
    stats = Stats()
    with caplog.at_level(logging.WARNING, logger="omni.data"):
        keys = [s["__key__"] for s in iter_tar(str(bad), stats.add)]
    assert stats.counts == {"truncated_tar": 1}
    assert keys == ["digits-train-0000-t2i"]  # kept: the samples before; dropped: the one the break cut
    assert str(bad) in caplog.text and why in caplog.text


def test_checksum_mismatch_and_a_size_over_the_limit(good, tmp_path):
    stats, details = Stats(), []
    report = lambda reason, detail: (stats.add(reason, detail), details.append(detail))
    bad = corrupt(good[0], tmp_path / "a.tar", 0, SIZE, b"\x80" + (1 << 62).to_bytes(11, "big"), fix_checksum=False)
    assert list(iter_tar(str(bad), report)) == [] and "checksum mismatch" in details[-1]
    over = corrupt(good[0], tmp_path / "b.tar", 0, SIZE, b"\x80" + (MAX_MEMBER_BYTES + 1).to_bytes(11, "big"))
    assert list(iter_tar(str(over), report)) == [] and "limit" in details[-1]
    assert stats.counts == {"truncated_tar": 2}


def test_reading_goes_on_with_the_next_shard(good, tmp_path):
    bad = corrupt(good[0], tmp_path / "bad.tar", 4, *BAD_HEADERS["size_2_62"][:2])
    stats = Stats()
    docs = list(read_documents([str(bad), str(good[1])], stats=stats, decode_images=False))
    assert len(docs) == 1 + 10 and stats.counts == {"truncated_tar": 1}


def test_stream_over_a_bad_header_resumes_exactly(good, tmp_path):
    bad = corrupt(good[0], tmp_path / "bad.tar", 6, *BAD_HEADERS["negative_size"][:2])
    urls = [str(bad), *map(str, good)]
    straight = SampleStream(urls, seed=1, shuffle_buffer=5)
    reference = [s["__key__"] for s in itertools.islice(straight, 40)]  # two epochs and more
    first = SampleStream(urls, seed=1, shuffle_buffer=5)
    head = [s["__key__"] for s in itertools.islice(first, 17)]
    resumed = SampleStream(urls, seed=1, shuffle_buffer=5)
    resumed.load_state(json.loads(json.dumps(first.state())))
    assert head + [s["__key__"] for s in itertools.islice(resumed, 23)] == reference


def test_data_inspect_reports_a_bad_header(good, tmp_path, capsys):
    from omni.cli import main

    bad = corrupt(good[0], tmp_path / "bad.tar", 4, *BAD_HEADERS["size_2_62"][:2])
    assert main(["data", "inspect", str(bad), str(good[1])]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["documents"] == 11 and report["skipped"] == {"truncated_tar": 1}


@pytest.mark.parametrize("n_shards", [10, 40])
def test_a_task_missing_from_the_data_costs_one_read_per_shard(tmp_path, monkeypatch, n_shards):
    import time

    import omni.data.shards as shards_mod

    docs = list(itertools.islice(digits.documents("train"), n_shards))
    urls = [str(p) for p in write_shards(docs, tmp_path, "train", shard_size=1, progress=False)]
    reads = []
    real = shards_mod.iter_tar
    monkeypatch.setattr(shards_mod, "iter_tar", lambda url, report=None: (reads.append(url), real(url, report))[1])
    from omni.data.shards import SampleStream, select_task

    t0 = time.perf_counter()
    stream = SampleStream(urls, seed=0, resampled=True, loop=True, select=select_task(["no_such_task"]))
    assert list(stream) == []  # ends: the task is not in the data
    elapsed = time.perf_counter() - t0
    assert len(reads) <= 2 * n_shards, f"{len(reads)} shard reads for {n_shards} shards"  # was 4 x n^2
    assert elapsed < 5
    present = SampleStream(urls, seed=0, resampled=True, loop=True, select=select_task(["digit_t2i"]))
    assert len(list(itertools.islice(present, 3 * n_shards))) == 3 * n_shards  # a present task keeps streaming
