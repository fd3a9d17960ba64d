"""Known answers, invariances and a peer cross-check for the faithfulness metrics.

Toy models make every number computable by hand: ``RedMass`` answers p_0 = 0.1 + 0.8 * (mean
red pixel value) and p_1 = 1 - p_0, so masking, deleting or inserting pixels moves the target
probability by an amount that is a sum over the moved pixels.
"""

from __future__ import annotations

import contextlib
import math
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from xbench import LoadedModel, MetricBatch, OptionError
from xbench.model import ClassifierHandle
from xbench.saliency import descending_order, normalize_maps, retention_mask
from xbench_plugins.average_drop import AverageDrop, AverageIncrease, masked_probabilities
from xbench_plugins.insertion_deletion import (
    Deletion,
    Insertion,
    InsertionDeletion,
    auc,
    blurred,
    rise_kernel,
    step_counts,
)

MEAN = (0.25, 0.5, 0.75)  # deliberately not grey: the deletion substrate is this colour


class RedMass(nn.Module):
    """Two classes: p_0 = 0.1 + 0.8 * mean red pixel value (pixel space), p_1 = 1 - p_0."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Identity()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        red = self.body(z)[:, 0] + MEAN[0]  # std is 1: undo the handle's normalisation
        p0 = 0.1 + 0.8 * red.mean(dim=(1, 2))
        return torch.stack([p0.log(), (1 - p0).log()], dim=1)  # softmax gives back (p0, 1 - p0)


class TinyCNN(nn.Module):
    """A small random-weight convolutional classifier (5 classes) for curve checks."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.ReLU())
        self.head = nn.Linear(8, 5)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.5 * torch.randn(p.shape, generator=generator))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(z).mean(dim=(2, 3)))


def make_handle(module: nn.Module, size: int, classes: int) -> ClassifierHandle:
    loaded = LoadedModel(module=module, input_size=size, mean=MEAN, std=(1.0, 1.0, 1.0),
                         class_names=tuple(f"c{i}" for i in range(classes)), default_layer="body")
    return ClassifierHandle(loaded)


def make_batch(model: ClassifierHandle, images: torch.Tensor, saliency: torch.Tensor,
               targets: torch.Tensor | None = None) -> MetricBatch:
    probs = model.probabilities(images)
    if targets is None:
        targets = probs.argmax(dim=1)
    num = images.shape[0]
    zeros = torch.zeros(num)
    return MetricBatch(model=model, images=images, targets=targets, saliency=saliency,
                       degenerate=torch.zeros(num, dtype=torch.bool),
                       clean_probs=probs.gather(1, targets[:, None])[:, 0],
                       explain_forward=zeros, explain_backward=zeros, explain_seconds=zeros)


def bands(values: tuple[float, float, float, float]) -> torch.Tensor:
    """(8, 8) plane whose rows 0-1, 2-3, 4-5, 6-7 hold the four values."""
    return torch.tensor(values).repeat_interleave(2)[:, None].expand(8, 8).clone()


@pytest.fixture
def striped():
    """RedMass, one 8x8 image with red bands (1, .5, 0, .5), a map with a 32-pixel tie on top.

    Red pixel mass: 16*1 + 16*.5 + 0 + 16*.5 = 32 of 64, so p_0(x) = 0.1 + 0.8*0.5 = 0.5.
    Saliency bands (1, 1, .5, .25): rows 0-3 tie, the stable sort takes rows 0-1 first.
    """
    generator = torch.Generator().manual_seed(1)
    image = torch.rand(1, 3, 8, 8, generator=generator)  # green/blue: the model ignores them
    image[0, 0] = bands((1.0, 0.5, 0.0, 0.5))
    saliency = bands((1.0, 1.0, 0.5, 0.25))[None]
    return make_handle(RedMass(), 8, 2), image, saliency


