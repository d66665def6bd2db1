"""Requests as people type them: the surface of every prompt text, and a held-out set of phrasings.

A *form* is one phrasing template: a frame (`draw {x}`, `can you draw {x}?`, `what colour is
the {s}?`) with a surface (capital first letter or not; the final punctuation: `.`, none or `!`
after a statement, `?` or none after a question). Its identity is `Form.id`
(`t2i|draw {x}|C|!`). Every family of prompts (t2i requests, caption requests, each VQA question
kind, story openings, greetings ...) has

- training frames: every surface of each, except one held-out surface per frame, a capitalised
  one that the frame's index picks (`draw {x}` is trained lower- and upper-case, with and
  without a period, lowercase with `!`, but never as `Draw a red circle!`): every frame and every
  surface occurs in training, only these pairings never do;
- held-out frames: new arrangements of the training words (`please show me {x}`: training says
  `please draw {x}` and `show me {x}`), in every surface.

Three modes pick the forms a document may use:

    train      the training forms (the default of every writer)
    heldout    the held-out forms only: the held-out phrasing splits of the benchmarks
    template   the one canonical form of each family (the fixed templates of before, exactly)

No held-out form is a training form (`tests/test_phrasing.py` checks the identities and the
rendered strings), and every word of a held-out phrasing is a word of the training phrasings, so
the trained text tokenizer has seen them all: a held-out split measures the model, not the
tokenizer. What the model answers (captions, VQA answers, digit readings) keeps its one form, so
the judges parse it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

MODES = ("train", "heldout", "template")
STATEMENT_ENDS = (".", "", "!")
QUESTION_ENDS = ("?", "")
# The held-out surface of training frame i is HELDOUT_*[i % len]: always capitalised, so the
# lowercase forms people type most ("a purple triangle", "draw a red circle") are all trained.
HELDOUT_STATEMENT = ((True, ""), (True, "!"), (True, "."))
HELDOUT_QUESTION = ((True, ""), (True, "?"))


@dataclass(frozen=True)
class Form:
    family: str
    frame: str  # with a trailing "?" for a question; {x} etc. are the family's slots
    cap: bool
    end: str

    @property
    def question(self) -> bool:
        return self.frame.endswith("?")

    @property
    def id(self) -> str:
        return f"{self.family}|{self.frame}|{'C' if self.cap else 'c'}|{self.end}"

    def render(self, **slots: Any) -> str:
        body = self.frame[:-1] if self.question else self.frame
        text = body.format(**slots).strip() + self.end
        return text[:1].upper() + text[1:] if self.cap else text


@dataclass(frozen=True)
class Family:
    """Training frames (the first is the canonical one), held-out frames, and the surfaces."""

    frames: tuple[str, ...]
    heldout: tuple[str, ...] = ()
    ends: tuple[str, ...] | None = None  # None: by the frame (statement or question)

    def surfaces(self, frame: str) -> list[tuple[bool, str]]:
        ends = self.ends if self.ends is not None else (QUESTION_ENDS if frame.endswith("?") else STATEMENT_ENDS)
        return [(cap, end) for cap in (False, True) for end in ends]

    def heldout_surface(self, i: int, frame: str) -> tuple[bool, str]:
        allowed = self.surfaces(frame)
        pool = [s for s in (HELDOUT_QUESTION if frame.endswith("?") else HELDOUT_STATEMENT) if s in allowed]
        pool = pool or [s for s in allowed if s[0]]
        return pool[i % len(pool)]


FAMILIES: dict[str, Family] = {
    # {x}: a scene's noun phrase ("a red circle", "two blue squares", "a red circle above ...")
    "t2i": Family(
        frames=("{x}", "draw {x}", "a picture of {x}", "show me {x}", "can you draw {x}?", "please draw {x}",
                "i want {x}", "make a picture of {x}", "draw me {x}", "an image of {x}", "can i have {x}?",
                "i want a picture of {x}", "please make {x}", "can you make {x}?"),
        heldout=("please show me {x}", "can you make a picture of {x}?", "show me an image of {x}",
                 "i want an image of {x}", "can i have a picture of {x}?"),
    ),
    # {d}: a digit, {a}: its article ("a 7", "an 8")
    "digit_t2i": Family(
        frames=("draw the digit {d}", "the digit {d}", "draw {a} {d}", "show me the digit {d}",
                "can you draw the digit {d}?", "please draw {a} {d}", "i want the digit {d}", "write the digit {d}",
                "a handwritten {d}", "can you write {a} {d}?", "make a picture of the digit {d}"),
        heldout=("please write the digit {d}", "show me a handwritten {d}", "can you draw {a} {d}?",
                 "i want a picture of the digit {d}"),
    ),
    # asked after a picture; the answer is the caption in its one form
    "caption": Family(
        frames=("what's in this picture?", "describe it", "what do you see?", "describe this picture",
                "what is this?", "caption this picture", "what is in the picture?", "tell me what you see"),
        heldout=("describe the picture", "what do you see in this picture?", "what's this?",
                 "tell me what is in this picture"),
    ),
    "digit_read": Family(
        frames=("what digit is this?", "read this digit", "which digit is it?", "what number is this?",
                "what is this digit?", "tell me the digit"),
        heldout=("which digit is this?", "what number is it?", "read the digit"),
    ),
    # VQA questions; {s}: a shape, {p}: its plural, {c}: a colour, {a}/{b}: two shapes
    "vqa_color": Family(
        frames=("what color is the {s}?", "what colour is the {s}?", "which color is the {s}?",
                "what is the color of the {s}?", "tell me the color of the {s}", "what's the colour of the {s}?"),
        heldout=("which colour is the {s}?", "what is the colour of the {s}?", "tell me the colour of the {s}"),
    ),
    "vqa_shape": Family(
        frames=("what shape is the {c} object?", "which shape is the {c} object?",
                "what is the shape of the {c} object?", "what shape is the {c} one?", "tell me the shape of the {c} one"),
        heldout=("which shape is the {c} one?", "tell me the shape of the {c} object"),
    ),
    "vqa_where": Family(
        frames=("where is the {s}?", "where's the {s}?", "in which corner is the {s}?", "which corner is the {s} in?"),
        heldout=("where is the {s} in the picture?",),
    ),
    "vqa_where_color": Family(
        frames=("where is the {c} object?", "where's the {c} object?", "in which corner is the {c} object?",
                "which corner is the {c} object in?"),
        heldout=("where is the {c} one?",),
    ),
    "vqa_count": Family(
        frames=("how many {p} are there?", "how many {p}?", "how many {p} do you see?", "count the {p}",
                "how many {p} are in the picture?"),
        heldout=("how many {p} can you see?", "count the {p} in the picture"),
    ),
    "vqa_left_right": Family(
        frames=("is the {a} left or right of the {b}?", "is the {a} to the left or right of the {b}?"),
    ),
    "vqa_above_below": Family(
        frames=("is the {a} above or below the {b}?", "is the {a} above the {b} or below it?"),
    ),
    # {n}: the number of pictures, {scene}: the first scene in words (no final period)
    "story": Family(
        frames=("a story in {n} pictures. {scene}", "tell me a story in {n} pictures. {scene}",
                "a story in {n} pictures: {scene}", "tell a story in {n} pictures. {scene}"),
        heldout=("tell me a story in {n} pictures: {scene}", "please tell a story in {n} pictures. {scene}"),
        ends=(".", ""),
    ),
    # a user's first words in a chat (no slots); answered by CHAT_ANSWERS
    "chat_hello": Family(frames=("hello", "hi", "hey", "hi there", "hello there"), heldout=("hey there",)),
    "chat_help": Family(frames=("what can you do?", "help", "hi, what can you do?", "hello, what can you do?",
                                "what do you do?", "how can you help me?"),
                        heldout=("hey, what can you do?", "hi, how can you help me?")),
    "chat_who": Family(frames=("who are you?", "what are you?", "hi, who are you?", "hello, who are you?"),
                       heldout=("hey, who are you?", "hello, what are you?")),
}

CHAT_ANSWERS = {
    "chat_hello": "hello! ask me to draw a picture of shapes or a digit, or show me a picture and ask about it.",
    "chat_help": "i can draw pictures of shapes and digits, describe a picture, answer questions about it "
                 "and tell a story in pictures.",
    "chat_who": "i am omni, a small model that reads and draws pictures of shapes and digits.",
}


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown phrasing {mode!r}; choose one of {MODES} (train: the training phrasings, "
                         "heldout: phrasings that never occur in training, template: the one fixed form)")
    return mode


def forms(family: str, mode: str) -> list[Form]:
    """Every form of `family` that `mode` may produce, in a fixed order."""
    check_mode(mode)
    fam = FAMILIES[family]
    if mode == "template":
        frame = fam.frames[0]
        return [Form(family, frame, False, fam.surfaces(frame)[0][1])]
    out = []
    for i, frame in enumerate(fam.frames):
        held = fam.heldout_surface(i, frame)
        out += [Form(family, frame, cap, end) for cap, end in fam.surfaces(frame)
                if ((cap, end) == held) == (mode == "heldout")]
    if mode == "heldout":
        out += [Form(family, frame, cap, end) for frame in fam.heldout for cap, end in fam.surfaces(frame)]
    return out


def digit_article(d: int) -> str:
    """`an 8` (said "eight"), `a 7`."""
    return "an" if d == 8 else "a"


class Phrasing:
    """Picks the forms of one document: `mode` and a random stream of its own, so the scene a
    document shows does not depend on how its texts are phrased."""

    def __init__(self, mode: str = "train", rng: random.Random | None = None):
        self.mode = check_mode(mode)
        self.rng = rng or random.Random(0)
        self.used: list[str] = []  # ids of the forms picked, in order (recorded in the meta)

    def pick(self, family: str) -> Form:
        """A frame uniformly, then one of its surfaces (frames have different numbers of them)."""
        options = forms(family, self.mode)
        frames = sorted({f.frame for f in options}, key=[f.frame for f in options].index)
        frame = self.rng.choice(frames)
        form = self.rng.choice([f for f in options if f.frame == frame])
        self.used.append(form.id)
        return form

    def say(self, family: str, **slots: Any) -> str:
        return self.pick(family).render(**slots)

    def request(self, share: float) -> bool:
        """Whether a caption / reading document asks for its answer in words: `share` of the
        training documents (the picture alone stays a prompt too), every held-out one, no template one."""
        if self.mode == "template":
            return False
        return self.mode == "heldout" or self.rng.random() < share

    def meta(self) -> dict[str, Any]:
        return {"phrasing": self.mode, "forms": list(self.used)}
