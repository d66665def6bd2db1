"""Inference: one sampler for every way a model is used.

    prompts.py    str | PIL.Image segments -> the positions the sampler feeds (the layout rule)
    rows.py       what a caller gets back (GenerationResult), event hooks, per-row and stream state
    sampler.py    the interleaved decode loop (KV cache, CFG rows, text and image modes, rows joining
                  and leaving between steps)
    generate.py   `load` a checkpoint, `generate` with its settings: what everything else calls
    chat.py       the terminal conversation (`omni chat`)
    cli.py        `omni generate` and `omni chat`
    preview.py    half-block image previews in a terminal
"""