def official_rise_gkern(klen: int = 11, nsig: float = 5.0) -> torch.Tensor:
    """The official RISE code's ``gkern``, written out as it is there: a unit impulse filtered
    by scipy's 2-D Gaussian filter; (3, 3, klen, klen) with the kernel on the diagonal."""
    from scipy.ndimage import gaussian_filter

    impulse = np.zeros((klen, klen))
    impulse[klen // 2, klen // 2] = 1
    k = gaussian_filter(impulse, nsig)
    kern = np.zeros((3, 3, klen, klen), np.float32)
    for c in range(3):
        kern[c, c] = k
    return torch.from_numpy(kern)


def reference_blur(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """The official RISE blur in pixel space: ``conv2d(normalised image, gkern(11, 5),
    padding=5)`` (zero padding of the normalised image), mapped back to pixels."""
    normalised = (images - mean) / std
    return F.conv2d(normalised, official_rise_gkern(), padding=5) * std + mean


def reference_reflect_blur(images: torch.Tensor) -> torch.Tensor:
    """The same kernel with reflection padding, written out."""
    padded = F.pad(images, (5, 5, 5, 5), mode="reflect")
    return F.conv2d(padded, official_rise_gkern())


def explicit_step_image(start: torch.Tensor, finish: torch.Tensor, saliency: torch.Tensor,
                        moved: int) -> torch.Tensor:
    """``start`` with its ``moved`` most salient pixels copied from ``finish``, built pixel by
    pixel; Python's sort is stable, so equal saliency keeps raster order (docs/protocol.md)."""
    height, width = saliency.shape
    values = saliency.flatten().tolist()
    order = sorted(range(height * width), key=lambda i: -values[i])
    out = start.clone()
    for index in order[:moved]:
        row, col = divmod(index, width)
        out[:, row, col] = finish[:, row, col]
    return out


# --------------------------------------------------------------------------------------------
# Insertion / deletion


def test_deletion_curve_and_auc_by_hand(striped):
    model, image, saliency = striped
    batch = make_batch(model, image, saliency, targets=torch.tensor([0]))
    score = Deletion(step=16).score(batch)
    # Each step replaces 16 pixels (two rows) by the substrate, red 0.25 (16 pixels: mass 4):
    #   k=0 red mass 16 + 8 + 0 + 8 = 32 -> mean .5    -> p = .5
    #   k=1 rows 0-1:  4 + 8 + 0 + 8 = 20 -> .3125      -> .35  (rows 2-3 first would give .45)
    #   k=2 rows 0-3:  4 + 4 + 0 + 8 = 16 -> .25        -> .30
    #   k=3 rows 0-5:  4 + 4 + 4 + 8 = 20 -> .3125      -> .35
    #   k=4 all:       16               -> .25          -> .30
    expected = torch.tensor([[0.5, 0.35, 0.3, 0.35, 0.3]], dtype=torch.float64)
    torch.testing.assert_close(batch.curves[("deletion", "step=16")], expected, atol=1e-6, rtol=0)
    # AUC = (sum - (first + last) / 2) / n = (1.8 - 0.4) / 4
    assert set(score) == {"step=16"}
    assert score["step=16"].item() == pytest.approx(0.35, abs=1e-6)


def test_insertion_curve_matches_explicit_blur_and_pixel_mass(striped):
    model, image, saliency = striped
    batch = make_batch(model, image, saliency, targets=torch.tensor([1]))
    insertion = Insertion(step=16).score(batch)["step=16"]
    blur = reference_blur(image, model.mean, model.std)[0]
    expected = []
    for moved in (0, 16, 32, 48, 64):
        red = explicit_step_image(blur, image[0], saliency[0], moved)[0]
        expected.append(1 - (0.1 + 0.8 * red.mean().item()))  # target class 1
    curve = batch.curves[("insertion", "step=16")][0]
    torch.testing.assert_close(curve, torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0)
    assert curve[-1].item() == pytest.approx(0.5, abs=1e-6)  # the image itself: 1 - 0.5
    hand_auc = (sum(expected) - (expected[0] + expected[-1]) / 2) / 4
    assert insertion.item() == pytest.approx(hand_auc, abs=1e-6)


def test_blur_is_the_official_rise_blur_with_its_zero_padding():
    images = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor((0.2, 0.3, 0.4)).view(1, 3, 1, 1)
    torch.testing.assert_close(blurred(images, mean), reference_blur(images, mean, std),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(blurred(images, mean, "reflect"), reference_reflect_blur(images),
                               atol=1e-6, rtol=0)
    # a constant image of the mean colour stays itself with mean padding (no dark border) ...
    flat = mean.expand(1, 3, 12, 12)
    torch.testing.assert_close(blurred(flat, mean), flat, atol=1e-6, rtol=0)
    # ... and so does any constant image with reflection, while mean padding pulls the border
    white = torch.ones(1, 3, 12, 12)
    torch.testing.assert_close(blurred(white, mean, "reflect"), white, atol=1e-6, rtol=0)
    assert (blurred(white, mean)[0, 0, 0, 0] < 1 - 0.1).item()


def test_rise_kernel_sums_to_one_and_is_flatter_than_a_truncated_gaussian():
    kernel = rise_kernel()
    assert kernel.shape == (11, 11) and kernel.sum().item() == pytest.approx(1.0, abs=1e-6)
    d = torch.arange(-5, 6, dtype=torch.float64)
    w = torch.exp(-(d ** 2) / 50)
    truncated = torch.outer(w, w) / torch.outer(w, w).sum()
    assert kernel.max().item() < truncated.max().item() - 1e-3  # 0.0088 against 0.0120


def test_blur_padding_is_an_option_recorded_in_the_variant(tiny):
    model, images, saliency = tiny
    batch = make_batch(model, images, saliency)
    default = Insertion(step=10).score(batch)
    reflect = Insertion(step=10, blur_padding="reflect").score(batch)
    assert set(default) == {"step=10"} and set(reflect) == {"step=10,blur_padding=reflect"}
    assert not torch.equal(default["step=10"], reflect["step=10,blur_padding=reflect"])
    with pytest.raises(OptionError, match="metric 'insertion': option blur_padding must be one of "
                                          "mean, reflect, got zeros"):
        Insertion(blur_padding="zeros")


@pytest.fixture
def tiny():
    """TinyCNN, three 12x12 images, maps quantised to 4 levels (many ties), step 10 (n = 15,
    the last step moves only 4 of the 144 pixels)."""
    generator = torch.Generator().manual_seed(3)
    images = torch.rand(3, 3, 12, 12, generator=generator)
    raw = torch.rand(3, 12, 12, generator=generator)
    saliency = torch.floor(raw * 4) / 3
    return make_handle(TinyCNN(), 12, 5), images, saliency


def test_curve_points_are_probabilities_of_explicit_step_images(tiny):
    model, images, saliency = tiny
    batch = make_batch(model, images, saliency)
    Insertion(step=10).score(batch)
    deletion = batch.curves[("deletion", "step=10")]
    insertion = batch.curves[("insertion", "step=10")]
    assert deletion.shape == insertion.shape == (3, 16)
    blur = blurred(images, model.mean)  # the official blur: test_blur_is_the_official_rise_blur_...
    grey = torch.tensor(MEAN).view(3, 1, 1).expand(3, 12, 12)
    for i in range(3):
        c = batch.targets[i]
        deleted = [explicit_step_image(images[i], grey, saliency[i], min(10 * k, 144))
                   for k in range(16)]
        inserted = [explicit_step_image(blur[i], images[i], saliency[i], min(10 * k, 144))
                    for k in range(16)]
        p_del = model.probabilities(torch.stack(deleted))[:, c].double()
        p_ins = model.probabilities(torch.stack(inserted))[:, c].double()
        torch.testing.assert_close(deletion[i], p_del, atol=1e-6, rtol=0)
        torch.testing.assert_close(insertion[i], p_ins, atol=1e-6, rtol=0)
        # first and last points: the image and the substrate, the blur and the image
        clean = batch.clean_probs[i].item()
        assert deletion[i, 0].item() == pytest.approx(clean, abs=1e-6)
        assert insertion[i, -1].item() == pytest.approx(clean, abs=1e-6)
        substrate = model.probabilities(grey[None])[0, c].item()
        assert deletion[i, -1].item() == pytest.approx(substrate, abs=1e-6)
        assert insertion[i, 0].item() == pytest.approx(
            model.probabilities(blur[i:i + 1])[0, c].item(), abs=1e-6)


def test_three_metrics_share_one_set_of_forward_passes(tiny):
    model, images, saliency = tiny
    batch = make_batch(model, images, saliency)
    with model.counting() as first:
        ins = Insertion(step=10).score(batch)["step=10"]
    with model.counting() as rest:
        dele = Deletion(step=10).score(batch)["step=10"]
        both = InsertionDeletion(step=10).score(batch)["step=10"]
    assert first["forward"] == 3 * 2 * (15 + 1)  # docs/protocol.md cost: steps + 1 per metric
    assert rest["forward"] == 0
    assert set(batch.curves) == {("insertion", "step=10"), ("deletion", "step=10")}
    torch.testing.assert_close(both, ins - dele, atol=0, rtol=0)
    torch.testing.assert_close(ins, auc(batch.curves[("insertion", "step=10")]))


def test_default_step_is_the_image_width(tiny):
    model, images, saliency = tiny
    batch = make_batch(model, images, saliency)
    score = Deletion().score(batch)
    assert set(score) == {"step=12"}
    assert batch.curves[("deletion", "step=12")].shape == (3, 13)


def test_step_counts_and_auc_by_hand():
    assert step_counts(50176, 224).tolist() == [224 * k for k in range(225)]
    assert step_counts(10, 4).tolist() == [0, 4, 8, 10]
    # trapezoid on [0, 1] with 2 steps: (0 + 1)/2 * .5 + (1 + .5)/2 * .5 = .625
    assert auc(torch.tensor([0.0, 1.0, 0.5])).item() == pytest.approx(0.625)
    assert auc(torch.ones(2, 7)).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="at least two points"):
        auc(torch.ones(1, 1))


def test_degenerate_all_zero_map_moves_pixels_in_raster_order(striped):
    model, image, _ = striped
    batch = make_batch(model, image, torch.zeros(1, 8, 8), targets=torch.tensor([0]))
    Deletion(step=16).score(batch)
    # raster order = rows 0-1, 2-3, 4-5, 6-7: the same curve as the banded map by hand
    expected = torch.tensor([[0.5, 0.35, 0.3, 0.35, 0.3]], dtype=torch.float64)
    torch.testing.assert_close(batch.curves[("deletion", "step=16")], expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("options, message", [
    ({"step": 0}, "metric 'insertion': option step must be >= 1, got 0"),
    ({"step": 2.5}, "metric 'insertion': option step expects integer or none, got 2.5"),
    ({"batch_size": 0}, "metric 'insertion': option batch_size must be >= 1, got 0"),
    ({"batch_size": True}, "metric 'insertion': option batch_size expects integer or none, got True"),
])
def test_bad_options_name_the_option(options, message):
    with pytest.raises(OptionError, match=message):
        Insertion(**options)


def test_default_batch_size_depends_on_the_device():
    from xbench_plugins.insertion_deletion import default_batch_size

    assert Insertion().options.batch_size is None
    assert default_batch_size(torch.device("cpu")) == 8
    assert default_batch_size(torch.device("cuda", 0)) == 64


def test_unknown_option_is_rejected():
    with pytest.raises(OptionError, match="metric 'deletion': unknown option 'steps'. Did you mean "
                                          "'step'.* Valid options: step, blur_padding, batch_size"):
        Deletion(steps=3)


# --------------------------------------------------------------------------------------------
# Average Drop / Average Increase


def _retention_scores(batch, masking="continuous"):
    drop = AverageDrop(masking=masking).score(batch)
    increase = AverageIncrease(masking=masking).score(batch)
    return drop, increase


def test_average_drop_by_hand(striped):
    model, image, _ = striped
    # map bands (1, 1, .5, .25) over red bands (1, .5, 0, .5); Y = p_0(x) = .5
    saliency = bands((1.0, 1.0, 0.5, 0.25))[None]
    batch = make_batch(model, image, saliency, targets=torch.tensor([0]))
    drop, increase = _retention_scores(batch)
    # r=100%: red mass of x*S = 16 + 8 + 0 + 16*.125 = 26 -> O = .1 + .8*26/64 = .425
    # r=50%: top 32 pixels = rows 0-3 (weight 1): mass 24 -> O = .4
    # r=15%: ceil(9.6) = 10 pixels = row 0 and the first 2 of row 1 (ties: raster order),
    #        red 1 each: mass 10 -> O = .225
    expected = {"r=100%": 100 * 0.075 / 0.5, "r=50%": 100 * 0.1 / 0.5, "r=15%": 100 * 0.275 / 0.5}
    assert set(drop) == set(expected)
    for variant, value in expected.items():
        assert drop[variant].item() == pytest.approx(value, abs=1e-4)
        assert increase[variant].item() == 0.0


def test_average_increase_when_masking_raises_confidence(striped):
    model, image, saliency = striped
    # target class 1: p_1 = .9 - .8 * red mean rises when red is masked away: O > Y = .5
    batch = make_batch(model, image, saliency, targets=torch.tensor([1]))
    drop, increase = _retention_scores(batch)
    for variant in ("r=100%", "r=50%", "r=15%"):
        assert drop[variant].item() == 0.0
        assert increase[variant].item() == 100.0


def test_binary_masking_by_hand(striped):
    model, image, saliency = striped
    batch = make_batch(model, image, saliency, targets=torch.tensor([0]))
    drop, increase = _retention_scores(batch, masking="binary")
    # r=100% binary keeps the image: O = Y exactly, so no drop and no (strict) increase;
    # r=50% and 15% keep the same pixels with weight 1 as the continuous map above
    assert drop["r=100%,binary"].item() == 0.0
    assert increase["r=100%,binary"].item() == 0.0
    assert drop["r=50%,binary"].item() == pytest.approx(100 * (0.5 - 0.1 - 0.8 * 24 / 64) / 0.5, abs=1e-4)
    assert drop["r=15%,binary"].item() == pytest.approx(100 * (0.5 - 0.1 - 0.8 * 10 / 64) / 0.5, abs=1e-4)


def test_average_drop_counts_one_forward_per_retention_level(tiny):
    model, images, saliency = tiny
    batch = make_batch(model, images, saliency)
    with model.counting() as counts:
        _retention_scores(batch)
    assert counts["forward"] == 3 * 3


def test_binary_full_retention_reuses_the_clean_probability(tiny):
    # r=100% binary is the unchanged image: O must be Y itself (no forward whose batch
    # composition could add float noise and flip O > Y), so AD = AI = 0 exactly
    model, images, saliency = tiny
    batch = make_batch(model, images, saliency)
    batch.clean_probs = batch.clean_probs + 1e-7  # what another batch composition may give
    with model.counting() as counts:
        drop = AverageDrop(retentions=(1.0, 0.5), masking="binary").score(batch)
        increase = AverageIncrease(retentions=(1.0, 0.5), masking="binary").score(batch)
    assert counts["forward"] == images.shape[0]  # r=50% only
    assert torch.equal(drop["r=100%,binary"], torch.zeros(images.shape[0]))
    assert torch.equal(increase["r=100%,binary"], torch.zeros(images.shape[0]))


# --------------------------------------------------------------------------------------------
# Invariances


def _all_scores(model, images, saliency, batch_size=64):
    batch = make_batch(model, images, saliency)
    out = {}
    for metric in (AverageDrop(), AverageIncrease(), AverageDrop(masking="binary"),
                   Insertion(step=10, batch_size=batch_size), Deletion(step=10, batch_size=batch_size),
                   InsertionDeletion(step=10, batch_size=batch_size)):
        for variant, values in metric.score(batch).items():
            out[(metric.name, variant)] = values
    for key, curve in batch.curves.items():
        out[("curve",) + key] = curve
    return out


def _assert_close(key, actual, expected):
    """Equal to float32 rounding of the model's forward. Average Drop is in percent and has a
    kink at O = Y (binary r=100% keeps the image, so there O = Y up to rounding): 1e-4 %."""
    atol = 1e-4 if key[0].startswith("average-") else 1e-6
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=atol)


def _assert_identical(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("factor", [4.0, 0.125, 2.0 ** 20])
def test_scaling_the_raw_map_changes_no_score(tiny, factor):
    # powers of two scale floats exactly, so the normalised maps are bit-identical
    model, images, _ = tiny
    raw = torch.rand(3, 3, 3, generator=torch.Generator().manual_seed(4))
    maps, _ = normalize_maps(raw, (12, 12))
    scaled, _ = normalize_maps(raw * factor, (12, 12))
    _assert_identical(_all_scores(model, images, maps), _all_scores(model, images, scaled))


@pytest.mark.parametrize("factor", [0.37, 1000.0, 3.0])
def test_scaling_by_any_positive_constant_keeps_the_ranking(tiny, factor):
    # Any other factor changes the normalised map by float rounding (~1e-7), which can flip
    # near-ties; on maps without near-ties the ranking metrics are identical and the
    # continuous-weight ones agree to float precision.
    model, images, _ = tiny
    raw = torch.randperm(3 * 144, generator=torch.Generator().manual_seed(5)).view(3, 12, 12)
    maps, _ = normalize_maps(raw.double() / 64, (12, 12))
    scaled, _ = normalize_maps(raw.double() * factor / 64, (12, 12))
    plain, times = _all_scores(model, images, maps), _all_scores(model, images, scaled)
    assert plain.keys() == times.keys()
    for key in plain:
        continuous_weights = key[0].startswith("average-") and "binary" not in key[1]
        if continuous_weights:
            _assert_close(key, plain[key], times[key])
        else:
            assert torch.equal(plain[key], times[key]), key


def test_batch_size_and_repetition_change_no_number(striped, tiny):
    # Exact on the toy model: chunking the step images never changes which pixels move.
    model, image, saliency = striped
    images = torch.cat([image, image.flip(-1), image.flip(-2)])
    maps = torch.cat([saliency, saliency.flip(-2), saliency.transpose(-1, -2)])
    reference = _all_scores(model, images, maps, batch_size=64)
    for batch_size in (1, 7, 96, 64):  # 64 again: a repeated run is identical
        _assert_identical(reference, _all_scores(model, images, maps, batch_size=batch_size))
    # A CNN's float32 result on CPU depends on the batch size by rounding (the convolution
    # kernels block the batch differently): equal to float precision, not bit for bit.
    model, images, saliency = tiny
    reference = _all_scores(model, images, saliency, batch_size=64)
    for batch_size in (1, 7, 64):
        other = _all_scores(model, images, saliency, batch_size=batch_size)
        for key in reference:
            _assert_close(key, other[key], reference[key])
    again = _all_scores(model, images, saliency, batch_size=64)
    _assert_identical(reference, again)
    one = masked_probabilities(make_batch(model, images, saliency), (1.0, 0.5, 0.15), "continuous", chunk=1)
    many = masked_probabilities(make_batch(model, images, saliency), (1.0, 0.5, 0.15), "continuous", chunk=64)
    for r in one:
        torch.testing.assert_close(one[r], many[r], atol=1e-6, rtol=0)


def test_images_scored_alone_or_together_agree(tiny):
    model, images, saliency = tiny
    together = _all_scores(model, images, saliency)
    for i in range(3):
        alone = _all_scores(model, images[i:i + 1], saliency[i:i + 1])
        for key in together:
            _assert_close(key, alone[key], together[key][i:i + 1])


# --------------------------------------------------------------------------------------------
# Saliency post-processing


def test_normalize_maps_upsamples_bilinear_and_min_maxes():
    maps = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]])
    out, degenerate = normalize_maps(maps, (4, 4))
    # align_corners=False: each axis samples [a, .75a + .25b, .25a + .75b, b]
    t = torch.tensor([0.0, 0.25, 0.75, 1.0])
    expected = (2 * t[:, None] + t[None, :]) / 3
    torch.testing.assert_close(out[0], expected)
    assert degenerate.tolist() == [False]


