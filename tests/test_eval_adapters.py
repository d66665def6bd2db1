"""Public-benchmark adapters on small fixture files written here in the exact published schemas.

Generation is replaced by canned answers (the sampler has its own tests), so each test checks what
the adapter reads, how it scores, and the files it writes for the official scorers.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_eval_http_judge import FakeJudgeServer

from omni.eval.benchmark import Output
from omni.eval.harness import evaluate
from omni.eval.registry import get_benchmark


def canned(name: str, answers):
    """The benchmark `name` with generation replaced by answers(sample) -> list of segments."""
    bench = get_benchmark(name)
    bench.generate = lambda model, samples, cfg, seeds: [
        Output(list(answers(s)), "eos", {"seed": x}) for s, x in zip(samples, seeds)
    ]
    return bench


def picture(color=(40, 80, 220), size=32) -> Image.Image:
    return Image.new("RGB", (size, size), color)


def save(path: Path, image: Image.Image) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return str(path)


def run(tiny_model, bench, tmp_path, data, **kw):
    out = tmp_path / "run"
    return evaluate(tiny_model, bench, out, data=str(data), progress=False, **kw), out


# --------------------------------------------------------------------------------------------
# GenEval
# --------------------------------------------------------------------------------------------

GENEVAL_LINES = [
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
    {
        "tag": "counting",
        "include": [{"class": "circle", "count": 2, "color": "red"}],
        "exclude": [{"class": "circle", "count": 3, "color": "red"}],
        "prompt": "a photo of two red circles",
    },
    {
        "tag": "position",
        "include": [
            {"class": "square", "count": 1},
            {"class": "circle", "count": 1, "position": ["left of", 0]},
        ],
        "prompt": "a photo of a circle left of a square",
    },
]


def test_geneval_layout_is_what_the_evaluator_reads(tiny_model, tmp_path):
    from omni.data.shapes import render

    meta = tmp_path / "evaluation_metadata.jsonl"
    meta.write_text("".join(json.dumps(x) + "\n" for x in GENEVAL_LINES))
    red = {"shape": "circle", "color": "red", "size": 10}
    good = {
        "a photo of two red circles": render([dict(red, cx=8, cy=8), dict(red, cx=24, cy=8)]),
        "a photo of a circle left of a square": render(
            [dict(red, cx=8, cy=8), {"shape": "square", "color": "blue", "cx": 24, "cy": 8, "size": 10}]
        ),
    }

    def answers(s):  # samples 0 and 2 of each prompt are right, 1 and 3 are blank
        return [
            good.get(s.prompt[0], picture()) if s.reference["sample"] % 2 == 0 else picture((255, 255, 255))
        ]

    res, out = run(tiny_model, canned("geneval", answers), tmp_path, meta)
    assert res["n_samples"] == 12 and res["samples_per_prompt"] == 4
    assert res["tasks"]["single_object"]["correct"] == "not computed"  # COCO classes: GenEval's detector
    assert res["tasks"]["counting"]["correct"] == 0.5 and res["tasks"]["position"]["correct"] == 0.5

    # GenEval's evaluate_images.py: numeric subfolders, json.load(metadata.jsonl), samples/\d+.png
    root = out / res["exports"]["geneval"]
    lines = meta.read_text().splitlines()
    folders = sorted(os.listdir(root))
    assert folders == ["00000", "00001", "00002"]
    for i, sub in enumerate(folders):
        assert sub.isdigit()
        with open(root / sub / "metadata.jsonl") as fp:
            assert json.load(fp) == GENEVAL_LINES[i]
        assert (root / sub / "metadata.jsonl").read_text().strip() == lines[i]
        names = sorted(os.listdir(root / sub / "samples"))
        assert names == ["0000.png", "0001.png", "0002.png", "0003.png"]
        assert all(re.match(r"\d+\.png", n) for n in names)
    exported = Image.open(root / "00001" / "samples" / "0000.png").convert("RGB")
    assert (np.asarray(exported) == np.asarray(good["a photo of two red circles"])).all()


# --------------------------------------------------------------------------------------------
# InterleavedBench
# --------------------------------------------------------------------------------------------


def _interleavedbench(tmp_path: Path) -> Path:
    imgs = tmp_path / "zipped_images" / "wikihow"
    save(imgs / "0_0.png", picture((220, 40, 40)))
    save(imgs / "0_1.png", picture((40, 170, 60)))
    save(imgs / "1_0.png", picture((230, 200, 40)))
    items = [
        {
            "id": "wikihow_0",
            "task_name": "wikihow_next_step",
            "image": ["wikihow/0_0.png", "wikihow/0_1.png"],
            "conversations": [
                {"from": "human", "value": "<BEGIN> How to fold a shirt. Step 1: lay it flat. <image> Next?"},
                {"from": "gpt", "value": "Step 2: fold the sleeves in. <image>"},
            ],
        },
        {
            "id": "story_1",
            "task_name": "storytelling_generation",
            "image": ["wikihow/1_0.png"],
            "conversations": [
                {"from": "human", "value": "Continue the story. <image>"},
                {"from": "gpt", "value": "The end."},
            ],
        },
    ]
    path = tmp_path / "interleaved_bench.json"
    path.write_text(json.dumps(items))
    return path


def test_interleavedbench_export_and_unjudged_aspects(tiny_model, tmp_path):
    path = _interleavedbench(tmp_path)
    bench = canned("interleavedbench", lambda s: ["Fold the sleeves.", picture(), "Done."])
    samples = bench.samples(str(path), None)
    assert [type(x).__name__ for x in samples[0].prompt] == ["str", "Image", "str"]
    assert samples[0].prompt[0] == "How to fold a shirt. Step 1: lay it flat."
    assert (
        samples[0].answer[0] == "Step 2: fold the sleeves in."
        and samples[1].task == "storytelling_generation"
    )

    res, out = run(tiny_model, bench, tmp_path, path)
    assert res["overall"] == "not computed" and res["metrics"]["helpfulness"] == "not computed"
    assert res["judge"]["kind"] == "none"
    pred_path = out / res["exports"]["interleavedbench"]
    preds = json.loads(pred_path.read_text())
    assert [p["id"] for p in preds] == ["wikihow_0", "story_1"]
    first = preds[0]
    assert first["conversations"][0]["from"] == "human"
    assert first["conversations"][-1] == {"from": "gpt", "value": "Fold the sleeves. <image> Done."}
    assert first["image"][0] == "wikihow/0_0.png" and len(first["image"]) == 2  # 1 input + 1 generated
    assert (pred_path.parent / first["image"][1]).exists()


def test_interleavedbench_with_http_judge(tiny_model, tmp_path):
    from omni.eval.judges.http import HTTPJudge

    path = _interleavedbench(tmp_path)
    with FakeJudgeServer() as server:
        reply = json.dumps(
            {
                "text_quality": 4,
                "perceptual_quality": 2,
                "image_coherence": 3,
                "text_image_coherence": 5,
                "helpfulness": 1,
            }
        )
        server.replies += [(200, reply), (200, reply)]
        judge = HTTPJudge(server.url, "fake-judge")
        res, _ = run(
            tiny_model, canned("interleavedbench", lambda s: ["x", picture()]), tmp_path, path, judge=judge
        )
    assert res["metrics"] == {
        "text_quality": 4.0,
        "perceptual_quality": 2.0,
        "image_coherence": 3.0,
        "text_image_coherence": 5.0,
        "helpfulness": 1.0,
    }
    assert res["overall"] == 3.0 and res["judge"]["model"] == "fake-judge"
    assert len(server.requests) == 2 and "0 to 5" in server.requests[0]["body"]["messages"][0]["content"]


# --------------------------------------------------------------------------------------------
# OpenING
# --------------------------------------------------------------------------------------------


def test_opening_outputs_in_its_schema(tiny_model, tmp_path):
    save(tmp_path / "images" / "Storybook Completion" / "96-i-1.jpg", picture((220, 40, 40)))
    lines = [
        {
            "total_uid": "0301096",
            "meta_task_id": "3",
            "meta_task_name": "Multimodal Content Completion",
            "subtask_id": "1",
            "subtask_name": "Storybook Completion",
            "data_id": "96",
            "conversations": [
                {
                    "input": [
                        {
                            "image": "./images/Storybook Completion/96-i-1.jpg",
                            "text": "Complete the story. <BEGIN> George played outside. <image>",
                        }
                    ]
                },
                {"output": [{"image": None, "text": "He found a bird. <image>"}]},
            ],
        },
        {
            "total_uid": "1502010",
            "meta_task_id": "15",
            "meta_task_name": "Multimodal Brainstorming",
            "subtask_id": "2",
            "subtask_name": "Academic Scenarios Brainstorming",
            "data_id": "10",
            "conversations": [
                {"input": [{"image": None, "text": "<BEGIN> Show a diagram of a cell."}]},
                {"output": [{"image": None, "text": "Here it is. <image>"}]},
            ],
        },
    ]
    data = tmp_path / "test_data.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in lines))
    bench = canned(
        "opening", lambda s: ["He found a bird.", picture(), "It flew home.", picture((40, 170, 60))]
    )
    samples = bench.samples(str(data), None)
    assert samples[0].prompt[0] == "Complete the story. George played outside." and isinstance(
        samples[0].prompt[1], Image.Image
    )
    res, out = run(tiny_model, bench, tmp_path, data)
    assert set(res["tasks"]) == {"Multimodal Content Completion", "Multimodal Brainstorming"}
    assert res["metrics"]["Correctness"] == "not computed"
    folder = out / res["exports"]["opening"]
    assert folder.name == "omni_output"
    got = json.loads((folder / "0301096.json").read_text())
    assert (
        got["subtask_name"] == "Storybook Completion"
        and got["conversations"][0] == lines[0]["conversations"][0]
    )
    assert got["conversations"][1] == {
        "output": [
            {"text": "He found a bird.", "image": "0301096-o-0.jpg"},
            {"text": "It flew home.", "image": "0301096-o-1.jpg"},
        ]
    }
    with Image.open(folder / "0301096-o-1.jpg") as im:
        assert im.format == "JPEG" and im.size == (32, 32)


# --------------------------------------------------------------------------------------------
# ISG-Bench
# --------------------------------------------------------------------------------------------


def test_isg_structure_predictions_and_judged_levels(tiny_model, tmp_path):
    from omni.eval.judges.http import HTTPJudge

    save(tmp_path / "images" / "0000_q1.png", picture())
    golden = [
        {"type": "text", "content": "They wash hands."},
        {"type": "image", "content": "images/0000_g1.png"},
        {"type": "image", "content": "images/0000_g2.png"},
    ]
    items = [
        {
            "id": "0000",
            "Category": "Prediction",
            "Query": [
                {"type": "text", "content": "Show what happens next in 2 images."},
                {"type": "image", "content": "images/0000_q1.png"},
            ],
            "Golden": golden,
            "predict": {
                "image_qa": {
                    "questions": [
                        {"image": "<gen_img1>", "Question": "Are there hands?", "id": 0, "Preliminary": []}
                    ]
                },
                "block_qa": {
                    "questions": [
                        {
                            "subject": "<gen_text1>",
                            "object": "<query_img1>",
                            "relation": "describes",
                            "Question": "Does it describe it?",
                        }
                    ]
                },
            },
        },
        {
            "id": "0001",
            "Category": "HowTo",
            "Query": [{"type": "text", "content": "Explain with 2 images."}],
            "Golden": golden,
        },
    ]
    data = tmp_path / "ISG-Bench.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in items))

    def answers(s):
        return ["They rinse.", picture(), picture()] if s.reference["item"]["id"] == "0000" else [picture()]

    with FakeJudgeServer() as server:
        server.replies += [
            (200, '{"holistic": 8}'),
            (200, "Yes."),
            (200, '{"score": 6}'),
            (200, '{"holistic": 2}'),
        ]
        res, out = run(tiny_model, canned("isg", answers), tmp_path, data, judge=HTTPJudge(server.url, "j"))
    assert res["overall"] == 0.5 and res["tasks"]["Prediction"]["structure"] == 1.0
    assert res["metrics"] == {"structure": 0.5, "holistic": 5.0, "image": 0.5, "block": 3.5}
    rows = [json.loads(x) for x in (out / res["exports"]["isg"]).read_text().splitlines()]
    assert [r["id"] for r in rows] == ["0000", "0001"]
    for row, item in zip(rows, items):
        assert {k: v for k, v in row.items() if k != "output"} == item  # the input line + "output"
    assert [b["type"] for b in rows[0]["output"]] == ["text", "image", "image"]
    assert rows[0]["output"][0]["content"] == "They rinse."
    assert (
        Path(rows[0]["output"][1]["content"]).is_absolute() and Path(rows[0]["output"][1]["content"]).exists()
    )


# --------------------------------------------------------------------------------------------
# MMIE
# --------------------------------------------------------------------------------------------


def test_mmie_export_for_mmie_eval(tiny_model, tmp_path):
    save(tmp_path / "images" / "q0.png", picture())
    items = [
        {
            "id": "SA_0001",
            "question": [{"text": "Continue the story.", "image": "images/q0.png"}],
            "answer": [{"text": "And then it rained.", "image": None}],
        },
        {
            "id": "MSR_0002",
            "question": [{"text": "What is 2 + 3?", "image": None}],
            "answer": [{"text": "5", "image": None}],
        },
    ]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(items))
    bench = canned("mmie", lambda s: ["It rained.", picture()])
    assert [s.task for s in bench.samples(str(data), None)] == ["SA", "MSR"]
    res, out = run(tiny_model, bench, tmp_path, data)
    assert res["overall"] == "not computed"
    export = out / res["exports"]["mmie"]
    rows = json.loads(export.read_text())
    assert (
        rows[0]["id"] == "SA_0001"
        and rows[0]["model"] == "omni"
        and rows[0]["gt_answer"] == items[0]["answer"]
    )
    assert rows[0]["answer"] == [{"text": "It rained.", "image": "images/00000-SA_0001_0.png"}]
    assert (export.parent / rows[0]["answer"][0]["image"]).exists()
    q_image = rows[0]["question"][0]["image"]
    assert os.path.exists(os.path.join(export.parent, q_image))  # how MMIE-Eval's dataset.py joins paths


# --------------------------------------------------------------------------------------------
# MME and POPE
# --------------------------------------------------------------------------------------------


def test_mme_acc_acc_plus_and_result_files(tiny_model, tmp_path):
    root = tmp_path / "MME_Benchmark_release_version"
    for name in ("a", "b"):  # side-by-side layout
        save(root / "existence" / f"{name}.jpg", picture())
        (root / "existence" / f"{name}.txt").write_text(
            f"Is there a {name} in this image? Please answer yes or no.\tYes\n"
            f"Is there a z in this image? Please answer yes or no.\tNo\n"
        )
    save(root / "artwork" / "images" / "p.jpg", picture())  # images/ + questions_answer_YES_NO/ layout
    (root / "artwork" / "questions_answer_YES_NO").mkdir(parents=True)
    (root / "artwork" / "questions_answer_YES_NO" / "p.txt").write_text(
        "Is this by Monet? Please answer yes or no.\tYes\nIs this by Dali? Please answer yes or no.\tNo\n"
    )

    def answers(s):  # existence: image a fully right, image b half right; artwork: answers "Yes" to both
        if s.task == "artwork":
            return ["Yes"]
        return [s.reference["answer"].lower() if s.reference["image"] == "a.jpg" else "yes, it is"]

    res, out = run(tiny_model, canned("mme", answers), tmp_path, root)
    ex, art = res["tasks"]["existence"], res["tasks"]["artwork"]
    assert (ex["acc"], ex["acc_plus"], ex["score"]) == (0.75, 0.5, 125.0)
    assert (art["acc"], art["acc_plus"], art["score"]) == (0.5, 0.0, 50.0)
    assert res["metrics"] == {"perception": 175.0, "cognition": 0.0} and res["overall"] == 175.0
    lines = (out / res["exports"]["mme"] / "existence.txt").read_text().splitlines()
    assert lines[0] == "a.jpg\tIs there a a in this image? Please answer yes or no.\tYes\tyes"
    assert all(len(x.split("\t")) == 4 for x in lines) and len(lines) == 4


def test_pope_metrics_and_answers(tiny_model, tmp_path):
    save(tmp_path / "val2014" / "COCO_val2014_000000001.jpg", picture())
    labels = ["yes", "yes", "yes", "no", "no", "no"]
    replies = ["Yes, there is a dog.", "There is not a cat.", "yes", "No.", "Yes", "no, it is not"]
    qs = [
        {
            "question_id": i + 1,
            "image": "COCO_val2014_000000001.jpg",
            "text": f"Is there a thing {i}?",
            "label": lab,
        }
        for i, lab in enumerate(labels)
    ]
    data = tmp_path / "coco_pope_random.json"
    data.write_text("".join(json.dumps(q) + "\n" for q in qs))
    res, out = run(
        tiny_model,
        canned("pope", lambda s: [replies[s.reference["question"]["question_id"] - 1]]),
        tmp_path,
        data,
    )
    m = res["metrics"]  # TP 2, FN 1, TN 2, FP 1
    assert (m["tp"], m["fn"], m["tn"], m["fp"]) == (2, 1, 2, 1)
    assert m["accuracy"] == pytest.approx(4 / 6, abs=1e-6) and m["precision"] == pytest.approx(
        2 / 3, abs=1e-6
    )
    assert m["recall"] == pytest.approx(2 / 3, abs=1e-6) and m["yes_ratio"] == 0.5
    assert "random" in res["tasks"]
    answers = [json.loads(x) for x in (out / res["exports"]["pope"]).read_text().splitlines()]
    assert answers[1] == {
        "question_id": 2,
        "prompt": "Is there a thing 1?",
        "text": "There is not a cat.",
        "model_id": "omni",
    }


def test_adapters_name_missing_data():
    for name in ("geneval", "opening", "isg", "mmie", "interleavedbench", "pope"):
        with pytest.raises(ValueError, match="--data"):
            get_benchmark(name).samples(None, None)
    with pytest.raises(ValueError, match="MME_Benchmark_release_version"):
        get_benchmark("mme").samples(None, None)
