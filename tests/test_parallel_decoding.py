"""Parallel image decoding (model.parallel_image): position queries in the layout, the attention
rule that hides them, and a cached sampler that draws a group of image tokens per backbone pass
and conditions each token exactly as training does (docs/parallel.md)."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from conftest import TINY, decoder_rows, generated_doc
from test_generation import wake_head

from omni.config import (
    ConfigError,
    GenerationConfig,
    draw_order,
    group_sizes,
    load_config,
    parse_group_choices,
    parse_groups,
)
from omni.inference.generate import generate
from omni.inference.sampler import Sampler
from omni.layout import (
    IGNORE,
    ImageSegment,
    TextSegment,
    doc_length,
    doc_positions,
    group_index,
    layout,
    pick_schedule,
    with_queries,
)
from omni.models.model import OmniModel, image_cells, image_cells_from_positions

N = 16  # image tokens of the tiny preset (32 x 32 pixels, patches of 8)


def make_model(tokenizer_dir, groups: str = "4", *extra: str) -> OmniModel:
    if "+ga" in groups:  # group attention in the head (woken below, so it mixes); "+ga64": of width 64
        groups, _, dim = groups.partition("+ga")
        extra = ("model.head.group_attention=true", f"model.head.group_attention_dim={dim or 0}", *extra)
    if groups in ("strided", "blocks"):
        groups, extra = "4", (f"model.parallel_order={groups}", *extra)
    elif groups.startswith("blocks:"):  # alternatives in the blocks order, e.g. "blocks:4|1|16"
        groups, extra = groups.removeprefix("blocks:"), ("model.parallel_order=blocks", *extra)
    cfg = load_config("tiny", [f"model.tokenizer={tokenizer_dir}", *TINY, "model.image_pos_embed=true",
                               f"model.parallel_image={groups}", *extra])
    torch.manual_seed(0)
    return wake_head(OmniModel.from_config(cfg.model).eval())


@pytest.fixture(scope="module")
def model(tokenizer_dir):
    return make_model(tokenizer_dir)


def gcfg(**kw) -> GenerationConfig:
    base = {"mode": "image", "image_steps": 3, "cfg_scale": 2.0, "max_new_tokens": 48}
    return GenerationConfig(**{**base, **kw})


# -- schedules and layout -------------------------------------------------------------------------
def test_group_schedules():
    assert parse_groups("off") is None
    assert parse_groups("4") == [4]
    assert group_sizes([4], 16) == [4, 4, 4, 4]
    assert group_sizes([1, 2, 4, 8], 16) == [1, 2, 4, 8, 1]
    assert group_sizes([1, 2, 4], 16) == [1, 2, 4, 4, 4, 1]
    assert group_sizes([5], 16) == [5, 5, 5, 1]
    for bad in ("0", "two", "4,", "-1", ""):
        with pytest.raises(ConfigError, match="parallel_image"):
            parse_groups(bad)


def test_alternative_schedules_parse(tokenizer_dir):
    assert parse_group_choices("off") is None
    assert parse_group_choices("4") == [[4]]
    assert parse_group_choices("4|1|1,2,4,8") == [[4], [1], [1, 2, 4, 8]]
    for bad in ("4|", "4|off", "|4", "4||2"):
        with pytest.raises(ConfigError, match="parallel_image"):
            parse_group_choices(bad)
    with pytest.raises(ConfigError, match="generation.parallel_image"):  # a generation draws with one
        GenerationConfig(parallel_image="4|2")
    with pytest.raises(ConfigError, match="strided needs .* alternatives of such sizes"):
        load_config("tiny", [f"model.tokenizer={tokenizer_dir}", "model.parallel_image=4|2",
                             "model.parallel_order=strided"])
    m = make_model(tokenizer_dir, "blocks:4|1|16")  # square alternatives in the blocks order
    assert m.group_choices == [[4], [1], [16]] and m.order == "blocks"
    m = make_model(tokenizer_dir, "4|1|8")
    assert m.groups == [4] and m.group_choices == [[4], [1], [8]]  # draws with the first by default


def test_alternatives_spread_over_images_and_match_each_alone(model):
    """With alternatives, each drawn image's queries follow the schedule `pick_schedule` gives it
    (the same image always the same one), every alternative occurs, and a document lays out
    exactly as it would under that one schedule; prompt images and text are untouched."""
    sp = model.special
    choices = [[1], [2], [4], [8]]
    gen = torch.Generator().manual_seed(0)
    picked = []
    for i in range(24):
        prompt_img, drawn = torch.randn(N, 192, generator=gen), torch.randn(N, 192, generator=gen)
        doc = [ImageSegment(prompt_img, loss=False), TextSegment([10 + i % 5, 11]), ImageSegment(drawn)]
        k = pick_schedule(drawn, choices)
        assert k == pick_schedule(drawn.clone(), choices)
        picked.append(k[0])
        mixed, alone = layout([[doc]], sp, groups=[4], choices=choices), layout([[doc]], sp, groups=k)
        for f in dataclasses.fields(mixed):
            torch.testing.assert_close(getattr(mixed, f.name), getattr(alone, f.name), msg=f.name)
        # the drawn image's queries come in runs of k before their tokens
        q = mixed.query_cells[0].tolist()
        runs = [len(list(g)) for is_q, g in itertools.groupby(q, key=lambda c: c >= 0) if is_q]
        assert runs == group_sizes(k, N)
    assert set(picked) == {1, 2, 4, 8}
    assert max(picked.count(k) for k in (1, 2, 4, 8)) <= 12  # spread, not one favourite


def test_blocks_alternatives_lay_out_each_image_as_its_own_schedule_alone(model):
    """In the blocks order with alternatives ("4|1|16"), each drawn image is laid out (queries,
    targets in drawing order, groups) exactly as under its picked schedule alone."""
    sp, choices = model.special, [[4], [1], [16]]
    gen = torch.Generator().manual_seed(1)
    picked, compared = set(), 0
    for i in range(12):
        drawn = [torch.randn(N, 192, generator=gen) for _ in range(2)]
        doc = [TextSegment([10 + i % 5, 11]), ImageSegment(drawn[0]), TextSegment([12]), ImageSegment(drawn[1])]
        mixed = layout([[doc]], sp, groups=[4], choices=choices, order="blocks")
        ks = [pick_schedule(x, choices) for x in drawn]
        picked.update(k[0] for k in ks)
        if ks[0] == ks[1]:
            compared += 1
            alone = layout([[doc]], sp, groups=ks[0], order="blocks")
            for f in dataclasses.fields(mixed):
                torch.testing.assert_close(getattr(mixed, f.name), getattr(alone, f.name), msg=f.name)
        sizes = [s for k in ks for s in group_sizes(k, N)]
        assert (mixed.image_group_index >= 0).sum(1).tolist() == sizes
    assert picked == {1, 4, 16} and compared >= 2


def test_layout_records_the_groups_drawn_together(model):
    sp = model.special
    x, src = torch.randn(N, 192), torch.randn(N, 192)
    doc = [ImageSegment(src, loss=False), TextSegment([10, 11]), ImageSegment(x), TextSegment([12]), ImageSegment(x)]
    for groups, sizes in (([4], [4] * 8), ([1, 2, 4, 8], [1, 2, 4, 8, 1] * 2), ([16], [16, 16])):
        b = layout([[doc], [[TextSegment([9])]]], sp, groups=groups)
        index, pos = b.image_group_index, b.image_group_pos
        assert (index >= 0).sum(1).tolist() == sizes
        assert index[index >= 0].tolist() == list(range(2 * N))  # consecutive runs of the targets, in order
        assert index.flatten()[pos].tolist() == list(range(2 * N))  # pos finds each target's slot
    plain = layout([[doc]], sp)  # one token a pass: every target its own group
    assert plain.image_group_index.tolist() == [[i] for i in range(2 * N)]
    i, p = group_index([2, 1, 3])
    assert i.tolist() == [[0, 1, -1], [2, -1, -1], [3, 4, 5]] and p.tolist() == [0, 1, 3, 6, 7, 8]


def test_group_attention_mixes_only_within_a_group(tokenizer_dir):
    """The head's group attention: zero-initialised it changes nothing; woken, a token's
    prediction depends on its group-mates' inputs and on no other group's; the sampling path
    (precomputed modulations, pre-transposed weights) equals the training path; CFG's stacked
    streams keep their groups."""
    from omni.heads.diffusion import repeat_groups

    joint = "model.head.time_width=0"  # `Denoiser.body` takes MAR's joint condition (time + hidden state)
    fresh = OmniModel.from_config(load_config("tiny", [f"model.tokenizer={tokenizer_dir}", *TINY, joint,
                                                        "model.parallel_image=4", "model.head.group_attention=true"]).model)
    plain_cfg = load_config("tiny", [f"model.tokenizer={tokenizer_dir}", *TINY, joint, "model.parallel_image=4"]).model
    plain = OmniModel.from_config(plain_cfg)
    plain.head.load_state_dict(fresh.head.state_dict(), strict=False)
    net, W = fresh.head.net, fresh.head.cfg.width
    torch.manual_seed(0)
    x, c = torch.randn(6, 192), torch.randn(6, W)
    groups = group_index([4, 2])
    torch.testing.assert_close(net.body(x, c, groups), plain.head.net.body(x, c))
    net = make_model(tokenizer_dir, "4+ga", joint).head.net  # woken
    with torch.no_grad():
        base = net.body(x, c, groups)
        y = x.clone()
        y[1] += 1.0  # a token of the first group
        moved = (net.body(y, c, groups) - base).abs().amax(1)
        assert moved[[0, 2, 3]].min() > 1e-4 and moved[4:].max() == 0  # its mates move, the other group not
        alone = net.body(x, c, group_index([1] * 6))
        assert (alone - base).abs().max() > 1e-4  # grouping matters
        pairs = net.body(x, c, group_index([2, 2, 2]))  # no padding: the groups are a view of the rows
        padded = (torch.tensor([[0, 1, -1], [2, 3, -1], [4, 5, -1]]), torch.tensor([0, 1, 3, 4, 6, 7]))
        torch.testing.assert_close(pairs, net.body(x, c, padded))  # the same groups, gathered and masked
        mods = net.modulations(c)
        fast = net.fast_modulated(net.in_proj(x), net.sampling_weights(), mods, groups)
        torch.testing.assert_close(fast, base)
        two = repeat_groups(groups, 6, 2)  # [cond; uncond] streams: the same groups, shifted
        assert two[0].tolist() == [[0, 1, 2, 3], [4, 5, -1, -1], [6, 7, 8, 9], [10, 11, -1, -1]]
        stacked = net.body(torch.cat([x, x]), torch.cat([c, c]), two)
        torch.testing.assert_close(stacked, torch.cat([base, base]))
    narrow = make_model(tokenizer_dir, "4+ga64").head.net.blocks[0].mix
    assert narrow.qkv.weight.shape == (3 * 64, W) and narrow.proj.weight.shape == (W, 64) and narrow.heads == 1
    with torch.no_grad():
        h = torch.randn(6, W)
        h2 = h.clone()
        h2[1] += torch.randn(W)  # (a constant shift would vanish in the LayerNorm)
        moved = (narrow(h2, groups) - narrow(h, groups)).abs().amax(1)
    assert moved[0] > 1e-4 and moved[4:].max() == 0  # mixes within the group only
    with pytest.raises(ValueError, match="group_attention_dim"):
        make_model(tokenizer_dir, "4+ga100")
    with pytest.raises(ValueError, match="group_attention"):
        fresh.head.sample(torch.randn(2, fresh.head.net.cond_embed.in_features), steps=2)
    with pytest.raises(ConfigError, match="group_attention"):
        load_config("tiny", [f"model.tokenizer={tokenizer_dir}", "model.head.group_attention=true"])


def test_config_reads_a_number_as_a_schedule(tokenizer_dir):
    cfg = load_config("tiny", [f"model.tokenizer={tokenizer_dir}", "model.parallel_image=4",
                               "generation.parallel_image=1,2,4"])
    assert cfg.model.parallel_image == "4" and cfg.generation.parallel_image == "1,2,4"
    with pytest.raises(ConfigError, match="model.parallel_image='x'"):
        load_config("tiny", [f"model.tokenizer={tokenizer_dir}", "model.parallel_image=x"])


def test_with_queries_places_a_query_per_token_before_its_group():
    # [bos] t t <boi> x0..x4 <eoi> [eos], the image drawn, groups of 2: 3 groups (2, 2, 1)
    tok = [1, 7, 8, 3] + [5] * 5 + [4, 2]
    pred = [False, True, True, True] + [True] * 5 + [False, True]
    img = [-1, -1, -1, -1, 0, 1, 2, 3, 4, -1, -1]
    t, p, i, pos, q, orders = with_queries(tok, pred, img, [2], pad=0)
    assert orders == {}  # raster: images stay in raster order
    assert q == [-1, -1, -1, -1, 0, 1, -1, -1, 2, 3, -1, -1, 4, -1, -1, -1]
    assert i == [-1, -1, -1, -1, -1, -1, 0, 1, -1, -1, 2, 3, -1, 4, -1, -1]
    # a query has its target's position id; committed positions keep theirs
    assert pos == [0, 1, 2, 3, 4, 5, 4, 5, 6, 7, 6, 7, 8, 8, 9, 10]
    assert [t[j] for j in range(len(t)) if q[j] >= 0] == [0] * 5 and not any(p[j] for j in range(len(p)) if q[j] >= 0)
    # a prompt image (not drawn) gets no queries
    assert with_queries(tok, [False] * 11, img, [2], pad=0)[4] == [-1] * 11


def test_layout_conditions_each_drawn_token_on_its_query(model):
    sp = model.special
    x = torch.randn(N, 192)
    src = torch.randn(N, 192)
    doc = [ImageSegment(src, loss=False), TextSegment([10, 11]), ImageSegment(x), TextSegment([12])]
    plain = layout([[doc]], sp)
    b = layout([[doc]], sp, groups=[4])
    assert b.input_ids.shape[1] == plain.input_ids.shape[1] + N == doc_length(doc, queries=True)
    qpos = (b.query_cells[0] >= 0).nonzero().flatten()
    assert b.query_cells[0, qpos].tolist() == list(range(N))
    assert b.image_cond_index.tolist() == qpos.tolist()  # token j of the drawn image <- query j
    assert b.image_target_index.tolist() == list(range(N, 2 * N))  # the drawn image's tokens, in order
    # text labels are unchanged: the same ids are predicted, queries predict nothing
    assert sorted(b.labels[b.labels != IGNORE].tolist()) == sorted(plain.labels[plain.labels != IGNORE].tolist())
    assert (b.labels[0, qpos] == IGNORE).all()
    # cells count through the queries: every image's tokens are 0..N-1
    cells = image_cells_from_positions(b.input_ids, b.position_ids, sp.boi, sp.img)[b.image_mask]
    assert cells.tolist() == list(range(N)) * 2


def test_queries_are_hidden_from_committed_positions(model):
    """Committed positions compute exactly what they compute without queries (so one KV cache
    serves both), and a query sees nothing of its own group."""
    sp = model.special
    torch.manual_seed(1)
    doc = [TextSegment([10, 11, 12]), ImageSegment(torch.randn(N, 192)), TextSegment([13, 14])]
    with torch.no_grad():
        h_plain = model.hidden_states(layout([[doc]], sp))
        b = layout([[doc]], sp, groups=[4])
        h = model.hidden_states(b)
        committed = b.query_cells[0] < 0
        torch.testing.assert_close(h[0, committed], h_plain[0], atol=1e-5, rtol=1e-5)
        # changing a token of group 2 moves neither group 2's queries nor anything before it
        doc2 = [TextSegment([10, 11, 12]), ImageSegment(torch.cat([doc[1].tokens[:5], torch.randn(1, 192),
                                                                     doc[1].tokens[6:]])), TextSegment([13, 14])]
        h2 = model.hidden_states(layout([[doc2]], sp, groups=[4]))
    q = (b.query_cells[0] >= 0).nonzero().flatten()
    same = q[:8]  # queries of groups 1 and 2 (cells 0..7): cell 5 is in group 2
    torch.testing.assert_close(h2[0, same], h[0, same], atol=1e-6, rtol=1e-6)
    assert (h2[0, q[8:]] - h[0, q[8:]]).abs().max() > 1e-4  # later groups see it


def test_packed_rows_with_queries_mask_documents(model):
    """Two documents packed in one row compute what each computes alone."""
    sp = model.special
    torch.manual_seed(2)
    d1 = [TextSegment([10, 11]), ImageSegment(torch.randn(N, 192))]
    d2 = [TextSegment([12]), ImageSegment(torch.randn(N, 192)), TextSegment([13])]
    with torch.no_grad():
        packed = layout([[d1, d2]], sp, groups=[4])
        h = model.hidden_states(packed)
        n1 = doc_length(d1, queries=True)
        a1 = model.hidden_states(layout([[d1]], sp, groups=[4]))
        a2 = model.hidden_states(layout([[d2]], sp, groups=[4]))
    torch.testing.assert_close(h[0, :n1], a1[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h[0, n1:n1 + a2.shape[1]], a2[0], atol=1e-5, rtol=1e-5)


# -- the sampler -------------------------------------------------------------------------------------
def spy_head(model):
    """Record every head.sample call's (cond, uncond, generators, groups)."""
    calls = []
    original = model.head.sample

    def sample(cond, uncond=None, **kw):
        calls.append((cond.clone(), None if uncond is None else uncond.clone(), list(kw["generator"]), kw.get("groups")))
        return original(cond, uncond, **kw)

    model.head.sample = sample
    return calls


