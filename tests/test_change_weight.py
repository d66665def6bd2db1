"""model.image_change_weight: the diffusion loss weighs a drawn image token that differs from its
cell of the previous picture (what an edit or a story step changes) above the tokens it copies."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from conftest import TINY

from omni.config import ConfigError, load_config
from omni.data.document import Document
from omni.data.loader import tokenize_document
from omni.data.shapes import CELLS, ShapesWorld, edit_scene, render
from omni.layout import layout
from omni.models.model import OmniModel, change_weight


def make_model(tokenizer_dir, *extra: str) -> OmniModel:
    cfg = load_config("tiny", [f"model.tokenizer={tokenizer_dir}", *TINY, *extra])
    torch.manual_seed(0)
    return OmniModel.from_config(cfg.model)


def edit_batch(model: OmniModel, kind: str, seed: int = 0):
    world = ShapesWorld(32)
    segments, meta = edit_scene(world, random.Random(seed), [kind])
    doc = Document.from_segments(segments, meta, key=f"edit-{kind}")
    tok = tokenize_document(doc, model.tokenizer, model.image_tokenizer)
    return layout([[tok]], model.special), meta


def token_cells(cell: tuple[int, int]) -> set[int]:
    """The 4 raster tokens (4 x 4 grid of the 32-pixel canvas) of one 16-pixel scene cell."""
    r, c = cell
    return {(2 * r + i) * 4 + 2 * c + j for i in (0, 1) for j in (0, 1)}


@pytest.mark.parametrize("kind", ["recolor", "move", "remove", "add", "swap"])
def test_the_changed_cells_of_an_edit_weigh_more(tokenizer_dir, kind):
    model = make_model(tokenizer_dir, "model.image_change_weight=4")
    batch, meta = edit_batch(model, kind)
    target = batch.image_tokens[batch.image_target_index]
    assert target.shape[0] == 16  # the source is read, only the edited scene is drawn
    w = change_weight(target, batch.image_tokens, batch.image_ref_index, 4.0)
    world = ShapesWorld(32)
    before = {world.cell_of(o): (o["shape"], o["color"], o["cx"], o["cy"], o["size"]) for o in meta["source"]}
    after = {world.cell_of(o): (o["shape"], o["color"], o["cx"], o["cy"], o["size"]) for o in meta["targets"][0]}
    changed = [c for c in CELLS if before.get(c) != after.get(c)]
    assert len(changed) == {"recolor": 1, "move": 2, "remove": 1, "add": 1, "swap": 2}[kind]
    # the patches whose pixels differ between the two renders (8 x 8 patches, raster order): all
    # inside the changed cells, and each changed cell has some
    a, b = (np.asarray(render(objects, 32)).astype(int) for objects in (meta["source"], meta["targets"][0]))
    diff = (a != b).any(-1).reshape(4, 8, 4, 8).any(axis=(1, 3)).flatten()
    expect = {i for i in range(16) if diff[i]}
    cells = set().union(*(token_cells(c) for c in changed))
    assert expect <= cells and all(expect & token_cells(c) for c in changed)
    assert {i for i in range(16) if w[i] == 4.0} == expect
    assert set(w.tolist()) == {1.0, 4.0}


def test_weighted_loss_is_the_weighted_mean_of_token_losses(tokenizer_dir):
    model = make_model(tokenizer_dir)
    head = model.head
    torch.manual_seed(3)
    k, d, D = 6, model.image_tokenizer.token_dim, model.cfg.backbone.hidden_size
    target, cond = torch.randn(k, d), torch.randn(k, D)
    weight = torch.tensor([1.0, 4.0, 1.0, 1.0, 4.0, 1.0])

    def run(w):
        torch.manual_seed(7)  # the same noise and timesteps
        return head.loss(target, cond, weight=w)

    plain, ones, weighted = run(None), run(torch.ones(k)), run(weight)
    torch.testing.assert_close(plain, ones)
    # one noisy row at a time through the net, with the same draws: noise (C*k, d) then t (C*k,)
    assert head.cfg.parameterization == "flow"
    torch.manual_seed(7)
    c = head.cfg.noise_copies
    noise, t = torch.randn(c * k, d), torch.rand(c * k)
    x0, z = target.repeat(c, 1), cond.repeat(c, 1)
    xt, goal = (1 - t[:, None]) * x0 + t[:, None] * noise, noise - x0  # rectified flow
    per = torch.stack([(head.net(xt[i:i + 1], t[i:i + 1] * 1000.0, z[i:i + 1]) - goal[i:i + 1]).pow(2).mean()
                       for i in range(c * k)])
    w = weight.repeat(c)
    torch.testing.assert_close(weighted, (per * w).sum() / w.sum(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(weighted, plain)


def test_training_forward_uses_the_weights(tokenizer_dir):
    base = make_model(tokenizer_dir)
    heavy = make_model(tokenizer_dir, "model.image_change_weight=4")
    heavy.load_state_dict(base.state_dict())
    batch, _ = edit_batch(base, "recolor", seed=1)
    torch.manual_seed(5)
    a = base(batch)["loss_image"]
    torch.manual_seed(5)
    b = heavy(batch)["loss_image"]
    assert torch.isfinite(b) and not torch.allclose(a, b)
    batch.image_ref_index.fill_(-1)  # no previous picture: every weight 1, the plain loss
    torch.manual_seed(5)
    torch.testing.assert_close(heavy(batch)["loss_image"], a)


def test_bad_settings_are_refused(tokenizer_dir):
    with pytest.raises(ConfigError, match="image_change_weight=0"):
        load_config("tiny", [f"model.tokenizer={tokenizer_dir}", *TINY, "model.image_change_weight=0"])
    with pytest.raises(ConfigError, match="parallel_image"):
        load_config("tiny", [f"model.tokenizer={tokenizer_dir}", *TINY, "model.image_change_weight=3",
                             "model.parallel_image=4"])
