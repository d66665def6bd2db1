"""Per-token diffusion head: an MLP denoiser with adaptive LayerNorm (MAR's SimpleMLPAdaLN shape).

Its face is two methods (the transformer never sees a noise schedule):

    loss(target, cond)                       target (K, d) image tokens, cond (K, D) hidden states
    sample(cond, uncond=None, cfg_scale=..., image_cond=None, image_cfg_scale=None) -> (B, d)

Parameterizations: `v` (v-prediction, the bf16-stable choice of MMAR and Orthus), `eps`, and
`flow` (rectified flow, predicts noise - x0). The head computes in fp32, also under autocast
(MAR's head produced NaNs under fp16 autocast); with `bf16_train` its training matmuls follow a
bf16 autocast (targets, noise and the loss stay fp32).

Sampling is the hot loop of image generation (steps x tokens net calls), so it is written for
speed without changing the math: every sampler (DDIM, DDPM, Euler, stochastic flow) is a linear
recurrence x <- a_i x + b_i pred + n_i noise_i with per-step scalars computed once; the parts of
the net that do not depend on x (condition embedding, time embedding, all adaLN modulations of
every step) run as a few large matmuls before the loop; all noise is drawn up front; and on CUDA
the loop can be captured once as a CUDA graph and replayed for every later token. The per-step
scalars and the timestep tensor are made once per (steps, sampler kind, temperature, device) and
cached, so after the first call `sample` reads nothing back from the device and copies nothing to
it (tests/test_decode_head.py counts both). With `dtype=torch.bfloat16` the net's matmuls run in
bf16 while the recurrence and the guidance combination stay fp32.

With `time_width` (the head's own time path, `Denoiser`) the modulations split into the
condition's, computed once per token and shared by its noise copies in training and by every step
in sampling, and a narrow time path's, added; a sampling step is then the blocks' MLPs alone.

Guidance combines the net's predictions linearly (`guide`): every sampler's update is affine in
the prediction with the same coefficients for all rows, so combining flow velocities, v or eps
predictions is combining the implied noise estimates, whatever the parameterization.

Shape legend: K tokens with a loss, B tokens being sampled, R = B, 2B or 3B rows with CFG, S steps,
d token dim, D backbone width, W head width, C noise copies.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from omni.config import SAMPLERS, DiffusionHeadConfig
from omni.heads.schedules import alphas_cumprod, trailing_timesteps

# Each sampler name (the list lives in omni.config.SAMPLERS) -> the update it runs: `ddim` steps are
# deterministic given the start noise, `ddpm` steps draw fresh noise (the schedule's posterior).
DETERMINISTIC = {"ddim": "ddim", "euler": "ddim", "ddpm": "ddpm", "stochastic": "ddpm"}
assert set(DETERMINISTIC) == set(SAMPLERS), "omni.config.SAMPLERS and the head's table must name the same samplers"
MODULATION_BYTES = 64 << 20  # sampling precomputes adaLN modulations for as many steps as fit here
PLAN_CACHE = 256  # sampling plans kept per head (a step schedule uses one per distinct step count)
SAMPLE_DTYPES = (torch.float32, torch.bfloat16)  # compute dtypes of the net when sampling


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of (possibly fractional) timesteps t (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def guide(pred: torch.Tensor, b: int, cfg_scale: float, image_cfg_scale: float | None = None) -> torch.Tensor:
    """The guided prediction (B, d) from the rows' predictions (R, d), stacked [cond, uncond(, image)].

    R = B: no guidance. R = 2B: classifier-free guidance u + s (c - u). R = 3B: InstructPix2Pix's
    image-guided CFG u + s_img (i - u) + s (c - i), where i is the prediction that sees the
    pictures but not the text; with s_img = s it is the 2B formula again.
    """
    if pred.shape[0] == b:
        return pred
    if pred.shape[0] == 2 * b:
        cond_pred, uncond_pred = pred.split(b)
        return torch.lerp(uncond_pred, cond_pred, cfg_scale)  # uncond + s (cond - uncond)
    cond_pred, uncond_pred, image_pred = pred.split(b)
    return torch.lerp(uncond_pred, image_pred, image_cfg_scale).add_(cond_pred - image_pred, alpha=cfg_scale)


# Rows drawn together (group attention): index (G, k) of each group's rows (-1 pads a group shorter
# than the longest, k) and pos (R,), each row's place in the flattened (G, k). Groups are consecutive
# runs of the rows, in order (`omni.layout.group_index` makes them from the sizes), so without
# padding (G * k = R) index is arange(R).view(G, k).
Groups = tuple[torch.Tensor, torch.Tensor]


def repeat_groups(groups: Groups, rows: int, copies: int) -> Groups:
    """`groups` of `rows` rows for `copies` stacked copies of those rows (device arithmetic only)."""
    index, pos = groups
    if copies == 1:
        return groups
    c = torch.arange(copies, device=index.device)
    index = torch.where(index >= 0, index + rows * c[:, None, None], -1).flatten(0, 1)  # (C*G, k)
    pos = (pos + groups[0].numel() * c[:, None]).flatten()  # (C*R,)
    return index, pos


class GroupAttention(nn.Module):
    """Self-attention among the tokens of each group (parallel decoding's jointly drawn tokens):
    rows (R, W) -> (R, W); a row sees only its own group. Its output projection starts at zero."""

    def __init__(self, width: int, dim: int = 0):
        super().__init__()
        dim = dim or width
        if dim % 64 and dim > 64:
            raise ValueError(f"model.head.group_attention_dim={dim}: use a multiple of 64 (heads of 64) or at most 64")
        self.heads = max(1, dim // 64)
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * dim)
        self.proj = nn.Linear(dim, width)

    def forward(self, x: torch.Tensor, groups: Groups) -> torch.Tensor:
        index, _ = groups
        G, k = index.shape
        h = self.norm(x)
        if G * k == x.shape[0]:  # groups of one size, the rows in order: one dense batch (a view)
            return self.proj(self._attend(h.view(G, k, -1)).reshape(G * k, -1))  # (R, W)
        # Groups of several sizes (index rows hold a group's rows first, then -1): each size is its
        # own dense batch, so no group is padded to the largest and no mask is needed.
        sizes = (index >= 0).sum(1)  # (G,)
        rows, attended = [], []
        for s in sizes.unique().tolist():
            rows.append(index[sizes == s, :s].flatten())  # the rows of every group of size s, group by group
            attended.append(self._attend(h[rows[-1]].view(-1, s, h.shape[-1])).flatten(0, 1))
        out = torch.cat(attended)
        return self.proj(out.new_zeros(x.shape[0], out.shape[-1]).index_copy(0, torch.cat(rows), out))  # (R, W)

    def _attend(self, h: torch.Tensor) -> torch.Tensor:
        """Attention within each group of h (G, k, W) -> (G, k, dim)."""
        G, k, _ = h.shape
        q, key, v = self.qkv(h).view(G, k, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # 3 x (G, H, k, dim/H)
        return F.scaled_dot_product_attention(q, key, v).transpose(1, 2).reshape(G, k, -1)


class ResBlock(nn.Module):
    """LayerNorm -> modulate -> MLP -> gated residual; shift/scale/gate come from the condition.
    With `group_attention` the block first adds attention among each group's tokens."""

    def __init__(self, width: int, group_attention: bool = False, group_attention_dim: int = 0):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))
        self.mix = GroupAttention(width, group_attention_dim) if group_attention else None

    def forward(self, x: torch.Tensor, c: torch.Tensor, groups: Groups | None = None) -> torch.Tensor:
        shift, scale, gate = self.ada(c).chunk(3, dim=-1)  # 3 x (B, W)
        return self.modulated(x, shift, 1 + scale, gate, groups)

    def mixed(self, x: torch.Tensor, groups: Groups | None) -> torch.Tensor:
        if self.mix is None:
            return x
        if groups is None:
            raise ValueError("this head denoises groups of tokens together (model.head.group_attention): "
                             "pass the rows' groups")
        return x + self.mix(x, groups)

    def modulated(self, x: torch.Tensor, shift: torch.Tensor, scale1: torch.Tensor, gate: torch.Tensor,
                  groups: Groups | None = None) -> torch.Tensor:
        """The block given its modulation (scale1 = 1 + scale), which sampling precomputes."""
        x = self.mixed(x, groups)
        return torch.addcmul(x, gate, self.mlp(torch.addcmul(shift, self.norm(x), scale1)))


