"""model.image_reference: each drawn image token is also conditioned on the token at its cell of
the previous picture of its document (an edit's source, a story's last frame). The layout's
reference indices, the training forward, and the cached sampler's conditioning vectors agree."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, generated_doc
from PIL import Image

from omni.config import ConfigError, GenerationConfig, load_config
from omni.inference.prompts import encode_prompts
from omni.inference.sampler import Sampler
from omni.layout import ImageSegment, SpecialIds, TextSegment, layout, reference_table
from omni.models.model import OmniModel

N = 16  # image tokens of the tiny preset
SOURCE = Image.new("RGB", (32, 32), (40, 80, 220))
SP = SpecialIds(bos=1, eos=2, pad=0, boi=3, eoi=4, img=5)


def make_model(tokenizer_dir, *extra: str) -> OmniModel:
    cfg = load_config("tiny", [f"model.tokenizer={tokenizer_dir}", *TINY, "model.image_pos_embed=true",
                               "model.image_reference=true", *extra])
    torch.manual_seed(0)
    model = OmniModel.from_config(cfg.model).eval()
    with torch.no_grad():  # wake the zero-initialised parts, so the condition and the reference matter
        for p in [*model.head.parameters(), model.image_ref.weight]:
            if not p.any():
                p.normal_(0.0, 0.05)
    return model


@pytest.fixture(scope="module")
def model(tokenizer_dir):
    return make_model(tokenizer_dir)


def img(n: int, value: float) -> torch.Tensor:
    """(n, 2) tokens: the picture's value, and the cell."""
    return torch.stack([torch.full((n,), value), torch.arange(n, dtype=torch.float32)], 1)


def test_reference_index_points_at_the_same_cell_of_the_previous_picture():
    a, b, c = img(4, 0.0), img(4, 100.0), img(4, 200.0)
    story = [TextSegment([7, 8]), ImageSegment(a), TextSegment([9]), ImageSegment(b), ImageSegment(c)]
    edit = [ImageSegment(a, loss=False), TextSegment([7], loss=False), ImageSegment(b)]
    other_size = [ImageSegment(img(9, 0.0), loss=False), ImageSegment(a)]
    batch = layout([[story, edit], [other_size]], SP)
    tokens = batch.image_tokens
    targets, refs = batch.image_target_index, batch.image_ref_index
    assert refs.shape == targets.shape
    # story (image tokens 0..11): a has no previous picture, b's cells point at a's, c's at b's
    # edit (12..19): the source is read, not drawn; the drawn picture's cells point at it
    # other size (20..32): a 9-token picture before a 4-token one: no cell-to-cell reference
    assert targets.tolist() == [*range(12), *range(16, 20), *range(29, 33)]
    assert refs.tolist() == [-1] * 4 + [0, 1, 2, 3] + [4, 5, 6, 7] + [12, 13, 14, 15] + [-1] * 4
    ok = refs >= 0
    drawn, seen = tokens[targets[ok]], tokens[refs[ok]]
    torch.testing.assert_close(drawn[:, 1], seen[:, 1])  # the same cell
    assert (drawn[:, 0] - seen[:, 0] == 100.0).all()  # of the picture before
    # the table itself: a first picture and one of another size refer to nothing; offsets shift
    assert reference_table([4, 4, 9, 9], 10) == [-1] * 4 + [*range(10, 14)] + [-1] * 9 + [*range(18, 27)]
    assert reference_table([]) == []


def test_parallel_decoding_is_refused(tokenizer_dir):
    with pytest.raises(ConfigError, match="image_reference"):
        load_config("tiny", [f"model.tokenizer={tokenizer_dir}", *TINY, "model.image_reference=true",
                             "model.parallel_image=4"])


def test_untrained_reference_changes_nothing_and_training_reaches_it(tokenizer_dir, model):
    d = model.image_tokenizer.token_dim
    torch.manual_seed(1)
    src, out = torch.randn(N, d), torch.randn(N, d)
    doc = [ImageSegment(src, loss=False), TextSegment(model.tokenizer.encode("make it blue"), loss=False),
           ImageSegment(out)]
    batch = layout([[doc]], model.special)
    fresh = make_model(tokenizer_dir)
    with torch.no_grad():
        fresh.image_ref.weight.zero_()  # as initialised
    fresh.train()
    torch.manual_seed(2)
    with_ref = fresh(batch)["loss"]
    fresh.image_ref = None
    torch.manual_seed(2)
    without = fresh(batch)["loss"]
    torch.testing.assert_close(with_ref, without)
    model.train()
    model.zero_grad()
    model(batch)["loss"].backward()
    model.eval()
    assert model.image_ref.weight.grad.abs().sum() > 0
    assert OmniModel.from_config(make_model(tokenizer_dir).cfg).image_ref.weight.abs().sum() == 0


def spy_head(model):
    """Record every head.sample call's (cond, uncond, image_cond, generators)."""
    calls, original = [], model.head.sample

    def sample(cond, uncond=None, **kw):
        image = kw.get("image_cond")
        calls.append((cond.clone(), None if uncond is None else uncond.clone(),
                      None if image is None else image.clone(), list(kw["generator"])))
        return original(cond, uncond, **kw)

    model.head.sample = sample
    return calls


def training_conditions(model, doc) -> torch.Tensor:
    """The head's conditioning vectors training computes for the drawn tokens of `doc` (K, D)."""
    b = layout([[doc]], model.special, add_eos=False)
    with torch.no_grad():
        cond = model.hidden_states(b).flatten(0, 1)[b.image_cond_index]
        refs = b.image_tokens[b.image_ref_index.clamp(min=0)] * (b.image_ref_index >= 0)[:, None]
        return model.reference(cond, refs)


