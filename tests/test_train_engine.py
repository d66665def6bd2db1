"""Unit tests of the training set-up: DeepSpeed JSON, batch geometry, optimizer groups, schedule,
precision checks, EMA shard merging and checkpoint bookkeeping. No process group, no training."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from omni.config import load_config
from omni.train import checkpointing
from omni.train.engine import batch_geometry, deepspeed_config, lr_factor, merge_user_config, param_groups


def cfg_with(*overrides: str):
    return load_config("tiny", list(overrides))


def test_deepspeed_config_from_omni_config():
    ds = deepspeed_config(cfg_with("train.zero_stage=3", "data.batch_size=4", "train.grad_accum=3",
                                   "train.grad_clip=0.5", "train.offload=true", "train.offload_params=true"), 2)
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 24
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert "bf16" not in ds and "fp16" not in ds  # precision is torch autocast, weights stay fp32


def test_global_batch_sets_accumulation_and_rejects_impossible_sizes():
    assert batch_geometry(cfg_with("data.batch_size=4", "train.global_batch_size=32"), 2) == (4, 4, 32)
    assert batch_geometry(cfg_with("data.batch_size=4", "train.global_batch_size=32"), 8) == (4, 1, 32)
    with pytest.raises(ValueError, match="global_batch_size=32 cannot be split over 3 rank"):
        batch_geometry(cfg_with("data.batch_size=4", "train.global_batch_size=32"), 3)
    with pytest.raises(ValueError, match="multiple of 64"):
        batch_geometry(cfg_with("data.batch_size=4", "train.global_batch_size=32"), 16)


def test_user_deepspeed_json_merges_and_conflicts_are_errors(tmp_path):
    ok = tmp_path / "ok.json"
    ok.write_text(json.dumps({"zero_optimization": {"stage": 2, "reduce_bucket_size": 1000},
                              "communication_data_type": "fp32"}))
    ds = deepspeed_config(cfg_with("train.zero_stage=2", f"train.deepspeed_config={ok}"), 1)
    assert ds["zero_optimization"]["reduce_bucket_size"] == 1000  # the user may tune omni's defaults
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["communication_data_type"] == "fp32"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 3}, "gradient_clipping": 2.0}))
    with pytest.raises(ValueError, match=r"zero_optimization.stage=3 \(omni config gives 2\)"):
        deepspeed_config(cfg_with("train.zero_stage=2", f"train.deepspeed_config={bad}"), 1)
    opt = tmp_path / "opt.json"
    opt.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ValueError, match="Remove 'optimizer'"):
        deepspeed_config(cfg_with(f"train.deepspeed_config={opt}"), 1)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        deepspeed_config(cfg_with(f"train.deepspeed_config={tmp_path / 'missing.json'}"), 1)


def test_merge_keeps_user_only_keys():
    merged = merge_user_config({"a": {"b": 1}}, {"a": {"c": 2}, "d": 3}, "x.json")
    assert merged == {"a": {"b": 1, "c": 2}, "d": 3}


def test_invalid_stage_and_offload_combinations():
    with pytest.raises(ValueError, match="ZeRO stages are 0, 1, 2 and 3"):
        deepspeed_config(cfg_with("train.zero_stage=4"), 1)
    with pytest.raises(ValueError, match="offload=true needs train.zero_stage >= 1"):
        deepspeed_config(cfg_with("train.offload=true"), 1)
    with pytest.raises(ValueError, match="offload_params=true needs train.zero_stage=3"):
        deepspeed_config(cfg_with("train.zero_stage=2", "train.offload_params=true"), 1)


def test_bf16_request_without_hardware_support_is_an_error(monkeypatch):
    from omni.train import engine

    monkeypatch.setattr(engine, "hardware_has_bf16", lambda: False)
    with pytest.raises(ValueError, match="train.precision=bf16 but .* no native bf16"):
        engine.resolve_precision("bf16")
    assert engine.resolve_precision("auto") == "fp32"
    monkeypatch.setattr(engine, "hardware_has_bf16", lambda: True)
    assert engine.resolve_precision("auto") == "bf16"
    assert engine.resolve_precision("fp32") == "fp32"


def test_run_header_says_why_auto_trains_fp32_on_a_cpu(monkeypatch):
    from omni.train.loop import precision_note

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    auto, fp32 = cfg_with("train.precision=auto"), cfg_with("train.precision=fp32")
    assert precision_note(auto, "fp32") == "fp32 (train.precision=auto: this CPU has no native bf16)"
    assert precision_note(auto, "bf16") == "bf16"
    assert precision_note(fp32, "fp32") == "fp32"  # asked for: nothing to explain


def test_lr_schedule_warmup_then_cosine_to_floor():
    f = [lr_factor(s, warmup=10, total=110, min_ratio=0.1) for s in range(120)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a < b for a, b in itertools.pairwise(f[:10]))  # rising during warmup
    assert f[10] == pytest.approx(1.0)
    assert f[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f[110] == pytest.approx(0.1) and f[119] == pytest.approx(0.1)  # stays at the floor


def test_weight_decay_groups_skip_norms_biases_embeddings(tiny_model):
    groups = param_groups(tiny_model, 0.05)
    decay = {id(p) for p in groups[0]["params"]}
    names = {id(p): n for n, p in tiny_model.named_parameters()}
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    for pid, name in names.items():
        embedding = "embed_tokens" in name or name.startswith("image_pos.")  # token rows, image cells
        no_decay = "norm" in name or name.endswith("bias") or embedding
        assert (pid not in decay) == no_decay, name
    assert sum(len(g["params"]) for g in groups) == len(names)


def test_ema_zero3_partitions_reassemble(tmp_path):
    """Rank shards in DeepSpeed's ZeRO-3 layout (flat, padded, split evenly) merge to full tensors."""
    from omni.train.ema import EMA, merge_ema_shards

    weights = {"a": torch.arange(10.0).view(2, 5), "b": torch.arange(3.0)}
    world = 4
    for r in range(world):
        model = torch.nn.Module()
        for name, w in weights.items():
            part = math.ceil(w.numel() / world)
            flat = torch.cat([w.flatten(), torch.zeros(part * world - w.numel())])
            p = torch.nn.Parameter(torch.empty(0))
            p.ds_tensor, p.ds_shape = flat[r * part:(r + 1) * part].clone(), w.shape
            model.register_parameter(name, p)
        EMA(model, 0.9, rank=r, world_size=world, zero3=True).save(tmp_path)
    merged = merge_ema_shards(tmp_path)
    for name, w in weights.items():
        assert torch.equal(merged[name], w)


