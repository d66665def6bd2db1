"""A training step that does not block: at most one host read of a device value per micro-batch
from the loop (the finite check), metrics read only when a line is logged."""

from __future__ import annotations

import pytest
from host_reads import count_host_reads
from test_train_run import records, run_cfg, synthetic

# torch's AdamW (fused, not capturable) keeps its step counters as host tensors and reads them
# as Python numbers: host memory, no wait for a device, so they are not counted.
# The synthetic batch source builds its host-side rows with reads of host tensors: not the step's.
NOT_THE_STEP = ("torch/optim/", "omni/train/synthetic.py")


@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_one_host_read_per_step_and_metrics_only_when_logged(tokenizer_dir, tmp_path, monkeypatch, attention):
    from omni.train import loop

    steps, log_every = 6, 3
    cfg = run_cfg(tokenizer_dir, tmp_path / "run", f"train.steps={steps}", f"train.log_every={log_every}",
                  "train.save_every=1000", f"model.prompt_image_attention={attention}",
                  # the GPU kernels' paths; the tiny preset's `grouped` is a CPU kernel that reads the
                  # documents' lengths from the host batch (tests/test_grouped_attention.py)
                  "model.backbone.attn_implementation=sdpa")
    run = loop.prepare(cfg, batches=synthetic(tokenizer_dir))
    counter = count_host_reads(ignore=NOT_THE_STEP)
    inside = {"log_train": 0, "save": 0}
    calls = {"log_train": 0, "save": 0}

    def measured(name, fn):
        def wrapped(*args, **kwargs):
            before = mode.n
            result = fn(*args, **kwargs)
            inside[name] += mode.n - before
            calls[name] += 1
            return result
        return wrapped

    monkeypatch.setattr(loop, "log_train", measured("log_train", loop.log_train))
    monkeypatch.setattr(loop, "save", measured("save", loop.save))
    try:
        with counter as mode:
            loop.fit(run)
    finally:
        loop.finish(run, True)
    per_step = mode.n - inside["log_train"] - inside["save"]
    # Per step: the loop's finite check (1) and, with causal given pictures, the dense-mask path's
    # "is every row one document?" (1; bidirectional given pictures always build the mask, and the
    # flex_attention and varlen paths read nothing, tests/test_packed_attention.py). Before #25's
    # work the step read 10 values: 5 metrics, the finite check, the token count, the LM loss's
    # label count, the image-cell guard and the mask decision (bidirectional: 3 more).
    assert per_step == (2 if attention == "causal" else 1) * steps, mode.where
    loop_reads = sum(v for k, v in mode.where.items() if k.startswith("loop.py"))
    assert loop_reads - inside["log_train"] - inside["save"] <= steps  # the loop itself: <= 1 per step
    assert calls["log_train"] == steps // log_every
    assert inside["log_train"] <= 3 * calls["log_train"]  # the interval's sums: a few reads per logged line
    recs = records(tmp_path / "run")
    assert [r["step"] for r in recs] == [3, 6]
    for r in recs:
        assert r["loss"] == pytest.approx(r["loss_text"] + r["loss_image"], rel=1e-6)
        assert r["tokens"] == log_every * 2 * (2 * 12 + 16 + 4)
