"""LoRA fine-tuning (`train.lora`, through peft): what trains, what stays, the merged export equal
to the adapted model, exact resume, and the settings that are refused."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_train_run import records, run_cfg, synthetic

from omni.config import load_config
from omni.train.lora import A_SUFFIX, B_SUFFIX, add_adapters, merge_adapters

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def start(tokenizer_dir, tmp_path_factory):
    """An exported plain model, the starting point of the fine-tunes (train.init_from)."""
    from omni.train.export import export
    from omni.train.loop import train

    root = tmp_path_factory.mktemp("start")
    train(run_cfg(tokenizer_dir, root / "run", "train.steps=2"), batches=synthetic(tokenizer_dir))
    return export(root / "run", root / "ckpt")


def lora_cfg(tokenizer_dir, out, start, *overrides):
    return run_cfg(tokenizer_dir, out, f"train.init_from={start}", "train.lora.rank=4", "train.lora.alpha=8",
                   "train.lr=1e-2", *overrides)


def test_adapters_and_the_weights_outside_the_backbone_train_the_rest_stays(tokenizer_dir, tmp_path, start):
    from omni.train.export import consolidated_state, export
    from omni.train.loop import train

    run = train(lora_cfg(tokenizer_dir, tmp_path / "run", start, "train.ema_decay=0.5"),
                batches=synthetic(tokenizer_dir))
    assert records(run)[-1]["loss"] < records(run)[0]["loss"]
    before = load_file(start / "model.safetensors")
    held = consolidated_state(run / "checkpoints" / "step00000004", 0)
    adapted = [k[: -len(A_SUFFIX)] for k in held if k.endswith(A_SUFFIX)]
    assert len(adapted) == 2 * len(TARGETS)  # every target of both layers
    for p in adapted:  # the adapted layers keep their own weights; B has moved from its zero start
        assert torch.equal(held[p + ".base_layer.weight"], before[p + ".weight"])
        assert held[p + B_SUFFIX].abs().sum() > 0
    after = load_file(export(run, tmp_path / "ckpt", ema=False) / "model.safetensors")
    assert after.keys() == before.keys()  # a plain model: no adapter or base_layer names
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert {p + ".weight" for p in adapted} <= moved  # the adapters, merged
    backbone_moved = {k for k in moved if k.startswith("backbone.")}
    assert backbone_moved == {p + ".weight" for p in adapted}  # embeddings, norms, lm_head: untouched
    assert "in_proj.weight" in moved and any(k.startswith("head.net.blocks.") for k in moved)
    ema = load_file(export(run, tmp_path / "ema") / "model.safetensors")  # the EMA of the adapters, merged
    assert ema.keys() == before.keys() and not torch.equal(ema[adapted[0] + ".weight"], after[adapted[0] + ".weight"])


def test_the_merged_export_computes_what_the_adapted_model_computes(tokenizer_dir, tmp_path, start):
    from omni.models.model import OmniModel
    from omni.train.export import consolidated_state, export
    from omni.train.loop import train

    run = train(lora_cfg(tokenizer_dir, tmp_path / "run", start), batches=synthetic(tokenizer_dir))
    cfg = load_config(run / "config.yaml")
    adapted = OmniModel.from_pretrained(start)
    add_adapters(adapted.backbone, cfg.train.lora)
    adapted.load_state_dict(consolidated_state(run / "checkpoints" / "step00000004", 0))
    merged = OmniModel.from_pretrained(export(run, tmp_path / "ckpt", ema=False))
    plain = OmniModel.from_pretrained(start)
    ids = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        want = adapted.text_logits(ids)
        assert not torch.allclose(want, plain.text_logits(ids), atol=1e-3)  # the adapters changed the function
        torch.testing.assert_close(merged.text_logits(ids), want, atol=1e-5, rtol=1e-5)


def test_merge_is_peft_s_own_merge():
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    net = torch.nn.Sequential()
    net.add_module("q_proj", torch.nn.Linear(16, 8))
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj"]), net)
    torch.nn.init.normal_(net.q_proj.lora_B["default"].weight)
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    ours = merge_adapters(state, load_config("tiny", ["train.lora.rank=4", "train.lora.alpha=12"]).train.lora)
    net.q_proj.merge()  # peft's merge, in place
    torch.testing.assert_close(ours["q_proj.weight"], net.q_proj.base_layer.weight, atol=1e-6, rtol=1e-6)
    assert torch.equal(ours["q_proj.bias"], net.q_proj.base_layer.bias) and set(ours) == {"q_proj.weight", "q_proj.bias"}


def test_a_resumed_run_equals_the_uninterrupted_one(tokenizer_dir, tmp_path, start):
    from omni.train.export import export
    from omni.train.loop import train

    whole = train(lora_cfg(tokenizer_dir, tmp_path / "whole", start), batches=synthetic(tokenizer_dir))
    part = tmp_path / "part"
    train(lora_cfg(tokenizer_dir, part, start, "train.save_every=2", "train.steps=2"), batches=synthetic(tokenizer_dir))
    train(lora_cfg(tokenizer_dir, part, start, "train.save_every=2", "train.resume=auto"), batches=synthetic(tokenizer_dir))
    assert [r["step"] for r in records(part)] == [1, 2, 3, 4]  # continued from step 2, not started again
    a = load_file(export(whole, tmp_path / "a", ema=False) / "model.safetensors")
    b = load_file(export(part, tmp_path / "b", ema=False) / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match=r"train.lora.rank=8: the checkpoint holds adapters of rank 4"):
        train(lora_cfg(tokenizer_dir, part, start, "train.lora.rank=8", "train.steps=6", "train.resume=auto"),
              batches=synthetic(tokenizer_dir))


def test_settings_that_cannot_work_are_refused(tokenizer_dir, tmp_path, start):
    from omni.train.loop import train

    with pytest.raises(ValueError, match=r"targets \['qkv'\] name no linear layer of the backbone; its linear "
                                         r"layers are \[.*'q_proj'"):
        train(lora_cfg(tokenizer_dir, tmp_path / "a", start, "train.lora.targets=[qkv]"), batches=synthetic(tokenizer_dir))
    with pytest.raises(ValueError, match=r"train.lora.rank=4 freezes the backbone's weights .* needs weights worth "
                                         r"keeping: model.backbone.pretrained or train.init_from"):
        train(run_cfg(tokenizer_dir, tmp_path / "c", "train.lora.rank=4"), batches=synthetic(tokenizer_dir))
    with pytest.raises(ValueError, match=r"train.lora: rank=-1"):
        train(lora_cfg(tokenizer_dir, tmp_path / "b", start, "train.lora.rank=-1"), batches=synthetic(tokenizer_dir))


@pytest.mark.slow
def test_lora_under_zero_2_and_3_on_two_ranks_matches_one_rank(tokenizer_dir, tmp_path, start):
    """The adapters under ZeRO-2 and ZeRO-3 (2 ranks x 1 row-batch) against 1 rank x 2 accumulation
    steps: the same losses, and merged exports within 1e-5 (ZeRO-3 partitions the adapters and the
    frozen weights alike, and its export consolidates them before merging)."""
    from test_train_dist import launch, losses, overrides, weights

    common = ["train.steps=4", "train.lr=2e-4", f"train.init_from={start}", "train.lora.rank=4", "train.lora.alpha=8"]
    runs = [{"overrides": overrides(tokenizer_dir, tmp_path / f"zero{s}", *common, f"train.zero_stage={s}")}
            for s in (2, 3)]
    dist = launch(tmp_path, {"tok": str(tokenizer_dir), "runs": runs}, nproc=2, name="dist")
    assert dist.returncode == 0, dist.stderr[-3000:]
    ref = launch(tmp_path, {"tok": str(tokenizer_dir), "runs": [
        {"overrides": overrides(tokenizer_dir, tmp_path / "ref", *common, "train.grad_accum=2")}]}, name="ref")
    assert ref.returncode == 0, ref.stderr[-3000:]
    want, want_w = losses(tmp_path / "ref"), weights(tmp_path / "ref", tmp_path / "ref_w", False)
    before = load_file(start / "model.safetensors")
    assert want_w.keys() == before.keys()
    for s in (2, 3):
        got = losses(tmp_path / f"zero{s}")
        assert got.keys() == want.keys() == {1, 2, 3, 4}
        assert all(got[k] == pytest.approx(want[k], rel=1e-5) for k in got), (s, got, want)
        w = weights(tmp_path / f"zero{s}", tmp_path / f"w{s}", False)
        assert w.keys() == want_w.keys()
        for k in w:
            torch.testing.assert_close(w[k], want_w[k], rtol=1e-5, atol=1e-5, msg=f"ZeRO-{s} {k}")
        assert not torch.equal(w["backbone.model.layers.0.self_attn.q_proj.weight"],
                               before["backbone.model.layers.0.self_attn.q_proj.weight"])
