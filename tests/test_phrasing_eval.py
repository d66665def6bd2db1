"""The held-out phrasing split of every built-in benchmark, end to end on an untrained tiny model:
the demo's data stage writes it, every benchmark runs on it, the scorecard reports it beside the
template split, and its prompts are held-out phrasings (never a training one)."""

from __future__ import annotations

import itertools
import re
import string
from pathlib import Path

from conftest import save_tiny_checkpoint

from omni import demo
from omni.data import phrasing as P
from omni.data import shapes
from omni.data import templates as T
from omni.data.shards import read_documents
from omni.eval.benchmarks_builtin import BUILTIN

SLOT_VALUES = {
    "s": shapes.SHAPES, "p": [s + "s" for s in shapes.SHAPES], "c": list(shapes.COLORS), "a": shapes.SHAPES,
    "b": shapes.SHAPES, "d": range(10),
}


def _renderings(family: str, mode: str) -> set[str]:
    """Every text a family's forms of `mode` write, over the world's slot values ({x}, {scene}
    and {n} excepted: t2i and story prompts are rebuilt from their documents' meta)."""
    out = set()
    for form in P.forms(family, mode):
        names = sorted({f for _, f, _, _ in string.Formatter().parse(form.frame) if f})
        for values in itertools.product(*(SLOT_VALUES[n] for n in names)):
            slots = dict(zip(names, values))
            if family in ("digit_t2i",):
                slots["a"] = P.digit_article(slots["d"])
            out.add(form.render(**slots))
    return out


def _candidates(doc) -> tuple[str, list[dict]]:
    """(family, slot sets) that may have written a t2i or story document's prompt."""
    meta = doc.meta
    if doc.task == "t2i":
        bodies = {T.t2i_body(meta["subtask"], meta["objects"], meta.get("relation"), v) for v in (0, 1)}
        return "t2i", [{"x": b} for b in bodies]
    first = meta["steps"][0]["objects"]
    cells = [(o["cy"] // (meta["canvas"] // 2), o["cx"] // (meta["canvas"] // 2)) for o in first]
    return "story", [{"n": T.number_word(len(meta["steps"])), "scene": T.scene_text(first, cells)[:-1]}]


def _check_heldout_prompt(doc) -> int:
    """The prompt's texts are held-out renderings and no training form writes them; the number checked."""
    texts = [s for s in T.split_prompt(doc)[0] if isinstance(s, str)]
    if doc.task in ("t2i", "story"):
        family, slot_sets = _candidates(doc)
        held = {f.render(**sl) for f in P.forms(family, "heldout") for sl in slot_sets}
        train = {f.render(**sl) for f in P.forms(family, "train") for sl in slot_sets}
        asked = texts[:1]
    else:
        family = {"caption": "caption", "digit_read": "digit_read", "digit_t2i": "digit_t2i"}.get(doc.task)
        families = [family] if family else [f for f in P.FAMILIES if f.startswith("vqa_")]
        held = set().union(*(_renderings(f, "heldout") for f in families))
        train = set().union(*(_renderings(f, "train") for f in families))
        asked = texts[:1] if family else texts[-1:]  # a VQA prompt's question is its last text
    for text in asked:
        assert text in held and text not in train, (doc.task, text)
    return len(asked)


def test_heldout_split_runs_every_benchmark_end_to_end(tmp_path, tokenizer_dir):
    from omni.inference.generate import load

    paths = demo.data_paths(tmp_path)
    demo.build_heldout_data(paths, scale=0.05)  # 5 t2i prompts, 10 captions, 2 stories, 15 questions
    for key in ("shapes_heldout", "shapes_vqa_heldout", "digits_heldout"):
        assert list(Path(paths[key]).glob("val-*.tar")) and not list(Path(paths[key]).glob("train-*.tar"))

    # the split's prompts are the held-out phrasings, for every benchmark
    limit = 6
    checked = 0
    for name in demo.HELDOUT_BENCHMARKS:
        data = paths["digits_heldout"] if name.startswith("digits") else paths["shapes_heldout"]
        data = paths["shapes_vqa_heldout"] if name == "shapes-vqa" else data
        docs = {d.key: d for d in read_documents(f"{data}/val-*.tar")}
        samples = BUILTIN[name]().samples(data, limit)
        assert samples
        for sample in samples:
            doc = docs[re.sub(r"-s\d+$", "", sample.id)]
            assert doc.meta["phrasing"] == "heldout" and sample.prompt == T.split_prompt(doc)[0]
            checked += _check_heldout_prompt(doc)
    assert checked >= 5 * limit

    ckpt = save_tiny_checkpoint(tokenizer_dir, tmp_path / "ckpt", "generation.image_steps=2")
    results = demo.evaluate_heldout(tmp_path, load(ckpt), paths, limit=limit)
    assert set(results) == {name + demo.HELDOUT for name in demo.HELDOUT_BENCHMARKS}
    for name, res in results.items():
        assert isinstance(res["overall"], float) and 0.0 <= res["overall"] <= 1.0, (name, res["overall"])
        assert (tmp_path / "eval" / (name.removesuffix(demo.HELDOUT) + "-heldout") / "report.html").exists()
        assert "heldout" in res["data"]
    assert results["shapes-t2i" + demo.HELDOUT]["n_samples"] == 4 * 5  # 5 prompts written, 4 images each
    assert results["shapes-vqa" + demo.HELDOUT]["n_samples"] == limit
    table = demo.scorecard(results)
    for name, target in demo.HELDOUT_TARGETS.items():
        row = next(line for line in table.splitlines() if line.startswith(f"| {name}{demo.HELDOUT} |"))
        assert f">= {target:.2f}" in row and "+- " in row  # the target, and the standard error
    assert "| digits-read (held-out phrasing) |" in table and "reported" in table


def test_standard_error_of_a_scorecard_row():
    res = {"tasks": {"color": {"n": 100, "correct": 0.9}, "shape": {"n": 300, "correct": 0.9}}}
    assert abs(demo.standard_error("shapes-vqa", res) - (0.9 * 0.1 / 400) ** 0.5) < 1e-12
    # shapes-t2i: a mean of task accuracies, each over its prompts (4 images count as one)
    t2i = {"tasks": {"a": {"n": 40, "correct": 0.5}, "b": {"n": 40, "correct": 1.0}}}
    assert abs(demo.standard_error("shapes-t2i", t2i) - (0.25 / 10) ** 0.5 / 2) < 1e-12
    assert demo.standard_error("shapes-story", {"tasks": {"story": {"n": 3, "structure": 1.0}}}) is None
