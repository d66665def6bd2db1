"""ISG-Bench (Chen et al. 2025, "Interleaved Scene Graphs for Interleaved Text-and-Image Generation
Assessment"): four levels, structural (rule-based, computed here), block, image and holistic
(judge model).

Input: `ISG-Bench.jsonl`, one item per line: {"id", "Category", "Query": [{"type": "text"|"image",
"content"}], "Golden": [...], "predict": {"structural", "block_qa", "image_qa", ...}}; image
contents are paths relative to the file's directory.

Export: `RUN/exports/isg/predictions.jsonl`, each input line plus "output": [{"type", "content"}]
(generated images as absolute paths under exports/isg/images/), the file ISG-eval.py reads.

Structural: the output's sequence of text/image blocks equals the Golden one (ISG's
evaluate_structure). With --judge: holistic 1-10 against the golden answer; image level = share
of the item's image_qa yes/no questions answered "yes" (a question whose preliminaries failed
counts as "no"); block level = mean 1-10 of the block_qa questions. As in ISG's summary, an
output with the wrong structure gets image 0 and block 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omni.eval.adapters.common import (
    ModelJudged,
    copy_image,
    data_file,
    eval_sample,
    json_rubric_system,
    load_image,
    read_jsonl,
    take,
    write_jsonl,
)
from omni.eval.benchmark import Segment, mean_by_task, merge_text
from omni.eval.judges.http import Rubric, judge_aspects, parse_json_scores
from omni.eval.records import sample_dir
from omni.utils import safe_name

HOLISTIC = Rubric(
    name="isg-holistic",
    aspects=("holistic",),
    low=1,
    high=10,
    parse=parse_json_scores,
    system=json_rubric_system(
        "You judge an interleaved text-and-image answer to a multimodal query against a golden answer. "
        "Consider whether it follows the query's instructions (number and order of images and texts), "
        "the accuracy of its content and the quality and consistency of its images.",
        {"holistic": "overall quality of the answer"},
        1,
        10,
    ),
)
BLOCK = Rubric(
    name="isg-block",
    aspects=("score",),
    low=1,
    high=10,
    parse=parse_json_scores,
    system=json_rubric_system(
        "You are shown two blocks of an interleaved answer (texts and/or images) and a question about "
        "how they relate. Judge how well the relation asked about holds.",
        {"score": "1 = does not hold at all, 10 = holds perfectly"},
        1,
        10,
    ),
)


def _parse_yes_no(text: str, rubric: Rubric) -> dict[str, float]:
    import re

    m = re.search(r"\b(yes|no)\b", text.lower())
    if not m:
        raise ValueError(f"no yes/no in the judge's reply: {text[:200]!r}")
    return {"answer": 1.0 if m.group(1) == "yes" else 0.0}


IMAGE_QA = Rubric(
    name="isg-image-qa",
    aspects=("answer",),
    low=0,
    high=1,
    parse=_parse_yes_no,
    system="Look at the image and answer the question with one word: yes or no.",
)


def _blocks(items: list[dict[str, Any]], roots: list[Path]) -> list[Segment]:
    out: list[Segment] = []
    for b in items:
        out.append(load_image(b["content"], roots) if b.get("type") == "image" else str(b.get("content", "")))
    return out


def _types(items: list[Any]) -> list[str]:
    return [
        "image"
        if (isinstance(b, dict) and b.get("type") == "image") or not isinstance(b, (dict, str))
        else "text"
        for b in items
    ]


class ISGBench(ModelJudged):
    name = "isg"
    description = "ISG-Bench: structural score (local) + judged block/image/holistic levels"
    rubric = HOLISTIC

    def samples(self, data, limit):
        path = data_file(data, "ISG-Bench.jsonl", self.name)
        roots = [path.parent, path.parent / "ISG_eval"]
        out = []
        for n, (_, item) in enumerate(take(read_jsonl(path), limit)):
            if "Query" not in item or "Golden" not in item:
                raise ValueError(f"{path} line {n + 1} lacks 'Query' or 'Golden'")
            try:
                golden = _blocks(item["Golden"], roots)
            except FileNotFoundError:
                golden = [str(b["content"]) for b in item["Golden"] if b.get("type") == "text"]
            out.append(
                eval_sample(
                    f"{n:05d}-{item.get('id', n)}",
                    item.get("Category", "all"),
                    _blocks(item["Query"], roots),
                    {"item": item},
                    golden,
                )
            )
        return out

    def score(self, sample, output, judge):
        item = sample.reference["item"]
        blocks = merge_text(output.segments)
        ok = _types(blocks) == _types(item["Golden"])
        scores: dict[str, Any] = {"structure": float(ok), "holistic": None, "image": None, "block": None}
        if judge is None:
            return scores
        content: list[Segment] = ["QUERY:", *sample.prompt, "ANSWER:", *(blocks or ["(empty)"])]
        if sample.answer:
            content += ["GOLDEN ANSWER:", *sample.answer]
        hol = judge_aspects(judge, HOLISTIC, content)
        scores["holistic"], scores["_holistic_reply"] = hol["holistic"], hol.get("_judge_reply")
        if not ok:
            scores["image"], scores["block"] = 0.0, 1.0
            return scores
        named = self._rename(item, blocks, sample.prompt)
        scores["image"] = self._image_level(judge, item, named)
        scores["block"] = self._block_level(judge, item, named)
        return scores

    @staticmethod
    def _rename(item: dict[str, Any], blocks: list[Segment], query: list[Segment]) -> dict[str, Segment]:
        """ISG's placeholder names: <gen_text1>, <gen_img1>, <query_text1>, <query_img1>, ..."""
        if (
            item["Golden"]
            and item["Golden"][0].get("type") == "image"
            and blocks
            and isinstance(blocks[0], str)
        ):
            blocks = blocks[1:]
        named: dict[str, Segment] = {}
        for prefix, segs in (("gen", blocks), ("query", query)):
            t = i = 0
            for s in segs:
                if isinstance(s, str):
                    t += 1
                    named[f"<{prefix}_text{t}>"] = s
                else:
                    i += 1
                    named[f"<{prefix}_img{i}>"] = s
        return named

    @staticmethod
    def _image_level(judge, item: dict[str, Any], named: dict[str, Segment]) -> float | None:
        qa = (item.get("predict") or {}).get("image_qa")
        if isinstance(qa, dict):
            qa = next(iter(qa.values()), [])
        if not qa:
            return None
        yes: dict[Any, bool] = {}
        for q in qa:
            yes[q.get("id")] = False
            if any(not yes.get(p, False) for p in q.get("Preliminary", [])):
                continue
            image = named.get(q.get("image"))
            if image is None or isinstance(image, str):
                continue
            ans = judge_aspects(judge, IMAGE_QA, [image, q.get("Question", "")])
            yes[q.get("id")] = ans.get("answer") == 1.0
        return sum(yes.values()) / len(qa)

    @staticmethod
    def _block_level(judge, item: dict[str, Any], named: dict[str, Segment]) -> float | None:
        qa = ((item.get("predict") or {}).get("block_qa") or {}).get("questions") or []
        vals = []
        for q in qa:
            a, b = named.get(q.get("subject")), named.get(q.get("object"))
            if a is None or b is None or "Question" not in q:
                continue
            res = judge_aspects(judge, BLOCK, [q["Question"], "Block 1:", a, "Block 2:", b])
            if res.get("score") is not None:
                vals.append(res["score"])
        return sum(vals) / len(vals) if vals else 1.0

    def aggregate(self, records, run_dir):
        res = mean_by_task(records, primary="structure")
        for level in ("structure", "holistic", "image", "block"):
            vals = [r["scores"][level] for r in records if r["scores"].get(level) is not None]
            res["metrics"][level] = round(sum(vals) / len(vals), 4) if vals else "not computed"
        res["overall"] = res["metrics"]["structure"]  # the level computed without a judge
        return res

    def export(self, records, run_dir: Path) -> dict[str, str]:
        root = run_dir / "exports" / "isg"
        rows = []
        for r in records:
            item = dict(r["reference"]["item"])
            out, k, text = [], 0, []
            for seg in r["output"]:
                if "text" in seg:
                    text.append(seg["text"].strip())
                    continue
                if any(text):
                    out.append({"type": "text", "content": " ".join(t for t in text if t)})
                text = []
                dst = root / "images" / f"{safe_name(r['id'])}_{k}.png"
                copy_image(sample_dir(run_dir, r["id"]) / seg["image"], dst)
                out.append({"type": "image", "content": str(dst.resolve())})
                k += 1
            if any(text):
                out.append({"type": "text", "content": " ".join(t for t in text if t)})
            item["output"] = out
            rows.append(item)
        write_jsonl(root / "predictions.jsonl", rows)
        return {"isg": str(root / "predictions.jsonl")}
