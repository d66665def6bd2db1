"""Built-in benchmarks on the shapes world and real handwritten digits, with rule-based judges.

They need no model weights beyond the one under test, so they run anywhere (CPU included).

| name            | prompt -> answer              | score                                                   |
|-----------------|-------------------------------|---------------------------------------------------------|
| shapes-t2i      | caption -> image              | GenEval's clauses on detected objects; overall = mean of the 6 task accuracies |
| shapes-vqa      | image + question -> answer    | exact answer accuracy (per question type)               |
| shapes-caption  | image -> caption              | caption parsed and checked against the scene            |
| shapes-story    | opening text -> continuation  | structure (ISG-Bench) + per-image state accuracy        |
| shapes-edit     | image + instruction -> image, twice | exactly the target scene (per edit kind, 2nd round, two phrasings) |
| digits-t2i      | "draw the digit 7." -> image  | independent classifier accuracy + Fréchet distance      |
| digits-read     | image -> "this is the digit 7." | reading accuracy on held-out real digits              |

Held-out documents: `data` = validation shards written by `omni data shapes|digits` (paths,
directories or brace patterns), or, without `data`, documents generated procedurally from the
`test` split of the shapes world (seeded apart from `train` and `val`) and the held-out digits.
Prompts and answers come from `omni.data.templates.split_prompt`, exactly as in training.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from omni.data.templates import EDIT_KINDS
from omni.eval.benchmark import (
    Benchmark,
    EvalSample,
    Output,
    mean_by_task,
    merge_text,
    output_images,
    output_text,
)
from omni.eval.judges import shapes as SJ
from omni.eval.records import sample_dir

TEST_SPLIT = "test"  # procedural held-out split of the shapes world: never written to training shards
TEST_SEED = 0


def heldout_shards(data: str) -> str:
    """A shard spec for held-out documents: a directory written by `omni data` means its val-*.tar
    (never its train-*.tar); files, globs and brace patterns are taken as given."""
    path = Path(data)
    if path.is_dir():
        val = sorted(path.glob("val-*.tar"))
        if not val:
            raise FileNotFoundError(
                f"{data} holds no val-*.tar shards; point --data at the held-out shards written by "
                "`omni data shapes|digits --out DIR` (DIR or DIR/val-*.tar)"
            )
        return str(path / "val-*.tar")
    return data


def _documents(data: str | None, task: str, limit: int | None, default: int) -> Iterator[Any]:
    """Held-out documents of one task, in a fixed order."""
    n = limit if limit is not None else default
    if n <= 0:
        return
    if data:
        from omni.data.shards import read_documents

        for i, doc in enumerate(read_documents(heldout_shards(data), tasks={task})):
            if i >= n:
                return
            yield doc
    elif task.startswith("digit"):
        from omni.data.digits import documents

        docs = (d for d in documents("heldout") if d.task == task)
        for i, doc in enumerate(docs):
            if i >= n:
                return
            yield doc
    else:
        from omni.data.shapes import generate

        yield from generate(n, split=TEST_SPLIT, seed=TEST_SEED, mix={task: 1.0})


def _sample(doc, mode: str, reference: dict[str, Any], task: str, suffix: str = "") -> EvalSample:
    from omni.data.templates import split_prompt

    prompt, answer = split_prompt(doc)
    return EvalSample(
        id=doc.key + suffix, task=task, prompt=prompt, mode=mode, reference=reference, answer=answer
    )


def _first_image(output: Output) -> Image.Image | None:
    images = output_images(output.segments)
    return images[0] if images else None


def _micro(records: list[dict[str, Any]], key: str = "correct") -> float | str:
    vals = [r["scores"][key] for r in records if r["scores"].get(key) is not None]
    return round(sum(vals) / len(vals), 6) if vals else "not computed"


# --------------------------------------------------------------------------------------------
# Shapes world
# --------------------------------------------------------------------------------------------


# A position prompt "X rel Y" whose first-named object X sits in the earlier cell in raster order.
FIRST_NAMED_FIRST = ("left of", "above")


class ShapesT2I(Benchmark):
    name = "shapes-t2i"
    description = "GenEval's protocol on the shapes world (rule-based detector on the generated pixels)"
    tasks = ("single_object", "two_objects", "counting", "colors", "position", "color_attr")
    default_count = 300
    judge_version = 2  # 2: shapes by whole-outline overlap with holes filled (was: box fill ratio)

    def samples(self, data, limit):
        out = []
        for doc in _documents(data, "t2i", limit, self.default_count):
            spec = SJ.geneval_spec(doc.meta)
            ref = {"geneval": spec, "objects": doc.meta["objects"], "prompt": doc.segments[0]}
            for k in range(self.samples_per_prompt):
                suffix = f"-s{k}" if self.samples_per_prompt > 1 else ""
                out.append(_sample(doc, "image", ref, doc.meta["subtask"], suffix))
        return out

    def score(self, sample, output, judge):
        image = _first_image(output)
        if image is None:
            return {"correct": 0.0, "_reason": "no image generated"}
        dets = SJ.detect(image)
        ok, reasons = SJ.check_spec(dets, sample.reference["geneval"])
        return {"correct": float(ok), "_reason": "; ".join(reasons), "_detected": [d.to_dict() for d in dets]}

    def aggregate(self, records, run_dir):
        res = mean_by_task(records, self.tasks, primary="correct")
        # Position prompts split by whether the first-named object is drawn first in raster order
        # ("X left of Y", "X above Y") or last ("X right of Y", "X below Y"): a model that draws what
        # it reads first first, and so ignores the relation, scores high on the one and ~0 on the other.
        split: dict[str, list[dict[str, Any]]] = {"position_named_first": [], "position_named_last": []}
        for r in records:
            if r["task"] == "position":
                rel = r["reference"]["geneval"]["include"][1]["position"][0]
                split["position_named_first" if rel in FIRST_NAMED_FIRST else "position_named_last"].append(r)
        metrics = {k: _micro(rows) for k, rows in split.items() if rows}
        if metrics:
            res["metrics"] = {**res.get("metrics", {}), **metrics}
        return res


class ShapesVQA(Benchmark):
    name = "shapes-vqa"
    description = "visual question answering on the shapes world: exact answer accuracy"
    tasks = ("color", "shape", "count", "position")
    gen_defaults: ClassVar[dict[str, Any]] = {"max_new_tokens": 16}
    default_count = 200

    def samples(self, data, limit):
        return [
            _sample(
                doc,
                "text",
                {"answer": doc.meta["answer"], "question": doc.meta["question"]},
                doc.meta["question_type"],
            )
            for doc in _documents(data, "vqa", limit, self.default_count)
        ]

    def score(self, sample, output, judge):
        return {"correct": float(SJ.answer_correct(output_text(output.segments), sample.reference["answer"]))}

    def aggregate(self, records, run_dir):
        res = mean_by_task(records, self.tasks, primary="correct")
        res["overall"] = _micro(records)  # accuracy over all questions
        return res


class ShapesCaption(Benchmark):
    name = "shapes-caption"
    description = "captioning on the shapes world: the caption is parsed and checked against the scene"
    tasks = ("colors", "position", "counting")
    gen_defaults: ClassVar[dict[str, Any]] = {"max_new_tokens": 40}
    default_count = 150

    def samples(self, data, limit):
        return [
            _sample(doc, "text", {"objects": doc.meta["objects"]}, doc.meta["subtask"])
            for doc in _documents(data, "caption", limit, self.default_count)
        ]

    def score(self, sample, output, judge):
        return {
            "correct": float(SJ.caption_correct(output_text(output.segments), sample.reference["objects"]))
        }

    def aggregate(self, records, run_dir):
        res = mean_by_task(records, self.tasks, primary="correct")
        res["overall"] = _micro(records)
        return res


class ShapesStory(Benchmark):
    """Interleaved stories: scenes that change step by step.

    Two generations per story: a free continuation of the opening text (scored on structure: the
    right sequence of image and text blocks, ISG-Bench's structural check), and a guided one that
    is given the story's event texts and draws each frame (scored per frame against the story's
    ground-truth state: every object with its shape, colour and place, nothing else).
    overall = mean(structure, state_accuracy).
    """

    name = "shapes-story"
    description = "interleaved story continuation: structure score and per-image state accuracy"
    tasks = ("story",)
    gen_defaults: ClassVar[dict[str, Any]] = {"max_new_tokens": 200, "max_images": 4}
    judge_version = 2  # as shapes-t2i's
    default_count = 60

    def samples(self, data, limit):
        out = []
        for doc in _documents(data, "story", limit, self.default_count):
            texts = [s for s in doc.segments if isinstance(s, str)]
            ref = {
                "steps": doc.meta["steps"],
                "texts": texts,
                "canvas": int(doc.meta.get("canvas", 32)),
                "structure": ["image" if isinstance(s, Image.Image) else "text" for s in doc.segments[1:]],
            }
            out.append(_sample(doc, "auto", ref, "story"))
        return out

    def generate(self, model, samples, cfg, seeds):
        from omni.inference.generate import generate

        outputs = super().generate(model, samples, cfg, seeds)  # free continuations
        guided: list[list[Image.Image]] = [[] for _ in samples]
        for k in range(max(len(s.reference["texts"]) for s in samples)):
            idx = [i for i, s in enumerate(samples) if k < len(s.reference["texts"])]
            prompts = []
            for i in idx:
                texts = samples[i].reference["texts"]
                prompt: list = []
                for j in range(k):
                    prompt += [texts[j], guided[i][j]]
                prompts.append(prompt + [texts[k]])
            for i, r in zip(idx, generate(model, prompts, cfg, seeds=[seeds[i] for i in idx], mode="image")):
                canvas = samples[i].reference["canvas"]
                guided[i].append(r.images[0] if r.images else Image.new("RGB", (canvas, canvas), "white"))
        for out, frames in zip(outputs, guided):
            out.extra["guided"] = list(frames)
        return outputs

    def score(self, sample, output, judge):
        ref = sample.reference
        got = ["image" if isinstance(s, Image.Image) else "text" for s in merge_text(output.segments)]
        frames = output_images(output.extra.get("guided", []))
        correct = [
            SJ.state_matches(SJ.detect(img), step["objects"], ref["canvas"]) if img is not None else False
            for img, step in zip(frames + [None] * len(ref["steps"]), ref["steps"])
        ]
        return {
            "structure": float(got == ref["structure"]),
            "state_accuracy": sum(correct) / len(ref["steps"]),
            "_frames_correct": correct,
        }

    def aggregate(self, records, run_dir):
        res = mean_by_task(records, self.tasks)
        t = res["tasks"].get("story", {})
        vals = [t.get("structure"), t.get("state_accuracy")]
        res["overall"] = (
            round(sum(vals) / 2, 6) if all(isinstance(v, float) for v in vals) else "not computed"
        )
        return res


class ShapesEdit(Benchmark):
    """Image editing: the model reads `[source image, instruction]` and draws the edited scene,
    judged as exactly the target scene's objects (shape, colour, place) and nothing else.

    Held-out scenes: the shapes world's edit documents of the validation split, generated here
    (`omni.data.shapes.edit_documents`, seeded apart from training), each with two rounds whose
    first kind cycles recolor, move, remove, add, swap. Every scene is asked twice: in the training
    wordings (the template split) and in wordings training never shows (the held-out phrasing
    split), so the two splits differ only in their words.

    The second round's prompt is the whole conversation with the model's OWN first result:
    `[source, instruction 1, result 1, instruction 2]`, judged against the ground-truth scene after
    both edits. That is editing as a user meets it (chat's "now move it to the left" continues from
    what the model drew) and as training lays out a two-round document; a wrong first result makes
    the second wrong too, so `after_correct_first` (second-round accuracy where the first was right)
    gives the second-round skill on its own.

    overall = mean over the five kinds of the template split's first-round accuracy (GenEval's
    equal task weights); tasks: each kind, and `second_round`; metrics: the same on the held-out
    phrasing split (`heldout_*`).
    """

    name = "shapes-edit"
    description = "image editing on the shapes world: the drawn scene must be exactly the target scene"
    tasks = (*EDIT_KINDS, "second_round")
    gen_defaults: ClassVar[dict[str, Any]] = {}
    default_count = 100  # scenes (20 per kind), each in both phrasings: 200 samples of 2 rounds
    judge_version = 1
    splits = ("template", "heldout")

    def samples(self, data, limit):
        from omni.data.shapes import edit_documents

        if data:
            raise ValueError(
                f"shapes-edit makes its own held-out edits (validation-split scenes asked in the training "
                f"and in held-out wordings); run it without --data (got {data!r})"
            )
        n = limit if limit is not None else self.default_count
        out = []
        for split in self.splits:
            for doc in edit_documents(n, split="val", seed=TEST_SEED, phrasing=split, rounds=2):
                targets = doc.meta["targets"]
                ref = {"split": split, "kinds": doc.meta["kinds"], "instructions": doc.meta["instructions"],
                       "source": doc.meta["source"], "targets": targets, "canvas": int(doc.meta["canvas"])}
                out.append(EvalSample(id=f"{doc.key}-{doc.meta['kinds'][0]}", task=doc.meta["kinds"][0],
                                      prompt=doc.segments[:2], mode="image", reference=ref,
                                      answer=doc.segments[2:]))
        return out

    def generate(self, model, samples, cfg, seeds):
        from omni.inference.generate import generate

        first = generate(model, [s.prompt for s in samples], cfg, seeds=seeds, mode="image")
        results = []
        for s, r in zip(samples, first):
            canvas = s.reference["canvas"]
            results.append(r.images[0] if r.images else Image.new("RGB", (canvas, canvas), "white"))
        prompts = [[*s.prompt, img, s.reference["instructions"][1]] for s, img in zip(samples, results)]
        second = generate(model, prompts, cfg, seeds=seeds, mode="image")
        return [Output(list(r1.segments), r1.finish_reason, dict(r1.settings),
                       extra={"round2": [s.reference["instructions"][1], *r2.segments]})
                for s, r1, r2 in zip(samples, first, second)]

    def score(self, sample, output, judge):
        ref = sample.reference
        scores: dict[str, Any] = {}
        for r, segments in enumerate((output.segments, output.extra.get("round2", [])), start=1):
            images = output_images(segments)
            if not images:
                scores[f"round{r}"], scores[f"_round{r}"] = 0.0, ["no image generated"]
                continue
            ok, diffs, _ = SJ.edit_matches(images[0], ref["targets"][r - 1], ref["canvas"])
            scores[f"round{r}"], scores[f"_round{r}"] = float(ok), diffs
        return scores

    def aggregate(self, records, run_dir):
        def mean(vals):
            return round(sum(vals) / len(vals), 6) if vals else "not computed"

        def split_scores(rows):
            kinds = {k: [r for r in rows if r["task"] == k] for k in EDIT_KINDS}
            per_kind = {k: {"n": len(v), "correct": mean([r["scores"]["round1"] for r in v])}
                        for k, v in kinds.items() if v}
            after = [r["scores"]["round2"] for r in rows if r["scores"]["round1"] == 1.0]
            second = {"n": len(rows), "correct": mean([r["scores"]["round2"] for r in rows]),
                      "after_correct_first": mean(after)}
            firsts = [m["correct"] for m in per_kind.values() if isinstance(m["correct"], float)]
            return per_kind, second, mean(firsts)

        by_split = {sp: [r for r in records if r["reference"]["split"] == sp] for sp in self.splits}
        tasks, second, overall = split_scores(by_split["template"])
        if by_split["template"]:
            tasks["second_round"] = second
        metrics: dict[str, Any] = {}
        if by_split["heldout"]:
            kinds, second, held = split_scores(by_split["heldout"])
            metrics["heldout_phrasing"] = held
            metrics.update({f"heldout_{k}": m["correct"] for k, m in kinds.items()})
            metrics["heldout_second_round"] = second["correct"]
        return {"overall": overall, "tasks": tasks, "metrics": metrics}


# --------------------------------------------------------------------------------------------
# Digits
# --------------------------------------------------------------------------------------------


class _Digits(Benchmark):
    tasks = tuple(str(d) for d in range(10))
    default_count = 10_000  # all held-out digits

    def _samples(self, data, limit, task, mode):
        return [
            _sample(doc, mode, {"digit": int(doc.meta["digit"])}, str(doc.meta["digit"]))
            for doc in _documents(data, task, limit, self.default_count)
        ]

    def aggregate(self, records, run_dir):
        res = mean_by_task(records, self.tasks, primary="correct")
        res["overall"] = _micro(records)
        return res


class DigitsT2I(_Digits):
    """Generated digits judged by an independent CNN trained only on held-out real digits."""

    name = "digits-t2i"
    description = "handwritten digit generation: independent classifier accuracy and Fréchet distance"

    def __init__(self) -> None:
        self._judge = None
        self.run_dir: Path | None = None  # set by the harness: the judge's weights are cached there

    def judge(self):
        if self._judge is None:
            from omni.eval.judges.digits import DigitJudge

            cache = self.run_dir / "judge" / "digits_cnn.safetensors" if self.run_dir is not None else None
            self._judge = DigitJudge.from_heldout(cache=cache)
        return self._judge

    def samples(self, data, limit):
        return self._samples(data, limit, "digit_t2i", "image")

    def score(self, sample, output, judge):
        image = _first_image(output)
        if image is None:
            return {"correct": 0.0, "_predicted": None}
        pred = int(self.judge().predict([image])[0])
        return {"correct": float(pred == sample.reference["digit"]), "_predicted": pred}

    def aggregate(self, records, run_dir):
        from omni.data.digits import load_split
        from omni.eval.judges.digits import frechet_distance

        res = super().aggregate(records, run_dir)
        j = self.judge()
        real, _ = load_split("heldout")
        test_real = real[j.test_index]
        train_real = real[np.setdiff1d(np.arange(len(real)), j.test_index)]
        generated = []
        for r in records:
            files = [seg["image"] for seg in r["output"] if "image" in seg][:1]
            generated += [Image.open(sample_dir(run_dir, r["id"]) / f).convert("RGB") for f in files]
        metrics: dict[str, Any] = {
            "classifier_accuracy_real": round(j.accuracy, 6),
            "fd_real_halves": round(frechet_distance(j.features(train_real), j.features(test_real)), 4),
        }
        if len(generated) >= 2:
            metrics["fd_generated_vs_real"] = round(
                frechet_distance(j.features(generated), j.features(test_real)), 4
            )
        else:
            metrics["fd_generated_vs_real"] = "not computed (fewer than 2 images)"
        res["metrics"] = metrics
        return res

    def judge_identity(self, judge):
        return self.judge().identity()


class DigitsRead(_Digits):
    name = "digits-read"
    description = "reading held-out real handwritten digits: accuracy"
    gen_defaults: ClassVar[dict[str, Any]] = {"max_new_tokens": 16}

    def samples(self, data, limit):
        return self._samples(data, limit, "digit_read", "text")

    def score(self, sample, output, judge):
        from omni.data.templates import parse_digit

        pred = parse_digit(output_text(output.segments))
        return {"correct": float(pred == sample.reference["digit"]), "_predicted": pred}


BUILTIN = {b.name: b for b in (ShapesT2I, ShapesVQA, ShapesCaption, ShapesStory, ShapesEdit, DigitsT2I, DigitsRead)}


def oracle_output(sample: EvalSample) -> Output:
    """The ground-truth answer as an Output (story frames included): what a perfect model writes."""
    out = Output(list(sample.answer))
    if "steps" in sample.reference:
        out.extra["guided"] = output_images(sample.answer)
    if "targets" in sample.reference:  # shapes-edit: the first result, then the second round
        out = Output(list(sample.answer[:1]), extra={"round2": list(sample.answer[1:])})
    return out
