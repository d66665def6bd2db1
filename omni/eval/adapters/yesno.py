"""Yes/no understanding benchmarks: MME (Fu et al. 2023) and POPE (Li et al. 2023).

MME: `--data MME_Benchmark_release_version/`, one folder per category. A category holds either
`images/` + `questions_answer_YES_NO/` or images and .txt files side by side; each .txt holds the
two questions of its image, `question<TAB>Yes|No` per line. Export: one
`RUN/exports/mme/<category>.txt` per category with `image<TAB>question<TAB>answer<TAB>prediction`
lines in the input order (the file eval_tool/calculation.py reads). Scores per category: acc
(per question), acc+ (both questions of an image right) and MME's score = 100 (acc + acc+);
perception and cognition totals as in the paper.

POPE: `--data coco_pope_random.json` (JSON lines {"question_id", "image", "text", "label"}),
images beside it or in `images/` / `val2014/`. Export: `RUN/exports/pope/answers.jsonl` with
{"question_id", "prompt", "text", "model_id"} (LLaVA's eval_pope.py input). Scores: accuracy,
precision, recall, F1 and yes-ratio, with POPE's reading of an answer (a "no", "not" or "No" among
the first sentence's words means no, anything else yes).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar

from omni.eval.adapters.common import data_file, eval_sample, load_image, read_jsonl, write_jsonl
from omni.eval.benchmark import Benchmark, output_text
from omni.utils import atomic_write_text, safe_name

PERCEPTION = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg", ".JPG", ".PNG")


def mme_label(prediction: str) -> str:
    """MME's reading: exactly yes/no, else yes/no within the first four characters, else other."""
    p = prediction.strip().lower()
    if p in ("yes", "no"):
        return p
    return "yes" if "yes" in p[:4] else "no" if "no" in p[:4] else "other"


def pope_label(prediction: str) -> str:
    """POPE's reading (LLaVA eval_pope): the first sentence, commas removed, split on spaces."""
    text = prediction.split(".")[0] if "." in prediction else prediction
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


class MME(Benchmark):
    name = "mme"
    description = "MME yes/no perception and cognition: acc, acc+ and score per category"
    tasks = PERCEPTION + COGNITION
    gen_defaults: ClassVar[dict[str, Any]] = {"max_new_tokens": 8}

    def samples(self, data, limit):
        if not data or not Path(data).is_dir():
            raise ValueError(
                "mme needs --data DIR: the MME_Benchmark_release_version folder (one folder per category)"
            )
        root = Path(data)
        out = []
        for cat_dir in sorted(p for p in root.iterdir() if p.is_dir()):
            qa_dir = cat_dir / "questions_answer_YES_NO"
            img_dir = cat_dir / "images" if qa_dir.is_dir() else cat_dir
            txt_dir = qa_dir if qa_dir.is_dir() else cat_dir
            for txt in sorted(txt_dir.glob("*.txt")):
                image = next(
                    (img_dir / (txt.stem + s) for s in IMAGE_SUFFIXES if (img_dir / (txt.stem + s)).exists()),
                    None,
                )
                if image is None:
                    raise FileNotFoundError(f"MME: no image for {txt} in {img_dir}")
                lines = [ln for ln in txt.read_text(encoding="utf-8").splitlines() if ln.strip()]
                for j, line in enumerate(lines):
                    question, _, answer = line.rpartition("\t")
                    if answer.strip().lower() not in ("yes", "no"):
                        raise ValueError(
                            f"MME: {txt} line {j + 1} does not end in a tab and Yes/No: {line!r}"
                        )
                    out.append(
                        eval_sample(
                            f"{cat_dir.name}-{txt.stem}-{j}",
                            cat_dir.name,
                            [load_image(str(image), [img_dir]), question],
                            {
                                "image": image.name,
                                "question": question,
                                "answer": answer.strip(),
                                "pair": f"{cat_dir.name}/{txt.stem}",
                            },
                            [answer.strip()],
                            mode="text",
                        )
                    )
            if limit is not None and len(out) >= limit:
                break
        if limit is not None:  # never split the two questions of one image (acc+ needs both)
            keep = {s.reference["pair"] for s in out[:limit]}
            out = [s for s in out if s.reference["pair"] in keep]
        return out

    def score(self, sample, output, judge):
        pred = mme_label(output_text(output.segments))
        return {"correct": float(pred == sample.reference["answer"].lower()), "_label": pred}

    def aggregate(self, records, run_dir):
        tasks: dict[str, Any] = {}
        for cat in list(self.tasks) + sorted({r["task"] for r in records} - set(self.tasks)):
            rows = [r for r in records if r["task"] == cat]
            if not rows:
                continue
            pairs: dict[str, list[float]] = {}
            for r in rows:
                pairs.setdefault(r["reference"]["pair"], []).append(r["scores"]["correct"])
            acc = sum(r["scores"]["correct"] for r in rows) / len(rows)
            acc_plus = sum(all(v == 1.0 for v in p) for p in pairs.values()) / len(pairs)
            tasks[cat] = {
                "n": len(rows),
                "acc": round(acc, 6),
                "acc_plus": round(acc_plus, 6),
                "score": round(100 * (acc + acc_plus), 4),
            }
        perception = sum(t["score"] for c, t in tasks.items() if c in PERCEPTION)
        cognition = sum(t["score"] for c, t in tasks.items() if c in COGNITION)
        return {
            "overall": round(perception + cognition, 4),
            "tasks": tasks,
            "metrics": {"perception": round(perception, 4), "cognition": round(cognition, 4)},
        }

    def export(self, records, run_dir: Path) -> dict[str, str]:
        root = run_dir / "exports" / "mme"
        by_cat: dict[str, list[str]] = {}
        for r in records:
            ref = r["reference"]
            pred = _one_line(" ".join(seg["text"] for seg in r["output"] if "text" in seg))
            by_cat.setdefault(r["task"], []).append(
                f"{ref['image']}\t{ref['question']}\t{ref['answer']}\t{pred}\n"
            )
        for cat, lines in by_cat.items():
            atomic_write_text(root / f"{safe_name(cat)}.txt", "".join(lines))
        return {"mme": str(root)}


