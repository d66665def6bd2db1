"""Every preset shipped in omni/configs builds its model at reduced width and depth and trains one
step through the real loop (its ZeRO stage, precision, accumulation, activation checkpointing, EMA,
trainable globs and DeepSpeed JSON as written), saves a checkpoint and exports it.

Only the sizes change (and local stand-ins for the pretrained files a preset names: a tiny tokenizer,
a tiny AutoencoderKL, a tiny converted Chameleon), so a preset that no longer builds or trains
fails here rather than on someone's cluster.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_chameleon import HEAD as CHAMELEON_HEAD
from test_chameleon import make_chameleon

from omni.config import load_config, presets
from omni.layout import SpecialIds
from omni.models.checkpoint import load_config_from_checkpoint, read_backbone_config
from omni.tokenizers.image import build_image_tokenizer
from omni.tokenizers.text import TextTokenizer
from omni.train.synthetic import SyntheticBatches

SEQ = 64
SMALL = [  # reduced width and depth; what the preset says about training stays
    "model.backbone.pretrained=null", "model.backbone.hidden_size=64", "model.backbone.num_layers=2",
    "model.backbone.num_heads=4", "model.backbone.num_kv_heads=2", "model.backbone.intermediate_size=128",
    "model.backbone.max_position_embeddings=256", "model.head.width=64", "model.head.depth=2",
]
RUN = ["train.steps=1", "train.save_every=1", "train.log_every=1", "train.val_every=0", "train.warmup_steps=0",
       "data.batch_size=2", f"data.seq_len={SEQ}", "train.global_batch_size=4"]  # 2 micro-batches: accumulation


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
                        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32)
    path = tmp_path_factory.mktemp("vae") / "vae"
    vae.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def converted_chameleon(tmp_path_factory):
    from omni.models.convert import convert_chameleon

    root = tmp_path_factory.mktemp("chameleon")
    _, vqgan = make_chameleon(root / "hf")
    return convert_chameleon(root / "hf", root / "omni", vqgan=vqgan, overrides=CHAMELEON_HEAD, progress=False)


def small_config(name: str, tmp_path, tokenizer_dir, tiny_vae, converted_chameleon):
    """The preset, made small; returns (config, tokenizer dir, image tokenizer root)."""
    preset = load_config(name)
    run = [f"train.out_dir={tmp_path / 'run'}", *RUN]
    if preset.model.backbone.arch == "chameleon":  # built from a converted checkpoint, as its docs say
        return load_config(name, [f"train.init_from={converted_chameleon}", *run]), converted_chameleon / "tokenizer", \
            converted_chameleon
    image = {"patch": ["model.image.image_size=32", "model.image.patch_size=8"],
             "vae": ["model.image.image_size=32", "model.image.patch_size=4", f"model.image.path={tiny_vae}"]}
    cfg = load_config(name, [*SMALL, f"model.tokenizer={tokenizer_dir}", *image[preset.model.image.kind], *run])
    return cfg, tokenizer_dir, None


@pytest.mark.parametrize("name", sorted(presets()))
def test_preset_trains_one_step_saves_and_exports(name, tmp_path, tokenizer_dir, tiny_vae, converted_chameleon,
                                                  monkeypatch):
    from omni.models.model import OmniModel
    from omni.train import engine
    from omni.train.export import export
    from omni.train.loop import train

    preset = load_config(name)
    if preset.train.precision == "bf16" and not engine.hardware_has_bf16():
        # The GPU presets ask for bf16, which `omni train` refuses on a CPU without native bf16
        # (AVX2 only: emulated bf16 matmuls run ~60x slower; test_train_engine checks the message).
        # At this test's sizes emulation costs seconds, so the preset's own precision still runs.
        monkeypatch.setattr(engine, "hardware_has_bf16", lambda: True)
    cfg, tok_dir, root = small_config(name, tmp_path, tokenizer_dir, tiny_vae, converted_chameleon)
    assert cfg.train.zero_stage == preset.train.zero_stage and cfg.train.precision == preset.train.precision
    assert cfg.train.trainable == preset.train.trainable and cfg.train.deepspeed_config == preset.train.deepspeed_config
    tok = TextTokenizer.from_pretrained(tok_dir)
    # A run started from a checkpoint takes its model section (and image tokenizer) from there.
    image_cfg = load_config_from_checkpoint(root).model.image if root is not None else cfg.model.image
    image_tok = build_image_tokenizer(image_cfg, root=root)
    special = SpecialIds(tok.bos_id, tok.eos_id, tok.pad_id, tok.boi_id, tok.eoi_id, tok.img_id)

    banned = set()
    if root is not None:  # Chameleon's VQ image-token ids are never text (their logits are suppressed)
        from transformers.models.chameleon.modeling_chameleon import ChameleonImageVocabularyMapping

        banned = set(ChameleonImageVocabularyMapping(read_backbone_config(root).vocabulary_map).image_tokens)

    def batches(rank: int, world_size: int) -> SyntheticBatches:
        b = SyntheticBatches(special, len(tok), image_tok.token_dim, image_tok.num_tokens, rows=2, seq_len=SEQ,
                             rank=rank, world_size=world_size, grad_accum=2)
        b.text_ids = [i for i in b.text_ids if i not in banned]
        return b

    run_dir = train(cfg, batches=batches)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in step] == [1] and math.isfinite(step[0]["loss"]) and step[0]["loss"] > 0
    assert (run_dir / "checkpoints" / "step00000001" / "COMPLETE").exists()
    model = OmniModel.from_pretrained(export(run_dir, tmp_path / "export"))
    layers = model.backbone.config.get_text_config().num_hidden_layers
    assert layers == (2 if root is not None else cfg.model.backbone.num_layers)  # the tiny Chameleon has 2
    assert model.run_config.name == preset.name


def test_tiny_answers_have_room_for_a_whole_story(tokenizer_dir):
    """`omni chat` and `omni serve` answer within `generation.max_new_tokens`: the tiny preset's must
    hold the longest answer of a shapes story (every picture with <boi>/<eoi>, every sentence, the
    end), or a story asked for in chat is cut after two pictures (the default 64 did)."""
    from omni.data.shapes import documents

    cfg = load_config("tiny", [f"model.tokenizer={tokenizer_dir}"])
    text = TextTokenizer.from_pretrained(tokenizer_dir)
    per_image = build_image_tokenizer(cfg.model.image).num_tokens + 2  # x1..xN between <boi> and <eoi>
    longest = 0
    for doc in documents(["story"] * 200, 0, split="val"):
        answer = [t for t in doc.texts[1:] if t is not None]  # texts[0] is the request
        pictures = sum(im is not None for im in doc.images)
        longest = max(longest, pictures * per_image + sum(len(text.encode(t)) for t in answer) + 1)
    assert 64 < longest <= cfg.generation.max_new_tokens, (longest, cfg.generation.max_new_tokens)
