"""The package as a user installs it: `pip install .` (a wheel, not editable) into a fresh virtual
environment, then every step of the path from outside the clone, so nothing can lean on the source
tree (presets, package data, relative paths): data -> train -> export -> generate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(TOKENIZERS_PARALLELISM="false", DS_ACCELERATOR="cpu")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
def test_wheel_install_trains_and_generates_outside_the_clone(tmp_path):
    # The wheel, built from the clone as `pip install .` would build it (no editable hooks).
    wheels = tmp_path / "wheels"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(ROOT)],
        cwd=tmp_path)
    (wheel,) = wheels.glob("omni-*.whl")
    # A fresh environment. Its dependencies (torch, transformers, DeepSpeed: gigabytes) come from the
    # test's own environment through a path entry, which does not run that environment's .pth hooks,
    # so the clone's editable install stays invisible; omni itself comes only from the wheel.
    env_dir = tmp_path / "env"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    site = run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path).stdout.strip()
    deps = [p for p in sys.path if p.endswith("site-packages")]
    Path(site, "omni_test_deps.pth").write_text("\n".join(deps) + "\n")
    run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], tmp_path)
    omni = str(env_dir / "bin" / "omni")

    work = tmp_path / "elsewhere"  # outside the clone: no configs/ beside it
    work.mkdir()
    where = run([str(py), "-c", "import omni, omni.config as c; print(omni.__file__); print(c.CONFIG_DIR)"], work)
    pkg, configs = where.stdout.split()
    assert Path(pkg).is_relative_to(env_dir) and not Path(pkg).is_relative_to(ROOT)
    assert (Path(configs) / "tiny.yaml").exists() and (Path(configs) / "ds" / "zero3-multinode.json").exists()

    run([omni, "data", "shapes", "--out", "shards", "--train", "60", "--val", "8", "--shard-size", "30"], work)
    run([omni, "data", "tokenizer", "--shards", "shards/train-*.tar", "--out", "tok", "--vocab-size", "96"], work)
    run([omni, "train", "--config", "tiny", "model.tokenizer=tok", "data.train=shards/train-*.tar",
         "data.val=shards/val-*.tar", "train.out_dir=run", "train.steps=2", "train.save_every=2", "train.val_every=0",
         "train.log_every=1", "train.precision=fp32", "data.batch_size=2", "data.seq_len=96",
         "model.backbone.hidden_size=64", "model.backbone.num_layers=2", "model.backbone.num_heads=4",
         "model.backbone.intermediate_size=128", "model.head.width=64", "model.head.depth=2"], work)
    run([omni, "export", "--run", "run", "--out", "model"], work)
    out = run([omni, "generate", "--ckpt", "model", "--prompt", "a red circle.", "--mode", "image", "--out", "imgs",
               "--json", "--steps", "2"], work)
    record = json.loads(out.stdout.strip().splitlines()[-1])
    images = [s for s in record["segments"] if s["type"] == "image"]
    assert len(images) == 1 and (work / images[0]["path"]).stat().st_size > 0
    assert record["settings"]["image_steps"] == 2 and record["settings"]["checkpoint"].endswith("model")
