"""Task templates: the words of every task, and which part of a document is prompt vs answer.

Training and evaluation both go through `split_prompt`, so an evaluation prompt is exactly the
prefix the model was trained to continue:

| task        | document                          | prompt (no loss)          | answer (trained on)     |
|-------------|-----------------------------------|---------------------------|-------------------------|
| t2i         | caption, image                    | caption                   | image                   |
| digit_t2i   | "draw the digit 7.", image        | text                      | image                   |
| caption     | image [, request], caption        | image [, request]         | caption                 |
| digit_read  | image [, request], "this is the digit 7." | image [, request] | text                |
| vqa         | image, question, answer [, q, a]  | image, question           | answer(s)               |
| story       | text, image, text, image, ...     | first text                | everything after        |
| edit        | image, instruction, image [, instruction, image] | image, instruction | the edited image(s) |
| text / other| text ...                          | (nothing)                 | everything              |

A task named `vqa_<kind>` (a narrower VQA task of a training mix) follows the vqa template. A VQA
document may ask several questions about its image (question, answer, question, answer, ...):
every answer is trained on, no question is, and its prompt is everything before the last answer.
An edit document (the shapes world's `edit`) works the same way: every edited image is trained on,
neither the source image nor any instruction is (`edit_loss_flags`).

The functions below give each text's fixed template (lowercase, short); `omni.data.phrasing`
varies the requests around them the way people type (capitals, punctuation, "draw ...", "can
you draw ...?") and holds some phrasings out of training. Captions, answers and digit readings
keep one form, so a judge can parse them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PIL import Image

from omni.data.document import Document, Segment

TASKS = ("t2i", "caption", "vqa", "story", "text", "digit_t2i", "digit_read")
CFG_TASKS = ("t2i", "digit_t2i")  # templates whose prompt is dropped for classifier-free guidance
RELATIONS = ("left of", "right of", "above", "below")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CELL_NAMES = {(0, 0): "top left", (0, 1): "top right", (1, 0): "bottom left", (1, 1): "bottom right"}


# --------------------------------------------------------------------------------------------
# Prompt / answer split and loss flags
# --------------------------------------------------------------------------------------------


def _first(segments: Sequence[Segment], kind: type) -> int:
    return next((i for i, s in enumerate(segments) if isinstance(s, kind)), len(segments))


def template(task: str | None) -> str | None:
    """The template a task's documents follow: a task named `vqa_<kind>` or `t2i_<kind>` (a narrower
    VQA or drawing task of a training mix, e.g. the shapes world's `vqa_position`) is VQA or t2i;
    other names are their own."""
    if task and task.startswith("vqa_"):
        return "vqa"
    if task and task.startswith("t2i_"):
        return "t2i"
    return task


def split_index(task: str | None, segments: Sequence[Segment]) -> int:
    """Number of leading segments that form the prompt of a document of `task`."""
    task = template(task)
    if task == "edit":
        return min(2, len(segments))  # the source image and the (first) instruction
    if task in ("t2i", "digit_t2i"):
        return _first(segments, Image.Image)  # everything before the first image
    if task in ("caption", "digit_read"):
        return max(_first(segments, str), len(segments) - 1)  # the image(s) [and a request]: all but the answer
    if task == "vqa":
        return max(len(segments) - 1, 0)  # all but the answer
    if task == "story":
        return min(1, len(segments))  # the opening text
    return 0


def split_prompt(doc: Document | Sequence[Segment], task: str | None = None) -> tuple[list[Segment], list[Segment]]:
    """(prompt segments, answer segments) of a document; segments are str | PIL.Image."""
    if isinstance(doc, Document):
        task = task if task is not None else doc.task
        segments = doc.segments
    else:
        segments = list(doc)
    k = split_index(task, segments)
    return list(segments[:k]), list(segments[k:])


def loss_flags(doc: Document) -> list[bool]:
    """Which segments are trained on: the answer part of `split_prompt`, and in a VQA document
    every answer (the texts after the image alternate question, answer)."""
    if template(doc.task) == "edit":
        return edit_loss_flags(doc.segments)
    if template(doc.task) == "vqa":
        k = _first(doc.segments, str)
        return [i >= k and (i - k) % 2 == 1 for i in range(len(doc))]
    k = split_index(doc.task, doc.segments)
    return [i >= k for i in range(len(doc))]


# --------------------------------------------------------------------------------------------
# Shapes-world phrasing
# --------------------------------------------------------------------------------------------


def plural(shape: str) -> str:
    return shape + "s"


def number_word(n: int) -> str:
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


def article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def object_phrase(obj: dict[str, Any], color: bool = True) -> str:
    """`a red circle`, `an orange square` (or `a circle` when the color is not named)."""
    words = f"{obj['color']} {obj['shape']}" if color else obj["shape"]
    return f"{article(words)} {words}"


def count_phrase(n: int, shape: str, color: str | None) -> str:
    """`three red circles`, `one blue square`."""
    noun = shape if n == 1 else plural(shape)
    return f"{number_word(n)} {color} {noun}" if color else f"{number_word(n)} {noun}"


def relation_phrase(rel: str, variant: int = 0) -> str:
    """`left of` is also said `to the left of` (variant 1)."""
    if variant == 1 and rel in ("left of", "right of"):
        return f"to the {rel}"
    return rel


T2I_PREFIXES = ("", "draw ", "a picture of ")


def t2i_caption(
    subtask: str,
    objects: list[dict[str, Any]],
    relation: dict[str, Any] | None = None,
    variant: int = 0,
) -> str:
    """The t2i prompt for a scene in the fixed template (`omni.data.phrasing` mode "template"):
    a prefix of T2I_PREFIXES and `t2i_body`, with a final period."""
    prefix = T2I_PREFIXES[variant % len(T2I_PREFIXES)]
    body = t2i_body(subtask, objects, relation, variant // len(T2I_PREFIXES))
    return f"{prefix}{body}."


def t2i_body(
    subtask: str,
    objects: list[dict[str, Any]],
    relation: dict[str, Any] | None = None,
    rel_variant: int = 0,
) -> str:
    """The noun phrase a t2i prompt names. Which attributes are named depends on the subtask:

    single_object: shape only ("a circle"); colors: color+shape ("a red circle"); two_objects:
    two shapes, no colors; color_attr: two colored shapes; position: two colored shapes and their
    relation (`rel_variant` 1 says "to the left of"); counting: n objects of one shape and color
    ("three red circles").
    """
    if subtask == "single_object":
        return object_phrase(objects[0], color=False)
    if subtask == "colors":
        return object_phrase(objects[0])
    if subtask == "two_objects":
        return f"{object_phrase(objects[0], color=False)} and {object_phrase(objects[1], color=False)}"
    if subtask == "color_attr":
        return f"{object_phrase(objects[0])} and {object_phrase(objects[1])}"
    if subtask == "position":
        assert relation is not None
        a, b = objects[relation["a"]], objects[relation["b"]]
        return f"{object_phrase(a)} {relation_phrase(relation['rel'], rel_variant)} {object_phrase(b)}"
    if subtask == "counting":
        return count_phrase(len(objects), objects[0]["shape"], objects[0]["color"])
    raise ValueError(f"unknown t2i subtask {subtask!r}")


# Named attributes per t2i subtask (what a judge should check beyond object counts).
NAMED_ATTRIBUTES = {
    "single_object": ["shape"],
    "colors": ["shape", "color"],
    "two_objects": ["shape"],
    "color_attr": ["shape", "color"],
    "position": ["shape", "color"],
    "counting": ["shape", "color"],
}


def caption_text(objects: list[dict[str, Any]], relation: dict[str, Any] | None = None, counting: bool = False) -> str:
    """The one caption form: `a red circle.`, `a red circle above a blue square.`, `two red circles.`

    `counting` names the number even for one object (`one red circle.`).
    """
    if relation is not None:
        a, b = objects[relation["a"]], objects[relation["b"]]
        return f"{object_phrase(a)} {relation['rel']} {object_phrase(b)}."
    same = all(o["shape"] == objects[0]["shape"] and o["color"] == objects[0]["color"] for o in objects)
    if same and (counting or len(objects) > 1):
        return f"{count_phrase(len(objects), objects[0]['shape'], objects[0]['color'])}."
    return " and ".join(object_phrase(o) for o in objects) + "."


def where_phrase(obj: dict[str, Any], cell: tuple[int, int]) -> str:
    """`a red circle at the top left` (cells of the 2 x 2 layout grid)."""
    return f"{object_phrase(obj)} at the {CELL_NAMES[tuple(cell)]}"


def scene_text(objects: list[dict[str, Any]], cells: list[tuple[int, int]]) -> str:
    """A scene in words: `a red circle at the top left and a blue square at the bottom right.`"""
    return " and ".join(where_phrase(o, c) for o, c in zip(objects, cells)) + "."


def color_question(shape: str) -> str:
    return f"what color is the {shape}?"


def shape_question(color: str) -> str:
    return f"what shape is the {color} object?"


def where_question(shape: str | None = None, color: str | None = None) -> str:
    """`where is the circle?`, or by colour `where is the red object?`."""
    return f"where is the {shape}?" if shape else f"where is the {color} object?"


def count_question(shape: str) -> str:
    return f"how many {plural(shape)} are there?"


def relation_question(a: str, b: str, rel: str) -> tuple[str, str]:
    """(question, answer) for where shape `a` is relative to shape `b` (`rel` one of RELATIONS)."""
    if rel in ("left of", "right of"):
        return f"is the {a} left or right of the {b}?", rel.split()[0]
    return f"is the {a} above or below the {b}?", rel


def story_opening(n_scenes: int, objects: list[dict[str, Any]], cells: list[tuple[int, int]]) -> str:
    """`a story in three pictures. a red circle at the top left.`"""
    return f"a story in {number_word(n_scenes)} pictures. {scene_text(objects, cells)}"


# --------------------------------------------------------------------------------------------
# Digits phrasing
# --------------------------------------------------------------------------------------------


def digit_t2i_text(digit: int) -> str:
    return f"draw the digit {digit}."


def digit_read_text(digit: int) -> str:
    return f"this is the digit {digit}."


def parse_digit(text: str) -> int | None:
    """The digit named in a generated reading (`this is the digit 7.` -> 7), or None."""
    import re

    m = re.search(r"digit\s*(\d)", text) or re.search(r"(\d)", text)
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------------------------
# Editing phrasing (the shapes world's `edit` task)
# --------------------------------------------------------------------------------------------

EDIT_KINDS = ("recolor", "move", "remove", "add", "swap")
# Instruction wordings per edit kind. Training documents use "train" (also the benchmark's template
# split; "template" names it too, as omni.data.phrasing's fixed mode); "heldout" wordings never
# occur in training and make the held-out phrasing split of the `shapes-edit` benchmark. Slots:
# {obj} the edited object ("the red circle" or "the circle"), {color} its new colour, {place} a
# cell ("top right"), {dir} a direction ("left", "to the left", "up"), {new} the added object
# ("a red circle"), {a} {b} the swapped objects. `move_dir` is a move said as a direction.
EDIT_PHRASINGS: dict[str, dict[str, tuple[str, ...]]] = {
    "train": {
        "recolor": ("make {obj} {color}", "change {obj} to {color}", "turn {obj} {color}",
                    "color {obj} {color}", "paint {obj} {color}"),
        "move": ("move {obj} to the {place}", "put {obj} in the {place}"),
        "move_dir": ("move {obj} {dir}",),
        "remove": ("remove {obj}", "delete {obj}", "take away {obj}"),
        "add": ("put {new} in the {place}", "add {new} at the {place}", "add {new} in the {place}",
                "draw {new} at the {place}"),
        "swap": ("swap {a} and {b}", "swap {a} with {b}", "switch {a} and {b}"),
    },
    "heldout": {
        "recolor": ("{obj} should be {color}", "can you make {obj} {color}?", "recolor {obj} {color}"),
        "move": ("shift {obj} to the {place}", "can you move {obj} to the {place}?", "place {obj} at the {place}"),
        "move_dir": ("shift {obj} {dir}", "slide {obj} {dir}"),
        "remove": ("erase {obj}", "get rid of {obj}", "can you remove {obj}?"),
        "add": ("insert {new} at the {place}", "place {new} in the {place}", "can you add {new} at the {place}?"),
        "swap": ("exchange {a} and {b}", "let {a} and {b} trade places", "can you swap {a} and {b}?"),
    },
}
EDIT_DIRECTIONS = {"left": ("left", "to the left"), "right": ("right", "to the right"), "up": ("up",), "down": ("down",)}


def edit_phrasing(phrasing: str) -> str:
    """The EDIT_PHRASINGS key of a phrasing mode: train / template (the training wordings) or heldout."""
    key = "train" if phrasing == "template" else phrasing
    if key not in EDIT_PHRASINGS:
        raise ValueError(f"unknown edit phrasing {phrasing!r}; choose from train (or template), heldout")
    return key


def edit_instruction(kind: str, slots: dict[str, str], rng: Any, phrasing: str = "train") -> str:
    """An edit instruction in one of `phrasing`'s wordings (`kind` one of EDIT_KINDS or move_dir).

    Surface variety as people type: a final period or none, and now and then a capital first letter
    (questions keep their "?"). `rng` is a random.Random; its draws depend only on the kind."""
    phrasing = edit_phrasing(phrasing)
    words = dict(slots)
    if "dir" in words:
        words["dir"] = rng.choice(EDIT_DIRECTIONS[words["dir"]])
    text = rng.choice(EDIT_PHRASINGS[phrasing][kind]).format(**words)
    if not text.endswith("?") and rng.random() < 0.5:
        text += "."
    if rng.random() < 0.25:
        text = text[0].upper() + text[1:]
    return text


def edit_loss_flags(segments: Sequence[Segment]) -> list[bool]:
    """An edit document `source image, instruction, edited image [, instruction, edited image]`:
    every edited image is trained on; the source image (read clean, as a prompt image) and every
    instruction are only read (a later instruction is the user's, not the model's, to write)."""
    return [i >= 2 and isinstance(s, Image.Image) for i, s in enumerate(segments)]
