"""The image tokenizer interface and the pixel helpers every tokenizer shares.

    encode(images) -> (B, N, d_tok) float   images: uint8 (B, C, H, W) tensor or PIL images
    decode(tokens) -> (B, C, H, W) uint8
    grid           -> (rows, cols) of tokens, N = rows * cols
    order          -> the raster index of each token in sequence order (model.image.order), or None (raster)
    token_dim      -> d_tok

Implementations: `patch` and `vae` (omni.tokenizers.image), `patch-ae` (omni.tokenizers.patch_ae),
`vq-features` (omni.tokenizers.vq); `build_image_tokenizer` (omni.tokenizers.image) picks one.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image

from omni.config import ImageTokenizerConfig, draw_order


def to_uint8_tensor(images: torch.Tensor | Sequence[Image.Image] | Image.Image) -> torch.Tensor:
    """PIL image(s) or a uint8 tensor -> uint8 tensor (B, C, H, W)."""
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, torch.Tensor):
        return images if images.dim() == 4 else images[None]
    arrays = [np.asarray(im if im.mode == "RGB" else im.convert("RGB"), dtype=np.uint8) for im in images]
    sizes = {a.shape for a in arrays}
    if len(sizes) > 1:
        raise ValueError(f"images in one batch must share a size, got {sorted(sizes)}")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (B, C, H, W)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """uint8 (B, C, H, W) -> list of PIL RGB images."""
    arr = images.permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a, mode="RGB") for a in arr]


def to_patches(images: torch.Tensor, p: int) -> torch.Tensor:
    """uint8 (B, C, H, W) -> (B, N, p*p*C) in [-1, 1], patches in raster order."""
    x = images.float() / 127.5 - 1.0
    return rearrange(x, "b c (h p) (w q) -> b (h w) (p q c)", p=p, q=p)


def from_patches(patches: torch.Tensor, rows: int, cols: int, p: int) -> torch.Tensor:
    """(B, N, p*p*C) in [-1, 1] -> uint8 (B, C, H, W); values outside [-1, 1] are clamped."""
    x = rearrange(patches.float(), "b (h w) (p q c) -> b c (h p) (w q)", h=rows, w=cols, p=p, q=p)
    return ((x.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)


def fit_image(image: Image.Image, size: int) -> Image.Image:
    """Center-crop to a square and resize: how user-supplied pictures are made model-sized."""
    image = image.convert("RGB")
    w, h = image.size
    s = min(w, h)
    image = image.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return image.resize((size, size), Image.BICUBIC) if s != size else image


def weights_dir(cfg: ImageTokenizerConfig, root: str | Path | None, what: str) -> Path:
    """`model.image.path` resolved against `root` (a checkpoint directory); `what` says what it
    must hold and how to make it, for the error when the path is not set."""
    if cfg.path is None:
        raise ValueError(f"model.image.kind={cfg.kind} needs model.image.path: {what}")
    path = Path(cfg.path)
    return Path(root) / path if not path.is_absolute() and root is not None else path


class ImageTokenizer:
    """Common checks and helpers; subclasses implement `_encode` / `_decode`."""

    cfg: ImageTokenizerConfig
    multiple: int  # image sides must be multiples of this

    @property
    def grid(self) -> tuple[int, int]:
        n = self.cfg.image_size // self.multiple
        return (n, n)

    @property
    def num_tokens(self) -> int:
        rows, cols = self.grid
        return rows * cols

    @property
    def token_dim(self) -> int:
        raise NotImplementedError

    @cached_property
    def order(self) -> torch.Tensor | None:
        """(N,) the raster index of each token in sequence order, None for raster (model.image.order),
        worked out once. `encode` returns tokens in this order and `decode` takes them in it;
        `_encode` / `_decode` always work in raster order."""
        if self.cfg.order == "raster":
            return None
        rows, cols = self.grid
        b = self.cfg.block
        if rows != cols or rows % b:
            raise ValueError(f"model.image.order=blocks needs a square token grid whose side is a multiple of "
                             f"model.image.block={b}; this tokenizer's grid is {rows} x {cols}: set model.image.block "
                             "to a divisor of the side, or model.image.order=raster")
        return torch.tensor(draw_order(rows * cols, [b * b], "blocks"))

    def check(self, images: torch.Tensor) -> None:
        size = self.cfg.image_size
        for i, im in enumerate(images):
            h, w = im.shape[-2:]
            if (h, w) != (size, size):
                hint = (
                    f"a multiple of {self.multiple}, set model.image.image_size"
                    if h % self.multiple or w % self.multiple
                    else "set model.image.image_size to match, or resize with omni.tokenizers.base.fit_image"
                )
                raise ValueError(f"image {i} is {w}x{h}; this tokenizer needs {size}x{size} ({hint})")

    @torch.no_grad()
    def encode(self, images) -> torch.Tensor:
        x = to_uint8_tensor(images)
        self.check(x)
        tokens = self._encode(x)  # (B, N, d) raster
        order = self.order
        return tokens if order is None else tokens[:, order.to(tokens.device)]

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        rows, cols = self.grid
        if tokens.dim() != 3 or tokens.shape[1:] != (rows * cols, self.token_dim):
            raise ValueError(
                f"tokens of shape {tuple(tokens.shape)}; expected (B, {rows * cols}, {self.token_dim})"
            )
        order = self.order
        return self._decode(tokens if order is None else tokens[:, order.argsort().to(tokens.device)])

    def save_pretrained(self, path: str | Path) -> None:
        """Write whatever weights the tokenizer needs into a checkpoint directory."""

    def to(self, device) -> ImageTokenizer:
        return self
