"""Training on real shards (the synthetic shapes world) through omni.data.loader.BatchStream:
the tiny preset learns, corrupt shards and a NaN batch do not stop it, resume is exact with the
real loader, and `python -m omni.train` runs as two torchrun nodes."""

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
from conftest import TINY, decoder_rows, save_tiny_checkpoint
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """Shapes shards (4 x 100 train, 64 val), a tokenizer trained on them, and a truncated copy."""
    from omni.cli import main

    root = tmp_path_factory.mktemp("shapes")
    assert main(["data", "shapes", "--out", str(root), "--train", "400", "--val", "64", "--shard-size", "100"]) == 0
    train = sorted(str(p) for p in root.glob("train-*.tar"))
    assert main(["data", "tokenizer", "--shards", *train, "--out", str(root / "tok")]) == 0
    corrupt = root / "corrupt" / "train-000099.tar"
    corrupt.parent.mkdir()
    data = Path(train[0]).read_bytes()
    corrupt.write_bytes(data[: len(data) // 2 + 777])  # ends in the middle of a member
    return {"train": train, "val": [str(p) for p in root.glob("val-*.tar")], "tok": str(root / "tok"),
            "corrupt": str(corrupt)}


def small_run(shapes, out: Path, *extra: str):
    """The tiny preset at the test sizes on the shapes shards: 2-row batches, fp32, no validation."""
    from omni.config import load_config

    return load_config("tiny", [
        f"model.tokenizer={shapes['tok']}", *TINY, f"data.train=[{','.join(shapes['train'])}]", "data.batch_size=2",
        f"train.out_dir={out}", "train.val_every=0", "train.save_every=100", "train.log_every=1",
        "train.precision=fp32", *extra])


def records(run_dir: Path, kind: str) -> list[dict]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r["kind"] == kind]


class PlantNaN:
    """Wraps a BatchStream and makes chosen batches non-finite; forwards state and stats."""

    def __init__(self, stream, at: tuple[int, ...] = (), term_at: int | None = None):
        self.stream, self.at, self.term_at = stream, set(at), term_at

    def __iter__(self):
        for i, batch in enumerate(self.stream):
            if i in self.at:
                batch.image_tokens[:] = float("nan")
            if i == self.term_at:
                os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler preempting the job would
            yield batch

    @property
    def stats(self):
        return self.stream.stats

    def state_dict(self):
        return self.stream.state_dict()

    def load_state_dict(self, state):
        self.stream.load_state_dict(state)


def stream_factory(cfg, **kw):
    from omni.data.loader import BatchStream
    from omni.tokenizers.image import build_image_tokenizer
    from omni.tokenizers.text import TextTokenizer

    def factory(rank: int, world_size: int):
        tok = TextTokenizer.from_pretrained(cfg.model.tokenizer)
        stream = BatchStream(cfg.data, tok, build_image_tokenizer(cfg.model.image), rank=rank,
                             world_size=world_size, seed=cfg.train.seed)
        return PlantNaN(stream, **kw)

    return factory


@pytest.mark.slow
def test_tiny_preset_learns_shapes_despite_corrupt_shard_and_nan_batch(shapes, tmp_path):
    """The tiny preset as shipped (4.7M parameters), 8-row batches, 40 steps on one process."""
    from omni.config import load_config
    from omni.train.loop import train

    out = tmp_path / "run"
    cfg = load_config("tiny", [
        f"model.tokenizer={shapes['tok']}", f"data.train=[{','.join(shapes['train'] + [shapes['corrupt']])}]",
        f"data.val=[{','.join(shapes['val'])}]", "data.resampled=false", "data.batch_size=8",
        f"train.out_dir={out}", "train.steps=40", "train.warmup_steps=5", "train.log_every=5",
        "train.val_every=20", "train.val_batches=2", "train.save_every=20",
    ])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core CPU: one thread is the steadiest
    try:
        train(cfg, batches=stream_factory(cfg, at=(3,)))
    finally:
        torch.set_num_threads(threads)
    recs = records(out, "train")
    first, last = recs[0], recs[-1]
    assert last["step"] == 40 and last["bad_steps"] == 1
    assert last["data"].get("truncated_tar", 0) >= 1  # the corrupt shard was read, counted, skipped
    assert last["loss_text"] < 0.6 * first["loss_text"], (first, last)
    assert last["loss_image"] < 0.85 * first["loss_image"], (first, last)
    val = records(out, "val")
    assert [v["step"] for v in val] == [0, 20, 40] and val[2]["loss"] < val[1]["loss"] < val[0]["loss"]
    log = (out / "log.txt").read_text()
    assert "non-finite loss, batch skipped" in log and "truncated_tar=" in log
    state = json.loads((out / "checkpoints" / "step00000040" / "omni_rank0.json").read_text())
    assert state["data"]["version"] == 1 and state["data"]["batches"] == 41  # the loader's own position


def test_resume_with_real_loader_is_exact(shapes, tmp_path):
    """SIGTERM mid-run (in this process), resume, and compare with an uninterrupted run."""
    from omni.train.export import export
    from omni.train.loop import train

    def cfg(out, *extra):
        return small_run(shapes, out, "data.seq_len=96", "train.steps=6", "train.warmup_steps=2", "train.ema_decay=0.5",
                         *extra)

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    c = cfg(straight)
    train(c, batches=stream_factory(c))
    c = cfg(resumed)
    train(c, batches=stream_factory(c, term_at=2))  # stops after step 3 with a checkpoint
    assert (resumed / "checkpoints" / "latest").read_text() == "step00000003"
    c = cfg(resumed, "train.resume=auto")
    train(c, batches=stream_factory(c))
    a = load_file(export(straight, tmp_path / "a") / "model.safetensors")
    b = load_file(export(resumed, tmp_path / "b") / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    la = {r["step"]: r["loss"] for r in records(straight, "train")}
    lb = {r["step"]: r["loss"] for r in records(resumed, "train")}
    assert la == lb and sorted(la) == [1, 2, 3, 4, 5, 6]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_torchrun_nodes_train_with_python_m_omni_train(shapes, tmp_path):
    """`torchrun --nnodes 2 --node_rank {0,1}` on 127.0.0.1, one process per node: the multi-node path."""
    out = tmp_path / "run"
    port = free_port()
    args = ["--config", "tiny", f"model.tokenizer={shapes['tok']}", *TINY,
            f"data.train=[{','.join(shapes['train'])}]", f"data.val=[{','.join(shapes['val'])}]",
            "data.batch_size=2", "data.seq_len=96", f"train.out_dir={out}", "train.steps=3", "train.log_every=1",
            "train.val_every=3", "train.val_batches=1", "train.save_every=3", "train.zero_stage=2"]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    nodes = [
        subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(n),
                          "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
                          "-m", "omni.train", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
        for n in (0, 1)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in nodes]
    for p, text in zip(nodes, outputs):
        assert p.returncode == 0, text[-3000:]
    log = (out / "log.txt").read_text()
    assert "2 rank(s), ZeRO-2" in log
    assert [r["step"] for r in records(out, "train")] == [1, 2, 3]
    assert [r["step"] for r in records(out, "val")] == [0, 3]
    complete = json.loads((out / "checkpoints" / "step00000003" / "COMPLETE").read_text())
    assert complete["world_size"] == 2
    assert sorted(p.name for p in (out / "checkpoints" / "step00000003").glob("omni_rank*.json")) == [
        "omni_rank0.json", "omni_rank1.json"]
    assert "run dir:" in outputs[0]


def test_one_token_checkpoint_fine_tuned_into_parallel_decoding(shapes, tmp_path):
    """A run with model.parallel_image from a checkpoint drawn one token a pass: every shared weight
    is the checkpoint's, the position queries and the head's group attention start new (the head
    denoises as before: the attention's output projection is zero), the run trains them and its
    export draws an image in 4 passes. A combination the mode refuses is refused as in a config."""
    from omni.config import GenerationConfig, load_config
    from omni.inference.generate import generate
    from omni.models.model import OmniModel
    from omni.train.build import parallel_only_parameters
    from omni.train.export import export
    from omni.train.loop import train

    def cfg(out, *extra):
        return small_run(shapes, out, "data.seq_len=160", "train.steps=3", "train.warmup_steps=1", "train.ema_decay=0",
                         *extra)

    train(cfg(tmp_path / "one"))
    one = export(tmp_path / "one", tmp_path / "one-model")
    par = ["model.parallel_image=4", "model.parallel_order=blocks", "model.head.group_attention=true"]
    run = tmp_path / "par"
    train(cfg(run, f"train.init_from={one}", "train.lr=1e-2", *par))
    saved = load_config(run / "config.yaml")
    assert (saved.model.parallel_image, saved.model.parallel_order, saved.model.head.group_attention) == (
        "4", "blocks", True)

    before = load_file(one / "model.safetensors")
    start = tmp_path / "par-start"  # the run's first state: its step-0 weights, trained by nothing
    train(cfg(start, f"train.init_from={one}", "train.steps=1", "train.lr=0", *par))
    first = load_file(export(start, tmp_path / "par-start-model") / "model.safetensors")
    model = OmniModel.from_pretrained(tmp_path / "par-start-model", device="cpu")
    new = parallel_only_parameters(model)
    assert new and any(n.startswith("query_embed.") for n in new) and any(".mix." in n for n in new)
    assert set(first) - set(before) == new  # nothing else is new, nothing of the checkpoint is lost
    assert all(torch.equal(before[k], first[k]) for k in before)  # lr 0: the checkpoint's weights as loaded
    assert all(first[k].abs().sum() == 0 for k in new if k.endswith("mix.proj.weight"))  # the head unchanged

    after = load_file(export(run, tmp_path / "par-model") / "model.safetensors")
    assert not torch.equal(after["query_embed.weight"], first["query_embed.weight"])  # the queries train
    assert any(after[k].abs().sum() > 0 for k in new if k.endswith("mix.proj.weight"))  # and the attention
    trained = OmniModel.from_pretrained(tmp_path / "par-model", device="cpu")
    assert trained.groups == [4]
    with decoder_rows(trained) as rows:
        out = generate(trained, [["a red circle."]], GenerationConfig(image_steps=2, cfg_scale=1.0), mode="image",
                       seeds=[0])[0]
    assert len(rows) == 1 + 4  # the prompt's pass, then 4 passes for the 16-token image
    assert out.images and out.images[0].size == (32, 32)

    from omni.config import ConfigError

    weighted = save_tiny_checkpoint(shapes["tok"], tmp_path / "weighted", "model.image_change_weight=2")
    with pytest.raises(ConfigError, match="image_change_weight=2.0 weighs tokens"):  # as a config file's would be
        train(cfg(tmp_path / "bad", f"train.init_from={weighted}", *par))
    assert not (tmp_path / "bad").exists()


def test_parallel_checkpoint_fine_tuned_to_another_schedule(shapes, tmp_path):
    """From a parallel checkpoint, a parallel run trains its own schedule and order (they shape no
    weight) and may add the head's group attention (its only new tensors); a run that does not name
    the order or the group attention keeps the checkpoint's, weights and all."""
    from omni.config import load_config
    from omni.models.model import OmniModel
    from omni.train.export import export
    from omni.train.loop import train

    def start(ckpt, name, *extra):  # the run's step-0 weights (lr 0), exported; and its saved config
        run = tmp_path / name
        train(small_run(shapes, run, "data.seq_len=160", "train.steps=1", "train.warmup_steps=1", "train.lr=0",
                        "train.ema_decay=0", f"train.init_from={ckpt}", *extra))
        return load_config(run / "config.yaml").model, load_file(export(run, tmp_path / f"{name}-model")
                                                                 / "model.safetensors")

    plain = save_tiny_checkpoint(shapes["tok"], tmp_path / "p4", "model.parallel_image=4")
    before = load_file(plain / "model.safetensors")
    cfg, weights = start(plain, "mixed", "model.parallel_image=4|1|16", "model.parallel_order=blocks",
                         "model.head.group_attention=true")
    assert (cfg.parallel_image, cfg.parallel_order, cfg.head.group_attention) == ("4|1|16", "blocks", True)
    added = set(weights) - set(before)
    assert added and all(".mix." in n for n in added) and not set(before) - set(weights)
    assert all(torch.equal(before[k], weights[k]) for k in before)  # the queries included
    assert OmniModel.from_pretrained(tmp_path / "mixed-model", device="cpu").group_choices == [[4], [1], [16]]

    attended = save_tiny_checkpoint(shapes["tok"], tmp_path / "p4ga", "model.parallel_image=4",
                                    "model.parallel_order=blocks", "model.head.group_attention=true")
    before = load_file(attended / "model.safetensors")
    cfg, weights = start(attended, "to16", "model.parallel_image=16")  # order, group attention not named: kept
    assert (cfg.parallel_image, cfg.parallel_order, cfg.head.group_attention) == ("16", "blocks", True)
    assert set(weights) == set(before) and all(torch.equal(before[k], weights[k]) for k in before)
    assert OmniModel.from_pretrained(tmp_path / "to16-model", device="cpu").groups == [16]

    cfg, _ = start(attended, "same")  # parallel decoding not named: the checkpoint's mode, as before
    assert (cfg.parallel_image, cfg.parallel_order, cfg.head.group_attention) == ("4", "blocks", True)
