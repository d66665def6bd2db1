"""The record format of an evaluation run: one directory per sample, written last and atomically.

    RUN/samples/ID/record.json       one finished sample: prompt, output, scores, settings
    RUN/samples/ID/*.png             its prompt, output and ground-truth images

Segments are stored as [{"text": ...} | {"image": FILE}] with the images beside the record.
Benchmarks read records back (`load_segments`) to aggregate; the harness writes them.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

from PIL import Image

from omni.eval.benchmark import EvalSample, Output, Segment
from omni.utils import atomic_write_bytes, atomic_write_text, safe_name

RESULTS = "results.json"
RECORD = "record.json"


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


def sample_dir(run_dir: Path, sample_id: str) -> Path:
    """Where a sample's record and images live; the id comes from data, so it is made path-safe."""
    return Path(run_dir) / "samples" / safe_name(sample_id)


def write_record(
    run_dir: Path, sample: EvalSample, index: int, seed: int, output: Output, scores: dict[str, Any]
) -> dict[str, Any]:
    """Write one finished sample (images first, record.json last) and return its record."""
    d = sample_dir(run_dir, sample.id)
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
    path = sample_dir(run_dir, sample_id) / RECORD
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
                    h.update(b"I" + (sample_dir(run_dir, r["id"]) / it["image"]).read_bytes())
    return h.hexdigest()
