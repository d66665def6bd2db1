"""Output paths made from data stay inside the output directory (one helper: omni.utils.safe_name).

Writers covered: the eval records (`samples/<id>/`, built-in benchmarks use the shard key as the
id), and the public-benchmark exports whose file names come from the data (OpenING's
`total_uid`, MME's category, the `<id>_<k>.png` images of ISG / InterleavedBench / MMIE).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from omni.data import shapes
from omni.data.shards import ShardWriter
from omni.eval.benchmark import Output
from omni.eval.harness import evaluate
from omni.eval.registry import get_benchmark
from omni.utils import safe_name

TRAVERSAL = ["../../../escaped/x", "/abs/escaped", "..", ".", "", "a/../../b", "\x00nul", "ünï cødé"]


def files_outside(root: Path, inside: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and inside not in p.parents]


@pytest.mark.parametrize("text", TRAVERSAL)
def test_safe_name_is_one_component(text):
    name = safe_name(text)
    assert name and "/" not in name and "\\" not in name and name not in (".", "..")
    assert not name.startswith(".") and len(name) <= 111
    assert Path("/root", name).parent == Path("/root")


def test_safe_name_keeps_safe_names_and_separates_collisions():
    assert safe_name("shapes-test-0000012") == "shapes-test-0000012"
    assert safe_name("a/b") != safe_name("a_b") and safe_name("a/b") != safe_name("a:b")
    assert safe_name(safe_name("a/b")) == safe_name("a/b")


def canned(name: str, answer):
    bench = get_benchmark(name)
    bench.generate = lambda model, samples, cfg, seeds: [Output(list(answer), "eos", {"seed": x}) for x in seeds]
    return bench


def test_builtin_benchmark_keys_cannot_escape_out(tiny_model, tmp_path):
    data = tmp_path / "data"
    keys = ["../../../escaped/x", "/abs-escaped", "a/../../../../b", "ok-key"]
    with ShardWriter(data, "val", shard_size=100) as w:
        docs = shapes.generate(4, split="val", mix={"vqa": 1.0})
        for key, doc in zip(keys, docs):
            w.write({**doc.to_sample("k"), "__key__": key})
    out = tmp_path / "a" / "b" / "run"
    res = evaluate(tiny_model, canned("shapes-vqa", ["red"]), out, data=str(data), progress=False)
    assert res["n_samples"] == 4
    assert files_outside(tmp_path, out) == [p for p in files_outside(tmp_path, out) if data in p.parents]
    assert not Path("/abs-escaped").exists()
    dirs = sorted(p.name for p in (out / "samples").iterdir())
    assert len(dirs) == 4 and "ok-key" in dirs and all(safe_name(d) == d for d in dirs)
    recs = [json.loads(p.read_text()) for p in (out / "samples").glob("*/record.json")]
    assert sorted(r["id"] for r in recs) == sorted(keys)  # the record keeps the original id
    again = evaluate(tiny_model, canned("shapes-vqa", ["blue"]), out, data=str(data), progress=False)
    assert again["overall"] == res["overall"]  # a rerun finds every record by its id: nothing regenerated


def test_opening_export_file_names_from_the_data_stay_inside(tiny_model, tmp_path):
    line = {"total_uid": "../../../escaped", "meta_task_id": "3", "meta_task_name": "T", "subtask_id": "1",
            "subtask_name": "S", "data_id": "1",
            "conversations": [{"input": [{"image": None, "text": "<BEGIN> Draw."}]},
                              {"output": [{"image": None, "text": "x <image>"}]}]}
    data = tmp_path / "test_data.jsonl"
    data.write_text(json.dumps(line) + "\n")
    out = tmp_path / "a" / "b" / "run"
    res = evaluate(tiny_model, canned("opening", ["hi", Image.new("RGB", (32, 32))]), out, data=str(data),
                   progress=False)
    folder = out / res["exports"]["opening"]
    assert files_outside(tmp_path, out) == [data]
    name = safe_name("../../../escaped")
    assert (folder / f"{name}.json").exists() and (folder / f"{name}-o-0.jpg").exists()


def test_mme_category_names_stay_inside(tiny_model, tmp_path):
    from omni.eval.adapters.yesno import MME

    bench = MME()
    records = [{"task": "../../../escaped", "reference": {"image": "a.jpg", "question": "q", "answer": "Yes"},
                "output": [{"text": "yes"}]}]
    out = tmp_path / "a" / "b" / "run"
    bench.export(records, out)
    assert files_outside(tmp_path, out) == []
    assert (out / "exports" / "mme" / f"{safe_name('../../../escaped')}.txt").exists()
