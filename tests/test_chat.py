"""`omni chat`: a real session through a pseudo-terminal, plus the pieces that are hard to time
through one (Ctrl-C during an answer, history trimming, chat templates, previews)."""

from __future__ import annotations

import io
import os
import re
import signal

import pytest
import torch
from conftest import OMNI, TINY
from PIL import Image

from omni.config import load_config
from omni.inference.chat import ChatEvents, ChatSession, Turn, chat_prompt
from omni.inference.generate import generation_config
from omni.inference.preview import halfblock
from omni.models.model import OmniModel

pexpect = pytest.importorskip("pexpect")


@pytest.fixture(scope="module")
def model(tokenizer_dir):
    cfg = load_config("tiny", [f"model.tokenizer={tokenizer_dir}", *TINY, "generation.image_steps=2",
                               "generation.max_new_tokens=8", "generation.cfg_scale=2.0"])
    torch.manual_seed(0)
    m = OmniModel.from_config(cfg.model).eval()
    m.run_config = cfg
    return m


@pytest.fixture(scope="module")
def ckpt(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "ckpt"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("pics") / "blue.png"
    Image.new("RGB", (40, 40), (40, 80, 220)).save(path)
    return path


def test_chat_session_through_a_terminal(ckpt, picture, tmp_path):
    out = tmp_path / "imgs"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    child = pexpect.spawn(str(OMNI), ["chat", "--ckpt", str(ckpt), "--out", str(out)], cwd=str(tmp_path),
                          env=env, encoding="utf-8", timeout=180, dimensions=(50, 120))
    log = io.StringIO()
    child.logfile_read = log

    def say(line: str, expect: str) -> None:
        child.sendline(line)
        child.expect(expect)
        child.expect("you> ")

    child.expect("reads each message on its own")  # a plain-document model says how it reads a chat
    child.expect("you> ")
    say(f"/image {picture}", "attached")
    say("what color is the square?", "omni> ")
    say("/draw a red circle", r"\[image saved: ([^\]]+)\]")
    say(f"/image {tmp_path / 'missing.png'}", "does not exist")
    say("/frobnicate", "unknown command /frobnicate")
    say("/set cfg=abc", "expected a number")
    say("and now <image:" + str(picture) + "> this one?", "omni> ")
    say("/save talk.md", "transcript saved")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, log.getvalue()[-2000:]

    text = log.getvalue()
    assert "\x1b[38;2;" in text and "\u2580" in text  # an inline truecolor preview was drawn
    drawn = re.findall(r"\[image saved: ([^\]]+)\]", text)
    assert len(drawn) == 1 and Image.open(drawn[0]).size == (32, 32)
    transcript = (tmp_path / "talk.md").read_text()
    links = re.findall(r"!\[image\]\(([^)]+)\)", transcript)
    assert len(links) == 3  # two user images and the drawn one
    assert all((tmp_path / link).is_file() for link in links)
    assert transcript.count("**user:**") == 3 and transcript.count("**assistant:**") == 3
    assert "what color is the square?" in transcript and "a red circle" in transcript


def session(model, tmp_path, **overrides) -> tuple[ChatSession, io.StringIO]:
    out = io.StringIO()
    cfg = generation_config(model, **overrides)
    return ChatSession(model, cfg, tmp_path / "imgs", seed=0, preview=False, out=out), out


def test_ctrl_c_cancels_the_answer_not_the_session(model, tmp_path, monkeypatch):
    s, out = session(model, tmp_path)
    before = signal.getsignal(signal.SIGINT)  # default_int_handler; SIG_IGN under `nohup ... &`
    monkeypatch.setattr(ChatEvents, "image_token", lambda self, row, done, total: os.kill(os.getpid(), signal.SIGINT))
    s.handle("/draw a blue square")
    assert "[cancelled]" in out.getvalue()
    assert s.history == [] and not list((tmp_path / "imgs").glob("img_*.png"))
    assert signal.getsignal(signal.SIGINT) is before  # handler restored
    monkeypatch.undo()
    s.handle("/draw a blue square")
    assert len(s.history) == 2 and "image saved" in out.getvalue()


TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.mark.parametrize("template", [True, False], ids=["chat-template", "plain-documents"])
def test_long_history_drops_oldest_turns(model, tmp_path, template):
    """A chat-template model reads the conversation and drops its oldest turns to fit; a
    plain-document model reads the last message alone, so the history never crowds it out."""
    tok = model.tokenizer.hf
    old = getattr(tok, "chat_template", None)
    tok.chat_template = TEMPLATE if template else None
    try:
        s, out = session(model, tmp_path, max_new_tokens=4)
        long = "circle " * 150  # ~150 positions a turn; the tiny context holds 512
        for _ in range(4):
            assert s.handle(long)
        if template:
            assert "dropped the 2 oldest turns" in out.getvalue()
            assert 2 <= len(s.history) <= 6 and s.history[0].role == "user"
        else:
            assert "dropped" not in out.getvalue() and len(s.history) == 8
        kept = list(s.history)
        s.handle("circle " * 600)  # cannot fit even alone: refused, and the conversation is kept
        assert "shorten it by at least" in out.getvalue() and s.history == kept
    finally:
        tok.chat_template = old


def test_bad_commands_keep_going(model, tmp_path):
    s, out = session(model, tmp_path)
    assert s.handle("/nope") and s.handle("/image") and s.handle("/set steps") and s.handle("/draw")
    assert s.handle(f"look <image:{tmp_path / 'gone.png'}>")
    assert s.handle("/set cfg=5 steps=4 temperature=0.5") and s.cfg.cfg_scale == 5.0 and s.cfg.image_steps == 4
    assert not s.handle("/quit")
    text = out.getvalue()
    for msg in ("unknown command /nope", "usage: /image", "not key=value", "usage: /draw", "message not sent"):
        assert msg in text
    assert s.history == []


def test_chat_prompt_plain_and_template(model):
    tok = model.tokenizer
    a = Image.new("RGB", (8, 8))
    turns = [Turn("user", [a, "hi there"]), Turn("assistant", ["hello"]), Turn("user", ["more"])]
    # Plain documents: the last user message alone (earlier turns are a document the model never
    # saw), with a trailing assistant turn that the answer continues; no user turn: everything.
    assert chat_prompt(tok, turns) == ["more"]
    assert chat_prompt(tok, turns[:2]) == [a, "hi there", "hello"]
    assert chat_prompt(tok, [Turn("system", ["be brief"]), *turns[:1]]) == [a, "hi there"]
    assert chat_prompt(tok, [Turn("assistant", ["a red"])]) == ["a red"]
    # A question about what was shown gets the latest picture in front of it (the question format);
    # a new request or a question about nothing in particular does not.
    b = Image.new("RGB", (8, 8), (0, 0, 255))
    talk = [*turns[:2], Turn("user", ["draw a blue square"]), Turn("assistant", [b])]
    assert chat_prompt(tok, [*talk, Turn("user", ["what color is the square?"])]) == [b, "what color is the square?"]
    assert chat_prompt(tok, [*talk, Turn("user", ["how many shapes are there?"])])[0] is b
    assert chat_prompt(tok, [*talk, Turn("user", ["what can you do?"])]) == ["what can you do?"]
    assert chat_prompt(tok, [*talk, Turn("user", ["draw the square bigger"])]) == ["draw the square bigger"]
    assert chat_prompt(tok, [*talk, Turn("user", [a, "what is it?"])]) == [a, "what is it?"]  # its own picture
    old = getattr(tok.hf, "chat_template", None)
    tok.hf.chat_template = TEMPLATE
    try:
        got = chat_prompt(tok, turns)
    finally:
        tok.hf.chat_template = old
    assert got == ["<user>", a, "hi there\n<assistant>hello\n<user>more\n<assistant>"]


def test_halfblock_preview_colours():
    im = Image.new("RGB", (4, 4), (255, 0, 0))
    im.paste((0, 0, 255), (0, 2, 4, 4))
    lines = halfblock(im, width=4).split("\n")
    assert len(lines) == 2 and all(line.count("\u2580") == 4 for line in lines)
    assert "\x1b[38;2;255;0;0m\x1b[48;2;255;0;0m" in lines[0]
    assert "\x1b[38;2;0;0;255m\x1b[48;2;0;0;255m" in lines[1]
