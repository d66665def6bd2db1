"""The evaluation loop: generate in batches, judge, write each sample as it finishes, resume.

    RUN/run.json                     what this run is (benchmark, checkpoint hash, sampling settings,
                                     seed, data, judge); a rerun with other settings is refused
    RUN/samples/ID/...               one finished sample (the record format: omni.eval.records)
    RUN/results.json                 scores per task and overall + everything needed to reproduce
    RUN/report.html                  prompts, interleaved answers and scores side by side
    RUN/exports/...                  outputs in the layouts of the benchmarks' official scorers

Three steps: `prepare` (benchmark, model, settings, samples, run.json), `run_samples` (generate,
score and write what is not done yet), `finish` (aggregate the records on disk, results.json,
report). A sample is done when its record.json exists; it is written last and atomically
(images first), so an interrupted run never leaves a half-written sample under its final name.
A rerun skips done samples, and the aggregate is always computed from the records on disk, so a
resumed run's results.json equals an uninterrupted one's (except the `time` field). Batches are
fixed slices of the sample list and every sample has its own seed (base seed + its index), so
which samples were already done does not change what the others generate.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import time
from pathlib import Path
from typing import Any

from omni.eval.benchmark import Benchmark, EvalSample
from omni.eval.records import RESULTS, checkpoint_identity, outputs_digest, read_record, write_record
from omni.eval.registry import get_benchmark
from omni.utils import atomic_write_text


@dataclasses.dataclass
class EvalRun:
    """One prepared run: everything `run_samples` and `finish` need."""

    bench: Benchmark
    run_dir: Path
    model: Any
    cfg: Any  # GenerationConfig
    base_seed: int
    checkpoint: dict[str, Any]
    judge_identity: dict[str, Any]
    data: str | None
    limit: int | None
    samples: list[EvalSample]
    t0: float
    batch_size: int = 16  # rows generated together: batched numerics differ slightly, so it is a setting

    @property
    def seeds(self) -> list[int]:
        return [self.base_seed + i for i in range(len(self.samples))]


def load_model(model_or_ckpt):
    """An OmniModel as given, or loaded from a checkpoint directory onto the default device."""
    if isinstance(model_or_ckpt, (str, Path)):
        from omni.inference.generate import load

        # an absolute path: results name the checkpoint wherever they are read from
        return load(Path(model_or_ckpt).resolve())
    return model_or_ckpt


class RunMismatch(ValueError):
    """An evaluation directory holds samples of a run with other settings."""


def _check_run(run_dir: Path, spec: dict[str, Any], overwrite: bool) -> None:
    """Refuse to mix samples of two different runs in one directory."""
    path = run_dir / "run.json"
    if path.exists() and not overwrite:
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(spec) if old.get(k) != spec.get(k))
        if diff:
            raise RunMismatch(
                f"{run_dir} holds a run with other settings ({', '.join(diff)} differ); "
                "use another --out directory, or --overwrite to start this one afresh"
            )
    atomic_write_text(path, json.dumps(spec, indent=1, default=str))


def prepare(model_or_ckpt, benchmark: str | Benchmark, out_dir: str | Path, *, data: str | None = None,
            limit: int | None = None, judge=None, gen_overrides: dict[str, Any] | None = None,
            seed: int | None = None, samples_per_prompt: int | None = None, overwrite: bool = False,
            batch_size: int = 16) -> EvalRun:
    """The benchmark (a configured copy), model, settings and samples; run.json written or checked.
    Every setting that changes outputs is in run.json, batch size included (batched rows run other
    kernels), so resuming with another one is refused instead of mixing outputs."""
    import shutil

    from omni.inference.generate import generation_config

    t0 = time.time()
    run_dir = Path(out_dir)
    bench = get_benchmark(benchmark, samples_per_prompt=samples_per_prompt, run_dir=run_dir)
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    model = load_model(model_or_ckpt)
    cfg = generation_config(model, **{**bench.gen_defaults, **(gen_overrides or {})})
    base_seed = cfg.seed if seed is None else int(seed)
    ckpt = checkpoint_identity(model)
    judge_id = bench.judge_identity(judge)
    _check_run(run_dir, {
        "benchmark": bench.name,
        "checkpoint_sha256": ckpt["sha256"],
        "generation": dataclasses.asdict(cfg),
        "seed": base_seed,
        "data": data,
        "samples_per_prompt": bench.samples_per_prompt,
        "batch_size": batch_size,
        "judge": judge_id.get("model") or judge_id.get("name"),
        "judge_version": judge_id.get("version"),
    }, overwrite)
    samples = bench.samples(data, limit)
    if not samples:
        raise ValueError(f"benchmark {bench.name} found no samples in {data or 'its default data'} (limit={limit})")
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        raise ValueError(f"benchmark {bench.name} produced duplicate sample ids; each sample needs its own")
    return EvalRun(bench, run_dir, model, cfg, base_seed, ckpt, judge_id, data, limit, samples, t0, batch_size)


def run_samples(run: EvalRun, judge=None, batch_size: int = 16, progress: bool = True) -> list[dict[str, Any]]:
    """Generate and score every sample without a record yet; every sample's record, in order."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    samples, seeds = run.samples, run.seeds
    records = {s.id: rec for s in samples if (rec := read_record(run.run_dir, s.id)) is not None}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(samples), initial=len(records), desc=f"eval {run.bench.name}", unit="sample",
                   dynamic_ncols=True)
    try:
        for start in range(0, len(samples), batch_size):
            chunk = [i for i in range(start, min(start + batch_size, len(samples))) if samples[i].id not in records]
            if not chunk:
                continue
            outputs = run.bench.generate(run.model, [samples[i] for i in chunk], run.cfg, [seeds[i] for i in chunk])
            for i, output in zip(chunk, outputs):
                scores = run.bench.score(samples[i], output, judge)
                records[samples[i].id] = write_record(run.run_dir, samples[i], i, seeds[i], output, scores)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return [records[s.id] for s in samples]


