"""The fixed-seed outputs `tests/test_decode_step.py` compares the sampler against.

`tests/data/decode_reference.pt` was written by `reference_outputs` on the sampler before the
device-side decode state (main at 9064caf), so a refactor that changes what `generate()` returns
for a seed fails the test. Rewrite it only for an intended change of the numbers:

    DS_ACCELERATOR=cpu PYTHONPATH=$PWD python -m tests.decode_reference  (run from the repo root)
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

REFERENCE = Path(__file__).with_name("data") / "decode_reference.pt"
PROMPTS = [
    ["a red circle left of a blue square."],
    [Image.new("RGB", (40, 36), (40, 80, 220)), "what color is the square?"],
    ["draw", "the digit 7."],
]
SEEDS = [11, 12, 13]
RUNS = {  # name -> (mode, GenerationConfig fields)
    "image_cfg": ("image", {"cfg_scale": 3.0}),
    "image_nocfg": ("image", {"cfg_scale": 1.0, "sampler": "ddim"}),
    "auto_cfg": ("auto", {"cfg_scale": 3.0, "temperature": 1.0, "top_k": 40, "top_p": 0.95}),
    "auto_greedy": ("auto", {"cfg_scale": 2.0, "temperature": 0.0}),
}


def build_model(tokenizer_dir):
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import TINY
    from test_generation import wake_head, with_bias

    from omni.config import load_config
    from omni.models.model import OmniModel

    # causal given pictures and MAR's head: the reference was written before the tiny preset made
    # them bidirectional and gave the head its own time path
    cfg = load_config("tiny", [f"model.tokenizer={tokenizer_dir}", *TINY, "model.image_pos_embed=true",
                               "model.prompt_image_attention=causal", "model.head.time_width=0"])
    torch.manual_seed(0)
    return wake_head(with_bias(OmniModel.from_config(cfg.model).eval()))


def reference_outputs(model, **generation) -> dict:
    """Per run: prompt ids, generated ids per row, image tokens per row (each (N, d)), finish reasons."""
    from omni.config import GenerationConfig
    from omni.inference.generate import generate
    from omni.inference.prompts import encode_prompts

    out = {"prompt_ids": [[t for t, _ in items] for items in encode_prompts(model, PROMPTS)]}
    for name, (mode, fields) in RUNS.items():
        cfg = GenerationConfig(**{"image_steps": 3, "max_new_tokens": 40, "image_temperature": 0.8, **fields,
                                  **generation})
        rows = generate(model, PROMPTS, cfg, seeds=SEEDS, mode=mode)
        out[name] = {"ids": [r.ids for r in rows], "finish": [r.finish_reason for r in rows],
                     "image_tokens": [[t.clone() for t in r.image_tokens] for r in rows]}
    return out


if __name__ == "__main__":
    import tempfile

    from omni.tokenizers.text import train_sentencepiece
    from tests.conftest import CORPUS

    with tempfile.TemporaryDirectory() as tmp:
        train_sentencepiece(CORPUS, tmp, vocab_size=96)
        ref = reference_outputs(build_model(tmp))
    REFERENCE.parent.mkdir(exist_ok=True)
    part = REFERENCE.with_suffix(".part")
    torch.save(ref, part)
    part.replace(REFERENCE)
    print({k: [len(t) for t in v["image_tokens"]] for k, v in ref.items() if k != "prompt_ids"})
