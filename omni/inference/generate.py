"""`generate`: the one entry point to the sampler, used by the CLI, chat, eval, the demo and serve.

    model = load("demo_out/model")                    # a checkpoint directory, on the default device
    results = generate(model, [["a red circle."]], mode="image")
    results[0].images[0].save("circle.png")

Settings come from the checkpoint's `generation` section (`generation_config`) with overrides on
top; every result records the exact settings and seed that made it.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Sequence
from typing import Any

import torch

from omni.config import MODES, SAMPLERS, GenerationConfig, coerce
from omni.inference.prompts import Prompt
from omni.inference.rows import GenerationEvents, GenerationResult
from omni.inference.sampler import Sampler


def load(ckpt: str, device: str | torch.device | None = None):
    """An inference checkpoint directory -> OmniModel in eval mode on `device` (default: CUDA when present)."""
    from omni.models.model import load_pretrained
    from omni.utils import resolve_device

    device = resolve_device(device)  # before reading any weights
    return load_pretrained(ckpt, device=device)


def check_config(cfg: GenerationConfig, mode: str) -> None:
    """Fail before any work on settings that cannot run, naming the one setting and its rule."""
    if mode not in MODES:
        raise ValueError(f"generation mode {mode!r} is not one of {list(MODES)}")
    if cfg.sampler not in SAMPLERS:
        raise ValueError(f"sampler {cfg.sampler!r} is not one of {list(SAMPLERS)}")
    rules = [
        ("temperature", cfg.temperature >= 0, "must be >= 0 (0 = greedy)"),
        ("image_temperature", cfg.image_temperature >= 0, "must be >= 0"),
        ("top_p", 0.0 < cfg.top_p <= 1.0, "must be in (0, 1]"),
        ("top_k", cfg.top_k >= 0, "must be >= 0 (0 = off)"),
        ("max_new_tokens", cfg.max_new_tokens >= 1, "must be >= 1"),
        ("image_steps", cfg.image_steps >= 1, "must be >= 1"),
        ("max_images", cfg.max_images >= 0, "must be >= 0"),
    ]
    for name, ok, rule in rules:
        if not ok:
            raise ValueError(f"{name}={getattr(cfg, name)} {rule}")


def generation_config(model=None, **overrides: Any) -> GenerationConfig:
    """The checkpoint's generation defaults (model.run_config.generation) with `overrides` on top.

    None values in `overrides` are ignored, so argparse flags that were not given can pass through.
    """
    run_config = getattr(model, "run_config", None)
    base = dataclasses.replace(run_config.generation) if run_config is not None else GenerationConfig()
    names = {f.name for f in dataclasses.fields(GenerationConfig)}
    hints = typing.get_type_hints(GenerationConfig)
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in names:
            raise ValueError(f"unknown generation setting {key!r}; valid: {', '.join(sorted(names))}")
        # typed like the config file: `cfg_scale=abc` fails here, before anything runs or is recorded
        setattr(base, key, coerce(value, hints[key], key))
    return base


def generate(
    model,
    prompts: Sequence[Prompt],
    cfg: GenerationConfig | None = None,
    *,
    seeds: Sequence[int] | None = None,
    mode: str | None = None,
    progress: bool | None = None,
    events: GenerationEvents | None = None,
    cfg_batching: bool = True,
) -> list[GenerationResult]:
    """Continue each prompt (a list of str | PIL.Image segments) with text and/or images.

    cfg: sampling settings (default: the checkpoint's `generation` section). seeds: one per
    prompt (default cfg.seed + index); a row's result depends only on its prompt, seed and cfg.
    mode: "auto" (interleaved), "text" (no images), "image" (exactly one image, <boi> forced
    right after the prompt); default cfg.mode. progress: a tqdm bar over decoding steps.
    events: streaming hooks and cancellation (GenerationEvents).
    """
    cfg = cfg if cfg is not None else generation_config(model)
    mode = mode or cfg.mode
    check_config(cfg, mode)
    if not prompts:
        return []
    seeds = list(seeds) if seeds is not None else [cfg.seed + i for i in range(len(prompts))]
    if len(seeds) != len(prompts):
        raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts; give one seed per prompt")
    sampler = Sampler(model, cfg, mode, seeds, events=events, cfg_batching=cfg_batching)
    was_training = model.training
    model.eval()
    try:
        rows = sampler.run(prompts, progress=bool(progress))
    finally:
        model.train(was_training)
    return [r.result() for r in rows]


def generate_by_mode(model, prompts: Sequence[Prompt], modes: Sequence[str], seeds: Sequence[int],
                     cfg: GenerationConfig | None = None, batch_size: int = 8, **kwargs: Any) -> list[GenerationResult]:
    """`generate` for prompts that each have their own mode: one batch per mode (and per
    `batch_size` prompts); results come back in the prompts' order."""
    unknown = sorted({m for m in modes if m not in MODES})
    if unknown:
        raise ValueError(f"modes {unknown} are not among {list(MODES)}")
    results: list = [None] * len(prompts)
    for mode in MODES:
        todo = [i for i, m in enumerate(modes) if m == mode]
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            got = generate(model, [prompts[i] for i in chunk], cfg, seeds=[seeds[i] for i in chunk], mode=mode, **kwargs)
            for i, res in zip(chunk, got):
                results[i] = res
    return results
