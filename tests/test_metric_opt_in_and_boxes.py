"""Opt-in metrics stay out of ``--metrics all`` and are selected by name or family; the report
draws the object boxes on the gallery overlays."""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from xbench.plugins import build_registry
from xbench.report import gallery_boxes, overlay
from xbench.runner import select_metrics

OPT_IN = {"model-randomisation", "random-logit", "max-sensitivity", "avg-sensitivity",
          "local-lipschitz", "road-morf", "road-lerf", "faithfulness-correlation", "infidelity"}


@pytest.fixture(scope="module")
def registry():
    return build_registry()


def test_opt_in_metrics_are_declared_and_left_out_of_all(registry):
    declared = {n for n in registry.names("metric") if registry.metric(n).opt_in}
    assert declared == OPT_IN
    default = select_metrics(registry, "all")
    assert not OPT_IN & set(default) and "deletion" in default
    assert all(registry.metric(n).kind != "model" for n in default)


def test_all_in_a_list_is_the_default_set_plus_the_others(registry):
    """`--metrics all,localisation` once selected every installed metric, the opt-in and
    model-scope ones included: 'all' means the default set wherever it appears."""
    default = select_metrics(registry, "all")
    combined = select_metrics(registry, "all,localisation,infidelity")
    assert combined[:len(default)] == default
    assert set(combined) - set(default) == {"infidelity"}
    assert not {"model-randomisation", "road-morf", "max-sensitivity"} & set(combined)


def test_naming_a_metric_or_its_family_selects_it(registry):
    assert select_metrics(registry, "sanity") == ["model-randomisation", "random-logit"]
    assert set(select_metrics(registry, "robustness")) == {"max-sensitivity", "avg-sensitivity",
                                                           "local-lipschitz"}
    assert {"road-morf", "road-lerf", "faithfulness-correlation", "infidelity",
            "deletion"} <= set(select_metrics(registry, "faithfulness"))
    assert select_metrics(registry, "infidelity,road-lerf") == ["infidelity", "road-lerf"]


def test_runner_default_selection_excludes_opt_in(registry, tmp_path):
    from xbench.runner import RunConfig, Runner

    runner = Runner(RunConfig(explainers="random", metrics="all", data="sample", limit=1),
                    registry, tmp_path)
    assert not OPT_IN & set(runner.metric_names)
    named = Runner(RunConfig(explainers="random", metrics="sanity,complexity", data="sample",
                             limit=1), registry, tmp_path)
    assert sorted(named.metric_names) == ["entropy-complexity", "model-randomisation",
                                          "random-logit", "sparseness"]


def test_overlay_outlines_the_box_in_white():
    pixels = np.zeros((32, 32, 3), np.uint8)
    preview = np.zeros((8, 8), np.uint8)
    png = overlay(pixels, preview, size=64, boxes=np.array([[8, 4, 15, 19, 0]]), input_size=32)
    array = np.asarray(Image.open(io.BytesIO(png)))
    white = (array == 255).all(axis=2)
    # input pixels 8..15 x 4..19 -> thumbnail 16..31 x 8..39 at 2x
    assert white[8, 16:32].all() and white[39, 16:32].all()
    assert white[8:40, 16].all() and white[8:40, 31].all()
    assert white.sum() == 2 * 16 + 2 * 32 - 4  # the outline only
    assert not white[20, 20]
    plain = np.asarray(Image.open(io.BytesIO(overlay(pixels, preview, size=64))))
    assert not (plain == 255).all(axis=2).any()


def test_gallery_boxes_follow_the_image_resize_and_crop(tmp_path):
    """A 100x50 image, box (10, 5)-(29, 24), resized to short side 40 (80x40) and centre
    cropped to 32: scale 0.8, x offset 24, y offset 4."""
    image = tmp_path / "a.png"
    Image.new("RGB", (100, 50)).save(image)
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("file,width,height,x0,y0,x1,y1\na.png,100,50,40,5,69,24\n")
    header = SimpleNamespace(dataset={"boxes": {"source": str(boxes), "layout": "csv"}},
                             model={"resize_size": 40, "input_size": 32})
    shown = [SimpleNamespace(image="a", path=image, label=3)]
    found = gallery_boxes(header, shown)
    # x: 40*0.8-24 = 8 .. 70*0.8-24-1 = 31; y: 5*0.8-4 = 0 .. 25*0.8-4-1 = 15
    assert found["a"].tolist() == [[8, 0, 31, 15, 3]]
    assert gallery_boxes(SimpleNamespace(dataset={"boxes": None}, model={}), shown) == {}
