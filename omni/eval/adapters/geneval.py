"""GenEval (Ghosh et al. 2023): object-focused text-to-image alignment.

Input: GenEval's `prompts/evaluation_metadata.jsonl`, one JSON object per line with `tag`
(single_object, two_object, counting, colors, position, color_attr), `prompt`, `include` and
optionally `exclude` ([{"class", "count", "color"?, "position"?: [relation, index]}]).

Export, exactly what `evaluation/evaluate_images.py IMAGEDIR` reads (numeric folder per prompt,
the prompt's JSON line in metadata.jsonl, `samples/NNNN.png`), 4 images per prompt by default:

    RUN/exports/geneval/00000/metadata.jsonl
    RUN/exports/geneval/00000/samples/0000.png ... 0003.png

GenEval's detector (Mask2Former + CLIP colour classifier) runs in its own environment. Prompts
that name only shapes-world objects (circle/square/triangle in palette colours) are also scored
here with the rule-based shapes detector under GenEval's exact clause rules; other prompts are
"not computed" locally.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omni.eval.adapters.common import copy_image, data_file, read_jsonl, take
from omni.eval.benchmark import Benchmark, EvalSample, mean_by_task, output_images
from omni.eval.judges import shapes as SJ
from omni.eval.records import sample_dir

TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def _shapes_world(meta: dict[str, Any]) -> bool:
    reqs = list(meta.get("include", [])) + list(meta.get("exclude", []))
    colors = set(SJ.palette())
    return bool(reqs) and all(r.get("class") in SJ.SHAPES and r.get("color", "red") in colors for r in reqs)


class GenEval(Benchmark):
    name = "geneval"
    description = "GenEval text-to-image: writes the layout GenEval's evaluator reads (4 images per prompt)"
    tasks = TAGS
    samples_per_prompt = 4

    def samples(self, data, limit):
        path = data_file(data, "evaluation_metadata.jsonl", self.name)
        out = []
        for i, (line, meta) in enumerate(take(read_jsonl(path), limit)):
            missing = [k for k in ("tag", "prompt", "include") if k not in meta]
            if missing:
                raise ValueError(f"{path} line {i + 1} lacks GenEval field(s) {missing}")
            for k in range(self.samples_per_prompt):
                out.append(
                    EvalSample(
                        id=f"{i:05d}-{k:04d}",
                        task=meta["tag"],
                        prompt=[meta["prompt"]],
                        mode="image",
                        reference={"index": i, "sample": k, "line": line.strip(), "metadata": meta},
                    )
                )
        return out

    def score(self, sample, output, judge):
        meta = sample.reference["metadata"]
        if not _shapes_world(meta):
            return {"correct": None, "_note": "scored by GenEval's own evaluator on exports/geneval"}
        images = output_images(output.segments)
        if not images:
            return {"correct": 0.0, "_reason": "no image generated"}
        ok, reasons = SJ.check_spec(SJ.detect(images[0]), meta)
        return {"correct": float(ok), "_reason": "; ".join(reasons)}

    def aggregate(self, records, run_dir):
        return mean_by_task(records, self.tasks, primary="correct")

    def export(self, records, run_dir: Path) -> dict[str, str]:
        root = run_dir / "exports" / "geneval"
        written: set[int] = set()
        for r in records:
            i, k = r["reference"]["index"], r["reference"]["sample"]
            folder = root / f"{i:05d}"
            if i not in written:
                folder.mkdir(parents=True, exist_ok=True)
                # the prompt's own line from evaluation_metadata.jsonl (evaluate_images.py json.load()s it)
                (folder / "metadata.jsonl").write_text(r["reference"]["line"] + "\n", encoding="utf-8")
                written.add(i)
            files = [seg["image"] for seg in r["output"] if "image" in seg]
            if files:
                copy_image(sample_dir(run_dir, r["id"]) / files[0], folder / "samples" / f"{k:04d}.png")
        return {"geneval": str(root)}

    def judge_identity(self, judge):
        return {
            "kind": "rule-based",
            "name": "shapes-detector (shapes-world prompts only)",
            "note": "run GenEval's evaluation/evaluate_images.py on exports/geneval for the official score",
        }
