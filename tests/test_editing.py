"""Editing wherever a user meets the model: `omni generate --image ... --edit`, `omni chat` (/edit,
an edit-like message after a drawing), the HTTP schema; and the bad inputs' messages.

The model is the tiny preset trained here for a few seconds on recolouring documents
`[square of colour A] "make the square B" [square of colour B]`, with the instruction dropped
from some of them, so the checkpoint has seen the edit layout and image-guided CFG's streams.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import TINY
from PIL import Image, ImageDraw

from omni.cli import main
from omni.config import load_config
from omni.inference.chat import ChatSession, looks_like_edit
from omni.layout import ImageSegment, TextSegment, layout
from omni.models.model import OmniModel

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}


def scene(colour: str, x: int, y: int, size: int = 32) -> Image.Image:
    im = Image.new("RGB", (size, size), (0, 0, 0))
    s = size // 32
    ImageDraw.Draw(im).rectangle([x * s, y * s, (x + 11) * s, (y + 11) * s], fill=COLOURS[colour])
    return im


def edit_docs(model, n: int, rng: random.Random) -> list:
    tok, enc = model.tokenizer, model.image_tokenizer
    docs = []
    for _ in range(n):
        a, b = rng.sample(sorted(COLOURS), 2)
        x, y = rng.randrange(0, 20), rng.randrange(0, 20)
        src, tgt = enc.encode([scene(a, x, y), scene(b, x, y)])  # (N, d) each
        text = [] if rng.random() < 0.2 else [TextSegment(tok.encode(f"make the square {b}"), loss=False)]
        docs.append([ImageSegment(src, loss=False), *text, ImageSegment(tgt)])
    return docs


@pytest.fixture(scope="module")
def ckpt(tokenizer_dir, tmp_path_factory):
    cfg = load_config("tiny", [f"model.tokenizer={tokenizer_dir}", *TINY, "generation.image_steps=4",
                               "generation.max_new_tokens=8", "generation.cfg_scale=2.0", "generation.sampler=euler",
                               "generation.image_temperature=0.5"])
    torch.manual_seed(0)
    model = OmniModel.from_config(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    rng = random.Random(0)
    losses = []
    for _ in range(60):
        batch = layout([[d] for d in edit_docs(model, 8, rng)], model.special)
        loss = model(batch)["loss"]  # the image loss: no text is trained here
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10]), losses  # it learned something of the edits
    model.eval()
    model.run_config = cfg
    path = tmp_path_factory.mktemp("edit") / "ckpt"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pics(tmp_path_factory):
    d = tmp_path_factory.mktemp("pics")
    scene("red", 10, 10).save(d / "red.png")
    scene("red", 10, 10, size=64).save(d / "red64.png")
    Image.new("RGB", (48, 40), (40, 170, 60)).save(d / "wide.png")
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    return d


def omni(capsys, *argv) -> tuple[int, str, str]:
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = main(list(argv))
    finally:
        torch.set_num_threads(old)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_generate_edits_an_image(ckpt, pics, tmp_path, capsys):
    rc, out, err = omni(capsys, "generate", "--ckpt", str(ckpt), "--image", str(pics / "red.png"), "--prompt",
                        "make the square blue", "--mode", "image", "--image-cfg-scale", "1.5", "--json", "--out",
                        str(tmp_path), "--seed", "3")
    assert rc == 0, err
    record = json.loads(out)
    assert [s["type"] for s in record["segments"]] == ["image"]
    with Image.open(record["segments"][0]["path"]) as im:
        assert im.size == (32, 32)
    s = record["settings"]
    assert s["image_cfg_scale"] == 1.5 and s["cfg_scale"] == 2.0 and s["mode"] == "image" and s["seed"] == 3
    # --edit says the same explicitly; a square picture of another size is resized, with a note.
    rc, out, err = omni(capsys, "generate", "--ckpt", str(ckpt), "--image", str(pics / "red64.png"), "--prompt",
                        "make the square green", "--edit", "--json", "--out", str(tmp_path / "b"))
    assert rc == 0, err
    assert "red64.png' is 64x64; the model reads 32x32 pictures, so it was resized" in err
    record = json.loads(out)
    assert [s["type"] for s in record["segments"]] == ["image"] and record["settings"]["image_cfg_scale"] is None


@pytest.mark.parametrize("args, message", [
    (["--prompt", "make the square blue", "--image-cfg-scale", "1.5"],
     "--image-cfg-scale 1.5 guides by the picture being edited, but no picture was given: add --image IN.png"),
    (["--prompt", "make the square blue", "--edit"],
     "--edit needs exactly one picture to edit and got no picture: give it with --image IN.png"),
    (["--prompt", "make the square blue", "--edit", "--image", "{pics}/wide.png"],
     "wide.png' is 48x40; an edit keeps the whole picture and the model reads square pictures: crop or pad"),
    (["--prompt", "make the square blue", "--mode", "image", "--image", "{pics}/corrupt.png"],
     "corrupt.png' ("),  # then PIL's reason
    (["--prompt", "make the square blue", "--edit", "--image", "{pics}/corrupt.png"],
     "; give an image file that opens (PNG, JPEG, ...)"),
    (["--prompt", "now <image> blue", "--edit", "--image", "{pics}/red.png"],
     "--edit reads the picture before the instruction"),
    (["--prompt", "make it blue", "--edit", "--mode", "text", "--image", "{pics}/red.png"],
     "--edit draws one picture, but --mode is text: drop --mode"),
])
def test_generate_bad_edit_inputs_get_one_line(ckpt, pics, tmp_path, capsys, args, message):
    argv = [a.format(pics=pics) for a in args]
    rc, out, err = omni(capsys, "generate", "--ckpt", str(ckpt), "--out", str(tmp_path), *argv)
    assert rc == 2 and out == ""
    assert err.startswith("omni: error: ") and message in err and err.count("\n") == 1, err


class Spy:
    """Records the prompts and modes the chat sends to generate()."""

    def __init__(self, monkeypatch):
        import omni.inference.generate as g

        self.calls, real = [], g.generate
        monkeypatch.setattr(g, "generate", lambda model, prompts, cfg, **kw: (
            self.calls.append((prompts[0], kw["mode"], cfg)) or real(model, prompts, cfg, **kw)))


def session(ckpt, tmp_path):
    import io

    from omni.inference.generate import generation_config, load

    model = load(str(ckpt), "cpu")
    out = io.StringIO()
    return ChatSession(model, generation_config(model), tmp_path / "chat", 0, preview=False, out=out), out


def test_chat_edits_the_last_drawn_picture(ckpt, tmp_path, monkeypatch):
    spy = Spy(monkeypatch)
    s, out = session(ckpt, tmp_path)
    s.handle("/edit make the square blue")
    assert "there is no picture to edit yet: attach one with /image PATH" in out.getvalue() and not spy.calls
    s.handle("/draw a red square")
    drawn = s.history[-1].segments[-1]
    assert isinstance(drawn, Image.Image)
    s.handle("/set image_cfg=1.5")
    s.handle("now make it blue")  # reads as an edit: the drawing is the source, before the instruction
    prompt, mode, cfg = spy.calls[-1]
    assert mode == "image" and cfg.image_cfg_scale == 1.5
    assert len(prompt) == 2 and prompt[0] is drawn and prompt[1] == "now make it blue"
    edited = s.history[-1].segments
    assert s.history[-1].role == "assistant" and [type(x) for x in edited] == [Image.Image]
    assert "(editing the last picture: " in out.getvalue()
    s.handle("/edit move it to the left")  # /edit takes the newest picture: the edited one
    assert spy.calls[-1][0][0] is edited[0] and spy.calls[-1][1] == "image"
    assert isinstance(s.history[-1].segments[0], Image.Image)


def test_chat_edits_an_attached_picture(ckpt, pics, tmp_path, monkeypatch):
    spy = Spy(monkeypatch)
    s, out = session(ckpt, tmp_path)
    s.handle(f"/image {pics / 'red.png'}")
    s.handle("make the square green")
    prompt, mode, _ = spy.calls[-1]
    assert mode == "image" and isinstance(prompt[0], Image.Image) and prompt[1] == "make the square green"
    assert prompt[0].tobytes() == Image.open(pics / "red.png").convert("RGB").tobytes()
    assert isinstance(s.history[-1].segments[0], Image.Image)
    s.handle(f"/edit <image:{pics / 'wide.png'}> make it blue")  # a crop would cut the scene: refused
    assert "is 48x40; an edit keeps the whole picture" in out.getvalue() and len(spy.calls) == 1
    s.handle("make a red square")  # a new picture, not an edit: the message alone is the prompt
    prompt, mode, _ = spy.calls[-1]
    assert mode == "auto" and prompt == ["make a red square"]


@pytest.mark.parametrize("text, edit", [
    ("now move it to the left", True), ("make the circle blue", True), ("Please remove the square.", True),
    ("can you swap them?", True), ("ok, add a green triangle", True), ("make a red circle", False),
    ("what color is the square?", False), ("draw a blue square", False), ("hello", False),
])
def test_edit_like_messages(text, edit):
    assert looks_like_edit(text) is edit


def test_http_schema_accepts_image_cfg_scale():
    from omni.serve.schemas import Limits, RequestError, parse_request

    body = {"model": "omni", "messages": [{"role": "user", "content": "make it blue"}], "image_cfg_scale": 1.5}
    assert parse_request(body, Limits()).overrides["image_cfg_scale"] == 1.5
    with pytest.raises(RequestError, match="out of range"):
        parse_request({**body, "image_cfg_scale": -1}, Limits())


def test_http_edit_records_both_scales(ckpt, pics):
    """POST /v1/chat/completions with the picture before the instruction and image_cfg_scale."""
    import base64

    pytest.importorskip("httpx")
    testclient = pytest.importorskip("fastapi.testclient")

    import omni
    from omni.serve.app import create_app

    model = omni.load(ckpt, device="cpu")
    picture = "data:image/png;base64," + base64.b64encode((pics / "red.png").read_bytes()).decode()
    body = {"model": "tiny", "mode": "image", "seed": 4, "image_cfg_scale": 1.5, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": picture}}, {"type": "text", "text": "make the square blue"}]}]}
    with testclient.TestClient(create_app(model, model_name="tiny")) as client:  # runs the app's lifespan (its worker)
        r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert [p["type"] for p in answer["choices"][0]["message"]["content"]] == ["image_url"]
    settings = answer["omni"]["settings"]
    assert settings["image_cfg_scale"] == 1.5 and settings["cfg_scale"] == 2.0 and settings["mode"] == "image"
