"""Built-in datasets (shapes world, handwritten digits), templates, and the `omni data` CLI."""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from omni.cli import main
from omni.data import digits, shapes
from omni.data import templates as T
from omni.data.document import Document
from omni.data.shards import read_documents


def _read_plain(paths: list[Path]) -> list[tuple[dict, list[np.ndarray]]]:
    """Documents read with nothing but tarfile + json + PIL: (record, images in order)."""
    out = []
    for path in paths:
        with tarfile.open(path) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name in members:
                if not name.endswith(".json"):
                    continue
                record = json.loads(tar.extractfile(name).read())
                key = name[: -len(".json")]
                images = [np.asarray(Image.open(io.BytesIO(tar.extractfile(f"{key}.{im}").read())).convert("RGB"))
                          for im in record["images"] if im is not None]
                out.append((record, images))
    return out


def _image_objects(meta: dict) -> list[list[dict]]:
    """Ground-truth objects of each image of a document, in order."""
    if meta["task"] == "story":
        return [step["objects"] for step in meta["steps"]]
    if meta["task"] == "text":
        return []
    return [meta["objects"]]


def _check_pixels(pixels: np.ndarray, objects: list[dict]) -> None:
    """Exact re-render, plus an independent check: one uniform blob per object, right color."""
    canvas = pixels.shape[0]
    assert np.array_equal(pixels, np.asarray(shapes.render(objects, canvas)))
    ink = np.any(pixels != 255, axis=-1)
    labels, n = ndimage.label(ink)  # 4-connected blobs of non-white pixels
    assert n == len(objects), (n, objects)
    for obj in objects:
        assert tuple(pixels[obj["cy"], obj["cx"]]) == shapes.COLORS[obj["color"]]
        blob = labels == labels[obj["cy"], obj["cx"]]
        assert len({tuple(p) for p in pixels[blob]}) == 1  # no anti-aliasing: one exact color
        rows, cols = np.nonzero(blob)
        assert cols.max() - cols.min() + 1 == obj["size"] and rows.max() - rows.min() + 1 == obj["size"]
        fill = blob.sum() / obj["size"] ** 2
        expected = {"square": (1.0, 1.0), "circle": (0.7, 0.86), "triangle": (0.45, 0.65)}[obj["shape"]]
        assert expected[0] <= fill <= expected[1], (obj, fill)


def _check_relation(objects: list[dict], rel: dict) -> None:
    a, b = objects[rel["a"]], objects[rel["b"]]
    dx, dy = a["cx"] - b["cx"], a["cy"] - b["cy"]
    gap_x = abs(dx) - (a["size"] + b["size"]) / 2
    gap_y = abs(dy) - (a["size"] + b["size"]) / 2
    if rel["rel"] in ("left of", "right of"):
        assert (dx < 0) == (rel["rel"] == "left of") and gap_x >= 2 and abs(dy) < abs(dx) / 2
    else:
        assert (dy < 0) == (rel["rel"] == "above") and gap_y >= 2 and abs(dx) < abs(dy) / 2


def _named(words: str, text: str) -> list[str]:
    """The words of `words` (a regex alternation) that `text` names, in order."""
    return re.findall(rf"\b({words})\b", text.lower())


SHAPE_WORDS, COLOR_WORDS = "|".join(shapes.SHAPES), "|".join(shapes.COLORS)


