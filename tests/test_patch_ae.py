"""The learned per-patch autoencoder (model.image.kind=patch-ae): it learns the shapes world's
patches, round-trips through checkpoints, and refuses bad set-ups with a fix in the message."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from omni.config import ImageTokenizerConfig
from omni.data import shapes
from omni.eval.judges import shapes as SJ
from omni.tokenizers.image import build_image_tokenizer
from omni.tokenizers.patch_ae import META, PatchAETokenizer, train_patch_autoencoder


def _images(split: str, n: int):
    world, rng = shapes.ShapesWorld(32), random.Random(f"ae-{split}")
    return [world.t2i(rng)[0][1] for _ in range(n)]


@pytest.fixture(scope="module")
def ae_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ae")
    torch.manual_seed(0)
    meta = train_patch_autoencoder(_images("train", 600), out, steps=1500, batch_size=256, lr=4e-3, progress=False)
    assert meta["latent_dim"] == 16 and meta["trained"]["patches"] == 600 * 16
    return out


def test_learns_held_out_shapes(ae_dir):
    tok = build_image_tokenizer(ImageTokenizerConfig(kind="patch-ae", path=str(ae_dir)))
    assert tok.num_tokens == 16 and tok.token_dim == 16
    images = _images("heldout", 40)
    tokens = tok.encode(images)  # (40, 16, 16)
    assert tokens.shape == (40, 16, 16)
    # Tokens are normalised: roughly zero mean, unit spread (what the diffusion head expects).
    assert abs(float(tokens.mean())) < 0.3 and 0.6 < float(tokens.std()) < 1.5
    recon = tok.decode(tokens)  # uint8 (40, 3, 32, 32)
    same = 0
    for img, rec in zip(images, recon):
        want = [(d.shape, d.color) for d in SJ.detect(img)]
        got = [(d.shape, d.color) for d in SJ.detect(rec.permute(1, 2, 0).numpy())]
        same += want == got
    # 1500 short steps on 600 images: the judge already sees the same objects in most reconstructions.
    assert same >= 30, same
    err = np.abs(recon.permute(0, 2, 3, 1).numpy().astype(float) - np.stack([np.asarray(i) for i in images]))
    assert err.mean() < 6


def test_checkpoint_round_trip(ae_dir, tiny_cfg, tmp_path):
    from omni.models.model import OmniModel

    tiny_cfg.model.image.kind = "patch-ae"
    tiny_cfg.model.image.path = str(ae_dir)
    model = OmniModel.from_config(tiny_cfg.model)
    assert model.in_proj.in_features == 16 and model.head.token_dim == 16
    model.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "autoencoder" / META).exists()
    back = OmniModel.from_pretrained(tmp_path / "ckpt")
    assert back.cfg.image.path == "autoencoder"  # relative to the checkpoint, which moves with it
    images = _images("heldout", 3)
    torch.testing.assert_close(back.image_tokenizer.encode(images), model.image_tokenizer.encode(images))


def test_clear_errors(ae_dir, tmp_path):
    with pytest.raises(ValueError, match="omni data autoencoder"):
        PatchAETokenizer(ImageTokenizerConfig(kind="patch-ae"))
    with pytest.raises(FileNotFoundError, match="autoencoder.json"):
        PatchAETokenizer(ImageTokenizerConfig(kind="patch-ae", path=str(tmp_path)))
    with pytest.raises(ValueError, match="patch_size=4"):
        PatchAETokenizer(ImageTokenizerConfig(kind="patch-ae", path=str(ae_dir), patch_size=4))
    tok = PatchAETokenizer(ImageTokenizerConfig(kind="patch-ae", path=str(ae_dir)))
    with pytest.raises(ValueError, match="64x64"):
        tok.encode([shapes.render([], 64)])


def test_cli_trains_from_shards(tmp_path, capsys):
    from omni.cli import main

    assert main(["data", "shapes", "--out", str(tmp_path / "s"), "--train", "60", "--val", "5"]) == 0
    assert main(["data", "digits", "--out", str(tmp_path / "d")]) == 0
    s, d = str(tmp_path / "s" / "train-*.tar"), str(tmp_path / "d" / "train-*.tar")
    assert main(["data", "autoencoder", "--shards", s, d, "--out", str(tmp_path / "ae"), "--steps", "20",
                 "--batch-size", "64", "--max-images", "50"]) == 0
    out = capsys.readouterr().out
    assert "model.image.kind=patch-ae" in out and (tmp_path / "ae" / META).exists()
    # Every source gets its turn: the first spec alone holds more than 50 images.
    assert f"images per source: {s} 25, {d} 25" in out
