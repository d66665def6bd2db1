"""The Orthus path: a tiny random Chameleon (saved locally, HF format) converted into an omni model.

The source checkpoint is sharded, its image tokens are numbered in a shuffled order (so code k is
not vocabulary id 4 + k), and its VQGAN decoder comes from a separate file, as with the real
release. What must hold:
1. text-only logits equal ChameleonForConditionalGeneration's;
2. with a small soft-VQ temperature, image+text logits equal Chameleon's on its discrete tokens;
3. the first-stage preset, run by the training loop and exported, changes exactly codebook_in and
   the diffusion head, and its loss falls;
4. `omni generate` and `omni chat` run on the converted checkpoint.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import OMNI

from omni.models.soft_vq import image_token_ids, token_name_of_code

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
WORDS = ["a", "an", "the", "red", "green", "blue", "yellow", "purple", "orange", "circle", "square", "triangle",
         "cat", "photo", "of", "draw", "is"]
CODES = 32  # codebook size of the tiny VQGAN
HEAD = [
    "model.head.width=32",
    "model.head.depth=2",
    "generation.image_steps=4",
    "generation.max_new_tokens=24",
]
VQ = {  # a tiny VQGAN: 32 px -> 4x4 tokens of dim 8, 32 codes
    "embed_dim": 8,
    "num_embeddings": CODES,
    "latent_channels": 16,
    "resolution": 32,
    "in_channels": 3,
    "base_channels": 32,
    "channel_multiplier": [1, 1, 2, 2],
    "num_res_blocks": 1,
    "attn_resolutions": None,
}  # 32 px -> 4x4 tokens


def make_chameleon(
    path: Path,
    hidden: int = 32,
    layers: int = 2,
    intermediate: int = 64,
    extra_words: int = 0,
    seed: int = 0,
    shard: str | None = "60KB",
):
    """Save a random ChameleonForConditionalGeneration, its tokenizer and a full VQGAN file under `path`.

    Returns (HF model, path of the VQGAN weights with the decoder, which HF checkpoints lack).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration, PreTrainedTokenizerFast

    from omni.tokenizers.vq import VQGAN

    rng = np.random.default_rng(seed)
    names = ["<s>", "<pad>", "</s>", "<unk>"]
    names += [token_name_of_code(int(k)) for k in rng.permutation(CODES)]  # shuffled: id != 4 + code
    names += WORDS + [f"w{i}" for i in range(extra_words)]
    names += ["<racm3:break>", "<eoss>", "<image>", "<reserved08706>"]
    vocab = {n: i for i, n in enumerate(names)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    hf_tok.save_pretrained(path)

    cfg = ChameleonConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
        vocabulary_map=vocab,
        vq_config=dict(VQ),
    )
    torch.manual_seed(seed)
    model = ChameleonForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # larger embeddings than the 0.02 init, so logits are not all near zero
        model.model.embed_tokens.weight.normal_(0, 1.0)
        # A VQGAN as after training: features of std ~5 (tokens ~0.5 after Orthus' x0.1), and a
        # codebook made of perturbed features of real images.
        vq = model.model.vqmodel
        z = vq.quant_conv(vq.encoder(images(8).float() / 127.5 - 1))  # (8, d, 4, 4)
        vq.quant_conv.weight *= 5.0 / z.std()
        vq.quant_conv.bias *= 5.0 / z.std()
        z = z.permute(0, 2, 3, 1).reshape(-1, VQ["embed_dim"]) * 5.0 / z.std()  # (128, d)
        pick = torch.randperm(z.shape[0])[:CODES]
        vq.quantize.embedding.weight.copy_(z[pick] + torch.randn(CODES, VQ["embed_dim"]))
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, **kwargs)

    vq = VQGAN.from_config_dict(dict(VQ))
    state = {k: v for k, v in model.model.vqmodel.state_dict().items()}
    for name, p in vq.decoder.state_dict().items():  # a random decoder, as the release's vqgan.ckpt has one
        state[f"decoder.{name}"] = torch.randn_like(p) * 0.05 if p.dim() > 1 else p.clone()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "vqgan.safetensors"))
    return model, path / "vqgan.safetensors"


