"""Requests as people type them (omni.data.phrasing): varied training phrasings, and held-out
phrasings that never occur in training but use only words (and tokens) that training text has."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
from PIL import Image

from omni.cli import main
from omni.data import digits, shapes, writers
from omni.data import phrasing as P
from omni.data import templates as T
from omni.data.shards import read_documents

ALL_TASKS = {"t2i": 4, "caption": 2, "vqa": 3, "vqa_position": 1, "vqa_binding": 1, "vqa_multi": 1, "t2i_position": 1, "t2i_counting": 1, "story": 2,
             "text": 1, "chat": 1}
SLOTS = {"x": "a red circle", "d": 8, "a": "an", "s": "circle", "p": "circles", "c": "red", "b": "square",
         "n": "three", "scene": "a red circle at the top left"}


def _docs(mode: str, n: int = 600, seed: int = 0) -> list:
    """Shapes documents of every task and digits documents, in `mode`."""
    docs = list(shapes.generate(n, seed=seed, mix=ALL_TASKS, phrasing=mode))
    return docs + [d for d in digits.documents("train" if mode != "heldout" else "heldout", phrasing=mode)][:n // 2]


def _texts(docs) -> list[str]:
    return [t for d in docs for t in d.texts if t]


def test_heldout_forms_are_disjoint_from_training_forms_by_identity_and_by_text():
    for family in P.FAMILIES:
        train, held, template = (P.forms(family, m) for m in P.MODES)
        ids = {f.id for f in train}
        assert ids and held and not ids & {f.id for f in held}, family
        assert {f.id for f in template} <= ids and len(template) == 1
        # ... and no held-out form writes a string that a training form writes
        assert not {f.render(**SLOTS) for f in train} & {f.render(**SLOTS) for f in held}, family
        # every training frame is trained in several surfaces, with and without a capital
        per_frame = Counter(f.frame for f in train)
        assert set(per_frame) == set(P.FAMILIES[family].frames) and min(per_frame.values()) >= 3
        assert {f.cap for f in train} == {False, True}
        # the held-out surface of a training frame is a capitalised one (lowercase forms all trained)
        assert all(f.cap for f in held if f.frame in P.FAMILIES[family].frames)
    t2i_train = {f.render(**SLOTS) for f in P.forms("t2i", "train")}
    assert {"a red circle", "a red circle.", "Draw a red circle.", "draw a red circle", "can you draw a red circle?",
            "Can you draw a red circle?", "please draw a red circle"} <= t2i_train
    assert "Please show me a red circle" in {f.render(**SLOTS) for f in P.forms("t2i", "heldout")}
    with pytest.raises(ValueError, match="unknown phrasing 'test'.*heldout"):
        P.forms("t2i", "test")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_training_documents_use_training_forms_only(seed):
    """Whatever the seed, a training document's forms come from the training pool (recorded in its
    meta by identity), and the same scenes in held-out phrasing share no prompt text with it."""
    train_ids = {f.id for fam in P.FAMILIES for f in P.forms(fam, "train")}
    held_ids = {f.id for fam in P.FAMILIES for f in P.forms(fam, "heldout")}
    train_docs, held_docs = _docs("train", seed=seed), _docs("heldout", seed=seed)
    used = Counter(i for d in train_docs for i in d.meta["forms"])
    assert set(used) <= train_ids and not set(used) & held_ids
    assert {i for d in held_docs for i in d.meta["forms"]} <= held_ids
    assert all(d.meta["phrasing"] == "train" for d in train_docs)
    # the same documents (same keys, same scenes) in the two modes: no prompt text in common
    held_by_key = {d.key: d for d in held_docs}
    same = 0
    for d in train_docs:
        h = held_by_key.get(d.key)
        if h is None or d.task in ("text",):
            continue
        assert h.meta.get("objects") == d.meta.get("objects") and h.meta.get("steps") == d.meta.get("steps")
        prompt_t, _ = T.split_prompt(d)
        prompt_h, _ = T.split_prompt(h)
        answers = d.meta.get("answers", [])  # vqa_multi: the earlier answers are part of the prompt
        asked_t = [s for s in prompt_t if isinstance(s, str) and s not in answers]
        asked_h = [s for s in prompt_h if isinstance(s, str) and s not in answers]
        assert not set(asked_t) & set(asked_h), (asked_t, asked_h)
        same += 1
    assert same > 200
    # training varies the surface: capitals, final punctuation and imperatives all occur
    prompts = [d.texts[0] for d in train_docs if d.task == "t2i"]
    assert any(p[0].isupper() for p in prompts) and any(p[0].islower() for p in prompts)
    assert {p[-1] for p in prompts} >= {".", "?", "!"} and any(p[-1].isalpha() for p in prompts)
    assert any(p.lower().startswith(("draw ", "can you draw ", "please draw ", "show me ")) for p in prompts)


def test_template_mode_is_the_fixed_templates_and_every_mode_shows_the_same_scenes():
    fixed = list(shapes.generate(200, seed=4, mix=ALL_TASKS, phrasing="template"))
    for d in fixed:
        meta, texts = d.meta, d.texts
        if d.task in ("vqa", "vqa_position", "vqa_binding"):
            fixed_questions = {q for _, q, _ in shapes.ShapesWorld().scene_questions(meta["objects"], template=True)}
            assert texts[1] in fixed_questions | {T.where_question(color=o["color"]) for o in meta["objects"]}
        elif d.task == "caption":
            assert len(d) == 2 and texts[1] == T.caption_text(meta["objects"], meta.get("relation"),
                                                              meta["subtask"] == "counting")
        elif d.task == "story":
            assert texts[0].startswith("a story in ") and texts[0].endswith(".")
        elif d.task == "t2i":
            assert texts[0].endswith(".") and texts[0][0].islower()
    for d in digits.documents("heldout", phrasing="template"):
        assert d.texts[0 if d.task == "digit_t2i" else 1] == (
            T.digit_t2i_text(d.meta["digit"]) if d.task == "digit_t2i" else T.digit_read_text(d.meta["digit"]))
        break
    trained = list(shapes.generate(200, seed=4, mix=ALL_TASKS))
    assert [d.meta.get("objects") for d in fixed] == [d.meta.get("objects") for d in trained]


def test_heldout_phrasings_use_only_words_and_tokens_of_the_training_text(tmp_path):
    """The demo's tokenizer is trained on the training shards' text: every held-out phrasing must
    be made of words (and so tokens) it has seen, or a held-out score measures the tokenizer."""
    from omni.config import load_config
    from omni.demo import shapes_train_mix
    from omni.tokenizers.text import train_sentencepiece

    # the demo's training shards: its preset's shapes tasks, and every training digit
    mix = shapes.parse_mix(shapes_train_mix(load_config("tiny")))
    assert "chat" in mix
    train_docs = list(shapes.generate(12000, mix=mix)) + list(digits.documents("train"))  # the demo writes 90,000
    train_texts = _texts(train_docs)
    # the held-out phrasing splits' prompts: every benchmark task, and the greetings
    held = list(shapes.generate(1500, split="val", seed=7, mix={t: 1.0 for t in ("t2i", "caption", "vqa", "story", "chat")},
                                phrasing="heldout")) + list(digits.documents("heldout", phrasing="heldout"))
    held_texts = [s for d in held for s in T.split_prompt(d)[0] if isinstance(s, str)]
    assert len(set(held_texts)) > 500
    words = lambda t: re.findall(r"[\w']+|[^\w\s]", t)  # words and punctuation marks, case kept
    train_words = {w for t in train_texts for w in words(t)}
    unseen = Counter(w for t in held_texts for w in words(t) if w not in train_words)
    assert not unseen, unseen.most_common(10)
    tok = train_sentencepiece(train_texts, tmp_path / "tok", vocab_size=256)
    seen_ids = {i for t in train_texts for i in tok.encode(t)}
    held_ids = Counter(i for t in held_texts for i in tok.encode(t))
    assert 0 not in held_ids  # no <unk>
    assert set(held_ids) <= seen_ids


def test_caption_and_reading_requests_are_prompt_and_the_answer_keeps_its_form():
    docs = list(shapes.generate(300, seed=1, mix={"caption": 1.0}))
    asked = [d for d in docs if len(d) == 3]
    assert 0.3 < len(asked) / len(docs) < 0.7  # some ask for the caption in words, the rest show the picture alone
    for d in docs:
        prompt, answer = T.split_prompt(d)
        assert isinstance(prompt[0], Image.Image) and prompt[1:] == d.texts[1:-1]
        assert answer == [T.caption_text(d.meta["objects"], d.meta.get("relation"), d.meta["subtask"] == "counting")]
        assert T.loss_flags(d) == [False] * (len(d) - 1) + [True]
    reads = [d for d in digits.documents("heldout", phrasing="heldout") if d.task == "digit_read"]
    assert all(len(d) == 3 and T.parse_digit(d.texts[-1]) == d.meta["digit"] for d in reads)
    assert T.split_prompt(reads[0])[1] == [T.digit_read_text(reads[0].meta["digit"])]


def test_chat_documents_answer_greetings_in_one_sentence():
    docs = list(shapes.generate(60, seed=0, mix={"chat": 1.0}))
    kinds = Counter(d.meta["kind"] for d in docs)
    assert set(kinds) == set(P.CHAT_ANSWERS)
    for d in docs:
        user, answer = d.texts
        assert answer == P.CHAT_ANSWERS[d.meta["kind"]] and answer.count(".") == 1 and answer.endswith(".")
        assert user.lower().rstrip("?!.") in {f.frame.rstrip("?") for f in P.forms(d.meta["kind"], "train")}


def test_writers_and_cli_write_heldout_phrasings_as_validation_only(tmp_path, capsys):
    with pytest.raises(ValueError, match="never written to training shards.*--train 0"):
        writers.write_shapes(tmp_path / "bad", 10, 10, phrasing="heldout")
    out = tmp_path / "shapes-heldout"
    assert main(["data", "shapes", "--out", str(out), "--train", "0", "--val", "60", "--phrasing", "heldout"]) == 0
    assert not list(out.glob("train-*.tar"))
    held_ids = {f.id for fam in P.FAMILIES for f in P.forms(fam, "heldout")}
    docs = list(read_documents(str(out / "val-*.tar"), decode_images=False))
    assert len(docs) == 60 and all(d.meta["phrasing"] == "heldout" and set(d.meta["forms"]) <= held_ids
                                   for d in docs if d.task != "text")
    assert json.loads((out / "manifest.json").read_text())["generator"]["phrasing"] == "heldout"
    dig = tmp_path / "digits-heldout"
    assert main(["data", "digits", "--out", str(dig), "--phrasing", "heldout"]) == 0
    assert not list(dig.glob("train-*.tar"))
    docs = list(read_documents(str(dig / "val-*.tar"), decode_images=False))
    assert len(docs) == 2 * digits.N_HELDOUT and all(set(d.meta["forms"]) <= held_ids for d in docs)
    t2i_texts = [d.texts[0] for d in docs if d.task == "digit_t2i"]
    assert all(T.parse_digit(t) is not None for t in t2i_texts)
    assert any(re.search(r"\ban 8\b", t) for t in t2i_texts)  # a/an before a digit, as said: "an 8"
    capsys.readouterr()
