"""Evaluation: the `omni eval` harness, built-in judged benchmarks, public-benchmark adapters.

from omni.eval import evaluate
results = evaluate("runs/tiny/export", "shapes-t2i", "runs/eval/t2i", limit=60)
"""

from __future__ import annotations

from typing import Any


def evaluate(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """See omni.eval.harness.evaluate (imported lazily: torch is heavy)."""
    from omni.eval.harness import evaluate as _evaluate

    return _evaluate(*args, **kwargs)


__all__ = ["evaluate"]
