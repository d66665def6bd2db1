"""Per-token diffusion head: an MLP denoiser with adaptive LayerNorm (MAR's SimpleMLPAdaLN shape).

Its face is two methods (the transformer never sees a noise schedule):

    loss(target, cond)                       target (K, d) image tokens, cond (K, D) hidden states
    sample(cond, uncond=None, cfg_scale=...) -> (B, d)

Parameterizations: `v` (v-prediction, the bf16-stable choice of MMAR and Orthus), `eps`, and
`flow` (rectified flow, predicts noise - x0). The head always computes in fp32, also under bf16
autocast: MAR's head produced NaNs under fp16 autocast.

Shape legend: K tokens with a loss, B tokens being sampled, d token dim, D backbone width,
W head width, C noise copies.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from omni.config import DiffusionHeadConfig
from omni.heads.schedules import make_scheduler

DETERMINISTIC = {"ddim": "ddim", "euler": "ddim", "ddpm": "ddpm", "stochastic": "ddpm"}


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of (possibly fractional) timesteps t (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class ResBlock(nn.Module):
    """LayerNorm -> modulate -> MLP -> gated residual; shift/scale/gate come from the condition."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.ada(c).chunk(3, dim=-1)  # 3 x (B, W)
        return x + gate * self.mlp(modulate(self.norm(x), shift, scale))


class Denoiser(nn.Module):
    """net(x_t, t, z) -> prediction, all (B, d); t is a float timestep on the 0..1000 scale."""

    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int, grad_checkpointing: bool):
        super().__init__()
        self.grad_checkpointing = grad_checkpointing
        self.time_embed = nn.Sequential(nn.Linear(256, width), nn.SiLU(), nn.Linear(width, width))
        self.cond_embed = nn.Linear(cond_dim, width)
        self.in_proj = nn.Linear(token_dim, width)
        self.blocks = nn.ModuleList(ResBlock(width) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.out = nn.Linear(width, token_dim)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed[0].weight, std=0.02)
        nn.init.normal_(self.time_embed[2].weight, std=0.02)
        # Zero modulation: every block starts as the identity, so the untrained head is stable.
        for block in self.blocks:
            nn.init.zeros_(block.ada[-1].weight)
            nn.init.zeros_(block.ada[-1].bias)
        nn.init.zeros_(self.final_ada[-1].weight)
        nn.init.zeros_(self.final_ada[-1].bias)
        # Zero output: the first prediction is 0, the mean of every target, not noise.
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        c = self.time_embed(timestep_embedding(t, 256)) + self.cond_embed(z)  # (B, W)
        h = self.in_proj(x)  # (B, W)
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(block, h, c, use_reentrant=False)
            else:
                h = block(h, c)
        shift, scale = self.final_ada(c).chunk(2, dim=-1)
        return self.out(modulate(self.final_norm(h), shift, scale))  # (B, d)


