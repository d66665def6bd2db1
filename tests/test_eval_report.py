"""report.html opens in headless Chromium and shows the run's images."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from omni.eval.benchmark import EvalSample, Output
from omni.eval.records import write_record
from omni.eval.report import IMAGE_PX, write_report

CHROMIUM = "/usr/bin/chromium"
MAGENTA, CYAN = (255, 0, 255), (0, 255, 255)


def chromium() -> str:
    path = (
        CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium") or shutil.which("chromium-browser")
    )
    if path:
        return path
    if os.environ.get("OMNI_ALLOW_NO_BROWSER") == "1":
        pytest.skip("no Chromium and OMNI_ALLOW_NO_BROWSER=1")
    pytest.fail(
        f"headless Chromium not found at {CHROMIUM}: install it (apt-get install -y chromium) "
        "or set OMNI_ALLOW_NO_BROWSER=1 to skip this test"
    )


def screenshot(html: Path, png: Path, profile: Path, size=(1400, 1000)) -> np.ndarray:
    cmd = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=5000",
        f"--window-size={size[0]},{size[1]}",
        f"--screenshot={png}",
        html.resolve().as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert png.exists(), f"chromium wrote no screenshot (exit {proc.returncode}): {proc.stderr[-1500:]}"
    return np.asarray(Image.open(png).convert("RGB"))


def _count(shot: np.ndarray, color) -> int:
    """Pixels of the screenshot within a hair of `color`."""
    return int((np.abs(shot.astype(int) - np.array(color)).sum(-1) <= 6).sum())


def test_report_shows_images_in_headless_chromium(tmp_path):
    run = tmp_path / "run"
    records = []
    for i in range(2):
        sample = EvalSample(
            id=f"s{i}",
            task="colors",
            prompt=[f"draw a magenta square {i}."],
            mode="image",
            reference={},
            answer=[Image.new("RGB", (32, 32), CYAN)],
        )
        out = Output(["here:", Image.new("RGB", (32, 32), MAGENTA)], "eos", {"seed": i})
        records.append(write_record(run, sample, i, i, out, {"correct": float(i), "_reason": "test"}))
    results = {
        "benchmark": "demo",
        "description": "report test",
        "overall": 0.5,
        "n_samples": 2,
        "tasks": {"colors": {"n": 2, "correct": 0.5}},
        "metrics": {},
    }
    html = write_report(run, results, records)
    shot = screenshot(html, tmp_path / "shot.png", tmp_path / "profile")
    area = IMAGE_PX * IMAGE_PX
    # both generated images (magenta) and both ground-truth images (cyan) are drawn at full size
    assert _count(shot, MAGENTA) >= 2 * 0.9 * area, _count(shot, MAGENTA)
    assert _count(shot, CYAN) >= 2 * 0.9 * area, _count(shot, CYAN)

    # a report whose image files are gone shows none of those colours: the check above is real
    for p in run.glob("samples/*/*.png"):
        p.unlink()
    shot = screenshot(html, tmp_path / "shot2.png", tmp_path / "profile2")
    assert _count(shot, MAGENTA) == 0 and _count(shot, CYAN) == 0
