"""Hardening figures: the first batch when a weighted task is missing from the data (issue #23).

    PYTHONPATH=. python -m benchmarks.hardening [--shards 1 20 100 200]

Writes N shapes shards holding no `story` documents, then times the first batch of a resampled
`BatchStream` whose task_weights name `story`, and counts shard reads. Before the fix the stream of
the missing task gave up only after 4 x N empty epochs of N random draws (4 N^2 reads): 0.2 / 1.1 /
6.5 / 17.7 s for 1 / 20 / 100 / 200 shards. Now one ordered pass over the shards decides it.
The other findings of the issue are reproduced by tests/test_hardening_*.py (docs/hardening.md).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def first_batch(n_shards: int, root: Path, tok) -> dict:
    import omni.data.shards as shards_mod
    from omni.config import DataConfig, ImageTokenizerConfig
    from omni.data import shapes
    from omni.data.loader import BatchStream
    from omni.data.shards import write_shards
    from omni.tokenizers.image import PatchTokenizer

    out = root / f"n{n_shards}"
    docs = [d for d in shapes.generate(20 * n_shards, seed=3, mix={"t2i": 0.5, "vqa": 0.5})]
    write_shards(docs, out, "train", shard_size=20, progress=False)
    reads = []
    real = shards_mod.iter_tar
    shards_mod.iter_tar = lambda url, report=None: (reads.append(url), real(url, report))[1]
    try:
        cfg = DataConfig(train=[str(out)], seq_len=160, batch_size=4, num_workers=0, shuffle_buffer=16,
                         resampled=True, cfg_drop=0.0, task_weights={"t2i": 1.0, "vqa": 1.0, "story": 1.0})
        stream = BatchStream(cfg, tok, PatchTokenizer(ImageTokenizerConfig()), seed=0)
        t0 = time.perf_counter()
        next(iter(stream))
        seconds = time.perf_counter() - t0
    finally:
        shards_mod.iter_tar = real
    return {"shards": n_shards, "first_batch_s": round(seconds, 3), "shard_reads": len(reads)}


def main(argv: list[str] | None = None) -> int:
    import logging

    from omni.data import shapes
    from omni.tokenizers.text import train_sentencepiece

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=int, nargs="+", default=[1, 20, 100, 200])
    args = p.parse_args(argv)
    logging.getLogger("omni.data").setLevel(logging.ERROR)  # the "task is left out" warning, once per task
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        texts = [t for d in shapes.generate(300, seed=9) for t in d.texts if t]
        tok = train_sentencepiece(texts, root / "tok", vocab_size=160)
        for n in args.shards:
            print(json.dumps(first_batch(n, root, tok)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
