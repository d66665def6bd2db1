"""`omni_sdpa`: plain SDPA, except that under CPU bf16 autocast it computes in fp32."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig

from omni.models.attention import OMNI_SDPA, _omni_sdpa, hf_attention


class _Attn(torch.nn.Module):
    num_key_value_groups = 1
    is_causal = True
    training = False


def _qkv(seed=0, b=2, h=4, length=12, d=16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, length, d, generator=g) for _ in range(3)]


def _backbones():
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=128)
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="sdpa")
    ours = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=hf_attention("sdpa"))
    ours.load_state_dict(ref.state_dict())
    return ref.eval(), ours.eval()


def test_names():
    assert hf_attention("sdpa") == OMNI_SDPA
    assert hf_attention("eager") == "eager" and hf_attention("flash_attention_2") == "flash_attention_2"


def test_without_autocast_it_is_sdpa_exactly():
    ref, ours = _backbones()
    assert ours.config._attn_implementation == OMNI_SDPA
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding: the mask path, not only is_causal
    with torch.no_grad():
        assert torch.equal(ref(ids, attention_mask=mask).logits, ours(ids, attention_mask=mask).logits)


def test_under_cpu_autocast_attention_runs_in_fp32():
    q, k, v = _qkv()
    mask = torch.zeros(2, 1, 12, 12).masked_fill(torch.ones(12, 12, dtype=torch.bool).triu(1), float("-inf"))
    fp32 = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, _ = _omni_sdpa(_Attn(), q, k, v, mask)
        plain = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
    assert ours.dtype == torch.bfloat16  # what the bf16 projections after it expect
    assert plain.dtype == torch.bfloat16  # autocast would have run SDPA itself in bf16
    assert torch.equal(ours, fp32.to(torch.bfloat16))
    assert not torch.equal(plain, fp32.to(torch.bfloat16))
    # and it keeps gradients flowing to the (bf16-autocast) inputs
    q.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = _omni_sdpa(_Attn(), q, k, v, mask)
    out.float().sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_saved_config_loads_without_omni(tmp_path):
    _, ours = _backbones()
    ours.save_pretrained(tmp_path)
    assert OMNI_SDPA not in json.dumps(json.loads((tmp_path / "config.json").read_text()))
    again = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa")
    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, ours(ids).logits)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_omni_backbone_uses_the_mapped_kernel(tiny_cfg, impl):
    from omni.models.model import OmniModel

    tiny_cfg.model.backbone.attn_implementation = impl
    model = OmniModel.from_config(tiny_cfg.model)
    assert model.backbone.config._attn_implementation == hf_attention(impl)
