"""`omni serve`: the OpenAI-compatible API on a tiny checkpoint, through the official `openai`
client and raw HTTP: formats, streaming, same-seed answers under concurrency, limits, bad input."""

from __future__ import annotations

import base64
import contextlib
import io
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import save_tiny_checkpoint
from PIL import Image

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

KEY = "sk-test-key"
NAME = "tiny"


@pytest.fixture(scope="module")
def ckpt(tokenizer_dir, tmp_path_factory):
    return save_tiny_checkpoint(tokenizer_dir, tmp_path_factory.mktemp("serve") / NAME, "generation.image_steps=2",
                                "generation.max_new_tokens=24", "generation.cfg_scale=2.0")


@pytest.fixture(scope="module")
def model(ckpt):
    import omni

    return omni.load(ckpt, device="cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(model, **kwargs):
    """Run the app on 127.0.0.1 in a thread; yield its base URL."""
    from omni.serve.app import create_app
    from omni.serve.schemas import Limits

    limits = Limits(**kwargs.pop("limits", {}))
    app = create_app(model, model_name=NAME, limits=limits, **kwargs)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def url(model):
    with serving(model, api_key=KEY) as base:
        yield base


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)


def data_url(image: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def decode(url: str) -> np.ndarray:
    assert url.startswith("data:image/png;base64,")
    with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def part(p, key):  # content parts come back as dicts (the client does not type them)
    return p[key] if isinstance(p, dict) else getattr(p, key)


BLUE = Image.new("RGB", (40, 40), (40, 80, 220))


def test_health_models_and_page(url):
    h = httpx.get(f"{url}/health").json()
    assert h["status"] == "ok" and h["model"] == NAME and h["max_running"] == 8
    models = client(url).models.list()
    assert [m.id for m in models.data] == [NAME]
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and "<textarea" in page.text and "/v1/chat/completions" in page.text


def test_openai_client_non_streaming(url):
    c = client(url)
    r = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "draw a red circle"}],
                                  seed=5, extra_body={"mode": "image", "image_steps": 2})
    content = r.choices[0].message.content
    kinds = [part(p, "type") for p in content]
    assert kinds.count("image_url") == 1
    pixels = decode(part(content[kinds.index("image_url")], "image_url")["url"])
    assert pixels.shape == (32, 32, 3)
    assert r.model_extra["omni"]["settings"]["seed"] == 5
    assert r.model_extra["omni"]["settings"]["mode"] == "image"
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens >= 16

    # text answer to a question about an attached image
    r = c.chat.completions.create(model=NAME, seed=1, max_tokens=6, extra_body={"mode": "text"}, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(BLUE)}},
                                     {"type": "text", "text": "what color is the square?"}]}])
    content = r.choices[0].message.content
    assert [part(p, "type") for p in content] == ["text"] and part(content[0], "text")
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 6 and r.usage.prompt_tokens > 18  # the image took 18 positions


def collect_stream(c, **kwargs):
    """Text and images of a streamed answer, in order, plus the events seen."""
    parts, events, finish, omni = [], [], None, None
    for ch in c.chat.completions.create(stream=True, **kwargs):
        if not ch.choices:
            continue
        d = ch.choices[0].delta
        extra = d.model_extra or {}
        if d.content:
            events.append("text")
            if parts and parts[-1][0] == "text":
                parts[-1] = ("text", parts[-1][1] + d.content)
            else:
                parts.append(("text", d.content))
        if "image_start" in extra:
            events.append(("image_start", extra["image_start"]["tokens"]))
        if "image_progress" in extra:
            events.append(("progress", extra["image_progress"]["done"]))
        if "image" in extra:
            events.append("image")
            parts.append(("image", decode(extra["image"]["image_url"]["url"])))
        if ch.choices[0].finish_reason:
            finish, omni = ch.choices[0].finish_reason, ch.model_extra.get("omni")
    return parts, events, finish, omni


def test_openai_client_streaming_matches_non_streaming(url):
    c = client(url)
    ask = {"model": NAME, "seed": 11, "messages": [{"role": "user", "content": "a green triangle"}],
               "extra_body": {"mode": "image"}}
    parts, events, finish, omni = collect_stream(c, **ask)
    assert events[0] == ("image_start", 16)
    assert [e[1] for e in events if e[0] == "progress"] == list(range(1, 17))
    assert "image" in events and finish == "stop" and omni["settings"]["seed"] == 11
    whole = c.chat.completions.create(**ask).choices[0].message.content
    images = [decode(part(p, "image_url")["url"]) for p in whole if part(p, "type") == "image_url"]
    streamed = [p for k, p in parts if k == "image"]
    assert len(images) == len(streamed) == 1
    np.testing.assert_array_equal(images[0], streamed[0])

    ask = {"model": NAME, "seed": 2, "max_tokens": 10, "messages": [{"role": "user", "content": "how many circles?"}],
               "extra_body": {"mode": "text"}}
    parts, events, finish, _ = collect_stream(c, **ask)
    whole = c.chat.completions.create(**ask).choices[0].message.content
    assert [("text", part(p, "text")) for p in whole] == parts and events.count("text") >= 1