def _check_semantics(record: dict) -> None:
    """The texts say what the pictures show, in any phrasing (omni.data.phrasing) of the requests."""
    meta, texts = record["meta"], [t for t in record["texts"] if t is not None]
    task = meta["task"]
    task = "t2i" if task == "t2i_position" else task
    if task in ("t2i", "caption"):
        # a caption document may ask for its caption first ("describe it"): the caption is last
        objects, text = meta["objects"], (texts[0] if task == "t2i" else texts[-1]).lower()
        assert task == "t2i" or text == T.caption_text(objects, meta.get("relation"), meta["subtask"] == "counting")
        for o in objects:
            assert o["shape"] in text
            if task == "caption" or "color" in meta.get("named", ["color"]):
                assert o["color"] in text
        if "relation" in meta:
            _check_relation(objects, meta["relation"])
            assert meta["relation"]["rel"].split()[0] in text
        if meta.get("subtask") == "counting":
            assert meta["count"] == len(objects) and T.number_word(len(objects)) in text
            assert len({(o["shape"], o["color"]) for o in objects}) == 1
    elif task in ("vqa", "vqa_position", "vqa_binding"):
        objects, (question, answer) = meta["objects"], texts
        assert task != "vqa_position" or meta["question_type"] == "position"
        assert task != "vqa_binding" or (meta["question_type"] in ("color", "shape", "position") and len(objects) >= 2)
        assert answer == meta["answer"]
        qt = meta["question_type"]
        if qt == "color":
            (shape,) = _named(SHAPE_WORDS, question)
            (obj,) = [o for o in objects if o["shape"] == shape]
            assert answer == obj["color"]
        elif qt == "shape":
            (color,) = _named(COLOR_WORDS, question)
            (obj,) = [o for o in objects if o["color"] == color]
            assert answer == obj["shape"]
        elif qt == "count":
            (shape,) = _named("|".join(s + "s" for s in shapes.SHAPES), question)
            assert answer == T.number_word(sum(o["shape"] + "s" == shape for o in objects))
        elif "relation" in meta:
            _check_relation(objects, meta["relation"])
            assert answer == meta["relation"]["rel"].split()[0]
        else:
            by_color = _named(COLOR_WORDS, question)
            if by_color:
                (obj,) = [o for o in objects if o["color"] == by_color[0]]
            else:
                (shape,) = _named(SHAPE_WORDS, question)
                (obj,) = [o for o in objects if o["shape"] == shape]
            row, col = int(obj["cy"] >= meta["canvas"] // 2), int(obj["cx"] >= meta["canvas"] // 2)
            assert answer == T.CELL_NAMES[(row, col)]
    elif task == "story":
        assert 3 <= len(meta["steps"]) <= 4 and len(texts) == len(meta["steps"])
        opening = rf"(tell (me )?|please tell )?a story in {T.number_word(len(meta['steps']))} pictures[.:] "
        assert re.match(opening, texts[0], re.IGNORECASE), texts[0]
        for prev, step, text in zip(meta["steps"], meta["steps"][1:], texts[1:]):
            before = {o["shape"]: o for o in prev["objects"]}
            after = {o["shape"]: o for o in step["objects"]}
            shape = next(s for s in shapes.SHAPES if s in text)
            if "moves" in text:
                dx = after[shape]["cx"] - before[shape]["cx"]
                dy = after[shape]["cy"] - before[shape]["cy"]
                word = text.split()[-1].rstrip(".")
                assert {"right": dx > 0, "left": dx < 0, "up": dy < 0, "down": dy > 0}[word]
            elif "turns" in text:
                assert after[shape]["color"] == text.split()[-1].rstrip(".") != before[shape]["color"]
            elif "disappears" in text:
                assert shape in before and shape not in after
            else:
                assert "appears" in text and shape in after and shape not in before and after[shape]["color"] in text


def test_shapes_cli_writes_exact_ground_truth(tmp_path, capsys):
    out = tmp_path / "shapes"
    assert main(["data", "shapes", "--out", str(out), "--train", "2000", "--val", "200"]) == 0
    printed = capsys.readouterr().out
    assert f"data.train={out}/train-{{000000..000003}}.tar" in printed and f"data.val={out}/val-000000.tar" in printed
    train = _read_plain(sorted(out.glob("train-*.tar")))
    val = _read_plain(sorted(out.glob("val-*.tar")))
    assert len(train) == 2000 and len(val) == 200
    tasks = Counter(r["meta"]["task"] for r, _ in train)
    assert set(tasks) == {"t2i", "caption", "vqa", "story", "text"} and tasks["t2i"] == 900
    assert set(Counter(r["meta"]["subtask"] for r, _ in train if r["meta"]["task"] == "t2i")) == set(shapes.T2I_SUBTASKS)
    for record, images in train + val:
        assert set(record) == {"texts", "images", "meta"}
        assert all((t is None) != (i is None) for t, i in zip(record["texts"], record["images"]))
        objects = _image_objects(record["meta"])
        assert len(objects) == len(images)
        for pixels, objs in zip(images, objects):
            assert pixels.shape == (32, 32, 3)
            _check_pixels(pixels, objs)
        _check_semantics(record)
    # validation comes from its own seeds: not a copy of the training documents
    train_texts = {json.dumps(r["texts"]) for r, _ in train if r["meta"]["task"] == "story"}
    val_texts = [json.dumps(r["texts"]) for r, _ in val if r["meta"]["task"] == "story"]
    assert sum(t in train_texts for t in val_texts) < len(val_texts) / 4
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["train"]["documents"] == 2000 and manifest["generator"]["seed"] == 0


def test_shapes_cli_val_mix_sets_the_validation_split_alone(tmp_path):
    out = tmp_path / "shapes"
    assert main(["data", "shapes", "--out", str(out), "--train", "100", "--val", "40",
                 "--mix", "vqa=3,story=1", "--val-mix", "t2i=1,caption=1"]) == 0
    train = Counter(r["meta"]["task"] for r, _ in _read_plain(sorted(out.glob("train-*.tar"))))
    val = Counter(r["meta"]["task"] for r, _ in _read_plain(sorted(out.glob("val-*.tar"))))
    assert train == {"vqa": 75, "story": 25} and val == {"t2i": 20, "caption": 20}
    generator = json.loads((out / "manifest.json").read_text())["generator"]
    assert generator["mix"] == {"vqa": 3.0, "story": 1.0} and generator["val_mix"] == {"t2i": 1.0, "caption": 1.0}


def test_vqa_position_task_asks_only_where_objects_are(tmp_path):
    out = tmp_path / "shapes"
    assert main(["data", "shapes", "--out", str(out), "--train", "60", "--val", "0",
                 "--mix", "vqa=1,vqa_position=1"]) == 0
    records = _read_plain(sorted(out.glob("train-*.tar")))
    assert Counter(r["meta"]["task"] for r, _ in records) == {"vqa": 30, "vqa_position": 30}
    kinds = Counter(r["meta"]["question_type"] for r, _ in records if r["meta"]["task"] == "vqa_position")
    relative = sum("relation" in r["meta"] for r, _ in records if r["meta"]["task"] == "vqa_position")
    assert kinds == {"position": 30} and 5 <= relative <= 25  # both kinds of position question
    for record, images in records:
        _check_semantics(record)
        _check_pixels(images[0], _image_objects(record["meta"])[0])
    with pytest.raises(ValueError, match="unknown shapes task.*vqa_position"):
        shapes.task_plan(10, {"vqa_where": 1.0}, seed=0, split="train")


def test_t2i_position_task_draws_two_objects_in_every_named_relation(tmp_path):
    out = tmp_path / "shapes"
    assert main(["data", "shapes", "--out", str(out), "--train", "80", "--val", "0", "--mix", "t2i=1,t2i_position=1"]) == 0
    records = _read_plain(sorted(out.glob("train-*.tar")))
    assert Counter(r["meta"]["task"] for r, _ in records) == {"t2i": 40, "t2i_position": 40}
    position = [r for r, _ in records if r["meta"]["task"] == "t2i_position"]
    assert {r["meta"]["subtask"] for r in position} == {"position"}
    # All four relations, so the first-named object is drawn first (left of, above) and last (right of, below).
    assert {r["meta"]["relation"]["rel"] for r in position} == set(T.RELATIONS)
    for record, images in records:
        _check_semantics(record)
        _check_pixels(images[0], _image_objects(record["meta"])[0])
    # It is drawing: the t2i template (the prompt is everything before the picture) and its CFG drop.
    assert T.template("t2i_position") == "t2i" and T.template("t2i_position") in T.CFG_TASKS
    assert T.template("digit_t2i") == "digit_t2i"


def test_t2i_counting_task_draws_every_count_of_one_kind(tmp_path):
    out = tmp_path / "shapes"
    assert main(["data", "shapes", "--out", str(out), "--train", "80", "--val", "0", "--mix", "t2i_counting=1"]) == 0
    records = _read_plain(sorted(out.glob("train-*.tar")))
    assert {r["meta"]["task"] for r, _ in records} == {"t2i_counting"}
    assert {r["meta"]["subtask"] for r, _ in records} == {"counting"}
    assert {len(r["meta"]["objects"]) for r, _ in records} == {1, 2, 3, 4}
    for record, images in records:
        objects = record["meta"]["objects"]
        assert record["meta"]["count"] == len(objects)
        assert len({(o["shape"], o["color"]) for o in objects}) == 1  # one kind of object
        assert T.number_word(len(objects)) in record["texts"][0].lower()  # the prompt names the count
        _check_semantics(record)
        _check_pixels(images[0], _image_objects(record["meta"])[0])
    assert T.template("t2i_counting") == "t2i" and T.template("t2i_counting") in T.CFG_TASKS


def test_vqa_binding_task_asks_attributes_of_one_object_among_several(tmp_path):
    out = tmp_path / "shapes"
    assert main(["data", "shapes", "--out", str(out), "--train", "60", "--val", "0", "--mix", "vqa_binding=1"]) == 0
    records = _read_plain(sorted(out.glob("train-*.tar")))
    assert Counter(r["meta"]["task"] for r, _ in records) == {"vqa_binding": 60}
    kinds = Counter(r["meta"]["question_type"] for r, _ in records)
    sizes = Counter(len(r["meta"]["objects"]) for r, _ in records)
    assert set(kinds) == {"color", "shape", "position"} and min(kinds.values()) >= 10
    assert all(_named(COLOR_WORDS, r["meta"]["question"]) for r, _ in records if r["meta"]["question_type"] == "position")
    assert set(sizes) == {2, 3} and min(sizes.values()) >= 15
    for record, images in records:
        _check_semantics(record)
        _check_pixels(images[0], _image_objects(record["meta"])[0])


@pytest.mark.parametrize("task", ["vqa", "vqa_position", "vqa_binding"])
def test_vqa_tasks_train_only_on_the_answer(task):
    """The narrower VQA tasks of training mixes follow the vqa template: the image and question
    are the prompt (the image is read clean, not drawn), only the answer is trained on."""
    for doc in shapes.generate(10, seed=2, mix={task: 1.0}):
        assert doc.task == task and T.loss_flags(doc) == [False, False, True]
        prompt, answer = T.split_prompt(doc)
        assert answer == [doc.meta["answer"]] and prompt[1] == doc.meta["question"]


def test_vqa_multi_asks_several_questions_about_one_picture_and_trains_every_answer(tmp_path):
    out = tmp_path / "shapes"
    assert main(["data", "shapes", "--out", str(out), "--train", "80", "--val", "0", "--mix", "vqa_multi=1"]) == 0
    records = _read_plain(sorted(out.glob("train-*.tar")))
    kinds, full = Counter(), 0
    for record, images in records:
        meta, texts = record["meta"], [t for t in record["texts"] if t is not None]
        # Fewer questions only where the scene has fewer with one answer (e.g. two blue circles).
        assert meta["task"] == "vqa_multi" and 2 <= len(texts) <= 2 * shapes.QUESTIONS_PER_SCENE
        full += len(texts) == 2 * shapes.QUESTIONS_PER_SCENE
        questions, answers = texts[0::2], texts[1::2]
        assert questions == meta["questions"] and answers == meta["answers"]
        assert len(set(questions)) == len(questions)  # no question asked twice
        for q, a in zip(questions, answers):  # every answer checked against the scene on its own
            one = {**meta, "task": "vqa", "question": q, "answer": a}
            one.pop("relation", None)
            if a in ("left", "right", "above", "below"):
                first, second = _named(SHAPE_WORDS, q)
                by_shape = {o["shape"]: i for i, o in enumerate(meta["objects"])}
                word = {"left": "left of", "right": "right of"}.get(a, a)
                one["relation"] = {"a": by_shape[first], "b": by_shape[second], "rel": word}
            low = q.lower()
            one["question_type"] = ("color" if re.search("colou?r", low) else "shape" if "shape" in low
                                    else "count" if "how many" in low or "count" in low else "position")
            kinds[one["question_type"]] += 1
            _check_semantics({"meta": one, "texts": [None, q, a]})
        _check_pixels(images[0], _image_objects(meta)[0])
    assert set(kinds) == {"color", "shape", "count", "position"} and min(kinds.values()) >= 25
    assert full >= 0.9 * len(records)
    doc = next(shapes.generate(1, seed=3, mix={"vqa_multi": 1.0}))
    n = len(doc) - 1
    assert T.loss_flags(doc) == [False] + [False, True] * (n // 2)  # the answers, not the questions
    prompt, answer = T.split_prompt(doc)
    assert answer == [doc.meta["answers"][-1]] and len(prompt) == n


def test_shapes_are_reproducible_and_scale_with_the_canvas():
    a = [d.to_sample() for d in shapes.generate(30, seed=5)]
    b = [d.to_sample() for d in shapes.generate(30, seed=5)]
    c = [d.to_sample() for d in shapes.generate(30, seed=6)]
    assert a == b and a != c
    for doc in shapes.generate(40, seed=1, canvas=64):
        for im, objs in zip([i for i in doc.images if i is not None], _image_objects(doc.meta)):
            _check_pixels(np.asarray(im), objs)
    with pytest.raises(ValueError, match="multiple of 4"):
        shapes.ShapesWorld(30)


def test_two_object_prompts_name_objects_in_reading_order():
    """two_objects / color_attr: the first object named sits in the earlier cell (row, then column)."""
    seen = Counter()
    for doc in shapes.generate(400, seed=3, mix={"t2i": 1.0}):
        if doc.meta["subtask"] not in ("two_objects", "color_attr"):
            continue
        a, b = doc.meta["objects"]
        seen[doc.meta["subtask"]] += 1
        assert (a["cy"] // 16, a["cx"] // 16) < (b["cy"] // 16, b["cx"] // 16), doc.meta
        text = doc.texts[0]
        assert text.index(a["shape"]) < text.index(b["shape"]), text
    assert min(seen.values()) > 30


def test_digits_split_and_rendering(tmp_path):
    train_idx, held_idx = digits.split_indices("train"), digits.split_indices("heldout")
    assert len(train_idx) == 1500 and len(held_idx) == 297
    assert not set(train_idx) & set(held_idx) and len(set(train_idx) | set(held_idx)) == 1797
    images, labels = digits.load_split("heldout")
    assert images.shape == (297, 32, 32, 3) and images.dtype == np.uint8 and set(labels) == set(range(10))
    raw = np.zeros((8, 8))
    raw[2, 3] = 16
    img = np.asarray(digits.render_digit(raw, 32))
    assert (img[8:12, 12:16] == 0).all() and (img[:8] == 255).all()  # one ink cell = one 4x4 block

    assert main(["data", "digits", "--out", str(tmp_path)]) == 0
    docs = list(read_documents(str(tmp_path / "val-*.tar")))
    assert Counter(d.task for d in docs) == {"digit_t2i": 297, "digit_read": 297}
    assert {d.meta["index"] for d in docs} == set(held_idx.tolist())
    train_docs = list(read_documents(str(tmp_path / "train-*.tar"), decode_images=False))
    assert not {d.meta["index"] for d in train_docs} & set(held_idx.tolist())
    by_index = {int(i): k for k, i in enumerate(held_idx)}
    for d in docs[:40]:
        im = next(i for i in d.images if i is not None)
        assert np.array_equal(np.asarray(im), images[by_index[d.meta["index"]]])
        texts = [t for t in d.texts if t is not None]
        # a drawing request in any phrasing names the digit; a reading (after an optional request) has one form
        assert T.parse_digit(texts[0] if d.task == "digit_t2i" else texts[-1]) == d.meta["digit"]
        assert d.meta["digit"] == labels[by_index[d.meta["index"]]]
        assert d.task == "digit_t2i" or texts[-1] == T.digit_read_text(d.meta["digit"])


def test_templates_split_prompt_and_loss_flags():
    img = Image.new("RGB", (32, 32), "white")
    cases = {
        "t2i": (["a red circle.", img], 1),
        "digit_t2i": (["draw the digit 3.", img], 1),
        "caption": ([img, "a red circle."], 1),
        "digit_read": ([img, "this is the digit 3."], 1),
        "caption_request": ([img, "describe it", "a red circle."], 2),  # task "caption", a request asked
        "digit_read_request": ([img, "what digit is this?", "this is the digit 3."], 2),
        "vqa": ([img, "what color is the circle?", "red"], 2),
        "story": (["a red circle at the top left.", img, "the circle moves right.", img], 1),
        "text": (["a red circle at the top left."], 0),
        "interleaved": (["x", img, "y"], 0),
    }
    for task, (segments, k) in cases.items():
        doc = Document.from_segments(segments, {"task": task.removesuffix("_request")})
        prompt, answer = T.split_prompt(doc)
        assert prompt == segments[:k] and answer == segments[k:]
        assert T.loss_flags(doc) == [False] * k + [True] * (len(segments) - k)
    assert T.t2i_caption("position", [{"shape": "circle", "color": "red"}, {"shape": "square", "color": "orange"}],
                         {"a": 0, "b": 1, "rel": "left of"}) == "a red circle left of an orange square."
    assert T.caption_text([{"shape": "square", "color": "blue"}] * 3) == "three blue squares."


def test_tokenizer_cli_trains_a_loadable_tokenizer(tmp_path, capsys):
    from omni.data.shards import write_shards
    from omni.tokenizers.text import TextTokenizer

    write_shards(shapes.generate(300, seed=2), tmp_path / "s", progress=False)
    write_shards(digits.documents("train"), tmp_path / "d", shard_size=2000, progress=False)
    assert main(["data", "tokenizer", "--shards", str(tmp_path / "s"), str(tmp_path / "d"),
                 "--out", str(tmp_path / "tok"), "--vocab-size", "128"]) == 0
    assert f"model.tokenizer={tmp_path / 'tok'}" in capsys.readouterr().out
    tok = TextTokenizer.from_pretrained(tmp_path / "tok")
    unk = tok.hf.unk_token_id
    for text in ["a red circle left of an orange square.", "what color is the triangle?", "purple",
                 "this is the digit 9.", "the square moves up.", "three green triangles."]:
        ids = tok.encode(text)
        assert unk not in ids and tok.decode(ids) == text
    assert len({tok.boi_id, tok.eoi_id, tok.img_id, tok.bos_id, tok.eos_id}) == 5


def test_convert_and_inspect_cli(tmp_path, capsys):
    from omni.data.adapters import to_base64_png

    photo = Image.new("RGB", (48, 40), (10, 200, 30))
    records = [{"text_list": [f"sentence {i}.", "more."],
                "image_info": [{"matched_text_index": 1, "image_base64": to_base64_png(photo)}]} for i in range(5)]
    src = tmp_path / "mmc4.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in records) + "\n{broken\n")
    assert main(["data", "convert", "--format", "mmc4", "--input", str(src), "--out", str(tmp_path / "out")]) == 0
    assert "5 documents" in capsys.readouterr().out
    docs = list(read_documents(str(tmp_path / "out")))
    assert [d.texts for d in docs] == [[f"sentence {i}.", None, "more."] for i in range(5)]
    assert all(d.images[1].size == (32, 32) and d.images[1].getpixel((16, 16)) == (10, 200, 30) for d in docs)
    assert main(["data", "inspect", str(tmp_path / "out")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == {"shards": 1, "documents": 5, "tasks": {"interleaved": 5}, "skipped": {}}


def test_inspect_with_a_config_measures_positions_and_each_tasks_share_of_a_step(tmp_path, tokenizer_dir, capsys):
    from omni.tokenizers.text import TextTokenizer

    for name, mix in (("a", "t2i=1,story=1"), ("b", "t2i=1")):
        assert main(["data", "shapes", "--out", str(tmp_path / name), "--train", "40", "--val", "2",
                     "--shard-size", "10", "--mix", mix, "--workers", "1"]) == 0
    capsys.readouterr()
    tok = TextTokenizer.from_pretrained(tokenizer_dir)
    n_image = (32 // 8) ** 2  # the tiny preset's patch tokenizer

    def positions(doc) -> int:  # [bos] text ... <boi> image <eoi> ... [eos], counted from the document itself
        return 2 + sum(len(tok.encode(s)) if isinstance(s, str) else n_image + 2 for s in doc.segments)

    spec = f"{tmp_path / 'a'}/train-*.tar::{tmp_path / 'b'}/train-*.tar"
    expected: dict[str, list[int]] = {}
    for doc in read_documents(spec.split("::")):
        expected.setdefault(doc.task, []).append(positions(doc))
    args = ["data", "inspect", "--config", "tiny", "--set", f"model.tokenizer={tokenizer_dir}",
            "--set", f"data.train={spec}", "--set", "data.task_weights={t2i: 3, story: 1, vqa: 1}"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["documents"] == 80 and report["shards"] == 8
    mean = {t: sum(v) / len(v) for t, v in expected.items()}
    assert {t: r["mean"] for t, r in report["positions"].items()} == {t: round(m, 1) for t, m in mean.items()}
    assert {t: r["max"] for t, r in report["positions"].items()} == {t: max(v) for t, v in expected.items()}
    mix = report["mix"]
    per_doc = (3 * mean["t2i"] + mean["story"]) / 4  # vqa has no documents here: left out, and named
    assert mix["weighted_tasks_without_documents"] == ["vqa"]
    assert mix["positions_per_document"] == round(per_doc, 1)
    assert mix["documents_per_step_at_most"] == round(16 * 160 / per_doc, 1)
    assert mix["tasks"]["t2i"]["document_share"] == 0.75
    assert mix["tasks"]["story"]["position_share"] == round(mean["story"] / (4 * per_doc), 3)
    assert mix["tasks"]["story"]["position_share"] > 0.25  # a story is several pictures long
    # --limit reads the first documents of every spec in turn: both shard sets, not only the first
    assert main([*args, "--limit", "20"]) == 0
    limited = json.loads(capsys.readouterr().out)
    assert limited["documents"] == 20 and limited["tasks"]["t2i"] > 10 and limited["tasks"]["story"] > 0
    # a config that starts from a checkpoint (train.init_from) reads that checkpoint's tokenizer and image settings
    from conftest import save_tiny_checkpoint

    ckpt = save_tiny_checkpoint(tokenizer_dir, tmp_path / "ckpt")
    assert main(["data", "inspect", "--config", "tiny", "--set", f"train.init_from={ckpt}", "--set", f"data.train={spec}"]) == 0
    assert json.loads(capsys.readouterr().out)["positions"] == report["positions"]
    with pytest.raises(SystemExit, match="holds no config.yaml"):
        main(["data", "inspect", "--config", "tiny", "--set", f"train.init_from={tmp_path / 'a'}", "--set", f"data.train={spec}"])
    with pytest.raises(SystemExit, match="--set needs --config"):
        main(["data", "inspect", str(tmp_path / "a"), "--set", "data.seq_len=64"])
    with pytest.raises(SystemExit, match="name shard specs"):
        main(["data", "inspect"])


def test_shapes_shards_written_by_several_processes_are_the_serial_bytes(tmp_path, capsys):
    # 1,100 documents in shards of 400: two whole shards and a short last one, a mix with edits and
    # stories (their documents hold several images); the validation split stays in one process.
    args = ["data", "shapes", "--train", "1100", "--val", "30", "--shard-size", "400", "--mix", "t2i=1,edit=1,story=1"]
    assert main([*args, "--out", str(tmp_path / "one"), "--workers", "1"]) == 0
    assert main([*args, "--out", str(tmp_path / "two"), "--workers", "2"]) == 0
    one = sorted(p.name for p in (tmp_path / "one").glob("*.tar"))
    assert one == ["train-000000.tar", "train-000001.tar", "train-000002.tar", "val-000000.tar"]
    assert sorted(p.name for p in (tmp_path / "two").glob("*.tar")) == one
    for name in one:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    manifests = [json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("one", "two")]
    for m in manifests:  # the brace patterns name each one's directory
        assert m["train"].pop("pattern").endswith("/train-{000000..000002}.tar")
        m["val"].pop("pattern")
    assert manifests[0] == manifests[1]
    assert manifests[0]["train"]["tasks"] == {"edit": 367, "story": 366, "t2i": 367}
    assert not list((tmp_path / "two").glob(".*.tmp"))  # no temporary file left behind
    # A rewrite with fewer documents removes the shards the first write had beyond them.
    assert main(["data", "shapes", "--train", "500", "--val", "0", "--shard-size", "400",
                 "--out", str(tmp_path / "two"), "--workers", "2"]) == 0
    assert sorted(p.name for p in (tmp_path / "two").glob("train-*.tar")) == ["train-000000.tar", "train-000001.tar"]


def test_shapes_cli_refuses_zero_workers(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["data", "shapes", "--out", str(tmp_path), "--workers", "0"])
    assert "--workers: must be 1 or more, got 0" in capsys.readouterr().err
