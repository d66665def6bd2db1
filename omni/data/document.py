"""Interleaved documents: the in-memory `Document` and its webdataset encoding.

On disk (the OBELICS / Megatron-Energon convention, DESIGN.md section 3) a document is one
webdataset sample:

    KEY.json   {"texts": ["a red circle.", null], "images": [null, "0.png"], "meta": {...}}
    KEY.0.png  the first image

`texts` and `images` are parallel lists with exactly one non-null entry per index; an image
entry names the member (the part of the file name after `KEY.`). Decoding checks every rule and
raises `BadSample` with a short machine-readable reason, so a reader can skip and count bad
samples instead of crashing a training run.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any, Union

from PIL import Image

Segment = Union[str, Image.Image]  # noqa: UP007 - a runtime alias; `|` needs Python 3.10 objects

# Reasons a sample is skipped or repaired; readers count them (DataConfig.max_warnings rate-limits
# the warning lines). Kept here so every reader uses the same names.
REASONS = {
    "bad_shard": "a shard that could not be opened",
    "truncated_tar": "a tar that ended mid-member or is corrupt (rest of that shard skipped)",
    "bad_json": "json member missing, not UTF-8 JSON, or not an object",
    "missing_keys": "json lacks 'texts' or 'images'",
    "length_mismatch": "'texts' and 'images' have different lengths",
    "bad_item": "an index with both or neither of text/image set, or a non-string entry",
    "empty": "a document with no segments",
    "missing_image": "an image member named in the json is not in the sample",
    "bad_image": "an image member that does not decode",
    "bad_path": "an image path in a converted record that leaves the --root directory",
    "image_not_embedded": "an image of a converted record known only by URL (or by nothing): dropped from its "
                          "document, never downloaded",
    "bad_image_size": "an image whose size is not the tokenizer's image size",
    "too_long_cut": "a document longer than seq_len, cut at a segment boundary (repaired)",
    "too_long_dropped": "a document longer than seq_len that could not be cut usefully",
}


class BadSample(ValueError):
    """A sample that breaks the document format; `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class Document:
    """One interleaved document: parallel `texts` / `images` (one non-null per index) + `meta`."""

    texts: list[str | None]
    images: list[Image.Image | None]
    meta: dict[str, Any] = field(default_factory=dict)
    key: str = ""  # webdataset sample key; no dots (webdataset splits member names at the first dot)

    @classmethod
    def from_segments(cls, segments: list[Segment], meta: dict[str, Any] | None = None, key: str = "") -> Document:
        texts: list[str | None] = []
        images: list[Image.Image | None] = []
        for i, seg in enumerate(segments):
            if isinstance(seg, str):
                texts.append(seg), images.append(None)
            elif isinstance(seg, Image.Image):
                texts.append(None), images.append(seg)
            else:
                raise TypeError(f"segment {i} is a {type(seg).__name__}; expected str or PIL.Image")
        return cls(texts, images, dict(meta or {}), key)

    @property
    def segments(self) -> list[Segment]:
        return [t if t is not None else im for t, im in zip(self.texts, self.images)]

    @property
    def task(self) -> str | None:
        return self.meta.get("task")

    def __len__(self) -> int:
        return len(self.texts)

    # encoding --------------------------------------------------------------------------------
    def to_sample(self, key: str | None = None) -> dict[str, Any]:
        """The webdataset sample: {"__key__", "json": bytes, "0.png": bytes, ...}."""
        key = key if key is not None else self.key
        if not key or "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must be non-empty without '.' or '/' (webdataset splits there)")
        if len(self.texts) != len(self.images):
            raise ValueError(f"document {key}: {len(self.texts)} texts but {len(self.images)} images")
        sample: dict[str, Any] = {"__key__": key}
        names: list[str | None] = []
        n_img = 0
        for i, (t, im) in enumerate(zip(self.texts, self.images)):
            if (t is None) == (im is None):
                raise ValueError(f"document {key}, index {i}: exactly one of text/image must be set")
            if im is None:
                names.append(None)
                continue
            name = f"{n_img}.png"
            sample[name] = encode_png(im)
            names.append(name)
            n_img += 1
        record = {"texts": list(self.texts), "images": names, "meta": self.meta}
        sample["json"] = json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        return sample


def encode_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def decode_image(data: bytes) -> Image.Image:
    """PNG/JPEG/... bytes -> fully loaded PIL RGB image (truncated files fail here, not later)."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return im.convert("RGB")


# decoding ------------------------------------------------------------------------------------


def decode_record(sample: dict[str, Any]) -> dict[str, Any]:
    """Parse and check the json member; images are not touched (cheap: used to filter by task)."""
    raw = sample.get("json")
    if raw is None:
        raise BadSample("bad_json", f"sample {sample.get('__key__')!r} has no .json member")
    try:
        record = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadSample("bad_json", f"{sample.get('__key__')!r}: {e}") from None
    if not isinstance(record, dict):
        raise BadSample("bad_json", f"{sample.get('__key__')!r}: json is a {type(record).__name__}, not an object")
    missing = [k for k in ("texts", "images") if not isinstance(record.get(k), list)]
    if missing:
        raise BadSample("missing_keys", f"{sample.get('__key__')!r} lacks list field(s) {missing}")
    texts, images = record["texts"], record["images"]
    if len(texts) != len(images):
        raise BadSample("length_mismatch", f"{sample.get('__key__')!r}: {len(texts)} texts, {len(images)} images")
    if not texts:
        raise BadSample("empty", f"{sample.get('__key__')!r}")
    for i, (t, im) in enumerate(zip(texts, images)):
        if (t is None) == (im is None) or not isinstance(t if t is not None else im, str):
            raise BadSample("bad_item", f"{sample.get('__key__')!r} index {i}: text={t!r} image={im!r}")
    meta = record.get("meta")
    record["meta"] = meta if isinstance(meta, dict) else {}
    return record


def decode_document(sample: dict[str, Any], record: dict[str, Any] | None = None) -> Document:
    """A raw webdataset sample (member suffix -> bytes) -> Document, or BadSample."""
    record = record if record is not None else decode_record(sample)
    key = sample.get("__key__", "")
    images: list[Image.Image | None] = []
    for name in record["images"]:
        if name is None:
            images.append(None)
            continue
        data = sample.get(name.lower())  # webdataset lower-cases member suffixes
        if data is None:
            raise BadSample("missing_image", f"{key!r}: no member {key}.{name}")
        try:
            images.append(decode_image(data))
        except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt data
            raise BadSample("bad_image", f"{key!r}.{name}: {type(e).__name__}: {e}") from None
    return Document(list(record["texts"]), images, record["meta"], key)


class Stats:
    """Counts of skipped / repaired samples per reason, with rate-limited warning lines.

    The first `max_warnings` events of each reason are logged (logger `omni.data`); then one
    line says the rest are suppressed. Counts keep going and end up in the training log.
    """

    def __init__(self, max_warnings: int = 20):
        self.counts: dict[str, int] = {}
        self.max_warnings = max_warnings
        self._warned: dict[str, int] = {}

    def add(self, reason: str, detail: str = "") -> None:
        import logging

        self.counts[reason] = self.counts.get(reason, 0) + 1
        n = self._warned.get(reason, 0)
        if n > self.max_warnings:
            return
        log = logging.getLogger("omni.data")
        if n < self.max_warnings:
            log.warning("skipping bad data (%s): %s", reason, detail or REASONS.get(reason, ""))
        else:
            log.warning("further %r warnings suppressed; counts continue in the training log", reason)
        self._warned[reason] = n + 1

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))

    def load(self, counts: dict[str, int]) -> None:
        self.counts = {str(k): int(v) for k, v in counts.items()}
