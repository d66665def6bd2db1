"""The OpenAI-compatible HTTP judge, against a small local server started by the test."""

from __future__ import annotations

import base64
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from omni.eval.judges.http import HTTPJudge, Rubric, judge_aspects, parse_heading_score, parse_json_scores


class FakeJudgeServer:
    """Answers POST /v1/chat/completions with queued replies; records every request."""

    def __init__(self):
        self.requests: list[dict] = []
        self.replies: list[tuple[int, str]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(
                    {"path": self.path, "auth": self.headers.get("Authorization"), "body": body}
                )
                status, content = outer.replies.pop(0) if outer.replies else (200, '{"score": 5}')
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]})
                if status != 200:
                    payload = json.dumps({"error": content})
                data = payload.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def server():
    with FakeJudgeServer() as s:
        yield s


RUBRIC = Rubric("test-rubric", "Score it.", ("clarity", "image-text coherence"), 0, 5, parse_json_scores)


def test_request_carries_model_key_rubric_and_images(server, monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", "sekret")
    judge = HTTPJudge(server.url, "judge-model-7b", api_key_env="MY_JUDGE_KEY")
    server.replies.append(
        (200, 'Here you go:\n```json\n{"Clarity": 4, "Image-Text Coherence": {"Score": 3}}\n```')
    )
    image = Image.new("RGB", (8, 8), (220, 40, 40))
    scores = judge_aspects(judge, RUBRIC, ["INPUT:", "draw a red square", "OUTPUT:", image])
    assert scores["clarity"] == 4.0 and scores["image-text coherence"] == 3.0
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sekret"
    body = req["body"]
    assert body["model"] == "judge-model-7b" and body["temperature"] == 0.0
    assert body["messages"][0] == {"role": "system", "content": "Score it."}
    blocks = body["messages"][1]["content"]
    assert [b["type"] for b in blocks] == ["text", "text", "text", "image_url"]
    url = blocks[3]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert decoded.size == (8, 8) and decoded.convert("RGB").getpixel((3, 3)) == (220, 40, 40)
    assert judge.identity()["model"] == "judge-model-7b" and "sekret" not in json.dumps(judge.identity())


def test_transient_errors_are_retried_and_client_errors_explained(server, monkeypatch):
    monkeypatch.delenv("OMNI_JUDGE_API_KEY", raising=False)
    judge = HTTPJudge(server.url, "m", retries=2)
    monkeypatch.setattr("omni.eval.judges.http.time.sleep", lambda s: None)
    server.replies += [(503, "busy"), (200, "### Feedback\nfine\n### Score\n5")]
    rubric = Rubric("mmie", "sys", ("score",), 0, 6, parse_heading_score)
    assert judge_aspects(judge, rubric, ["q"]) == {
        "score": 5.0,
        "_judge_reply": "### Feedback\nfine\n### Score\n5",
    }
    assert len(server.requests) == 2 and server.requests[0]["auth"] is None
    server.replies.append((401, "bad key"))
    with pytest.raises(RuntimeError, match="HTTP 401.*OMNI_JUDGE_API_KEY"):
        judge.complete("sys", ["q"])


def test_unreadable_or_out_of_range_replies_are_not_scores(server):
    judge = HTTPJudge(server.url, "m")
    server.replies += [(200, "I refuse to grade this."), (200, '{"clarity": 9, "image-text coherence": 2}')]
    for _ in range(2):
        scores = judge_aspects(judge, RUBRIC, ["x"])
        assert scores["clarity"] is None and scores["image-text coherence"] is None
        assert "_judge_error" in scores
    assert judge_aspects(None, RUBRIC, ["x"]) == {"clarity": None, "image-text coherence": None}


def test_bad_url_is_refused_early():
    with pytest.raises(ValueError, match="http://"):
        HTTPJudge("localhost:8000/v1", "m")
