"""The diffusion head learns real distributions and samples them faithfully, for v, eps and flow."""

import pytest
import torch

from omni.config import DiffusionHeadConfig
from omni.heads.diffusion import DiffusionHead

# Per class: a 2-component mixture of 2-D Gaussians (centre, offset of the two modes, std).
CLASSES = [
    (torch.tensor([1.0, -0.5]), torch.tensor([0.5, 0.0]), 0.15),
    (torch.tensor([-1.0, 0.5]), torch.tensor([0.0, 0.6]), 0.10),
    (torch.tensor([0.0, 1.0]), torch.tensor([0.4, 0.4]), 0.20),
]
COND_DIM = 8


def draw(k: int, n: int, g: torch.Generator) -> torch.Tensor:
    centre, offset, std = CLASSES[k]
    sign = torch.randint(0, 2, (n, 1), generator=g).float() * 2 - 1
    return centre + sign * offset + std * torch.randn(n, 2, generator=g)


def cond_of(k: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.one_hot(k, COND_DIM).float() * 3.0


def true_stats(k: int):
    centre, offset, std = CLASSES[k]
    return centre, (offset**2 + std**2).sqrt()  # mixture of +-offset modes: var = offset^2 + std^2


SETTINGS = {  # parameterization -> (config overrides, sampler, sampling steps)
    "v": ({"parameterization": "v", "schedule": "cosine", "zero_terminal_snr": True}, "ddpm", 50),
    # eps under ancestral sampling needs finer steps to keep the spread (50 steps: ~25% too narrow)
    "eps": ({"parameterization": "eps", "schedule": "scaled_linear", "zero_terminal_snr": False}, "ddpm", 200),
    "flow": ({"parameterization": "flow"}, "euler", 50),
    # the head's own time path (model.head.time_width): the condition's modulations once per token
    "flow-time-path": ({"parameterization": "flow", "time_width": 32}, "euler", 50),
}


@pytest.mark.parametrize("param", list(SETTINGS))
def test_head_learns_mixture_per_class(param):
    overrides, sampler, steps = SETTINGS[param]
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    head = DiffusionHead(DiffusionHeadConfig(width=128, depth=3, noise_copies=2, **overrides), 2, COND_DIM)
    opt = torch.optim.AdamW(head.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 1200, eta_min=2e-4)
    for _ in range(1200):
        k = torch.randint(0, len(CLASSES), (256,), generator=g)
        x = torch.cat([draw(int(c), 1, g) for c in k])  # (256, 2)
        loss = head.loss(x, cond_of(k))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    head.eval()
    for k in range(len(CLASSES)):
        cond = cond_of(torch.full((2000,), k))
        s = head.sample(cond, steps=steps, temperature=1.0, sampler=sampler, generator=torch.Generator().manual_seed(k))
        mean, std = true_stats(k)
        assert torch.all((s.mean(0) - mean).abs() < 0.1), (param, k, s.mean(0), mean)
        assert torch.all((s.std(0) / std - 1).abs() < 0.2), (param, k, s.std(0), std)


@pytest.mark.parametrize("param", ["v", "flow"])
def test_cfg_one_equals_conditional_and_temperature_zero_is_deterministic(param):
    overrides, sampler, _ = SETTINGS[param]
    torch.manual_seed(1)
    head = DiffusionHead(DiffusionHeadConfig(width=32, depth=2, **overrides), 4, COND_DIM)
    for p in head.parameters():  # leave the zero init so outputs depend on the inputs
        torch.nn.init.normal_(p, std=0.2)
    cond, uncond = torch.randn(5, COND_DIM), torch.randn(5, COND_DIM)
    a = head.sample(cond, steps=8, sampler=sampler, generator=torch.Generator().manual_seed(3))
    b = head.sample(cond, uncond, cfg_scale=1.0, steps=8, sampler=sampler, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    c = head.sample(cond, uncond, cfg_scale=3.0, steps=8, sampler=sampler, generator=torch.Generator().manual_seed(3))
    assert not torch.allclose(a, c)
    for s in ("ddim", "ddpm"):
        t0 = head.sample(cond, steps=8, temperature=0.0, sampler=s, generator=torch.Generator().manual_seed(1))
        t1 = head.sample(cond, steps=8, temperature=0.0, sampler=s, generator=torch.Generator().manual_seed(2))
        assert torch.equal(t0, t1)


def test_head_is_fp32_under_bf16_autocast():
    head = DiffusionHead(DiffusionHeadConfig(width=32, depth=2), 4, COND_DIM)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head.loss(torch.randn(6, 4).bfloat16(), torch.randn(6, COND_DIM).bfloat16())
        s = head.sample(torch.randn(3, COND_DIM).bfloat16(), steps=4)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert s.dtype == torch.float32


def test_eps_with_zero_terminal_snr_is_refused():
    with pytest.raises(ValueError, match="parameterization=v"):
        DiffusionHead(DiffusionHeadConfig(parameterization="eps", zero_terminal_snr=True), 4, 8)
