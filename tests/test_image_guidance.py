"""Image-guided classifier-free guidance (InstructPix2Pix) in the head and the sampler.

Three predictions per drawing row: c (the whole context), i (the context's last picture, no text)
and u ([bos] only), combined as u + s_img (i - u) + s (c - i). The sampler's one-batch result is
checked against an eager reference that runs each stream alone with its own cache and its own
Euler loop, written here without the head's sampling code.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import TINY, decoder_rows
from PIL import Image

from omni.config import GenerationConfig, load_config
from omni.heads.diffusion import guide
from omni.inference.generate import generate
from omni.inference.prompts import encode_prompts
from omni.models.model import OmniModel, image_cells

SOURCE = Image.new("RGB", (32, 32), (40, 80, 220))
EDIT = [SOURCE, "make the circle blue"]
T2I = ["a red circle left of a blue square."]
CHATTY = ["draw a square.", SOURCE, "now move it to the left"]  # text before the picture (a chat history)
FIRST = Image.new("RGB", (32, 32), (220, 40, 40))
SECOND_ROUND = [FIRST, "make the square blue", SOURCE, "move it to the left"]  # i sees only the last picture


@pytest.fixture(scope="module")
def model(tokenizer_dir):
    # causal given pictures: `reference` runs each stream with a causal decoder
    cfg = load_config("tiny", [f"model.tokenizer={tokenizer_dir}", *TINY, "model.image_pos_embed=true",
                               "model.prompt_image_attention=causal"])
    torch.manual_seed(0)
    model = OmniModel.from_config(cfg.model).eval()
    with torch.no_grad():  # the zero-initialised modulation and output would ignore the condition
        for p in model.head.parameters():
            if not p.any():
                p.normal_(0.0, 0.05)
    return model


def gcfg(**kw) -> GenerationConfig:
    base = {"image_steps": 3, "cfg_scale": 3.0, "sampler": "euler", "image_temperature": 0.8}
    return GenerationConfig(**{**base, **kw})


def reference(model, streams: list[list], combine, cfg: GenerationConfig, seed: int) -> torch.Tensor:
    """Eager image mode: each stream (its prefix items, [bos] first) runs alone with its own cache,
    positions contiguous; each Euler step combines the streams' predictions with `combine`."""
    assert model.head.cfg.parameterization == "flow" and cfg.sampler == "euler"
    sp, d = model.special, model.image_tokenizer.token_dim
    gen = torch.Generator().manual_seed(seed)

    def feed(items, cache, cell=None):
        ids = torch.tensor([[t for t, _ in items]])
        xs = [x for _, x in items if x is not None]
        cells = image_cells(ids, sp.img) if cell is None else torch.full_like(ids, cell)
        emb = model.embed(ids, torch.stack(xs) if xs else torch.zeros(0, d), ids == sp.img, cells)
        with torch.no_grad():
            hidden, cache = model.decoder(emb, cache=cache, use_cache=True)
        return hidden[:, -1], cache  # (1, D)

    state = [feed([*items, (sp.boi, None)], None) for items in streams]
    ts = torch.linspace(1.0, 0.0, cfg.image_steps + 1, dtype=torch.float64).tolist()
    tokens = []
    for j in range(model.image_tokenizer.num_tokens):
        x = torch.randn(1, d, generator=gen) * cfg.image_temperature
        for t, t_next in itertools.pairwise(ts):
            with torch.no_grad():
                preds = [model.head.net(x, torch.full((1,), t * 1000.0), h) for h, _ in state]
            x = x - (t - t_next) * combine(*preds)
        tokens.append(x[0])
        state = [feed([(sp.img, x[0])], cache, cell=j) for _, cache in state]
    return torch.stack(tokens)  # (N, d)


def streams_of(model, prompt) -> tuple[list, list, list]:
    """(conditional, image-only, unconditional) prefixes of a prompt, as training lays them out
    (omni.data.loader.edit_condition): i is [bos] and the prompt's last picture alone."""
    sp = model.special
    items = encode_prompts(model, [prompt])[0]
    ids = [t for t, _ in items]
    if sp.eoi not in ids:
        return items, None, [items[0]]
    end = len(ids) - 1 - ids[::-1].index(sp.eoi)
    start = max(j for j in range(end) if ids[j] == sp.boi)
    return items, [items[0], *items[start:end + 1]], [items[0]]


@pytest.mark.parametrize("use_cache,static", [(True, False), (False, False), (True, True)])
def test_three_streams_in_one_batch_equal_each_stream_alone(model, use_cache, static):
    """...also with the preallocated KV cache (`generation.static_cache`), where the image-only
    streams join a static batch and the fused image step must leave three-stream rows alone."""
    s, s_img = 3.0, 1.5
    cfg = gcfg(cfg_scale=s, image_cfg_scale=s_img, use_cache=use_cache, static_cache=static, cuda_graphs=static)
    with decoder_rows(model) as rows_seen:
        got = generate(model, [EDIT, T2I, CHATTY, SECOND_ROUND], cfg, seeds=[5, 6, 7, 8], mode="image")
    ip2p = lambda c, i, u: u + s_img * (i - u) + s * (c - i)
    for prompt, seed, res in [(EDIT, 5, got[0]), (CHATTY, 7, got[2]), (SECOND_ROUND, 8, got[3])]:
        c, i, u = streams_of(model, prompt)
        want = reference(model, [c, i, u], ip2p, cfg, seed)
        torch.testing.assert_close(res.image_tokens[0], want, atol=1e-4, rtol=0)
    # A row without a picture runs as today: two streams, u + s (c - u), whatever image_cfg_scale says.
    c, _, u = streams_of(model, T2I)
    want = reference(model, [c, u], lambda c, u: u + s * (c - u), cfg, 6)
    torch.testing.assert_close(got[1].image_tokens[0], want, atol=1e-4, rtol=0)
    # While drawing: 4 conditional + 4 unconditional + 3 image-only streams in one forward.
    assert max(rows_seen) == 11
    assert got[0].settings["image_cfg_scale"] == s_img and got[0].settings["cfg_scale"] == s


