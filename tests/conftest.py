"""Shared fixtures: a tiny text tokenizer and tiny model configs built locally (nothing downloaded)."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tests are many tiny matmuls, and CI machines are small: on 2 shared cores, OpenMP spinning
# across threads made tiny ops hundreds of times slower than one thread. Subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

torch.set_num_threads(1)


def _omni_entry_point() -> str:
    """The `omni` console script of the environment running the tests (a venv, conda env or CI
    image alike): beside this interpreter, else on PATH."""
    beside = Path(sys.executable).with_name("omni")
    found = str(beside) if beside.exists() else shutil.which("omni")
    if found is None:
        raise RuntimeError(f"no `omni` entry point beside {sys.executable} or on PATH: pip install -e . first")
    return found


OMNI = _omni_entry_point()

CORPUS = [
    "a red circle left of a blue square.",
    "a green triangle above a yellow circle.",
    "what color is the square? purple",
    "how many circles are there? three",
    "an orange square below a red triangle.",
    "draw the digit 7.",
    "this is the digit 3.",
    "the circle moves to the right.",
] * 10

TINY = [
    "model.backbone.hidden_size=64",
    "model.backbone.num_layers=2",
    "model.backbone.num_heads=4",
    "model.backbone.intermediate_size=128",
    "model.head.width=64",
    "model.head.depth=2",
]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    from omni.tokenizers.text import train_sentencepiece

    path = tmp_path_factory.mktemp("tok")
    train_sentencepiece(CORPUS, path, vocab_size=96)
    return path


@pytest.fixture
def tiny_cfg(tokenizer_dir):
    from omni.config import load_config

    return load_config("tiny", [f"model.tokenizer={tokenizer_dir}", *TINY])


@pytest.fixture
def tiny_model(tiny_cfg):
    import torch

    from omni.models.model import OmniModel

    torch.manual_seed(0)
    return OmniModel.from_config(tiny_cfg.model)


def save_tiny_checkpoint(tokenizer_dir, path, *overrides: str):
    """A random tiny model (seed 0) saved at `path` as an inference checkpoint, with `overrides`
    (e.g. quick generation defaults) in its config; returns the path."""
    from omni.config import load_config
    from omni.models.model import OmniModel

    cfg = load_config("tiny", [f"model.tokenizer={tokenizer_dir}", *TINY, *overrides])
    torch.manual_seed(0)
    model = OmniModel.from_config(cfg.model)
    model.run_config = cfg
    model.save_pretrained(path)
    return path



@contextlib.contextmanager
def decoder_rows(model):
    """Record the batch rows of every backbone call made inside the block (a list of ints)."""
    rows: list[int] = []
    original = model.decoder

    def spy(embeds, **kw):
        rows.append(embeds.shape[0])
        return original(embeds, **kw)

    model.decoder = spy
    try:
        yield rows
    finally:
        del model.decoder


def generated_doc(row, prefix: list, boi: int, n_tokens: int) -> list:
    """A sampled row's document as training segments: `prefix` (its prompt), then what it generated,
    text runs and pictures in order (a picture unfinished at the end is left out)."""
    from omni.layout import ImageSegment, TextSegment

    doc, text, k, i = list(prefix), [], 0, 0
    while i < len(row.ids):
        t = row.ids[i]
        if t == boi:
            if text:
                doc.append(TextSegment(text))
                text = []
            if k < len(row.image_tokens):
                doc.append(ImageSegment(row.image_tokens[k]))
                k += 1
            i += n_tokens + 2
            continue
        text.append(t)
        i += 1
    return doc
