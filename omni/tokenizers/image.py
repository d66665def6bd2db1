"""Image tokenizers: pixels <-> continuous tokens (the interface: omni.tokenizers.base).

`patch` cuts pixels into p x p patches scaled to [-1, 1]; `vae` patchifies the scaled latents of a
diffusers `AutoencoderKL`; `vq-features` (omni.tokenizers.vq) uses a VQGAN's pre-quantization
features.
"""

from __future__ import annotations

from pathlib import Path

import torch
from einops import rearrange

from omni.config import ImageTokenizerConfig
from omni.tokenizers.base import ImageTokenizer, from_patches, to_patches, weights_dir
from omni.tokenizers.patch_ae import PatchAETokenizer
from omni.tokenizers.vq import VQFeatureTokenizer


class PatchTokenizer(ImageTokenizer):
    """Pixels in p x p patches, scaled to [-1, 1]. Exact up to uint8 rounding."""

    def __init__(self, cfg: ImageTokenizerConfig):
        if cfg.image_size % cfg.patch_size:
            raise ValueError(
                f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}"
            )
        self.cfg = cfg
        self.multiple = cfg.patch_size

    @property
    def token_dim(self) -> int:
        return self.cfg.patch_size**2 * self.cfg.channels

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return to_patches(x, self.cfg.patch_size)  # (B, N, p*p*C)

    def _decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return from_patches(tokens, *self.grid, self.cfg.patch_size)  # (B, C, H, W)


class VAETokenizer(ImageTokenizer):
    """A diffusers `AutoencoderKL`; latents shifted, scaled and patchified into tokens."""

    def __init__(self, cfg: ImageTokenizerConfig, vae=None, root: str | Path | None = None):
        from diffusers import AutoencoderKL

        self.cfg = cfg
        if vae is None:
            path = weights_dir(cfg, root, "a local AutoencoderKL directory")
            if not (path / "config.json").exists():
                raise FileNotFoundError(f"no AutoencoderKL at {str(path)!r} (config.json missing)")
            vae = AutoencoderKL.from_pretrained(str(path), use_safetensors=True)
        self.vae = vae.eval().requires_grad_(False)
        self.down = 2 ** (len(self.vae.config.block_out_channels) - 1)  # pixel -> latent factor
        self.multiple = self.down * cfg.patch_size

    @property
    def token_dim(self) -> int:
        return self.vae.config.latent_channels * self.cfg.patch_size**2

    def to(self, device) -> VAETokenizer:
        self.vae.to(device)
        return self

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        device = next(self.vae.parameters()).device
        x = x.to(device).float() / 127.5 - 1.0
        # The posterior mean, not a sample: the same image always gives the same tokens.
        z = self.vae.encode(x).latent_dist.mean  # (B, c, h, w)
        z = (z - self.cfg.shift) * self.cfg.scale
        p = self.cfg.patch_size
        return rearrange(z, "b c (h p) (w q) -> b (h w) (p q c)", p=p, q=p)  # (B, N, p*p*c)

    def _decode(self, tokens: torch.Tensor) -> torch.Tensor:
        rows, cols = self.grid
        p = self.cfg.patch_size
        z = rearrange(tokens.float(), "b (h w) (p q c) -> b c (h p) (w q)", h=rows, w=cols, p=p, q=p)
        z = z / self.cfg.scale + self.cfg.shift
        device = next(self.vae.parameters()).device
        x = self.vae.decode(z.to(device)).sample
        return ((x.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).cpu()

    def save_pretrained(self, path: str | Path) -> None:
        self.vae.save_pretrained(str(Path(path) / "vae"), safe_serialization=True)


def build_image_tokenizer(cfg: ImageTokenizerConfig, root: str | Path | None = None) -> ImageTokenizer:
    """The tokenizer named by `cfg.kind`; relative paths resolve against `root` (a checkpoint)."""
    if cfg.kind == "patch":
        return PatchTokenizer(cfg)
    if cfg.kind == "patch-ae":
        return PatchAETokenizer(cfg, root=root)
    if cfg.kind == "vae":
        return VAETokenizer(cfg, root=root)
    if cfg.kind == "vq-features":
        return VQFeatureTokenizer(cfg, root=root)
    raise ValueError(f"unknown image tokenizer kind {cfg.kind!r}; use patch, patch-ae, vae or vq-features")

