"""The diffusion head's own time path (`model.head.time_width`): the condition's adaLN modulations
computed once per token and shared by its noise copies and sampling steps, the time's added.

The fast paths (training's per-token modulations broadcast over the copies, sampling's
precomputed per-step modulations) must equal the net run row by row through `Denoiser.forward`,
and must cost what the design says: far fewer matmul FLOPs than MAR's joint modulations.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY
from torch.utils.flop_counter import FlopCounterMode

from omni.config import ConfigError, DiffusionHeadConfig, GenerationConfig, load_config
from omni.heads.diffusion import DiffusionHead, guide
from omni.inference.generate import generate
from omni.models.model import OmniModel

D_TOK, D_COND = 16, 24


def make_head(time_width: int = 8, **kw) -> DiffusionHead:
    torch.manual_seed(0)
    head = DiffusionHead(DiffusionHeadConfig(width=32, depth=3, noise_copies=3, time_width=time_width, **kw),
                         D_TOK, D_COND)
    with torch.no_grad():  # the zero-initialised modulations and output would hide a wrong path
        for p in head.parameters():
            p.normal_(0.0, 0.2)
    return head


@pytest.mark.parametrize("param", ["flow", "v"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_loss_equals_the_net_run_row_by_row(param, checkpointing):
    head = make_head(parameterization=param, grad_checkpointing=checkpointing)
    k, c = 7, head.cfg.noise_copies
    g = torch.Generator().manual_seed(1)
    target, cond = torch.randn(k, D_TOK, generator=g), torch.randn(k, D_COND, generator=g, requires_grad=True)
    noise = torch.randn(c * k, D_TOK, generator=g)
    t = torch.rand(c * k, generator=g) if param == "flow" else torch.randint(0, 1000, (c * k,), generator=g)

    fast = head._loss_given_noise(target, cond, noise, t, bf16=False)
    (grad_fast,) = torch.autograd.grad(fast, cond)

    x0, z = target.repeat(c, 1), cond.repeat(c, 1)  # every noisy row with its own copy of the condition
    if param == "flow":
        xt, goal, t_net = (1 - t[:, None]) * x0 + t[:, None] * noise, noise - x0, t * 1000.0
    else:
        a = head.alphas_cumprod[t][:, None]
        xt, goal, t_net = a.sqrt() * x0 + (1 - a).sqrt() * noise, a.sqrt() * noise - (1 - a).sqrt() * x0, t.float()
    slow = F.mse_loss(head.net(xt, t_net, z), goal)
    (grad_slow,) = torch.autograd.grad(slow, cond)
    torch.testing.assert_close(fast, slow)
    torch.testing.assert_close(grad_fast, grad_slow)


@pytest.mark.parametrize("sampler", ["ddim", "stochastic"])
@pytest.mark.parametrize("guidance", ["none", "cfg", "image"])
def test_sampling_equals_the_net_stepped_by_hand(sampler, guidance):
    head = make_head().eval()
    b, steps = 4, 7
    g = torch.Generator().manual_seed(2)
    cond, uncond, image = (torch.randn(b, D_COND, generator=g) for _ in range(3))
    kw = {"none": {}, "cfg": {"uncond": uncond, "cfg_scale": 3.0},
          "image": {"uncond": uncond, "cfg_scale": 3.0, "image_cond": image, "image_cfg_scale": 1.5}}[guidance]
    got = head.sample(cond, steps=steps, sampler=sampler, temperature=0.9,
                      generator=torch.Generator().manual_seed(3), **kw)

    noise = head.sampling_noise(b, steps, sampler, 0.9, torch.Generator().manual_seed(3), cond.device)
    z = torch.cat([cond, *[kw[k] for k in ("uncond", "image_cond") if k in kw]])
    t_net, coefs = head._plan(steps, sampler == "stochastic", 0.9)
    x = noise[0]
    with torch.no_grad():
        for i, (t, (a, bc, c)) in enumerate(zip(t_net, coefs)):
            pred = head.net(torch.cat([x] * (z.shape[0] // b)), torch.full((z.shape[0],), t), z)
            pred = guide(pred, b, kw.get("cfg_scale", 1.0), kw.get("image_cfg_scale"))
            x = a * x + bc * pred + (c * noise[1 + i] if c else 0.0)
    torch.testing.assert_close(got, x)


def flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_the_time_path_takes_most_matmuls_out_of_training_and_sampling():
    joint, timed = (DiffusionHead(DiffusionHeadConfig(width=256, depth=3, noise_copies=4, time_width=w), D_TOK, 256)
                    for w in (0, 64))
    target, cond = torch.randn(100, D_TOK), torch.randn(100, 256)
    train = [flops(lambda h=h: h.loss(target, cond).backward()) for h in (joint, timed)]
    # per sampling step, guided: the difference between 30 and 10 steps over 20
    step = [(flops(lambda h=h: h.sample(cond, cond, cfg_scale=2.0, steps=30))
             - flops(lambda h=h: h.sample(cond, cond, cfg_scale=2.0, steps=10))) / 20 for h in (joint, timed)]
    assert train[1] < 0.7 * train[0], train  # tiny preset shapes: 0.63 (the MLP and the time path stay per row)
    assert step[1] < 0.4 * step[0], step  # 0.36: a step is the blocks' MLPs, in and out


def test_a_negative_width_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"model.head.time_width=-1"):
        load_config("tiny", ["model.head.time_width=-1"])


def test_a_model_with_the_time_path_saves_loads_and_draws_the_same(tokenizer_dir, tmp_path):
    cfg = load_config("tiny", [f"model.tokenizer={tokenizer_dir}", *TINY, "model.head.time_width=16"])
    torch.manual_seed(0)
    model = OmniModel.from_config(cfg.model).eval()
    with torch.no_grad():
        for p in model.head.parameters():
            if not p.any():
                p.normal_(0.0, 0.05)
    assert model.head.net.time_ada[0][-1].in_features == 16
    model.save_pretrained(tmp_path / "ckpt")
    loaded = OmniModel.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.cfg.head.time_width == 16
    gen = GenerationConfig(image_steps=3, cfg_scale=2.0, sampler="stochastic", max_new_tokens=20)
    first, again = (generate(m, [["a red circle."]], gen, seeds=[5], mode="image")[0] for m in (model, loaded))
    assert len(first.image_tokens) == 1 and first.image_tokens[0].abs().sum() > 0
    torch.testing.assert_close(first.image_tokens[0], again.image_tokens[0], atol=0, rtol=0)
