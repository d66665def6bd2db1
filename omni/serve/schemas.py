"""The OpenAI chat-completions format, both ways: validate a request, build responses and chunks.

Requests are parsed by hand, not by a pydantic model, so that every refusal names the field
(`messages[1].content[0].image_url.url`), what was wrong and what to send instead. A bad request
raises `RequestError` (an HTTP status and an OpenAI-style error object); nothing else escapes.

Answers are lists of parts in order: {"type": "text", "text": ...} and {"type": "image_url",
"image_url": {"url": "data:image/png;base64,..."}}; docs/serving.md has every format.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, UnidentifiedImageError

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?)(?P<b64>;base64)?,(?P<data>.*)$",
                      re.DOTALL)
IMAGE_TYPES = {"image/png", "image/jpeg", "image/jpg", "image/gif", "image/webp", "image/bmp"}
SAMPLERS = ("ddim", "ddpm", "euler", "stochastic")
FINISH = {"eos": "stop", "max_images": "stop", "max_tokens": "length", "repetition": "stop",
          "time_limit": "length", "cancelled": "stop"}  # omni's reason -> OpenAI's


@dataclass
class Limits:
    """What one request may ask for; the defaults fit a small model on a small machine."""

    max_running: int = 8  # requests in the batch at once
    max_waiting: int = 32  # requests queued for a slot; beyond that 429
    max_prompt_tokens: int | None = None  # prompt positions (images count their tokens); None: the context
    max_body_bytes: int = 32 << 20  # whole request body
    max_image_bytes: int = 8 << 20  # one decoded image file
    max_image_pixels: int = 4096 * 4096  # one image, width x height
    max_images: int = 16  # images in one request's messages
    max_image_steps: int = 1000  # denoising steps per image token
    request_timeout: float = 300.0  # seconds from arrival; then the answer stops ("time_limit")
    allow_remote_images: bool = False  # fetch http(s) image URLs (off: only data: URLs)


class RequestError(Exception):
    """A request the server refuses: `status` and the OpenAI error object's fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str = "invalid_request",
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class ChatRequest:
    model: str
    messages: list[tuple[str, list]]  # (role, segments: str | PIL.Image)
    overrides: dict = field(default_factory=dict)  # GenerationConfig fields the request sets
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False


# --------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------

def _bad(param: str, message: str, code: str = "invalid_value", status: int = 400) -> RequestError:
    return RequestError(status, f"{param}: {message}", param=param, code=code)


def _kind(value: Any) -> str:
    return "null" if value is None else {bool: "boolean", int: "integer", float: "number", str: "string",
                                         list: "array", dict: "object"}.get(type(value), type(value).__name__)


