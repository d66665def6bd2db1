"""Model judges over an OpenAI-compatible HTTP API (vLLM, SGLang, llama.cpp server, OpenAI, ...).

Benchmarks such as InterleavedBench, OpenING, ISG-Bench and MMIE score some aspects with a
multimodal judge model and a rubric. Here a judge is anything with

    complete(system: str, content: [str | PIL.Image]) -> str      and      identity() -> dict

and `HTTPJudge` implements it with `POST {base}/chat/completions` (images as PNG data URLs).
A `Rubric` names the aspects, their scale and how to read them out of the reply. When no judge
is configured, `judge_aspects` returns None for every aspect: reported as "not computed", never 0.

The API key is read from an environment variable (default OMNI_JUDGE_API_KEY), never from the
command line, so it does not land in shell history or in results.json.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image


@dataclass(frozen=True)
class Rubric:
    """How a benchmark asks a judge: the system prompt, the aspects and their scale, the parser."""

    name: str  # e.g. "opening-7-criteria"
    system: str  # the benchmark's instructions to the judge
    aspects: tuple[str, ...]  # score names, in the benchmark's order
    low: float  # scale bounds (inclusive)
    high: float
    parse: Callable[[str, Rubric], dict[str, float]]  # reply -> {aspect: score}; raises ValueError


class HTTPJudge:
    """A judge model behind an OpenAI-compatible chat-completions endpoint."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OMNI_JUDGE_API_KEY",
        timeout: float = 120.0,
        retries: int = 3,
        max_tokens: int = 1024,
        temperature: float = 0.0,
    ):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(
                f"judge URL {base_url!r} must start with http:// or https:// (e.g. http://localhost:8000/v1)"
            )
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key_env = api_key_env
        self.timeout, self.retries = timeout, retries
        self.max_tokens, self.temperature = max_tokens, temperature

    def identity(self) -> dict[str, Any]:
        return {
            "kind": "http",
            "url": self.base_url,
            "model": self.model,
            "temperature": self.temperature,
            "api_key_env": self.api_key_env,
        }

    @staticmethod
    def content_blocks(content: Sequence[str | Image.Image]) -> list[dict[str, Any]]:
        blocks = []
        for part in content:
            if isinstance(part, str):
                blocks.append({"type": "text", "text": part})
            else:
                buf = io.BytesIO()
                part.convert("RGB").save(buf, format="PNG")
                url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
                blocks.append({"type": "image_url", "image_url": {"url": url}})
        return blocks

    def complete(self, system: str, content: Sequence[str | Image.Image]) -> str:
        """The judge's reply text. Retries transient failures (network, 429, 5xx) with backoff."""
        body = json.dumps(
            {
                "model": self.model,
                "messages": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": self.content_blocks(content)},
                ],
                "temperature": self.temperature,
                "max_tokens": self.max_tokens,
            }
        ).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        url = f"{self.base_url}/chat/completions"
        host = urllib.parse.urlparse(url).hostname or ""
        # A judge on this machine is reached directly, whatever http_proxy says.
        handlers = [urllib.request.ProxyHandler({})] if host in ("localhost", "127.0.0.1", "::1") else []
        opener = urllib.request.build_opener(*handlers)
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                req = urllib.request.Request(url, data=body, headers=headers, method="POST")
                with opener.open(req, timeout=self.timeout) as resp:
                    reply = json.loads(resp.read().decode("utf-8"))
                return str(reply["choices"][0]["message"]["content"] or "")
            except urllib.error.HTTPError as e:
                detail = e.read().decode("utf-8", "replace")[:300]
                if e.code not in (408, 429) and e.code < 500:
                    raise RuntimeError(
                        f"judge {url} answered HTTP {e.code}: {detail} "
                        f"(check --judge-model and the key in ${self.api_key_env})"
                    ) from None
                last = RuntimeError(f"HTTP {e.code}: {detail}")
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                last = e
            except (KeyError, IndexError, json.JSONDecodeError) as e:
                raise RuntimeError(f"judge {url} replied without choices[0].message.content: {e}") from None
            if attempt < self.retries:
                time.sleep(min(2.0**attempt, 10.0))
        raise RuntimeError(f"judge {url} failed after {self.retries + 1} attempts: {last}")


# --------------------------------------------------------------------------------------------
# Reading scores out of replies
# --------------------------------------------------------------------------------------------


def _key(s: str) -> str:
    return re.sub(r"[^a-z0-9]", "", s.lower())


def extract_json(text: str) -> dict[str, Any]:
    """The first JSON object in a reply (fenced in ```json or bare)."""
    start = text.find("{")
    while start != -1:
        depth = 0
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    try:
                        obj = json.loads(text[start : i + 1])
                    except json.JSONDecodeError:
                        break
                    if isinstance(obj, dict):
                        return obj
                    break
        start = text.find("{", start + 1)
    raise ValueError(f"no JSON object in the judge's reply: {text[:200]!r}")


def _in_range(value: Any, rubric: Rubric, name: str) -> float:
    if isinstance(value, dict):  # {"Score": 7, "Justification": "..."} (OpenING's form)
        value = next((v for k, v in value.items() if _key(k) == "score"), None)
    if isinstance(value, str):
        m = re.search(r"-?\d+(\.\d+)?", value)
        value = float(m.group()) if m else None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"aspect {name!r} has no numeric score in the judge's reply")  # noqa: TRY004 - a bad reply, not a bad call
    if not rubric.low <= value <= rubric.high:
        raise ValueError(f"aspect {name!r} scored {value}, outside {rubric.low}-{rubric.high}")
    return float(value)


def parse_json_scores(text: str, rubric: Rubric) -> dict[str, float]:
    """{aspect: score} from a JSON reply; keys match case- and punctuation-insensitively, nested
    under a "scores" object or not."""
    obj = extract_json(text)
    if isinstance(obj.get("scores"), dict):
        obj = obj["scores"]
    table = {_key(k): v for k, v in obj.items()}
    out = {}
    for name in rubric.aspects:
        if _key(name) not in table:
            raise ValueError(f"aspect {name!r} missing from the judge's reply")
        out[name] = _in_range(table[_key(name)], rubric, name)
    return out


def parse_heading_score(text: str, rubric: Rubric) -> dict[str, float]:
    """MMIE's form: feedback, then '### Score' and an integer."""
    m = re.search(r"#+\s*score\s*[:\n]\s*(-?\d+(?:\.\d+)?)", text, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"no '### Score' in the judge's reply: {text[:200]!r}")
    return {rubric.aspects[0]: _in_range(float(m.group(1)), rubric, rubric.aspects[0])}


def judge_aspects(judge, rubric: Rubric, content: Sequence[str | Image.Image]) -> dict[str, Any]:
    """Scores of every aspect (None when no judge or an unreadable reply) + the raw reply as a detail."""
    if judge is None:
        return {name: None for name in rubric.aspects}
    reply = judge.complete(rubric.system, content)
    try:
        scores: dict[str, Any] = dict(rubric.parse(reply, rubric))
        scores["_judge_reply"] = reply
    except ValueError as e:
        scores = {name: None for name in rubric.aspects}
        scores["_judge_error"] = str(e)
        scores["_judge_reply"] = reply
    return scores
