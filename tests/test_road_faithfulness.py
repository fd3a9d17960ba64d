"""ROAD, faithfulness correlation and infidelity: known answers on analytic toys, the imputation
against Quantus's spsolve and ROAD against quantus.ROAD end to end (with each deliberate
difference shown), faithfulness correlation against Quantus on the same subsets, and the captum
adapter against calling captum.metrics.infidelity directly."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from xbench.base import LoadedModel, MetricBatch
from xbench.model import ClassifierHandle
from xbench.testing import toy_images, toy_model
from xbench_plugins.faithfulness_correlation import (FaithfulnessCorrelation, correlation_terms,
                                                     pearson, random_subsets)
from xbench_plugins.infidelity import Infidelity, forward_of, noise_perturbation
from xbench_plugins.road import RoadLeRF, RoadMoRF, linear_imputation, removal_masks


def batch_of(model, images, saliency, targets=None) -> MetricBatch:
    probs = model.probabilities(images)
    targets = probs.argmax(dim=1) if targets is None else targets
    return MetricBatch(model=model, images=images, targets=targets, saliency=saliency,
                       degenerate=saliency.flatten(1).amax(dim=1) == 0,
                       clean_probs=probs.gather(1, targets[:, None])[:, 0],
                       explain_forward=None, explain_backward=None, explain_seconds=None)


class Linear(nn.Module):
    """logits = (w . x_normalised, 0): class 0's logit is linear in the pixels."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, x):
        z = (x * self.weight).flatten(1).sum(dim=1)
        return torch.stack([z, torch.zeros_like(z)], dim=1)


def linear_handle(weight: torch.Tensor) -> ClassifierHandle:
    size = weight.shape[-1]
    loaded = LoadedModel(module=Linear(weight).eval(), input_size=size, mean=(0.0, 0.0, 0.0),
                         std=(1.0, 1.0, 1.0), class_names=("a", "b"), default_layer="")
    return ClassifierHandle(loaded, "cpu", name="linear")


# -- ROAD ----------------------------------------------------------------------------------

def test_removal_masks_count_and_order():
    saliency = torch.arange(16.0).view(1, 4, 4)
    morf = removal_masks(saliency, (25.0, 50.0), True)
    lerf = removal_masks(saliency, (25.0, 50.0), False)
    assert morf.sum(dim=(1, 2, 3)).tolist() == [4, 8] and lerf.sum(dim=(1, 2, 3)).tolist() == [4, 8]
    assert morf[0, 0].flatten().nonzero().flatten().tolist() == [12, 13, 14, 15]
    assert lerf[0, 0].flatten().nonzero().flatten().tolist() == [0, 1, 2, 3]