class Denoiser(nn.Module):
    """net(x_t, t, z) -> prediction, all (B, d); t is a float timestep on the 0..1000 scale.

    time_width 0 (MAR's net): every adaLN modulation is a function of the sum of the time and
    condition embeddings, so it is computed once per noisy row (noise copy in training, denoising
    step in sampling). time_width N > 0: the modulations are those of the condition alone, computed
    once per token, plus those of an N-wide time embedding (one small matmul per block for a row),
    so the rows of a token share the costly part."""

    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int, grad_checkpointing: bool,
                 group_attention: bool = False, group_attention_dim: int = 0, time_width: int = 0):
        super().__init__()
        self.grad_checkpointing = grad_checkpointing
        self.time_width = time_width
        tw = time_width or width
        self.time_embed = nn.Sequential(nn.Linear(256, tw), nn.SiLU(), nn.Linear(tw, tw))
        self.cond_embed = nn.Linear(cond_dim, width)
        self.in_proj = nn.Linear(token_dim, width)
        self.blocks = nn.ModuleList(ResBlock(width, group_attention, group_attention_dim) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.out = nn.Linear(width, token_dim)
        # The time's own modulations (time_width > 0): (shift, scale, gate) per block, then (shift, scale).
        self.time_ada = nn.ModuleList(
            nn.Sequential(nn.SiLU(), nn.Linear(time_width, n * width)) for n in [3] * depth + [2]
        ) if time_width else None
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
            if block.mix is not None:  # groups start as independent tokens
                nn.init.zeros_(block.mix.proj.weight)
                nn.init.zeros_(block.mix.proj.bias)
        nn.init.zeros_(self.final_ada[-1].weight)
        nn.init.zeros_(self.final_ada[-1].bias)
        for ada in self.time_ada or []:
            nn.init.zeros_(ada[-1].weight)
            nn.init.zeros_(ada[-1].bias)
        # Zero output: the first prediction is 0, the mean of every target, not noise.
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def embed_time(self, t: torch.Tensor) -> torch.Tensor:
        return self.time_embed(timestep_embedding(t, 256))  # (B, W), or (B, time_width)

    def forward(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor, groups: Groups | None = None) -> torch.Tensor:
        if self.time_width:
            return self.modulated(self.in_proj(x), self.conditioned(self.cond_embed(z), self.embed_time(t)), groups)
        return self.body(x, self.embed_time(t) + self.cond_embed(z), groups)

    def body(self, x: torch.Tensor, c: torch.Tensor, groups: Groups | None = None) -> torch.Tensor:
        """The net given its condition c = time + condition embedding (B, W) (and, with group
        attention, the rows' `Groups`); MAR's net (time_width 0) only."""
        assert not self.time_width, "a net with its own time modulations has no joint condition: use `conditioned`"
        h = self.in_proj(x)  # (B, W)
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(block, h, c, groups, use_reentrant=False)
            else:
                h = block(h, c, groups)
        return self.head_out(h, self.final_ada(c))

    def head_out(self, h: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        shift, scale = mod.chunk(2, dim=-1)  # 2 x (B, W)
        return self.out(modulate(self.final_norm(h), shift, scale))  # (B, d)

    def modulations(self, c: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        """adaLN modulations for conditions c (..., W), ready to use: (shift, 1 + scale, gate) per
        block, then (shift, 1 + scale) of the output layer; each (..., W)."""
        out = []
        for ada in [*(block.ada for block in self.blocks), self.final_ada]:
            parts = list(ada(c).chunk(ada[-1].out_features // c.shape[-1], dim=-1))
            parts[1] = parts[1] + 1
            out.append(tuple(parts))
        return out

    def conditioned(self, zc: torch.Tensor, temb: torch.Tensor,
                    zmods: list[tuple[torch.Tensor, ...]] | None = None) -> list[tuple[torch.Tensor, ...]]:
        """`modulations` of condition embeddings zc at time embeddings temb (`embed_time`), the two
        broadcast against each other (zc (1, R, W) and temb (S, 1, W): every step of every row).
        With time_width, the condition's modulations are computed at zc's shape (or given, `zmods`
        = `modulations(zc)`) and the time's at temb's, then added: a token's copies or steps share
        the first."""
        if not self.time_width:
            return self.modulations(temb + zc)
        timed = [ada(temb).chunk(ada[-1].out_features // zc.shape[-1], dim=-1) for ada in self.time_ada]
        zmods = self.modulations(zc) if zmods is None else zmods
        return [tuple(m + t for m, t in zip(mod, tmod)) for mod, tmod in zip(zmods, timed)]

    def modulated(self, h: torch.Tensor, mods: list[tuple[torch.Tensor, ...]], groups: Groups | None = None) -> torch.Tensor:
        """The net after in_proj, given precomputed `modulations` (h (R, W) -> (R, d))."""
        for block, mod in zip(self.blocks, mods):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(block.modulated, h, *mod, groups, use_reentrant=False)
            else:
                h = block.modulated(h, *mod, groups)
        shift, scale1 = mods[-1]
        return self.out(torch.addcmul(shift, self.final_norm(h), scale1))  # (R, d)

    def sampling_weights(self, dtype: torch.dtype = torch.float32) -> tuple:
        """The weights of `fast_modulated`, transposed (and cast) once per sampling call: a step
        then runs addmm on them directly, the kernel nn.Linear runs, without a transpose or an
        autocast copy per step. Returns (in_proj, blocks, out); each linear is (weight^T, bias)."""
        def lin(m: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
            return m.weight.to(dtype).t(), m.bias.to(dtype)

        blocks = [(b.norm.weight, b.norm.bias, b.norm.eps, *lin(b.mlp[0]), *lin(b.mlp[2])) for b in self.blocks]
        return lin(self.in_proj), blocks, lin(self.out)

    def fast_modulated(self, h: torch.Tensor, weights: tuple, mods: list[tuple[torch.Tensor, ...]],
                       groups: Groups | None = None) -> torch.Tensor:
        """`modulated` on `sampling_weights`, op for op the same kernels (h (R, W) -> (R, d))."""
        _, blocks, (w_out, b_out) = weights
        width = (h.shape[-1],)
        for block, (nw, nb, eps, w1, b1, w2, b2), (shift, scale1, gate) in zip(self.blocks, blocks, mods):
            h = block.mixed(h, groups)
            u = torch.addcmul(shift, F.layer_norm(h, width, nw, nb, eps), scale1)
            h = torch.addcmul(h, gate, torch.addmm(b2, F.silu(torch.addmm(b1, u, w1)), w2))
        shift, scale1 = mods[-1]
        return torch.addmm(b_out, torch.addcmul(shift, F.layer_norm(h, width, None, None, self.final_norm.eps), scale1),
                           w_out)  # (R, d)


class DiffusionHead(nn.Module):
    def __init__(self, cfg: DiffusionHeadConfig, token_dim: int, cond_dim: int):
        super().__init__()
        self.cfg = cfg
        self.token_dim = token_dim
        self.net = Denoiser(token_dim, cond_dim, cfg.width, cfg.depth, cfg.grad_checkpointing, cfg.group_attention,
                            cfg.group_attention_dim, cfg.time_width)
        if cfg.parameterization != "flow":
            ac = alphas_cumprod(cfg)  # (T,) float32
            self.register_buffer("alphas_cumprod", ac.clone(), persistent=False)
            self._ac64 = ac.double().tolist()  # host copy for the per-step scalars (never read back from a GPU)
        # (steps, stochastic, temperature, device) -> (net timesteps (S,) on the device, per-step
        # scalars): made on the first call with those settings, reused by every later token.
        self._plans: OrderedDict = OrderedDict()
        self._graphs: OrderedDict = OrderedDict()  # CUDA graphs of the sampling loop, by shape/settings

    # training --------------------------------------------------------------------------------
    def loss(self, target: torch.Tensor, cond: torch.Tensor, groups: Groups | None = None,
             weight: torch.Tensor | None = None) -> torch.Tensor:
        """Mean denoising loss of tokens `target` (K, d) given hidden states `cond` (K, D); with
        group attention, `groups` (`group_index` of the K tokens): a group shares its timestep.
        `weight` (K,): each token's weight, the loss then their weighted mean (None: all equal)."""
        if target.shape[0] == 0:
            return cond.sum() * 0.0 + sum(p.sum() for p in self.parameters()) * 0.0
        bf16 = (self.cfg.bf16_train and torch.is_autocast_enabled(cond.device.type)
                and torch.get_autocast_dtype(cond.device.type) == torch.bfloat16)
        bf16 |= self.net.out.weight.dtype == torch.bfloat16  # bf16 weights (train.bf16_mode=deepspeed)
        # The random draws stay eager (a compiled graph draws other numbers); the rest may be compiled.
        n = target.shape[0] * self.cfg.noise_copies
        noise = torch.randn(n, target.shape[1], device=target.device)  # (C*K, d)
        if self.cfg.group_attention:
            if groups is None:
                raise ValueError("this head denoises groups of tokens together (model.head.group_attention): "
                                 "pass the targets' groups (Batch.image_group_index, image_group_pos)")
            groups = repeat_groups(groups, target.shape[0], self.cfg.noise_copies)
            draws = groups[0].shape[0]  # (C*G,): one timestep per group and copy, spread to its rows
        else:
            groups, draws = None, n
        if self.cfg.parameterization == "flow":
            t = torch.rand(draws, device=target.device)  # (C*K,) or (C*G,)
        else:
            t = torch.randint(0, self.cfg.train_steps, (draws,), device=target.device)
        if groups is not None:
            t = t[groups[1] // groups[0].shape[1]]  # (C*K,): each row's group
        if self.cfg.compile:
            # The token count changes every batch: compile for any count at once, rather than for
            # the first batch's count and again (dynamic) at the second (~10 s of a cold compile).
            for x in (target, cond, noise, t, weight):
                if x is not None:
                    torch._dynamo.maybe_mark_dynamic(x, 0)
        return self._loss_fn()(target, cond, noise, t, bf16, groups, weight)

    def _loss_fn(self) -> Callable:
        """`_loss_given_noise`, compiled once when `model.head.compile` (adaLN blocks fused by inductor)."""
        if not self.cfg.compile:
            return self._loss_given_noise
        if getattr(self, "_compiled_loss", None) is None:
            self._compiled_loss = torch.compile(self._loss_given_noise)
        return self._compiled_loss

    def _loss_given_noise(self, target: torch.Tensor, cond: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                          bf16: bool, groups: Groups | None = None,
                          weight: torch.Tensor | None = None) -> torch.Tensor:
        """The denoising loss given the noise (C*K, d) and timesteps (C*K,) drawn for it."""
        with torch.autocast(device_type=cond.device.type, dtype=torch.bfloat16, enabled=bf16):
            copies = self.cfg.noise_copies
            x0 = target.float().repeat(copies, 1)  # (C*K, d)
            # Embed the condition once per token, not once per noise copy: the copies share it.
            zc = self.net.cond_embed(cond.float())  # (K, W)
            if self.cfg.parameterization == "flow":
                xt = (1 - t[:, None]) * x0 + t[:, None] * noise
                goal = noise - x0
                t_net = t * 1000.0
            else:
                a = self.alphas_cumprod[t][:, None]  # (C*K, 1)
                xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
                goal = a.sqrt() * noise - (1 - a).sqrt() * x0 if self.cfg.parameterization == "v" else noise
                t_net = t.float()
            temb = self.net.embed_time(t_net)  # (C*K, W), or (C*K, time_width)
            if self.cfg.time_width:  # the condition's modulations once per token, the copies' times added
                mods = self.net.conditioned(zc, temb.view(copies, zc.shape[0], self.cfg.time_width))  # each (C, K, W)
                pred = self.net.modulated(self.net.in_proj(xt), [tuple(m.flatten(0, 1) for m in mod) for mod in mods],
                                          groups)
            else:
                pred = self.net.body(xt, temb + zc.repeat(copies, 1), groups)
            if weight is None:
                return F.mse_loss(pred.float(), goal)
            w = weight.float().repeat(copies)  # (C*K,)
            return ((pred.float() - goal).pow(2).mean(-1) * w).sum() / w.sum()

    def _apply(self, fn, recurse=True):
        """Casts move the schedule but keep it fp32: DeepSpeed's bf16 mode casts every buffer, and
        bf16 rounds alphas_cumprod near 1 so far that sqrt(1 - a), the noise level, is wrong."""
        super()._apply(fn, recurse)
        ac = getattr(self, "alphas_cumprod", None)
        if ac is not None and ac.dtype != torch.float32:
            self.alphas_cumprod = alphas_cumprod(self.cfg).float().to(ac.device)
        return self

    # sampling --------------------------------------------------------------------------------
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
        cuda_graph: bool = False,
        cfg_batching: bool = True,
        dtype: torch.dtype | None = None,
        image_cond: torch.Tensor | None = None,
        image_cfg_scale: float | None = None,
        groups: Groups | None = None,
    ) -> torch.Tensor:
        """Draw one token per row of `cond` (B, D); with `uncond` (B, D) and cfg_scale != 1, guided.

        sampler: `ddim`/`euler` are deterministic given the start noise; `ddpm`/`stochastic`
        re-noise every step. `temperature` scales the start noise and every re-noising, so
        temperature 0 is fully deterministic. `generator` may be a list with one generator per
        row, so that a row's samples do not depend on the other rows of the batch.
        cuda_graph: on CUDA, capture the loop once per (rows, steps, settings) and replay it;
        the first call with new shapes pays the capture. Ignored on other devices.
        cfg_batching=False runs the unconditional rows as a second net call per step: the
        two-pass baseline that the one-batch design is measured against (same result).
        dtype: the net's compute dtype; torch.bfloat16 runs its matmuls under bf16 autocast (the
        recurrence x <- a x + b pred + c noise and the guidance combination stay fp32).
        image_cond (B, D) with image_cfg_scale: image-guided CFG (needs `uncond`): the third
        prediction sees the pictures without the text, combined as `guide` says.
        groups: with group attention, the `Groups` of the B rows (`omni.layout.group_index` of the
        sizes of the consecutive groups drawn together; a row's guidance streams form the same
        groups); such a head runs eagerly, not graphed.
        """
        b = cond.shape[0]
        if self.cfg.group_attention != (groups is not None):
            raise ValueError("pass `groups` (the rows drawn together, `omni.layout.group_index`) exactly when the "
                             "head was built with model.head.group_attention")
        if groups is not None and groups[1].shape[0] != b:
            raise ValueError(f"groups cover {groups[1].shape[0]} rows, not the {b} being drawn")
        with torch.autocast(device_type=cond.device.type, enabled=False):
            if (image_cond is None) != (image_cfg_scale is None) or (image_cond is not None and uncond is None):
                raise ValueError("image-guided CFG needs cond, uncond and image_cond with an image_cfg_scale")
            z = cond.float()
            if image_cond is not None:
                z = torch.cat([z, uncond.float(), image_cond.float()])  # (3B, D): still one batch
            elif uncond is not None and cfg_scale != 1.0:
                z = torch.cat([z, uncond.float()])  # (2B, D): one batch, not two passes
            run = self.sampling_run(steps, sampler, temperature, cfg_scale, z.device, cfg_batching, dtype,
                                    image_cfg_scale)
            noise = self.sampling_noise(b, steps, sampler, temperature, generator, z.device)
            bf16 = dtype == torch.bfloat16
            if groups is not None:
                return run(z, noise, groups=groups)
            if cuda_graph and z.is_cuda:
                key = (b, z.shape[0], steps, sampler, float(temperature), float(cfg_scale), cfg_batching, bf16,
                       z.device, image_cfg_scale)
                return self._graphed(key, run, z, noise)
            return run(z, noise)

    def sampling_run(self, steps: int, sampler: str, temperature: float, cfg_scale: float, device: torch.device,
                     cfg_batching: bool = True, dtype: torch.dtype | None = None,
                     image_cfg_scale: float | None = None) -> Callable:
        """`sample`'s loop as run(z (R, D) fp32, noise (n, B, d)) -> (B, d), for callers that run
        (or graph) it inside a larger step (the sampler's whole image-token step). Its plan tensor
        is cached per settings, so the same call returns a loop over the same tensors."""
        if sampler not in DETERMINISTIC:
            raise ValueError(f"unknown sampler {sampler!r}; use one of {list(SAMPLERS)}")
        if steps < 1:
            raise ValueError(f"steps={steps} must be >= 1")
        if dtype not in (None, *SAMPLE_DTYPES):
            raise ValueError(f"dtype={dtype}: the head samples in {[str(d) for d in SAMPLE_DTYPES]}")
        t_net, coefs = self._cached_plan(steps, DETERMINISTIC[sampler] == "ddpm", temperature, device)
        image = {} if image_cfg_scale is None else {"image_cfg_scale": image_cfg_scale}
        return functools.partial(self._denoise, t_net=t_net, coefs=coefs, cfg_scale=cfg_scale, batched=cfg_batching,
                                 bf16=dtype == torch.bfloat16, **image)

    def sampling_noise(self, b: int, steps: int, sampler: str, temperature: float, generator,
                       device: torch.device) -> torch.Tensor:
        """All the noise of one `sample` call up front, (n, B, d): the start noise (scaled by the
        temperature), then one draw per step when re-noising; row i's numbers come from generator i
        alone, so a row does not depend on its batch."""
        noise = self._noise(1 + steps if DETERMINISTIC[sampler] == "ddpm" else 1, b, generator, device)
        noise[0] *= temperature
        return noise

    def _cached_plan(self, steps: int, stochastic: bool, temperature: float,
                     device: torch.device) -> tuple[torch.Tensor, tuple[tuple[float, float, float], ...]]:
        """`_plan` with its timesteps as a device tensor, made once per settings and device.

        The first call with new settings copies S floats to the device; every later one finds the
        tensor here (a CUDA graph also reads it by address, so it must outlive the call).
        """
        key = (steps, stochastic, float(temperature), device)
        entry = self._plans.get(key)
        if entry is None:
            t_net, coefs = self._plan(steps, stochastic, temperature)
            entry = (torch.tensor(t_net, dtype=torch.float32, device=device), tuple(coefs))  # (S,)
            self._plans[key] = entry
            while len(self._plans) > PLAN_CACHE:
                self._plans.popitem(last=False)
        self._plans.move_to_end(key)
        return entry

    def _plan(self, steps: int, stochastic: bool, temperature: float) -> tuple[list[float], list[tuple]]:
        """Net timesteps and the per-step update x <- a x + b pred + c noise, as Python floats."""
        if self.cfg.parameterization == "flow":
            # Rectified flow on t = 1 -> 0, x_t = (1 - t) x0 + t eps, the net predicts v = eps - x0,
            # so x0 = x - t v and eps = x + (1 - t) v. Euler: x - (t - t') v. Stochastic: the DDPM
            # posterior q(x_t' | x_t, x0) of this schedule (DDIM with eta 1, written for any
            # alpha_t = 1 - t, sigma_t = t): x' = (1 - t') x0 + sqrt(t'^2 - c^2) eps + c noise with
            # c^2 = (t^2 - (alpha_t / alpha_t')^2 t'^2) t'^2 / t^2. Re-noising the x0 estimate with
            # wholly fresh noise (c = t') instead drifts: the estimate is a blurred mean that is not
            # an image, and on a trained tiny model the samples ran past white (mean 1.5 vs 0.84).
            ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
            coefs = []
            for t, t_next in itertools.pairwise(ts):
                if stochastic:
                    ratio = (1.0 - t) / (1.0 - t_next)
                    c = math.sqrt(max(t * t - ratio * ratio * t_next * t_next, 0.0)) * t_next / t
                    k = math.sqrt(max(t_next * t_next - c * c, 0.0))  # weight of the predicted noise
                    coefs.append(((1.0 - t_next) + k, -(1.0 - t_next) * t + k * (1.0 - t), c * temperature))
                else:
                    coefs.append((1.0, -(t - t_next), 0.0))
            return [t * 1000.0 for t in ts[:-1]], coefs
        # DDIM (eta 0) and DDPM (eta 1) on the trained schedule: the update of diffusers'
        # DDIMScheduler.step (no clipping, alpha_final = 1) solved for x and the prediction, in
        # float64. The noise-direction weight sqrt(1 - a' - std^2) is exactly 0 at the first step
        # under zero terminal SNR with eta 1; diffusers' float32 takes the root of a tiny negative
        # there and returns NaN for many step counts, so it is clamped.
        timesteps = trailing_timesteps(self.cfg.train_steps, steps)
        ac = self._ac64
        jump = self.cfg.train_steps // steps
        eta = 1.0 if stochastic else 0.0
        coefs = []
        for t in timesteps:
            a_t = ac[t]
            a_prev = ac[t - jump] if t - jump >= 0 else 1.0
            var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
            std = eta * math.sqrt(var)
            dir_ = math.sqrt(max(1 - a_prev - std**2, 0.0))  # weight of the predicted noise
            sa, sb, sp = math.sqrt(a_t), math.sqrt(1 - a_t), math.sqrt(a_prev)
            if self.cfg.parameterization == "v":
                # x0 = sa x - sb v, eps = sa v + sb x  ->  x' = sp x0 + dir eps + std noise
                coefs.append((sp * sa + dir_ * sb, dir_ * sa - sp * sb, std * temperature))
            else:
                # x0 = (x - sb eps) / sa
                coefs.append((sp / sa, dir_ - sp * sb / sa, std * temperature))
        return [float(t) for t in timesteps], coefs

    def _noise(self, n: int, b: int, generator, device: torch.device) -> torch.Tensor:
        """(n, B, d) standard normal draws; with one generator per row, row i's come from generator i."""
        d = self.token_dim
        if isinstance(generator, (list, tuple)):
            if len(generator) != b:
                raise ValueError(f"got {len(generator)} generators for {b} rows; give one per row")
            rows = [torch.randn(n, d, generator=g, device=g.device).to(device) for g in generator]
            return torch.stack(rows, dim=1)  # (n, B, d)
        dev = generator.device if generator is not None else device
        return torch.randn(n, b, d, generator=generator, device=dev).to(device)

    def _denoise(self, z: torch.Tensor, noise: torch.Tensor, t_net: torch.Tensor, coefs: tuple[tuple, ...],
                 cfg_scale: float, batched: bool = True, bf16: bool = False,
                 image_cfg_scale: float | None = None, groups: Groups | None = None) -> torch.Tensor:
        """The sampling loop from noise[0] (already scaled); z (R, D) with R = B, 2B or 3B (guided);
        `groups` of the B rows (group attention)."""
        guidance = functools.partial(guide, cfg_scale=cfg_scale, image_cfg_scale=image_cfg_scale)
        if bf16:  # (no autocast cache: the loop's weights are cast once by sampling_weights, and a
            # cache that outlived a CUDA graph capture would hand the graph freed memory)
            with torch.autocast(device_type=z.device.type, dtype=torch.bfloat16, cache_enabled=False):
                return self._loop(z, noise, t_net, coefs, guidance, batched, torch.bfloat16, groups)
        return self._loop(z, noise, t_net, coefs, guidance, batched, torch.float32, groups)

    def _loop(self, z: torch.Tensor, noise: torch.Tensor, t_net: torch.Tensor, coefs: tuple[tuple, ...],
              guidance: Callable, batched: bool, dtype: torch.dtype, groups: Groups | None = None) -> torch.Tensor:
        # Host work per step is the cost of an eager loop (a GPU waits on it; a CPU spends it), so
        # everything a step only indexes is split once: noise and modulations are unbound into
        # per-step views and the weights transposed/cast once per call (sampling_weights).
        net = self.net
        b = noise.shape[1]
        every = None if groups is None else repeat_groups(groups, b, z.shape[0] // b)  # the R rows' groups
        noise_steps = noise.unbind(0)  # each (B, d)
        x = noise_steps[0]
        weights = net.sampling_weights(dtype)
        w_in, b_in = weights[0]
        zc = net.cond_embed(z)  # (R, W): the condition is the same at every step
        temb = net.embed_time(t_net)  # (S, W): the same for every row
        # Every modulation of every step in a few large matmuls instead of S x (depth + 1) small
        # ones; chunked over steps so the buffer stays under MODULATION_BYTES for large heads/batches.
        per_step = z.shape[0] * net.final_ada[-1].in_features * (3 * len(net.blocks) + 2) * 4
        chunk = max(1, MODULATION_BYTES // per_step)
        mods: list[list[tuple[torch.Tensor, ...]]] = []
        zmods = net.modulations(zc[None]) if net.time_width else None  # the condition's part: once per call
        for i, (a, bc, c) in enumerate(coefs):
            if i % chunk == 0:
                parts = net.conditioned(zc[None], temb[i:i + chunk, None], zmods)  # each part (s, R, W)
                unbound = [[p.unbind(0) for p in group] for group in parts]  # [group][part][step]
                mods = [[tuple(p[j] for p in group) for group in unbound] for j in range(len(unbound[0][0]))]
            step_mods = mods[i % chunk]  # [group] -> its parts at this step, each (R, W)
            h = torch.addmm(b_in, x, w_in)  # (B, W): guided rows share x, so project it once
            if z.shape[0] != b:
                h = torch.cat([h] * (z.shape[0] // b))  # (R, W)
            if batched or z.shape[0] == b:
                pred = net.fast_modulated(h, weights, step_mods, every)  # (R, d)
            else:  # one pass per stream kind: conditional rows, then unconditional (then image-only) rows
                pred = torch.cat([net.fast_modulated(h[j:j + b], weights, [tuple(m[j:j + b] for m in g) for g in step_mods],
                                                     groups)
                                  for j in range(0, z.shape[0], b)])
            pred = guidance(pred.float(), b)  # fp32: a no-op in fp32; under bf16 the guidance and update stay fp32
            x = torch.add(x * a, pred, alpha=bc) if a != 1.0 else x.add(pred, alpha=bc)
            if c:
                x = x.add(noise_steps[1 + i], alpha=c)
        return x

    def _graphed(self, key: tuple, run: Callable, z: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """run(z, noise) replayed from a CUDA graph captured on the first call with this key.

        The graph reads the parameters by address, so in-place updates (training, EMA copies)
        are seen; replacing a parameter tensor needs `self._graphs.clear()`.
        """
        entry = self._graphs.get(key)
        if entry is None:
            static = (z.clone(), noise.clone())
            stream = torch.cuda.Stream(device=z.device)
            stream.wait_stream(torch.cuda.current_stream(z.device))
            with torch.cuda.stream(stream):  # warm-up outside the graph (allocator, lazy init)
                run(*static)
            torch.cuda.current_stream(z.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = run(*static)
            # Keep `run` (and the timestep tensor it holds) alive: the graph reads it by address.
            entry = (graph, static, out, run)
            self._graphs[key] = entry
            while len(self._graphs) > 8:  # each graph keeps its own memory pool
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        graph, (sz, sn), out, _ = entry
        sz.copy_(z)
        sn.copy_(noise)
        graph.replay()
        return out.clone()