def per_row(calls, gen, which: int) -> torch.Tensor:
    return torch.stack([c[which][i] for c in calls for i, g in enumerate(c[2]) if g is gen])


@pytest.mark.parametrize("groups", ["4", "1,2,4,8", "strided", "1,2,4,8+ga", "blocks+ga", "blocks+ga64",
                                    "blocks:4|1|16+ga@16", "blocks:4|1|16+ga@1"])
def test_cached_conditioning_equals_training_layout(tokenizer_dir, groups):
    """The vectors the cached sampler hands the head, for the conditional and the unconditional
    streams, equal what training computes over the same committed tokens (the layout's queries),
    for rows of different lengths that start and finish images at different steps. "@k": a model
    trained on alternatives drawn with another of them (generation.parallel_image)."""
    groups, _, draw = groups.partition("@")
    model = make_model(tokenizer_dir, groups)
    schedule = parse_groups(draw) if draw else model.groups
    with torch.no_grad():  # favour <boi> so interleaved rows draw mid-answer
        model.lm_head.weight[model.special.boi] += 0.5
    sp = model.special
    prompts = [["a red circle left of a blue square."], ["two"], ["draw three small green triangles please"]]
    calls = spy_head(model)
    sampler = Sampler(model, gcfg(mode="auto", max_new_tokens=40, temperature=1.0, parallel_image=draw or None),
                      seeds=[3, 4, 5])
    rows = sampler.run(prompts)
    del model.head.sample
    drew = 0
    for r, prompt in zip(rows, prompts):
        if not r.image_tokens:
            continue
        drew += 1
        # the row's document: its prompt, then what it generated (text runs and images, in order)
        doc = generated_doc(r, [TextSegment(model.tokenizer.encode(prompt[0]))], sp.boi, N)
        b = layout([[doc]], sp, add_eos=False, groups=schedule, order=model.order)
        with torch.no_grad():
            ref = model.hidden_states(b).flatten(0, 1)[b.image_cond_index]  # (n_images * N, D)
        got = per_row(calls, r.gen, 0)
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
        # the unconditional stream of each image: [bos] <boi> queries/tokens, nothing of the prompt
        unc = torch.cat([model.hidden_states(u).flatten(0, 1)[u.image_cond_index] for u in
                         [layout([[[ImageSegment(x)]]], sp, add_eos=False, groups=schedule, order=model.order)
                          for x in r.image_tokens]])
        torch.testing.assert_close(per_row(calls, r.gen, 1), unc.detach(), atol=1e-4, rtol=1e-4)
        if model.head.cfg.group_attention:  # the head drew the row's tokens in the groups training used
            drawn = [int((ix >= 0).sum()) for c in calls for ix in c[3][0] if c[2][int(ix[0])] is r.gen]
            assert drawn == (b.image_group_index >= 0).sum(1).tolist()
            sizes = group_sizes(schedule, N)
            assert drawn[:len(sizes)] == sizes  # the schedule, over the row's first image
    assert drew >= 2


