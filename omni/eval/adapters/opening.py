"""OpenING (Zhou et al. 2025): open-ended interleaved image-text generation, 56 real-world tasks.

Input: `test_data.jsonl`, one instance per line: {"total_uid", "meta_task_name", "subtask_name",
..., "conversations": [{"input": [{"text", "image"}]}, {"output": [{"text", "image"}]}]}, image
paths relative to the file (`./images/<subtask>/46-i-1.jpg`), texts carrying `<BEGIN>` / `<image>`
layout markers.

Export, the layout OpenING's judges read (GPT_score_A.py, IntJudge_judge_AB.py):

    RUN/exports/opening/omni_output/<total_uid>.json     the instance with conversations[1]
                                                          = {"output": [{"text", "image"}]}
    RUN/exports/opening/omni_output/<total_uid>-o-<k>.jpg the generated images, k from 0

Scores: OpenING's seven criteria, each 0-10, by a judge model (--judge).
"""

from __future__ import annotations

from pathlib import Path

from omni.eval.adapters.common import (
    ModelJudged,
    clean_text,
    copy_image,
    data_file,
    eval_sample,
    json_rubric_system,
    read_jsonl,
    record_segments,
    segments_from_steps,
    steps_of,
    take,
    transcript,
    write_json,
)
from omni.eval.judges.http import Rubric, parse_json_scores
from omni.eval.records import sample_dir
from omni.utils import safe_name

MODEL_DIR = "omni_output"
CRITERIA = {
    "Correctness": "accuracy and validity of the text and images for the input: logic, facts, fidelity",
    "Image-Text Coherency": "whether each image matches and complements its text",
    "Multi-step Consistency": "consistency of style and entities across images and of the steps of text",
    "Content Quality": "clarity and realism of the images; grammar and correctness of the text",
    "Human Preference Alignment": "no undesirable content; aesthetically acceptable images",
    "Completeness": "all the intended steps are present, nothing omitted",
    "Content Richness": "variety of the images and detail of the text, without losing meaning",
}
RUBRIC = Rubric(
    name="opening-7-criteria",
    system=json_rubric_system(
        "You are an expert in multimodal content evaluation. Assess the interleaved image-text OUTPUT a model "
        "generated for the INPUT (a question or instruction, possibly with images). Scale: 0-2 major "
        "deficiencies, 3-5 minor issues, 6-8 good, 9-10 exemplary.",
        CRITERIA,
        0,
        10,
    ),
    aspects=tuple(CRITERIA),
    low=0,
    high=10,
    parse=parse_json_scores,
)


class OpenING(ModelJudged):
    name = "opening"
    description = "OpenING: open-ended interleaved generation, 7 judged criteria (0-10)"
    rubric = RUBRIC

    def samples(self, data, limit):
        path = data_file(data, "test_data.jsonl", self.name)
        roots = [path.parent, path.parent / "OpenING-benchmark"]
        out = []
        for n, (_, item) in enumerate(take(read_jsonl(path), limit)):
            conv = item.get("conversations") or []
            inputs = next((c["input"] for c in conv if "input" in c), None)
            if inputs is None or "total_uid" not in item:
                raise ValueError(f"{path} line {n + 1} lacks 'total_uid' or an 'input' conversation")
            outputs = next((c["output"] for c in conv if "output" in c), [])
            try:
                answer = segments_from_steps(outputs, roots, text=clean_text)
            except FileNotFoundError:  # reference images are optional for generation
                answer = [clean_text(s.get("text")) for s in outputs if s.get("text")]
            task = item.get("meta_task_name") or item.get("subtask_name") or "all"
            out.append(
                eval_sample(
                    str(item["total_uid"]), task, segments_from_steps(inputs, roots, text=clean_text), {"item": item}, answer
                )
            )
        return out

    def score(self, sample, output, judge):
        return self.judged(judge, transcript(sample.prompt, output.segments))

    def export(self, records, run_dir: Path) -> dict[str, str]:
        root = run_dir / "exports" / "opening" / MODEL_DIR
        root.mkdir(parents=True, exist_ok=True)
        for r in records:
            item = dict(r["reference"]["item"])
            uid = safe_name(item["total_uid"])  # from the data: one file name inside the export
            files = iter(seg["image"] for seg in r["output"] if "image" in seg)
            steps, k = [], 0
            for step in steps_of(record_segments(r, run_dir)):
                image = None
                if step["image"] is not None:
                    image = f"{uid}-o-{k}.jpg"
                    copy_image(sample_dir(run_dir, r["id"]) / next(files), root / image, fmt="JPEG")
                    k += 1
                steps.append({"text": step["text"], "image": image})
            conv = [c for c in item.get("conversations", []) if "input" in c]
            item["conversations"] = conv + [{"output": steps}]
            write_json(root / f"{uid}.json", item)
        return {"opening": str(root)}