def test_imputation_of_a_constant_image_is_exact_and_road_reads_the_target():
    """Per-channel constant images: every neighbour mean is the constant, so the imputed image
    equals the original and (noise 0) every percentage gives the clean probability of the
    target -- here class 3, not class 0."""
    model = toy_model()
    images = torch.tensor([0.2, 0.5, 0.9]).view(1, 3, 1, 1).expand(2, 3, 32, 32).clone()
    saliency = torch.rand(2, 32, 32, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([3, 7])
    batch = batch_of(model, images, saliency, targets)
    for metric in (RoadMoRF(noise=0.0), RoadLeRF(noise=0.0)):
        value = metric.score(batch)[""]
        torch.testing.assert_close(value, batch.clean_probs, atol=1e-5, rtol=0)
        assert batch.curves[(metric.name, "")].shape == (2, 9)
    assert not torch.allclose(batch.clean_probs, model.probabilities(images)[:, 0])


def test_road_noise_is_seeded_on_removed_pixels_only():
    images = toy_images(1, seed=3)
    removed = torch.zeros(1, 32, 32, dtype=torch.bool)
    removed[0, 10:20, 5:25] = True
    filled = linear_imputation(images, removed)
    assert torch.equal(filled[:, :, ~removed[0]], images[:, :, ~removed[0]])
    model = toy_model()
    saliency = torch.rand(1, 32, 32, generator=torch.Generator().manual_seed(1))
    a = RoadMoRF(seed=1).score(batch_of(model, images, saliency))[""]
    b = RoadMoRF(seed=1).score(batch_of(model, images, saliency))[""]
    c = RoadMoRF(seed=2).score(batch_of(model, images, saliency))[""]
    assert torch.equal(a, b) and not torch.equal(a, c)


quantus = pytest.importorskip("quantus")


def test_imputation_matches_quantus_spsolve():
    """Quantus's noisy_linear_imputation (scipy spsolve, noise 0) on the same pixels."""
    from quantus.functions.perturb_func import noisy_linear_imputation

    generator = torch.Generator().manual_seed(4)
    images = torch.rand(2, 3, 24, 24, generator=generator)
    saliency = torch.rand(2, 24, 24, generator=generator)
    saliency[1] = torch.linspace(0, 1, 24 * 24).view(24, 24)  # one big connected region
    for percent in (10.0, 60.0, 90.0):
        removed = removal_masks(saliency, (percent,), True)[0]
        ours = linear_imputation(images, removed)
        for i in range(2):
            indices = removed[i].flatten().nonzero().flatten().numpy()
            theirs = noisy_linear_imputation(images[i].double().numpy(), indices, noise=0.0)
            np.testing.assert_allclose(ours[i].double().numpy(), theirs, atol=1e-6)


# -- ROAD end to end against quantus.ROAD ----------------------------------------------------
#
# quantus.ROAD broadcasts the map to the image's entries, ranks those entries and passes their
# flat indices to noisy_linear_imputation, which reads them as pixel indices: on RGB the ranks
# run to 3 H W and it fails. It is right when C = 1, so it runs on gray images here. xbench's
# handle normalises with a (1, 3, 1, 1) mean and std, so the very same handle maps a gray image
# to three equal channels (asserted: same logits for the gray image and its 3-channel copy):
# xbench gets the copy. Its imputation solves every channel with one matrix, and equal
# channels give equal right-hand sides, so each filled channel is the solution Quantus computes
# for the gray image -- asserted on the images the model was fed, not argued only.

PERCENTAGES = (10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0)


def recording(model):
    """A forward hook on ``model`` keeping (input, logits) of every call: the images each side
    fed the model and what it answered (quantus.ROAD returns only top-1 hits)."""
    calls = []
    hook = model.register_forward_hook(
        lambda module, inputs, output: calls.append((inputs[0].detach().clone(),
                                                     output.detach().clone())))
    return calls, hook


def quantus_road(model, gray, saliency, targets, batch_size=64, **kwargs):
    """quantus.ROAD itself on (N, 1, H, W) gray images (its defaults but ``kwargs``):
    (its result, its forwards)."""
    calls, hook = recording(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = quantus.ROAD(disable_warnings=True, **kwargs)(
                model=model.eval(), x_batch=gray.numpy(), y_batch=targets.numpy(),
                a_batch=saliency[:, None].numpy(), device="cpu", batch_size=batch_size)
    finally:
        hook.remove()
    return result, calls


def xbench_road(metric, model, rgb, saliency, targets):
    """road-morf / road-lerf on (N, 3, H, W) images: (per-image curves, its forwards)."""
    batch = batch_of(model, rgb, saliency, targets)
    calls, hook = recording(model)
    try:
        metric.score(batch)
    finally:
        hook.remove()
    return batch.curves[(metric.name, "")], calls


def gray_case(n=3, seed=20):
    """The toy CNN with its last layer x30 (its random logits are nearly flat: the curves
    would move by 1e-3 only), n rough gray images (uniform noise: the imputation changes them
    a lot) and their 3-channel copies, maps without ties, each a random permutation of
    1/1024, ..., 1024/1024 (exact in float32, maximum 1: Quantus's default normalise_by_max
    divides by 1) and as target image i's (i+1)-th likeliest class."""
    model = toy_model()
    with torch.no_grad():
        model.net.fc.weight.mul_(30.0)
        model.net.fc.bias.mul_(30.0)
    generator = torch.Generator().manual_seed(seed)
    gray = torch.rand(n, 1, 32, 32, generator=generator)
    rgb = gray.expand(-1, 3, -1, -1).contiguous()
    saliency = torch.stack([torch.randperm(32 * 32, generator=generator) + 1.0
                            for _ in range(n)]).view(n, 32, 32) / (32 * 32)
    ranked = model.probabilities(rgb).argsort(dim=1, descending=True)
    targets = ranked[torch.arange(n), torch.arange(n)]  # image i: its (i+1)-th likeliest class
    return model, gray, rgb, saliency, targets


def test_road_agrees_with_quantus_end_to_end_on_gray_images():
    """Same model, images, maps, percentages, targets and noise 0: xbench's curves are the
    softmax probabilities of the target on the very images quantus.ROAD built, and Quantus's
    result is the top-1 accuracy read from the same forwards. The deliberate differences shown
    here: Quantus returns, per percentage, the batch's accuracy (top-1 == label, 0 or 1 per
    image) where xbench keeps each image's target probability (a graded curve, no argmax
    threshold); Quantus has only MoRF (and refuses negative maps), and its ROAD on the map
    reversed (1 + 1/1024 - map: the same order backwards, maximum 1) is xbench's LeRF (no
    ties here, so the order of ties plays no part). Not differences: Quantus reads the label
    it is given (y_batch is required; no class-0 default), here not the predicted class for
    two of the images, and counts int(H W p / 100) pixels as xbench; only its default
    percentages (1, 3, ..., 99) differ from ours (10, ..., 90), so they are passed."""
    model, gray, rgb, saliency, targets = gray_case()
    assert saliency.flatten(1).unique(dim=1).shape[1] == 32 * 32  # no ties
    torch.testing.assert_close(model(gray), model(rgb), rtol=0, atol=0)
    reversed_ = 1 + 1 / (32 * 32) - saliency
    for metric, map_ in ((RoadMoRF(noise=0.0), saliency), (RoadLeRF(noise=0.0), reversed_)):
        theirs, their_calls = quantus_road(model, gray, map_, targets,
                                           percentages=list(PERCENTAGES), noise=0.0)
        ours, our_calls = xbench_road(metric, model, rgb, saliency, targets)
        assert list(theirs) == list(PERCENTAGES)
        assert len(their_calls) == len(our_calls) == len(PERCENTAGES)
        hits = []
        for j, ((their_x, their_logits), (our_x, our_logits)) in enumerate(
                zip(their_calls, our_calls)):
            assert their_x.shape == gray.shape and our_x.shape == rgb.shape
            assert torch.equal(our_x[:, 1:], our_x[:, :1].expand(-1, 2, -1, -1))
            torch.testing.assert_close(our_x[:, :1], their_x, rtol=0, atol=1e-6)
            removed = int(32 * 32 * PERCENTAGES[j] / 100)
            assert ((their_x != gray).flatten(1).sum(dim=1) == removed).all()
            their_probs = their_logits.softmax(dim=1).gather(1, targets[:, None])[:, 0]
            torch.testing.assert_close(ours[:, j], their_probs, rtol=0, atol=1e-6)
            hits.append(their_logits.argmax(dim=1) == targets)
            assert torch.equal(our_logits.argmax(dim=1) == targets, hits[-1])
        hits = torch.stack(hits, dim=1)
        np.testing.assert_array_equal(list(theirs.values()), hits.double().mean(dim=0).numpy())
        # the two quantities differ: a graded probability against a 0/1 hit per image
        assert ((ours > 0) & (ours < 1)).all() and not torch.allclose(ours, hits.float(),
                                                                     atol=0.01)
        # the curves move by far more than the tolerance: the agreement is no accident
        assert (ours.amax(dim=1) - ours.amin(dim=1)).min() > 1e-3
    assert not torch.allclose(
        xbench_road(RoadMoRF(noise=0.0), model, rgb, saliency, targets)[0],
        xbench_road(RoadLeRF(noise=0.0), model, rgb, saliency, targets)[0], atol=1e-3)


def removed_pixels(calls, images):
    """(P, N, H W) bool: the pixels each forward's input changed in channel 0."""
    return torch.stack([(x[:, :1] != images[:, :1]).flatten(1) for x, _ in calls])


def test_quantus_road_fails_on_rgb_and_breaks_ties_with_an_unstable_sort():
    """Two deliberate differences in the order. (1) On RGB Quantus ranks the 3 H W channel
    entries and imputes their flat indices as pixels: an IndexError (why the comparison runs on
    gray images). (2) Ties: xbench removes tied pixels in raster order (stable sort, as every
    xbench metric: a map's score must not depend on the sort's implementation); Quantus takes
    np.argsort's order, which is not stable. On a map with four levels both remove the same
    number of pixels, all from the top level, but not the same ones; with Quantus's choice
    made explicit in the map (its removed pixels raised above the tie) xbench builds the same
    images and probabilities: the order of ties is the only difference."""
    model, gray, rgb, saliency, targets = gray_case()
    with pytest.raises(IndexError):
        quantus_road(model, rgb, saliency, targets, percentages=[10.0], noise=0.0)

    levels = (saliency * 4).ceil() / 4  # 0.25, 0.5, 0.75, 1: 256 pixels tie at each level
    percentages = (10.0, 20.0)  # 102 and 204 pixels: inside the top level
    _, their_calls = quantus_road(model, gray, levels, targets, percentages=list(percentages),
                                  noise=0.0)
    ours, our_calls = xbench_road(RoadMoRF(noise=0.0, percentages=percentages), model, rgb,
                                  levels, targets)
    theirs, mine = removed_pixels(their_calls, gray), removed_pixels(our_calls, rgb)
    top = (levels == 1).flatten(1)
    for j, percent in enumerate(percentages):
        count = int(32 * 32 * percent / 100)
        assert (theirs[j].sum(dim=1) == count).all() and (mine[j].sum(dim=1) == count).all()
        assert not (theirs[j] & ~top).any() and not (mine[j] & ~top).any()
        raster = top.cumsum(dim=1) <= count  # the first `count` top pixels in raster order
        assert torch.equal(mine[j], top & raster)
        assert not torch.equal(theirs[j], mine[j])
    broken = levels + 1e-3 * theirs.sum(dim=0).view_as(levels)  # Quantus's order of ties
    replayed, replay_calls = xbench_road(RoadMoRF(noise=0.0, percentages=percentages), model,
                                         rgb, broken, targets)
    assert torch.equal(removed_pixels(replay_calls, rgb), theirs)
    for j, (their_x, their_logits) in enumerate(their_calls):
        torch.testing.assert_close(replay_calls[j][0][:, :1], their_x, rtol=0, atol=1e-6)
        their_probs = their_logits.softmax(dim=1).gather(1, targets[:, None])[:, 0]
        torch.testing.assert_close(replayed[:, j], their_probs, rtol=0, atol=1e-6)
    assert not torch.allclose(replayed, ours, rtol=0, atol=1e-6)


def test_quantus_road_returns_the_first_batch_only():
    """Quantus's custom_postprocess averages evaluation_scores[0], the first batch's hits: with
    batch_size=1 its result is image 0's alone (a Quantus bug; xbench keeps a row per image
    whatever the batching). The images' hits differ, so the two results cannot agree by
    chance."""
    model, gray, rgb, saliency, targets = gray_case()
    whole, calls = quantus_road(model, gray, saliency, targets, percentages=[10.0, 50.0, 90.0],
                                noise=0.0)
    first, _ = quantus_road(model, gray, saliency, targets, percentages=[10.0, 50.0, 90.0],
                            noise=0.0, batch_size=1)
    hits = torch.stack([logits.argmax(dim=1) == targets for _, logits in calls], dim=1)
    assert not torch.equal(hits[0], hits[1])
    np.testing.assert_array_equal(list(whole.values()), hits.double().mean(dim=0).numpy())
    np.testing.assert_array_equal(list(first.values()), hits[0].double().numpy())


def test_quantus_road_noise_follows_the_global_numpy_state_xbench_seeds_its_own():
    """Both default to noise 0.01 on the removed pixels only, but draw it differently: Quantus
    from numpy's global generator, one draw per image and percentage in turn, so an image's
    noise depends on the images before it in the batch; xbench from a generator seeded with
    ``seed``, one (3, H, W) draw per percentage shared by all images, so an image's score never
    depends on its batch. (Quantus's noise is also in the units of the x_batch it is given,
    often normalised inputs; xbench's in pixel units, before the model's normalisation.) Same
    distribution, other draws: no agreement to float rounding is possible with noise on."""
    model, gray, rgb, saliency, targets = gray_case()
    kwargs = dict(percentages=[50.0])
    _, clean = quantus_road(model, gray, saliency, targets, noise=0.0, **kwargs)
    np.random.seed(0)
    _, batched = quantus_road(model, gray, saliency, targets, **kwargs)  # noise 0.01: default
    np.random.seed(0)
    _, alone = quantus_road(model, gray[1:], saliency[1:], targets[1:], **kwargs)
    np.random.seed(0)
    _, again = quantus_road(model, gray[1:], saliency[1:], targets[1:], **kwargs)
    assert torch.equal(alone[0][0], again[0][0])
    assert not torch.equal(alone[0][0][0], batched[0][0][1])
    noise = batched[0][0] - clean[0][0]
    removed = removed_pixels(clean, gray)[0].view_as(noise)
    assert (noise[~removed] == 0).all()
    assert 0.009 < noise[removed].std().item() < 0.011  # 3 x 512 draws
    ours_alone, _ = xbench_road(RoadMoRF(), model, rgb[1:], saliency[1:], targets[1:])
    ours_batched, _ = xbench_road(RoadMoRF(), model, rgb, saliency, targets)
    torch.testing.assert_close(ours_alone[0], ours_batched[1], rtol=0, atol=1e-6)
    ours_clean, _ = xbench_road(RoadMoRF(noise=0.0), model, rgb, saliency, targets)
    assert not torch.allclose(ours_batched, ours_clean, rtol=0, atol=1e-6)


def test_quantus_road_on_normalised_inputs_agrees_at_noise_zero():
    """Quantus imputes in whatever units x_batch has (users pass normalised images), xbench in
    pixel space before the model normalises. Each row of the imputation system has weights
    summing to its diagonal, so a constant solves it and the solution commutes with a
    per-channel affine map: at noise 0 Quantus on normalised images with the bare network gives
    xbench's curves; only the noise's units differ (0.01 normalised = 0.01 std pixels)."""
    model, gray, rgb, saliency, targets = gray_case()

    class Bare(nn.Module):  # the handle's network without its normalisation, gray input
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x.expand(-1, 3, -1, -1))

    mean, std = model.loaded.mean[0], model.loaded.std[0]
    theirs, calls = quantus_road(Bare(model.net).eval(), (gray - mean) / std, saliency, targets,
                                 percentages=list(PERCENTAGES), noise=0.0)
    ours, _ = xbench_road(RoadMoRF(noise=0.0), model, rgb, saliency, targets)
    their_probs = torch.stack([logits.softmax(dim=1).gather(1, targets[:, None])[:, 0]
                               for _, logits in calls], dim=1)
    torch.testing.assert_close(ours, their_probs, rtol=0, atol=1e-6)


# -- faithfulness correlation --------------------------------------------------------------

def test_pearson_known_values_and_constant_rule():
    a = torch.tensor([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]])
    b = torch.tensor([[2.0, 4.0, 7.0], [0.0, 1.0, 2.0]])
    expected = np.corrcoef([1, 2, 3], [2, 4, 7])[0, 1]
    assert pearson(a, b).tolist() == pytest.approx([expected, 0.0])


