"""Resume on a different number of processes: a ZeRO run saved by 2 ranks continues on 1 and on 4
(omni converts the checkpoint to DeepSpeed's universal format when the world size changed), the
loss continuing as the unchanged 2-rank run's, the data position kept (same global batches)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_train_dist import launch, losses, overrides

pytestmark = pytest.mark.slow

# The same global batch of 8 rows (data.batch_size=2) on every world size.
GAS = {1: 4, 2: 2, 4: 1}


def run(tokenizer_dir, tmp_path: Path, out: Path, world: int, stage: int, steps: int, resume: bool, name: str):
    extra = [f"train.zero_stage={stage}", f"train.steps={steps}", "train.save_every=2",
             f"train.grad_accum={GAS[world]}", *(["train.resume=auto"] if resume else [])]
    spec = {"tok": str(tokenizer_dir), "runs": [{"overrides": overrides(tokenizer_dir, out, *extra)}]}
    proc = launch(tmp_path, spec, nproc=world, name=name)
    assert (out / "checkpoints" / f"step{steps:08d}" / "COMPLETE").exists(), proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_on_1_and_4_processes(tokenizer_dir, tmp_path, stage):
    base = tmp_path / "base"
    run(tokenizer_dir, tmp_path, base, 2, stage, 2, False, "base")
    dirs = {w: tmp_path / f"w{w}" for w in (2, 1, 4)}
    for d in dirs.values():
        shutil.copytree(base, d)
    procs = {w: run(tokenizer_dir, tmp_path, d, w, stage, 4, True, f"w{w}") for w, d in dirs.items()}
    ref = losses(dirs[2])
    for w in (1, 4):
        got = losses(dirs[w])
        assert got[3] == pytest.approx(ref[3], rel=1e-4) and got[4] == pytest.approx(ref[4], rel=1e-4), (w, got, ref)
        assert "DeepSpeed universal checkpoint); data position kept" in procs[w].stdout
        state = json.loads((dirs[w] / "checkpoints" / "step00000004" / "omni_rank0.json").read_text())
        assert state["consumed"] == 4 * GAS[w]  # the step-4 position in this world's units
        assert json.loads((dirs[w] / "checkpoints" / "step00000004" / "COMPLETE").read_text())["world_size"] == w
    assert "universal" not in procs[2].stdout  # the same world size loads the checkpoint as it is
    from omni.train.ema import merge_ema_shards

    ema = {w: merge_ema_shards(d / "checkpoints" / "step00000004") for w, d in dirs.items()}
    for w in (1, 4):  # the EMA shadow was cut anew for the world size and kept averaging
        assert ema[w].keys() == ema[2].keys()
        assert all(torch.allclose(ema[w][k], ema[2][k], rtol=1e-4, atol=1e-5) for k in ema[2])
