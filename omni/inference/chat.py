"""`omni chat`: an interactive terminal chat that writes text and draws images.

    omni chat --ckpt DIR [--out DIR] [--no-preview] [sampling flags as in omni generate]

Type a message to get an answer (text streams as it is written; images are drawn with a progress
bar, saved as PNG, and previewed inline). Commands:

    /image PATH      attach an image to your next message (or write <image:PATH> inline)
    /draw TEXT       ask for an image of TEXT
    /edit TEXT       change the attached picture, or else the last one, as TEXT says
    /set k=v ...     change sampling, e.g. /set cfg=3 steps=50 temperature=0.8 (no args: show)
    /save FILE       write the transcript (markdown, image links)
    /reset           forget the conversation
    /help            this list
    /quit            leave (also Ctrl-D)

A message that reads as an edit ("now move it to the left", "make the circle blue", "remove the
square") while the conversation holds a picture edits it the same way: the prompt is that picture,
then the instruction, the layout editing is trained on, and the answer is one picture. Set the
image guidance of edits with /set image_cfg=1.5 (docs/editing.md).

A model with a chat template reads the conversation; one without (omni's from-scratch models,
trained on single documents) reads each message on its own, except that a question about the last
picture ("what color is the circle?") and an edit of it are sent with that picture.

Ctrl-C cancels the answer being written, not the session. Every answer uses the same sampler as
`omni generate` (omni.inference.generate) with seed = --seed + answer number, so a transcript can be
replayed.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from PIL import Image

from omni.inference.prompts import load_image
from omni.utils import save_png

HELP = __doc__.split("Commands:\n\n", 1)[1].split("\n\n", 1)[0]
INLINE_IMAGE = re.compile(r"<image:([^>]+)>")
ALIASES = {"cfg": "cfg_scale", "image_cfg": "image_cfg_scale", "steps": "image_steps", "max_tokens": "max_new_tokens"}
# A message that starts like an edit instruction (after "now", "please", "can you", ...).
EDIT_START = re.compile(
    r"^(?:(?:now|ok|okay|then|and|so|please)[,\s]+)*(?:(?:can|could|would) you\s+)?(?:please\s+)?"
    r"(?P<verb>make|move|change|turn|recolou?r|colou?r|paint|remove|delete|erase|add|put|place|swap|switch|"
    r"shift|replace|flip)\b(?P<rest>.*)", re.IGNORECASE | re.DOTALL)
NEW_PICTURE = re.compile(r"\s+(?:a|an|me|us|one|two|three|four|some|another)\b", re.IGNORECASE)
# A question or a request to describe (not to draw or tell) that points at something already seen.
ASKS = re.compile(r"^(?:(?:ok|okay|so|and|now|then)[,\s]+)*(?:(?:what|which|how|where|who|is|are|does|do|describe|"
                  r"caption)\b|.*\?\s*$)", re.IGNORECASE | re.DOTALL)
REQUESTS = re.compile(r"^(?:(?:ok|okay|so|and|now|then|please)[,\s]+)*(?:(?:can|could|would|will) you\s+)?"
                      r"(?:please\s+)?(?:draw|show|paint|sketch|create|generate|tell|write|give)\b", re.IGNORECASE)
POINTS = re.compile(r"\b(?:the|it|its|this|that|these|those|there|picture|image)\b", re.IGNORECASE)
IMAGE_MARK = "\x00image\x00"  # stands for an image inside a chat-template string


@dataclass
class Turn:
    role: str  # "user" | "assistant"
    segments: list  # str | PIL.Image
    paths: list[str] = field(default_factory=list)  # saved PNG of each image segment, in order


def has_chat_template(tokenizer) -> bool:
    """Whether the model reads conversations (its tokenizer has a chat template) or plain documents."""
    return bool(getattr(tokenizer.hf, "chat_template", None))


def chat_prompt(tokenizer, turns: list[Turn]) -> list:
    """The model's prompt for a conversation: the one place that picks the chat format.

    A tokenizer with a chat template renders the turns through it (images kept as segments at
    their places). One without (omni's from-scratch models) was trained on single documents,
    each seeing only itself, so earlier turns joined in front of a request make a document it
    never saw: measured on a demo model, a drawing request after one greeting drew nothing in 8 of
    8 seeds, and 8 of 8 alone. Such a model reads the last user message with its attachments (and
    a trailing assistant turn, which the answer continues): each message is answered on its own,
    except that a question about what was shown ("what color is the circle?", `asks_about_picture`)
    gets the conversation's latest picture in front of it, and an edit reaches back to it through
    `edit_prompt` (`ChatSession.ask`, `conversation_prompt`).
    """
    if not has_chat_template(tokenizer):
        users = [i for i, turn in enumerate(turns) if turn.role == "user"]
        last = turns[users[-1]:] if users else turns
        segments = [seg for turn in last for seg in turn.segments]
        earlier = [s for turn in turns[:users[-1] if users else 0] for s in turn.segments if not isinstance(s, str)]
        if earlier and all(isinstance(s, str) for s in segments) and asks_about_picture(" ".join(segments)):
            return [earlier[-1], *segments]  # "what color is the circle?": the question format, [picture, question]
        return segments
    messages = [
        {"role": t.role, "content": "".join(s if isinstance(s, str) else IMAGE_MARK for s in t.segments)}
        for t in turns
    ]
    text = tokenizer.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    bos = tokenizer.hf.bos_token
    if bos and text.startswith(bos):
        text = text[len(bos):]  # the sampler adds [bos] itself
    images = iter([s for t in turns for s in t.segments if not isinstance(s, str)])
    out: list = []
    for i, part in enumerate(text.split(IMAGE_MARK)):
        if i:
            out.append(next(images))
        if part:
            out.append(part)
    return out


def conversation_prompt(tokenizer, turns: list[Turn], mode: str) -> tuple[list, str]:
    """A conversation's (prompt, mode), as `omni serve` and the demo's sample chat send it (and
    `omni chat`, through `ChatSession.ask`): `chat_prompt`, except that for a model without a chat
    template a last message that reads as an edit ("now make it blue", "remove the square") of the
    picture it attaches or, with none, of the conversation's latest becomes [picture, instruction],
    drawn as one picture (the layout editing is trained on), unless `mode` asks for text.
    ValueError: a picture no edit can keep whole (not square)."""
    from omni.inference.prompts import check_edit_image, edit_prompt

    if not has_chat_template(tokenizer) and mode != "text":
        edit = conversation_edit(turns)
        if edit is not None:
            check_edit_image(edit[0], "the picture to edit")
            return edit_prompt(*edit), "image"
    return chat_prompt(tokenizer, turns), mode


def conversation_edit(turns: list[Turn]) -> tuple[Image.Image, str] | None:
    """(picture, instruction) when a conversation ends with a user message that reads as an edit
    (`looks_like_edit`) of one picture: the one it attaches, or else the conversation's latest;
    None when it does not (no picture anywhere, several attached, or not an instruction)."""
    if not turns or turns[-1].role != "user":
        return None
    words = " ".join(s for s in turns[-1].segments if isinstance(s, str))
    attached = [s for s in turns[-1].segments if not isinstance(s, str)]
    if len(attached) > 1 or not looks_like_edit(words):
        return None
    earlier = [s for turn in turns[:-1] for s in turn.segments if not isinstance(s, str)]
    source = attached or earlier[-1:]
    return (source[0], words) if source else None


def asks_about_picture(text: str) -> bool:
    """Whether a message without a picture asks about one already in the conversation: a question
    (or "describe ...") that points at something ("the circle", "it", "there"), not a request to
    draw or tell. "what can you do?" points at nothing; "draw the circle bigger" is a request."""
    text = text.strip()
    return bool(ASKS.match(text)) and not REQUESTS.match(text) and bool(POINTS.search(text))


def looks_like_edit(text: str) -> bool:
    """Whether a message reads as an instruction to change a picture. "make a ..." / "make me ..."
    asks for a new picture, not a change."""
    m = EDIT_START.match(text.strip())
    if m is None:
        return False
    return not (m["verb"].lower() == "make" and NEW_PICTURE.match(m["rest"]))


class ChatEvents:
    """Streams one answer to the terminal: text as it comes, a bar while drawing, saved images.

    It implements every hook of omni.inference.rows.GenerationEvents without subclassing it, so that
    importing this module (for `omni --help`) does not import torch.
    """

    def __init__(self, session: ChatSession):
        self.s = session
        self.cancelled = False
        self.bar = None
        self.paths: list[str] = []
        self.after_image = False

    def text(self, row: int, delta: str) -> None:
        if self.after_image:
            self.s.write("\n")
            self.after_image = False
        self.s.write(delta)

    def image_start(self, row: int, total: int) -> None:
        from tqdm import tqdm

        self.s.write("\n")
        self.bar = tqdm(total=total, desc="drawing", unit="tok", leave=False, file=self.s.out, ncols=72)

    def image_token(self, row: int, done: int, total: int) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def image_done(self, row: int, image: Image.Image) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        path = self.s.save_image(image, "img")
        self.paths.append(path)
        self.s.write(f"[image saved: {path}]\n")
        self.s.show(image)
        self.after_image = True

    def should_stop(self) -> bool:
        return self.cancelled


class ChatSession:
    """The conversation state and the commands; `handle(line)` is one user input."""

    def __init__(self, model, cfg, out_dir: str | Path, seed: int, preview: bool, out: TextIO = sys.stdout):
        self.model = model
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.seed = seed
        self.preview = preview
        self.out = out
        self.history: list[Turn] = []
        self.pending: list[tuple[Image.Image, str]] = []  # attached with /image, not sent yet
        self.answers = 0
        self.saved = 0

    # output ----------------------------------------------------------------------------------
    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def say(self, text: str) -> None:
        self.write(text + "\n")

    def save_image(self, image: Image.Image, kind: str) -> str:
        self.saved += 1
        path = self.out_dir / f"{kind}_{self.saved:04d}.png"
        save_png(image, path)
        return str(path)

    def show(self, image: Image.Image) -> None:
        if self.preview:
            from omni.inference.preview import halfblock

            self.write(halfblock(image) + "\n")

    # commands --------------------------------------------------------------------------------
    def handle(self, line: str) -> bool:
        """Run one input line; False when the session should end."""
        line = line.strip()
        if not line:
            return True
        if not line.startswith("/"):
            self.ask(line, mode=None)
            return True
        cmd, _, arg = line.partition(" ")
        arg = arg.strip()
        if cmd in ("/quit", "/exit"):
            return False
        if cmd == "/help":
            self.say(HELP)
        elif cmd == "/image":
            self.attach(arg)
        elif cmd == "/draw":
            if not arg:
                self.say("usage: /draw TEXT (what to draw)")
            else:
                self.ask(arg, mode="image")
        elif cmd == "/edit":
            if not arg:
                self.say("usage: /edit TEXT (the change to make to the last picture, e.g. /edit make the circle blue)")
            else:
                self.edit(arg)
        elif cmd == "/set":
            self.set(arg)
        elif cmd == "/save":
            self.save(arg)
        elif cmd == "/reset":
            self.history.clear()
            self.pending.clear()
            self.say("(conversation cleared)")
        else:
            self.say(f"unknown command {cmd}; /help lists the commands")
        return True

    def attach(self, arg: str) -> None:
        if not arg:
            self.say("usage: /image PATH")
            return
        try:
            image = load_image(arg)
        except (OSError, ValueError) as e:
            self.say(f"error: {e}")
            return
        self.pending.append((image, self.save_image(image, "user")))
        self.say(f"(attached {arg}; it goes with your next message)")

    def set(self, arg: str) -> None:
        import yaml

        from omni.config import Config, ConfigError, from_dict
        from omni.inference.generate import check_config

        if not arg:
            self.say(" ".join(f"{k}={v}" for k, v in dataclasses.asdict(self.cfg).items()))
            return
        changes = {}
        for item in arg.split():
            key, eq, raw = item.partition("=")
            if not eq:
                self.say(f"error: {item!r} is not key=value (e.g. /set cfg=3 steps=50)")
                return
            changes[ALIASES.get(key, key)] = yaml.safe_load(raw)
        try:
            new = from_dict({"generation": changes}, base=Config(generation=dataclasses.replace(self.cfg))).generation
            check_config(new, new.mode)
        except (ConfigError, ValueError) as e:
            self.say(f"error: {e}")
            return
        if "seed" in changes:
            self.seed = new.seed
        self.cfg = new
        self.say("(" + " ".join(f"{k}={getattr(new, k)}" for k in changes) + ")")

    def save(self, arg: str) -> None:
        from omni.utils import atomic_write_text

        if not arg:
            self.say("usage: /save FILE.md")
            return
        path = Path(arg).expanduser()
        try:
            atomic_write_text(path, self.transcript(path.parent))
        except OSError as e:
            self.say(f"error: cannot write {arg}: {e}")
            return
        self.say(f"(transcript saved: {path})")

    def transcript(self, base: Path) -> str:
        s = self.cfg
        lines = [
            "# omni chat", "",
            f"checkpoint: `{getattr(self.model, 'checkpoint_path', None)}`  ",
            (f"settings: sampler={s.sampler} steps={s.image_steps} cfg={s.cfg_scale} image_cfg={s.image_cfg_scale} "
             f"temperature={s.temperature} top_k={s.top_k} top_p={s.top_p} image_temperature={s.image_temperature} "
             f"seed={self.seed}"), "",
        ]
        for turn in self.history:
            lines += [f"**{turn.role}:**", ""]
            paths = iter(turn.paths)
            for seg in turn.segments:
                if isinstance(seg, str):
                    lines += [seg, ""]
                else:
                    link = os.path.relpath(Path(next(paths)).resolve(), base.resolve())
                    lines += [f"![image]({link})", ""]
        return "\n".join(lines)

    # answering -------------------------------------------------------------------------------
    def user_turn(self, text: str) -> Turn | None:
        """The user's message with /image attachments first and <image:PATH> placed inline."""
        segments: list = [im for im, _ in self.pending]
        paths = [p for _, p in self.pending]
        pos = 0
        for m in INLINE_IMAGE.finditer(text):
            try:
                image = load_image(m.group(1).strip())
            except (OSError, ValueError) as e:
                self.say(f"error: {e} (message not sent)")
                return None
            if text[pos:m.start()].strip():
                segments.append(text[pos:m.start()].strip())
            segments.append(image)
            paths.append(self.save_image(image, "user"))
            pos = m.end()
        if text[pos:].strip():
            segments.append(text[pos:].strip())
        return Turn("user", segments, paths)

    def fit_history(self, turn: Turn, mode: str) -> list | None:
        """The prompt for `turn`, dropping the oldest turns (with a notice) until it fits.

        The message alone is measured first: one that cannot fit even without history is refused
        with the number of positions to cut, and the history is kept."""
        from omni.inference.prompts import context_length, prompt_length

        ctx = context_length(self.model)
        image_room = self.model.image_tokenizer.num_tokens + 2
        need = image_room if mode == "image" else 1
        alone = prompt_length(self.model, chat_prompt(self.model.tokenizer, [turn]))
        if alone + need > ctx:
            over = alone + need - ctx
            self.say(f"error: your message takes {alone} positions and the context holds {ctx} (an answer needs "
                     f"{need} more); shorten it by at least {over} tokens (about {max(1, over * 3 // 4)} words). "
                     "The conversation is kept")
            return None
        reserve = image_room if mode == "image" else min(self.cfg.max_new_tokens, ctx // 2)
        dropped = 0
        while True:
            prompt = chat_prompt(self.model.tokenizer, self.history + [turn])
            n = prompt_length(self.model, prompt)
            if n + reserve <= ctx or not self.history:
                break
            self.history.pop(0)
            dropped += 1
            while self.history and self.history[0].role != "user":
                self.history.pop(0)
                dropped += 1
        if dropped:
            self.say(f"(history too long for the {ctx}-position context: dropped the {dropped} oldest turns)")
        return prompt

    def last_image(self) -> tuple[Image.Image, str] | None:
        """The conversation's latest picture (drawn or attached) and its saved path."""
        for turn in reversed(self.history):
            pictures = [s for s in turn.segments if not isinstance(s, str)]
            if pictures:
                return pictures[-1], turn.paths[len(pictures) - 1]
        return None

    def edit(self, text: str, turn: Turn | None = None) -> None:
        """Edit the message's one attached picture, or else the conversation's last one: the
        prompt is [picture, instruction] alone (no history), answered with one picture."""
        from omni.inference.prompts import check_edit_image, context_length, edit_prompt, prompt_length

        turn = turn or self.user_turn(text)
        if turn is None:
            return
        attached = list(zip([s for s in turn.segments if not isinstance(s, str)], turn.paths))
        if len(attached) > 1:
            self.say(f"error: an edit changes one picture, and this message has {len(attached)}; attach only the "
                     "one to edit (the message was not sent)")
            return
        source = attached[0] if attached else self.last_image()
        if source is None:
            self.say("there is no picture to edit yet: attach one with /image PATH (or <image:PATH>), or draw one "
                     "with /draw TEXT first")
            return
        instruction = " ".join(s for s in turn.segments if isinstance(s, str))
        try:
            check_edit_image(source[0], source[1])
        except ValueError as e:
            self.say(f"error: {e} (the message was not sent and the attachment dropped)")
            self.pending.clear()
            return
        prompt = edit_prompt(source[0], instruction)
        n, ctx = prompt_length(self.model, prompt), context_length(self.model)
        if n + self.model.image_tokenizer.num_tokens + 2 > ctx:
            self.say(f"error: the instruction is too long for the {ctx}-position context with its picture; shorten it")
            return
        if not attached:
            self.say(f"(editing the last picture: {source[1]}; /draw draws a new one)")
        self.pending.clear()
        self._answer(turn, prompt, "image")

    def ask(self, text: str, mode: str | None) -> None:
        turn = self.user_turn(text)
        if turn is None:
            return
        if mode is None and conversation_edit([*self.history, turn]) is not None:
            return self.edit(text, turn)
        mode = mode or self.cfg.mode
        prompt = self.fit_history(turn, mode)
        if prompt is None:
            return  # attachments stay pending for the shortened message
        self.pending.clear()
        self._answer(turn, prompt, mode)

    def _answer(self, turn: Turn, prompt: list, mode: str) -> None:
        """Generate the answer to `prompt`, stream it, and record the two turns."""
        from omni.inference.generate import generate

        events = ChatEvents(self)
        previous = signal.signal(signal.SIGINT, lambda *_: setattr(events, "cancelled", True))
        self.write("omni> ")
        try:
            result = generate(self.model, [prompt], self.cfg, seeds=[self.seed + self.answers], mode=mode,
                              events=events)[0]
        finally:
            signal.signal(signal.SIGINT, previous)
            if events.bar is not None:
                events.bar.close()
        self.answers += 1
        if result.finish_reason == "cancelled":
            self.say("\n[cancelled]")
            return
        note = "" if result.finish_reason == "eos" else f" [stopped: {result.finish_reason}]"
        self.say(note)
        self.history += [turn, Turn("assistant", result.segments, events.paths)]


def repl(session: ChatSession) -> int:
    """Read lines until /quit or end of input. Ctrl-C at the prompt only clears the line, and an
    error while answering is reported without ending the session."""
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    session.say("omni chat: type a message, or /help for commands")
    if not has_chat_template(session.model.tokenizer):
        session.say("(this model reads each message on its own; a question about the last picture or an edit of it "
                    "is sent with that picture)")
    while True:
        try:
            line = input("you> ")
        except EOFError:
            session.say("")
            return 0
        except KeyboardInterrupt:
            session.say("\n(Ctrl-C: type /quit to leave)")
            continue
        try:
            if not session.handle(line):
                return 0
        except KeyboardInterrupt:
            session.say("\n[cancelled]")
        except Exception as e:  # noqa: BLE001  (keep the session alive; say what went wrong)
            session.say(f"\nerror: {type(e).__name__}: {e}")
