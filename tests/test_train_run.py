"""One-process training runs (in this process): faults, validation, run files, export, frozen
backbone, and the checks that must fail before any work starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, save_tiny_checkpoint
from safetensors.torch import load_file

from omni.config import load_config
from omni.layout import SpecialIds
from omni.tokenizers.text import TextTokenizer
from omni.train.synthetic import SyntheticBatches

N_IMAGE, TOKEN_DIM, SEQ = 16, 192, 48  # tiny preset: 32 px, 8 px patches -> 16 tokens of 8*8*3


def run_cfg(tokenizer_dir, out: Path, *overrides: str):
    return load_config("tiny", [
        f"model.tokenizer={tokenizer_dir}", *TINY, f"train.out_dir={out}", "train.precision=fp32",
        "train.steps=4", "train.save_every=100", "train.log_every=1", "train.val_every=0", "train.warmup_steps=2",
        "data.batch_size=2", f"data.seq_len={SEQ}", *overrides,
    ])


def synthetic(tokenizer_dir, **kw):
    tok = TextTokenizer.from_pretrained(tokenizer_dir)
    special = SpecialIds(tok.bos_id, tok.eos_id, tok.pad_id, tok.boi_id, tok.eoi_id, tok.img_id)

    def factory(rank: int, world_size: int) -> SyntheticBatches:
        return SyntheticBatches(special, len(tok), TOKEN_DIM, N_IMAGE, rows=2, seq_len=SEQ, rank=rank,
                                world_size=world_size, **kw)

    return factory


def records(run_dir: Path, kind: str = "train") -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_run_writes_config_versions_metrics_tensorboard_and_checkpoint(tokenizer_dir, tmp_path):
    from omni.train.loop import train

    out = tmp_path / "run"
    val = synthetic(tokenizer_dir, seed=99)
    run_dir = train(run_cfg(tokenizer_dir, out, "train.val_every=2", "train.val_batches=2", "train.ema_decay=0.9"),
                    batches=synthetic(tokenizer_dir), val_batches=val)
    assert run_dir == out
    train_recs = records(out)
    assert [r["step"] for r in train_recs] == [1, 2, 3, 4]
    for r in train_recs:
        assert r["loss_text"] > 0 and r["loss_image"] > 0 and r["tokens_per_s"] > 0 and r["lr"] > 0
        assert r["loss"] == pytest.approx(r["loss_text"] + r["loss_image"], rel=1e-6)
        assert r["tokens"] == 2 * (2 * 12 + N_IMAGE + 4)  # 2 rows of text + image + specials
    assert [r["step"] for r in records(out, "val")] == [0, 2, 4]  # step 0: the loss at initialisation
    assert load_config(out / "config.yaml").train.steps == 4
    versions = json.loads((out / "versions.json").read_text())
    assert versions["torch"] == torch.__version__ and versions["world_size"] == 1
    assert list((out / "tb").glob("events.out.tfevents.*"))
    tag = out / "checkpoints" / "step00000004"
    assert (tag / "COMPLETE").exists() and (out / "checkpoints" / "latest").read_text() == tag.name
    assert (tag / "ema_rank0.safetensors").exists()
    assert "step 4/4" in (out / "log.txt").read_text()


def test_nan_batch_is_skipped_and_counted(tokenizer_dir, tmp_path):
    from omni.train.loop import train

    out = tmp_path / "run"
    train(run_cfg(tokenizer_dir, out), batches=synthetic(tokenizer_dir, nan_at=(1,)))
    recs = records(out)
    assert [r["step"] for r in recs] == [1, 2, 3, 4]  # the run finished all its steps
    assert recs[0]["bad_steps"] == 0 and recs[1]["bad_steps"] == 1 and recs[-1]["bad_steps"] == 1
    assert recs[-1]["data"] == {"nan_planted": 1}
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in recs)
    log = (out / "log.txt").read_text()
    assert "step 2: non-finite loss, batch skipped (1 in a row)" in log and "bad=1" in log
    state = json.loads((out / "checkpoints" / "step00000004" / "omni_rank0.json").read_text())
    assert state["consumed"] == 5 and state["bad_total"] == 1  # 4 steps + 1 skipped batch


def test_consecutive_nan_batches_stop_naming_step_and_checkpoint(tokenizer_dir, tmp_path):
    from omni.train.loop import TrainingError, train

    out = tmp_path / "run"
    cfg = run_cfg(tokenizer_dir, out, "train.steps=6", "train.save_every=2", "train.max_bad_steps=3")
    with pytest.raises(TrainingError, match=r"stopping at step 3: 3 consecutive batches .* Last good checkpoint: "
                                            r".*step00000002"):
        train(cfg, batches=synthetic(tokenizer_dir, nan_at=(2, 3, 4)))
    assert (out / "checkpoints" / "latest").read_text() == "step00000002"


def test_export_ema_and_raw_load_with_from_pretrained(tokenizer_dir, tmp_path):
    from omni.models.model import OmniModel
    from omni.train.export import export
    from omni.train.loop import train

    out = tmp_path / "run"
    train(run_cfg(tokenizer_dir, out, "train.ema_decay=0.5", "generation.cfg_scale=2.5"),
          batches=synthetic(tokenizer_dir))
    raw = export(out, tmp_path / "raw", ema=False)
    ema = export(out, tmp_path / "ema")  # default: EMA when the run kept one
    assert json.loads((ema / "export.json").read_text())["ema"] is True
    w_raw, w_ema = load_file(raw / "model.safetensors"), load_file(ema / "model.safetensors")
    assert w_raw.keys() == w_ema.keys()
    moved = [k for k in w_raw if not torch.equal(w_raw[k], w_ema[k])]
    assert len(moved) > len(w_raw) // 2  # EMA lags the trained weights
    model = OmniModel.from_pretrained(raw)
    assert model.run_config.generation.cfg_scale == 2.5 and model.run_config.train.steps == 4
    live = {k: v for k, v in model.state_dict().items() if k in w_raw}
    assert all(torch.equal(live[k], w_raw[k]) for k in live)
    ids = torch.tensor([[1, 5, 6, 7]])
    assert torch.isfinite(model.text_logits(ids)).all()


def _save_pretrained_backbone(tokenizer_dir, path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = TextTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(123)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=128, max_position_embeddings=128))
    hf.save_pretrained(path)


def test_trainable_new_moves_only_new_modules_and_token_rows(tokenizer_dir, tmp_path):
    from omni.train.export import export
    from omni.train.loop import train

    pretrained = tmp_path / "hf"
    _save_pretrained_backbone(tokenizer_dir, pretrained)
    out = tmp_path / "run"
    train(run_cfg(tokenizer_dir, out, f"model.backbone.pretrained={pretrained}", "train.trainable=new",
                  "train.lr=1e-2"), batches=synthetic(tokenizer_dir))
    after = load_file(export(out, tmp_path / "ckpt", ema=False) / "model.safetensors")
    before = load_file(pretrained / "model.safetensors")
    tok = TextTokenizer.from_pretrained(tokenizer_dir)
    new_rows = [tok.boi_id, tok.eoi_id, tok.img_id]
    old_rows = [i for i in range(len(tok)) if i not in new_rows]
    for name, w in before.items():
        trained = after[f"backbone.{name}"]
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(trained[old_rows], w[old_rows]), name
        else:
            assert torch.equal(trained, w), name
    assert not torch.equal(after["backbone.lm_head.weight"][tok.boi_id], before["lm_head.weight"][tok.boi_id])
    assert not torch.equal(after["backbone.model.embed_tokens.weight"][tok.boi_id],
                           before["model.embed_tokens.weight"][tok.boi_id])
    assert any(k.startswith("head.") and after[k].abs().sum() > 0 for k in after)  # zero-init outputs moved


def test_init_from_checkpoint_and_trainable_globs(tokenizer_dir, tmp_path):
    """train.init_from loads every weight of an omni checkpoint; train.trainable=[globs] picks what moves."""
    from omni.train.checkpointing import load as load_tag
    from omni.train.export import export
    from omni.train.loop import train

    train(run_cfg(tokenizer_dir, tmp_path / "a", "train.steps=2"), batches=synthetic(tokenizer_dir))
    start = export(tmp_path / "a", tmp_path / "a_ckpt")
    train(run_cfg(tokenizer_dir, tmp_path / "b", "train.steps=2", "train.lr=1e-2", f"train.init_from={start}",
                  "train.trainable=[head.net.blocks.*, in_proj.*]"), batches=synthetic(tokenizer_dir))
    before = load_file(start / "model.safetensors")
    after = load_file(export(tmp_path / "b", tmp_path / "b_ckpt") / "model.safetensors")
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith(("head.net.blocks.", "in_proj.")) for k in moved), sorted(moved)
    assert "in_proj.weight" in moved
    tag = tmp_path / "b" / "checkpoints" / "step00000002"
    assert (tag / "frozen.json").exists()  # the frozen rest is left in `start`
    # A resume whose model is not built from that checkpoint would train on whatever its frozen
    # weights started as: refused before the engine is touched (the usual ways there are refused
    # earlier, as a changed model section).
    with pytest.raises(ValueError, match=r"leaves its frozen weights to the checkpoint the run started from, but this "
                                         r"resume sets no train.init_from: resume with train.init_from=.*a_ckpt"):
        load_tag(None, tag, None, 0, 1, cfg=load_config(tag / "config.yaml", ["train.init_from=null"]))
    with pytest.raises(ValueError, match=r"pattern 'nope\.\*' matches no parameter"):
        train(run_cfg(tokenizer_dir, tmp_path / "c", "train.trainable=[nope.*]"), batches=synthetic(tokenizer_dir))


def test_a_run_from_a_checkpoint_picks_its_own_kernels(tokenizer_dir, tmp_path):
    """The fields that choose kernels and precision (the head's compile and bf16 matmuls, the
    attention kernel, ...) are the run's, not the checkpoint's: a model trained compiled can be
    fine-tuned eager; its shapes stay the checkpoint's."""
    from omni.train.build import with_init_model

    ckpt = save_tiny_checkpoint(tokenizer_dir, tmp_path / "ckpt", "model.head.compile=true",
                                "model.head.bf16_train=false", "model.head.width=32")
    run = run_cfg(tokenizer_dir, tmp_path / "run", f"train.init_from={ckpt}")  # the tiny preset: bf16 head, eager
    assert (run.model.head.compile, run.model.head.bf16_train) == (False, True)
    cfg, differ = with_init_model(run)
    assert (cfg.model.head.compile, cfg.model.head.bf16_train, cfg.model.head.width) == (False, True, 32)
    assert differ == ["model.head.width=32 (config: 64)"]
    cfg, _ = with_init_model(run_cfg(tokenizer_dir, tmp_path / "run", f"train.init_from={ckpt}",
                                     "model.head.compile=true", "model.head.bf16_train=false"))
    assert (cfg.model.head.compile, cfg.model.head.bf16_train) == (True, False)


