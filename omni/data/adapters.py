"""Adapters: other public interleaved encodings -> the same `Document`.

- MMC4 (as packaged by OpenFlamingo): one json per document, `{"text_list": [sentences],
  "image_info": [{"matched_text_index": i, "image_base64": "...", ...}], "url": ...}`. Each
  image goes right before the sentence it was matched to; consecutive sentences with no image
  between them become one text segment.
- CoMM-style: a document is a list of items `{"type": "text", "text": "..."}` /
  `{"type": "image", "image_base64" | "image": "<base64 or data: URI>" | "path": "file"}`, either
  bare or under an `items` / `content` key.

Images without bytes (a URL only) are dropped, never downloaded, and counted
(`image_not_embedded`). A CoMM image path is read
relative to `root` and must stay inside it (no absolute paths, no `..` out of it): a dataset
from elsewhere cannot pack the converting user's other files into its shards. Records come from
`.jsonl` files or webdataset shards whose `.json` members hold one record each; a record of the
wrong shape is skipped and counted, never a crash. `convert` writes them as omni shards (fitting
images to a square canvas when asked, which the loader needs).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from omni.data.document import BadSample, Document, Stats, decode_image

Adapter = Callable[..., Document]


def _image_from_b64(text: str, where: str) -> Image.Image:
    if text.startswith("data:"):
        text = text.split(",", 1)[-1]
    try:
        return decode_image(base64.b64decode(text, validate=False))
    except (binascii.Error, ValueError, OSError) as e:
        raise BadSample("bad_image", f"{where}: {type(e).__name__}: {e}") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt data
        raise BadSample("bad_image", f"{where}: {type(e).__name__}: {e}") from None


def _image_path(root: str | Path | None, name: Any, where: str) -> Path:
    """`name` from a record, resolved inside `root`: relative, and no `..` that leaves it."""
    if not isinstance(name, str) or not name:
        raise BadSample("bad_item", f"{where}: 'path' must be a non-empty string, got {name!r}")
    normal = os.path.normpath(name)
    if os.path.isabs(normal) or normal == ".." or normal.startswith(".." + os.sep):
        raise BadSample("bad_path", f"{where}: image path {name!r} is outside --root "
                                    f"{str(root or '.')!r}; record paths must be relative to it")
    return Path(root or ".") / normal


def _fit(image: Image.Image, size: int | None) -> Image.Image:
    if size is None:
        return image
    from omni.tokenizers.base import fit_image

    return fit_image(image, size)


def from_mmc4(record: dict[str, Any], image_size: int | None = None, key: str = "",
              stats: Stats | None = None) -> Document:
    """One MMC4 record -> Document (task "interleaved"): images before their matched sentence."""
    sentences = record.get("text_list")
    if not isinstance(sentences, list):
        raise BadSample("missing_keys", f"{key!r}: MMC4 record without a 'text_list' list")
    infos = record.get("image_info") or []
    if not isinstance(infos, list):
        raise BadSample("bad_item", f"{key!r}: 'image_info' must be a list, got {type(infos).__name__}")
    before: dict[int, list[Image.Image]] = {}
    for j, info in enumerate(infos):
        if not isinstance(info, dict):
            raise BadSample("bad_item", f"{key!r} image {j}: each 'image_info' entry must be an object")
        data = info.get("image_base64")
        idx = info.get("matched_text_index")
        if not isinstance(data, str) or not data or not isinstance(idx, int):
            if stats is not None:  # an image known only by URL: nothing to decode, nothing downloaded
                stats.add("image_not_embedded", f"{key!r} image {j}: no image_base64 string or no matched_text_index")
            continue
        image = _fit(_image_from_b64(data, f"{key!r} image {j}"), image_size)
        before.setdefault(min(max(idx, 0), max(len(sentences) - 1, 0)), []).append(image)
    segments: list[Any] = []
    pending: list[str] = []
    for i, sentence in enumerate(sentences):
        if before.get(i) and pending:
            segments.append(" ".join(pending))
            pending = []
        segments += before.get(i, [])
        if isinstance(sentence, str) and sentence.strip():
            pending.append(sentence.strip())
    if pending:
        segments.append(" ".join(pending))
    if not segments:
        raise BadSample("empty", f"{key!r}: MMC4 record with no text and no decodable image")
    meta = {"task": "interleaved", "source": "mmc4", "url": record.get("url")}
    return Document.from_segments(segments, meta, key=key)


def from_comm(record: dict[str, Any] | list[Any], image_size: int | None = None, key: str = "",
              root: str | Path | None = None, stats: Stats | None = None) -> Document:
    """A CoMM-style item list -> Document (task "interleaved"); `root` resolves image paths."""
    items = record if isinstance(record, list) else (record.get("items", record.get("content"))
                                                     if isinstance(record, dict) else None)
    if not isinstance(items, list):
        raise BadSample("missing_keys", f"{key!r}: CoMM-style record needs a list of items (or 'items'/'content')")
    segments: list[Any] = []
    for j, item in enumerate(items):
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "text":
            text = item.get("text")
            if not isinstance(text, str):
                raise BadSample("bad_item", f"{key!r} item {j}: text item without a 'text' string")
            if text.strip():
                segments.append(text.strip())
        elif kind == "image":
            data = item.get("image_base64") or item.get("image")
            if isinstance(data, str) and not data.startswith(("http://", "https://")):
                segments.append(_fit(_image_from_b64(data, f"{key!r} item {j}"), image_size))
            elif item.get("path") is not None:
                path = _image_path(root, item["path"], f"{key!r} item {j}")
                try:
                    segments.append(_fit(decode_image(path.read_bytes()), image_size))
                except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                    raise BadSample("missing_image", f"{key!r} item {j}: no image file {str(path)!r}") from None
                except Exception as e:  # noqa: BLE001 - any decoder error is a bad image
                    raise BadSample("bad_image", f"{key!r} item {j}: {str(path)!r}: {type(e).__name__}: {e}") from None
            elif stats is not None:  # a URL only (or nothing): not downloaded
                stats.add("image_not_embedded", f"{key!r} item {j}: no image bytes or path")
        else:
            raise BadSample("bad_item", f"{key!r} item {j}: type must be 'text' or 'image', got {kind!r}")
    if not segments:
        raise BadSample("empty", f"{key!r}: no usable items")
    meta = {"task": "interleaved", "source": "comm"}
    if isinstance(record, dict):
        meta.update({k: v for k, v in record.items() if k in ("id", "title", "url") and isinstance(v, (str, int))})
    return Document.from_segments(segments, meta, key=key)


ADAPTERS: dict[str, Adapter] = {"mmc4": from_mmc4, "comm": from_comm}


def iter_records(sources: Iterable[str | Path], stats: Stats | None = None) -> Iterator[tuple[str, Any]]:
    """(key, json record) from `.jsonl` / `.json` files and webdataset shards (`.json` members)."""
    from omni.data.shards import expand_shards, iter_tar

    stats = stats if stats is not None else Stats()
    for src in sources:
        src = str(src)
        if src.endswith((".jsonl", ".json")):
            stem = Path(src).stem.replace(".", "_")
            with open(src, encoding="utf-8") as f:
                lines = [f.read()] if src.endswith(".json") else f
                for n, line in enumerate(lines):
                    if not line.strip():
                        continue
                    try:
                        yield f"{stem}-{n:07d}", json.loads(line)
                    except json.JSONDecodeError as e:
                        stats.add("bad_json", f"{src} line {n + 1}: {e}")
            continue
        for url in expand_shards(src):
            for sample in iter_tar(url, stats.add):
                try:
                    yield sample["__key__"].replace("/", "_"), json.loads(sample["json"])
                except (KeyError, UnicodeDecodeError, json.JSONDecodeError) as e:
                    stats.add("bad_json", f"{url} {sample['__key__']}: {type(e).__name__}")


def iter_adapted(fmt: str, sources: Iterable[str | Path], image_size: int | None = None,
                 stats: Stats | None = None, root: str | Path | None = None) -> Iterator[Document]:
    """Documents from foreign records; bad records are skipped and counted in `stats`."""
    if fmt not in ADAPTERS:
        raise ValueError(f"unknown format {fmt!r}; choose from {sorted(ADAPTERS)}")
    stats = stats if stats is not None else Stats()
    for key, record in iter_records(sources, stats):
        try:
            if fmt == "comm":
                yield from_comm(record, image_size, key=key, root=root, stats=stats)
            else:
                if not isinstance(record, dict):
                    raise BadSample("bad_json", f"{key!r}: MMC4 record is not an object")
                yield from_mmc4(record, image_size, key=key, stats=stats)
        except BadSample as e:
            stats.add(e.reason, e.detail)


def to_base64_png(image: Image.Image) -> str:
    """Helper for building MMC4 / CoMM records (tests, conversions)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")
