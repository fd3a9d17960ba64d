"""``xbench plot layers``: per-layer overall scores in forward order, bootstrap bands, the PNG."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import write_images
from xbench.cli import main
from xbench.errors import UserError
from xbench.layer_plots import OVERALL_METRIC, draw_layer_scores, layer_scores, plot_layers
from xbench.records import ResultRow
from xbench.runner import RunConfig, Runner
from xbench.stats import bootstrap_ci

# forward order that sorting by name would break ("b.10" < "b.2")
LAYERS = ["b.0", "b.2", "b.10", "head"]


def _row(explainer: str, layer: str, image: int, value: float | None, metric=OVERALL_METRIC,
         variant="step=3136", status="ok") -> ResultRow:
    return ResultRow(run="r", image=f"im{image}", index=image, label=None, predicted=1, target=1,
                     explainer=explainer, explainer_variant="", layer=layer, metric=metric,
                     variant=variant, direction="higher", value=value, status=status)


def _rows() -> list[ResultRow]:
    """Two explainers x four layers x five images; value = explainer offset + layer + image."""
    rows = []
    for offset, explainer in ((0.0, "layercam"), (0.3, "relevance-cam")):
        for depth, layer in enumerate(LAYERS):
            for image in range(5):
                rows.append(_row(explainer, layer, image, offset + 0.1 * depth + 0.01 * image))
            rows.append(_row(explainer, layer, 9, None, status="failed"))  # not counted
            rows.append(_row(explainer, layer, 0, 0.9, metric="insertion"))  # other metric
    return rows


def test_scores_keep_forward_order_and_bootstrap_the_mean():
    layers, points = layer_scores(_rows())
    assert layers == LAYERS
    assert [(p.explainer, p.layer) for p in points] == (
        [("layercam", layer) for layer in LAYERS] + [("relevance-cam", layer) for layer in LAYERS])
    third = points[LAYERS.index("b.10")]
    values = np.array([0.2 + 0.01 * i for i in range(5)])
    assert third.images == 5 and third.mean == pytest.approx(values.mean())
    assert (third.ci_low, third.ci_high) == bootstrap_ci(values, seed=0)
    assert third.ci_low < third.mean < third.ci_high


def test_plot_decodes_and_has_one_line_per_explainer(tmp_path):
    layers, points = layer_scores(_rows())
    figure = draw_layer_scores(layers, points, "t", tmp_path / "layers.png")
    with Image.open(tmp_path / "layers.png") as image:
        image.load()
        assert image.format == "PNG" and image.width > 300 and image.height > 200
    (ax,) = figure.axes
    lines = [line for line in ax.get_lines() if not line.get_label().startswith("_")]
    assert sorted(line.get_label() for line in lines) == ["layercam", "relevance-cam"]
    means = {line.get_label(): line.get_ydata() for line in lines}
    assert np.allclose(means["relevance-cam"] - means["layercam"], 0.3)
    assert [t.get_text() for t in ax.get_xticklabels()] == LAYERS
    assert len(ax.collections) == 2  # one bootstrap band per explainer


def test_an_explainer_without_layer_is_a_horizontal_line(tmp_path):
    rows = _rows() + [_row("rise", "-", image, 0.5 + 0.01 * image) for image in range(5)]
    layers, points = layer_scores(rows)
    assert layers == LAYERS  # "-" is not a layer
    assert [p.layer for p in points if p.explainer == "rise"] == ["-"]
    figure = draw_layer_scores(layers, points, "t", tmp_path / "layers.png")
    (ax,) = figure.axes
    labels = [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")]
    assert sorted(labels) == ["layercam", "relevance-cam", "rise (no layer)"]
    (rise,) = [line for line in ax.get_lines() if line.get_label() == "rise (no layer)"]
    assert np.allclose(rise.get_ydata(), 0.52)


def test_missing_scores_and_ambiguous_variants_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="--metrics insertion-deletion"):
        layer_scores([_row("gradcam", "head", 0, 0.5, metric="insertion")])
    mixed = [_row("gradcam", "head", 0, 0.5), _row("gradcam", "head", 0, 0.4, variant="step=224")]
    with pytest.raises(UserError, match="choose one with --variant"):
        layer_scores(mixed)
    layers, points = layer_scores(mixed, variant="step=224")
    assert layers == ["head"] and points[0].mean == pytest.approx(0.4)
    with pytest.raises(UserError, match="--variant 'step=1'"):
        plot_layers(mixed, tmp_path / "x.png", variant="step=1")


def test_cli_plots_a_layer_sweep_run(tmp_path, toy_registry):
    write_images(tmp_path / "imgs", ["a.png", "b.png"], size=36)
    config = RunConfig(explainers="layercam,relevance-cam", metrics=OVERALL_METRIC,
                       model="toy-cnn", data=str(tmp_path / "imgs"), batch_size=2, device="cpu",
                       channels_last=False, layers="stem,block,head", save_maps=False,
                       options=("insertion-deletion.step=512",))  # 2 steps at 32x32: fast
    folder = Runner(config, toy_registry, tmp_path / "out").run().folder
    output = tmp_path / "plots" / "layers.png"
    assert main(["plot", "layers", str(folder.path), "--output", str(output)]) == 0
    with Image.open(output) as image:
        assert image.format == "PNG"
    layers, points = layer_scores(folder.rows())
    assert layers == ["stem", "block", "head"]
    assert {p.explainer for p in points} == {"layercam", "relevance-cam"}
    assert all(p.images == 2 for p in points)
    assert main(["plot", "layers", str(tmp_path / "nowhere")]) == 2  # not a run folder