def test_degenerate_map_scores_zero_and_subsets_are_distinct():
    model = toy_model()
    images = toy_images(2, seed=5)
    batch = batch_of(model, images, torch.zeros(2, 32, 32))
    assert FaithfulnessCorrelation(runs=5, subset_size=50).score(batch)[""].tolist() == [0, 0]
    subsets = random_subsets(5, 32 * 32, 50, 0)
    assert all(len(set(row.tolist())) == 50 for row in subsets)
    assert torch.equal(subsets, random_subsets(5, 32 * 32, 50, 0))


def test_faithful_map_of_a_logit_linear_model_correlates_nearly_perfectly():
    """Class 0's logit is w . x with x = 1 and small w, so a subset's probability drop is
    close to linear in sum_S w; the map w (per pixel) correlates > 0.99, a reversed map < 0."""
    generator = torch.Generator().manual_seed(6)
    weight = torch.rand(1, 1, 16, 16, generator=generator).expand(1, 3, 16, 16) * 0.01
    model = linear_handle(weight.clone())
    images = torch.ones(1, 3, 16, 16)
    map_ = weight[:, 0] / weight.max()
    good = FaithfulnessCorrelation(runs=30, subset_size=20).score(
        batch_of(model, images, map_, torch.tensor([0])))[""]
    bad = FaithfulnessCorrelation(runs=30, subset_size=20).score(
        batch_of(model, images, 1 - map_, torch.tensor([0])))[""]
    assert good.item() > 0.99 and bad.item() < 0


