"""Tiny inline image previews for terminals: truecolor half-block characters.

Each character cell shows two pixels stacked: the upper half block '▀' painted with the top
pixel as foreground and the bottom pixel as background. A 32x32 image becomes 32 columns by
16 lines. Terminals without colour get nothing (the PNG path is printed anyway).
"""

from __future__ import annotations

import os
from typing import TextIO

import numpy as np
from PIL import Image

UPPER_HALF = "\u2580"
RESET = "\x1b[0m"


def supports_color(stream: TextIO) -> bool:
    """A colour terminal: a tty, TERM not 'dumb', and NO_COLOR (no-color.org) unset."""
    if os.environ.get("NO_COLOR") or os.environ.get("TERM", "") == "dumb":
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def halfblock(image: Image.Image, width: int = 32) -> str:
    """The image as lines of truecolor half blocks, `width` columns wide (aspect kept)."""
    if width < 1:
        raise ValueError(f"preview width must be >= 1, got {width}")
    image = image.convert("RGB")
    w, h = image.size
    height = max(2, round(h * width / w))
    height += height % 2  # two pixel rows per text line
    px = np.asarray(image.resize((width, height), Image.BILINEAR), dtype=np.uint8)  # (H, W, 3)
    lines = []
    for y in range(0, height, 2):
        cells = [
            f"\x1b[38;2;{t[0]};{t[1]};{t[2]}m\x1b[48;2;{b[0]};{b[1]};{b[2]}m{UPPER_HALF}"
            for t, b in zip(px[y].tolist(), px[y + 1].tolist())
        ]
        lines.append("".join(cells) + RESET)
    return "\n".join(lines)