def _number(body: dict, name: str, lo: float, hi: float, integer: bool = False, lo_open: bool = False):
    """body[name] as a number in [lo, hi] (or (lo, hi]), or None when absent / null."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        want = "an integer" if integer else "a number"
        raise _bad(name, f"must be {want}, got {_kind(value)} {value!r}", code="invalid_type")
    if value < lo or value > hi or (lo_open and value == lo):
        left = "(" if lo_open else "["
        raise _bad(name, f"{value!r} is out of range; use a value in {left}{lo}, {hi}]")
    return value


# OpenAI fields omni accepts but does not act on, with the only value it can honour.
IGNORED = {"user": None, "metadata": None, "store": None, "service_tier": None, "parallel_tool_calls": None}
FIXED = {"n": 1, "frequency_penalty": 0, "presence_penalty": 0, "logprobs": False, "stop": None,
         "top_logprobs": None, "tools": None, "tool_choice": None, "logit_bias": None}
KNOWN = {"model", "messages", "stream", "stream_options", "temperature", "top_p", "top_k", "max_tokens",
         "max_completion_tokens", "seed", "mode", "cfg_scale", "image_cfg_scale", "image_steps", "image_temperature",
         "max_images", "sampler", "repetition_stop", "response_format", *IGNORED, *FIXED}


def parse_request(body: Any, limits: Limits) -> ChatRequest:
    """Validate a decoded JSON body; raise RequestError naming the first bad field."""
    if not isinstance(body, dict):
        raise RequestError(400, f"the request body must be a JSON object, got {_kind(body)}", code="invalid_body")
    unknown = sorted(set(body) - KNOWN)
    if unknown:
        raise _bad(unknown[0], f"unknown field; omni accepts {', '.join(sorted(KNOWN - set(IGNORED)))}",
                   code="unknown_field")
    for name, only in FIXED.items():
        if name in body and body[name] not in (only, None):
            raise _bad(name, f"{body[name]!r} is not supported; omni answers with {name}={only!r} (or leave it out)",
                       code="unsupported")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise _bad("response_format", 'only {"type": "text"} is supported', code="unsupported")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model", f"required: the model's id from GET /v1/models, got {_kind(model)}", code="missing_model")
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise _bad("stream", f"must be true or false, got {_kind(stream)} {stream!r}", code="invalid_type")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise _bad("stream_options", 'only {"include_usage": true|false} is supported')

    overrides: dict[str, Any] = {}
    for name, key, lo, hi, integer, lo_open in [
        ("temperature", "temperature", 0, 2, False, False),
        ("top_p", "top_p", 0, 1, False, True),
        ("top_k", "top_k", 0, 1_000_000, True, False),
        ("max_tokens", "max_new_tokens", 1, 1 << 20, True, False),
        ("max_completion_tokens", "max_new_tokens", 1, 1 << 20, True, False),
        ("cfg_scale", "cfg_scale", 0, 100, False, False),
        ("image_cfg_scale", "image_cfg_scale", 0, 100, False, False),  # edits: guidance by the picture
        ("image_steps", "image_steps", 1, limits.max_image_steps, True, False),
        ("image_temperature", "image_temperature", 0, 10, False, False),
        ("max_images", "max_images", 0, 64, True, False),
        ("repetition_stop", "repetition_stop", 0, 1 << 20, True, False),
    ]:
        value = _number(body, name, lo, hi, integer, lo_open)
        if value is not None:
            overrides[key] = value
    seed = _number(body, "seed", 0, 2**63 - 1, integer=True)
    mode = body.get("mode")
    if mode is not None:
        if mode not in ("auto", "text", "image"):
            raise _bad("mode", f"{mode!r} is not one of auto (text and pictures), text, image (one picture)")
        overrides["mode"] = mode
    sampler = body.get("sampler")
    if sampler is not None:
        if sampler not in SAMPLERS:
            raise _bad("sampler", f"{sampler!r} is not one of {', '.join(SAMPLERS)}")
        overrides["sampler"] = sampler
    messages = parse_messages(body.get("messages"), limits)
    return ChatRequest(model=model, messages=messages, overrides=overrides, seed=seed, stream=bool(stream),
                       include_usage=bool(options.get("include_usage", False)))


def parse_messages(messages: Any, limits: Limits) -> list[tuple[str, list]]:
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", f"must be a non-empty array of {{role, content}} objects, got {_kind(messages)}"
                   + (" []" if messages == [] else ""), code="invalid_messages")
    out, images = [], 0
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise _bad(where, f"must be an object with role and content, got {_kind(msg)}", code="invalid_messages")
        extra = sorted(set(msg) - {"role", "content", "name"})
        if extra:
            raise _bad(f"{where}.{extra[0]}", "unknown message field; messages carry role and content",
                       code="unknown_field")
        role = msg.get("role")
        if role not in ROLES:
            raise _bad(f"{where}.role", f"unknown role {role!r}; use system, user or assistant", code="invalid_role")
        segments = parse_content(msg.get("content"), f"{where}.content", limits)
        images += sum(not isinstance(s, str) for s in segments)
        if images > limits.max_images:
            raise _bad(f"{where}.content", f"more than {limits.max_images} images in one request; send fewer",
                       code="too_many_images")
        out.append((ROLES[role], segments))
    if all(role != "user" for role, _ in out):
        raise _bad("messages", "needs at least one message with role user", code="invalid_messages")
    return out


def parse_content(content: Any, where: str, limits: Limits) -> list:
    if isinstance(content, str):
        if not content.strip():
            raise _bad(where, "is empty; say something", code="empty_content")
        return [content]
    if not isinstance(content, list) or not content:
        raise _bad(where, f"must be a string or a non-empty array of parts, got {_kind(content)}",
                   code="invalid_content")
    segments: list = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise _bad(f"{at}.text", f"must be a string, got {_kind(text)}", code="invalid_type")
            if text:
                segments.append(text)
        elif kind == "image_url":
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else None
            if not isinstance(url, str):
                raise _bad(f"{at}.image_url", 'must be {"url": "data:image/png;base64,..."}', code="invalid_image")
            segments.append(load_image(url, f"{at}.image_url.url", limits))
        else:
            raise _bad(at, f"part type {kind!r} is not supported; use text or image_url" if isinstance(part, dict)
                       else f"must be a {{type, ...}} object, got {_kind(part)}", code="invalid_part")
    if not segments:
        raise _bad(where, "has no text and no image", code="empty_content")
    return segments


def load_image(url: str, where: str, limits: Limits) -> Image.Image:
    """A data: URL (or, when allowed, an http(s) URL) -> an RGB PIL image within the limits."""
    if url.startswith(("http://", "https://")):
        if not limits.allow_remote_images:
            raise _bad(where, "remote image URLs are off on this server; send the image inline as "
                       "data:image/png;base64,... (or start the server with --allow-remote-images)",
                       code="remote_image_refused")
        data = _fetch(url, where, limits)
    else:
        m = DATA_URL.match(url)
        if m is None:
            raise _bad(where, f"{url[:40]!r}... is not a data: URL; use data:image/png;base64,...",
                       code="invalid_image_url")
        mime = (m.group("mime") or "").lower()
        if mime not in IMAGE_TYPES:
            raise _bad(where, f"media type {mime or 'none'!r} is not an image type; use one of "
                       f"{', '.join(sorted(IMAGE_TYPES))}", code="invalid_image_type")
        if not m.group("b64"):
            raise _bad(where, "the data URL must be base64 (data:image/png;base64,...)", code="invalid_base64")
        text = re.sub(r"\s+", "", m.group("data"))
        if len(text) * 3 // 4 > limits.max_image_bytes + 2:
            raise _too_big(where, len(text) * 3 // 4, limits)
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as e:
            raise _bad(where, f"not valid base64 ({e})", code="invalid_base64") from None
    if len(data) > limits.max_image_bytes:
        raise _too_big(where, len(data), limits)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > limits.max_image_pixels:
                raise _bad(where, f"the image is {w}x{h} = {w * h} pixels, over this server's {limits.max_image_pixels}; "
                           "send a smaller one", code="image_too_large", status=413)
            im.load()
            return im.convert("RGB")
    except RequestError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        if isinstance(e, UnidentifiedImageError):
            raise _bad(where, f"the {len(data)} bytes are not an image PIL can read (PNG, JPEG, GIF, WebP, BMP)",
                       code="invalid_image") from None
        raise _bad(where, f"the image is too large to decode ({e})", code="image_too_large", status=413) from None
    except (OSError, ValueError, SyntaxError) as e:
        raise _bad(where, f"the image cannot be decoded ({e})", code="invalid_image") from None


def _too_big(where: str, n: int, limits: Limits) -> RequestError:
    return _bad(where, f"the image is {n} bytes, over this server's {limits.max_image_bytes}; send a smaller one",
                code="image_too_large", status=413)


def _fetch(url: str, where: str, limits: Limits) -> bytes:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=10) as resp:  # http(s) only, checked above
            data = resp.read(limits.max_image_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise _bad(where, f"cannot fetch the image: {e}", code="image_fetch_failed") from None
    return data


# --------------------------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------------------------

def image_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def parts(segments: list) -> list[dict]:
    """Result segments -> content parts, in order."""
    return [{"type": "text", "text": s} if isinstance(s, str) else
            {"type": "image_url", "image_url": {"url": image_url(s)}} for s in segments]


def completion(rid: str, model: str, result, usage: dict) -> dict:
    return {
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": parts(result.segments)},
                     "finish_reason": FINISH.get(result.finish_reason, "stop")}],
        "usage": usage,
        "omni": {"finish_reason": result.finish_reason, "settings": result.settings},
    }


def chunk(rid: str, model: str, created: int, delta: dict, finish: str | None = None, **extra: Any) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