def test_faithfulness_correlation_agrees_with_quantus_on_the_same_subsets():
    """Quantus draws each run's subset among the channel entries of the map broadcast to the
    image (3 H W entries, np.random.choice) and blacks out those entries only: a deliberate
    difference, we draw pixels and black out all three channels. With numpy seeded, its draws
    replayed as pixels (entry mod H W) and a perturb_func blacking out whole pixels, both
    compute the same correlation (a pixel drawn in two channels counts twice in both)."""
    model = toy_model()
    images = toy_images(1, seed=7)
    saliency = torch.rand(1, 32, 32, generator=torch.Generator().manual_seed(8))
    batch = batch_of(model, images, saliency)
    runs, size = 12, 40
    np.random.seed(0)
    subsets = torch.as_tensor(np.stack([np.random.choice(3 * 32 * 32, size, replace=False)
                                        for _ in range(runs)]) % (32 * 32))

    def black_pixels(arr, indices, **kwargs):
        out = arr.reshape(arr.shape[0], 3, -1).copy()
        for row, index in enumerate(indices):
            out[row, :, np.asarray(index) % (32 * 32)] = 0.0
        return out.reshape(arr.shape)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        np.random.seed(0)
        theirs = quantus.FaithfulnessCorrelation(
            nr_runs=runs, subset_size=size, perturb_func=black_pixels, abs=False,
            normalise=False, return_aggregate=False, disable_warnings=True)(
            model=model.eval(), x_batch=images.numpy(), y_batch=batch.targets.numpy(),
            a_batch=saliency[:, None].numpy(), device="cpu", softmax=True)
    sums, drops = correlation_terms(batch, subsets)
    np.testing.assert_allclose(pearson(sums, drops).numpy(), np.asarray(theirs), atol=1e-5)