def test_normalize_maps_flags_degenerate_maps_and_zeroes_them():
    good = torch.arange(9.0).view(3, 3)
    nan = good.clone()
    nan[1, 1] = float("nan")
    pos_inf = good.clone()
    pos_inf[0, 2] = float("inf")
    neg_inf = good.clone()
    neg_inf[2, 0] = float("-inf")
    maps = torch.stack([good, torch.zeros(3, 3), torch.full((3, 3), 7.0), nan, pos_inf, neg_inf])
    out, degenerate = normalize_maps(maps, (3, 3))
    assert degenerate.tolist() == [False, True, True, True, True, True]
    assert torch.equal(out[1:], torch.zeros(5, 3, 3))
    torch.testing.assert_close(out[0], good / 8)


def test_normalize_maps_rejects_wrong_shape():
    with pytest.raises(ValueError, match=r"\(B, h, w\)"):
        normalize_maps(torch.zeros(3, 3), (3, 3))


def test_descending_order_is_stable():
    maps = torch.tensor([[[0.5, 1.0, 0.5], [0.2, 0.5, 0.0]]])
    assert descending_order(maps).tolist() == [[1, 0, 2, 4, 3, 5]]


def test_retention_mask_by_hand_with_ties():
    maps = torch.tensor([[[0.5, 1.0, 0.5], [0.2, 0.5, 0.0]]])
    # r=50%: ceil(3) pixels: 1.0, then the first two of the three .5 ties in raster order
    assert retention_mask(maps, 0.5).tolist() == [[[0.5, 1.0, 0.5], [0.0, 0.0, 0.0]]]
    assert retention_mask(maps, 0.5, binary=True).tolist() == [[[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]]
    # r=15%: ceil(0.9) = 1 pixel
    assert retention_mask(maps, 0.15).tolist() == [[[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]]
    assert torch.equal(retention_mask(maps, 1.0), maps)
    # the binary mask at 100% keeps every pixel, zero-saliency ones included
    assert torch.equal(retention_mask(maps, 1.0, binary=True), torch.ones_like(maps))
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="retention must be in"):
            retention_mask(maps, bad)


# --------------------------------------------------------------------------------------------
# Cross-check against torchcam (test-only peer)


class FixedMaps:
    """The part of a torchcam CAM extractor its metrics use, returning maps we choose."""

    def __init__(self, model: nn.Module, maps: torch.Tensor) -> None:
        self.model = model
        self.maps = maps

    def __call__(self, class_idx=None, scores=None, normalized=True, **kwargs):
        return [self.maps]

    def fuse_cams(self, cams):
        return cams[0]

    @contextlib.contextmanager
    def _hooks_off(self):
        yield


def test_average_drop_and_increase_agree_with_torchcam(tiny):
    metrics = pytest.importorskip("torchcam.metrics")
    model, images, saliency = tiny
    batch = make_batch(model, images, saliency)
    drop, increase = _retention_scores(batch)
    # torchcam's ClassificationMetric is the r=100% continuous variant (E = x * S in the space
    # the model takes: pixel space for our handle) with softmax scoring when logits_fn is
    # softmax. Differences in definition: it reports fractions, not percent, and divides by
    # Y + 1e-7 instead of Y, hence the relative tolerance.
    peer = metrics.ClassificationMetric(FixedMaps(model, saliency), partial(torch.softmax, dim=-1))
    peer.update(images, class_idx=batch.targets.tolist())
    summary = peer.summary()
    assert 100 * summary["avg_drop"] == pytest.approx(drop["r=100%"].mean().item(), rel=1e-5)
    assert 100 * summary["conf_increase"] == pytest.approx(increase["r=100%"].mean().item(), abs=1e-9)


def test_insertion_deletion_agree_with_torchcam(tiny):
    metrics = pytest.importorskip("torchcam.metrics")
    if not hasattr(metrics, "DeletionInsertionMetric"):
        pytest.skip("this torchcam has no DeletionInsertionMetric")
    model, images, saliency = tiny
    batch = make_batch(model, images, saliency)
    deletion = Deletion(step=12).score(batch)["step=12"]
    insertion = Insertion(step=12).score(batch)["step=12"]
    softmax = partial(torch.softmax, dim=-1)
    targets = batch.targets.tolist()
    # torchcam uses one baseline for both curves: deletion replaces pixels by it, insertion
    # starts from it. With the mean colour it is our deletion; with the blurred image, our
    # insertion. 12 steps of 12 pixels divide 144 exactly, so its trapezoid over the actual
    # perturbed fractions equals docs/protocol.md's (sum - ends/2)/n.
    grey = torch.tensor(MEAN).view(1, 3, 1, 1)
    peer = metrics.DeletionInsertionMetric(FixedMaps(model, saliency), softmax, steps=12, baseline=grey)
    peer.update(images, class_idx=targets)
    assert peer.summary()["deletion_auc"] == pytest.approx(deletion.mean().item(), abs=1e-6)
    peer = metrics.DeletionInsertionMetric(FixedMaps(model, saliency), softmax, steps=12,
                                           baseline=partial(blurred, mean=model.mean))
    peer.update(images, class_idx=targets)
    assert peer.summary()["insertion_auc"] == pytest.approx(insertion.mean().item(), abs=1e-6)


def test_torchcam_differs_only_in_the_short_last_step(tiny):
    metrics = pytest.importorskip("torchcam.metrics")
    if not hasattr(metrics, "DeletionInsertionMetric"):
        pytest.skip("this torchcam has no DeletionInsertionMetric")
    model, images, saliency = tiny
    batch = make_batch(model, images, saliency)
    ours = Deletion(step=10).score(batch)["step=10"]
    curve = batch.curves[("deletion", "step=10")]
    # step 10 on 144 pixels: 15 steps, the last moves 4 pixels. RISE and docs/protocol.md weight all
    # steps equally; torchcam integrates over the actual fraction of pixels moved.
    fractions = step_counts(144, 10).double() / 144
    grey = torch.tensor(MEAN).view(1, 3, 1, 1)
    peer = metrics.DeletionInsertionMetric(FixedMaps(model, saliency), partial(torch.softmax, dim=-1),
                                           steps=15, baseline=grey)
    peer.update(images, class_idx=batch.targets.tolist())
    theirs = peer.summary()["deletion_auc"]
    assert theirs == pytest.approx(torch.trapezoid(curve, fractions, dim=1).mean().item(), abs=1e-6)
    assert abs(theirs - ours.mean().item()) > 1e-4
    assert math.isclose(auc(curve).mean().item(), ours.mean().item(), abs_tol=1e-12)


def test_quick_profile_shares_one_coarse_step():
    from xbench.profiles import plugin_options

    options = [plugin_options("quick", cls) for cls in (Insertion, Deletion, InsertionDeletion)]
    assert options[0] == options[1] == options[2]  # one step: one set of curves per batch
    steps = len(step_counts(224 * 224, options[0]["step"])) - 1
    assert 16 <= steps <= 32
    Insertion(**options[0])  # valid options
    assert plugin_options("paper", Insertion) == {}  # the paper profile keeps 224 steps
