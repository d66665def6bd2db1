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
