"""LoRA fine-tuning (`train.lora`, through peft): what trains, what stays, the merged export equal
to the adapted model, exact resume, and the settings that are refused."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_train_run import records, run_cfg, synthetic

from omni.config import load_config
from omni.train.checkpointing import check_frozen, frozen_weights, init_name
from omni.train.lora import A_SUFFIX, B_SUFFIX, add_adapters, is_adapter, merge_adapters

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
    from omni.models.model import OmniModel
    from omni.train.export import consolidated_state, export
    from omni.train.loop import train

    run = train(lora_cfg(tokenizer_dir, tmp_path / "run", start, "train.ema_decay=0.5"),
                batches=synthetic(tokenizer_dir))
    before = load_file(start / "model.safetensors")
    tag = run / "checkpoints" / "step00000004"
    held = consolidated_state(tag, 0)
    adapted = [k[: -len(A_SUFFIX)] for k in held if k.endswith(A_SUFFIX)]
    assert len(adapted) == 2 * len(TARGETS)  # every target of both layers
    # The checkpoint leaves the frozen backbone to train.init_from: exactly its weights, read back from there.
    assert not any(k.startswith("backbone.") and not is_adapter(k) for k in held)
    frozen = frozen_weights(check_frozen(tag, None))
    assert {init_name(k) for k in frozen} == {k for k in before if k.startswith("backbone.")}
    for p in adapted:  # the adapted layers keep their own weights; B has moved from its zero start
        assert torch.equal(frozen[p + ".base_layer.weight"], before[p + ".weight"])
        assert held[p + B_SUFFIX].abs().sum() > 0
    merged = export(run, tmp_path / "ckpt", ema=False)
    # It learned: on the four batches it trained on, the merged model's text and image losses (the
    # same noise draws) are below the start's. (The logged losses, each taken before its step's
    # update on a new random batch, cannot show this in four steps.)
    stream = iter(synthetic(tokenizer_dir)(0, 1))
    seen = [next(stream) for _ in range(4)]
    assert [r["step"] for r in records(run)] == [1, 2, 3, 4]  # one batch a step: those four
    losses = {}
    for name, path in (("start", start), ("merged", merged)):
        model, total = OmniModel.from_pretrained(path).eval(), torch.zeros(2)
        for b in seen:
            torch.manual_seed(0)
            with torch.no_grad():
                out = model(b)
            total += torch.stack([out["loss_text"], out["loss_image"]]).float()
        losses[name] = total.tolist()
    assert all(a < b for a, b in zip(losses["merged"], losses["start"])), losses
    after = load_file(merged / "model.safetensors")
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
    tag = run / "checkpoints" / "step00000004"
    adapted.load_state_dict({**consolidated_state(tag, 0), **frozen_weights(check_frozen(tag, None))})
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


def test_checkpoints_leave_the_frozen_base_to_its_checkpoint_and_refuse_a_changed_one(tokenizer_dir, tmp_path,
                                                                                      start):
    """A LoRA checkpoint holds the adapters and what trains, not the frozen base (train.save_frozen=true
    keeps it); resume and export read the base back from train.init_from, a copy of it elsewhere
    included, and refuse one whose weights changed or that is gone, by name."""
    import shutil

    from omni.train.export import export
    from omni.train.loop import train

    def model_states(run):
        return (run / "checkpoints" / "step00000002" / "mp_rank_00_model_states.pt").stat().st_size

    slim, full = tmp_path / "slim", tmp_path / "full"
    for run, extra in ((slim, []), (full, ["train.save_frozen=true"])):
        train(lora_cfg(tokenizer_dir, run, start, "train.save_every=2", "train.steps=2", *extra),
              batches=synthetic(tokenizer_dir))
    assert (slim / "checkpoints" / "step00000002" / "frozen.json").exists()
    assert f"frozen weights in {start.resolve()} (train.save_frozen" in (slim / "log.txt").read_text()  # said at start
    assert not (full / "checkpoints" / "step00000002" / "frozen.json").exists()
    left_out = frozen_weights(check_frozen(slim / "checkpoints" / "step00000002", None))
    base_bytes = sum(t.numel() * 4 for t in left_out.values())  # fp32 weights
    assert left_out and abs(model_states(full) - model_states(slim) - base_bytes) < 0.05 * base_bytes
    a = load_file(export(slim, tmp_path / "a", ema=False) / "model.safetensors")
    b = load_file(export(full, tmp_path / "b", ema=False) / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    copy = shutil.copytree(start, tmp_path / "elsewhere")  # the base moved: resume from the copy
    train(lora_cfg(tokenizer_dir, slim, copy, "train.save_every=2", "train.resume=auto"),
          batches=synthetic(tokenizer_dir))
    assert [r["step"] for r in records(slim)] == [1, 2, 3, 4]

    changed = tmp_path / "changed"  # another model in its place: refused, nothing trained
    train(run_cfg(tokenizer_dir, tmp_path / "other", "train.steps=1", "train.seed=5"), batches=synthetic(tokenizer_dir))
    export(tmp_path / "other", changed)
    with pytest.raises(ValueError, match=r"leaves its \d+ frozen weights to the checkpoint the run started from, .*"
                                         r"the weights in .*changed are not those any more"):
        train(lora_cfg(tokenizer_dir, slim, changed, "train.save_every=2", "train.steps=6", "train.resume=auto"),
              batches=synthetic(tokenizer_dir))
    assert [r["step"] for r in records(slim)] == [1, 2, 3, 4]
    moved = shutil.move(copy, tmp_path / "moved")  # the last tag's base moved: export says where it was
    with pytest.raises(FileNotFoundError, match=r"elsewhere cannot be read .*restore it there, or give omni export "
                                                r"the copy's place: --init-from COPY"):
        export(slim, tmp_path / "c")
    with pytest.raises(ValueError, match=r"the weights in .*changed are not those any more"):
        export(slim, tmp_path / "c", init_from=changed)
    c = load_file(export(slim, tmp_path / "c", init_from=moved, ema=False) / "model.safetensors")
    left = check_frozen(slim / "checkpoints" / "step00000004", moved)["parameters"]
    plain = [k for k in left if ".base_layer." not in k]  # frozen and not adapted: the base's, as read from `moved`
    before = load_file(start / "model.safetensors")
    assert plain and c.keys() == before.keys() and all(torch.equal(c[k], before[k]) for k in plain)


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
        assert (tmp_path / f"zero{s}" / "checkpoints" / "step00000004" / "frozen.json").exists()  # base left out

    # Resumed on one process (DeepSpeed's universal checkpoint, which has no frozen weights to carry
    # either): the run goes on as the one-process reference does.
    more = ["train.steps=6", "train.resume=auto"]
    for s in (2, 3):
        proc = launch(tmp_path, {"tok": str(tokenizer_dir), "runs": [{"overrides": overrides(
            tokenizer_dir, tmp_path / f"zero{s}", *common, f"train.zero_stage={s}", "train.grad_accum=2", *more)}]},
            name=f"one{s}")
        assert proc.returncode == 0 and "universal" in proc.stdout, proc.stderr[-3000:]
    ref = launch(tmp_path, {"tok": str(tokenizer_dir), "runs": [
        {"overrides": overrides(tokenizer_dir, tmp_path / "ref", *common, "train.grad_accum=2", *more)}]}, name="ref6")
    assert ref.returncode == 0, ref.stderr[-3000:]
    want = losses(tmp_path / "ref")
    for s in (2, 3):
        got = losses(tmp_path / f"zero{s}")
        assert got.keys() == want.keys() == {1, 2, 3, 4, 5, 6}
        assert all(got[k] == pytest.approx(want[k], rel=1e-4) for k in (5, 6)), (s, got, want)