def test_errors_before_any_work(tokenizer_dir, tmp_path):
    from omni.train.loop import train

    out = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match=r"data.train: shard '.*/nope-000000.tar' does not exist"):
        train(run_cfg(tokenizer_dir, out, f"data.train=[{tmp_path}/nope-000000.tar]"))
    with pytest.raises(ValueError, match="global_batch_size=3 cannot be split"):
        train(run_cfg(tokenizer_dir, out, "train.global_batch_size=3"), batches=synthetic(tokenizer_dir))
    with pytest.raises(ValueError, match="trainable=new .* needs model.backbone.pretrained"):
        train(run_cfg(tokenizer_dir, out, "train.trainable=new"), batches=synthetic(tokenizer_dir))
    assert not out.exists()  # nothing was written
    train(run_cfg(tokenizer_dir, out, "train.steps=1"), batches=synthetic(tokenizer_dir))
    with pytest.raises(ValueError, match="already holds checkpoints; continue it with `--resume auto`"):
        train(run_cfg(tokenizer_dir, out, "train.steps=2"), batches=synthetic(tokenizer_dir))


def test_bf16_autocast_run_keeps_fp32_weights(tokenizer_dir, tmp_path):
    from omni.train.engine import hardware_has_bf16
    from omni.train.loop import finish, fit, prepare

    if not hardware_has_bf16():
        pytest.skip("no native bf16 on this machine")
    run = prepare(run_cfg(tokenizer_dir, tmp_path / "run", "train.precision=bf16", "train.steps=2"),
                  batches=synthetic(tokenizer_dir))
    try:
        fit(run)
        assert all(p.dtype == torch.float32 for p in run.model.parameters())
        assert run.precision == "bf16"
        assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records(tmp_path / "run"))
    finally:
        finish(run, True)