def test_group_of_tokens_per_pass_counted(tokenizer_dir, model):
    """16-token images: groups of 4 -> 4 backbone passes per image (after the prompt's), vs 16."""
    with decoder_rows(model) as rows:
        out = generate(model, [["a red circle"], ["two blue squares"]], gcfg())
    assert rows == [2] + [4] * 4  # prefill of both rows, then 4 passes of 2 rows x (cond, uncond)
    assert all(r.image_tokens[0].shape == (N, 192) for r in out) and all(len(r.images) == 1 for r in out)
    with decoder_rows(model) as rows:
        generate(model, [["a red circle"]], gcfg(parallel_image="1,2,4,8"))
    assert len(rows) == 1 + len(group_sizes([1, 2, 4, 8], N)) == 6
    one = make_model(tokenizer_dir, "off")
    with decoder_rows(one) as rows:
        generate(one, [["a red circle"]], gcfg())
    assert len(rows) == 1 + N  # one token per pass, the baseline


def test_cache_recompute_and_batch_agree(model):
    prompts = [["a red circle"], ["two blue squares left of a green triangle"], ["hi"]]
    cfg = gcfg(mode="auto", max_new_tokens=44, temperature=1.0)
    with torch.no_grad():
        model.lm_head.weight[model.special.boi] += 0.5
    try:
        cached = generate(model, prompts, cfg, seeds=[1, 2, 3])
        recomputed = generate(model, prompts, dataclasses.replace(cfg, use_cache=False), seeds=[1, 2, 3])
        alone = [generate(model, [p], cfg, seeds=[s])[0] for p, s in zip(prompts, [1, 2, 3])]
    finally:
        with torch.no_grad():
            model.lm_head.weight[model.special.boi] -= 0.5
    assert sum(len(r.image_tokens) for r in cached) >= 2
    for a, b, c in zip(cached, recomputed, alone):
        assert a.ids == b.ids == c.ids
        for x, y, z in zip(a.image_tokens, b.image_tokens, c.image_tokens):
            torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(x, z, atol=1e-4, rtol=1e-4)


