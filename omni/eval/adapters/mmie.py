"""MMIE (Xia et al. 2025): massive multimodal interleaved comprehension and generation.

Input: a JSON list of {"id", "question": [{"text", "image"}], "answer": [{"text", "image"}]}
(image = path relative to the file's directory, or null); `answer` is the reference. Ids carry
the category (situational analysis "SA", project-based learning "PBL", multi-step reasoning "MSR").

Export, the input MMIE-Eval's main.py reads (INPUT_DIR/data.json + images/):

    RUN/exports/mmie/data.json   [{"id", "question", "answer": the model's steps, "model": "omni",
                                   "gt_answer": the reference}]
    RUN/exports/mmie/images/     generated images (question images are linked by absolute path)

Score: MMIE's 0-6 scale by a judge model (--judge), reply ending in "### Score" and an integer.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from omni.eval.adapters.common import (
    ModelJudged,
    copy_image,
    data_file,
    eval_sample,
    find_image,
    read_json,
    record_segments,
    segments_from_steps,
    steps_of,
    take,
    transcript,
    write_json,
)
from omni.eval.benchmark import Segment
from omni.eval.judges.http import Rubric, judge_aspects, parse_heading_score
from omni.eval.records import sample_dir
from omni.utils import safe_name

CRITERIA = {
    "SA": "a visual story: text quality, image quality, text-image coherence, context consistency, "
    "creativity, and stylistic consistency between text and images",
    "PBL": "a method or project answer: clear text, helpful images, text-image coherence, practical and "
    "actionable steps, creativity, and stylistic consistency",
    "MSR": "a reasoning answer: understanding of the question's text and images, clear step-by-step "
    "reasoning, correct intermediate steps, and a correct final answer (compare with the reference)",
}


def _rubric(category: str) -> Rubric:
    what = CRITERIA.get(category, CRITERIA["PBL"])
    return Rubric(
        name=f"mmie-{category.lower()}",
        aspects=("score",),
        low=0,
        high=6,
        parse=parse_heading_score,
        system=(
            f"You evaluate the quality of a model's answer to a multimodal question. Judge {what}. Begin "
            "with '### Feedback' and a short analysis, then give the final score beginning with "
            "'### Score' followed by an integer from 0 to 6."
        ),
    )


def _category(item_id: str) -> str:
    for cat in ("PBL", "MSR", "SA"):
        if cat in str(item_id):
            return cat
    return "all"


def _segments(steps: list[dict[str, Any]] | str, roots: list[Path]) -> list[Segment]:
    if isinstance(steps, str):
        return [steps]
    return segments_from_steps(steps, roots)


class MMIE(ModelJudged):
    name = "mmie"
    description = "MMIE: interleaved comprehension and generation, judged 0-6"
    rubric = dataclasses.replace(_rubric("PBL"), name="mmie-0-6 (SA / PBL / MSR criteria)")
    tasks = ("SA", "PBL", "MSR")

    def samples(self, data, limit):
        path = data_file(data, "data.json", self.name)
        roots = [path.parent, path.parent / "images"]
        out = []
        for n, item in enumerate(take(read_json(path), limit)):
            if "question" not in item:
                raise ValueError(f"{path} item {n} (id {item.get('id')!r}) has no 'question'")
            ref_steps = item.get("answer", item.get("gt_answer", []))
            try:
                answer = _segments(ref_steps, roots)
            except FileNotFoundError:
                answer = [s["text"] for s in ref_steps if isinstance(s, dict) and s.get("text")]
            out.append(
                eval_sample(
                    f"{n:05d}-{item.get('id', n)}",
                    _category(item.get("id", "")),
                    _segments(item["question"], roots),
                    {"item": item, "root": str(path.parent)},
                    answer,
                )
            )
        return out

    def score(self, sample, output, judge):
        content = transcript(sample.prompt, output.segments, "### Question", "### Answer")
        if sample.task == "MSR" and sample.answer:
            content += ["### Correct Answer", *sample.answer]
        return judge_aspects(judge, _rubric(sample.task), content)

    def export(self, records, run_dir: Path) -> dict[str, str]:
        root = run_dir / "exports" / "mmie"
        rows = []
        for r in records:
            item = r["reference"]["item"]
            roots = [Path(r["reference"]["root"]), Path(r["reference"]["root"]) / "images"]
            question = []
            for s in item["question"]:
                image = str(find_image(s["image"], roots).resolve()) if s.get("image") else None
                question.append({"text": s.get("text"), "image": image})
            files = iter(seg["image"] for seg in r["output"] if "image" in seg)
            answer, k = [], 0
            for step in steps_of(record_segments(r, run_dir)):
                image = None
                if step["image"] is not None:
                    image = f"images/{safe_name(r['id'])}_{k}.png"
                    copy_image(sample_dir(run_dir, r["id"]) / next(files), root / image)
                    k += 1
                answer.append({"text": step["text"], "image": image})
            rows.append(
                {
                    "id": item.get("id", r["id"]),
                    "question": question,
                    "answer": answer,
                    "model": "omni",
                    "gt_answer": item.get("answer", item.get("gt_answer", [])),
                }
            )
        write_json(root / "data.json", rows)
        return {"mmie": str(root / "data.json")}
