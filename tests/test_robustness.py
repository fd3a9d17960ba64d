"""Robustness metrics: known answers with stub re-explanations and constant explainers, the
noise ball, batch independence, and Quantus 0.6.0's MaxSensitivity / AvgSensitivity /
LocalLipschitzEstimate on the same maps, inputs and noise."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from xbench.base import ExplainAgain, Explainer, MetricBatch
from xbench.testing import ToyGradient, toy_images, toy_model
from xbench_plugins.robustness import (AvgSensitivity, LocalLipschitz, MaxSensitivity,
                                       ball_noise)


class Constant(Explainer):
    name = "constant"
    needs_gradients = False
    uses_layer = False

    def explain(self, model, images, targets):
        return torch.ones(len(images), 4, 4)


def batch_for(model, explainer, images) -> MetricBatch:
    targets = model.probabilities(images).argmax(dim=1)
    again = ExplainAgain(explainer, model)
    saliency = again(images, targets)
    return MetricBatch(model=model, images=images, targets=targets, saliency=saliency,
                       degenerate=saliency.flatten(1).amax(dim=1) == 0,
                       clean_probs=torch.ones(len(images)), explain_forward=None,
                       explain_backward=None, explain_seconds=None, explain=again)


def test_constant_explainer_scores_zero():
    model = toy_model()
    batch = batch_for(model, Constant(), toy_images(2, seed=1))
    for metric in (MaxSensitivity(samples=3), AvgSensitivity(samples=3), LocalLipschitz(samples=3)):
        assert metric.score(batch)[""].tolist() == [0.0, 0.0]


def test_hand_computed_values_with_a_stub_explainer():
    """Re-explanation s (s = 1..N) returns the clean map + 0.1 s everywhere, so
    ||Phi_s - Phi||_F = 0.1 s sqrt(HW): max 0.1 N sqrt(HW), mean 0.1 (N+1)/2 sqrt(HW)."""
    n, size = 4, 8
    saliency = torch.linspace(0, 1, size * size).view(1, size, size).repeat(2, 1, 1)
    calls = []

    def stub(images, targets, model=None):
        calls.append(images.clone())
        return saliency + 0.1 * len(calls)

    images = torch.full((2, 3, size, size), 0.5)
    batch = MetricBatch(model=None, images=images, targets=torch.tensor([1, 2]),
                        saliency=saliency, degenerate=torch.zeros(2, dtype=torch.bool),
                        clean_probs=torch.ones(2), explain_forward=None, explain_backward=None,
                        explain_seconds=None, explain=stub)
    root = math.sqrt(size * size)
    assert MaxSensitivity(samples=n).score(batch)[""].tolist() == pytest.approx([0.1 * n * root] * 2)
    assert len(calls) == n
    # the cache: the other two metrics with the same radius, samples and seed re-use the samples
    assert AvgSensitivity(samples=n).score(batch)[""].tolist() == pytest.approx(
        [0.1 * (n + 1) / 2 * root] * 2)
    noise = torch.stack([c - images for c in calls])
    steps = noise.double().flatten(2)[:, 0].norm(dim=1)
    expected = max(0.1 * (s + 1) * root / float(steps[s]) for s in range(n))
    assert LocalLipschitz(samples=n).score(batch)[""].tolist() == pytest.approx([expected] * 2)
    assert len(calls) == n
    relative = MaxSensitivity(samples=n, norm="relative").score(batch)[""]
    assert relative.tolist() == pytest.approx([0.1 * n * root / float(saliency[0].norm())] * 2)
    # the noise: uniform in the L-inf ball, the same for both images, seeded
    assert float(noise.abs().max()) <= 0.02 + 1e-7 and float(noise.abs().max()) > 0.015
    assert torch.equal(noise[:, 0], noise[:, 1])
    assert torch.allclose(ball_noise(n, (3, size, size), 0.02, 0, torch.device("cpu")), noise[:, 0],
                          atol=1e-7)


def test_relative_norm_of_a_degenerate_map_is_nan():
    model = toy_model()
    batch = batch_for(model, Constant(), toy_images(1, seed=1))
    assert math.isnan(MaxSensitivity(samples=2, norm="relative").score(batch)[""].item())


def test_larger_ball_moves_a_gradient_map_more():
    model = toy_model()
    images = toy_images(3, seed=2)
    small = AvgSensitivity(samples=4, radius=0.001).score(batch_for(model, ToyGradient(), images))
    large = AvgSensitivity(samples=4, radius=0.2).score(batch_for(model, ToyGradient(), images))
    assert (small[""] < large[""]).all()


# -- Quantus 0.6.0 -----------------------------------------------------------------------

quantus = pytest.importorskip("quantus")


def _replay(noise: torch.Tensor):
    """A Quantus perturb_func that adds our noise samples in order."""
    step = {"i": 0}

    def perturb(arr, indices=None, indexed_axes=None, **kwargs):
        d = noise[step["i"]].flatten().numpy()
        step["i"] += 1
        return arr + d[None]
    return perturb


def _explain_func(explainer):
    def explain(model, inputs, targets, **kwargs):
        x = torch.as_tensor(np.asarray(inputs), dtype=torch.float32)
        y = torch.as_tensor(np.asarray(targets), dtype=torch.long)
        return ExplainAgain(explainer, model)(x, y).numpy()[:, None]
    return explain


@pytest.mark.parametrize("ours,theirs,kwargs", [
    (MaxSensitivity, "MaxSensitivity", {"norm": "relative"}),
    (AvgSensitivity, "AvgSensitivity", {"norm": "relative"}),
    (MaxSensitivity, "MaxSensitivity", {"norm": "absolute"}),
    (LocalLipschitz, "LocalLipschitzEstimate", {}),
])
def test_agrees_with_quantus_on_the_same_noise(ours, theirs, kwargs):
    model = toy_model()
    images = toy_images(3, seed=3)
    batch = batch_for(model, ToyGradient(), images)
    n = 3
    noise = ball_noise(n, tuple(images.shape[1:]), 0.02, 0, images.device)
    extra = {}
    if kwargs.get("norm") == "absolute":  # Yeh's definition: no denominator
        extra["norm_denominator"] = lambda a, **k: np.ones(a.shape[0])
    if theirs == "LocalLipschitzEstimate":
        extra["norm_numerator"] = quantus.similarity_func.distance_euclidean
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = getattr(quantus, theirs)(nr_samples=n, perturb_func=_replay(noise),
                                            abs=False, normalise=False, disable_warnings=True,
                                            **extra)(
            model=model, x_batch=images.numpy(), y_batch=batch.targets.numpy(),
            a_batch=batch.saliency[:, None].numpy(), explain_func=_explain_func(ToyGradient()),
            device="cpu")
    got = ours(samples=n, **kwargs).score(batch)[""]
    np.testing.assert_allclose(got.numpy(), np.asarray(expected, dtype=np.float64), rtol=1e-5,
                               atol=1e-6)
