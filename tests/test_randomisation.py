"""Sanity checks (model randomisation, random logit): similarities against scipy / skimage /
Quantus, known answers on toys, the trained model untouched, and Quantus 0.6.0's MPRT and
RandomLogit on the same maps and inputs."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch

from xbench.base import ExplainAgain, Explainer, MetricBatch
from xbench.model import ClassifierHandle
from xbench.saliency import normalize_maps
from xbench.testing import ToyCNN, ToyGradient, toy_images, toy_model
from xbench_plugins.randomisation import (ModelRandomisation, RandomLogit, average_ranks,
                                          other_classes, parameterised_modules, spearman,
                                          ssim, stage_counts)


class ImageIntensity(Explainer):
    """A map that ignores the model: the image's channel sum."""

    name = "image-intensity"
    needs_gradients = False
    uses_layer = False

    def explain(self, model, images, targets):
        return images.sum(dim=1)


def batch_for(model, explainer, images, targets=None) -> MetricBatch:
    targets = model.probabilities(images).argmax(dim=1) if targets is None else targets
    again = ExplainAgain(explainer, model)
    saliency = again(images, targets)
    n = len(images)
    return MetricBatch(model=model, images=images, targets=targets, saliency=saliency,
                       degenerate=saliency.flatten(1).amax(dim=1) == 0,
                       clean_probs=torch.ones(n), explain_forward=None, explain_backward=None,
                       explain_seconds=None, explain=again)


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict(keep_vars=False).items()}


# -- similarities --------------------------------------------------------------------------

def test_average_ranks_and_spearman_match_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    generator = torch.Generator().manual_seed(0)
    a = (torch.rand(5, 12, 12, generator=generator) * 6).floor() / 6  # many ties
    b = (torch.rand(5, 12, 12, generator=generator) * 4).floor() / 4
    ranks = average_ranks(a.flatten(1).double())
    for i in range(5):
        np.testing.assert_allclose(ranks[i].numpy(), stats.rankdata(a[i].flatten().numpy()))
        expected = stats.spearmanr(a[i].flatten().numpy(), b[i].flatten().numpy())[0]
        assert spearman(a[i:i + 1], b[i:i + 1]).item() == pytest.approx(expected, abs=1e-12)


def test_ssim_matches_skimage():
    metrics = pytest.importorskip("skimage.metrics")
    generator = torch.Generator().manual_seed(1)
    a = torch.rand(4, 20, 24, generator=generator)
    b = (a + 0.3 * torch.rand(4, 20, 24, generator=generator)).clamp(0, 1)
    ours = ssim(a, b)
    for i in range(4):
        x, y = a[i].double().numpy(), b[i].double().numpy()
        rng = float(max(x.max(), y.max()) - min(x.min(), y.min()))
        expected = metrics.structural_similarity(x, y, data_range=rng)
        assert ours[i].item() == pytest.approx(expected, abs=1e-10)


def test_constant_maps_rules():
    zero, ramp = torch.zeros(1, 8, 8), torch.linspace(0, 1, 64).view(1, 8, 8)
    assert spearman(zero, ramp).item() == 0.0
    assert spearman(zero, zero).item() == 1.0
    assert ssim(zero, zero).item() == 1.0
    assert spearman(ramp, ramp).item() == pytest.approx(1.0)
    assert ssim(ramp, ramp).item() == pytest.approx(1.0)


# -- model randomisation -------------------------------------------------------------------

def test_stage_counts_cascade_from_the_top():
    assert stage_counts((0.0, 0.25, 0.5, 1.0), 10) == [1, 3, 5, 10]
    model = toy_model()
    # the logits layer is the top of the cascade
    assert parameterised_modules(model.net)[::-1][0] == "fc"


