"""Generation speed on the tiny preset: KV cache vs recompute, and CFG in one batch vs two passes.

    python -m benchmarks.bench_generation [--quick]

Figures are image tokens per second of text-to-image sampling (mode "image", the call the eval
benchmarks make hundreds of times), for a batch of prompts with a random-weight tiny model
(speed does not depend on what the weights learned). Compared:

- KV cache vs full recomputation of the prefix at every step, with a caption-length prompt and
  with a long (~300-token) context before the image, where recomputation hurts most;
- classifier-free guidance with the unconditional rows in the same batch and KV cache as the
  conditional ones (omni's design) vs a second forward pass per step, and vs no guidance.

On CPU the benchmark runs on one thread: tiny matrices gain nothing from more, and on a shared
machine threads that wait for each other make timings meaningless.
"""

from __future__ import annotations

import json
import tempfile
import time

import torch

CORPUS = [
    "a red circle left of a blue square.",
    "a green triangle above a yellow circle.",
    "what color is the square? purple",
    "how many circles are there? three",
    "an orange square below a red triangle.",
    "draw the digit 7.",
] * 10


def _tiny_model(tmp: str):
    from omni.config import load_config
    from omni.model import OmniModel
    from omni.tokenizers.text import train_sentencepiece
    from omni.utils import default_device

    train_sentencepiece(CORPUS, f"{tmp}/tok", vocab_size=96)
    cfg = load_config("tiny", [f"model.tokenizer={tmp}/tok"])
    torch.manual_seed(0)
    return OmniModel.from_config(cfg.model).to(default_device()).eval(), cfg


def _rate(model, prompts, cfg, repeats: int, **kw) -> float:
    """Image tokens per second, best of `repeats` runs."""
    from omni.generation import generate

    seeds = list(range(len(prompts)))
    times = []
    for _ in range(repeats):
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        results = generate(model, prompts, cfg, seeds=seeds, mode="image", **kw)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    n = sum(r.image_tokens[0].shape[0] for r in results)
    return n / min(times)


def run(quick: bool = False) -> dict:
    """Measure and return JSON-able figures (tokens/s and the ratios the design is judged by)."""
    import dataclasses

    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        model, cfg = _tiny_model(tmp)
        if model.device.type == "cpu":
            torch.set_num_threads(1)
        try:
            batch = 4 if quick else 16
            repeats = 1 if quick else 3
            gen = dataclasses.replace(cfg.generation, image_steps=10 if quick else cfg.generation.image_steps,
                                      cfg_scale=3.0)
            captions = [[CORPUS[i % 6]] for i in range(batch)]
            context = ""
            while len(model.tokenizer.encode(context)) < 280:  # ~300 positions of text before the image
                context += CORPUS[len(context) % 6] + " "
            long = [[context + CORPUS[i % 6]] for i in range(batch)]

            _rate(model, captions[:2], gen, 1)  # warm-up: first-call allocations and lazy imports

            def rates(prompts, **kw) -> dict:
                cached = _rate(model, prompts, dataclasses.replace(gen, use_cache=True), repeats, **kw)
                full = _rate(model, prompts, dataclasses.replace(gen, use_cache=False), repeats, **kw)
                return {"kv_cache_tok_s": round(cached, 1), "recompute_tok_s": round(full, 1),
                        "kv_cache_speedup": round(cached / full, 2)}

            one = _rate(model, captions, gen, repeats)
            two = _rate(model, captions, gen, repeats, cfg_batching=False)
            plain = _rate(model, captions, dataclasses.replace(gen, cfg_scale=1.0), repeats)
            prompt_len = {
                "caption": len(model.tokenizer.encode(captions[0][0])) + 1,
                "long": len(model.tokenizer.encode(long[0][0])) + 1,
            }
            return {
                "preset": "tiny",
                "device": str(model.device),
                "threads": torch.get_num_threads(),
                "batch": batch,
                "image_tokens_per_image": model.image_tokenizer.num_tokens,
                "image_steps": gen.image_steps,
                "sampler": gen.sampler,
                "prompt_positions": prompt_len,
                "kv_cache_caption_prompt": rates(captions),
                "kv_cache_long_prompt": rates(long),
                "cfg": {
                    "cfg_scale": gen.cfg_scale,
                    "one_batch_tok_s": round(one, 1),
                    "two_passes_tok_s": round(two, 1),
                    "one_batch_speedup": round(one / two, 2),
                    "no_cfg_tok_s": round(plain, 1),
                    "cfg_cost": round(plain / one, 2),
                },
            }
        finally:
            torch.set_num_threads(threads)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="small batch, fewer steps, one repeat")
    print(json.dumps(run(quick=parser.parse_args().quick), indent=2))
