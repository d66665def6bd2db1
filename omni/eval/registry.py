"""Every benchmark by name: the built-in judged ones and the public-benchmark adapters."""

from __future__ import annotations

import copy
import difflib
from pathlib import Path

from omni.eval.benchmark import Benchmark


def benchmarks() -> dict[str, type[Benchmark]]:
    """Every benchmark by name: the built-in judged ones and the public-benchmark adapters."""
    from omni.eval.adapters import ADAPTERS
    from omni.eval.benchmarks_builtin import BUILTIN

    return {**BUILTIN, **ADAPTERS}


def get_benchmark(name: str | Benchmark, samples_per_prompt: int | None = None,
                  run_dir: str | Path | None = None) -> Benchmark:
    """A benchmark by name (or a copy of the one given), set up for one run.

    samples_per_prompt: images drawn per prompt (None: the benchmark's own). run_dir: where
    benchmarks with a trained judge cache its weights. The caller's object is never changed.
    """
    if samples_per_prompt is not None and samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt={samples_per_prompt} must be >= 1")
    bench = copy.copy(name) if isinstance(name, Benchmark) else _construct(name)
    if samples_per_prompt is not None:
        bench.samples_per_prompt = samples_per_prompt
    if run_dir is not None and hasattr(bench, "run_dir"):
        bench.run_dir = Path(run_dir)
    return bench


def _construct(name: str) -> Benchmark:
    table = benchmarks()
    if name not in table:
        close = difflib.get_close_matches(name, list(table), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown benchmark {name!r}.{hint} Available: {', '.join(table)}")
    return table[name]()