class POPE(Benchmark):
    name = "pope"
    description = "POPE object hallucination (yes/no): accuracy, precision, recall, F1, yes-ratio"
    gen_defaults: ClassVar[dict[str, Any]] = {"max_new_tokens": 8}

    def samples(self, data, limit):
        path = data_file(data, "coco_pope_random.json", self.name)
        roots = [path.parent, path.parent / "images", path.parent / "val2014"]
        task = path.stem.replace("coco_pope_", "")
        out = []
        for n, (_, q) in enumerate(read_jsonl(path)[: limit if limit is not None else None]):
            missing = [k for k in ("question_id", "image", "text", "label") if k not in q]
            if missing:
                raise ValueError(f"{path} line {n + 1} lacks POPE field(s) {missing}")
            out.append(
                eval_sample(
                    f"q{q['question_id']}",
                    task,
                    [load_image(q["image"], roots), q["text"]],
                    {"question": q},
                    [q["label"]],
                    mode="text",
                )
            )
        return out

    def score(self, sample, output, judge):
        pred = pope_label(output_text(output.segments))
        return {"correct": float(pred == sample.reference["question"]["label"]), "_label": pred}

    def aggregate(self, records, run_dir):
        labels = [r["reference"]["question"]["label"] == "yes" for r in records]
        preds = [r["details"]["label"] == "yes" for r in records]
        tp = sum(p and t for p, t in zip(preds, labels))
        fp = sum(p and not t for p, t in zip(preds, labels))
        tn = sum(not p and not t for p, t in zip(preds, labels))
        fn = sum(not p and t for p, t in zip(preds, labels))
        n = len(records)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        metrics = {
            "accuracy": (tp + tn) / n,
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "yes_ratio": (tp + fp) / n,
            "tp": tp,
            "fp": fp,
            "tn": tn,
            "fn": fn,
        }
        metrics = {k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()}
        task = records[0]["task"] if records else "pope"
        return {"overall": metrics["accuracy"], "tasks": {task: {"n": n, **metrics}}, "metrics": metrics}

    def export(self, records, run_dir: Path) -> dict[str, str]:
        path = run_dir / "exports" / "pope" / "answers.jsonl"
        write_jsonl(
            path,
            [
                {
                    "question_id": r["reference"]["question"]["question_id"],
                    "prompt": r["reference"]["question"]["text"],
                    "text": " ".join(seg["text"] for seg in r["output"] if "text" in seg).strip(),
                    "model_id": "omni",
                }
                for r in records
            ],
        )
        return {"pope": str(path)}
