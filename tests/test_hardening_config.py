"""Settings mean what they say: mapping overrides replace the mapping; a resume that changes a
recorded setting applies it (and says so) or refuses with the reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import TINY

from omni.config import load_config
from omni.layout import SpecialIds
from omni.tokenizers.text import TextTokenizer
from omni.train.synthetic import SyntheticBatches

SEQ, N_IMAGE, TOKEN_DIM = 48, 16, 192


def test_a_mapping_override_replaces_the_presets_mapping():
    assert len(load_config("tiny").data.task_weights) > 1  # the preset has several tasks
    assert load_config("tiny", ["data.task_weights={t2i: 1.0}"]).data.task_weights == {"t2i": 1.0}
    assert load_config("tiny", ["data.task_weights={}"]).data.task_weights == {}
    one = load_config("tiny", ["data.task_weights.vqa=0.5"]).data.task_weights  # a dotted entry sets one weight
    assert one["vqa"] == 0.5 and one["t2i"] == load_config("tiny").data.task_weights["t2i"]
    head = load_config("tiny", ["model.head={width: 64}"]).model.head  # sections still merge field by field
    assert head.width == 64 and head.depth == load_config("tiny").model.head.depth


def test_a_yaml_mapping_replaces_its_bases_mapping(tmp_path):
    path = tmp_path / "child.yaml"
    path.write_text(yaml.safe_dump({"base": "tiny", "data": {"task_weights": {"caption": 1.0}}}))
    assert load_config(path).data.task_weights == {"caption": 1.0}


def run_cfg(tokenizer_dir, out: Path, *overrides: str):
    return load_config("tiny", [
        f"model.tokenizer={tokenizer_dir}", *TINY, f"train.out_dir={out}", "train.precision=fp32",
        "train.steps=4", "train.save_every=2", "train.log_every=1", "train.val_every=0", "train.warmup_steps=2",
        "train.lr=1e-3", "data.batch_size=2", f"data.seq_len={SEQ}", *overrides,
    ])


def synthetic(tokenizer_dir):
    tok = TextTokenizer.from_pretrained(tokenizer_dir)
    special = SpecialIds(tok.bos_id, tok.eos_id, tok.pad_id, tok.boi_id, tok.eoi_id, tok.img_id)
    return lambda rank, world: SyntheticBatches(special, len(tok), TOKEN_DIM, N_IMAGE, rows=2, seq_len=SEQ,
                                                rank=rank, world_size=world)


def lrs(run_dir: Path) -> dict[int, float]:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["lr"] for r in recs if r["kind"] == "train"}


@pytest.fixture(scope="module")
def half_run(tokenizer_dir, tmp_path_factory):
    """A run stopped at step 2 of 4 (checkpoint step00000002), lr 1e-3."""
    from omni.train.loop import train

    out = tmp_path_factory.mktemp("half") / "run"
    train(run_cfg(tokenizer_dir, out, "train.steps=2"), batches=synthetic(tokenizer_dir))
    return out


def test_resume_with_a_new_lr_applies_it_and_says_so(half_run, tokenizer_dir, tmp_path):
    import shutil

    from omni.train.loop import train

    run = tmp_path / "run"
    shutil.copytree(half_run, run)
    train(run_cfg(tokenizer_dir, run, "train.lr=5e-4", "train.resume=auto"), batches=synthetic(tokenizer_dir))
    straight = train(run_cfg(tokenizer_dir, tmp_path / "straight", "train.lr=5e-4"), batches=synthetic(tokenizer_dir))
    got, want = lrs(run), lrs(straight)
    assert got[3] == pytest.approx(want[3], rel=1e-9) and got[4] == pytest.approx(want[4], rel=1e-9)
    assert got[2] == pytest.approx(2 * want[2], rel=1e-9)  # the first half ran at 1e-3
    log = (run / "log.txt").read_text()
    assert "resumed with changed settings, now in effect: train.steps 2 -> 4; train.lr 0.001 -> 0.0005" in log
    assert load_config(run / "config.yaml").train.lr == 5e-4


@pytest.mark.parametrize("override,why", [
    ("model.head.width=32", "the checkpoint's weights have the old model's shapes"),
    ("train.zero_stage=1", "the checkpoint's files are ZeRO-0 partitions"),
])
def test_resume_refuses_a_change_that_cannot_take_effect(half_run, tokenizer_dir, tmp_path, override, why):
    import shutil

    from omni.train.loop import train

    run = tmp_path / "run"
    shutil.copytree(half_run, run)
    key, value = override.split("=")
    with pytest.raises(ValueError, match=rf"cannot resume .*step00000002 with {key}={value}: {why}\. Resume with {key}="):
        train(run_cfg(tokenizer_dir, run, override, "train.resume=auto"), batches=synthetic(tokenizer_dir))
    assert load_config(run / "config.yaml").train.steps == 2  # nothing rewritten
