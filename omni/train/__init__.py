"""Training: DeepSpeed set-up (engine.py), the loop (loop.py), checkpoints, EMA, export.

    from omni.train import train
    run_dir = train(load_config("tiny", ["data.train=[shards/train-{000000..000003}.tar]"]))
"""

from __future__ import annotations


def train(*args, **kwargs):
    """omni.train.loop.train, imported lazily (torch and DeepSpeed load on first use)."""
    from omni.train.loop import train as _train

    return _train(*args, **kwargs)


__all__ = ["train"]
