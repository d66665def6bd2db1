"""Judge for handwritten digits: an independent classifier and a Fréchet distance in its features.

The classifier is trained only on held-out real digits (one stratified half; the other half
measures its own accuracy), so it never saw the generator's training data, as FID's Inception
never saw the generator's. It is a two-layer CNN trained with small random affine warps (the
half it learns from has ~150 digits; without augmentation it reaches ~0.93, with it ~0.97).
Images of any size are reduced the same way: ink (whatever differs from the border's
background) area-averaged to 16 x 16, values in [0, 1]. The Fréchet distance (Heusel et al.
2017) compares Gaussians fitted to the CNN's penultimate (64-unit) activations of two image sets.

Training is deterministic (fixed seed, one thread, forked RNG) and takes a few seconds on CPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

SIDE = 16  # classifier input side
HIDDEN = 64  # penultimate units = feature dimension of the Fréchet distance
EPOCHS = 80
BATCH = 32
LR = 5e-3


def preprocess(images: np.ndarray | Sequence[Image.Image]) -> torch.Tensor:
    """(N, H, W, 3) uint8 or PIL images -> (N, 1, 16, 16) float ink maps in [0, 1].

    Ink is whatever differs from the background, read off each image's border, so dark-on-light
    and light-on-dark renderings give the same input.
    """
    if isinstance(images, np.ndarray):
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected images (N, H, W, 3), got shape {images.shape}")
        pil = [Image.fromarray(a.astype(np.uint8)) for a in images]
    else:
        pil = list(images)
    out = np.empty((len(pil), SIDE, SIDE), dtype=np.float32)
    for i, im in enumerate(pil):
        grey = np.asarray(im.convert("L"), dtype=np.float32) / 255.0  # (H, W)
        border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
        ink = 1.0 - grey if np.median(border) >= 0.5 else grey
        small = Image.fromarray(ink, mode="F").resize((SIDE, SIDE), Image.BOX)
        out[i] = np.clip(np.asarray(small, dtype=np.float32), 0.0, 1.0)
    return torch.from_numpy(out)[:, None]  # (N, 1, S, S)


def frechet_distance(a: np.ndarray, b: np.ndarray, eps: float = 1e-6) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) for feature sets (N, D), (M, D)."""
    import warnings

    from scipy import linalg

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be (N, D) with one D, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"need at least 2 samples per set for a covariance, got {len(a)} and {len(b)}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # Fewer samples than dimensions make the covariances singular; a tiny ridge (as pytorch-fid
    # does on failure) keeps the square root finite and changes the distance by ~eps * D.
    off = np.eye(len(s_a)) * eps
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm((s_a + off) @ (s_b + off))
    covmean = np.real(covmean)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2.0 * np.trace(covmean))


