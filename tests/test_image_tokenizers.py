"""Image tokenizers: exact patch round-trip, a real photo through a tiny AutoencoderKL, size errors."""

import numpy as np
import pytest
import torch
from PIL import Image

from omni.config import ImageTokenizerConfig
from omni.tokenizers.base import fit_image, to_pil
from omni.tokenizers.image import PatchTokenizer, VAETokenizer, build_image_tokenizer


def test_patch_roundtrip_exact_and_shapes():
    tok = PatchTokenizer(ImageTokenizerConfig(kind="patch", image_size=32, patch_size=8))
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    t = tok.encode(x)
    assert t.shape == (3, 16, 192) and tok.grid == (4, 4) and tok.token_dim == 192
    assert t.min() >= -1 and t.max() <= 1
    assert torch.equal(tok.decode(t), x)
    # raster order: token 1 is the patch right of token 0
    assert torch.equal(t[0, 1].view(8, 8, 3), (x[0, :, :8, 8:16].permute(1, 2, 0).float() / 127.5 - 1))
    pil = to_pil(x)
    assert torch.equal(tok.encode(pil), t)


def test_blocks_order_puts_each_block_together_and_round_trips():
    """model.image.order=blocks: the 2 x 2 blocks of a 4 x 4 grid one after another (one shapes-world
    object cell each), raster inside a block; decode takes that order back to the same picture."""
    raster = PatchTokenizer(ImageTokenizerConfig(kind="patch", image_size=32, patch_size=8))
    blocks = PatchTokenizer(ImageTokenizerConfig(kind="patch", image_size=32, patch_size=8, order="blocks", block=2))
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    r, b = raster.encode(x), blocks.encode(x)
    assert raster.order is None
    assert blocks.order.tolist() == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
    assert torch.equal(b, r[:, blocks.order])
    # the 4th token is the patch below-right of the first: the top-left 16 x 16 cell is tokens 0-3
    assert torch.equal(b[0, 3].view(8, 8, 3), (x[0, :, 8:16, 8:16].permute(1, 2, 0).float() / 127.5 - 1))
    assert torch.equal(blocks.decode(b), x) and not torch.equal(blocks.decode(r), x)
    whole = PatchTokenizer(ImageTokenizerConfig(kind="patch", image_size=32, patch_size=8, order="blocks", block=4))
    assert whole.order.tolist() == list(range(16))  # one block = the raster order
    with pytest.raises(ValueError, match=r"model.image.block=3; this tokenizer's grid is 4 x 4"):
        PatchTokenizer(ImageTokenizerConfig(kind="patch", image_size=32, patch_size=8, order="blocks", block=3)).encode(x)


def test_blocks_order_config_errors():
    from omni.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="model.image.block=0"):
        ImageTokenizerConfig(order="blocks", block=0)
    with pytest.raises(ConfigError, match="model.parallel_order=blocks reorders"):
        load_config("tiny", ["model.image.order=blocks", "model.parallel_image=4", "model.parallel_order=blocks"])


def test_wrong_size_names_size_and_multiple():
    tok = PatchTokenizer(ImageTokenizerConfig(kind="patch", image_size=32, patch_size=8))
    with pytest.raises(ValueError, match=r"image 0 is 40x31; this tokenizer needs 32x32 \(a multiple of 8"):
        tok.encode(torch.zeros(2, 3, 31, 40, dtype=torch.uint8))
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        PatchTokenizer(ImageTokenizerConfig(image_size=30, patch_size=8))


def test_vae_roundtrip_real_photo(tmp_path):
    skimage_data = pytest.importorskip("skimage.data")
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32,
    )
    photo = fit_image(Image.fromarray(skimage_data.astronaut()), 64)  # a real photo, 64x64
    x = torch.from_numpy(np.asarray(photo)).permute(2, 0, 1)[None]  # (1, 3, 64, 64)
    # Train the tiny VAE briefly on the photo so the round trip is meaningful, then save/reload.
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    xf = x.float() / 127.5 - 1
    for _ in range(150):
        rec = vae(xf, sample_posterior=False).sample
        loss = (rec - xf).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    vae.save_pretrained(tmp_path / "vae", safe_serialization=True)
    cfg = ImageTokenizerConfig(kind="vae", image_size=64, patch_size=2, path=str(tmp_path / "vae"), scale=0.5)
    tok = build_image_tokenizer(cfg)
    assert isinstance(tok, VAETokenizer)
    assert tok.grid == (16, 16) and tok.token_dim == 4 * 2 * 2 and tok.multiple == 4
    t = tok.encode(photo)
    assert t.shape == (1, 256, 16)
    out = tok.decode(t)
    assert out.shape == x.shape and out.dtype == torch.uint8
    err = (out.float() - x.float()).abs().mean().item()
    baseline = (x.float() - x.float().mean()).abs().mean().item()  # error of a flat grey image
    assert err < 0.5 * baseline, (err, baseline)
    # reloaded weights give identical tokens; latents are scaled by the named factor
    again = build_image_tokenizer(cfg).encode(photo)
    assert torch.equal(again, t)
    cfg1 = ImageTokenizerConfig(kind="vae", image_size=64, patch_size=2, path=str(tmp_path / "vae"), scale=1.0)
    assert torch.allclose(build_image_tokenizer(cfg1).encode(photo) * 0.5, t, atol=1e-6)
    with pytest.raises(ValueError, match="needs 64x64"):
        tok.encode(torch.zeros(1, 3, 60, 60, dtype=torch.uint8))


def test_vae_missing_dir_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no AutoencoderKL"):
        build_image_tokenizer(ImageTokenizerConfig(kind="vae", path=str(tmp_path / "none")))