# -- infidelity ----------------------------------------------------------------------------

def test_infidelity_adapter_equals_calling_captum_directly():
    from captum.metrics import infidelity

    model = toy_model()
    images = toy_images(3, seed=9)
    saliency = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(10))
    batch = batch_of(model, images, saliency)
    ours = Infidelity(samples=6, noise_std=0.05, seed=3).score(batch)[""]
    noise = torch.randn((6, 3, 32, 32), generator=torch.Generator().manual_seed(3)) * 0.05

    def perturb(inputs):  # written out: captum repeats each image 6 times in a row
        tiled = noise.repeat(3, 1, 1, 1)
        return tiled, inputs - tiled

    direct = infidelity(lambda x: model.predict(x).float().softmax(dim=1), perturb, images,
                        saliency[:, None].expand_as(images), target=batch.targets,
                        n_perturb_samples=6, normalize=True)
    torch.testing.assert_close(ours, direct.float())
    # captum in chunks (max_examples_per_batch): the replayed noise keeps its order
    chunked = infidelity(forward_of(model, "probability"), noise_perturbation(noise, 3), images,
                         saliency[:, None].expand_as(images), target=batch.targets,
                         n_perturb_samples=6, max_examples_per_batch=6, normalize=True)
    torch.testing.assert_close(chunked.float(), direct.float(), rtol=1e-5, atol=1e-9)