def images(n: int, seed: int = 0) -> torch.Tensor:
    """Real photos (scikit-image), cropped to 32x32: uint8 (n, 3, 32, 32)."""
    from PIL import Image
    from skimage import data

    from omni.tokenizers.base import fit_image, to_uint8_tensor

    pics = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    out = [
        fit_image(Image.fromarray(pics[i % len(pics)]).rotate(15 * (i // len(pics))), 32) for i in range(n)
    ]
    return to_uint8_tensor(out)


@pytest.fixture(scope="module")
def chameleon(tmp_path_factory):
    """(HF reference model, source dir, converted omni checkpoint dir)."""
    from omni.models.convert import convert_chameleon

    root = tmp_path_factory.mktemp("chameleon")
    hf, vqgan = make_chameleon(root / "hf")
    out = convert_chameleon(root / "hf", root / "omni", vqgan=vqgan, overrides=HEAD, progress=False)
    return hf, root / "hf", out


@pytest.fixture(scope="module")
def converted(chameleon):
    from omni.models.model import OmniModel

    return OmniModel.from_pretrained(chameleon[2])


# ------------------------------------------------------------------------------------------------
# Conversion and the vq-features tokenizer
# ------------------------------------------------------------------------------------------------


def test_checkpoint_layout_keeps_names_and_stores_vqgan_once(chameleon, converted):
    from safetensors import safe_open

    hf, _, out = chameleon
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    hf_names = {f"backbone.{k}" for k in hf.state_dict() if not k.startswith("model.vqmodel.")}
    assert hf_names <= keys  # Chameleon's own parameter names, under backbone.
    assert not any("vqmodel" in k or "decoder." in k for k in keys)  # the VQGAN lives only in vqgan/
    assert {"in_proj.codebook_in", "in_proj.image_embed"} <= keys
    assert (out / "vqgan" / "model.safetensors").exists()
    cfg = json.loads((out / "backbone_config.json").read_text())
    assert cfg["model_type"] == "chameleon"
    # Backbone weights are copied byte for byte.
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        for name, value in hf.state_dict().items():
            if not name.startswith("model.vqmodel."):
                assert torch.equal(f.get_tensor(f"backbone.{name}"), value), name
    # <boi>/<eoi>/<img> are Chameleon's begin/end-of-image and placeholder tokens.
    tok = converted.tokenizer
    vmap = hf.config.vocabulary_map
    assert (tok.boi_id, tok.eoi_id, tok.img_id) == (vmap["<racm3:break>"], vmap["<eoss>"], vmap["<image>"])
    assert converted.cfg.in_proj == "soft-vq" and converted.cfg.image.kind == "vq-features"


def test_vq_features_match_chameleon_vqgan(chameleon, converted):
    hf, _, _ = chameleon
    tok = converted.image_tokenizer
    x = images(3)
    tokens = tok.encode(x)
    assert tokens.shape == (3, 16, VQ["embed_dim"]) and tok.grid == (4, 4)
    pixels = x.float() / 127.5 - 1
    with torch.no_grad():
        ref = hf.model.vqmodel.encode(pixels, return_dict=True)
        z = hf.model.vqmodel.quant_conv(ref.last_hidden_state)  # (B, d, 4, 4): pre-quantization features
    torch.testing.assert_close(tokens, z.flatten(2).transpose(1, 2) * 0.1, rtol=0, atol=1e-6)
    assert torch.equal(tok.nearest_codes(tokens), ref.image_tokens.view(3, -1))  # Chameleon's VQ codes
    out = tok.decode(tokens)  # through post_quant_conv and the VQGAN decoder
    assert out.shape == (3, 3, 32, 32) and out.dtype == torch.uint8
    with torch.no_grad():
        ref_pixels = converted.image_tokenizer.vqgan.decoder(
            converted.image_tokenizer.vqgan.post_quant_conv(z)
        )
    ref_u8 = ((ref_pixels.clamp(-1, 1) + 1) * 127.5).round()
    assert (out.float() - ref_u8).abs().max() <= 1  # x0.1 then /0.1 may flip a rounding


def test_vocabulary_map_order_is_used():
    vmap = {token_name_of_code(k): 100 + (7 * k) % 11 + 11 * (k // 11) for k in range(11)}
    vmap["<image>"] = 5
    ids = image_token_ids(vmap, 11)
    assert ids.tolist() == [vmap[token_name_of_code(k)] for k in range(11)]
    with pytest.raises(ValueError, match="codes \\[11"):
        image_token_ids(vmap, 12)


def test_text_logits_match_chameleon(chameleon, converted):
    hf, _, _ = chameleon
    ids = converted.tokenizer.encode("a red circle is the photo of a cat draw a blue square")
    input_ids = torch.tensor([[converted.special.bos, *ids]])
    with torch.no_grad():
        ref = hf(input_ids=input_ids).logits
        ours = converted.text_logits(input_ids)
    finite = ref > torch.finfo(ref.dtype).min  # image-token columns are suppressed in both
    assert torch.equal(finite, ours > torch.finfo(ours.dtype).min)
    diff = (ours - ref)[finite].abs().max().item()
    print(f"text logits max |diff| = {diff:.2e}")
    assert diff < 1e-5


def _image_text_logits(model, hf, tau: float):
    """Logits of `<bos> caption <boi> image <eoi> text` from both models, and the soft-VQ weights."""
    from omni.layout import ImageSegment, TextSegment, layout

    x = images(1, seed=1)
    tokens = model.image_tokenizer.encode(x)[0]  # (16, d)
    doc = [
        TextSegment(model.tokenizer.encode("a photo of a cat")),
        ImageSegment(tokens),
        TextSegment(model.tokenizer.encode("the cat is orange")),
    ]
    batch = layout([[doc]], model.special, add_eos=False)
    old = model.in_proj.tau
    model.in_proj.tau = tau
    try:
        with torch.no_grad():
            ours = model.lm_head(model.hidden_states(batch))
            weights = model.in_proj.weights(tokens)
    finally:
        model.in_proj.tau = old
    with torch.no_grad():
        ref = hf(input_ids=batch.input_ids, pixel_values=x.float() / 127.5 - 1).logits
    return ours, ref, weights, tokens


def test_soft_vq_small_tau_matches_discrete_chameleon(chameleon, converted):
    hf, _, _ = chameleon
    ours, ref, weights, tokens = _image_text_logits(converted, hf, tau=1e-6)
    codes = converted.image_tokenizer.nearest_codes(tokens[None])[0]
    assert torch.equal(weights.argmax(-1), codes)
    assert (weights.max(-1).values > 1 - 1e-6).all()  # one-hot: the hard VQ lookup
    finite = ref > torch.finfo(ref.dtype).min
    diff = (ours - ref)[finite].abs().max().item()
    print(f"image+text logits at tau=1e-6: max |diff| = {diff:.2e}")
    assert diff < 1e-4
    # At Orthus' tau = 1 the embedding is a real mixture, and the logits move away from Chameleon's.
    ours1, _, weights1, _ = _image_text_logits(converted, hf, tau=1.0)
    assert weights1.max(-1).values.min() < 0.99
    assert (ours1 - ref)[finite].abs().max().item() > 100 * max(diff, 1e-6)


def test_soft_vq_is_fp32_under_bf16_autocast(converted):
    tokens = converted.image_tokenizer.encode(images(2)).flatten(0, 1)  # (32, d)
    ref = converted.in_proj(tokens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = converted.in_proj(tokens)
    assert got.dtype == torch.float32 and torch.equal(got, ref)


def test_convert_without_decoder_names_the_fix(tmp_path):
    from omni.models.convert import convert_chameleon

    make_chameleon(tmp_path / "hf", shard=None)
    with pytest.raises(ValueError, match="--vqgan"):
        convert_chameleon(tmp_path / "hf", tmp_path / "out", overrides=HEAD, progress=False)
    assert not (tmp_path / "out").exists()


def test_checkpoint_round_trip(chameleon, converted, tmp_path):
    from omni.models.model import OmniModel

    converted.save_pretrained(tmp_path / "again")
    again = OmniModel.from_pretrained(tmp_path / "again")
    a, b = converted.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    x = images(2)
    assert torch.equal(converted.image_tokenizer.encode(x), again.image_tokenizer.encode(x))
    # The VQGAN is not a submodule; loading onto a device moves it too (meta stands in for a GPU here).
    elsewhere = OmniModel.from_pretrained(tmp_path / "again", device="meta")
    assert elsewhere.device.type == "meta" and elsewhere.image_tokenizer.device.type == "meta"
    assert again.image_tokenizer.device.type == "cpu"


MEMORY_PROBE = r"""
import gc, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from test_chameleon import HEAD, make_chameleon
from omni.models.convert import convert_chameleon

root = Path(sys.argv[1])
hf, vqgan = make_chameleon(root / "big", hidden=512, layers=4, intermediate=1376, extra_words=8000,
                           shard="20MB")
model_bytes = sum(v.numel() * v.element_size() for v in hf.state_dict().values())
_, vqgan_small = make_chameleon(root / "small", shard=None)
del hf
gc.collect()
# warm-up: imports and lazy initialisation are not what is measured
convert_chameleon(root / "small", root / "out_small", vqgan=vqgan_small, overrides=HEAD, progress=False)

def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))

open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS mark (VmHWM)
base = status("VmRSS")
convert_chameleon(root / "big", root / "out_big", vqgan=vqgan, overrides=HEAD, progress=False)
print(model_bytes, status("VmHWM") - base)
"""


@pytest.mark.slow
def test_conversion_streams_weights_without_a_second_copy(tmp_path):
    """Peak extra RSS while converting an 81 MiB model stays well under the model's size.

    Loading the model (1x) and serialising it (another 1x) would need at least 2x; the streaming
    converter needs about one tensor (the embedding table: 16 MiB here).
    """
    out = subprocess.run(
        [PY, "-c", MEMORY_PROBE, str(tmp_path), str(ROOT / "tests")],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    model_bytes, extra = map(int, out.stdout.split()[-2:])
    print(f"model {model_bytes / 2**20:.1f} MiB, extra peak RSS {extra / 2**20:.1f} MiB")
    assert model_bytes > 60 * 2**20
    assert extra < 0.5 * model_bytes


# ------------------------------------------------------------------------------------------------
# The first-stage preset
# ------------------------------------------------------------------------------------------------


def t2i_batches(model, n_images: int = 8, rows: int = 4):
    """Text-to-image documents (caption -> image) from real photos, laid out as training batches."""
    from omni.layout import ImageSegment, TextSegment, layout

    captions = ["a photo of an astronaut", "a photo of a cat", "a photo of a coffee", "a photo of a rocket"]
    tokens = model.image_tokenizer.encode(images(n_images))  # (n, 16, d)
    docs = [
        [TextSegment(model.tokenizer.encode(captions[i % 4]), loss=False), ImageSegment(tokens[i])]
        for i in range(n_images)
    ]
    return [layout([[d] for d in docs[i : i + rows]], model.special) for i in range(0, n_images, rows)]


def stage1_trainable(names, patterns: list[str]) -> dict[str, bool]:
    """name -> trains? under the preset's `train.trainable` patterns."""
    import fnmatch

    return {n: any(fnmatch.fnmatchcase(n, p) for p in patterns) for n in names}


def test_stage1_preset_trains_only_new_parts_and_loss_falls(chameleon, converted, tmp_path):
    """The real training loop (DeepSpeed ZeRO-2, as the preset says) from the converted checkpoint,
    exported, compared tensor by tensor with the checkpoint it started from."""
    from safetensors.torch import load_file

    from omni.config import load_config
    from omni.models.model import OmniModel
    from omni.train.export import export
    from omni.train.loop import train

    preset = load_config("orthus-stage1")
    assert preset.train.trainable == ["in_proj.codebook_in", "head.*"]
    assert preset.model.loss_weight_text == 0.0 and preset.model.in_proj == "soft-vq"

    ckpt = chameleon[2]
    cfg = load_config(ckpt / "config.yaml", [  # what the docs tell users to run, made small
        f"train.init_from={ckpt}", f"train.out_dir={tmp_path / 'run'}", "train.steps=40", "train.lr=1e-2",
        "train.warmup_steps=1", "train.precision=fp32", "train.log_every=8", "train.save_every=1000",
    ])
    assert cfg.train.trainable == preset.train.trainable and cfg.train.zero_stage == preset.train.zero_stage
    batches = t2i_batches(converted, n_images=8, rows=4)
    run = train(cfg, batches=itertools.cycle(batches))

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 5
    assert all(r["loss"] == r["loss_image"] for r in records)  # loss_weight_text = 0: diffusion loss only
    print(f"stage-1 diffusion loss per 8 steps: {', '.join(f'{v:.4f}' for v in losses)}")
    assert losses[-1] < 0.8 * losses[0] and max(losses[1:]) < losses[0]

    out = export(run, tmp_path / "stage1")
    before, after = load_file(ckpt / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    trains = stage1_trainable(before, cfg.train.trainable)
    assert trains["in_proj.codebook_in"] and not trains["in_proj.image_embed"]
    assert sum(trains.values()) > 10 and not any(v for k, v in trains.items() if k.startswith("backbone."))
    for name, value in before.items():
        changed = not torch.equal(value, after[name])
        assert changed == trains[name], f"{name}: changed={changed}, should train={trains[name]}"
    model = OmniModel.from_pretrained(out)  # the export is an ordinary inference checkpoint
    assert torch.equal(model.in_proj.codebook_in, after["in_proj.codebook_in"])
    assert model.run_config.train.init_from == str(ckpt.resolve())


# ------------------------------------------------------------------------------------------------
# The CLI: convert, generate, chat
# ------------------------------------------------------------------------------------------------


def omni(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([OMNI, *args], check=False, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
def test_cli_convert_generate_and_chat(chameleon, tmp_path):
    import pexpect
    from PIL import Image

    _, src, _ = chameleon
    ckpt = tmp_path / "ckpt"
    res = omni("convert", "chameleon", "--src", str(src), "--out", str(ckpt), "--vqgan",
               str(src / "vqgan.safetensors"), "--quiet", *HEAD)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "wrote" in res.stdout and (ckpt / "vqgan" / "config.json").exists()

    # Text to image: the diffusion head draws 16 tokens, the VQGAN decoder turns them into pixels.
    res = omni("generate", "--ckpt", str(ckpt), "--prompt", "a photo of a cat", "--mode", "image",
               "--steps", "2", "--out", str(tmp_path / "gen"), "--json", "--seed", "3")
    assert res.returncode == 0, res.stderr[-2000:]
    record = json.loads(res.stdout.strip().splitlines()[-1])
    pictures = [s for s in record["segments"] if s["type"] == "image"]
    assert len(pictures) == 1 and record["settings"]["seed"] == 3
    with Image.open(pictures[0]["path"]) as im:
        assert im.size == (32, 32) and len(np.unique(np.asarray(im.convert("L")))) > 8  # not flat

    # Image in, text out.
    Image.fromarray(images(1)[0].permute(1, 2, 0).numpy()).save(tmp_path / "cat.png")
    res = omni("generate", "--ckpt", str(ckpt), "--prompt", "<image> the cat is", "--image",
               str(tmp_path / "cat.png"), "--mode", "text", "--max-new-tokens", "4", "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    record = json.loads(res.stdout.strip().splitlines()[-1])
    assert [s["type"] for s in record["segments"]] == ["text"] and record["segments"][0]["text"].strip()

    child = pexpect.spawn(OMNI, ["chat", "--ckpt", str(ckpt), "--out", str(tmp_path / "chat"), "--no-preview",
                                 "--steps", "2", "--max-new-tokens", "4"], timeout=240, encoding="utf-8",
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    try:
        child.expect("you> ")
        child.sendline("/draw a red circle")
        child.expect(r"\[image saved: (\S+\.png)\]")
        drawn = Path(child.match.group(1))
        child.expect("you> ")
        child.sendline("what is in the photo")
        child.expect("omni> ")
        child.expect("you> ")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    with Image.open(drawn) as im:
        assert im.size == (32, 32)


@pytest.mark.slow
def test_cli_stage1_then_stage2_then_generate(chameleon, tmp_path):
    """The README's Orthus commands on the converted checkpoint: stage 1 from the checkpoint's own
    config, export, stage 2 from the preset (ZeRO-3) on the export, export, generate."""
    from safetensors.torch import load_file

    from omni.config import load_config

    ckpt = chameleon[2]
    res = omni("data", "shapes", "--out", str(tmp_path / "shapes"), "--train", "48", "--val", "0",
               "--shard-size", "48")
    assert res.returncode == 0, res.stderr[-2000:]
    small = [f"data.train=[{tmp_path / 'shapes' / 'train-000000.tar'}]", "train.precision=fp32", "data.seq_len=96",
             "data.batch_size=2", "train.log_every=1", "train.val_every=0", "train.warmup_steps=1"]

    # Overrides after --resume too: `omni train` takes them anywhere.
    res = omni("train", "--config", str(ckpt / "config.yaml"), f"train.init_from={ckpt}", "--resume", "auto",
               f"train.out_dir={tmp_path / 'run1'}", "train.steps=2", *small)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "ZeRO-2" in res.stdout and "(0.02M trained)" in res.stdout  # frozen backbone: codebook_in + head
    res = omni("export", "--run", str(tmp_path / "run1"), "--out", str(tmp_path / "stage1"))
    assert res.returncode == 0, res.stderr[-2000:]

    res = omni("train", "--config", "orthus-stage2", f"train.init_from={tmp_path / 'stage1'}",
               f"train.out_dir={tmp_path / 'run2'}", "train.steps=2", "train.lr=1e-3", *small)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "ZeRO-3" in res.stdout and "model.head.width=32 (config: 1536)" in res.stdout
    res = omni("export", "--run", str(tmp_path / "run2"), "--out", str(tmp_path / "stage2"))
    assert res.returncode == 0, res.stderr[-2000:]
    one, two = (load_file(tmp_path / s / "model.safetensors") for s in ("stage1", "stage2"))
    assert not torch.equal(one["backbone.model.layers.0.mlp.up_proj.weight"],
                           two["backbone.model.layers.0.mlp.up_proj.weight"])  # stage 2 trains everything
    cfg = load_config(tmp_path / "stage2" / "config.yaml")
    assert cfg.name == "orthus-stage2" and cfg.generation.cfg_scale == 3.0 and cfg.model.head.width == 32

    res = omni("generate", "--ckpt", str(tmp_path / "stage2"), "--prompt", "a red circle", "--mode", "image",
               "--steps", "2", "--out", str(tmp_path / "gen"), "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    record = json.loads(res.stdout.strip().splitlines()[-1])
    assert [s["type"] for s in record["segments"]] == ["image"]
