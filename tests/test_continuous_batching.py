"""Continuous batching in the sampler: rows join a running batch between steps, with their own
settings, and leave when done; a row's output must not depend on what else is in the batch."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image
from test_generation import assert_same, gcfg, wake_head, with_bias

from omni.config import load_config
from omni.inference.generate import generate
from omni.inference.rows import GenerationEvents
from omni.inference.sampler import Sampler
from omni.models.model import OmniModel

BLUE = Image.new("RGB", (40, 36), (40, 80, 220))
# (prompt, settings, mode, seed): different lengths, modes, temperatures, CFG scales and steps.
REQUESTS = [
    (["draw"], gcfg(), "auto", 1),
    (["a red circle left of a blue square."], gcfg(temperature=0.0), "text", 2),
    ([BLUE, "what color is the square? and", BLUE, "this one?"], gcfg(cfg_scale=1.0), "auto", 3),
    (["the digit 7."], gcfg(image_steps=2, cfg_scale=5.0), "image", 4),
    (["a green triangle above a yellow circle."], gcfg(top_k=0, top_p=1.0, image_temperature=0.5), "auto", 5),
    ([BLUE], gcfg(max_new_tokens=12), "text", 6),
    (["how many circles are there?"], gcfg(sampler="ddim", image_steps=4), "image", 7),
    (["an orange square"], gcfg(max_new_tokens=30, cfg_scale=2.0), "auto", 8),
    (["this is the digit 3."], gcfg(repetition_stop=3), "auto", 9),
]


@pytest.fixture(scope="module")
def model(tokenizer_dir):
    cfg = load_config("tiny", [f"model.tokenizer={tokenizer_dir}", "model.backbone.hidden_size=64",
                               "model.backbone.num_layers=2", "model.backbone.num_heads=4",
                               "model.backbone.intermediate_size=128", "model.head.width=64", "model.head.depth=2",
                               "model.image_pos_embed=true"])
    torch.manual_seed(0)
    return wake_head(with_bias(OmniModel.from_config(cfg.model).eval()))


def alone(model, request):
    prompt, cfg, mode, seed = request
    return generate(model, [prompt], cfg, seeds=[seed], mode=mode)[0]


def drive(sampler: Sampler, schedule: dict[int, list[int]], requests=REQUESTS, events=None) -> dict:
    """Step `sampler`, adding request i at the step `schedule` names; results by request index."""
    rows, step, out = {}, 0, {}
    while len(out) < sum(len(v) for v in schedule.values()):
        for i in schedule.get(step, []):
            prompt, cfg, mode, seed = requests[i]
            rows[id(sampler.add(prompt, cfg, mode, seed, events=(events or {}).get(i)))] = i
        for row in sampler.step():
            out[rows[id(row)]] = row.result()
        step += 1
        assert step < 2000
    return out


def test_rows_joining_mid_batch_equal_each_alone(model):
    # Short prompts start; a long one (two pictures) joins when the batch is still short, so the
    # running rows get left padding; short ones join late, so they get it instead.
    schedule = {0: [0, 1], 2: [2], 3: [3, 4], 9: [5], 15: [6, 7], 30: [8]}
    sampler = Sampler(model, gcfg())
    got = drive(sampler, schedule)
    want = {i: alone(model, r) for i, r in enumerate(REQUESTS)}
    for i in range(len(REQUESTS)):
        assert_same([got[i]], [want[i]])
        assert got[i].settings == want[i].settings
    assert not sampler.live and not sampler.joining
    # the mix really was mixed: text rows, drawn rows, a row that went text -> image -> text
    assert sum(len(r.image_tokens) for r in got.values()) >= 4
    assert any(r.text for r in got.values())
    assert (got[3].image_tokens[0] - got[6].image_tokens[0]).abs().max() > 0.1


def test_joining_without_cache_equals_with_cache(model):
    schedule = {0: [2], 1: [0, 3], 6: [1]}
    cached = drive(Sampler(model, gcfg(use_cache=True)), schedule)
    full = drive(Sampler(model, gcfg(use_cache=False)), schedule)
    assert_same([cached[i] for i in (0, 1, 2, 3)], [full[i] for i in (0, 1, 2, 3)])


class StopAfter(GenerationEvents):
    def __init__(self, n: int):
        self.n = n

    def image_token(self, row: int, done: int, total: int) -> None:
        self.n -= 1

    def should_stop(self) -> bool:
        return self.n <= 0


def test_cancelling_one_row_leaves_the_others_alone(model):
    events = {3: StopAfter(5)}  # request 3 draws; stop it after 5 image tokens
    got = drive(Sampler(model, gcfg()), {0: [0, 3, 4], 2: [1]}, events=events)
    assert got[3].finish_reason == "cancelled" and len(got[3].image_tokens) == 0
    assert len([t for t in got[3].ids if t == model.special.img]) == 5
    for i in (0, 1, 4):
        assert_same([got[i]], [alone(model, REQUESTS[i])])


def test_a_busy_batch_stays_short(model):
    """Rows keep joining as others leave: the shared left padding is trimmed, so the batch's
    length follows the live rows, not the batch's age."""
    sampler = Sampler(model, gcfg())
    short = [(["draw"], dataclasses.replace(gcfg(), max_new_tokens=10), "text", s) for s in range(30)]
    rows, lengths, done = {}, [], {}
    pending = list(range(len(short)))
    while pending or sampler.live or sampler.joining:
        while pending and len(sampler.live) + len(sampler.joining) < 4:
            i = pending.pop(0)
            rows[id(sampler.add(*short[i][:2], short[i][2], short[i][3]))] = i
        for row in sampler.step():
            done[rows[id(row)]] = row.result()
        if sampler.live:
            lengths.append(len(sampler.live[0].cond.ids))
    assert len(done) == 30 and len(lengths) > 60
    assert max(lengths) <= 2 + 10 + 16 + 2  # prompt + answer + at most the trim threshold (and a step)
    for i in (0, 17, 29):
        assert_same([done[i]], [alone(model, short[i])])
