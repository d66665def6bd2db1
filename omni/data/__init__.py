"""Data: interleaved documents, webdataset shards, built-in datasets, templates, the batch stream.

    document.py  Document, the on-disk sample format, BadSample reasons, Stats
    shards.py    writing shards; reading them as a resumable, split, shuffled stream
    adapters.py  MMC4 / CoMM-style records -> Document
    shapes.py    the synthetic shapes world (exact ground truth)
    digits.py    real handwritten digits (scikit-learn), with a held-out split
    templates.py task phrasing, prompt/answer split, loss flags
    loader.py    BatchStream: tokenize, pack, lay out; exact resume (imports torch)
    cli.py       `omni data ...`
"""

from __future__ import annotations

from typing import Any

from omni.data.document import REASONS, BadSample, Document, Stats
from omni.data.shards import ShardWriter, expand_shards, read_documents, write_shards
from omni.data.templates import loss_flags, split_prompt

__all__ = [
    "REASONS", "BadSample", "BatchStream", "Document", "ShardWriter", "Stats", "expand_shards",
    "loss_flags", "read_documents", "split_prompt", "write_shards",
]


def __getattr__(name: str) -> Any:
    if name == "BatchStream":  # lazy: the loader imports torch, `omni --help` should not
        from omni.data.loader import BatchStream

        return BatchStream
    raise AttributeError(f"module 'omni.data' has no attribute {name!r}")