def test_infidelity_is_zero_for_the_exact_map_of_a_linear_logit():
    """f = w . x (class 0's logit), Phi = w / max w (w >= 0 with min 0, so the harness's
    min-max map is exactly w up to scale): I . Phi = beta (f(x) - f(x - I)) for every I."""
    generator = torch.Generator().manual_seed(11)
    plane = torch.rand(1, 1, 16, 16, generator=generator)
    plane = plane - plane.min()
    model = linear_handle(plane.expand(1, 3, 16, 16).clone())
    images = torch.rand(2, 3, 16, 16, generator=generator)
    map_ = (plane[:, 0] / plane.max()).expand(2, 16, 16)
    exact = Infidelity(output="logit", samples=8).score(
        batch_of(model, images, map_, torch.tensor([0, 0])))[""]
    assert exact.abs().max().item() < 1e-6
    wrong = Infidelity(output="logit", samples=8).score(
        batch_of(model, images, 1 - map_, torch.tensor([0, 0])))[""]
    assert (wrong > 1e-3).all()


def test_quantus_infidelity_is_a_different_perturbation_but_also_zero_when_exact():
    """Quantus's Infidelity replaces square patches by a baseline instead of adding Gaussian
    noise (another perturbation distribution, so other numbers), but an exact map of a linear
    logit scores 0 there too."""
    generator = torch.Generator().manual_seed(12)
    plane = torch.rand(1, 1, 16, 16, generator=generator)
    plane = plane - plane.min()
    model = linear_handle(plane.expand(1, 3, 16, 16).clone())
    images = torch.rand(2, 3, 16, 16, generator=generator)
    map_ = (plane[:, 0] / plane.max()).expand(2, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = quantus.Infidelity(perturb_patch_sizes=[4], n_perturb_samples=4, abs=False,
                                    normalise=False, disable_warnings=True)(
            model=model.eval(), x_batch=images.numpy(), y_batch=np.zeros(2, dtype=int),
            a_batch=(map_ * plane.max())[:, None].expand(2, 3, 16, 16).numpy().copy(),
            device="cpu")
    assert np.abs(np.asarray(theirs)).max() < 1e-6
