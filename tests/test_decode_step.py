"""The sampler's decode step: no host traffic per image token, the same outputs as before the
device-side state, and a static KV cache that gives the dynamic cache's tokens and latents.

Host traffic is counted with test_decode_head's TorchDispatchMode: `aten._local_scalar_dense` (a
device scalar read by the host, a blocking sync on a GPU), tensors made from Python data
(`torch.tensor(list)` reaches the dispatcher as `aten.lift_fresh`: a host-to-device copy on a
GPU) and copies between devices. The counts are taken between consecutive `image_token` events
of image-mode generation, i.e. per image token in the steady state. What is allowed at a row's
start and end (prefill, <boi>, the first token, when the unconditional stream is gathered,
decoding the finished image) is counted too, and stated in `test_host_traffic_per_image_token`.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from decode_reference import PROMPTS, REFERENCE, SEEDS, build_model, reference_outputs
from test_continuous_batching import REQUESTS, drive
from test_continuous_batching import model as small_model  # noqa: F401  (a fixture)
from test_decode_head import HostTraffic
from test_generation import assert_same, gcfg

from omni.inference.generate import generate
from omni.inference.rows import GenerationEvents
from omni.inference.sampler import Sampler
from omni.models.kv_cache import CAPACITY_STEP, SLACK, GrowingKV, KVOps, StaticKV


@pytest.fixture(scope="module")
def model(tokenizer_dir):
    return build_model(tokenizer_dir)


def check_reference(got: dict, want: dict, atol: float = 1e-4) -> None:
    assert got["prompt_ids"] == want["prompt_ids"], "the test tokenizer changed: rewrite the reference"
    for name in want:
        if name == "prompt_ids":
            continue
        assert got[name]["ids"] == want[name]["ids"], name
        assert got[name]["finish"] == want[name]["finish"], name
        for a, b in zip(got[name]["image_tokens"], want[name]["image_tokens"], strict=True):
            assert len(a) == len(b), name
            for x, y in zip(a, b):
                torch.testing.assert_close(x, y, atol=atol, rtol=0, msg=name)


@pytest.mark.parametrize("static", [False, True])
def test_outputs_unchanged_for_fixed_seeds(model, static):
    # The reference was written by the sampler before the device-side step state (9064caf):
    # text ids exactly, image tokens to 1e-4 (a row's in_proj now runs in a batch of S rows).
    want = torch.load(REFERENCE, weights_only=True)
    got = reference_outputs(model, static_cache=static)
    check_reference(got, want)
    assert sum(len(t) for r in want.values() if isinstance(r, dict) for t in r["image_tokens"]) >= 10


class PerToken(GenerationEvents):
    """Snapshots the traffic counters at every image token of every row."""

    def __init__(self, traffic: HostTraffic):
        self.traffic, self.marks = traffic, []

    def image_token(self, row: int, done: int, total: int) -> None:
        self.marks.append((row, done, dict(self.traffic.counts)))


@pytest.mark.parametrize("path", ["dynamic", "static", "fused"])
@pytest.mark.parametrize("scale", [3.0, 1.0])
def test_host_traffic_per_image_token(model, path, scale):
    cfg = gcfg(cfg_scale=scale, static_cache=path != "dynamic", cuda_graphs=path == "fused", max_new_tokens=40)
    n = model.image_tokenizer.num_tokens
    assert n >= 4
    generate(model, PROMPTS, cfg, seeds=SEEDS, mode="image")  # warm: lazy inits, plan caches
    traffic = HostTraffic()
    events = PerToken(traffic)
    with traffic:
        rows = generate(model, PROMPTS, cfg, seeds=SEEDS, mode="image", events=events)
    assert all(len(r.image_tokens) == 1 for r in rows)
    # The three rows draw in lockstep: marks come in groups of 3 (rows 0, 1, 2) per token step.
    steps = [events.marks[i:i + 3] for i in range(0, len(events.marks), 3)]
    assert len(steps) == n and all([m[1] for m in s] == [k + 1] * 3 for k, s in enumerate(steps))
    between = [{k: s[2][k] - p[2][k] for k in s[2]} for p, s in zip([t[-1] for t in steps], [t[-1] for t in steps][1:])]
    # Token 1 -> 2: the first one-position step after the prefill rebuilds the device state once
    # (a handful of tensors from the streams' lists: ids, positions, masks, cells). Every step
    # after that, to the last token, makes none and reads nothing back.
    assert between[0]["from_python"] > 0
    assert all(sum(d.values()) == 0 for d in between[1:]), between
    # The whole call's traffic is the row start/end work, independent of the image's length.
    assert traffic.counts["scalar_reads"] <= 2 * len(PROMPTS), traffic.counts


def test_text_mode_reads_once_per_step_not_per_row(model):
    cfg = gcfg(max_new_tokens=12, repetition_stop=0)
    traffic = HostTraffic()
    with traffic:
        rows = generate(model, PROMPTS, cfg, seeds=SEEDS, mode="text")
    steps = max(len(r.ids) for r in rows)
    assert steps >= 6 and len(rows) == 3
    # one read of the sampled ids per step for the whole batch (top-p sampling reads nothing else)
    assert traffic.counts["scalar_reads"] <= steps + 1, (traffic.counts, steps)


# --------------------------------------------------------------------------------------------
# Static KV cache == dynamic cache
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["auto", "image"])
@pytest.mark.parametrize("cfg_batching", [True, False])
def test_static_cache_equals_dynamic(model, mode, cfg_batching):
    static = generate(model, PROMPTS, gcfg(static_cache=True), seeds=SEEDS, mode=mode, cfg_batching=cfg_batching)
    dynamic = generate(model, PROMPTS, gcfg(static_cache=False), seeds=SEEDS, mode=mode, cfg_batching=cfg_batching)
    assert_same(static, dynamic)
    assert sum(len(r.image_tokens) for r in static) >= 3


def test_static_cache_rows_joining_and_leaving(small_model):  # noqa: F811
    # Rows join mid-batch (both sides get left padding), CFG streams join at <boi> and leave at the
    # image's end, rows finish and leave; shared padding is trimmed: all on the static cache.
    schedule = {0: [0, 1], 2: [2], 3: [3, 4], 9: [5], 15: [6, 7], 30: [8]}
    sampler = Sampler(small_model, gcfg(static_cache=True))
    assert sampler.static
    got = drive(sampler, schedule)
    dynamic = drive(Sampler(small_model, gcfg()), schedule)
    for i in range(len(REQUESTS)):
        assert_same([got[i]], [dynamic[i]])  # (dynamic == each row alone: test_continuous_batching)
    assert not sampler.live and not sampler.joining
    assert sum(len(r.image_tokens) for r in got.values()) >= 4


def test_static_cache_is_written_in_place(model):
    # Within an image the static cache keeps its tensors (a captured graph reads them by address)
    # and its capacity covers the rows' whole budget.
    seen = []

    class Watch(GenerationEvents):
        def image_token(self, row, done, total):
            cache = sampler.groups[0].cache
            seen.append((cache.layers[0].keys.data_ptr(), cache.capacity, len(sampler.live[0].cond.ids)))

    sampler = Sampler(model, gcfg(static_cache=True), mode="image", seeds=[1], events=Watch())
    sampler.run([PROMPTS[0]])
    assert isinstance(sampler.groups[0].cache, StaticKV) or not sampler.live
    ptrs = {p for p, _, _ in seen[1:]}  # token 0 is drawn before the unconditional stream is gathered
    assert len(ptrs) == 1, "the static cache was reallocated inside an image"
    assert all(cap % CAPACITY_STEP == 0 and cap >= T for _, cap, T in seen)


def test_growing_cache_moves_match_plain_tensor_ops(model):
    # The default cache against what transformers' DynamicCache does with plain tensors: append by
    # concatenation, gather rows, stack two caches' rows, pad the front with zeros, drop the front.
    # It writes into spare room in place and drops the front without a copy.
    torch.manual_seed(0)
    ops = KVOps(model.backbone.config, static=False)
    layers = model.backbone.config.num_hidden_layers

    def kv(s, t):
        return [(torch.randn(s, 2, t, 4), torch.randn(s, 2, t, 4)) for _ in range(layers)]

    def same(cache, want):
        for c, (k, v) in zip(cache.layers, want, strict=True):
            torch.testing.assert_close(c.keys, k, rtol=0, atol=0)
            torch.testing.assert_close(c.values, v, rtol=0, atol=0)
        assert cache.get_seq_length() == want[0][0].shape[2]

    cache, want = ops.empty(), kv(3, 5)
    for i, (k, v) in enumerate(want):
        cache.update(k, v, i)
    same(cache, want)
    ptr = cache.layers[0].k.data_ptr()
    for _ in range(SLACK - 1):  # one position a step: in place while the spare room lasts
        new = kv(3, 1)
        for i, (k, v) in enumerate(new):
            cache.update(k, v, i)
        want = [(torch.cat([a, k], 2), torch.cat([b, v], 2)) for (a, b), (k, v) in zip(want, new)]
    same(cache, want)
    assert cache.layers[0].k.data_ptr() == ptr
    new = kv(3, 7)  # past the room: moved to a bigger buffer, nothing lost
    for i, (k, v) in enumerate(new):
        ks = cache.update(k, v, i)[0]
        assert ks.shape[2] == want[0][0].shape[2] + 7
    want = [(torch.cat([a, k], 2), torch.cat([b, v], 2)) for (a, b), (k, v) in zip(want, new)]
    same(cache, want)
    assert cache.layers[0].k.data_ptr() != ptr

    T = want[0][0].shape[2]
    ptr = cache.layers[0].k.data_ptr()
    cache = ops.drop_front(cache, 10, T)
    want = [(k[:, :, 10:], v[:, :, 10:]) for k, v in want]
    same(cache, want)
    assert cache.layers[0].k.data_ptr() == ptr  # a view further into the same buffer
    new = kv(3, 2)  # appending after a drop still lands after the last position
    for i, (k, v) in enumerate(new):
        cache.update(k, v, i)
    want = [(torch.cat([a, k], 2), torch.cat([b, v], 2)) for (a, b), (k, v) in zip(want, new)]
    same(cache, want)

    index = torch.tensor([2, 0, 0])
    same(ops.gather([cache], index), [(k[index], v[index]) for k, v in want])
    other = ops.make(kv(2, want[0][0].shape[2]))
    both = ops.concat(cache, other)
    same(both, [(torch.cat([a, k]), torch.cat([b, v])) for (a, b), (k, v) in zip(want, ops.tensors(other))])
    padded = ops.pad_front(cache, 3, want[0][0].shape[2])
    same(padded, [(F.pad(k, (0, 0, 3, 0)), F.pad(v, (0, 0, 3, 0))) for k, v in want])
    assert isinstance(padded, GrowingKV) and padded.layers[0].capacity > padded.layers[0].length


# --------------------------------------------------------------------------------------------
# The fused image-token step (generation.cuda_graphs + static_cache): eager on CPU, graphed on CUDA
# --------------------------------------------------------------------------------------------


def fused_vs_ordinary(model, mode, **kw):
    fused = Sampler(model, gcfg(static_cache=True, cuda_graphs=True, **kw), mode=mode, seeds=SEEDS)
    got = [r.result() for r in fused.run(PROMPTS)]
    want = generate(model, PROMPTS, gcfg(static_cache=True, cuda_graphs=False, **kw), seeds=SEEDS, mode=mode)
    return fused, got, want


@pytest.mark.parametrize("mode", ["image", "auto"])
@pytest.mark.parametrize("scale", [3.0, 1.0])
def test_fused_step_equals_ordinary_path(model, mode, scale):
    fused, got, want = fused_vs_ordinary(model, mode, cfg_scale=scale)
    assert_same(got, want)
    n = model.image_tokenizer.num_tokens
    if mode == "image":  # the rows draw in lockstep; token 1 follows <boi> and token 2 rebuilds the
        # step state (the fed position turned from <boi> to an image token): tokens 3..N are fused
        assert fused.image_step.calls == n - 2
    else:  # rows drawing beside rows writing text take the ordinary path; some steps are fused
        assert sum(len(r.image_tokens) for r in got) >= 2


def test_fused_step_with_a_step_schedule(model):
    # A schedule changes the head's step count between tokens: the fused step follows it per token.
    fused, got, want = fused_vs_ordinary(model, "image", image_steps_schedule="anneal:4:1:2")
    assert_same(got, want)
    assert fused.image_step.calls == model.image_tokenizer.num_tokens - 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("scale", [3.0, 1.0])
def test_graphed_step_equals_eager(tokenizer_dir, scale):
    # The whole image-token step replayed from a CUDA graph draws the eager step's tokens for the
    # same seeds: same kernels, same inputs; tolerance 1e-4 (fp32 weights, TF32 off).
    torch.backends.cuda.matmul.allow_tf32 = False
    model = build_model(tokenizer_dir).cuda()
    graphed, got, _ = fused_vs_ordinary(model, "image", cfg_scale=scale)
    eager = generate(model, PROMPTS, gcfg(static_cache=False, cuda_graphs=False, cfg_scale=scale), seeds=SEEDS,
                     mode="image")
    assert_same(got, eager, atol=1e-4)
    n = model.image_tokenizer.num_tokens
    assert graphed.image_step.captures >= 1 and graphed.image_step.replays == n - 2


def test_a_graph_adopts_the_next_state_and_cache(model):
    # The CPU-side logic of reusing a captured graph for the next image: the new state's and
    # cache's values are copied into the tensors the graph reads, and both are pointed at them.
    from omni.inference.image_step import STATE_TENSORS, _adopt, _tensors

    def state_and_cache(seed):
        sampler = Sampler(model, gcfg(static_cache=True, cuda_graphs=True, image_steps=2), mode="image", seeds=[seed])
        sampler._rows([[(t, None) for t in [1, 5, 6]]])
        for _ in range(4):
            sampler.step()
        return sampler.groups[0].state, sampler.groups[0].cache

    st1, c1 = state_and_cache(1)
    st2, c2 = state_and_cache(2)
    owned = _tensors(st1, c1)
    values = [t.clone() for _, _, t in _tensors(st2, c2)]
    _adopt(owned, st2, c2)
    for (_, _, mine), (_, _, now), v in zip(owned, _tensors(st2, c2), values):
        assert now is mine  # the graph's tensor
        assert torch.equal(now, v)  # holding the new values
    assert c2.write is st2.write is st1.write
    assert len(owned) == len(STATE_TENSORS) + 2 * len(c2.layers)