def prompt_segments(model, prompt) -> list:
    """A prompt as training segments (read, not drawn), from the items the sampler encodes."""
    items = encode_prompts(model, [prompt])[0][1:]  # without [bos]: layout adds it
    segs, text, picture = [], [], []
    for t, x in items:
        if x is not None:
            picture.append(x)
        elif t == model.special.boi:
            if text:
                segs.append(TextSegment(text, loss=False))
            text = []
        elif t == model.special.eoi:
            segs.append(ImageSegment(torch.stack(picture), loss=False))
            picture = []
        else:
            text.append(t)
    return segs + ([TextSegment(text, loss=False)] if text else [])


def per_row(calls, gen, which: int) -> torch.Tensor:
    return torch.stack([c[which][i] for c in calls for i, g in enumerate(c[3]) if g is gen])


@pytest.mark.parametrize("image_cfg", [None, 1.5])
def test_cached_conditioning_equals_training(model, image_cfg):
    """An edit (a picture, then the instruction), a text prompt (no picture before its drawing) and
    a story of two drawn pictures (the second refers to the first), in one batch under CFG: the
    conditional, image-only and unconditional vectors the sampler hands the head equal training's."""
    edit, t2i = [SOURCE, "make the circle blue"], ["a red circle left of a blue square."]
    story = ["a story in two pictures. a red circle."]
    cfg = GenerationConfig(image_steps=2, cfg_scale=2.0, image_cfg_scale=image_cfg, max_new_tokens=4 * N,
                           max_images=2)
    calls = spy_head(model)
    boi = model.lm_head.weight[model.special.boi].clone()
    try:
        with torch.no_grad():  # the story row starts its pictures at once
            model.lm_head.weight[model.special.boi] += 5.0
        sampler = Sampler(model, cfg, seeds=[3, 4, 5])
        for prompt, seed, mode in [(edit, 3, "image"), (t2i, 4, "image"), (story, 5, "auto")]:
            sampler.add(prompt, mode=mode, seed=seed)
        rows = []
        while sampler.live or sampler.joining:
            rows += sampler.step()
    finally:
        del model.head.sample
        with torch.no_grad():
            model.lm_head.weight[model.special.boi] = boi
    rows.sort(key=lambda r: r.seed)
    edit_row, t2i_row, story_row = rows
    # the edit: its picture is the reference of every drawn cell
    src = prompt_segments(model, edit)
    want = training_conditions(model, [*src, ImageSegment(edit_row.image_tokens[0])])
    torch.testing.assert_close(per_row(calls, edit_row.gen, 0), want, atol=1e-4, rtol=1e-4)
    uncond = training_conditions(model, [ImageSegment(edit_row.image_tokens[0])])
    torch.testing.assert_close(per_row(calls, edit_row.gen, 1), uncond, atol=1e-4, rtol=1e-4)
    if image_cfg is not None:  # i: [bos] <boi> src <eoi> <boi> x ..., the source its reference too
        image_only = training_conditions(model, [src[0], ImageSegment(edit_row.image_tokens[0])])
        torch.testing.assert_close(per_row(calls, edit_row.gen, 2), image_only, atol=1e-4, rtol=1e-4)
    # the text prompt: nothing to refer to
    want = training_conditions(model, [*prompt_segments(model, t2i), ImageSegment(t2i_row.image_tokens[0])])
    torch.testing.assert_close(per_row(calls, t2i_row.gen, 0), want, atol=1e-4, rtol=1e-4)
    # the story, rebuilt from what it generated: the second picture refers to the first
    assert len(story_row.image_tokens) == 2, "the story row must draw two pictures (raise <boi>'s logit)"
    doc = generated_doc(story_row, prompt_segments(model, story), model.special.boi, N)
    want = training_conditions(model, doc)
    assert want.shape == (2 * N, model.backbone.config.hidden_size)
    torch.testing.assert_close(per_row(calls, story_row.gen, 0), want, atol=1e-4, rtol=1e-4)


def test_fused_image_step_equals_the_ordinary_path(model):
    """The fused image-token step (static cache + cuda_graphs; eager on the CPU) hands each row its
    reference too: the same tokens as the growing cache's ordinary path, for an edit beside a text
    prompt (a reference and none in one fused batch)."""
    prompts = [[SOURCE, "make the circle blue"], ["a red circle left of a blue square."]]
    base = {"image_steps": 2, "cfg_scale": 2.0, "max_new_tokens": 2 * N}
    plain = Sampler(model, GenerationConfig(**base), mode="image", seeds=[3, 4]).run(prompts)
    fused_sampler = Sampler(model, GenerationConfig(**base, static_cache=True, cuda_graphs=True), mode="image",
                            seeds=[3, 4])
    fused = fused_sampler.run(prompts)
    assert fused_sampler.image_step.calls >= N - 2  # every steady image step of the batch ran fused
    for a, b in zip(plain, fused):
        torch.testing.assert_close(a.image_tokens[0], b.image_tokens[0], atol=1e-4, rtol=0)
    with torch.no_grad():
        w = model.image_ref.weight.clone()
        model.image_ref.weight.zero_()
    try:  # and the reference did change the edit's picture
        without = Sampler(model, GenerationConfig(**base), mode="image", seeds=[3, 4]).run(prompts)
    finally:
        with torch.no_grad():
            model.image_ref.weight.copy_(w)
    assert not torch.allclose(without[0].image_tokens[0], plain[0].image_tokens[0], atol=1e-3)
    torch.testing.assert_close(without[1].image_tokens[0], plain[1].image_tokens[0], atol=1e-5, rtol=0)
