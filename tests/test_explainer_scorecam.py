"""Score-CAM against a direct, unbatched transcription of the official definition; skipped
constant channels counted exactly; options and their errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from xbench import OptionError
from xbench.model import ClassifierHandle, capture_activations
from xbench.saliency import normalize_maps
from xbench.testing import toy_images, toy_model
from xbench_plugins.scorecam import ScoreCAM


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


def official_scorecam(model: ClassifierHandle, layer: str, image: torch.Tensor,
                      target: int) -> tuple[torch.Tensor, int]:
    """The official loop (haofanwang/Score-CAM cam/scorecam.py), one channel per forward, in
    pixel space: returns (ReLU(sum_k w_k U_k), number of skipped constant channels)."""
    x = image[None]
    h, w = x.shape[-2:]
    with torch.no_grad(), capture_activations(model.layer(layer), keep_grad=False) as store:
        model(x)
    activations = store["activation"]
    total = torch.zeros(1, 1, h, w)
    skipped = 0
    with torch.no_grad():
        for k in range(activations.shape[1]):
            up = F.interpolate(activations[:, k:k + 1], size=(h, w), mode="bilinear",
                               align_corners=False)
            if up.max() == up.min():
                skipped += 1
                continue
            norm = (up - up.min()) / (up.max() - up.min())
            score = F.softmax(model(x * norm), dim=1)[0, target]
            total += score * up
    return F.relu(total)[0, 0], skipped


@pytest.mark.parametrize("layer", ["head", "block.0", "stem"])
def test_matches_the_official_definition(layer):
    model = toy_model()
    images = toy_images(2, seed=3)
    targets = model.probabilities(images).argmax(dim=1)
    with torch.no_grad():
        maps = ScoreCAM(layer=layer, batch_size=6).explain(model, images, targets)
    assert maps.shape == (2, 32, 32)
    for i in range(2):
        reference, _ = official_scorecam(model, layer, images[i], int(targets[i]))
        assert pearson(maps[i], reference) >= 0.999
        torch.testing.assert_close(maps[i], reference, rtol=1e-4, atol=1e-6)


def dead_channel_model(dead: list[int]) -> ClassifierHandle:
    """Toy CNN whose 'head' conv outputs a constant (its bias) on the channels in ``dead``."""
    model = toy_model(seed=1)
    with torch.no_grad():
        model.net.head.weight[dead] = 0.0
        model.net.head.bias[dead] = torch.linspace(-1.0, 1.0, len(dead))
    return model


def test_constant_channels_are_skipped_and_counted_exactly():
    dead = [0, 5, 6, 11]
    model = dead_channel_model(dead)
    images = toy_images(3, seed=4)
    targets = torch.tensor([1, 4, 9])
    explainer = ScoreCAM(batch_size=4)
    with model.counting() as counts, torch.no_grad():
        maps = explainer.explain(model, images, targets)
    assert explainer.last_skipped.tolist() == [4, 4, 4]
    assert explainer.last_scored.tolist() == [12, 12, 12]
    assert counts["forward"] == 3 * (1 + 16 - len(dead))  # 1 + K - skipped, exactly
    for i in range(3):
        reference, skipped = official_scorecam(model, "head", images[i], int(targets[i]))
        assert skipped == len(dead)
        torch.testing.assert_close(maps[i], reference, rtol=1e-4, atol=1e-6)


def test_batch_size_and_memory_format_do_not_change_the_map():
    model = toy_model()
    images = toy_images(2, seed=5)
    targets = torch.tensor([2, 8])
    with torch.no_grad():
        one = ScoreCAM(batch_size=1).explain(model, images, targets)
        many = ScoreCAM(batch_size=64).explain(model, images, targets)
        fast = ClassifierHandle(model.loaded, channels_last=True)
        last = ScoreCAM(batch_size=7).explain(fast, images, targets)
    torch.testing.assert_close(one, many, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(one, last, rtol=1e-4, atol=1e-6)


def test_max_channels_scores_the_most_active_channels_only():
    model = toy_model()
    images = toy_images(1, seed=6)
    targets = torch.tensor([0])
    explainer = ScoreCAM(max_channels=5)
    assert explainer.variant == "max_channels=5" and ScoreCAM().variant == ""
    with model.counting() as counts, torch.no_grad():
        approx = explainer.explain(model, images, targets)
    assert counts["forward"] == 1 + 5
    # with all 16 channels allowed it is the paper's map
    with torch.no_grad():
        full = ScoreCAM(max_channels=16).explain(model, images, targets)
        paper = ScoreCAM().explain(model, images, targets)
    torch.testing.assert_close(full, paper)
    assert not torch.allclose(approx, paper)
    # the 5 channels kept are the 5 with the largest spatial mean activation
    with torch.no_grad(), capture_activations(model.layer("head"), keep_grad=False) as store:
        model(images)
    top = store["activation"][0].mean(dim=(1, 2)).topk(5).indices
    activation = store["activation"][0]
    up = F.interpolate(activation[top][:, None], size=(32, 32), mode="bilinear",
                       align_corners=False)
    lo = up.flatten(1).amin(1)[:, None, None, None]
    hi = up.flatten(1).amax(1)[:, None, None, None]
    with torch.no_grad():
        scores = model((images * (up - lo) / (hi - lo))).softmax(1)[:, 0]
    expected = torch.relu(F.interpolate((scores[:, None, None] * activation[top]).sum(0)[None, None],
                                        size=(32, 32), mode="bilinear", align_corners=False))[0]
    torch.testing.assert_close(approx, expected, rtol=1e-4, atol=1e-6)


def test_map_is_usable_outside_inference_mode():
    model = toy_model()
    with torch.no_grad():
        maps = ScoreCAM().explain(model, toy_images(1), torch.tensor([0]))
    assert not maps.is_inference()
    normalize_maps(maps, (32, 32))
    maps.add_(1.0)  # in-place works: not an inference tensor


@pytest.mark.parametrize("options, message", [
    ({"batch_size": 0}, "explainer 'scorecam': option batch_size must be >= 1, got 0"),
    ({"max_channels": 0}, "explainer 'scorecam': option max_channels must be >= 1, got 0"),
])
def test_bad_options_are_explained(options, message):
    with pytest.raises(OptionError, match=message):
        ScoreCAM(**options)


def test_unknown_option_is_refused():
    with pytest.raises(OptionError, match="explainer 'scorecam': unknown option 'n_masks'.*"
                                          "Valid options: max_channels, batch_size"):
        ScoreCAM(n_masks=3)
