"""Real handwritten digits as documents: scikit-learn's bundled `load_digits` (no download).

1797 grey 8 x 8 scans of digits written by people (UCI optical recognition set, ink 0-16).
Each is rendered as dark ink on white at the canvas size by nearest-neighbour upscaling (at 32
px every digit cell becomes a crisp 4 x 4 block, so one 8 x 8 patch token covers 2 x 2 cells).

The split is a fixed permutation (seed 0, independent of any run seed): HELDOUT images are never
written to training shards, so reading accuracy on them measures generalization to unseen
handwriting. Every image gives two documents:

    digit_t2i   "draw the digit 7."  -> image           (or "Can you draw a 7?", ...: omni.data.phrasing)
    digit_read  image [, "what digit is this?"] -> "this is the digit 7."
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache

import numpy as np
from PIL import Image

from omni.data import templates as T
from omni.data.document import Document

N_HELDOUT = 297  # 1797 = 1500 train + 297 held out
READ_REQUEST_SHARE = 0.5  # reading documents that ask "what digit is this?" after the picture
SPLITS = ("train", "heldout")


@lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images.astype(np.float32), data.target.astype(np.int64)  # (1797, 8, 8), (1797,)


def split_indices(split: str) -> np.ndarray:
    """Indices into `load_digits()` of `split` ("train" or "heldout"), disjoint and fixed."""
    if split not in SPLITS:
        raise ValueError(f"unknown digits split {split!r}; use one of {SPLITS}")
    images, _ = _raw()
    order = np.random.default_rng(0).permutation(len(images))
    return np.sort(order[N_HELDOUT:] if split == "train" else order[:N_HELDOUT])


def render_digit(arr8x8: np.ndarray, size: int = 32) -> Image.Image:
    """An 8 x 8 ink array (0-16) -> PIL RGB, dark ink on white, nearest-neighbour upscaled."""
    arr = np.asarray(arr8x8, dtype=np.float32)
    if arr.shape != (8, 8):
        raise ValueError(f"a digit is an 8x8 array, got shape {arr.shape}")
    grey = np.round(255.0 * (1.0 - np.clip(arr, 0, 16) / 16.0)).astype(np.uint8)  # (8, 8)
    img = Image.fromarray(np.stack([grey] * 3, axis=-1), mode="RGB")
    return img.resize((size, size), Image.NEAREST) if size != 8 else img


def load_split(split: str, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, size, size, 3) rendered as in the shards, labels int64 (N,))."""
    images, labels = _raw()
    idx = split_indices(split)
    out = np.stack([np.asarray(render_digit(images[i], size)) for i in idx])  # (N, H, W, 3)
    return out, labels[idx]


def documents(split: str, size: int = 32, phrasing: str = "train") -> Iterator[Document]:
    """Two documents per image of `split` (t2i then read), keys `digits-SPLIT-INDEX-TASK`; their
    requests worded as `phrasing` picks (omni.data.phrasing: train, heldout or template)."""
    import random

    from omni.data import phrasing as P

    P.check_mode(phrasing)
    images, labels = _raw()
    for i in split_indices(split):
        digit = int(labels[i])
        img = render_digit(images[i], size)
        base = {"digit": digit, "index": int(i), "split": split, "canvas": size}
        key = f"digits-{split}-{i:04d}-t2i"
        say = P.Phrasing(phrasing, random.Random(f"{key}/phrasing"))  # a stream of its own per document
        text = say.say("digit_t2i", d=digit, a=P.digit_article(digit))
        yield Document.from_segments([text, img], dict(base, task="digit_t2i", **say.meta()), key=key)
        key = f"digits-{split}-{i:04d}-read"
        say = P.Phrasing(phrasing, random.Random(f"{key}/phrasing"))
        request = [say.say("digit_read")] if say.request(READ_REQUEST_SHARE) else []
        yield Document.from_segments([img, *request, T.digit_read_text(digit)], dict(base, task="digit_read", **say.meta()),
                                     key=key)
