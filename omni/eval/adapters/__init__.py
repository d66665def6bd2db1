"""Adapters for public benchmarks: read their published files, write their scorers' layouts.

Each adapter is a Benchmark (omni.eval.benchmark) whose `samples` read a local copy of the
benchmark in its published format and whose `export` writes the model's outputs where the
benchmark's official evaluator reads them. Aspects that the benchmark scores with a model judge
go through omni.eval.judges.http with the benchmark's rubric; without a judge they are reported
as "not computed", never as 0.
"""

from __future__ import annotations

ADAPTERS: dict[str, type] = {}