def test_image_guided_cfg_and_second_group_schedule(model):
    """Edits (a third, image-only stream) and another schedule at generation time still run."""
    from PIL import Image

    pic = Image.new("RGB", (32, 32), (200, 30, 30))
    out = generate(model, [[pic, "make it blue"]], gcfg(image_cfg_scale=1.5, parallel_image="2"))
    assert out[0].image_tokens[0].shape == (N, 192)
    assert out[0].settings["parallel_image"] == "2"


def test_wrong_settings_are_refused(tokenizer_dir, model):
    with pytest.raises(ValueError, match="static_cache"):
        generate(model, [["x"]], gcfg(static_cache=True))
    one = make_model(tokenizer_dir, "off")
    with pytest.raises(ValueError, match="trained with model.parallel_image='off'"):
        generate(one, [["x"]], gcfg(parallel_image="4"))
    with pytest.raises(ValueError, match="flash_attention_2"):
        make_model(tokenizer_dir, "4", "model.backbone.attn_implementation=flash_attention_2")


def test_checkpoint_round_trip(tmp_path, model):
    model.save_pretrained(tmp_path / "ckpt")
    loaded = OmniModel.from_pretrained(tmp_path / "ckpt")
    assert loaded.groups == [4]
    torch.testing.assert_close(loaded.query_embed.weight, model.query_embed.weight)
    a = generate(model, [["a red circle"]], gcfg())[0]
    b = generate(loaded, [["a red circle"]], gcfg())[0]
    torch.testing.assert_close(a.image_tokens[0], b.image_tokens[0])