def test_activation_checkpointing_gives_the_same_training(tokenizer_dir, tmp_path):
    from omni.train.export import export
    from omni.train.loop import finish, fit, prepare

    runs = {}
    for ac in (False, True):
        out = tmp_path / f"ac{ac}"
        run = prepare(run_cfg(tokenizer_dir, out, "train.steps=3", f"train.activation_checkpointing={str(ac).lower()}"),
                      batches=synthetic(tokenizer_dir))
        checkpointed = [m.gradient_checkpointing for m in run.model.backbone.modules() if hasattr(m, "gradient_checkpointing")]
        assert checkpointed and all(c == ac for c in checkpointed)
        fit(run)
        finish(run, True)
        runs[ac] = ([r["loss"] for r in records(out)], load_file(export(out, tmp_path / f"x{ac}") / "model.safetensors"))
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-6)
    for k, w in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][k], w, rtol=1e-5, atol=1e-6)


def test_cli_export_and_train_errors(tokenizer_dir, tmp_path, capsys):
    from omni.cli import main
    from omni.train.loop import train

    out = tmp_path / "run"
    train(run_cfg(tokenizer_dir, out, "train.steps=1"), batches=synthetic(tokenizer_dir))
    assert main(["export", "--run", str(out), "--out", str(tmp_path / "ckpt"), "--raw", "--tag", "step00000001"]) == 0
    assert json.loads((tmp_path / "ckpt" / "export.json").read_text())["ema"] is False
    assert main(["export", "--run", str(out), "--out", str(tmp_path / "x"), "--tag", "step00000009"]) == 2
    assert "step00000009 is not a complete checkpoint; available: step00000001" in capsys.readouterr().err
    assert main(["train", "--config", "tiny", f"model.tokenizer={tokenizer_dir}", f"train.out_dir={tmp_path / 'y'}",
                 f"data.train=[{tmp_path}/missing.tar]"]) == 2
    assert "data.train: shard" in capsys.readouterr().err
    from omni.train.cli import main as module_main

    assert module_main(["--config", "tiny", "train.precision=fp16"]) == 2
    assert "train.precision: 'fp16' is not one of" in capsys.readouterr().err


