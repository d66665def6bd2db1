"""shapes-edit: the judge on ground truth and on wrong edits, the aggregate, a run on a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import save_tiny_checkpoint
from PIL import Image

from omni.data.shapes import EDIT_KINDS, render
from omni.eval.benchmark import Output
from omni.eval.benchmarks_builtin import BUILTIN, oracle_output
from omni.eval.judges import shapes as SJ


def _records(bench, samples, outputs):
    records = []
    for s, o in zip(samples, outputs):
        scores = bench.score(s, o, None)
        records.append({"task": s.task, "reference": s.reference,
                        "scores": {k: v for k, v in scores.items() if not k.startswith("_")}})
    return records


@pytest.fixture(scope="module")
def samples():
    return BUILTIN["shapes-edit"]().samples(None, 30)


def test_samples_pair_the_phrasings_and_cycle_the_kinds(samples):
    assert len(samples) == 60 and len({s.id for s in samples}) == 60
    template = [s for s in samples if s.reference["split"] == "template"]
    heldout = [s for s in samples if s.reference["split"] == "heldout"]
    assert [s.task for s in template] == list(EDIT_KINDS) * 6 == [s.task for s in heldout]
    for a, b in zip(template, heldout):  # the same scene and edits, other words
        assert a.reference["targets"] == b.reference["targets"] and a.prompt[1] != b.prompt[1]
        assert isinstance(a.prompt[0], Image.Image) and isinstance(a.prompt[1], str) and a.mode == "image"
        assert len(a.reference["targets"]) == 2 and len(a.answer) == 3  # target 1, instruction 2, target 2
    with pytest.raises(ValueError, match="without --data"):
        BUILTIN["shapes-edit"]().samples("some/dir", 3)


def test_judge_scores_a_perfect_edit_one_and_wrong_edits_zero(samples):
    bench = BUILTIN["shapes-edit"]()
    for s in samples:
        ref, canvas = s.reference, s.reference["canvas"]
        perfect = bench.score(s, oracle_output(s), None)
        assert (perfect["round1"], perfect["round2"]) == (1.0, 1.0), (s.id, perfect)
        # Unedited: the source drawn back, and the first result drawn again in round 2.
        first, second = render(ref["targets"][0], canvas), render(ref["targets"][1], canvas)
        unedited = bench.score(s, Output([render(ref["source"], canvas)], extra={"round2": ["x", first]}), None)
        assert (unedited["round1"], unedited["round2"]) == (0.0, 0.0), s.id
        assert unedited["_round1"] and all(d.startswith(("missing", "extra")) for d in unedited["_round1"])
        # A leftover smear (a region of no known shape) beside a right scene is wrong too.
        smear = np.array(second)
        free = [(r, c) for r in (0, 1) for c in (0, 1)
                if (r, c) not in {(o["cy"] // 16, o["cx"] // 16) for o in ref["targets"][1]}]
        if free:
            r, c = free[0]
            smear[r * 16 + 6:r * 16 + 8, c * 16 + 2:c * 16 + 14] = (220, 40, 40)  # a red streak, 2 x 12 px
            assert any(d.shape == "unknown" for d in SJ.detect(Image.fromarray(smear)))
            assert SJ.state_matches(SJ.detect(Image.fromarray(smear)), ref["targets"][1], canvas)  # a story frame's rule
            got = bench.score(s, Output([first], extra={"round2": ["x", Image.fromarray(smear)]}), None)
            assert (got["round1"], got["round2"]) == (1.0, 0.0)
        nothing = bench.score(s, Output(["no picture"]), None)
        assert (nothing["round1"], nothing["round2"]) == (0.0, 0.0)


def test_aggregate_scores_kinds_second_round_and_phrasings_apart(samples):
    bench = BUILTIN["shapes-edit"]()
    outputs = []
    for s in samples:  # right in the template split except swaps; the held-out split always wrong
        ok = s.reference["split"] == "template" and s.task != "swap"
        o = oracle_output(s)
        outputs.append(o if ok else Output([render(s.reference["source"])], extra=o.extra))
    res = bench.aggregate(_records(bench, samples, outputs), None)
    assert set(res["tasks"]) == set(bench.tasks)
    assert {k: res["tasks"][k]["correct"] for k in EDIT_KINDS} == {**dict.fromkeys(EDIT_KINDS, 1.0), "swap": 0.0}
    assert res["overall"] == pytest.approx(0.8)
    # the second round was drawn right every time; where the first was right too: the same
    assert res["tasks"]["second_round"] == {"n": 30, "correct": 1.0, "after_correct_first": 1.0}
    assert res["metrics"]["heldout_phrasing"] == 0.0 and res["metrics"]["heldout_second_round"] == 1.0
    assert all(res["metrics"][f"heldout_{k}"] == 0.0 for k in EDIT_KINDS)


def test_runs_end_to_end_on_a_tiny_model(tmp_path, tokenizer_dir):
    from omni.eval import evaluate

    ckpt = save_tiny_checkpoint(tokenizer_dir, tmp_path / "ckpt", "generation.image_steps=2")
    out = tmp_path / "run"
    res = evaluate(ckpt, "shapes-edit", out, limit=5, batch_size=4, progress=False)
    assert res["n_samples"] == 10
    assert 0.0 <= res["overall"] <= 1.0 and 0.0 <= res["metrics"]["heldout_phrasing"] <= 1.0
    for task, m in res["tasks"].items():
        assert all(0.0 <= v <= 1.0 for k, v in m.items() if k != "n" and isinstance(v, float)), (task, m)
    assert sum(res["tasks"][k]["n"] for k in EDIT_KINDS) == 5
    rec = json.loads(next((out / "samples").glob("*/record.json")).read_text())
    assert [list(x) for x in rec["prompt"]] == [["image"], ["text"]]  # source, instruction
    assert [list(x) for x in rec["output"]] == [["image"]]  # result 1
    assert [list(x) for x in rec["extra"]["round2"]] == [["text"], ["image"]]  # instruction 2, result 2
    assert [list(x) for x in rec["answer"]] == [["image"], ["text"], ["image"]]  # the targets
    page = (out / "report.html").read_text()
    assert rec["reference"]["instructions"][0] in page and "round2_0.png" in page and "answer_1.png" in page
    assert json.loads((out / "results.json").read_text())["overall"] == res["overall"]
