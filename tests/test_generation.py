"""The interleaved sampler: KV cache vs recompute, batch vs single, CFG, modes, limits, events.

A random tiny model writes random text and images, which is all equality tests need. Its LM head
gets a bias on <boi> so rows really enter image mode mid-answer and come back to text.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import TINY, decoder_rows
from PIL import Image

from omni.config import GenerationConfig, load_config
from omni.inference.generate import generate
from omni.inference.prompts import encode_prompts
from omni.inference.rows import GenerationEvents
from omni.models.model import OmniModel

PROMPTS = [
    ["a red circle left of a blue square."],
    [Image.new("RGB", (40, 36), (40, 80, 220)), "what color is the square?"],
    ["draw", "the digit 7."],
]
SEEDS = [11, 12, 13]


def with_bias(model: OmniModel, boi: float = 3.0, extra: dict[int, float] | None = None) -> OmniModel:
    """Swap the bias-free LM head for one with a bias that favours <boi> (and `extra` tokens)."""
    old = model.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    head.weight.data.copy_(old.weight.data)
    head.bias.data.zero_()
    head.bias.data[model.special.boi] = boi
    for tok, b in (extra or {}).items():
        head.bias.data[tok] = b
    model.backbone.lm_head = head
    return model


def wake_head(model: OmniModel) -> OmniModel:
    """The head's zero-initialised modulation and output ignore the condition; randomise them."""
    with torch.no_grad():
        for p in model.head.parameters():
            if not p.any():
                p.normal_(0.0, 0.05)
    return model


@pytest.fixture(scope="module")
def model(tokenizer_dir):
    # Image cell embeddings on: cached, batched and reference paths must all count cells alike.
    cfg = load_config("tiny", [f"model.tokenizer={tokenizer_dir}", *TINY, "model.image_pos_embed=true"])
    torch.manual_seed(0)
    return wake_head(with_bias(OmniModel.from_config(cfg.model).eval()))


def gcfg(**kw) -> GenerationConfig:
    base = {"temperature": 1.0, "top_k": 40, "top_p": 0.95, "image_steps": 3, "max_new_tokens": 48,
            "cfg_scale": 3.0, "sampler": "stochastic", "image_temperature": 0.8}
    return GenerationConfig(**{**base, **kw})


def assert_same(a, b, atol=1e-4):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.ids == y.ids
        assert x.finish_reason == y.finish_reason
        assert len(x.image_tokens) == len(y.image_tokens)
        for p, q in zip(x.image_tokens, y.image_tokens):
            torch.testing.assert_close(p, q, atol=atol, rtol=0)
        assert [type(s) for s in x.segments] == [type(s) for s in y.segments]


@pytest.mark.parametrize("mode", ["auto", "image"])
def test_kv_cache_equals_recompute(model, mode):
    cached = generate(model, PROMPTS, gcfg(use_cache=True), seeds=SEEDS, mode=mode)
    full = generate(model, PROMPTS, gcfg(use_cache=False), seeds=SEEDS, mode=mode)
    assert_same(cached, full)
    assert sum(len(r.image_tokens) for r in cached) >= 2
    if mode == "auto":
        # Some row went text -> image -> text, so the switch back through a forced <eoi> is covered.
        sp = model.special
        assert any(sp.eoi in r.ids and r.ids.index(sp.eoi) < len(r.ids) - 1 for r in cached)


def test_batch_of_three_equals_each_alone(model):
    batch = generate(model, PROMPTS, gcfg(), seeds=SEEDS)
    alone = [generate(model, [p], gcfg(), seeds=[s])[0] for p, s in zip(PROMPTS, SEEDS)]
    assert_same(batch, alone)
    assert len({tuple(r.ids) for r in batch}) == 3


def test_cfg_two_passes_equal_one_batch(model):
    one = generate(model, PROMPTS, gcfg(), seeds=SEEDS)
    two = generate(model, PROMPTS, gcfg(), seeds=SEEDS, cfg_batching=False)
    assert_same(one, two)
    assert sum(len(r.image_tokens) for r in one) >= 2