def test_a_map_independent_of_the_weights_fails_and_the_model_is_untouched():
    model = toy_model()
    before = state(model)
    rng = torch.random.get_rng_state()
    images = toy_images(3, seed=4)
    scores = ModelRandomisation().score(batch_for(model, ImageIntensity(), images))
    for key, values in scores.items():  # the map never changes: similarity 1 at every stage
        assert torch.allclose(values, torch.ones(3), atol=1e-6), key
    assert sorted(scores) == sorted(f"stage={s},similarity={m}" for s in ("0", "0.25", "0.5", "1")
                                    for m in ("spearman", "ssim"))
    after = state(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-identical
    assert torch.equal(rng, torch.random.get_rng_state())  # the global RNG is left as it was


def test_a_gradient_map_changes_when_every_layer_is_randomised():
    model = toy_model()
    images = toy_images(4, seed=5)
    scores = ModelRandomisation(stages=(1.0,)).score(batch_for(model, ToyGradient(), images))
    assert (scores["stage=1,similarity=spearman"] < 0.9).all()
    assert (scores["stage=1,similarity=ssim"] < 0.9).all()


def test_engine_holds_trained_weights_so_the_copy_runs_eagerly():
    """The randomised copy must not use the run's inference engine (it holds trained weights):
    an explainer reading only ``model.predict`` changes its map with the weights."""

    class PredictOnly(Explainer):
        name = "predict-only"
        needs_gradients = False
        uses_layer = False

        def explain(self, model, images, targets):
            probs = model.predict(images).softmax(dim=1)
            return probs[:, :4, None].expand(-1, 4, 4).reshape(-1, 4, 4) + torch.arange(
                4.0).view(1, 1, 4) * probs[:, 4:5, None]

    model = toy_model()
    from xbench.testing import engine_twin
    twin = engine_twin(model)
    if twin is None:
        pytest.skip("onnxruntime not installed")
    images = toy_images(2, seed=6)
    scores = ModelRandomisation(stages=(1.0,)).score(batch_for(twin, PredictOnly(), images))
    assert (scores["stage=1,similarity=ssim"] < 0.999).all()


# -- random logit --------------------------------------------------------------------------

def test_other_classes_are_other_uniform_and_batch_independent():
    targets = torch.tensor([0, 3, 9, 3])
    drawn = other_classes(targets, 10, seed=0)
    assert (drawn != targets).all()
    assert torch.equal(other_classes(targets[1:2], 10, 0), drawn[1:2])
    many = other_classes(torch.zeros(1, dtype=torch.long), 10, 0)
    counts = torch.bincount(torch.cat([other_classes(torch.tensor([t % 10]), 10, s)
                                       for s in range(200) for t in range(1)]), minlength=10)
    assert counts[0] == 0 and (counts[1:] > 5).all()
    assert many.item() != 0
    assert other_classes(torch.tensor([1, 0]), 2, 5).tolist() == [0, 1]


def test_random_logit_known_answers():
    model = toy_model()
    images = toy_images(2, seed=7)
    same = RandomLogit().score(batch_for(model, ImageIntensity(), images))
    assert all(torch.allclose(v, torch.ones(2), atol=1e-6) for v in same.values())
    differs = RandomLogit().score(batch_for(model, ToyGradient(), images))
    assert (differs["similarity=spearman"] < 0.999).all()


# -- Quantus 0.6.0 -----------------------------------------------------------------------

quantus = pytest.importorskip("quantus")


def _quantus_explain(explainer):
    def explain_func(model, inputs, targets, **kwargs):
        handle = model if isinstance(model, ClassifierHandle) else None
        if handle is None:  # Quantus hands over a deep copy of the handle, randomised
            raise AssertionError(f"unexpected model {type(model)}")
        x = torch.as_tensor(np.asarray(inputs), dtype=torch.float32)
        y = torch.as_tensor(np.asarray(targets), dtype=torch.long)
        return ExplainAgain(explainer, handle)(x, y).numpy()[:, None]
    return explain_func


def test_model_randomisation_agrees_with_quantus_mprt():
    model = toy_model()
    images = toy_images(3, seed=8)
    batch = batch_for(model, ToyGradient(), images)
    stages = (0.0, 0.5, 1.0)
    ours = ModelRandomisation(stages=stages, seed=5).score(batch)
    layers = parameterised_modules(model.net)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = quantus.MPRT(layer_order="top_down", seed=4, abs=False, normalise=False,
                              similarity_func=quantus.similarity_func.correlation_spearman,
                              disable_warnings=True)(
            model=model, x_batch=images.numpy(), y_batch=batch.targets.numpy(),
            a_batch=batch.saliency[:, None].numpy(), explain_func=_quantus_explain(ToyGradient()),
            device="cpu")
    top_down = ["net." + name for name in layers[::-1]]
    for fraction, count in zip(stages, stage_counts(stages, len(layers))):
        expected = np.asarray(theirs[top_down[count - 1]])
        np.testing.assert_allclose(ours[f"stage={fraction:g},similarity=spearman"].numpy(),
                                   expected, atol=1e-6)


def _quantus_random_logit(model, images, batch, similarity):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.asarray(quantus.RandomLogit(num_classes=2, abs=False, normalise=False,
                                              similarity_func=similarity,
                                              disable_warnings=True)(
            model=model, x_batch=images.numpy(), y_batch=batch.targets.numpy(),
            a_batch=batch.saliency[:, None].numpy(), explain_func=_quantus_explain(ToyGradient()),
            device="cpu"), dtype=np.float64)


def test_random_logit_agrees_with_quantus_on_two_classes():
    """With two classes the other class is forced, so Quantus's draw and ours coincide:
    Spearman agrees to float rounding. Deliberate difference: Quantus's SSIM runs on the maps
    flattened to 1-D rows (7-pixel windows along raster lines, across row ends); ours is the 2-D
    SSIM of the maps (7x7 windows), the image similarity Adebayo et al. report."""
    metrics = pytest.importorskip("skimage.metrics")
    torch.manual_seed(0)
    model = toy_model()
    loaded = dataclasses.replace(model.loaded, module=ToyCNN(classes=2).eval(),
                                 class_names=("a", "b"))
    two = ClassifierHandle(loaded, "cpu", name="toy-2")
    images = toy_images(3, seed=9)
    batch = batch_for(two, ToyGradient(), images)
    ours = RandomLogit().score(batch)
    rho = _quantus_random_logit(two, images, batch, quantus.similarity_func.correlation_spearman)
    np.testing.assert_allclose(ours["similarity=spearman"].numpy(), rho, atol=1e-6)
    theirs = _quantus_random_logit(two, images, batch, quantus.similarity_func.ssim)
    other = ExplainAgain(ToyGradient(), two)(images, 1 - batch.targets).double().numpy()
    clean = batch.saliency.double().numpy()
    for i in range(3):
        rng = float(max(clean[i].max(), other[i].max()) - min(clean[i].min(), other[i].min()))
        flat = metrics.structural_similarity(clean[i].ravel(), other[i].ravel(), data_range=rng)
        plane = metrics.structural_similarity(clean[i], other[i], data_range=rng)
        assert theirs[i] == pytest.approx(flat, abs=1e-5)
        assert ours["similarity=ssim"][i].item() == pytest.approx(plane, abs=1e-5)
        assert abs(flat - plane) > 1e-3  # the two windows really differ here