def finish(run: EvalRun, records: list[dict[str, Any]], report: bool = True) -> dict[str, Any]:
    """Aggregate the records, write results.json (and the HTML report); the results."""
    bench, run_dir = run.bench, run.run_dir
    agg = bench.aggregate(records, run_dir)
    exports = bench.export(records, run_dir)
    settings = dict(records[0].get("settings") or {})
    settings.pop("seed", None)
    results = {
        "benchmark": bench.name,
        "description": bench.description,
        "overall": agg["overall"],
        "tasks": agg["tasks"],
        "metrics": agg.get("metrics", {}),
        "n_samples": len(records),
        "outputs_sha256": outputs_digest(run_dir, records),
        "samples_per_prompt": bench.samples_per_prompt,
        "batch_size": run.batch_size,
        "generation": settings,
        "seed": run.base_seed,
        "seed_rule": "sample i is generated with seed + i",
        "checkpoint": run.checkpoint,
        "judge": run.judge_identity,
        "data": run.data or "built-in held-out documents (procedural test split / held-out digits)",
        "limit": run.limit,
        "exports": {k: os.path.relpath(v, run_dir) for k, v in exports.items()},  # relative to the run
        "time": {
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "elapsed_s_this_session": round(time.time() - run.t0, 2),
        },
    }
    atomic_write_text(run_dir / RESULTS, json.dumps(results, indent=1, default=str))
    if report:
        from omni.eval.report import write_report

        write_report(run_dir, results, records)
    return results


def evaluate(
    model_or_ckpt,
    benchmark: str | Benchmark,
    out_dir: str | Path,
    data: str | None = None,
    limit: int | None = None,
    judge=None,
    gen_overrides: dict[str, Any] | None = None,
    batch_size: int = 16,
    seed: int | None = None,
    samples_per_prompt: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    report: bool = True,
) -> dict[str, Any]:
    """Run (or resume) one benchmark and return its results (also written to OUT/results.json).

    model_or_ckpt: an OmniModel or a checkpoint directory. data: the benchmark's local files
    (built-ins: held-out shards; default procedural held-out documents). limit: first N prompts.
    judge: an omni.eval.judges.http.HTTPJudge for model-judged aspects (None: not computed).
    gen_overrides: GenerationConfig fields over the checkpoint's and the benchmark's defaults.
    seed: base seed (default the generation config's); sample i uses seed + i.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    run = prepare(model_or_ckpt, benchmark, out_dir, data=data, limit=limit, judge=judge,
                  gen_overrides=gen_overrides, seed=seed, samples_per_prompt=samples_per_prompt, overwrite=overwrite,
                  batch_size=batch_size)
    records = run_samples(run, judge, batch_size=batch_size, progress=progress)
    return finish(run, records, report=report)