def ask_raw(url: str, body: dict) -> dict:
    r = httpx.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


MIX = [
    {"messages": [{"role": "user", "content": "what color is the square?"}], "mode": "text", "max_tokens": 12},
    {"messages": [{"role": "user", "content": "draw a red circle"}], "mode": "image"},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(BLUE)}},
                                               {"type": "text", "text": "this is"}]}], "mode": "text"},
    {"messages": [{"role": "user", "content": "the circle moves to the right."}], "mode": "auto",
     "max_tokens": 40, "temperature": 0.8},
]


def test_an_edit_in_a_conversation_redraws_its_last_picture(url, model):
    """A from-scratch model reads the last message; one that reads as an edit gets the picture it
    attaches, or else the conversation's latest, in front of it and is drawn as one picture."""
    from omni.serve.engine import Turn, conversation_prompt

    def prompt_of(turns, mode):
        return conversation_prompt(model.tokenizer, turns, mode)

    red, wide = Image.new("RGB", (32, 32), (200, 30, 30)), Image.new("RGB", (48, 40))
    talk = [Turn("user", ["draw a red square"]), Turn("assistant", [red]), Turn("user", ["now make it blue"])]
    assert prompt_of(talk, "auto") == ([red, "now make it blue"], "image")
    assert prompt_of(talk, "text") == (["now make it blue"], "text")  # asked for words: no edit
    assert prompt_of([*talk[:2], Turn("user", [BLUE, "remove the square"])], "auto") == \
        ([BLUE, "remove the square"], "image")  # the attached picture, not the earlier one
    assert prompt_of([*talk[:2], Turn("user", ["draw a blue circle"])], "auto") == \
        (["draw a blue circle"], "auto")  # a new request: the message alone
    assert prompt_of([talk[2]], "auto") == (["now make it blue"], "auto")  # nothing to edit
    with pytest.raises(ValueError, match="48x40"):
        prompt_of([Turn("user", [wide, "make it blue"])], "auto")

    messages = [{"role": "user", "content": "draw a red square"},
                {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": data_url(red)}}]},
                {"role": "user", "content": "now make it blue"}]
    r = ask_raw(url, {"model": NAME, "messages": messages, "seed": 3, "image_steps": 2})
    content = r["choices"][0]["message"]["content"]
    assert [p["type"] for p in content] == ["image_url"] and r["omni"]["settings"]["mode"] == "image"
    messages[1]["content"][0]["image_url"]["url"] = data_url(wide)
    bad = httpx.post(f"{url}/v1/chat/completions", json={"model": NAME, "messages": messages},
                     headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_image"
    assert "48x40" in bad.json()["error"]["message"]


def test_same_seed_same_answer_alone_and_under_concurrency(url):
    def run(i: int) -> dict:
        return ask_raw(url, {"model": NAME, "seed": 100 + i, **MIX[i % len(MIX)]})

    alone = [run(i) for i in range(4)]
    with ThreadPoolExecutor(8) as pool:
        crowd = list(pool.map(run, range(8)))
    for i in range(8):
        a, b = alone[i % 4]["choices"][0]["message"]["content"], crowd[i]["choices"][0]["message"]["content"]
        if i >= 4:  # same request and settings, another seed: still a valid answer of the same kinds
            continue
        assert [p["type"] for p in a] == [p["type"] for p in b], i
        for pa, pb in zip(a, b):
            if pa["type"] == "text":
                assert pa["text"] == pb["text"], i
            else:  # pixels from the same image tokens; float noise may move a value by one step at most
                diff = np.abs(decode(pa["image_url"]["url"]).astype(int) - decode(pb["image_url"]["url"]).astype(int))
                assert diff.max() <= 1, i
    assert [p["type"] for p in crowd[1]["choices"][0]["message"]["content"]].count("image_url") == 1


def noise_png_b64(size=(8, 8)) -> str:
    return base64.b64encode(bytes(range(64)) * 4).decode()


def bad_requests(url: str) -> list[tuple[str, dict, int, str]]:
    """(what, httpx.request kwargs, status, error code): one kind of bad request each."""
    ok_msg = [{"role": "user", "content": "hi"}]
    auth = {"Authorization": f"Bearer {KEY}"}
    post = f"{url}/v1/chat/completions"

    def body(**kw):
        return {"method": "POST", "url": post, "headers": auth, "json": {"model": NAME, "messages": ok_msg, **kw}}

    def image(u: str):
        return body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": u}}]}])

    big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (700, 700, 3), dtype=np.uint8))
    return [
        ("malformed JSON", {"method": "POST", "url": post, "headers": auth, "content": b'{"model": "tiny", '}, 400,
         "invalid_json"),
        ("body not an object", {"method": "POST", "url": post, "headers": auth, "json": [1, 2]}, 400, "invalid_body"),
        ("no messages", body(messages=None), 400, "invalid_messages"),
        ("empty messages", body(messages=[]), 400, "invalid_messages"),
        ("message not an object", body(messages=["hi"]), 400, "invalid_messages"),
        ("unknown role", body(messages=[{"role": "wizard", "content": "hi"}]), 400, "invalid_role"),
        ("content a number", body(messages=[{"role": "user", "content": 3}]), 400, "invalid_content"),
        ("empty content", body(messages=[{"role": "user", "content": "  "}]), 400, "empty_content"),
        ("unknown part type", body(messages=[{"role": "user", "content": [{"type": "audio"}]}]), 400, "invalid_part"),
        ("text part not a string", body(messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}]), 400,
         "invalid_type"),
        ("no user message", body(messages=[{"role": "system", "content": "be brief"}]), 400, "invalid_messages"),
        ("image_url without url", body(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), 400,
         "invalid_image"),
        ("bad base64", image("data:image/png;base64,@@not base64@@"), 400, "invalid_base64"),
        ("not a data URL", image("ftp://example.com/a.png"), 400, "invalid_image_url"),
        ("non-image media type", image("data:text/plain;base64,aGVsbG8="), 400, "invalid_image_type"),
        ("non-image data", image("data:image/png;base64," + noise_png_b64()), 400, "invalid_image"),
        ("remote URL refused", image("https://example.com/cat.png"), 400, "remote_image_refused"),
        ("oversized image bytes", image(data_url(big)), 413, "image_too_large"),
        ("too many pixels", image(data_url(Image.new("RGB", (3000, 10), 0))), 413, "image_too_large"),
        ("wrong API key", {**body(), "headers": {"Authorization": "Bearer nope"}}, 401, "invalid_api_key"),
        ("missing API key", {**body(), "headers": {}}, 401, "missing_api_key"),
        ("unknown model", body(model="gpt-4"), 404, "model_not_found"),
        ("unknown field", body(cfg=3), 400, "unknown_field"),
        ("temperature a string", body(temperature="hot"), 400, "invalid_type"),
        ("top_p out of range", body(top_p=0), 400, "invalid_value"),
        ("max_tokens zero", body(max_tokens=0), 400, "invalid_value"),
        ("bad mode", body(mode="video"), 400, "invalid_value"),
        ("too many image steps", body(image_steps=10**6), 400, "invalid_value"),
        ("negative seed", body(seed=-1), 400, "invalid_value"),
        ("n > 1", body(n=2), 400, "unsupported"),
        ("stream not a bool", body(stream="yes"), 400, "invalid_type"),
        ("prompt too long", body(messages=[{"role": "user", "content": "red circle " * 400}]), 400, "prompt_too_long"),
        ("body too large", {"method": "POST", "url": post, "headers": auth, "content": b" " * (4 << 20)}, 413,
         "body_too_large"),
        ("unknown route", {"method": "GET", "url": f"{url}/v2/things"}, 404, "not_found"),
        ("wrong method", {"method": "GET", "url": post}, 405, "method_not_allowed"),
    ]