class DiffusionHead(nn.Module):
    def __init__(self, cfg: DiffusionHeadConfig, token_dim: int, cond_dim: int):
        super().__init__()
        self.cfg = cfg
        self.token_dim = token_dim
        self.net = Denoiser(token_dim, cond_dim, cfg.width, cfg.depth, cfg.grad_checkpointing)
        if cfg.parameterization != "flow":
            sched = make_scheduler(cfg)
            self.register_buffer("alphas_cumprod", sched.alphas_cumprod.clone().float(), persistent=False)

    # training --------------------------------------------------------------------------------
    def loss(self, target: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Mean denoising loss of tokens `target` (K, d) given hidden states `cond` (K, D)."""
        if target.shape[0] == 0:
            return cond.sum() * 0.0 + sum(p.sum() for p in self.parameters()) * 0.0
        with torch.autocast(device_type=cond.device.type, enabled=False):
            copies = self.cfg.noise_copies
            x0 = target.float().repeat(copies, 1)  # (C*K, d)
            z = cond.float().repeat(copies, 1)  # (C*K, D)
            noise = torch.randn_like(x0)
            n = x0.shape[0]
            if self.cfg.parameterization == "flow":
                t = torch.rand(n, device=x0.device)  # (C*K,)
                xt = (1 - t[:, None]) * x0 + t[:, None] * noise
                goal = noise - x0
                pred = self.net(xt, t * 1000.0, z)
            else:
                t = torch.randint(0, self.cfg.train_steps, (n,), device=x0.device)
                a = self.alphas_cumprod[t][:, None]  # (C*K, 1)
                xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
                goal = a.sqrt() * noise - (1 - a).sqrt() * x0 if self.cfg.parameterization == "v" else noise
                pred = self.net(xt, t.float(), z)
            return F.mse_loss(pred, goal)

    # sampling --------------------------------------------------------------------------------
    def _predict(self, x, t, z, n_cond: int, cfg_scale: float) -> torch.Tensor:
        """Run the net on [cond; uncond] rows sharing x, and mix them with guidance."""
        if z.shape[0] == n_cond:
            return self.net(x, t, z)
        out = self.net(torch.cat([x, x]), torch.cat([t, t]), z)  # (2B, d)
        cond, uncond = out[:n_cond], out[n_cond:]
        return uncond + cfg_scale * (cond - uncond)

    @torch.no_grad()
    def sample(
        self,
        cond: torch.Tensor,
        uncond: torch.Tensor | None = None,
        cfg_scale: float = 1.0,
        steps: int = 20,
        temperature: float = 1.0,
        sampler: str = "stochastic",
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """Draw one token per row of `cond` (B, D); with `uncond` (B, D) and cfg_scale != 1, guided.

        sampler: `ddim`/`euler` are deterministic given the start noise; `ddpm`/`stochastic`
        re-noise every step. `temperature` scales the start noise and every re-noising, so
        temperature 0 is fully deterministic. `generator` may be a list with one generator per
        row, so that a row's samples do not depend on the other rows of the batch.
        """
        if sampler not in DETERMINISTIC:
            raise ValueError(f"unknown sampler {sampler!r}; use one of {sorted(DETERMINISTIC)}")
        stochastic = DETERMINISTIC[sampler] == "ddpm"
        b = cond.shape[0]
        with torch.autocast(device_type=cond.device.type, enabled=False):
            z = cond.float()
            if uncond is not None and cfg_scale != 1.0:
                z = torch.cat([z, uncond.float()])  # (2B, D): one batch, not two passes

            def noise() -> torch.Tensor:
                if isinstance(generator, (list, tuple)):
                    rows = [torch.randn(1, self.token_dim, generator=g, device=g.device) for g in generator]
                    return torch.cat(rows).to(z.device)  # (B, d)
                dev = generator.device if generator is not None else z.device
                return torch.randn(b, self.token_dim, generator=generator, device=dev).to(z.device)

            x = noise() * temperature  # (B, d)
            if self.cfg.parameterization == "flow":
                return self._sample_flow(x, z, b, cfg_scale, steps, temperature, stochastic, noise)
            sched = make_scheduler(self.cfg)
            sched.set_timesteps(steps, device=z.device)
            for t in sched.timesteps:
                tt = torch.full((b,), float(t), device=z.device)
                pred = self._predict(x, tt, z, b, cfg_scale)
                eta = 1.0 if stochastic else 0.0
                var_noise = noise() * temperature if stochastic else None
                x = sched.step(pred, t, x, eta=eta, variance_noise=var_noise).prev_sample
            return x

    def _sample_flow(self, x, z, b, cfg_scale, steps, temperature, stochastic, noise) -> torch.Tensor:
        ts = torch.linspace(1.0, 0.0, steps + 1, device=z.device)
        for i in range(steps):
            t, t_next = ts[i], ts[i + 1]
            v = self._predict(x, torch.full((b,), float(t) * 1000.0, device=z.device), z, b, cfg_scale)
            if stochastic:
                # Estimate x0, then re-noise it to t_next with fresh noise.
                x0 = x - t * v
                x = (1 - t_next) * x0 + t_next * noise() * temperature
            else:
                x = x - (t - t_next) * v  # Euler step of dx/dt = v
        return x
