"""`omni generate` on a tiny checkpoint saved here: JSON output, PNG files, batches, prompt building."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import OMNI, save_tiny_checkpoint
from PIL import Image

from omni.inference.prompts import build_prompt, load_image

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def ckpt(tokenizer_dir, tmp_path_factory):
    """A random tiny model saved as an inference checkpoint with quick generation defaults."""
    return save_tiny_checkpoint(tokenizer_dir, tmp_path_factory.mktemp("gen") / "ckpt", "generation.image_steps=2",
                                "generation.max_new_tokens=10", "generation.cfg_scale=2.0")


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("pics") / "green.png"
    Image.new("RGB", (48, 40), (40, 170, 60)).save(path)
    return path


def is_png(path: str, size: int = 32) -> bool:
    with Image.open(path) as im:
        return im.format == "PNG" and im.size == (size, size)


def test_generate_json_writes_pngs(ckpt, picture, tmp_path):
    out = tmp_path / "imgs"
    proc = subprocess.run(
        [str(OMNI), "generate", "--ckpt", str(ckpt), "--prompt", "a red circle", "--image", str(picture),
         "--mode", "image", "--json", "--out", str(out), "--seed", "7", "--cfg", "3"],
        check=False, capture_output=True, text=True, env=ENV, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    images = [s for s in record["segments"] if s["type"] == "image"]
    assert len(images) == 1 and is_png(images[0]["path"])
    assert Path(images[0]["path"]).parent == out
    s = record["settings"]
    assert s["seed"] == 7 and s["cfg_scale"] == 3.0 and s["image_steps"] == 2 and s["mode"] == "image"
    assert s["checkpoint"] == str(ckpt) and record["finish_reason"] == "eos"


def test_generate_jsonl_batch_in_order(ckpt, picture, tmp_path, capsys):
    from omni.cli import main

    lines = [
        {"prompt": "draw the digit 7.", "mode": "image", "seed": 3},
        {"prompt": "<image> what color is the square?", "images": [picture.name], "mode": "text"},
        {"prompt": "a green triangle", "mode": "image"},
    ]
    (picture.parent / "batch.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = main(["generate", "--ckpt", str(ckpt), "--prompts", str(picture.parent / "batch.jsonl"), "--json",
                   "--out", str(tmp_path), "--seed", "100", "--batch-size", "2"])
    finally:
        torch.set_num_threads(old)
    assert rc == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in records] == [x["prompt"] for x in lines]
    assert [r["settings"]["seed"] for r in records] == [3, 101, 102]
    assert [r["settings"]["mode"] for r in records] == ["image", "text", "image"]
    for r in (records[0], records[2]):
        assert [s["type"] for s in r["segments"]] == ["image"] and is_png(r["segments"][0]["path"])
    assert all(s["type"] == "text" for s in records[1]["segments"])


def test_generate_errors_are_one_clear_line(ckpt, tmp_path, capsys):
    from omni.cli import main

    assert main(["generate", "--ckpt", str(ckpt), "--prompt", "hi", "--image", str(tmp_path / "nope.png")]) == 2
    assert "nope.png" in capsys.readouterr().err
    assert main(["generate", "--ckpt", str(tmp_path / "missing"), "--prompt", "hi"]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\nnot json\n')
    assert main(["generate", "--ckpt", str(ckpt), "--prompts", str(bad)]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err


def test_build_prompt_places_images(picture, tmp_path):
    a, b = Image.new("RGB", (8, 8)), Image.new("RGB", (8, 8), (255, 0, 0))
    assert build_prompt("<image> left <image> right", [a, b]) == [a, " left ", b, " right"]
    assert build_prompt("caption", [a, b]) == [a, b, "caption"]
    with pytest.raises(ValueError, match="2 <image> markers but 1 images"):
        build_prompt("<image> and <image>", [a])
    assert load_image(picture).size == (48, 40)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read image"):
        load_image(junk)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image(tmp_path / "missing.png")