def reference_t2i(model, text: str, cfg: GenerationConfig, seed: int) -> torch.Tensor:
    """A plain loop: the caption pass and a separate `[bos] <boi> x1 ...` pass, each with its own cache."""
    sp, d = model.special, model.image_tokenizer.token_dim
    gen = torch.Generator().manual_seed(seed)

    def step(ids, x, cache, cell=0):
        ids_t = torch.tensor([ids])
        mask = ids_t == sp.img
        cells = torch.full_like(ids_t, cell)  # the one image token fed is the image's cell `cell`
        emb = model.embed(ids_t, x if x is not None else torch.zeros(0, d), mask, cells)
        with torch.no_grad():
            hidden, cache = model.decoder(emb, cache=cache, use_cache=True)
        return hidden[:, -1], cache

    h_c, cache_c = step([sp.bos, *model.tokenizer.encode(text), sp.boi], None, None)
    h_u, cache_u = (step([sp.bos, sp.boi], None, None) if cfg.cfg_scale != 1 else (None, None))
    tokens = []
    for j in range(model.image_tokenizer.num_tokens):
        x = model.head.sample(h_c, h_u, cfg_scale=cfg.cfg_scale, steps=cfg.image_steps,
                              temperature=cfg.image_temperature, sampler=cfg.sampler, generator=[gen])
        tokens.append(x[0])
        h_c, cache_c = step([sp.img], x, cache_c, cell=j)
        if h_u is not None:
            h_u, cache_u = step([sp.img], x, cache_u, cell=j)
    return torch.stack(tokens)  # (N, d)


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_cfg_rows_equal_separate_unconditional_pass(model, scale):
    cfg = gcfg(cfg_scale=scale)
    texts = ["a green triangle above a yellow circle.", "draw the digit 3."]
    with decoder_rows(model) as rows_seen:
        results = generate(model, [[t] for t in texts], cfg, seeds=[5, 6], mode="image")
    for text, seed, res in zip(texts, [5, 6], results):
        torch.testing.assert_close(res.image_tokens[0], reference_t2i(model, text, cfg, seed), atol=1e-4, rtol=0)
    # Scale 1 runs no unconditional rows at all; otherwise they join the same batch.
    assert max(rows_seen) == (2 if scale == 1.0 else 4)


def test_seed_reproducible_and_settings_recorded(model):
    a = generate(model, PROMPTS[:1], gcfg(), seeds=[3])
    b = generate(model, PROMPTS[:1], gcfg(), seeds=[3])
    c = generate(model, PROMPTS[:1], gcfg(), seeds=[4])
    assert_same(a, b, atol=0)
    assert a[0].ids != c[0].ids
    s = a[0].settings
    assert s["seed"] == 3 and s["cfg_scale"] == 3.0 and s["image_steps"] == 3 and s["sampler"] == "stochastic"
    assert {"temperature", "image_temperature", "top_k", "top_p", "mode", "max_new_tokens", "checkpoint"} <= set(s)
    # The recorded settings alone reproduce the row.
    keys = {f.name for f in dataclasses.fields(GenerationConfig)}
    again = generate(model, PROMPTS[:1], GenerationConfig(**{k: v for k, v in s.items() if k in keys}),
                     seeds=[s["seed"]], mode=s["mode"])
    assert_same(a, again, atol=0)


def test_modes(model):
    sp = model.special
    text = generate(model, PROMPTS, gcfg(), seeds=SEEDS, mode="text")
    assert all(sp.boi not in r.ids and not r.image_tokens for r in text)
    assert all(isinstance(s, str) for r in text for s in r.segments)
    image = generate(model, PROMPTS, gcfg(max_new_tokens=4), seeds=SEEDS, mode="image")
    n = model.image_tokenizer.num_tokens
    for r in image:
        assert r.finish_reason == "eos"
        assert r.ids == [sp.boi] + [sp.img] * n
        assert len(r.segments) == 1 and r.segments[0].size == (32, 32)


def test_limits(model, tokenizer_dir):
    sp = model.special
    capped = generate(model, PROMPTS, gcfg(max_images=1, max_new_tokens=200), seeds=SEEDS)
    assert all(len(r.images) <= 1 for r in capped)
    assert any(r.finish_reason == "max_images" for r in capped)
    short = generate(model, PROMPTS, gcfg(max_new_tokens=5), seeds=SEEDS)
    assert all(len(r.ids) <= 5 and r.finish_reason in ("max_tokens", "eos") for r in short)
    assert all(sp.boi not in r.ids for r in short)  # an image (N + 2 positions) does not fit in 5

    cfg = load_config("tiny", [f"model.tokenizer={tokenizer_dir}", *TINY])
    torch.manual_seed(1)
    parrot = OmniModel.from_config(cfg.model).eval()
    word = parrot.tokenizer.encode("circle")[-1]
    with_bias(parrot, boi=-50.0, extra={word: 50.0})
    rep = generate(parrot, PROMPTS[:1], gcfg(repetition_stop=4, temperature=0.0), seeds=[0])[0]
    assert rep.finish_reason == "repetition" and rep.ids == [word] * 4


def test_context_overflow_says_by_how_much(model):
    ctx = model.backbone.config.max_position_embeddings
    long = ["circle " * (ctx + 10)]
    n = len(encode_prompts(model, [long])[0])
    with pytest.raises(ValueError, match=f"{n + 1 - ctx} too many"):
        generate(model, [["ok"], long], gcfg())
    n_img = model.image_tokenizer.num_tokens + 2
    with pytest.raises(ValueError, match=f"{n + n_img - ctx} too many"):
        generate(model, [long], gcfg(), mode="image")


