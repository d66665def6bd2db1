"""A learned per-patch autoencoder: p x p pixel patches <-> small continuous image tokens.

MAR, MMAR and Orthus draw image tokens in an autoencoder's latent space rather than in pixels: a
per-token diffusion head models a 16-value latent far more easily than a 192-value pixel patch,
and the decoder turns a roughly right latent into a clean patch. On the tiny CPU model, pixel
tokens came out as the right layout in speckled, mixed colours (the head's per-value noise),
which a pixel judge rejects.

A convolutional VAE is too slow to train inside a CPU demo, so this one maps every patch on its
own through a small MLP: a token is still exactly one patch, in raster order, and training takes
a minute or two on CPU. Latent noise during training (a fraction of the latent's spread) keeps
the decoder smooth around the codes, so an approximate sample still decodes to a clean patch.
Tokens are shifted and scaled to zero mean and unit spread (MAR scales its VAE latents too).

    DIR/autoencoder.safetensors   weights (safetensors; no pickle)
    DIR/autoencoder.json          patch_size, channels, latent_dim, hidden, shift, scale, training stats

Train one with `omni data autoencoder --shards ... --out DIR`, then use it with
`model.image.kind=patch-ae model.image.path=DIR`.

Shape legend: B images, N patches per image, P = p*p*C values per patch, z latent dim.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from omni.config import ImageTokenizerConfig
from omni.tokenizers.base import ImageTokenizer, from_patches, to_patches, to_uint8_tensor, weights_dir

WEIGHTS = "autoencoder.safetensors"
META = "autoencoder.json"


class PatchAutoencoder(nn.Module):
    def __init__(self, patch_dim: int, latent_dim: int = 16, hidden: int = 512):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(patch_dim, hidden), nn.GELU(), nn.Linear(hidden, latent_dim))
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, patch_dim)
        )

    def forward(self, patches: torch.Tensor, latent_noise: float = 0.0) -> torch.Tensor:
        z = self.encoder(patches)  # (n, z)
        if latent_noise:
            z = z + latent_noise * z.detach().std() * torch.randn_like(z)
        return self.decoder(z)  # (n, P)


def train_patch_autoencoder(
    images: Sequence[Image.Image] | torch.Tensor,
    out: str | Path,
    patch_size: int = 8,
    latent_dim: int = 16,
    hidden: int = 512,
    steps: int = 3000,
    batch_size: int = 512,
    lr: float = 2e-3,
    latent_noise: float = 0.1,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Fit the autoencoder to every patch of `images` and write it to `out`; returns its metadata."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    from omni.utils import atomic_write_text

    pixels = to_uint8_tensor(images)  # (B, C, H, W)
    b, c, h, w = pixels.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"images are {w}x{h}; the patch size {patch_size} must divide both sides")
    patches = to_patches(pixels, patch_size).flatten(0, 1)  # (B*N, P)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    ae = PatchAutoencoder(patches.shape[1], latent_dim, hidden)
    opt = torch.optim.AdamW(ae.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, min(100, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then cosine down to 10%
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * min(1.0, s / steps))))
    t0 = time.time()
    bar = tqdm(range(steps), desc="autoencoder", disable=not progress, mininterval=2)
    for step in bar:
        batch = patches[torch.randint(0, patches.shape[0], (batch_size,), generator=gen)]
        loss = (ae(batch, latent_noise) - batch).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            bar.set_postfix(loss=f"{loss.item():.5f}")
    ae.eval()
    with torch.no_grad():
        z = torch.cat([ae.encoder(chunk) for chunk in patches.split(65536)])  # (B*N, z)
        recon = torch.cat([ae.decoder(chunk) for chunk in z.split(65536)])
    err = (recon.clamp(-1, 1) - patches).abs() * 127.5  # on the 0..255 scale
    meta = {
        "patch_size": patch_size,
        "channels": c,
        "latent_dim": latent_dim,
        "hidden": hidden,
        "shift": float(z.mean()),
        "scale": float(1.0 / z.std()),
        "trained": {
            "images": b, "patches": patches.shape[0], "steps": steps, "batch_size": batch_size, "lr": lr,
            "latent_noise": latent_noise, "seed": seed, "seconds": round(time.time() - t0, 1),
            "mean_abs_error_255": round(float(err.mean()), 3),
            "values_off_by_more_than_24": round(float((err > 24).float().mean()), 5),
        },
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (WEIGHTS + ".tmp")
    save_file({k: v.contiguous() for k, v in ae.state_dict().items()}, str(tmp))
    tmp.replace(out / WEIGHTS)
    atomic_write_text(out / META, json.dumps(meta, indent=1))
    return meta


class PatchAETokenizer(ImageTokenizer):
    """Image tokens from a `PatchAutoencoder` directory: one token per patch, `latent_dim` values."""

    def __init__(self, cfg: ImageTokenizerConfig, root: str | Path | None = None):
        from safetensors.torch import load_file

        path = weights_dir(cfg, root, "train one with `omni data autoencoder --shards SHARDS --out DIR` "
                                      "and set model.image.path=DIR")
        if not (path / META).exists() or not (path / WEIGHTS).exists():
            raise FileNotFoundError(
                f"no patch autoencoder at {str(path)!r} ({META} / {WEIGHTS} missing); train one with "
                "`omni data autoencoder --shards SHARDS --out DIR`"
            )
        self.meta = json.loads((path / META).read_text())
        p, channels = int(self.meta["patch_size"]), int(self.meta["channels"])
        if cfg.patch_size != p or cfg.channels != channels:
            raise ValueError(
                f"the autoencoder at {str(path)!r} was trained on {p}x{p} patches of {channels} channels, "
                f"but model.image has patch_size={cfg.patch_size}, channels={cfg.channels}: set them to match"
            )
        if cfg.image_size % p:
            raise ValueError(f"image_size {cfg.image_size} is not a multiple of the autoencoder's patch size {p}")
        self.cfg = cfg
        self.multiple = p
        self.ae = PatchAutoencoder(p * p * channels, int(self.meta["latent_dim"]), int(self.meta["hidden"]))
        self.ae.load_state_dict(load_file(str(path / WEIGHTS)))
        self.ae.eval().requires_grad_(False)
        self.shift, self.scale = float(self.meta["shift"]), float(self.meta["scale"])

    @property
    def token_dim(self) -> int:
        return int(self.meta["latent_dim"])

    def to(self, device) -> PatchAETokenizer:
        self.ae.to(device)
        return self

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        device = next(self.ae.parameters()).device
        z = self.ae.encoder(to_patches(x.to(device), self.multiple))  # (B, N, z)
        return (z - self.shift) * self.scale

    def _decode(self, tokens: torch.Tensor) -> torch.Tensor:
        rows, cols = self.grid
        device = next(self.ae.parameters()).device
        patches = self.ae.decoder(tokens.to(device).float() / self.scale + self.shift)  # (B, N, P)
        return from_patches(patches, rows, cols, self.multiple).cpu()

    def save_pretrained(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        out = Path(path) / "autoencoder"
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.ae.state_dict().items()}, str(out / WEIGHTS))
        (out / META).write_text(json.dumps(self.meta, indent=1))