@pytest.mark.parametrize("groups", ["4", "4+ga"])
def test_training_learns_with_queries(tokenizer_dir, groups):
    """A few optimizer steps on a fixed batch of drawn images lower the loss of the queries' tokens
    (with group attention, its weights learn too)."""
    model = make_model(tokenizer_dir, groups).train()
    sp = model.special
    torch.manual_seed(3)
    base = torch.randn(4, 1, 192).expand(4, N, 192) + 0.1 * torch.randn(4, N, 192)
    docs = [[[TextSegment([10 + i]), ImageSegment(base[i].clone())]] for i in range(4)]
    batch = layout(docs, sp, groups=[4])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(40):
        torch.manual_seed(step)
        out = model(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss_image"]))
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    assert model.query_embed.weight.grad is not None and model.query_embed.weight.grad.abs().sum() > 0
    if model.head.cfg.group_attention:
        assert all(b.mix.qkv.weight.grad.abs().sum() > 0 for b in model.head.net.blocks)


def test_doc_length_matches_layout():
    sp_doc = [TextSegment([5, 6]), ImageSegment(torch.zeros(N, 3)), ImageSegment(torch.zeros(N, 3), loss=False)]
    tok, pred, img, _ = doc_positions(sp_doc, _ids())
    assert doc_length(sp_doc, queries=True) == len(with_queries(tok, pred, img, [4], 0)[0]) == len(tok) + N


def _ids():
    from omni.layout import SpecialIds

    return SpecialIds(bos=1, eos=2, pad=0, boi=3, eoi=4, img=5)


def test_rows_joining_a_running_batch_equal_each_alone(tokenizer_dir):
    """Continuous batching (omni serve) with a parallel model: rows with different modes, settings
    and schedules join between steps, so streams feed different numbers of positions in one step
    (hidden padding) and joiners get left padding; each row's answer equals the row alone."""
    from test_continuous_batching import REQUESTS, alone, drive
    from test_generation import assert_same, with_bias
    from test_generation import gcfg as base_cfg

    model = with_bias(make_model(tokenizer_dir, "4"))
    requests = [*REQUESTS, (["two blue squares"], base_cfg(parallel_image="1,2,4"), "image", 10)]
    schedule = {0: [0, 1], 2: [2], 3: [3, 4], 9: [5, 9], 15: [6, 7], 30: [8]}
    got = drive(Sampler(model, base_cfg()), schedule, requests)
    for i, request in enumerate(requests):
        assert_same([got[i]], [alone(model, request)])
    assert sum(len(r.image_tokens) for r in got.values()) >= 4


# -- the strided order -------------------------------------------------------------------------------
def test_strided_order_groups_cells_that_do_not_touch():
    order = draw_order(16, [4], "strided")
    assert order == [0, 2, 8, 10, 1, 3, 9, 11, 4, 6, 12, 14, 5, 7, 13, 15]
    for g in range(4):  # no two cells of a group are neighbours (rows and columns 2 apart)
        cells = order[4 * g:4 * g + 4]
        assert all(abs(a // 4 - b // 4) + abs(a % 4 - b % 4) >= 2 for a in cells for b in cells if a != b)
    assert sorted(draw_order(256, [16], "strided")) == list(range(256))
    with pytest.raises(ValueError, match="strided"):
        draw_order(16, [2], "strided")
    with pytest.raises(ConfigError, match="parallel_order=strided"):
        load_config("tiny", ["model.parallel_image=1,2,4", "model.parallel_order=strided"])


def test_strided_layout_commits_in_drawing_order_at_raster_positions(tokenizer_dir):
    model = make_model(tokenizer_dir, "strided")
    sp = model.special
    x = torch.randn(N, 192)
    b = layout([[[TextSegment([10]), ImageSegment(x)]]], sp, groups=model.groups, order=model.order)
    order = draw_order(N, [4], "strided")
    committed = b.image_mask[0].nonzero().flatten()
    start = int(b.position_ids[0, committed].min())
    assert (b.position_ids[0, committed] - start).tolist() == order  # raster position ids, drawing order
    torch.testing.assert_close(b.image_tokens, x[order])  # each position carries its own cell's token
    assert b.query_cells[0][b.query_cells[0] >= 0].tolist() == order
    torch.testing.assert_close(b.image_tokens[b.image_target_index], x[order])
    cells = image_cells_from_positions(b.input_ids, b.position_ids, sp.boi, sp.img)[b.image_mask]
    assert cells.tolist() == order
    # with raster queries, cells by position equal the run-counted cells of the layout without queries
    doc = [[[TextSegment([10]), ImageSegment(x), TextSegment([11]), ImageSegment(x, loss=False)]]]
    r, plain = layout(doc, sp, groups=[4]), layout(doc, sp)
    assert (image_cells_from_positions(r.input_ids, r.position_ids, sp.boi, sp.img)[r.image_mask]
            == image_cells(plain.input_ids, sp.img)[plain.image_mask]).all()


def test_blocks_order_groups_neighbouring_cells():
    assert draw_order(16, [4], "blocks") == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]  # the quadrants
    order = draw_order(256, [16], "blocks")
    assert sorted(order) == list(range(256)) and order[:16] == [r * 16 + c for r in range(4) for c in range(4)]
    with pytest.raises(ValueError, match="blocks"):
        draw_order(16, [2], "blocks")
    with pytest.raises(ConfigError, match="parallel_order=blocks"):
        load_config("tiny", ["model.parallel_image=1,2,4", "model.parallel_order=blocks"])


@pytest.mark.parametrize("order", ["strided", "blocks+ga"])
def test_strided_sampling_counts_passes_and_returns_raster_images(tokenizer_dir, order):
    model = make_model(tokenizer_dir, order)
    with decoder_rows(model) as rows:
        out = generate(model, [["a red circle"], ["two blue squares"]], gcfg())
    assert rows == [2] + [4] * 4
    # the picture holds the drawn tokens back in raster order: token j of the head's draws is cell order[j]
    draws, original = [], model.head.sample

    def sample(*a, **k):
        draws.append(original(*a, **k))
        return draws[-1]

    model.head.sample = sample
    try:
        (row,) = generate(model, [["a red circle"]], gcfg(cfg_scale=1.0))
    finally:
        del model.head.sample
    cells = draw_order(N, [4], order.removesuffix("+ga"))
    torch.testing.assert_close(row.image_tokens[0][cells], torch.cat(draws))
    assert len(out[0].images) == 1 and out[0].image_tokens[0].shape == (N, 192)
