"""Adapters for public benchmarks: read their published files, write their scorers' layouts.

Each adapter is a Benchmark (omni.eval.benchmark) whose `samples` read a local copy of the
benchmark in its published format and whose `export` writes the model's outputs where the
benchmark's official evaluator reads them. Aspects that the benchmark scores with a model judge
go through omni.eval.judges.http with the benchmark's rubric; without a judge they are reported
as "not computed", never as 0.
"""

from __future__ import annotations

from omni.eval.adapters.geneval import GenEval
from omni.eval.adapters.interleavedbench import InterleavedBench
from omni.eval.adapters.isg import ISGBench
from omni.eval.adapters.mmie import MMIE
from omni.eval.adapters.opening import OpenING
from omni.eval.adapters.yesno import MME, POPE

ADAPTERS: dict[str, type] = {
    b.name: b for b in (GenEval, InterleavedBench, OpenING, ISGBench, MMIE, MME, POPE)
}
