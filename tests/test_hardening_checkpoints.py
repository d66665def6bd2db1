"""Untrusted run directories run no code: DeepSpeed checkpoints are read with weights_only=True.

A pickle planted in a tag's model states or optimizer states (an object whose `__reduce__`
writes a marker file) must be refused by `omni train --resume` and by `omni export`, naming the
file, and the marker must not appear. Real checkpoints of every ZeRO stage still load.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY

from omni.config import load_config
from omni.layout import SpecialIds
from omni.tokenizers.text import TextTokenizer
from omni.train.synthetic import SyntheticBatches

SEQ, N_IMAGE, TOKEN_DIM = 48, 16, 192


def run_cfg(tokenizer_dir, out: Path, *overrides: str):
    return load_config("tiny", [
        f"model.tokenizer={tokenizer_dir}", *TINY, f"train.out_dir={out}", "train.precision=fp32",
        "train.steps=2", "train.save_every=100", "train.log_every=1", "train.val_every=0", "train.warmup_steps=2",
        "data.batch_size=2", f"data.seq_len={SEQ}", *overrides,
    ])


def synthetic(tokenizer_dir):
    tok = TextTokenizer.from_pretrained(tokenizer_dir)
    special = SpecialIds(tok.bos_id, tok.eos_id, tok.pad_id, tok.boi_id, tok.eoi_id, tok.img_id)
    return lambda rank, world: SyntheticBatches(special, len(tok), TOKEN_DIM, N_IMAGE, rows=2, seq_len=SEQ,
                                                rank=rank, world_size=world)


class Planted:
    """Unpickling this runs `exec`, which writes the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def plant(file: Path, marker: Path) -> None:
    state = torch.load(file, weights_only=False)  # our own file, written by the test's run
    state["planted"] = Planted(marker)
    torch.save(state, file)


@pytest.fixture(scope="module")
def runs(tokenizer_dir, tmp_path_factory):
    """A finished 2-step run per ZeRO stage (one process, in this process)."""
    from omni.train.loop import train

    root = tmp_path_factory.mktemp("runs")
    out = {}
    for stage in (0, 1, 2, 3):
        out[stage] = train(run_cfg(tokenizer_dir, root / f"zero{stage}", f"train.zero_stage={stage}"),
                           batches=synthetic(tokenizer_dir))
    return out


def copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_real_checkpoints_export_and_resume_under_weights_only(runs, tokenizer_dir, tmp_path, stage):
    from omni.train.export import export
    from omni.train.loop import train

    ckpt = export(runs[stage], tmp_path / "export", ema=False)
    assert (ckpt / "model.safetensors").exists()
    run = copy_run(runs[stage], tmp_path / "run")
    train(run_cfg(tokenizer_dir, run, f"train.zero_stage={stage}", "train.steps=3", "train.resume=auto"),
          batches=synthetic(tokenizer_dir))
    assert json.loads((run / "checkpoints" / "step00000003" / "COMPLETE").read_text())["step"] == 3


PLANTS = {  # ZeRO stage -> the DeepSpeed files a resume and an export read
    "model_states": (2, "mp_rank_00_model_states.pt"),
    "optim_states": (2, "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
    "zero3_model_states": (3, "zero_pp_rank_0_mp_rank_00_model_states.pt"),
}


@pytest.mark.parametrize("which", sorted(PLANTS))
def test_planted_pickle_is_refused_by_resume(runs, tokenizer_dir, tmp_path, which):
    import torch.distributed as dist

    from omni.train.loop import train
    from omni.train.safe_load import UnsafeCheckpointError

    stage, name = PLANTS[which]
    run = copy_run(runs[stage], tmp_path / "run")
    file, marker = run / "checkpoints" / "step00000002" / name, tmp_path / "marker"
    plant(file, marker)
    cfg = run_cfg(tokenizer_dir, run, f"train.zero_stage={stage}", "train.steps=3", "train.resume=auto")
    with pytest.raises(UnsafeCheckpointError, match=rf"{name}: refused to load: it holds the object exec"):
        train(cfg, batches=synthetic(tokenizer_dir))
    assert not marker.exists()
    assert not dist.is_initialized()  # the refused resume closed its process group


@pytest.mark.parametrize("which", sorted(PLANTS))
def test_planted_pickle_is_refused_by_export(runs, tmp_path, which):
    from omni.train.export import export
    from omni.train.safe_load import UnsafeCheckpointError

    stage, name = PLANTS[which]
    run = copy_run(runs[stage], tmp_path / "run")
    file, marker = run / "checkpoints" / "step00000002" / name, tmp_path / "marker"
    plant(file, marker)
    with pytest.raises(UnsafeCheckpointError, match=rf"{name}: refused to load"):
        export(run, tmp_path / "export", ema=False)
    assert not marker.exists()
    assert not (tmp_path / "export").exists()


def test_export_cli_reports_the_refusal_in_one_line(runs, tmp_path, capsys):
    from omni.cli import main

    run = copy_run(runs[2], tmp_path / "run")
    marker = tmp_path / "marker"
    plant(run / "checkpoints" / "step00000002" / "mp_rank_00_model_states.pt", marker)
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "export")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refused to load" in err[0] and "Traceback" not in err[0]
    assert not marker.exists()


def test_torch_load_is_restored_after_the_context():
    from omni.train.safe_load import no_code_torch_load

    before = torch.load
    with no_code_torch_load():
        assert torch.load is not before
    assert torch.load is before
