"""RISE: seeded masks shared across images, mask statistics, and a linear toy model whose
pixel weights the saliency must rank correctly."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from xbench import LoadedModel, OptionError
from xbench.model import ClassifierHandle
from xbench.testing import toy_images, toy_model
from xbench_plugins.rise import RISE


def test_same_seed_gives_identical_maps_and_other_seeds_differ():
    model = toy_model()
    images = toy_images(2)
    targets = torch.tensor([0, 3])
    with torch.no_grad():
        a = RISE(n_masks=64, seed=7).explain(model, images, targets)
        b = RISE(n_masks=64, seed=7, batch_size=5).explain(model, images, targets)
        c = RISE(n_masks=64, seed=8).explain(model, images, targets)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)  # chunking does not matter
    assert torch.equal(a, RISE(n_masks=64, seed=7).explain(model, images, targets))
    assert not torch.allclose(a, c)


def test_masks_are_generated_once_and_shared():
    explainer = RISE(n_masks=20, seed=1)
    first = explainer.masks(0, 20, 32, 32, torch.device("cpu"))
    assert len(explainer._cache) == 1
    again = explainer.masks(5, 12, 32, 32, torch.device("cpu"))
    assert torch.equal(first[5:12], again)  # chunks are slices of the same N masks
    explainer.masks(0, 20, 40, 40, torch.device("cpu"))
    assert len(explainer._cache) == 2  # keyed by input size


def test_mask_statistics():
    """Soft masks in [0, 1], cells of ceil(H/s) px, mean ~ p1, shifts up to one cell."""
    explainer = RISE(n_masks=2000, s=4, p1=0.3, seed=0)
    masks = explainer.masks(0, 2000, 30, 30, torch.device("cpu"))
    assert masks.shape == (2000, 30, 30)
    assert masks.min() >= 0 and masks.max() <= 1 + 1e-6  # bilinear weights sum to 1 (+ rounding)
    assert abs(float(masks.mean()) - 0.3) < 0.01
    grids, rows, cols = explainer._random_part(30, 30, torch.device("cpu"))
    cell = math.ceil(30 / 4)
    assert rows.min() == 0 and rows.max() == cell - 1 and cols.max() == cell - 1
    assert set(grids.unique().tolist()) == {0.0, 1.0}
    # without a shift, the centre of cell (i, j) of the upsampled grid is the grid value
    unshifted = ((rows == 0) & (cols == 0)).nonzero()[0, 0]
    centre = cell // 2
    assert masks[unshifted, centre, centre] == grids[unshifted, 0, 0, 0]


class LinearLogit(nn.Module):
    """Two classes: logit_0 = sum(weight * x) over pixels, logit_1 = 0."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logit = (x * self.weight).flatten(1).sum(1)
        return torch.stack([logit, torch.zeros_like(logit)], dim=1)


def linear_model(levels: torch.Tensor, size: int, scale: float) -> ClassifierHandle:
    """LinearLogit whose per-pixel weight is ``scale * levels`` tiled over ``size`` px."""
    block = size // levels.shape[0]
    weight = (scale * levels).repeat_interleave(block, 0).repeat_interleave(block, 1)
    loaded = LoadedModel(module=LinearLogit(weight.expand(1, 3, size, size).clone()),
                         input_size=size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                         class_names=("a", "b"), default_layer="weight")
    return ClassifierHandle(loaded)


@pytest.mark.parametrize("seed", [0, 1])
def test_saliency_ranks_pixels_by_their_linear_weight(seed):
    """logit_0 = sum_pixels w * x with w in 4 levels laid out as a Latin square of 8x8 blocks
    (every level has neighbours of every other level, so no level profits from its place) and
    centred (mean logit 0, p_0 in sigmoid's near-linear range). Mean RISE saliency per level
    must follow the weights; for class 1 (logit 0, so p_1 = 1 - p_0) the order reverses."""
    latin = torch.tensor([[0, 1, 2, 3], [2, 3, 0, 1], [1, 0, 3, 2], [3, 2, 1, 0]]).float()
    model = linear_model(latin - 1.5, size=32, scale=0.01)
    pixel_level = latin.repeat_interleave(8, 0).repeat_interleave(8, 1)
    images = torch.ones(1, 3, 32, 32)
    explainer = RISE(n_masks=2000, s=8, seed=seed, batch_size=500)
    with torch.no_grad():
        maps = explainer.explain(model, images.repeat(2, 1, 1, 1), torch.tensor([0, 1]))
    for target, order in ((0, [0, 1, 2, 3]), (1, [3, 2, 1, 0])):
        per_level = torch.stack([maps[target][pixel_level == k].mean() for k in range(4)])
        assert per_level.argsort().tolist() == order, (target, per_level)


def test_constant_model_gives_the_mask_average_over_p1():
    """p_c = 0.5 for every input: S = 0.5 / (N p1) * sum_i M_i, checkable from the masks."""
    loaded = LoadedModel(module=LinearLogit(torch.zeros(1, 3, 12, 12)), input_size=12,
                         mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), class_names=("a", "b"),
                         default_layer="weight")
    explainer = RISE(n_masks=40, s=3, p1=0.5, seed=2)
    with torch.no_grad():
        saliency = explainer.explain(ClassifierHandle(loaded), torch.rand(1, 3, 12, 12),
                                     torch.tensor([0]))[0]
    masks = explainer.masks(0, 40, 12, 12, torch.device("cpu"))
    torch.testing.assert_close(saliency, 0.5 * masks.sum(0) / (40 * 0.5))


def test_variant_records_non_default_settings():
    assert RISE().variant == ""
    assert RISE(n_masks=500, p1=0.25).variant == "n_masks=500,p1=0.25"


@pytest.mark.parametrize("options, message", [
    ({"n_masks": 0}, "explainer 'rise': option n_masks must be >= 1, got 0"),
    ({"p1": 0.0}, "option p1 must be > 0 and <= 1, got 0"),
    ({"p1": 1.5}, "option p1 must be > 0 and <= 1, got 1.5"),
    ({"s": 0}, "option s must be >= 1, got 0"),
    ({"batch_size": 0}, "option batch_size must be >= 1, got 0"),
    ({"n_masks": "500"}, "option n_masks expects integer, got '500'"),
    ({"nmasks": 100}, "unknown option 'nmasks'. Did you mean 'n_masks'"),
])
def test_bad_options_are_explained(options, message):
    with pytest.raises(OptionError, match=message):
        RISE(**options)
