"""Prompts: what a user gives (text and pictures) -> the positions the sampler feeds.

A prompt is a list of segments, `str | PIL.Image`, in reading order. It is laid out exactly as
training lays out a document (`omni.layout.doc_positions`): [bos] text ... <boi> x1..xN <eoi> ...
without the final [eos], so the model continues it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from omni.layout import ImageSegment, TextSegment, doc_positions
from omni.tokenizers.base import fit_image

Prompt = Sequence["str | Image.Image"]
Item = tuple[int, "torch.Tensor | None"]  # (token id, continuous image token (d,) or None)
IMAGE_MARKER = "<image>"


def check_prompts(prompts: Sequence[Prompt]) -> None:
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, (str, Image.Image)):
            raise TypeError(f"prompt {i} must be a list of segments (str | PIL.Image), got a bare {type(prompt).__name__}")
        for j, seg in enumerate(prompt):
            if not isinstance(seg, (str, Image.Image)):
                raise TypeError(f"prompt {i} segment {j} is a {type(seg).__name__}; use str or PIL.Image")


def encode_prompts(model, prompts: Sequence[Prompt]) -> list[list[Item]]:
    """Each prompt as (token id, image token) items, laid out as training lays out a document.

    Each text segment is encoded on its own; images are fitted to the model's size and encoded in
    one batch (one tokenizer call for every image of every prompt).
    """
    check_prompts(prompts)
    size = model.image_tokenizer.cfg.image_size
    pictures = [fit_image(seg, size) for prompt in prompts for seg in prompt if isinstance(seg, Image.Image)]
    tokens = model.image_tokenizer.encode(pictures).to(model.device) if pictures else None  # (M, N, d)
    out, k = [], 0
    for prompt in prompts:
        doc = []
        for seg in prompt:
            if isinstance(seg, str):
                doc.append(TextSegment(model.tokenizer.encode(seg)))
            else:
                doc.append(ImageSegment(tokens[k]))
                k += 1
        ids, _, image_index, images = doc_positions(doc, model.special, add_bos=True, add_eos=False)
        flat = torch.cat(images) if images else None  # (n_img * N, d)
        out.append([(t, flat[i] if i >= 0 else None) for t, i in zip(ids, image_index)])
    return out


def prompt_length(model, prompt: Prompt) -> int:
    """Positions `prompt` occupies, without encoding its images (chat trims history with it)."""
    check_prompts([prompt])
    shape_only = torch.empty(model.image_tokenizer.num_tokens, 0)  # (N, 0): an image's length, no pixels
    doc = [TextSegment(model.tokenizer.encode(s)) if isinstance(s, str) else ImageSegment(shape_only) for s in prompt]
    ids, *_ = doc_positions(doc, model.special, add_bos=True, add_eos=False)
    return len(ids)


def context_length(model) -> int:
    return int(model.backbone.config.get_text_config().max_position_embeddings)


def load_image(path: str | Path) -> Image.Image:
    """Open an image as RGB, with an error that names the path and what went wrong."""
    from PIL import UnidentifiedImageError

    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"image {str(path)!r} is a directory; give an image file (PNG, JPEG, ...)")
    if not path.is_file():
        raise FileNotFoundError(f"image {str(path)!r} does not exist")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Image.DecompressionBombError:
        raise ValueError(
            f"image {str(path)!r} is too large to open safely (over {2 * Image.MAX_IMAGE_PIXELS} pixels, a possible "
            "decompression bomb); resize it first"
        ) from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read image {str(path)!r} ({e}); give an image file that opens (PNG, JPEG, ...)") from e


def size_note(image: Image.Image, size: int, name: str) -> str | None:
    """What prompting does to a picture that is not `size` x `size` (fit_image), or None."""
    w, h = image.size
    if (w, h) == (size, size):
        return None
    how = "resized" if w == h else f"center-cropped to {min(w, h)}x{min(w, h)} and resized"
    return f"note: image {name!r} is {w}x{h}; the model reads {size}x{size} pictures, so it was {how}"


def check_edit_image(image: Image.Image, name: str) -> None:
    """An edit's source must be square: a crop would cut away what the instruction may name, and
    the result would silently show another scene. Any square size is resized (fit_image)."""
    w, h = image.size
    if w != h:
        raise ValueError(
            f"image {name!r} is {w}x{h}; an edit keeps the whole picture and the model reads square pictures: "
            f"crop or pad it to a square first (any square size is resized to the model's)"
        )


def edit_prompt(image: Image.Image, instruction: str) -> list:
    """An edit's prompt: the picture, then the instruction, the order editing is trained on."""
    return [image, instruction] if instruction else [image]


def build_prompt(text: str, images: list) -> list:
    """Segments of one prompt: images at `<image>` markers, or all images before the text."""
    parts = text.split(IMAGE_MARKER)
    if len(parts) == 1:
        return [*images, text] if text else list(images)
    if len(parts) - 1 != len(images):
        raise ValueError(
            f"the prompt has {len(parts) - 1} {IMAGE_MARKER} markers but {len(images)} images were given; "
            "give one --image per marker, or drop the markers to put the images first"
        )
    segments: list = []
    for i, part in enumerate(parts):
        if i:
            segments.append(images[i - 1])
        if part:
            segments.append(part)
    return segments
