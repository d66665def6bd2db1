"""Editing documents of the shapes world: exact ground truth, kinds, phrasings, layout, CFG drops."""

from __future__ import annotations

import random
import re
from collections import Counter

import numpy as np
import pytest
import torch

from omni.config import DataConfig, ImageTokenizerConfig
from omni.data import shapes
from omni.data import templates as T
from omni.data.loader import BatchStream, tokenize_document
from omni.data.shards import write_shards
from omni.layout import IGNORE, SpecialIds, layout
from omni.tokenizers.image import PatchTokenizer
from omni.tokenizers.text import train_sentencepiece

WORLD = shapes.ShapesWorld(32)


def _docs(n: int, seed: int = 0, phrasing: str = "train"):
    out = []
    for i in range(n):
        segments, meta = WORLD.edit(random.Random(f"edit-test/{seed}/{i}"), phrasing=phrasing)
        out.append((segments, meta))
    return out


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def _in_cell(obj, cell) -> bool:
    """The object's box lies at least 1 px inside `cell` (the world's geometry)."""
    half, size = obj["size"] // 2, WORLD.cell
    r, c = cell
    return (c * size + 1 <= obj["cx"] - half and obj["cx"] + half <= (c + 1) * size - 1
            and r * size + 1 <= obj["cy"] - half and obj["cy"] + half <= (r + 1) * size - 1)


