"""The evaluation loop: generate in batches, judge, write each sample as it finishes, resume.

    RUN/run.json                     what this run is (benchmark, checkpoint hash, sampling settings,
                                     seed, data, judge); a rerun with other settings is refused
    RUN/samples/ID/record.json       one finished sample: prompt, output, scores, settings
    RUN/samples/ID/*.png             its prompt, output and ground-truth images
    RUN/results.json                 scores per task and overall + everything needed to reproduce
    RUN/report.html                  prompts, interleaved answers and scores side by side
    RUN/exports/...                  outputs in the layouts of the benchmarks' official scorers

A sample is done when its record.json exists; it is written last and atomically (images first),
so an interrupted run never leaves a half-written sample under its final name. A rerun skips done
samples, and the aggregate is always computed from the records on disk, so a resumed run's
results.json equals an uninterrupted one's (except the `time` field). Batches are fixed slices
of the sample list and every sample has its own seed (base seed + its index), so which samples
were already done does not change what the others generate.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import io
import json
import os
import time
from pathlib import Path
from typing import Any

from PIL import Image

from omni.eval.benchmark import Benchmark, EvalSample, Output, Segment
from omni.utils import atomic_write_bytes, atomic_write_text

RESULTS = "results.json"
RECORD = "record.json"


# --------------------------------------------------------------------------------------------
# Benchmarks and checkpoints
# --------------------------------------------------------------------------------------------


def benchmarks() -> dict[str, type[Benchmark]]:
    """Every benchmark by name: the built-in judged ones and the public-benchmark adapters."""
    from omni.eval.adapters import ADAPTERS
    from omni.eval.benchmarks_builtin import BUILTIN

    return {**BUILTIN, **ADAPTERS}


def get_benchmark(name: str | Benchmark) -> Benchmark:
    if isinstance(name, Benchmark):
        return name
    table = benchmarks()
    if name not in table:
        import difflib

        close = difflib.get_close_matches(name, list(table), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown benchmark {name!r}.{hint} Available: {', '.join(table)}")
    return table[name]()


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def checkpoint_identity(model) -> dict[str, Any]:
    """{"path", "sha256"}: the hash of model.safetensors, or of the in-memory weights."""
    path = getattr(model, "checkpoint_path", None)
    if path is not None and (Path(path) / "model.safetensors").exists():
        return {"path": str(path), "sha256": file_sha256(Path(path) / "model.safetensors")}
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().numpy().tobytes())
    return {"path": None, "sha256": h.hexdigest(), "note": "hash of the in-memory state dict (float32)"}


def load_model(model_or_ckpt):
    """An OmniModel as given, or loaded from a checkpoint directory onto the default device."""
    if isinstance(model_or_ckpt, (str, Path)):
        from omni.checkpoint import load_pretrained
        from omni.utils import default_device

        # an absolute path: results name the checkpoint wherever they are read from
        return load_pretrained(Path(model_or_ckpt).resolve(), device=default_device())
    return model_or_ckpt


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


PREVIEW_PX = 256  # prompt and ground-truth images larger than this are kept as previews only


def _save_segments(segments: list[Segment], sample_dir: Path, prefix: str) -> list[dict[str, str]]:
    """Images to PNG files beside the record; segments to [{"text"} | {"image": file}].

    Generated images are saved as they are; the benchmark's own (prompt, ground-truth) images
    only as previews for the report, so a run over photo benchmarks stays small.
    """
    out, k = [], 0
    for seg in segments:
        if isinstance(seg, str):
            out.append({"text": seg})
        else:
            name = f"{prefix}_{k}.png"
            if prefix in ("prompt", "answer") and max(seg.size) > PREVIEW_PX:
                seg = seg.copy()
                seg.thumbnail((PREVIEW_PX, PREVIEW_PX))
            atomic_write_bytes(sample_dir / name, _png(seg))
            out.append({"image": name})
            k += 1
    return out


def load_segments(items: list[dict[str, str]], sample_dir: Path) -> list[Segment]:
    """The inverse of the record's segment list (images opened from the sample directory)."""
    out: list[Segment] = []
    for it in items:
        if "text" in it:
            out.append(it["text"])
        else:
            with Image.open(sample_dir / it["image"]) as im:
                out.append(im.convert("RGB"))
    return out


def write_record(
    run_dir: Path, sample: EvalSample, index: int, seed: int, output: Output, scores: dict[str, Any]
) -> dict[str, Any]:
    """Write one finished sample (images first, record.json last) and return its record."""
    d = run_dir / "samples" / sample.id
    d.mkdir(parents=True, exist_ok=True)
    record = {
        "id": sample.id,
        "index": index,
        "task": sample.task,
        "mode": sample.mode,
        "seed": seed,
        "prompt": _save_segments(sample.prompt, d, "prompt"),
        "output": _save_segments(output.segments, d, "out"),
        "extra": {name: _save_segments(segs, d, name) for name, segs in output.extra.items()},
        "answer": _save_segments(sample.answer, d, "answer"),
        "reference": sample.reference,
        "scores": {k: v for k, v in scores.items() if not k.startswith("_")},
        "details": {k[1:]: v for k, v in scores.items() if k.startswith("_")},
        "finish_reason": output.finish_reason,
        "settings": output.settings,
    }
    atomic_write_text(d / RECORD, json.dumps(record, indent=1, default=str))
    return record


