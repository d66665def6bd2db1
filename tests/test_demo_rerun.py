"""A re-run demo whose evaluation directories hold another run's samples evaluates afresh."""

from __future__ import annotations

import json

from omni import demo
from omni.eval import harness


def test_rerun_demo_evaluates_afresh_when_settings_changed(tmp_path, monkeypatch):
    calls = []

    def fake_evaluate(model, name, run_dir, overwrite=False, **kw):
        calls.append(overwrite)
        # The real check, on a directory that holds a run with other settings.
        harness._check_run(run_dir, {"generation": {"image_steps": 20}}, overwrite)
        return {"overall": 1.0}

    run_dir = tmp_path / "shapes-t2i"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"generation": {"image_steps": 50}}))
    monkeypatch.setattr(harness, "evaluate", fake_evaluate)
    assert demo._evaluate(None, "shapes-t2i", run_dir, limit=4) == {"overall": 1.0}
    assert calls == [False, True]  # refused as a mismatch, then redone with overwrite
    assert json.loads((run_dir / "run.json").read_text()) == {"generation": {"image_steps": 20}}
    # Matching settings resume without overwriting.
    calls.clear()
    demo._evaluate(None, "shapes-t2i", run_dir, limit=4)
    assert calls == [False]


def test_demo_trains_editing_first_then_the_mix_in_the_steps_of_one_run(tmp_path):
    import pytest

    paths = demo.data_paths(tmp_path)
    assert demo.edit_first_steps(3600) == 1200 and demo.edit_first_steps(400) == 133
    first, main = demo.stage_configs(tmp_path, paths, ["train.seed=3", "train.steps=3000"], 1000)
    # The first stage: editing documents alone, from their own shards, in a run directory of its own.
    assert first.data.task_weights == {"edit": 1.0}
    assert first.data.train == [f"{paths['shapes_edit']}/train-*.tar"]
    assert first.data.val == [f"{paths['shapes_edit']}/val-*.tar"]
    assert (first.train.steps, first.train.out_dir, first.train.init_from) == (1000, str(tmp_path / "run-edit"), None)
    # The second: the preset's full mix for the rest of the steps, from the first stage's export.
    assert main.train.init_from == str(tmp_path / "model-edit") and main.train.steps == 2000
    assert main.train.out_dir == str(tmp_path / "run")
    assert main.data.task_weights == demo.train_config(tmp_path, paths, []).data.task_weights
    assert first.train.seed == main.train.seed == 3 and first.model == main.model
    # 0: the mix alone, as one run; a stage that leaves the mix no steps, or a negative one, is refused.
    none, alone = demo.stage_configs(tmp_path, paths, ["train.steps=3000"], 0)
    assert none is None and alone.train.steps == 3000 and alone.train.init_from is None
    with pytest.raises(ValueError, match="must leave steps for the mix"):
        demo.stage_configs(tmp_path, paths, ["train.steps=3000"], 3000)
    with pytest.raises(ValueError, match="0 or more"):
        demo.stage_configs(tmp_path, paths, [], -1)


def test_demo_editing_first_stage_can_read_other_shapes_tasks_beside_the_edits(tmp_path):
    import pytest

    paths = demo.data_paths(tmp_path)
    first, main = demo.stage_configs(tmp_path, paths, ["train.steps=3000"], 1000, {"edit": 0.7, "t2i": 0.3})
    # Editing documents from their shards, drawing ones from the main shapes shards, in those shares.
    assert first.data.task_weights == {"edit": 0.7, "t2i": 0.3}
    assert first.data.train == [f"{paths['shapes_edit']}/train-*.tar::{paths['shapes']}/train-*.tar"]
    assert first.data.val == [f"{paths['shapes_edit']}/val-*.tar"]
    assert first.train.steps == 1000 and main.train.steps == 2000
    assert main.data.task_weights == demo.train_config(tmp_path, paths, []).data.task_weights
    for bad in ({"t2i": 1.0}, {"edit": 0.0, "t2i": 1.0}, {"edit": 1.0, "t2i": -0.5}):
        with pytest.raises(ValueError, match="positive edit weight"):
            demo.stage_configs(tmp_path, paths, ["train.steps=3000"], 1000, bad)


def test_a_parallel_demo_learns_editing_one_token_a_pass_first(tmp_path):
    """With model.parallel_image the editing-first stage draws one token a pass on the preset's rows;
    the mix turns parallel decoding on from its export. --edit-first-parallel keeps the queries in
    both stages."""
    paths = demo.data_paths(tmp_path)
    par = ["model.parallel_image=4|1|16", "model.parallel_order=blocks", "model.head.group_attention=true",
           "data.seq_len=224", "data.batch_size=14", "train.steps=3000"]
    preset = demo.train_config(tmp_path, paths, []).data
    first, main = demo.stage_configs(tmp_path, paths, par, 1000)
    assert (first.model.parallel_image, first.model.parallel_order, first.model.head.group_attention) == (
        "off", "raster", False)
    assert (first.data.seq_len, first.data.batch_size) == (preset.seq_len, preset.batch_size) == (160, 16)
    assert (main.model.parallel_image, main.model.parallel_order, main.model.head.group_attention) == (
        "4|1|16", "blocks", True)
    assert (main.data.seq_len, main.data.batch_size) == (224, 14)
    assert main.train.init_from == str(tmp_path / "model-edit") and first.train.steps == 1000
    assert first == demo.stage_configs(tmp_path, paths, ["train.steps=3000"], 1000)[0]  # the one-token demo's stage
    both, _ = demo.stage_configs(tmp_path, paths, par, 1000, first_parallel=True)
    assert both.model == main.model and (both.data.seq_len, both.data.batch_size) == (224, 14)
    plain, _ = demo.stage_configs(tmp_path, paths, ["data.seq_len=192", "train.steps=3000"], 1000)
    assert plain.data.seq_len == 192  # a one-token demo's rows are the user's
    import pytest

    with pytest.raises(ValueError, match="--edit-first-parallel .* needs parallel decoding"):
        demo.stage_configs(tmp_path, paths, ["train.steps=3000"], 1000, first_parallel=True)


def test_refused_demo_flags_leave_nothing_behind(tmp_path, capsys):
    """A flag the demo refuses is refused before its output folder (or lock) is made."""
    from omni.cli import main

    for flags, message in ((["--edit-first-parallel"], "needs parallel decoding"),
                           (["--edit-kinds", "spin=2"], "spin"),
                           (["--edit-docs", "0"], "--edit-docs 0"),
                           (["--edit-first-steps", "-1"], "0 or more")):
        out = tmp_path / "demo"
        assert main(["demo", "--out", str(out), *flags]) != 0
        assert message in capsys.readouterr().err
        assert not out.exists(), flags
