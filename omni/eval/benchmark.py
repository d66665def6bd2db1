"""What a benchmark is to the harness: samples in, per-sample scores out, an aggregate at the end.

    samples(data, limit)               -> [EvalSample]      prompts + ground truth, in a fixed order
    generate(model, samples, cfg, seeds) -> [Output]        default: one batched `generate` per mode
    score(sample, output, judge)       -> {metric: value}   None = not computed (never 0)
    aggregate(records, run_dir)        -> {"overall", "tasks", "metrics"}
    export(records, run_dir)           -> {name: path}      files in the official scorers' layouts

Every per-sample value the aggregate needs is in the sample's record on disk (scores, output
image files), so a resumed run aggregates exactly what an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from PIL import Image

Segment = str | Image.Image


@dataclass
class EvalSample:
    """One prompt to answer and the ground truth to judge the answer by."""

    id: str  # unique and file-name safe: the sample's directory under samples/
    task: str  # the task (sub-score) it counts toward
    prompt: list[Segment]  # what the model reads
    mode: str = "auto"  # generation mode: auto | text | image
    reference: dict[str, Any] = field(default_factory=dict)  # JSON-able ground truth for the judge
    answer: list[Segment] = field(default_factory=list)  # ground-truth answer, shown in the report


@dataclass
class Output:
    """What the model produced for one sample."""

    segments: list[Segment]  # the generated answer, text and images in order
    finish_reason: str = "eos"
    settings: dict[str, Any] = field(default_factory=dict)  # GenerationResult.settings
    extra: dict[str, list[Segment]] = field(default_factory=dict)  # other generated sequences


def merge_text(segments: Sequence[Segment]) -> list[Segment]:
    """Join adjacent text pieces and drop blank ones: the blocks a reader sees."""
    out: list[Segment] = []
    for s in segments:
        if isinstance(s, str):
            if not s.strip():
                continue
            if out and isinstance(out[-1], str):
                out[-1] = f"{out[-1]} {s.strip()}"
                continue
            out.append(s.strip())
        else:
            out.append(s)
    return out


def output_text(segments: Sequence[Segment]) -> str:
    return " ".join(s.strip() for s in segments if isinstance(s, str) and s.strip())


def output_images(segments: Sequence[Segment]) -> list[Image.Image]:
    return [s for s in segments if isinstance(s, Image.Image)]


class Benchmark:
    """Base class; subclasses set `name`, `tasks` and implement `samples` and `score`."""

    name: str = ""
    tasks: tuple[str, ...] = ()
    description: str = ""
    samples_per_prompt: int = 1  # images drawn per prompt (GenEval draws 4)
    # Raised whenever a rule-based judge changes what it accepts: a run directory scored by an older
    # version is refused, not resumed into a mix of both.
    judge_version: int = 1
    gen_defaults: ClassVar[
        dict[str, Any]
    ] = {}  # generation settings this benchmark needs (before user overrides)

    def samples(self, data: str | None, limit: int | None) -> list[EvalSample]:
        raise NotImplementedError

    def generate(self, model, samples: list[EvalSample], cfg, seeds: list[int]) -> list[Output]:
        """One batched call of the shared sampler per generation mode in the batch."""
        from omni.inference.generate import generate_by_mode

        results = generate_by_mode(model, [s.prompt for s in samples], [s.mode for s in samples], seeds, cfg,
                                   batch_size=len(samples))
        return [Output(list(r.segments), r.finish_reason, dict(r.settings)) for r in results]

    def score(self, sample: EvalSample, output: Output, judge) -> dict[str, float | None]:
        raise NotImplementedError

    def aggregate(self, records: list[dict[str, Any]], run_dir: Path) -> dict[str, Any]:
        """Default: mean of every metric per task; overall = mean of the tasks' first metric."""
        return mean_by_task(records, self.tasks)

    def export(self, records: list[dict[str, Any]], run_dir: Path) -> dict[str, str]:
        return {}

    def judge_identity(self, judge) -> dict[str, Any]:
        return {"kind": "rule-based", "name": self.name, "version": self.judge_version}


def mean_by_task(
    records: list[dict[str, Any]], tasks: Sequence[str] = (), primary: str | None = None
) -> dict[str, Any]:
    """Per-task means of each score (None values are skipped; all-None = "not computed").

    Keys starting with "_" are per-sample details (reasons, detections), not scores.

    overall = mean over tasks of the `primary` metric (default: each task's first metric), the
    GenEval convention (tasks weigh equally, whatever their sample counts).
    """
    order = list(tasks) + sorted({r["task"] for r in records} - set(tasks))
    out: dict[str, Any] = {}
    for task in order:
        rows = [r for r in records if r["task"] == task]
        if not rows:
            continue
        metrics: dict[str, Any] = {"n": len(rows)}
        names: list[str] = []
        for r in rows:
            names += [k for k in r["scores"] if k not in names and not k.startswith("_")]
        for k in names:
            vals = [r["scores"][k] for r in rows if r["scores"].get(k) is not None]
            metrics[k] = round(sum(vals) / len(vals), 6) if vals else "not computed"
        out[task] = metrics
    firsts = []
    for metrics in out.values():
        key = primary if primary is not None else next((k for k in metrics if k != "n"), None)
        value = metrics.get(key) if key else None
        if isinstance(value, (int, float)):
            firsts.append(value)
    overall = round(sum(firsts) / len(firsts), 6) if firsts else "not computed"
    return {"overall": overall, "tasks": out, "metrics": {}}
