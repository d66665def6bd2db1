"""A single-process run listens on no outside interface, its outputs follow the user's umask, and a
second `omni train` cannot enter a live output directory (a dead holder's lock is taken over)."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from test_hardening_checkpoints import run_cfg, synthetic

from omni.train.runlock import LOCK, RunLock, RunLocked


def listening_sockets() -> list[str]:
    """Local addresses (hex, as /proc/net/tcp writes them) this process listens on."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = []
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            parts = line.split()
            if parts[3] == "0A" and parts[9] in inodes:  # 0A = LISTEN
                out.append(parts[1].split(":")[0])
    return out


LOOPBACK = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}


@pytest.mark.skipif(not Path("/proc/self/net/tcp").exists(), reason="needs Linux /proc")
def test_single_process_group_listens_on_loopback_only():
    import torch.distributed as dist

    from omni.train.engine import close_distributed, init_distributed

    before = os.environ.get("GLOO_SOCKET_IFNAME")
    d = init_distributed()
    try:
        assert dist.is_initialized() and dist.get_world_size() == 1
        addresses = listening_sockets()
        assert set(addresses) <= LOOPBACK, f"listening on {addresses}"
    finally:
        close_distributed(d)
    assert os.environ.get("GLOO_SOCKET_IFNAME") == before  # what the run set for itself is undone


def test_outputs_follow_the_umask(tokenizer_dir, tmp_path):
    from omni.train.export import export
    from omni.train.loop import train

    old = os.umask(0o022)
    try:
        run = train(run_cfg(tokenizer_dir, tmp_path / "run"), batches=synthetic(tokenizer_dir))
        ckpt = export(run, tmp_path / "export", ema=False)
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)
    assert mode(ckpt) == 0o755 and mode(ckpt / "model.safetensors") == 0o644
    assert mode(ckpt / "export.json") == 0o644 and mode(ckpt / "config.yaml") == 0o644
    assert mode(run / "config.yaml") == 0o644 and mode(run / "checkpoints" / "latest") == 0o644
    assert not (run / LOCK).exists()  # released at the end


def test_a_live_lock_refuses_a_second_run(tokenizer_dir, tmp_path):
    from omni.train.loop import train

    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run.mkdir()
        (run / LOCK).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "time": "t"}))
        with pytest.raises(RunLocked, match=rf"in use by another omni train: process {holder.pid} on "):
            train(run_cfg(tokenizer_dir, run), batches=synthetic(tokenizer_dir))
        assert json.loads((run / LOCK).read_text())["pid"] == holder.pid  # left alone
        assert not (run / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder is dead now: its lock is stale, taken over and reported
    train(run_cfg(tokenizer_dir, run), batches=synthetic(tokenizer_dir))
    assert f"took over a stale lock of process {holder.pid}" in (run / "log.txt").read_text()
    assert not (run / LOCK).exists()


def test_lock_from_another_host_is_not_taken(tmp_path):
    (tmp_path / LOCK).write_text(json.dumps({"pid": 1, "host": "some-other-node", "time": "t"}))
    with pytest.raises(RunLocked, match="process 1 on some-other-node .* if that run is dead, delete"):
        RunLock(tmp_path).acquire()
    lock = RunLock(tmp_path / "fresh").acquire()
    with pytest.raises(RunLocked):
        RunLock(tmp_path / "fresh").acquire()  # this process holds it: a second taker is refused
    lock.release()
    RunLock(tmp_path / "fresh").acquire().release()


def test_a_second_demo_on_the_same_out_is_refused_before_any_work(tmp_path, capsys):
    """`omni demo` holds its output directory: a second one (another terminal's `make demo`) stops
    at once, naming the holder, and writes nothing (it would rewrite the first one's shards, tokenizer
    and autoencoder under its training)."""
    from omni.cli import main
    from omni.train.runlock import DEMO_LOCK

    out = tmp_path / "demo"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / DEMO_LOCK).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "time": "t"}))
        assert main(["demo", "--out", str(out), "--quick", "--no-preview"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"in use by another omni demo: process {holder.pid} on " in err[0], err
        assert "choose another --out" in err[0]
        assert sorted(p.name for p in out.iterdir()) == [DEMO_LOCK]  # nothing else written
        assert json.loads((out / DEMO_LOCK).read_text())["pid"] == holder.pid  # left alone
    finally:
        holder.kill()
        holder.wait()
    # the holder is dead now: the lock is stale and a demo would take it over
    lock = RunLock(out, name=DEMO_LOCK, command="omni demo", option="--out").acquire()
    assert lock.took_over["pid"] == holder.pid
    lock.release()
    assert not (out / DEMO_LOCK).exists()


def test_a_demo_stage_stopped_by_a_signal_is_not_exported_and_resumes(tokenizer_dir, tmp_path, monkeypatch):
    """A SIGTERM in one of the demo's training stages saves a checkpoint and stops the demo with a
    message; the stage is not exported as if done (it was, and the next stage trained on a model of
    a few steps, and a re-run skipped the stage for good). The same command continues it, and an
    earlier export of an unfinished stage is trained on, not skipped."""
    from test_train_run import records

    from omni import demo
    from omni.train import loop
    from omni.train.checkpointing import saved_step
    from omni.train.export import exported_step

    cfg = run_cfg(tokenizer_dir, tmp_path / "run", "train.resume=auto", "train.steps=4")
    train, prepare = loop.train, loop.prepare
    monkeypatch.setattr(loop, "train", lambda c: train(c, batches=synthetic(tokenizer_dir)))

    def signalled_at_step_2(*args, **kwargs):
        run = prepare(*args, **kwargs)
        advance = run.monitor.advance

        def signal_after(step: int) -> None:
            advance(step)
            if step == 2:
                run.stop.received = "SIGTERM"  # what the handler sets; the loop stops after its next step
        run.monitor.advance = signal_after
        return run

    model = tmp_path / "model"
    with monkeypatch.context() as m:
        m.setattr(loop, "prepare", signalled_at_step_2)
        with pytest.raises(loop.TrainingError, match=r"stopped at step 3 of 4 \(its checkpoint is saved\); run the same"):
            demo.train_and_export(tmp_path, cfg, force=False, model_dir=model)
    assert not model.exists() and saved_step(tmp_path / "run") == 3
    demo.train_and_export(tmp_path, cfg, force=False, model_dir=model)  # the same call again: steps 4..4
    assert json.loads((model / "export.json").read_text())["step"] == 4
    assert [r["step"] for r in records(tmp_path / "run")][-1] == 4

    # an export of an unfinished stage (left by a demo before this check) is trained on, not skipped
    meta = json.loads((model / "export.json").read_text())
    (model / "export.json").write_text(json.dumps({**meta, "step": 3}))
    assert exported_step(model) == 3
    more = run_cfg(tokenizer_dir, tmp_path / "run", "train.resume=auto", "train.steps=5")
    demo.train_and_export(tmp_path, more, force=False, model_dir=model)
    assert json.loads((model / "export.json").read_text())["step"] == 5