def test_ema_update_rule_rank0_only(tmp_path):
    from omni.train.ema import EMA, merge_ema_shards

    lin = torch.nn.Linear(3, 2)
    ema = EMA(lin, 0.9, rank=0, world_size=2, zero3=False)
    start = lin.weight.detach().clone()
    with torch.no_grad():
        lin.weight.add_(1.0)
    ema.update()
    assert torch.allclose(ema.shadow["weight"], start + 0.1)
    assert not EMA(lin, 0.9, rank=1, world_size=2, zero3=False).active  # replicated weights: rank 0 keeps it
    ema.save(tmp_path)
    assert torch.allclose(merge_ema_shards(tmp_path)["weight"], start + 0.1)


def test_latest_skips_incomplete_checkpoints(tmp_path):
    ckpt = tmp_path / checkpointing.CKPT_DIR
    for step, complete in ((5, True), (10, True), (15, False)):
        d = ckpt / checkpointing.tag_name(step)
        d.mkdir(parents=True)
        if complete:
            (d / checkpointing.COMPLETE).write_text("{}")
    (ckpt / "latest").write_text(checkpointing.tag_name(15))  # a crash after `latest`? never written so
    assert checkpointing.latest_tag(ckpt).name == "step00000010"
    assert checkpointing.find_resume(tmp_path, "auto").name == "step00000010"
    with pytest.raises(ValueError, match="already holds checkpoints"):
        checkpointing.find_resume(tmp_path, None)
    assert checkpointing.find_resume(tmp_path / "fresh", "auto") is None
    checkpointing.prune(ckpt, keep_last=1, keep=ckpt / "step00000010")
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step00000010", "step00000015"]


def test_rng_state_roundtrip_through_json():
    import random

    import numpy as np

    state = json.loads(json.dumps(checkpointing.rng_state()))
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    checkpointing.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


@pytest.mark.parametrize("preset, world", [("mmar-0.5b", 8), ("omni-7b-zero3", 16)])
def test_pretrained_presets_give_valid_deepspeed_configs(preset, world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the preset's configs/ds/*.json resolves inside the package, from any directory
    cfg = load_config(preset)
    ds = deepspeed_config(cfg, world)
    assert ds["train_batch_size"] == cfg.train.global_batch_size
    assert ds["zero_optimization"]["stage"] == cfg.train.zero_stage
    assert cfg.model.image.kind == "vae" and cfg.model.backbone.pretrained
    with pytest.raises(ValueError, match="cannot be split over 3 rank"):
        deepspeed_config(cfg, 3)