def test_bad_requests_get_4xx_while_good_ones_succeed(model):
    limits = {"max_image_bytes": 1 << 20, "max_image_pixels": 10_000, "max_body_bytes": 3 << 20}
    with serving(model, api_key=KEY, limits=limits) as url:
        good = []
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(ask_raw, url, {"model": NAME, "seed": i, **MIX[i]}) for i in range(4)]
            kinds = bad_requests(url)
            seen = {}
            for what, request, status, code in kinds:
                r = httpx.request(timeout=60, **request)
                seen[what] = (r.status_code, r.json()["error"])
                assert "Traceback" not in r.text and 'File "' not in r.text, what
            good = [f.result() for f in futures]
    wrong = {w: s for (w, _, status, code), (w2, s) in zip(kinds, seen.items()) if (status, code) != (s[0], s[1]["code"])}
    assert not wrong, wrong
    assert len(kinds) >= 20 and all(400 <= s < 500 for s, _ in seen.values())
    assert all(len(e["message"]) > 20 for _, e in seen.values())  # says what was wrong, not just "bad request"
    assert seen["unknown role"][1]["param"] == "messages[0].role"
    assert "--allow-remote-images" in seen["remote URL refused"][1]["message"]
    assert [len(g["choices"][0]["message"]["content"]) > 0 for g in good] == [True] * 4


