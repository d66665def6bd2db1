"""The digits judge: an independent CNN on held-out real digits, and the Fréchet distance."""

from __future__ import annotations

import numpy as np
import pytest

from omni.eval.judges.digits import DigitJudge, frechet_distance, split_halves


@pytest.fixture(scope="module")
def heldout():
    from omni.data.digits import load_split

    return load_split("heldout")


@pytest.fixture(scope="module")
def judge(heldout):
    images, labels = heldout
    return DigitJudge.fit(images, labels, seed=0)


def test_classifier_is_accurate_on_real_heldout_digits(judge, heldout):
    _, labels = heldout
    assert judge.n_train + judge.n_test == len(labels)
    assert judge.accuracy >= 0.95, judge.accuracy
    # It never saw the training split either: it must read those digits too.
    from omni.data.digits import load_split

    train_images, train_labels = load_split("train")
    assert (judge.predict(train_images[:400]) == train_labels[:400]).mean() >= 0.93


def test_training_is_deterministic_and_leaves_global_rng_alone(heldout):
    import torch

    images, labels = heldout
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = DigitJudge.fit(images[:120], labels[:120], seed=1)
    after = torch.rand(3)
    b = DigitJudge.fit(images[:120], labels[:120], seed=1)
    assert torch.equal(before, after), "fitting must not consume the caller's random numbers"
    for (ka, va), (kb, vb) in zip(a.net.state_dict().items(), b.net.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_frechet_distance_real_halves_far_below_noise(judge, heldout):
    images, labels = heldout
    first, second = split_halves(labels, seed=7)
    real_real = frechet_distance(judge.features(images[first]), judge.features(images[second]))
    noise = np.random.default_rng(0).integers(0, 256, size=(len(second), 32, 32, 3), dtype=np.uint8)
    real_noise = frechet_distance(judge.features(images[second]), judge.features(noise))
    blank = np.full((len(second), 32, 32, 3), 255, np.uint8)
    real_blank = frechet_distance(judge.features(images[second]), judge.features(blank))
    assert real_real * 10 < real_noise, (real_real, real_noise)
    assert real_real * 10 < real_blank, (real_real, real_blank)


def test_frechet_distance_matches_the_gaussian_formula():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20000, 3))
    b = rng.normal(size=(20000, 3)) * 2.0 + np.array([1.0, 0.0, 0.0])
    # N(0, I) vs N(mu, 4I): |mu|^2 + tr(I + 4I - 2 * 2I) = 1 + 3 * (1 + 4 - 4) = 4
    assert frechet_distance(a, b) == pytest.approx(4.0, abs=0.15)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-3)


def test_digits_benchmarks_score_real_digits_as_correct(judge):
    from omni.eval.benchmarks_builtin import BUILTIN, oracle_output

    read = BUILTIN["digits-read"]()
    samples = read.samples(None, 40)
    assert all(s.mode == "text" and read.score(s, oracle_output(s), None)["correct"] == 1.0 for s in samples)

    t2i = BUILTIN["digits-t2i"]()
    t2i._judge = judge
    samples = t2i.samples(None, 60)
    correct = [t2i.score(s, oracle_output(s), None)["correct"] for s in samples]
    assert np.mean(correct) >= 0.95
