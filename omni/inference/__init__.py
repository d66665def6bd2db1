"""Inference: one sampler for every way a model is used.

    prompts.py    str | PIL.Image segments -> the positions the sampler feeds (the layout rule)
    sampler.py    the interleaved decode loop (KV cache, CFG rows, text and image modes)
    generate.py   `load` a checkpoint, `generate` with its settings: what everything else calls
    chat.py       the terminal conversation (`omni chat`)
    cli.py        `omni generate` and `omni chat`
    preview.py    half-block image previews in a terminal
"""
