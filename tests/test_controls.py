"""Control explainers (plugins/controls.py): known answers, seeding, 0 passes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from xbench.plugins import build_registry
from xbench.testing import check_explainer, toy_images, toy_model
from xbench_plugins.controls import CentreGaussian, RandomControl, SobelControl, image_seed

REGISTRY = build_registry()


def _explain(cls, images, seed=0, **options):
    return cls(seed=seed, **options).explain(toy_model(), images, torch.zeros(len(images),
                                                                                dtype=torch.long))


def test_controls_are_registered_and_selected_by_all():
    assert {"random", "centre-gaussian", "sobel"} <= set(REGISTRY.select("explainer", "all"))
    for name in ("random", "centre-gaussian", "sobel"):
        assert REGISTRY.explainer(name).library == "xbench"


@pytest.mark.parametrize("cls, options", [
    (RandomControl, {}), (CentreGaussian, {}), (CentreGaussian, {"sigma": 0.1}),
    (SobelControl, {}), (SobelControl, {"channels": "max"}),
])
def test_controls_conform_and_spend_no_passes(cls, options):
    check_explainer(cls, options=options)
    model = toy_model()
    with model.counting() as counts:
        cls(**options).explain(model, toy_images(3), torch.tensor([0, 1, 2]))
    assert counts == {"forward": 0, "backward": 0}


def test_random_is_uniform_seeded_and_differs_per_image_and_seed():
    images = toy_images(2, size=64)
    maps = _explain(RandomControl, images)
    assert maps.shape == (2, 64, 64)
    assert 0 <= maps.min() and maps.max() < 1
    assert abs(maps.mean().item() - 0.5) < 0.02  # U[0,1): mean 1/2, sd of the mean ~0.0045
    assert abs(maps.var().item() - 1 / 12) < 0.005
    assert not torch.equal(maps[0], maps[1])  # each image its own noise
    assert torch.equal(maps, _explain(RandomControl, images))
    assert not torch.equal(maps, _explain(RandomControl, images, seed=1))
    # the same picture gives the same map wherever it sits in the batch
    assert torch.equal(_explain(RandomControl, images.flip(0)), maps.flip(0))
    generator = torch.Generator().manual_seed(image_seed(0, images[1]))
    assert torch.equal(maps[1], torch.rand(64, 64, generator=generator))


def test_image_seed_ignores_float_noise_below_8_bits():
    image = (toy_images(1)[0] * 255).round() / 255  # a decoded 8-bit photo
    assert image_seed(0, image) == image_seed(0, image + 1e-6 * (image < 0.5))
    assert image_seed(0, image) != image_seed(0, image.flip(-1))
    assert image_seed(0, image) != image_seed(1, image)


def test_centre_gaussian_known_values():
    images = torch.zeros(2, 3, 41, 61)
    maps = _explain(CentreGaussian, images, sigma=0.25)
    sigma = 0.25 * 41
    assert maps.shape == (2, 41, 61)
    assert maps[0, 20, 30] == pytest.approx(1.0)  # the centre, (H-1)/2, (W-1)/2
    assert maps.argmax().item() == 20 * 61 + 30
    assert maps[0, 20, 40] == pytest.approx(math.exp(-100 / (2 * sigma ** 2)), rel=1e-5)
    assert maps[0, 0, 0] == pytest.approx(math.exp(-(400 + 900) / (2 * sigma ** 2)), rel=1e-5)
    assert torch.equal(maps[0], maps[1])
    assert torch.allclose(maps[0], maps[0].flip(0)) and torch.allclose(maps[0], maps[0].flip(1))


def test_centre_gaussian_of_an_even_side_peaks_between_pixels():
    maps = _explain(CentreGaussian, torch.zeros(1, 3, 4, 4), sigma=0.5)
    # centre (1.5, 1.5): the four middle pixels are at squared distance 0.5, sigma = 2
    assert torch.allclose(maps[0, 1:3, 1:3], torch.full((2, 2), math.exp(-0.5 / 8)))


def test_sobel_agrees_with_scipy_ndimage():
    images = toy_images(2, size=24)
    luma = (images * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1).numpy()
    expected = np.stack([np.hypot(ndimage.sobel(g, axis=0), ndimage.sobel(g, axis=1))
                         for g in luma.astype(np.float64)])
    maps = _explain(SobelControl, images)
    assert np.allclose(maps.numpy(), expected, atol=1e-5)
    planes = images.numpy().astype(np.float64)  # scipy smooths along every other axis: 2-D only
    per_channel = np.array([[np.hypot(ndimage.sobel(p, axis=0), ndimage.sobel(p, axis=1))
                             for p in image] for image in planes]).max(axis=1)
    assert np.allclose(_explain(SobelControl, images, channels="max").numpy(), per_channel,
                       atol=1e-5)


def test_sobel_of_a_vertical_step_edge_by_hand():
    image = torch.zeros(1, 3, 6, 6)
    image[..., 3:] = 1.0  # a step between columns 2 and 3
    maps = _explain(SobelControl, image)
    # G_x = (1 + 2 + 1) x (1 - 0) = 4 on both sides of the edge, 0 elsewhere; G_y = 0
    assert torch.allclose(maps[0, :, 2:4], torch.full((6, 2), 4.0))
    assert maps[0, :, :2].abs().max() == 0 and maps[0, :, 4:].abs().max() == 0
    flat = _explain(SobelControl, torch.full((1, 3, 6, 6), 0.7))
    assert flat.abs().max() < 1e-5


def test_bad_options_name_the_plugin():
    with pytest.raises(ValueError, match="centre-gaussian.*sigma"):
        CentreGaussian(sigma=0.0)
    with pytest.raises(ValueError, match="sobel.*channels.*luma"):
        SobelControl(channels="sum")


def test_xbench_plugins_says_which_library_each_explainer_comes_from(capsys, monkeypatch):
    import json

    from xbench.cli import main

    monkeypatch.setenv("COLUMNS", "200")
    assert main(["plugins", "--kind", "explainer"]) == 0
    rows = {line.split("│")[1].strip(): line.split("│")[3].strip()
            for line in capsys.readouterr().out.splitlines() if line.count("│") > 4}
    assert rows["saliency"] == "captum" and rows["occlusion"] == "captum"
    assert rows["sobel"] == "xbench" and rows["gradcam"] == "xbench"
    assert main(["plugins", "--json", "--kind", "explainer"]) == 0
    listed = {p["name"]: p["library"] for p in json.loads(capsys.readouterr().out)["plugins"]}
    assert listed["lime"] == "captum" and listed["eigencam"] == "xbench"
