"""Noise schedules for the diffusion head: diffusers' DDIM schedule, computed without diffusers.

v / eps parameterizations use the schedule of diffusers' DDIMScheduler (betas, zero-terminal-SNR
rescaling, alphas_cumprod, trailing timestep spacing). It is written out here in the same float32
/ numpy arithmetic, so the head needs no diffusers at inference (GPU images often lack it);
tests/test_decode_head.py checks both tables equal diffusers' bit for bit. `flow` is
rectified flow: x_t = (1 - t) x0 + t noise, t in [0, 1], no table needed.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from omni.config import DiffusionHeadConfig

BETA_SCHEDULES = {"cosine": "squaredcos_cap_v2", "scaled_linear": "scaled_linear", "linear": "linear"}
MAX_BETA = 0.999  # diffusers' cap on the cosine schedule's betas (Nichol & Dhariwal)


def _check(cfg: DiffusionHeadConfig) -> None:
    if cfg.parameterization == "flow":
        raise ValueError("flow matching has no discrete schedule")
    if cfg.parameterization == "eps" and cfg.zero_terminal_snr:
        raise ValueError(
            "model.head.zero_terminal_snr=true makes the last step pure noise, where eps-prediction "
            "cannot recover the image; use parameterization=v or set model.head.zero_terminal_snr=false"
        )
    if cfg.schedule not in BETA_SCHEDULES:
        raise ValueError(f"model.head.schedule={cfg.schedule!r}; use one of {list(BETA_SCHEDULES)}")


def _betas(cfg: DiffusionHeadConfig) -> torch.Tensor:
    # On the CPU whatever the default device (models are also built on `meta` to count FLOPs): the
    # head reads the table back once, as host floats.
    n, cpu = cfg.train_steps, torch.device("cpu")
    if cfg.schedule == "linear":
        return torch.linspace(cfg.beta_start, cfg.beta_end, n, dtype=torch.float32, device=cpu)
    if cfg.schedule == "scaled_linear":
        return torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, n, dtype=torch.float32, device=cpu) ** 2

    def alpha_bar(t: float) -> float:  # the Glide cosine schedule
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), MAX_BETA) for i in range(n)]
    return torch.tensor(betas, dtype=torch.float32, device=cpu)


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alphas_cumprod) so the last step is pure noise (Lin et al. 2023, Alg. 1)."""
    root = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root -= last
    root *= first / (first - last)
    bar = root**2
    alphas = torch.cat([bar[0:1], bar[1:] / bar[:-1]])
    return 1 - alphas


def alphas_cumprod(cfg: DiffusionHeadConfig) -> torch.Tensor:
    """(train_steps,) float32 cumulative signal fractions of the head's training schedule."""
    _check(cfg)
    betas = _betas(cfg)
    if cfg.zero_terminal_snr:
        betas = _rescale_zero_terminal_snr(betas)
    return torch.cumprod(1.0 - betas, dim=0)


def trailing_timesteps(train_steps: int, steps: int) -> list[int]:
    """The `steps` training timesteps a sampler visits, from t = T - 1 down ("trailing" spacing:
    the first step starts from pure noise, which zero terminal SNR needs)."""
    if not 1 <= steps <= train_steps:
        raise ValueError(f"steps={steps}: the head samples with 1 to model.head.train_steps={train_steps} steps")
    ratio = train_steps / steps
    return [int(t) for t in np.round(np.arange(train_steps, 0, -ratio)).astype(np.int64) - 1]


def make_scheduler(cfg: DiffusionHeadConfig):
    """A diffusers DDIMScheduler with the same schedule: the step-by-step reference of the tests."""
    from diffusers import DDIMScheduler

    _check(cfg)
    return DDIMScheduler(
        num_train_timesteps=cfg.train_steps,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        beta_schedule=BETA_SCHEDULES[cfg.schedule],
        prediction_type="v_prediction" if cfg.parameterization == "v" else "epsilon",
        rescale_betas_zero_snr=cfg.zero_terminal_snr,
        timestep_spacing="trailing",  # the first sampling step starts at t = T (needed for zero SNR)
        clip_sample=False,
        set_alpha_to_one=True,
    )