def split_halves(labels: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic class-stratified halves (index arrays) of a labelled set."""
    rng = np.random.default_rng(seed)
    first, second = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        half = (len(idx) + 1) // 2
        first.append(idx[:half])
        second.append(idx[half:])
    return np.sort(np.concatenate(first)), np.sort(np.concatenate(second))


class DigitNet(nn.Module):
    """conv 3x3 (32) - pool - conv 3x3 (64) - pool - fc 64 (the features) - fc 10."""

    def __init__(self, dropout: float = 0.3):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * (SIDE // 4) ** 2, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, 10)
        self.dropout = dropout

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (B, 32, S/2, S/2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, 64, S/4, S/4)
        x = F.dropout(x.flatten(1), self.dropout, self.training)
        return F.relu(self.fc1(x))  # (B, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.dropout(self.features(x), self.dropout, self.training))


def random_warp(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Small random rotation, scale, shear and shift of a batch (B, 1, S, S): handwriting varies so."""
    B = x.shape[0]
    u = lambda *shape: torch.rand(*shape, generator=g) * 2 - 1
    ang, sx, sy, shear, t = 0.3 * u(B), 1 + 0.1 * u(B), 1 + 0.1 * u(B), 0.15 * u(B), 0.2 * u(B, 2)
    cos, sin = torch.cos(ang), torch.sin(ang)
    theta = torch.stack(
        [
            torch.stack([cos * sx, -sin * sy + shear, t[:, 0]], 1),
            torch.stack([sin * sx, cos * sy, t[:, 1]], 1),
        ],
        1,
    )  # (B, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False)


@contextlib.contextmanager
def _deterministic(seed: int) -> Iterator[None]:
    """One thread and a forked RNG: the same weights every time, the caller's RNG untouched."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class DigitJudge:
    """A digit CNN fit on one half of the held-out real digits, scored on the other half."""

    net: DigitNet
    accuracy: float  # on the held-out half it was not trained on
    n_train: int
    n_test: int
    seed: int
    test_index: np.ndarray = field(repr=False)  # indices (into the fitted set) of the scoring half

    @classmethod
    def fit(cls, images: np.ndarray, labels: np.ndarray, seed: int = 0) -> DigitJudge:
        labels = np.asarray(labels).astype(np.int64)
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        x, y = preprocess(images), torch.from_numpy(labels)
        train, test = split_halves(labels, seed)
        with _deterministic(seed):
            net = DigitNet()
            g = torch.Generator().manual_seed(seed)
            opt = torch.optim.AdamW(net.parameters(), LR, weight_decay=1e-3)
            steps = EPOCHS * ((len(train) + BATCH - 1) // BATCH)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, LR, total_steps=steps)
            xt, yt = x[train], y[train]
            net.train()
            for _ in range(EPOCHS):
                perm = torch.randperm(len(xt), generator=g)
                for i in range(0, len(xt), BATCH):
                    idx = perm[i : i + BATCH]
                    loss = F.cross_entropy(net(random_warp(xt[idx], g)), yt[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    sched.step()
            net.eval()
        judge = cls(net=net, accuracy=0.0, n_train=len(train), n_test=len(test), seed=seed, test_index=test)
        judge.accuracy = float((judge.predict(images[test]) == labels[test]).mean())
        return judge

    @classmethod
    def from_heldout(cls, seed: int = 0, cache: str | Path | None = None) -> DigitJudge:
        """Fit on the data module's held-out split (never the training split).

        `cache`: a .safetensors path (inside an eval output directory) holding the weights of an
        earlier fit, so a resumed evaluation judges with the very same network.
        """
        from omni.data.digits import load_split

        images, labels = load_split("heldout")
        if cache is not None and Path(cache).exists():
            return cls.load(cache, images, labels, seed)
        judge = cls.fit(images, labels, seed=seed)
        if cache is not None:
            judge.save(cache)
        return judge

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        from omni.utils import atomic_path

        with atomic_path(path) as tmp:
            save_file(
                {k: v.contiguous() for k, v in self.net.state_dict().items()},
                str(tmp),
                metadata={"seed": str(self.seed)},
            )

    @classmethod
    def load(cls, path: str | Path, images: np.ndarray, labels: np.ndarray, seed: int = 0) -> DigitJudge:
        from safetensors.torch import load_file

        net = DigitNet()
        net.load_state_dict(load_file(str(path)))
        net.eval()
        train, test = split_halves(np.asarray(labels), seed)
        judge = cls(net=net, accuracy=0.0, n_train=len(train), n_test=len(test), seed=seed, test_index=test)
        judge.accuracy = float((judge.predict(images[test]) == np.asarray(labels)[test]).mean())
        return judge

    @torch.no_grad()
    def predict(self, images: np.ndarray | Sequence[Image.Image]) -> np.ndarray:
        return self.net(preprocess(images)).argmax(1).numpy()

    @torch.no_grad()
    def features(self, images: np.ndarray | Sequence[Image.Image]) -> np.ndarray:
        """(N, HIDDEN) penultimate-layer activations."""
        return self.net.features(preprocess(images)).numpy().astype(np.float64)

    def identity(self) -> dict[str, Any]:
        return {
            "name": "digits-cnn",
            "trained_on": f"{self.n_train} held-out real digits (never the training split)",
            "input": f"{SIDE}x{SIDE} ink",
            "features": f"penultimate layer, {HIDDEN} units",
            "accuracy_on_real_heldout": round(self.accuracy, 4),
            "tested_on": self.n_test,
            "seed": self.seed,
        }