def test_train_cli_takes_overrides_anywhere(tmp_path, capsys):
    """`omni train` and `python -m omni.train` read dotted overrides before and after `--resume`;
    an unknown flag stays an error. (The missing shard named after --resume proves it was read.)"""
    from omni.cli import main
    from omni.train.cli import main as module_main

    missing = tmp_path / "missing.tar"
    for entry in (lambda argv: main(["train", *argv]), module_main):
        argv = ["--config", "tiny", f"train.out_dir={tmp_path / 'run'}", "--resume", "auto", f"data.train=[{missing}]"]
        assert entry(argv) == 2
        assert f"data.train: shard '{missing}' does not exist" in capsys.readouterr().err
        with pytest.raises(SystemExit) as stop:
            entry(["--config", "tiny", "--resume", "auto", "train.lr=1e-3", "--bogus", "train.steps=2"])
        assert stop.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_one_process_skips_the_identity_all_reduce_with_the_same_weights(tokenizer_dir, tmp_path, monkeypatch):
    """ZeRO-0 on one process trains without DeepSpeed's gradient all-reduce (flatten, reduce over one
    rank, copy back): the weights after 4 steps are bit-identical to a run that keeps it."""
    from omni.train import engine as engine_mod
    from omni.train.export import export
    from omni.train.loop import train

    seen = []
    setup = engine_mod.setup_engine

    def spy(cfg, model, world_size, keep=False):
        engine, ds_config = setup(cfg, model, world_size)
        seen.append(engine.enable_backward_allreduce)
        engine.enable_backward_allreduce |= keep
        return engine, ds_config

    weights = []
    for keep in (False, True):
        monkeypatch.setattr(engine_mod, "setup_engine", lambda c, m, w, keep=keep: spy(c, m, w, keep))
        out = tmp_path / f"run-{keep}"
        train(run_cfg(tokenizer_dir, out), batches=synthetic(tokenizer_dir))
        weights.append(load_file(export(out, tmp_path / f"model-{keep}", ema=False) / "model.safetensors"))
    assert seen == [False, False]  # one process, ZeRO-0: no reduction by default
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_one_cpu_process_builds_no_deepspeed_comm_op(tmp_path):
    """One CPU process reduces nothing: `init_distributed` leaves DeepSpeed's shared-memory
    all-reduce op unbuilt (a C++ compile of ~18 s in every fresh environment) and gloo reduces."""
    script = (
        "import torch, deepspeed.comm as dscomm\n"
        "from omni.train.engine import close_distributed, init_distributed\n"
        "d = init_distributed()\n"
        "t = torch.arange(3.0)\n"
        "dscomm.all_reduce(t)\n"
        "print('reduced', t.tolist(), d.world_size)\n"
        "close_distributed(d)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), DS_ACCELERATOR="cpu")
    run = subprocess.run([sys.executable, "-c", script], check=False, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "reduced [0.0, 1.0, 2.0] 1" in run.stdout
    assert "built successfully" not in run.stdout + run.stderr
    assert not list((tmp_path / "ext").rglob("*.so"))