def _offset(obj):
    r, c = WORLD.cell_of(obj)
    return obj["cx"] - (c * WORLD.cell + WORLD.cell // 2), obj["cy"] - (r * WORLD.cell + WORLD.cell // 2)


def test_edit_documents_have_exact_ground_truth():
    """Every image is the render of its scene; each kind changes exactly what it names."""
    for segments, meta in _docs(300):
        rounds = len(meta["edits"])
        assert len(segments) == 1 + 2 * rounds and meta["task"] == "edit"
        scenes = [meta["source"], *meta["targets"]]
        assert meta["objects"] == scenes[-1]
        for k, scene in enumerate(scenes):
            assert np.array_equal(_pixels(segments[2 * k]), _pixels(shapes.render(scene)))
            cells = [WORLD.cell_of(o) for o in scene]
            assert len(set(cells)) == len(cells) and len({o["shape"] for o in scene}) == len(scene)
            assert all(_in_cell(o, c) for o, c in zip(scene, cells))
        for r, rec in enumerate(meta["edits"]):
            before, after, kind = scenes[r], scenes[r + 1], rec["kind"]
            assert segments[1 + 2 * r] == rec["instruction"] == meta["instructions"][r]
            i = rec["object"]
            touched = {i, rec.get("other")} if kind != "add" else set()
            if kind == "remove":
                assert after == before[:i] + before[i + 1:]
                continue
            if kind == "add":
                assert after[:-1] == before and len(after) == len(before) + 1
                new = after[-1]
                assert list(WORLD.cell_of(new)) == rec["to"] and new["shape"] not in {o["shape"] for o in before}
                assert new["size"] in WORLD.cell_sizes
                assert T.object_phrase(new) in rec["instruction"] and T.CELL_NAMES[tuple(rec["to"])] in rec["instruction"]
                continue
            assert len(after) == len(before)
            for j, (a, b) in enumerate(zip(before, after)):
                if j not in touched:
                    assert a == b  # colour, shape, size and exact pixel place
            a, b = before[i], after[i]
            if kind == "recolor":
                assert b == dict(a, color=rec["color"]) and rec["color"] != a["color"]
                assert rec["color"] in rec["instruction"]
            elif kind == "move":
                assert list(WORLD.cell_of(b)) == rec["to"] and WORLD.cell_of(b) not in {WORLD.cell_of(o) for o in before}
                assert (b["shape"], b["color"], b["size"]) == (a["shape"], a["color"], a["size"])
                assert _offset(b) == _offset(a)  # the same place within its new cell
                said = rec["direction"] or T.CELL_NAMES[tuple(rec["to"])]
                assert said in rec["instruction"] or (said == "up" and " up" in rec["instruction"])
            else:  # swap: each takes the other's cell, keeping size and offset
                j = rec["other"]
                assert WORLD.cell_of(after[i]) == WORLD.cell_of(before[j])
                assert WORLD.cell_of(after[j]) == WORLD.cell_of(before[i])
                for x in (i, j):
                    assert _offset(after[x]) == _offset(before[x])
                    assert {k: v for k, v in after[x].items() if k not in ("cx", "cy")} == \
                        {k: v for k, v in before[x].items() if k not in ("cx", "cy")}


def test_every_kind_and_both_round_counts_occur():
    docs = _docs(300)
    first = Counter(m["kinds"][0] for _, m in docs)
    weights = shapes.EDIT_KIND_WEIGHTS
    for kind in T.EDIT_KINDS:  # drawn in the weights' shares (swap 0.3, remove 0.15; +-0.027 here)
        assert abs(first[kind] / len(docs) - weights[kind] / sum(weights.values())) < 0.07, (kind, first)
    assert first["swap"] > max(first[k] for k in T.EDIT_KINDS if k != "swap")
    second = Counter(m["kinds"][1] for _, m in docs if len(m["kinds"]) == 2)
    assert set(second) == set(T.EDIT_KINDS)
    two = sum(len(m["kinds"]) == 2 for _, m in docs) / len(docs)
    assert abs(two - shapes.MULTI_ROUND_SHARE) < 0.08
    directions = Counter(e["direction"] for _, m in docs for e in m["edits"] if e["kind"] == "move")
    assert directions[None] > 0 and sum(directions.values()) > directions[None]  # both move forms


def test_edit_documents_are_deterministic_by_seed():
    a = list(shapes.generate(20, seed=3, mix={"edit": 1.0}))
    b = list(shapes.generate(20, seed=3, mix={"edit": 1.0}))
    c = list(shapes.generate(20, seed=4, mix={"edit": 1.0}))
    for x, y in zip(a, b):
        assert x.meta == y.meta and x.texts == y.texts
        assert all(np.array_equal(_pixels(p), _pixels(q)) for p, q in zip(x.images, y.images) if p is not None)
    assert [d.meta["source"] for d in a] != [d.meta["source"] for d in c]


def _pattern(wording: str) -> re.Pattern:
    return re.compile(re.sub(r"\\\{\w+\\\}", ".+", re.escape(wording)) + r"[.?]?", re.IGNORECASE)


def _wording(text: str, phrasing: str) -> list[str]:
    return [w for kind in T.EDIT_PHRASINGS[phrasing].values() for w in kind if _pattern(w).fullmatch(text)]


def test_heldout_wordings_never_occur_in_training_documents():
    train = [i for _, m in _docs(400) for i in m["instructions"]]
    assert all(_wording(t, "train") and not _wording(t, "heldout") for t in train), \
        [t for t in train if _wording(t, "heldout")]
    used = {w for t in train for w in _wording(t, "train")}
    assert used == {w for ws in T.EDIT_PHRASINGS["train"].values() for w in ws}  # every wording used
    forms = Counter((t.endswith("."), t[0].isupper()) for t in train)
    assert len(forms) == 4  # with and without a final period, with and without a capital
    held = [i for _, m in _docs(100, phrasing="heldout") for i in m["instructions"]]
    assert all(_wording(t, "heldout") and not _wording(t, "train") for t in held)


def test_benchmark_documents_pair_the_two_phrasings_and_cycle_the_kinds():
    tpl = list(shapes.edit_documents(10, split="val", phrasing="template", rounds=2))
    held = list(shapes.edit_documents(10, split="val", phrasing="heldout", rounds=2))
    assert [d.meta["kinds"][0] for d in tpl] == list(T.EDIT_KINDS) * 2
    for a, b in zip(tpl, held):
        assert len(a.meta["edits"]) == 2 and a.meta["targets"] == b.meta["targets"]
        assert a.meta["source"] == b.meta["source"] and a.texts != b.texts
        assert (a.meta["phrasing"], b.meta["phrasing"]) == ("train", "heldout")  # "template": the training wordings
    one = next(iter(shapes.edit_documents(1, rounds=1)))
    assert len(one) == 3
    with pytest.raises(ValueError, match="phrasing"):
        next(iter(shapes.edit_documents(1, phrasing="casual")))


def test_benchmark_documents_do_not_follow_the_training_kind_weights(monkeypatch):
    # shapes-edit fixes each document's first kind and draws the second round uniformly, so
    # reweighting the training kinds leaves the benchmark's scenes and edits as they were.
    def docs():
        return [(d.meta, [s if isinstance(s, str) else s.tobytes() for s in d.segments])
                for d in shapes.edit_documents(10, split="val", phrasing="template", rounds=2)]
    before = docs()
    monkeypatch.setattr(shapes, "EDIT_KIND_WEIGHTS", {**dict.fromkeys(T.EDIT_KINDS, 0.01), "add": 5.0})
    assert docs() == before
    world, rng = shapes.ShapesWorld(32), random.Random(0)
    drawn = Counter(shapes.edit_scene(world, rng)[1]["kinds"][0] for _ in range(100))
    assert drawn["add"] > 80  # the weights do steer training documents


def test_edit_kinds_reweight_the_first_edit_and_the_shards_record_them(tmp_path):
    # `--edit-kinds swap=3` (the parallel-decoding recipe): swaps start 3 / 6.5 of the documents
    # instead of 1.5 / 5; a kind weighed 0 never starts one; every other draw is unchanged.
    assert shapes.parse_edit_kinds("swap=3, add=0") == {"swap": 3.0, "add": 0.0}
    assert shapes.parse_edit_kinds(None) == {} and shapes.edit_kind_weights() == shapes.EDIT_KIND_WEIGHTS
    for bad, message in (("swap", "bad --edit-kinds entry 'swap'"), ("spin=2", "unknown edit kind 'spin'"),
                         ("swap=-1", "swap=-1.0: use a weight >= 0"), ("swap=nan", "use a weight >= 0"),
                         ("recolor=0,move=0,remove=0,add=0,swap=0", "at least one must be positive")):
        with pytest.raises(ValueError, match=re.escape(message)):
            shapes.parse_edit_kinds(bad)

    def firsts(n, kinds=None):
        return Counter(d.meta["kinds"][0] for d in shapes.generate(n, seed=5, mix={"edit": 1.0}, edit_kinds=kinds))

    default, swaps = firsts(2000), firsts(2000, {"swap": 3.0, "add": 0.0})
    assert abs(default["swap"] / 2000 - 1.5 / 5) < 0.04 and default["add"] > 0
    assert abs(swaps["swap"] / 2000 - 3 / 5.75) < 0.04 and swaps["add"] == 0
    explicit = list(shapes.generate(30, seed=5, mix={"edit": 1.0}, edit_kinds=dict(shapes.EDIT_KIND_WEIGHTS)))
    for a, b in zip(shapes.generate(30, seed=5, mix={"edit": 1.0}), explicit):  # the defaults, given, change nothing
        assert a.meta == b.meta and a.texts == b.texts
    from omni.data.writers import write_shapes

    one = write_shapes(tmp_path / "one", 60, 0, seed=2, mix="edit=1", shard_size=20, edit_kinds="swap=3")
    two = write_shapes(tmp_path / "two", 60, 0, seed=2, mix="edit=1", shard_size=20, edit_kinds="swap=3", workers=2)
    assert one["generator"]["edit_kinds"] == {**shapes.EDIT_KIND_WEIGHTS, "swap": 3.0}
    assert [(tmp_path / "one" / s).read_bytes() for s in one["train"]["shards"]] == \
        [(tmp_path / "two" / s).read_bytes() for s in two["train"]["shards"]]  # worker processes get the weights
    assert "edit_kinds" not in write_shapes(tmp_path / "dflt", 20, 0, mix="edit=1")["generator"]


def test_demo_refuses_editing_shards_of_other_kind_weights(tmp_path, capsys):
    from omni.data.writers import write_shapes
    from omni.demo import check_edit_shards

    write_shapes(tmp_path / "edit", 20, 0, seed=2, mix="edit=1", edit_kinds="swap=3")
    capsys.readouterr()
    check_edit_shards(tmp_path / "edit", 20, "swap=3.0")
    assert capsys.readouterr().out == ""
    with pytest.raises(ValueError, match=r"written with edit kinds .*'swap': 3.0.*asks for .*'swap': 1.5.*delete"):
        check_edit_shards(tmp_path / "edit", 20, None)
    check_edit_shards(tmp_path / "edit", 30, "swap=3")  # another count: used as it is, and said
    assert "hold 20 training documents (this run would write 30): used as they are" in capsys.readouterr().out


def test_edit_is_a_training_mix_task():
    assert shapes.parse_mix("t2i=0.5,edit=0.5") == {"t2i": 0.5, "edit": 0.5}
    assert "edit" not in shapes.DEFAULT_MIX
    with pytest.raises(ValueError, match="does not apply"):
        shapes.apply_edit(WORLD, random.Random(0), [WORLD.in_cell(random.Random(0), "circle", "red", (0, 0))], "swap")


# --------------------------------------------------------------------------------------------
# Templates, layout and the loader's CFG drops
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [t for d in shapes.generate(300, seed=9, mix={"edit": 0.5, "t2i": 0.5}) for t in d.texts if t]
    return train_sentencepiece(texts * 3, tmp_path_factory.mktemp("tok"), vocab_size=160)


@pytest.fixture(scope="module")
def itok():
    return PatchTokenizer(ImageTokenizerConfig())


def _ids(tok) -> SpecialIds:
    return SpecialIds(bos=tok.bos_id, eos=tok.eos_id, pad=tok.pad_id, boi=tok.boi_id, eoi=tok.eoi_id, img=tok.img_id)


def _two_round():
    for d in shapes.generate(40, seed=1, mix={"edit": 1.0}):
        if len(d) == 5:
            return d
    raise AssertionError("no two-round edit document among 40")


def test_edit_template_prompt_and_loss_flags():
    doc = _two_round()
    prompt, answer = T.split_prompt(doc)
    assert prompt == doc.segments[:2] and answer == doc.segments[2:]  # [source, instruction 1]
    assert T.loss_flags(doc) == [False, False, True, False, True]


def test_layout_of_a_two_round_edit_document(tok, itok):
    """[bos] <boi> src <eoi> instr1 <boi> ed1 <eoi> instr2 <boi> ed2 <eoi> [eos]: the text labels are
    the two <boi> before the edited images and the [eos]; the diffusion targets are the edited
    images' tokens; the source image is never a target, so it is read clean (image_input_noise
    touches targets only)."""
    doc = _two_round()
    tdoc = tokenize_document(doc, tok, itok)
    batch = layout([[tdoc]], _ids(tok))
    ids = batch.input_ids[0].tolist()
    n1, n2 = len(tok.encode(doc.texts[1])), len(tok.encode(doc.texts[3]))
    boi1, boi2, boi3 = 1, 1 + 18 + n1, 1 + 18 + n1 + 18 + n2
    assert [p for p, t in enumerate(ids) if t == tok.boi_id] == [boi1, boi2, boi3]
    labelled = {p: t for p, t in enumerate(batch.labels[0].tolist()) if t != IGNORE}
    # labels[p] is what position p predicts: the <boi> of each edited image and the final [eos]
    assert labelled == {boi2 - 1: tok.boi_id, boi3 - 1: tok.boi_id, len(ids) - 2: tok.eos_id}
    images = [itok.encode([im])[0] for im in doc.images if im is not None]  # (16, 192) each
    assert torch.equal(batch.image_tokens, torch.cat(images))
    assert batch.image_target_index.tolist() == list(range(16, 48))  # edited 1 and 2, not the source
    assert batch.image_cond_index.tolist() == list(range(boi2, boi2 + 16)) + list(range(boi3, boi3 + 16))


@pytest.mark.parametrize("drop", ["text", "both"])
def test_dropped_edit_forms(tok, itok, drop):
    doc = _two_round()
    batch = layout([[tokenize_document(doc, tok, itok, edit_drop=drop)]], _ids(tok))
    ids = batch.input_ids[0].tolist()
    images = [itok.encode([im])[0] for im in doc.images if im is not None]
    if drop == "text":  # [bos] <boi> src <eoi> <boi> ed1 <eoi> [eos]: no text trained
        assert ids == [tok.bos_id, tok.boi_id, *[tok.img_id] * 16, tok.eoi_id, tok.boi_id, *[tok.img_id] * 16,
                       tok.eoi_id, tok.eos_id]
        assert torch.equal(batch.image_tokens, torch.cat(images[:2]))
        assert (batch.labels == IGNORE).all()
        assert batch.image_target_index.tolist() == list(range(16, 32))
        assert batch.image_cond_index.tolist() == list(range(19, 35))
    else:  # [bos] <boi> ed1 <eoi> [eos]: exactly a dropped t2i caption
        assert ids == [tok.bos_id, tok.boi_id, *[tok.img_id] * 16, tok.eoi_id, tok.eos_id]
        assert torch.equal(batch.image_tokens, images[1])
        assert {p: t for p, t in enumerate(batch.labels[0].tolist()) if t != IGNORE} == {0: tok.boi_id}
        assert batch.image_target_index.tolist() == list(range(16))
        t2i = next(d for d in shapes.generate(10, seed=0, mix={"t2i": 1.0}))
        t2i.images[1] = doc.images[2]
        dropped_t2i = layout([[tokenize_document(t2i, tok, itok, drop_prompt=True)]], _ids(tok))
        for name in ("input_ids", "labels", "image_tokens", "image_target_index", "image_cond_index", "position_ids"):
            assert torch.equal(getattr(batch, name), getattr(dropped_t2i, name)), name


def _batch_docs(batch, tok):
    out = []
    for b in range(batch.input_ids.shape[0]):
        for d in range(1, int(batch.doc_ids[b].max()) + 1):
            out.append(batch.input_ids[b, batch.doc_ids[b] == d].tolist())
    return out


def test_loader_drops_edit_conditions_at_the_configured_rates(tmp_path, tok, itok):
    write_shards(shapes.generate(200, seed=2, mix={"edit": 1.0}), tmp_path / "edit", shard_size=100, progress=False)

    def forms(text, both, batches=40):
        cfg = DataConfig(train=[str(tmp_path / "edit")], seq_len=160, batch_size=4, shuffle_buffer=16,
                         cfg_drop=0.0, edit_drop_text=text, edit_drop_both=both)
        stream = iter(BatchStream(cfg, tok, itok))
        docs = [d for _ in range(batches) for d in _batch_docs(next(stream), tok)]
        images = [d.count(tok.boi_id) for d in docs]
        has_text = [any(t not in (tok.bos_id, tok.eos_id, tok.boi_id, tok.eoi_id, tok.img_id) for t in d) for d in docs]
        return Counter("both" if n == 1 else "text" if not t else "kept" for n, t in zip(images, has_text))

    assert set(forms(0.0, 0.0, 10)) == {"kept"}
    got = forms(0.3, 0.2)
    n = sum(got.values())
    assert abs(got["text"] / n - 0.3) < 0.08 and abs(got["both"] / n - 0.2) < 0.08, got
    with pytest.raises(ValueError, match="edit drop rates"):
        BatchStream(DataConfig(train=[str(tmp_path / "edit")], edit_drop_text=0.7, edit_drop_both=0.5), tok, itok)


def test_tiny_preset_trains_edits_and_the_demo_writes_them():
    from omni.config import load_config
    from omni.demo import shapes_train_mix

    cfg = load_config("tiny")
    w = cfg.data.task_weights
    assert 0.12 <= w["edit"] / sum(w.values()) <= 0.15
    assert "edit=" in shapes_train_mix(cfg)
    assert (cfg.data.edit_drop_text, cfg.data.edit_drop_both) == (0.05, 0.05)