def test_busy_server_answers_429_with_retry_after(model):
    with serving(model, limits={"max_running": 1, "max_waiting": 0}) as url:
        # Seconds of work (SLOW): 400 text tokens took ~0.30 s on a warm process, as long as the
        # wait below, and the second request sometimes found the server free.
        slow = {"model": NAME, "messages": [{"role": "user", "content": "a picture"}], **SLOW}
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(httpx.post, f"{url}/v1/chat/completions", json=slow, timeout=120)
            time.sleep(0.3)
            r = httpx.post(f"{url}/v1/chat/completions", json={**slow, "seed": 1}, timeout=60)
            assert first.result().status_code == 200
    assert r.status_code == 429 and r.json()["error"]["code"] == "server_busy"
    assert int(r.headers["Retry-After"]) >= 1


SLOW = {"mode": "image", "image_steps": 1000, "seed": 0}  # one picture of 16 tokens, 1000 steps each: seconds


def test_time_limit_stops_an_answer(model):
    with serving(model, limits={"request_timeout": 0.3}) as url:
        t = time.monotonic()
        r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "model": NAME, "messages": [{"role": "user", "content": "go"}], **SLOW})
        took = time.monotonic() - t
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["omni"]["finish_reason"] == "time_limit" and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] < 16 and took < 5


def test_disconnect_cancels_the_rows(model):
    with serving(model) as url:
        body = {"model": NAME, "messages": [{"role": "user", "content": "go"}], **SLOW, "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            while "image_progress" not in next(lines):  # drawing has begun
                pass
            assert httpx.get(f"{url}/health").json()["running"] == 1
        deadline = time.monotonic() + 10
        while httpx.get(f"{url}/health").json()["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        health = httpx.get(f"{url}/health").json()
        took = time.monotonic() - deadline + 10
    assert health["running"] == 0 and health["cancelled"] == 1 and took < 2


def test_worker_delivers_each_steps_events_together(model):
    """The worker hands the event loop one list of events per job and decode step: an image-mode
    job gets <boi> alone (the prefill step forces it; its first token is drawn the step after),
    then its 16 progress events in 16 items (one token a step), the picture and "done" with the
    last, every event in the order the sampler made it."""
    import asyncio

    from omni.serve.engine import Job, Turn, Worker, chat_prompt, default_config

    async def collect(worker: Worker, mode: str, seed: int) -> list[list[tuple]]:
        cfg = default_config(model, mode=mode)
        job = Job(id=f"t{seed}", prompt=chat_prompt(model.tokenizer, [Turn("user", ["draw"])]), cfg=cfg, mode=mode,
                  seed=seed, deadline=time.monotonic() + 60, loop=asyncio.get_running_loop())
        worker.submit(job)
        items = []
        while not items or items[-1][-1][0] not in ("done", "error"):
            items.append(await asyncio.wait_for(job.events.get(), timeout=60))
        return items

    async def main():
        worker = Worker(model, max_running=2)
        worker.start()
        try:
            return await asyncio.gather(collect(worker, "image", 1), collect(worker, "text", 2))
        finally:
            worker.stop()

    image, text = asyncio.run(main())
    assert all(isinstance(item, list) and item for item in image + text)
    kinds = [[e[0] for e in item] for item in image]
    assert kinds[0] == ["image_start"] and kinds[-1] == ["image_token", "image", "done"]
    assert all(k == ["image_token"] for k in kinds[1:-1]) and len(kinds) == 17
    assert [e[1] for item in image for e in item if e[0] == "image_token"] == list(range(1, 17))
    assert all(len(item) == 1 or item[-1][0] == "done" for item in text)  # one text delta a step
    assert text[-1][-1][0] == "done" and any(e[0] == "text" for item in text for e in item)


def test_a_taken_port_is_named_before_the_model_loads(tmp_path, capsys):
    from omni.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # the checkpoint does not exist: the port is checked first, so the answer is about the port
        assert main(["serve", "--ckpt", str(tmp_path / "none"), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in err and "--port" in err
