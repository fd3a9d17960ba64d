"""Speed of relevance-cam against one forward + one backward pass (issue 8).

Run: ``pytest benchmarks/bench_relevance_cam.py --benchmark-enable -s`` (about a minute).

relevance-cam costs 1 F + 1 B like Grad-CAM; on top it replaces the derivative of every
activation (EfficientNet-Lite0: ReLU6 at each call site) by the LRP ratio g(z)/(z + eps sign z),
a few elementwise operations per activation. Target, asserted as a ratio measured in the same
run (minimum over interleaved rounds, as in bench_explainers.py): within 1.5x of the full
forward + backward pass to the input, at the last layer (_bn1) and at the first block.
"""

from __future__ import annotations

from functools import partial

import pytest

from bench_explainers import forward_backward, interleaved_min, model, photos, report, run  # noqa: F401
from xbench_plugins.relevance_cam import RelevanceCAM


@pytest.mark.parametrize("layer", ["_bn1", "_blocks.0"])
def test_relevance_cam_speed(benchmark, model, photos, layer):  # noqa: F811
    images, targets = photos
    explainer = RelevanceCAM(layer=layer)
    contenders = {"forward+backward": partial(forward_backward, model, images, targets),
                  "xbench": partial(run, explainer, model, images, targets, True)}
    times = interleaved_min(contenders, rounds=4)
    ratio = times["xbench"] / times["forward+backward"]
    report(benchmark, times, **{"xbench / (F+B)": ratio})
    benchmark.pedantic(contenders["xbench"], rounds=1, iterations=1)
    assert ratio <= 1.5
