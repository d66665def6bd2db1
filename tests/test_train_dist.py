"""Training across processes: exact resume after SIGKILL / SIGTERM, ZeRO-1/2/3 on 2 ranks against
1 rank, export from ZeRO-3 against the live engine, and a 2-node torchrun launch.

Every run here is a separate process (as in real use), started with one thread each so the
results are bit-comparable between runs and the shared CPU is not oversubscribed."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

SEQ, N_IMAGE, TOKEN_DIM = 48, 16, 192

# A driver run by `python` or `torchrun`: trains each entry of spec["runs"] on synthetic batches.
SCRIPT = r'''
import json, os, signal, sys
import torch
from safetensors.torch import save_file
from omni.config import load_config
from omni.layout import SpecialIds
from omni.tokenizers.text import TextTokenizer
from omni.train import loop
from omni.train.engine import close_distributed, init_distributed
from omni.train.synthetic import SyntheticBatches

spec = json.loads(open(sys.argv[1]).read())
tok = TextTokenizer.from_pretrained(spec["tok"])
special = SpecialIds(tok.bos_id, tok.eos_id, tok.pad_id, tok.boi_id, tok.eoi_id, tok.img_id)


class Source(SyntheticBatches):
    """Logs each batch index it hands out; may signal its own process at one index."""

    def __iter__(self):
        for batch in super().__iter__():
            i = self.index - 1
            if i == spec.get("kill_at"):
                os.kill(os.getpid(), getattr(signal, spec["signal"]))
            if spec.get("consumed_log"):
                with open(spec["consumed_log"], "a") as f:
                    f.write(f"{i}\n")
            yield batch


d = init_distributed()
for r in spec["runs"]:
    cfg = load_config("tiny", r["overrides"])
    source = lambda rank, world: Source(special, len(tok), spec["dim"], spec["n"], rows=cfg.data.batch_size,
                                        seq_len=cfg.data.seq_len, rank=rank, world_size=world,
                                        grad_accum=cfg.train.grad_accum)
    run = loop.prepare(cfg, batches=source)
    loop.fit(run)
    if r.get("live"):  # outputs of the live engine on a fixed batch, for the export check
        run.engine.eval()
        batch = SyntheticBatches(special, len(tok), spec["dim"], spec["n"], rows=2, seq_len=cfg.data.seq_len, seed=7).chunk(0, 0)
        with torch.no_grad():
            out = loop.forward(run, batch, index=777)
            hidden = run.model.hidden_states(batch.to(run.engine.device))
        if d.rank == 0:
            save_file({"loss_text": out["loss_text"].reshape(1), "loss_image": out["loss_image"].reshape(1),
                       "hidden": hidden.contiguous()}, r["live"])
    loop.finish(run, True)
    if r.get("export"):  # an inference checkpoint for a later run's train.init_from
        if d.rank == 0:
            from omni.train.export import export
            export(cfg.train.out_dir, r["export"], ema=False)
        torch.distributed.barrier()
close_distributed(d)
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    e = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def overrides(tokenizer_dir, out: Path, *extra: str) -> list[str]:
    return [f"model.tokenizer={tokenizer_dir}", *TINY, f"train.out_dir={out}", "train.precision=fp32",
            "train.log_every=1", "train.val_every=0", "train.warmup_steps=3", "data.batch_size=2",
            f"data.seq_len={SEQ}", *extra]


def launch(tmp_path: Path, spec: dict, nproc: int = 1, name: str = "spec") -> subprocess.CompletedProcess:
    script = tmp_path / "driver.py"
    script.write_text(SCRIPT)
    spec_path = tmp_path / f"{name}.json"
    spec_path.write_text(json.dumps({"dim": TOKEN_DIM, "n": N_IMAGE, **spec}))
    if nproc == 1:
        cmd = [sys.executable, str(script), str(spec_path)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script), str(spec_path)]
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600, check=False)


def losses(run_dir: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if r["kind"] == "train"}


def weights(run_dir: Path, out: Path, ema: bool) -> dict[str, torch.Tensor]:
    from omni.train.export import export

    return load_file(export(run_dir, out, ema=ema) / "model.safetensors")


def test_exact_resume_after_sigkill_and_after_sigterm(tokenizer_dir, tmp_path):
    base = ["train.steps=10", "train.ema_decay=0.9"]
    straight, killed, termed = tmp_path / "straight", tmp_path / "killed", tmp_path / "termed"

    def spec(out, *extra, **kw):
        return {"tok": str(tokenizer_dir), "runs": [{"overrides": overrides(tokenizer_dir, out, *base, *extra)}],
                "consumed_log": str(out) + ".consumed", **kw}

    r = launch(tmp_path, spec(straight, "train.save_every=5"))
    assert r.returncode == 0, r.stderr[-3000:]
    # SIGKILL while drawing batch 5, right after the step-5 checkpoint: no chance to clean up.
    r = launch(tmp_path, spec(killed, "train.save_every=5", kill_at=5, signal="SIGKILL"))
    assert r.returncode == -signal.SIGKILL
    assert (killed / "checkpoints" / "latest").read_text() == "step00000005"
    r = launch(tmp_path, spec(killed, "train.save_every=5", "train.resume=auto"))
    assert r.returncode == 0, r.stderr[-3000:]
    # SIGTERM while drawing batch 6: step 7 finishes, a checkpoint is saved, the process exits 0.
    r = launch(tmp_path, spec(termed, "train.save_every=100", kill_at=6, signal="SIGTERM"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "stopped by SIGTERM at step 7; checkpoint saved" in (termed / "log.txt").read_text()
    assert (termed / "checkpoints" / "latest").read_text() == "step00000007"
    r = launch(tmp_path, spec(termed, "train.save_every=100", "train.resume=auto"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in (termed / "log.txt").read_text()

    consumed = {p: [int(x) for x in Path(str(p) + ".consumed").read_text().split()] for p in (straight, killed, termed)}
    assert consumed[straight] == list(range(10))
    assert consumed[killed] == list(range(10))  # 0-4, killed, then 5-9 after resume
    assert consumed[termed] == list(range(10))  # 0-6, SIGTERM, then 7-9
    for run in (killed, termed):
        assert losses(run) == losses(straight)  # every step's loss, bit for bit
        for ema in (False, True):
            a = weights(straight, tmp_path / f"a{ema}", ema)
            b = weights(run, tmp_path / f"{run.name}{ema}", ema)
            assert a.keys() == b.keys()
            assert all(torch.equal(a[k], b[k]) for k in a), ema


def _save_pretrained_backbone(tokenizer_dir, path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from omni.tokenizers.text import TextTokenizer

    torch.manual_seed(123)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=len(TextTokenizer.from_pretrained(tokenizer_dir)), hidden_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                      max_position_embeddings=128))
    hf.save_pretrained(path)


def test_zero_stages_on_two_ranks_match_one_rank_and_zero3_export(tokenizer_dir, tmp_path):
    """Same global batch (4 rows) and seed: 1 rank x 2 accumulation steps vs 2 ranks x 1, ZeRO-1/2/3.

    All runs start from a pretrained backbone directory, so ZeRO-3 also exercises partitioned
    construction (deepspeed.zero.Init) with rank-0 loading, against HF from_pretrained elsewhere.
    lr 2e-4: Adam divides by sqrt(v) + eps, which amplifies reduction-order rounding for the rare
    weight whose gradient is ~eps; at lr 1e-3 one weight in 200k moved 2e-5 apart under ZeRO-3.
    """
    pretrained = tmp_path / "hf"
    _save_pretrained_backbone(tokenizer_dir, pretrained)
    common = ["train.steps=5", "train.lr=2e-4", "train.ema_decay=0.8", f"model.backbone.pretrained={pretrained}"]
    runs = [{"overrides": overrides(tokenizer_dir, tmp_path / f"zero{s}", *common, f"train.zero_stage={s}"),
             **({"live": str(tmp_path / "live.safetensors"), "export": str(tmp_path / "z3init")} if s == 3 else {})}
            for s in (1, 2, 3)]
    # ZeRO-3 started from an omni checkpoint (train.init_from), lr 0: the weights must come back unchanged.
    runs.append({"overrides": overrides(tokenizer_dir, tmp_path / "init3", "train.steps=1", "train.lr=0",
                                        "train.zero_stage=3", f"train.init_from={tmp_path / 'z3init'}")})
    dist = launch(tmp_path, {"tok": str(tokenizer_dir), "runs": runs}, nproc=2, name="dist")
    assert dist.returncode == 0, dist.stderr[-3000:]
    ref = launch(tmp_path, {"tok": str(tokenizer_dir), "runs": [
        {"overrides": overrides(tokenizer_dir, tmp_path / "ref", *common, "train.grad_accum=2")}]}, name="ref")
    assert ref.returncode == 0, ref.stderr[-3000:]

    ref_losses = losses(tmp_path / "ref")
    assert sorted(ref_losses) == [1, 2, 3, 4, 5]
    ref_raw, ref_ema = weights(tmp_path / "ref", tmp_path / "ref_raw", False), weights(tmp_path / "ref", tmp_path / "ref_ema", True)
    for s in (1, 2, 3):
        run = tmp_path / f"zero{s}"
        assert f"2 rank(s), ZeRO-{s}" in (run / "log.txt").read_text()
        got = losses(run)
        assert got.keys() == ref_losses.keys()
        for k in got:
            assert got[k] == pytest.approx(ref_losses[k], rel=1e-5), (s, k)
        for ref_w, ema in ((ref_raw, False), (ref_ema, True)):
            w = weights(run, tmp_path / f"z{s}{ema}", ema)
            assert w.keys() == ref_w.keys()
            for k in w:
                torch.testing.assert_close(w[k], ref_w[k], rtol=1e-5, atol=1e-5, msg=f"ZeRO-{s} {k} ema={ema}")

    # The ZeRO-3 export, loaded by OmniModel.from_pretrained, reproduces the live engine.
    from omni.layout import SpecialIds
    from omni.models.model import OmniModel
    from omni.tokenizers.text import TextTokenizer
    from omni.train.synthetic import SyntheticBatches

    model = OmniModel.from_pretrained(tmp_path / "z3False")  # exported raw weights of the ZeRO-3 run
    tok = TextTokenizer.from_pretrained(tokenizer_dir)
    special = SpecialIds(tok.bos_id, tok.eos_id, tok.pad_id, tok.boi_id, tok.eoi_id, tok.img_id)
    batch = SyntheticBatches(special, len(tok), TOKEN_DIM, N_IMAGE, rows=2, seq_len=SEQ, seed=7).chunk(0, 0)
    live = load_file(tmp_path / "live.safetensors")
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0 * 1_000_003 + 777)  # the loop's noise seed for micro-batch index 777
        out = model(batch)
        hidden = model.hidden_states(batch)
    torch.testing.assert_close(hidden, live["hidden"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["loss_text"].reshape(1), live["loss_text"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss_image"].reshape(1), live["loss_image"], rtol=1e-5, atol=1e-6)

    start = load_file(tmp_path / "z3init" / "model.safetensors")
    again = weights(tmp_path / "init3", tmp_path / "init3_raw", False)
    assert start.keys() == again.keys() and all(torch.equal(start[k], again[k]) for k in start)


ZERO_INIT = r'''
from omni.train.build import _partitioned
from omni.train.engine import close_distributed, init_distributed

d = init_distributed()
with _partitioned(True, {"train_batch_size": 1, "zero_optimization": {"stage": 3}}):
    from transformers import LlamaConfig, LlamaForCausalLM  # first use of a model class: imports torch._dynamo

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=64))
w = model.model.embed_tokens.weight
print("partitioned", tuple(w.ds_shape), w.ds_tensor.dtype, w.numel())
close_distributed(d)
'''


def test_zero_init_construction_in_a_fresh_interpreter(tmp_path):
    """deepspeed.zero.Init with torch 2.13: a model class first used inside the context must not hit
    "Signature mismatch ... tensor_pynew", and the partitions must be fp32 (not DeepSpeed's CPU bf16)."""
    script = tmp_path / "zero_init.py"
    script.write_text(ZERO_INIT)
    r = subprocess.run([sys.executable, str(script)], env=env(), capture_output=True, text=True, timeout=300,
                       check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "partitioned (64, 32) torch.float32 0" in r.stdout
