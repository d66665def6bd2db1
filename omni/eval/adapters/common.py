"""Shared pieces of the public-benchmark adapters: reading files, finding images, judge plumbing."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from omni.eval.benchmark import Benchmark, EvalSample, Segment, mean_by_task, merge_text
from omni.eval.judges.http import Rubric, judge_aspects
from omni.eval.records import sample_dir

MARKERS = re.compile(r"<BEGIN>|<image>", flags=re.IGNORECASE)


def data_file(data: str | None, default_name: str, benchmark: str) -> Path:
    """The benchmark's published file: `data` itself, or `default_name` inside the directory `data`."""
    if not data:
        raise ValueError(
            f"{benchmark} reads a local copy of the benchmark: pass --data PATH "
            f"(the published {default_name}, or the directory holding it)"
        )
    path = Path(data)
    if path.is_dir():
        path = path / default_name
    if not path.exists():
        raise FileNotFoundError(f"{benchmark}: {path} does not exist (expected the published {default_name})")
    return path


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def read_jsonl(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(raw line, parsed object) for every non-empty line."""
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                out.append((line, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n} is not valid JSON: {e}") from None
    return out


def find_image(name: str, roots: Sequence[Path]) -> Path:
    """An image named relative to one of `roots` (the data file's directory and its usual subfolders)."""
    p = Path(name)
    if p.is_absolute():
        if p.exists():
            return p
    else:
        for root in roots:
            if (root / p).exists():
                return root / p
    tried = ", ".join(str(r / p) for r in roots) if not p.is_absolute() else str(p)
    raise FileNotFoundError(
        f"image {name!r} not found (tried {tried}); unpack the benchmark's images beside its data file"
    )


def load_image(name: str, roots: Sequence[Path]) -> Image.Image:
    with Image.open(find_image(name, roots)) as im:
        return im.convert("RGB")


def clean_text(text: str | None) -> str:
    """Benchmark text without its layout markers (<BEGIN>, <image>)."""
    return " ".join(MARKERS.sub(" ", text or "").split())


def segments_from_steps(
    steps: Sequence[dict[str, Any]] | None, roots: Sequence[Path], text: Callable[[Any], str] = str
) -> list[Segment]:
    """`[{text, image}, ...]` steps (OpenING, MMIE) -> interleaved segments; `text` shapes each text."""
    out: list[Segment] = []
    for step in steps or []:
        raw = step.get("text")
        t = text(raw) if raw else ""
        if t:
            out.append(t)
        if step.get("image"):
            out.append(load_image(step["image"], roots))
    return out


def take(items: Iterable[Any], limit: int | None) -> list[Any]:
    items = list(items)
    return items if limit is None else items[:limit]


def safe_id(text: str) -> str:
    """A file-name-safe sample id."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("._") or "sample"


def record_segments(record: dict[str, Any], run_dir: Path, key: str = "output") -> list[Segment]:
    """A record's generated segments with images loaded from the run directory."""
    from omni.eval.records import load_segments

    return load_segments(record[key], sample_dir(run_dir, record["id"]))


def steps_of(segments: Sequence[Segment]) -> list[dict[str, Any]]:
    """Interleaved blocks -> [{"text", "image"}] steps (a text, then the image that follows it)."""
    steps: list[dict[str, Any]] = []
    for seg in merge_text(segments):
        if isinstance(seg, str):
            steps.append({"text": seg, "image": None})
        elif steps and steps[-1]["image"] is None:
            steps[-1]["image"] = seg
        else:
            steps.append({"text": "", "image": seg})
    return steps


def copy_image(src: Path, dst: Path, fmt: str | None = None) -> None:
    """Copy a generated PNG into an export, converting (e.g. to JPEG) when the layout names another format."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if fmt is None:
        shutil.copyfile(src, dst)
        return
    with Image.open(src) as im:
        im.convert("RGB").save(dst, format=fmt, quality=95)


def transcript(
    prompt: Sequence[Segment],
    answer: Sequence[Segment],
    prompt_tag: str = "INPUT:",
    answer_tag: str = "OUTPUT:",
) -> list[Segment]:
    """A judge's view of one sample: tagged input then output, images inline."""
    content: list[Segment] = [prompt_tag]
    content += [s for s in prompt if not (isinstance(s, str) and not s.strip())]
    content.append(answer_tag)
    body = merge_text(answer)
    content += body if body else ["(empty answer)"]
    return content


class ModelJudged(Benchmark):
    """An adapter whose aspects a judge model scores with `rubric`."""

    rubric: Rubric

    def judged(self, judge, content: Sequence[Segment]) -> dict[str, Any]:
        return judge_aspects(judge, self.rubric, content)

    def aggregate(self, records: list[dict[str, Any]], run_dir: Path) -> dict[str, Any]:
        """Per-task means, each aspect's mean over all samples, overall = mean of those."""
        res = mean_by_task(records, self.tasks)
        for aspect in self.rubric.aspects:
            vals = [r["scores"][aspect] for r in records if r["scores"].get(aspect) is not None]
            res["metrics"][aspect] = round(sum(vals) / len(vals), 4) if vals else "not computed"
        nums = [res["metrics"][a] for a in self.rubric.aspects if isinstance(res["metrics"][a], float)]
        res["overall"] = round(sum(nums) / len(nums), 4) if nums else "not computed"
        return res

    def judge_identity(self, judge) -> dict[str, Any]:
        if judge is None:
            return {
                "kind": "none",
                "rubric": self.rubric.name,
                "note": f"model-judged aspects ({', '.join(self.rubric.aspects)}) not computed: no --judge given",
            }
        return {**judge.identity(), "rubric": self.rubric.name, "scale": [self.rubric.low, self.rubric.high]}


def json_rubric_system(intro: str, aspects: dict[str, str], low: int, high: int) -> str:
    """A rubric prompt asking for one integer per aspect as a JSON object."""
    lines = [intro, "", f"Score each aspect with an integer from {low} to {high}:"]
    lines += [f"- {name}: {what}" for name, what in aspects.items()]
    example = ", ".join(f'"{name}": <{low}-{high}>' for name in aspects)
    lines += ["", f"Reply with only a JSON object: {{{example}}}"]
    return "\n".join(lines)


def write_json(path: Path, obj: Any) -> None:
    from omni.utils import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=1, ensure_ascii=False))


def write_jsonl(path: Path, rows: Iterable[Any]) -> None:
    from omni.utils import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def eval_sample(
    id: str,
    task: str,
    prompt: list[Segment],
    reference: dict[str, Any],
    answer: list[Segment] | None = None,
    mode: str = "auto",
) -> EvalSample:
    return EvalSample(
        id=safe_id(id), task=str(task), prompt=prompt, mode=mode, reference=reference, answer=answer or []
    )
