"""`omni eval`: results.json contents, per-sample records, resume after a kill, the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, tokenizer_dir):
    """A tiny random OmniModel saved as an inference checkpoint (2 denoising steps: fast)."""
    import torch

    from omni.config import load_config
    from omni.models.model import OmniModel

    cfg = load_config("tiny", [f"model.tokenizer={tokenizer_dir}", *TINY, "generation.image_steps=2"])
    torch.manual_seed(0)
    model = OmniModel.from_config(cfg.model)
    model.run_config = cfg
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    model.save_pretrained(path)
    return path


def _comparable(results: dict) -> dict:
    return {k: v for k, v in results.items() if k != "time"}


def test_results_records_and_rerun(tiny_ckpt, tmp_path):
    from omni.eval import evaluate

    out = tmp_path / "run"
    res = evaluate(tiny_ckpt, "shapes-t2i", out, limit=4, batch_size=3, progress=False)
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == res
    assert res["benchmark"] == "shapes-t2i" and res["n_samples"] == 4
    assert (
        res["checkpoint"]["sha256"]
        == hashlib.sha256((tiny_ckpt / "model.safetensors").read_bytes()).hexdigest()
    )
    gen = res["generation"]
    assert gen["image_steps"] == 2 and gen["mode"] == "image" and gen["checkpoint"] == str(tiny_ckpt)
    assert {"sampler", "cfg_scale", "temperature", "image_temperature", "top_p", "max_new_tokens"} <= set(gen)
    assert res["seed"] == 0 and res["judge"]["kind"] == "rule-based" and "finished" in res["time"]
    assert 0.0 <= res["overall"] <= 1.0
    assert sum(t["n"] for t in res["tasks"].values()) == 4
    records = sorted((out / "samples").glob("*/record.json"))
    assert len(records) == 4
    for i, path in enumerate(records):
        rec = json.loads(path.read_text())
        assert rec["seed"] == rec["index"] and rec["settings"]["seed"] == rec["seed"]
        assert rec["prompt"][0]["text"] and (path.parent / rec["output"][0]["image"]).exists()
        assert (path.parent / rec["answer"][0]["image"]).exists()  # ground truth kept for the report
        assert set(rec["scores"]) == {"correct"}
    html = (out / "report.html").read_text()
    assert html.count('class="im"') >= 8 and "shapes-t2i" in html

    stamps = {p: p.stat().st_mtime_ns for p in records}
    again = evaluate(tiny_ckpt, "shapes-t2i", out, limit=4, batch_size=3, progress=False)
    assert _comparable(again) == _comparable(res)
    assert {p: p.stat().st_mtime_ns for p in records} == stamps, "finished samples must not be regenerated"

    with pytest.raises(ValueError, match="seed"):
        evaluate(tiny_ckpt, "shapes-t2i", out, limit=4, seed=5, progress=False)
    # Samples scored by an older version of the judge are not resumed into the new one's results.
    spec = json.loads((out / "run.json").read_text())
    assert res["judge"]["version"] == spec["judge_version"] == 2
    (out / "run.json").write_text(json.dumps(dict(spec, judge_version=1)))
    with pytest.raises(ValueError, match="judge_version"):
        evaluate(tiny_ckpt, "shapes-t2i", out, limit=4, progress=False)


def _omni(*args: str) -> list[str]:
    return [sys.executable, "-m", "omni.cli", "eval", *args]


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_result(tiny_ckpt, tmp_path):
    from omni.eval import evaluate

    n = 10
    args = [
        "--ckpt",
        str(tiny_ckpt),
        "--benchmark",
        "shapes-t2i",
        "--limit",
        str(n),
        "--batch-size",
        "2",
        "--no-progress",
    ]
    killed = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        _omni(*args, "--out", str(killed)),
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 300
    while time.time() < deadline and len(list(killed.glob("samples/*/record.json"))) < 4:
        if proc.poll() is not None:
            pytest.fail(f"omni eval ended early: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(killed.glob("samples/*/record.json"))
    assert 4 <= len(done) < n, f"the kill should land half-way, found {len(done)} finished samples"
    assert not (killed / "results.json").exists()
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in done}

    rerun = subprocess.run(
        _omni(*args, "--out", str(killed)),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in done} == before, (
        "finished samples were regenerated"
    )
    assert len(list(killed.glob("samples/*/record.json"))) == n

    clean = evaluate(tiny_ckpt, "shapes-t2i", tmp_path / "clean", limit=n, batch_size=2, progress=False)
    resumed = json.loads((killed / "results.json").read_text())
    assert _comparable(resumed) == _comparable(clean)
    assert resumed["outputs_sha256"] == clean["outputs_sha256"]


def test_cli_lists_benchmarks_and_names_missing_arguments(tmp_path):
    from omni.cli import main

    assert main(["eval", "--list"]) == 0
    assert main(["eval", "--benchmark", "shapes-t2i"]) == 2  # no --ckpt: one clear error line
    assert main(["eval", "--ckpt", str(tmp_path), "--benchmark", "no-such-bench"]) == 2