def read_record(run_dir: Path, sample_id: str) -> dict[str, Any] | None:
    path = run_dir / "samples" / sample_id / RECORD
    if not path.exists():
        return None
    return json.loads(path.read_text())


def outputs_digest(run_dir: Path, records: list[dict[str, Any]]) -> str:
    """sha256 over every sample's generated text and image bytes, in sample order: two runs with
    equal digests generated exactly the same answers."""
    h = hashlib.sha256()
    for r in records:
        h.update(r["id"].encode())
        for name, items in [("output", r["output"]), *sorted(r.get("extra", {}).items())]:
            h.update(name.encode())
            for it in items:
                if "text" in it:
                    h.update(b"T" + it["text"].encode())
                else:
                    h.update(b"I" + (run_dir / "samples" / r["id"] / it["image"]).read_bytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def _check_run(run_dir: Path, spec: dict[str, Any], overwrite: bool) -> None:
    """Refuse to mix samples of two different runs in one directory."""
    path = run_dir / "run.json"
    if path.exists() and not overwrite:
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(spec) if old.get(k) != spec.get(k))
        if diff:
            raise ValueError(
                f"{run_dir} holds a run with other settings ({', '.join(diff)} differ); "
                "use another --out directory, or --overwrite to start this one afresh"
            )
    atomic_write_text(path, json.dumps(spec, indent=1, default=str))


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
    import shutil

    from omni.generation import generation_config

    t0 = time.time()
    bench = get_benchmark(benchmark)
    if samples_per_prompt is not None:
        if samples_per_prompt < 1:
            raise ValueError(f"samples_per_prompt={samples_per_prompt} must be >= 1")
        bench.samples_per_prompt = samples_per_prompt
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    run_dir = Path(out_dir)
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if hasattr(bench, "run_dir"):
        bench.run_dir = run_dir  # benchmarks with a trained judge cache its weights in the run

    model = load_model(model_or_ckpt)
    cfg = generation_config(model, **{**bench.gen_defaults, **(gen_overrides or {})})
    base_seed = cfg.seed if seed is None else int(seed)
    ckpt = checkpoint_identity(model)
    judge_id = bench.judge_identity(judge)
    _check_run(
        run_dir,
        {
            "benchmark": bench.name,
            "checkpoint_sha256": ckpt["sha256"],
            "generation": dataclasses.asdict(cfg),
            "seed": base_seed,
            "data": data,
            "samples_per_prompt": bench.samples_per_prompt,
            "judge": judge_id.get("model") or judge_id.get("name"),
            "judge_version": judge_id.get("version"),
        },
        overwrite,
    )

    samples = bench.samples(data, limit)
    if not samples:
        raise ValueError(
            f"benchmark {bench.name} found no samples in {data or 'its default data'} (limit={limit})"
        )
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        raise ValueError(f"benchmark {bench.name} produced duplicate sample ids; each sample needs its own")
    seeds = [base_seed + i for i in range(len(samples))]

    records: dict[str, dict[str, Any]] = {}
    for s in samples:
        rec = read_record(run_dir, s.id)
        if rec is not None:
            records[s.id] = rec
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=len(samples),
            initial=len(records),
            desc=f"eval {bench.name}",
            unit="sample",
            dynamic_ncols=True,
        )
    try:
        for start in range(0, len(samples), batch_size):
            chunk = [
                i for i in range(start, min(start + batch_size, len(samples))) if samples[i].id not in records
            ]
            if not chunk:
                continue
            outputs = bench.generate(model, [samples[i] for i in chunk], cfg, [seeds[i] for i in chunk])
            for i, output in zip(chunk, outputs):
                scores = bench.score(samples[i], output, judge)
                records[samples[i].id] = write_record(run_dir, samples[i], i, seeds[i], output, scores)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()

    ordered = [records[s.id] for s in samples]
    agg = bench.aggregate(ordered, run_dir)
    exports = bench.export(ordered, run_dir)
    settings = dict(ordered[0].get("settings") or {})
    settings.pop("seed", None)
    results = {
        "benchmark": bench.name,
        "description": bench.description,
        "overall": agg["overall"],
        "tasks": agg["tasks"],
        "metrics": agg.get("metrics", {}),
        "n_samples": len(samples),
        "outputs_sha256": outputs_digest(run_dir, ordered),
        "samples_per_prompt": bench.samples_per_prompt,
        "generation": settings,
        "seed": base_seed,
        "seed_rule": "sample i is generated with seed + i",
        "checkpoint": ckpt,
        "judge": judge_id,
        "data": data or "built-in held-out documents (procedural test split / held-out digits)",
        "limit": limit,
        "exports": {k: os.path.relpath(v, run_dir) for k, v in exports.items()},  # relative to the run
        "time": {
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "elapsed_s_this_session": round(time.time() - t0, 2),
        },
    }
    atomic_write_text(run_dir / RESULTS, json.dumps(results, indent=1, default=str))
    if report:
        from omni.eval.report import write_report

        write_report(run_dir, results, ordered)
    return results