def test_prompt_layout_matches_training(model):
    from omni.layout import ImageSegment, TextSegment, layout

    sp = model.special
    image = Image.new("RGB", (32, 32), (220, 40, 40))
    items = encode_prompts(model, [["a red", image, "circle."]])[0]
    tok = model.tokenizer
    doc = [TextSegment(tok.encode("a red")), ImageSegment(model.image_tokenizer.encode([image])[0]),
           TextSegment(tok.encode("circle."))]
    batch = layout([[doc]], sp, add_eos=False)
    assert [t for t, _ in items] == batch.input_ids[0].tolist()
    got = torch.stack([x for _, x in items if x is not None])
    torch.testing.assert_close(got, batch.image_tokens)


class Recorder(GenerationEvents):
    def __init__(self, stop_after: int | None = None):
        self.texts: dict[int, str] = {}
        self.tokens: list[tuple[int, int, int]] = []
        self.images: list[int] = []
        self.polls = 0
        self.stop_after = stop_after

    def text(self, row, delta):
        self.texts[row] = self.texts.get(row, "") + delta

    def image_token(self, row, done, total):
        self.tokens.append((row, done, total))

    def image_done(self, row, image):
        self.images.append(row)

    def should_stop(self):
        self.polls += 1
        return self.stop_after is not None and self.polls > self.stop_after


def test_events_stream_text_and_image_progress(model):
    rec = Recorder()
    res = generate(model, PROMPTS, gcfg(max_images=1), seeds=SEEDS, mode="text", events=rec)
    for i, r in enumerate(res):
        assert rec.texts.get(i, "").replace(" ", "") == "".join(r.segments).replace(" ", "")
    rec = Recorder()
    res = generate(model, PROMPTS[:2], gcfg(), seeds=SEEDS[:2], mode="image", events=rec)
    n = model.image_tokenizer.num_tokens
    assert sorted(rec.images) == [0, 1]
    assert [d for r, d, t in rec.tokens if r == 0] == list(range(1, n + 1))


def test_cancel_stops_every_row(model):
    rec = Recorder(stop_after=3)
    res = generate(model, PROMPTS, gcfg(), seeds=SEEDS, events=rec)
    assert all(r.finish_reason == "cancelled" for r in res)
    assert all(len(r.ids) <= 3 for r in res)


def test_bidirectional_prompt_images_read_as_in_training(tokenizer_dir):
    """prompt_image_attention=bidirectional: the sampler's prefill gives the training forward's
    hidden state (a prompt with two images), and the KV cache still equals recomputing."""
    from omni.inference.rows import _Group
    from omni.inference.sampler import Sampler
    from omni.layout import ImageSegment, TextSegment, layout

    cfg = load_config("tiny", [f"model.tokenizer={tokenizer_dir}", *TINY, "model.image_pos_embed=true",
                               "model.prompt_image_attention=bidirectional"])
    torch.manual_seed(0)
    model = wake_head(with_bias(OmniModel.from_config(cfg.model).eval()))
    tok, it = model.tokenizer, model.image_tokenizer
    red, blue = Image.new("RGB", (32, 32), (220, 40, 40)), Image.new("RGB", (32, 32), (40, 80, 220))
    red.paste((40, 170, 60), (0, 0, 12, 12))  # tokens that differ within an image
    prompt = [red, "and", blue, "what color is the square?"]
    doc = [ImageSegment(it.encode([red])[0], loss=False), TextSegment(tok.encode("and"), loss=False),
           ImageSegment(it.encode([blue])[0], loss=False), TextSegment(tok.encode("what color is the square?"))]
    batch = layout([[doc]], model.special, add_eos=False)

    def prefill(m):
        sampler = Sampler(m, gcfg(), "text", seeds=[0])
        row = sampler._rows(encode_prompts(m, [prompt]))[0]
        with torch.no_grad():
            return sampler._forward(_Group(streams=[row.cond]), 0)[0, -1]

    with torch.no_grad():
        trained = model.hidden_states(batch)[0, -1]
    torch.testing.assert_close(prefill(model), trained, atol=1e-5, rtol=0)
    model.cfg.prompt_image_attention = "causal"  # the same weights read the images causally: another state
    assert (prefill(model) - trained).abs().max() > 1e-3
    model.cfg.prompt_image_attention = "bidirectional"
    prompts = [prompt, PROMPTS[0], PROMPTS[1]]
    for mode in ("auto", "image"):
        assert_same(generate(model, prompts, gcfg(use_cache=True), seeds=SEEDS, mode=mode),
                    generate(model, prompts, gcfg(use_cache=False), seeds=SEEDS, mode=mode))
