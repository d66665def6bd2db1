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
