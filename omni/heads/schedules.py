"""Noise schedules for the diffusion head, taken from diffusers' schedulers.

v / eps parameterizations use diffusers' DDIM scheduler (its betas, alphas_cumprod and step
function, including zero-terminal-SNR rescaling and trailing timestep spacing). `flow` is
rectified flow: x_t = (1 - t) x0 + t noise, t in [0, 1], no table needed.
"""

from __future__ import annotations

from omni.config import DiffusionHeadConfig

BETA_SCHEDULES = {"cosine": "squaredcos_cap_v2", "scaled_linear": "scaled_linear", "linear": "linear"}


def make_scheduler(cfg: DiffusionHeadConfig):
    """A diffusers DDIMScheduler matching the head's training schedule (v / eps only)."""
    from diffusers import DDIMScheduler

    if cfg.parameterization == "flow":
        raise ValueError("flow matching has no discrete schedule")
    if cfg.parameterization == "eps" and cfg.zero_terminal_snr:
        raise ValueError(
            "model.head.zero_terminal_snr=true makes the last step pure noise, where eps-prediction "
            "cannot recover the image; use parameterization=v or set model.head.zero_terminal_snr=false"
        )
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
