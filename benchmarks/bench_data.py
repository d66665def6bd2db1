"""Data loader throughput: documents/s and tokens/s of BatchStream with 0 and 2 workers, and with
the task streams parsing each shard once (SharedShards, the default) against each on its own.

The demo recipe's stream: shapes + digits shards, the tiny preset's seq_len 160 and batch 32,
patch image tokens, task weights as in the demo. Startup (forking workers, filling shuffle
buffers) is timed apart from the steady state. Also timed: writing shards, and restoring the
stream from a saved position (the replay that exact resume costs).

    python -m benchmarks.bench_data [--quick]
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

WEIGHTS = {"t2i": 0.45, "vqa": 0.15, "caption": 0.1, "story": 0.1, "digit_t2i": 0.1, "digit_read": 0.1}


def _write_data(root: Path, quick: bool) -> tuple[list[str], float, int]:
    from omni.data import digits, shapes
    from omni.data.shards import write_shards

    n_shapes, n_digits = (600, 600) if quick else (2000, 3000)
    t = time.perf_counter()
    write_shards(shapes.generate(n_shapes, seed=0), root / "shapes", shard_size=150 if quick else 500, progress=False)
    write_shards(itertools.islice(digits.documents("train"), n_digits), root / "digits",
                 shard_size=150 if quick else 500, progress=False)
    return [str(root / "shapes"), str(root / "digits")], time.perf_counter() - t, n_shapes + n_digits


def _measure(cfg, tok, itok, batches: int) -> dict[str, Any]:
    from omni.data.loader import BatchStream

    stream = BatchStream(cfg, tok, itok, seed=0)
    t0 = time.perf_counter()
    it = iter(stream)
    next(it)
    startup = time.perf_counter() - t0
    docs = tokens = images = 0
    t1 = time.perf_counter()
    for _ in range(batches):
        b = next(it)
        docs += int(b.doc_ids.max(dim=1).values.sum())
        tokens += b.n_tokens
        images += int(b.image_mask.sum()) // itok.num_tokens
    dt = time.perf_counter() - t1
    state = stream.state_dict()
    del it  # stop the workers
    t2 = time.perf_counter()
    resumed = BatchStream(cfg, tok, itok, seed=0)
    resumed.load_state_dict(state)
    next(iter(resumed))
    restore = time.perf_counter() - t2
    return {
        "batches": batches, "seconds": round(dt, 3), "startup_s": round(startup, 3), "restore_s": round(restore, 3),
        "docs_per_s": round(docs / dt, 1), "tokens_per_s": round(tokens / dt, 1),
        "images_per_s": round(images / dt, 1), "fill": round(tokens / (batches * cfg.batch_size * cfg.seq_len), 3),
        "skipped": stream.stats,
    }


def run(quick: bool = True) -> dict[str, Any]:
    """JSON-able figures; `quick` uses less data and fewer batches (about a minute on 2 cores)."""
    import torch

    from omni.config import DataConfig, ImageTokenizerConfig
    from omni.data.shards import read_documents
    from omni.tokenizers.image import PatchTokenizer
    from omni.tokenizers.text import train_sentencepiece

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        specs, write_s, n_written = _write_data(root, quick)
        texts = [t for d in read_documents(specs, decode_images=False) for t in d.texts if t]
        tok = train_sentencepiece(texts, root / "tok", vocab_size=256)
        itok = PatchTokenizer(ImageTokenizerConfig(image_size=32, patch_size=8))
        out: dict[str, Any] = {
            "setup": {"quick": quick, "seq_len": 160, "batch_size": 32, "image_tokens": itok.num_tokens,
                      "vocab": len(tok), "torch_threads": torch.get_num_threads(), "task_weights": WEIGHTS},
            "write_docs_per_s": round(n_written / write_s, 1),
        }
        for workers in (0, 2):
            cfg = DataConfig(train=specs, seq_len=160, batch_size=32, num_workers=workers, resampled=True,
                             shuffle_buffer=200 if quick else 1000, task_weights=WEIGHTS)
            out[f"workers_{workers}"] = _measure(cfg, tok, itok, batches=8 if quick else 40)
        # Before SharedShards every task stream parsed every shard itself: the same stream, timed
        # with each task stream parsing alone (the batches are identical: tests/test_data_shards.py).
        from unittest import mock

        with mock.patch("omni.data.loader.SharedShards", lambda: None):
            out["workers_0_unshared"] = _measure(dataclasses.replace(cfg, num_workers=0), tok, itok,
                                                 batches=8 if quick else 40)
        out["shared_parse_speedup"] = round(out["workers_0"]["tokens_per_s"] / out["workers_0_unshared"]["tokens_per_s"], 2)
    return out


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
