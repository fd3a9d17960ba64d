"""Speed of each metric family against Quantus 0.6.0's own implementation on the same model,
inputs, maps and explainer (a seeded toy CNN at 64x64, 8 images, |input gradient| maps).

Run: ``pytest benchmarks/bench_metric_families.py --benchmark-enable -s`` (about a minute on
2 cores). Each test times xbench's metric and the Quantus metric at equal work (samples,
runs, stages, percentages), interleaved, best of ``ROUNDS``, and prints the ratio
Quantus / xbench (> 1: xbench faster). Quantus's ROAD and Infidelity measure other quantities
(top-1 accuracy; patch perturbations): their rows compare equal numbers of forwards and
solves, not equal numbers.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable

import numpy as np
import pytest
import torch

from xbench.base import ExplainAgain, MetricBatch
from xbench.model import ClassifierHandle
from xbench.testing import ToyCNN, ToyGradient, toy_images, toy_model
from xbench_plugins.complexity import Sparseness
from xbench_plugins.faithfulness_correlation import FaithfulnessCorrelation
from xbench_plugins.infidelity import Infidelity
from xbench_plugins.localisation import EnergyPointingGame
from xbench_plugins.randomisation import ModelRandomisation, parameterised_modules
from xbench_plugins.road import RoadMoRF
from xbench_plugins.robustness import MaxSensitivity

quantus = pytest.importorskip("quantus")

SIZE, IMAGES, ROUNDS = 64, 8, 2


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    base = toy_model()
    loaded = dataclasses.replace(base.loaded, module=ToyCNN().eval(), input_size=SIZE)
    model = ClassifierHandle(loaded, "cpu", name="toy-64").eval()
    images = toy_images(IMAGES, seed=1, size=SIZE)
    targets = model.probabilities(images).argmax(dim=1)
    again = ExplainAgain(ToyGradient(), model)
    saliency = again(images, targets)
    batch = MetricBatch(model=model, images=images, targets=targets, saliency=saliency,
                        degenerate=saliency.flatten(1).amax(dim=1) == 0,
                        clean_probs=model.probabilities(images).gather(1, targets[:, None])[:, 0],
                        explain_forward=None, explain_backward=None, explain_seconds=None,
                        explain=again)
    return model, batch


def explain_func(model, inputs, targets, **kwargs):
    x = torch.as_tensor(np.asarray(inputs), dtype=torch.float32)
    y = torch.as_tensor(np.asarray(targets), dtype=torch.long)
    return ExplainAgain(ToyGradient(), model)(x, y).numpy()[:, None]


def common(model, batch, **extra):
    return dict(model=model, x_batch=batch.images.numpy(), y_batch=batch.targets.numpy(),
                a_batch=batch.saliency[:, None].numpy(), device="cpu", **extra)


def race(benchmark, ours: Callable[[], object], theirs: Callable[[], object], label: str) -> float:
    best = {"xbench": float("inf"), "quantus": float("inf")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(ROUNDS):
            for name, call in (("xbench", ours), ("quantus", theirs)):
                start = time.perf_counter()
                call()
                best[name] = min(best[name], time.perf_counter() - start)
    ratio = best["quantus"] / best["xbench"]
    benchmark.extra_info.update(best, ratio=ratio)
    benchmark.pedantic(ours, rounds=1, iterations=1)
    print(f"\n{label}: xbench {best['xbench']:.3f} s, Quantus {best['quantus']:.3f} s, "
          f"Quantus / xbench = {ratio:.2f}")
    return ratio


def fresh(batch: MetricBatch) -> MetricBatch:
    return dataclasses.replace(batch, cache={}, curves={})


def test_sanity_model_randomisation(benchmark, setup):
    model, batch = setup
    layers = len(parameterised_modules(model.net))
    stages = tuple(k / layers for k in range(1, layers + 1))  # every layer, as MPRT
    race(benchmark, lambda: ModelRandomisation(stages=stages).score(fresh(batch)),
         lambda: quantus.MPRT(disable_warnings=True, abs=False, normalise=False)(
             **common(model, batch, explain_func=explain_func)),
         "sanity (model randomisation, every layer, Spearman + SSIM vs Spearman)")


def test_robustness_max_sensitivity(benchmark, setup):
    model, batch = setup
    race(benchmark, lambda: MaxSensitivity(samples=5).score(fresh(batch)),
         lambda: quantus.MaxSensitivity(nr_samples=5, disable_warnings=True, abs=False,
                                        normalise=False)(
             **common(model, batch, explain_func=explain_func)),
         "robustness (max-sensitivity, 5 samples)")


def test_faithfulness_correlation(benchmark, setup):
    model, batch = setup
    race(benchmark, lambda: FaithfulnessCorrelation(runs=50, subset_size=64).score(fresh(batch)),
         lambda: quantus.FaithfulnessCorrelation(nr_runs=50, subset_size=64, abs=False,
                                                 normalise=False, return_aggregate=False,
                                                 disable_warnings=True)(
             **common(model, batch, softmax=True)),
         "faithfulness correlation (50 runs)")


def test_faithfulness_road(benchmark, setup):
    """Quantus's ROAD metric cannot run here: it ranks channel entries (3 x H x W) and passes
    those indices to its pixel-index imputer (IndexError on RGB inputs). The reference is
    therefore Quantus's own imputation (``noisy_linear_imputation``, the cost of ROAD) on the
    same removed pixels, plus the forward of the imputed images, as ROAD does per percentage."""
    from quantus.functions.perturb_func import noisy_linear_imputation

    from xbench_plugins.road import removal_masks

    model, batch = setup
    percentages = (10.0, 30.0, 50.0, 70.0, 90.0)
    removed = removal_masks(batch.saliency, percentages, True)

    def theirs():
        for masks in removed:
            imputed = [noisy_linear_imputation(image.double().numpy(),
                                               mask.flatten().nonzero().flatten().numpy(),
                                               noise=0.01)
                       for image, mask in zip(batch.images, masks)]
            with torch.no_grad():
                model.probabilities(torch.as_tensor(np.stack(imputed), dtype=torch.float32))

    race(benchmark, lambda: RoadMoRF(percentages=percentages).score(fresh(batch)), theirs,
         "ROAD MoRF (5 percentages; Quantus: its imputation + the forwards)")


def test_faithfulness_infidelity(benchmark, setup):
    model, batch = setup
    race(benchmark, lambda: Infidelity(samples=16).score(fresh(batch)),
         lambda: quantus.Infidelity(n_perturb_samples=16, perturb_patch_sizes=[8], abs=False,
                                    normalise=False, disable_warnings=True)(
             **common(model, batch)),
         "infidelity (16 samples; Quantus: patches)")


def test_localisation_and_complexity(benchmark, setup):
    model, batch = setup
    masks = np.zeros((IMAGES, 1, SIZE, SIZE), np.float32)
    masks[:, :, 10:40, 20:50] = 1
    boxed = dataclasses.replace(fresh(batch), boxes=[torch.tensor([[20, 10, 49, 39, int(t)]])
                                                     for t in batch.targets])

    def ours():
        EnergyPointingGame().score(boxed)
        Sparseness().score(boxed)

    def theirs():
        quantus.RelevanceMassAccuracy(disable_warnings=True)(
            **common(model, batch, s_batch=masks))
        quantus.Sparseness(disable_warnings=True)(**common(model, batch))

    race(benchmark, ours, theirs, "localisation + complexity (energy pointing game, sparseness)")