def test_unset_image_scale_is_plain_cfg_as_before(model):
    """image_cfg_scale=None (the default) keeps the two-stream CFG of before, edits included."""
    cfg = gcfg()
    assert GenerationConfig().image_cfg_scale is None and cfg.image_cfg_scale is None
    got = generate(model, [EDIT], cfg, seeds=[9], mode="image")[0]
    c, _, u = streams_of(model, EDIT)
    want = reference(model, [c, u], lambda c, u: u + 3.0 * (c - u), cfg, 9)
    torch.testing.assert_close(got.image_tokens[0], want, atol=1e-4, rtol=0)
    assert got.settings["image_cfg_scale"] is None


def test_equal_scales_reduce_to_plain_cfg(model):
    """u + s (i - u) + s (c - i) = u + s (c - u): the third stream changes nothing at s_img = s."""
    plain = generate(model, [EDIT, CHATTY], gcfg(sampler="stochastic"), seeds=[3, 4], mode="image")
    three = generate(model, [EDIT, CHATTY], gcfg(sampler="stochastic", image_cfg_scale=3.0), seeds=[3, 4],
                     mode="image")
    for a, b in zip(plain, three):
        torch.testing.assert_close(a.image_tokens[0], b.image_tokens[0], atol=1e-4, rtol=0)


def test_two_passes_equal_one_batch_in_auto_mode(model):
    """Rows that write text and then draw (auto mode), mixed with edits, batched or not."""
    cfg = gcfg(sampler="stochastic", image_cfg_scale=2.0, temperature=1.0, max_new_tokens=40)
    prompts = [EDIT, T2I, [SOURCE, "what color is the square?"], CHATTY, SECOND_ROUND]
    one = generate(model, prompts, cfg, seeds=[1, 2, 3, 4, 5], mode="auto")
    two = generate(model, prompts, cfg, seeds=[1, 2, 3, 4, 5], mode="auto", cfg_batching=False)
    for a, b in zip(one, two):
        assert a.ids == b.ids
        for p, q in zip(a.image_tokens, b.image_tokens):
            torch.testing.assert_close(p, q, atol=1e-4, rtol=0)


def test_guide_formula_and_head_reductions(model):
    torch.manual_seed(1)
    c, i, u = torch.randn(3, 4, 5).unbind(0)
    torch.testing.assert_close(guide(torch.cat([c, u, i]), 4, 7.5, 1.5), u + 1.5 * (i - u) + 7.5 * (c - i))
    torch.testing.assert_close(guide(torch.cat([c, u]), 4, 3.0), u + 3.0 * (c - u))
    head = model.head
    cond, uncond, image = torch.randn(3, 2, model.backbone.config.hidden_size).unbind(0)

    def draw(*args, **kw):
        gens = [torch.Generator().manual_seed(k) for k in (0, 1)]
        return head.sample(*args, steps=4, sampler="stochastic", generator=gens, **kw)

    # s_img = s: plain CFG against u; s_img = 1: plain CFG against i (u drops out).
    torch.testing.assert_close(draw(cond, uncond, cfg_scale=4.0, image_cond=image, image_cfg_scale=4.0),
                               draw(cond, uncond, cfg_scale=4.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(draw(cond, uncond, cfg_scale=4.0, image_cond=image, image_cfg_scale=1.0),
                               draw(cond, image, cfg_scale=4.0), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="image-guided CFG needs"):
        draw(cond, None, cfg_scale=4.0, image_cond=image, image_cfg_scale=1.5)


def test_streams_are_the_loaders_dropped_edit_forms(model):
    """What the sampler's i and u streams see is exactly what training shows when it drops an edit
    document's instruction ("text") or instruction and picture ("both"): ids, positions, tokens."""
    from omni.data.loader import tokenize_document
    from omni.data.shapes import edit_documents
    from omni.inference.sampler import Sampler
    from omni.layout import doc_positions

    doc = next(edit_documents(1, rounds=1))
    sampler = Sampler(model, gcfg(image_cfg_scale=1.5), mode="image")
    row = sampler.add(doc.segments[:2])  # [source, instruction]: the edit's prompt
    sampler.step()  # prefill, <boi> forced, the image-only stream prefilled and <boi> fed to all three

    def visible(s):  # (ids, positions, image tokens) of the keys a new position of stream s sees
        keep = sorted({s.bos, *range(s.start, len(s.ids))})
        return [s.ids[j] for j in keep], [s.pos[j] for j in keep], [s.images[j] for j in keep if s.images[j] is not None]

    for stream, drop in [(row.image_only, "text"), (row.uncond, "both")]:
        ids, pos, tokens = visible(stream)
        want_ids, _, index, images = doc_positions(
            tokenize_document(doc, model.tokenizer, model.image_tokenizer, edit_drop=drop), model.special)
        flat = torch.cat(images)  # (n_img * N, d)
        assert ids == want_ids[:len(ids)] and ids[-1] == model.special.boi
        assert pos == list(range(len(ids)))  # a document's positions count from [bos] = 0, no gap
        want_tokens = [flat[i] for i in index[:len(ids)] if i >= 0]
        assert len(tokens) == len(want_tokens) == (model.image_tokenizer.num_tokens if drop == "text" else 0)
        for x, y in zip(tokens, want_tokens):
            torch.testing.assert_close(x, y)
