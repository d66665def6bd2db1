"""The fast sampling loop of the diffusion head equals the plain one it replaced.

The head samples with per-step scalar recurrences, modulations precomputed for every step and
noise drawn up front (omni/heads/diffusion.py). The reference here is the straightforward loop:
one full net call per step on [cond; uncond] rows, diffusers' DDIMScheduler.step for v / eps,
the rectified-flow updates written out, and noise drawn one step at a time.
"""

from __future__ import annotations

import pytest
import torch

from omni.config import DiffusionHeadConfig
from omni.heads.diffusion import DETERMINISTIC, DiffusionHead
from omni.heads.schedules import make_scheduler

D_TOK, D_COND = 16, 12  # token dim a multiple of 16: per-row draws match step-by-step draws on CPU


def reference_sample(head: DiffusionHead, cond, uncond, cfg_scale, steps, temperature, sampler, gens):
    stochastic = DETERMINISTIC[sampler] == "ddpm"
    b = cond.shape[0]
    z = torch.cat([cond, uncond]) if uncond is not None and cfg_scale != 1.0 else cond

    def noise():
        return torch.cat([torch.randn(1, D_TOK, generator=g) for g in gens])

    def predict(x, t):
        out = head.net(torch.cat([x] * (z.shape[0] // b)), torch.full((z.shape[0],), t), z)
        return out if z.shape[0] == b else out[b:] + cfg_scale * (out[:b] - out[b:])

    x = noise() * temperature
    if head.cfg.parameterization == "flow":
        ts = torch.linspace(1.0, 0.0, steps + 1)
        for i in range(steps):
            t, t_next = ts[i], ts[i + 1]
            v = predict(x, float(t) * 1000.0)
            if not stochastic:
                x = x - (t - t_next) * v
                continue
            # The Gaussian posterior q(x_s | x_t, x0) of alpha = 1 - t, sigma = t (Kingma et al.'s
            # VDM form), at the predicted x0 = x - t v.
            a_ts = (1 - t) / (1 - t_next)
            var_ts = t**2 - a_ts**2 * t_next**2
            mean = a_ts * t_next**2 / t**2 * x + (1 - t_next) * var_ts / t**2 * (x - t * v)
            x = mean + (var_ts * t_next**2 / t**2).sqrt() * noise() * temperature
        return x
    sched = make_scheduler(head.cfg)
    sched.set_timesteps(steps)
    # At zero SNR's first stochastic step (alpha_t = 0) diffusers' 1 - a_prev - std^2 is exactly 0,
    # and on some CPUs it rounds to -1 ulp, whose square root is NaN (seen with diffusers 0.42 on this
    # project's machine); there alone a variance smaller by 1e-6 keeps it >= 0 (a term of size ~1e-3).
    variance = sched._get_variance

    def safe_variance(t, prev):
        v = variance(t, prev)
        return v * (1 - 1e-6) if float(sched.alphas_cumprod[t]) == 0.0 else v

    sched._get_variance = safe_variance
    for t in sched.timesteps:
        pred = predict(x, float(t))
        var_noise = noise() * temperature if stochastic else None
        x = sched.step(pred, t, x, eta=1.0 if stochastic else 0.0, variance_noise=var_noise).prev_sample
    return x


def make_head(**overrides) -> DiffusionHead:
    torch.manual_seed(0)
    head = DiffusionHead(DiffusionHeadConfig(width=32, depth=2, **overrides), D_TOK, D_COND).eval()
    with torch.no_grad():
        for p in head.parameters():  # wake the zero-initialised modulation and output
            p.normal_(0.0, 0.2)
    return head


CASES = [  # (head config, sampler, steps)
    ({"parameterization": "flow"}, "euler", 7),
    ({"parameterization": "flow"}, "stochastic", 7),
    ({"parameterization": "v", "schedule": "scaled_linear", "zero_terminal_snr": True}, "ddim", 7),
    ({"parameterization": "v", "schedule": "scaled_linear", "zero_terminal_snr": True}, "ddpm", 20),
    ({"parameterization": "v", "schedule": "cosine", "zero_terminal_snr": False}, "ddpm", 7),
    ({"parameterization": "eps", "schedule": "linear", "zero_terminal_snr": False}, "ddim", 7),
    ({"parameterization": "eps", "schedule": "scaled_linear", "zero_terminal_snr": False}, "ddpm", 7),
]


@pytest.mark.parametrize("overrides,sampler,steps", CASES)
@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_fast_sampler_equals_step_by_step_reference(overrides, sampler, steps, cfg_scale):
    head = make_head(**overrides)
    cond, uncond = torch.randn(3, D_COND), torch.randn(3, D_COND)
    kw = {"cfg_scale": cfg_scale, "steps": steps, "temperature": 0.8, "sampler": sampler}
    fast = head.sample(cond, uncond, generator=[torch.Generator().manual_seed(s) for s in (1, 2, 3)], **kw)
    ref = reference_sample(head, cond, uncond, gens=[torch.Generator().manual_seed(s) for s in (1, 2, 3)], **kw)
    torch.testing.assert_close(fast, ref, atol=2e-4, rtol=1e-4)
    two = head.sample(cond, uncond, generator=[torch.Generator().manual_seed(s) for s in (1, 2, 3)],
                      cfg_batching=False, **kw)
    torch.testing.assert_close(two, fast, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("schedule,steps", [("scaled_linear", 50), ("cosine", 7), ("cosine", 100)])
def test_ancestral_sampling_with_zero_terminal_snr_stays_finite(schedule, steps):
    """At the first step from pure noise the noise-direction weight is sqrt(1 - a' - var) = sqrt(0);
    diffusers' step computes it in float32 and, for these step counts, takes the root of a tiny
    negative number: every sample was NaN. The head clamps it at zero."""
    head = make_head(parameterization="v", schedule=schedule, zero_terminal_snr=True)
    out = head.sample(torch.randn(64, D_COND), steps=steps, sampler="ddpm", generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out).all()
    assert out.abs().max() < 1e3


def test_modulations_are_chunked_without_changing_results(monkeypatch):
    """Large head x rows x steps buffers are computed a few steps at a time: same samples."""
    head = make_head(parameterization="flow")
    cond, uncond = torch.randn(4, D_COND), torch.randn(4, D_COND)
    whole = head.sample(cond, uncond, cfg_scale=2.0, steps=5, generator=torch.Generator().manual_seed(0))
    one_step = 8 * 32 * (3 * 2 + 2) * 4  # bytes of one step: rows x width x (3 depth + 2) x fp32
    monkeypatch.setattr("omni.heads.diffusion.MODULATION_BYTES", 2 * one_step)  # chunks of 2 steps
    split = head.sample(cond, uncond, cfg_scale=2.0, steps=5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(split, whole, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("param", ["flow", "v"])
def test_loss_with_shared_condition_embedding_equals_per_copy(param):
    """The condition is embedded once per token and repeated over noise copies: same loss, same grads."""
    overrides = {"parameterization": param, "zero_terminal_snr": param == "v", "noise_copies": 3}
    head = make_head(**overrides)
    target, cond = torch.randn(5, D_TOK), torch.randn(5, D_COND, requires_grad=True)
    torch.manual_seed(7)
    loss = head.loss(target, cond)
    (g_fast,) = torch.autograd.grad(loss, cond)

    torch.manual_seed(7)  # the plain formula with the same draws
    x0, z = target.repeat(3, 1), cond.repeat(3, 1)
    noise = torch.randn_like(x0)
    if param == "flow":
        t = torch.rand(x0.shape[0])
        xt, goal, t_net = (1 - t[:, None]) * x0 + t[:, None] * noise, noise - x0, t * 1000.0
    else:
        t = torch.randint(0, head.cfg.train_steps, (x0.shape[0],))
        a = head.alphas_cumprod[t][:, None]
        xt, goal, t_net = a.sqrt() * x0 + (1 - a).sqrt() * noise, a.sqrt() * noise - (1 - a).sqrt() * x0, t.float()
    ref = torch.nn.functional.mse_loss(head.net(xt, t_net, z), goal)
    (g_ref,) = torch.autograd.grad(ref, cond)
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(g_fast, g_ref, atol=1e-6, rtol=1e-4)


def test_one_generator_per_row_is_checked():
    head = make_head(parameterization="flow")
    with pytest.raises(ValueError, match="one per row"):
        head.sample(torch.randn(3, D_COND), generator=[torch.Generator()] * 2)


GRAPH_CASES = [  # (head config, sampler, compute dtype, tolerance)
    ({"parameterization": "v", "schedule": "scaled_linear", "zero_terminal_snr": True}, "ddpm", None, 1e-5),
    ({"parameterization": "v", "schedule": "scaled_linear", "zero_terminal_snr": True}, "ddim", torch.bfloat16, 1e-2),
    ({"parameterization": "flow"}, "stochastic", None, 1e-5),
    ({"parameterization": "flow"}, "stochastic", torch.bfloat16, 1e-2),
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("overrides,sampler,dtype,tol", GRAPH_CASES)
def test_cuda_graph_replay_equals_eager(overrides, sampler, dtype, tol):
    """The captured loop replays with new conditions and noise and gives the eager result, for
    every step count of a schedule (one graph each), with one generator per row as the sampler
    passes them.

    Tolerance: the replay runs the very kernels of the eager call, so the results are expected to
    be equal; atol = rtol = 1e-5 (fp32) or 1e-2 (bf16 head) only allow cuBLAS to pick another
    algorithm under capture.
    """
    head = make_head(**overrides).cuda()
    schedule = [9, 9, 5, 5, 9]  # a step schedule's counts: capture 9, replay, capture 5, replay, replay 9
    for i, steps in enumerate(schedule):
        cond, uncond = torch.randn(4, D_COND, device="cuda"), torch.randn(4, D_COND, device="cuda")
        kw = {"cfg_scale": 3.0, "steps": steps, "sampler": sampler, "temperature": 0.9, "dtype": dtype}

        def gens(i=i):
            return [torch.Generator("cuda").manual_seed(10 * i + r) for r in range(4)]

        eager = head.sample(cond, uncond, generator=gens(), **kw)
        graphed = head.sample(cond, uncond, generator=gens(), cuda_graph=True, **kw)
        torch.testing.assert_close(graphed, eager, atol=tol, rtol=tol)
        assert graphed.dtype == torch.float32
    assert len(head._graphs) == len(set(schedule))
