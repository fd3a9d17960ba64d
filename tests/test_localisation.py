"""Localisation and complexity metrics: known answers on analytic toys, and Quantus 0.6.0 on the
same maps and boxes (agreement to float rounding, or each deliberate difference shown)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from xbench.base import MetricBatch
from xbench.plugins import build_registry
from xbench_plugins.complexity import Complexity, Sparseness, entropy, gini
from xbench_plugins.localisation import (EnergyPointingGame, PointingGame,
                                         RelevanceRankAccuracy)

SIZE = 32


def batch_of(maps, boxes, targets=None, degenerate=None) -> MetricBatch:
    maps = torch.as_tensor(maps, dtype=torch.float32)
    n = maps.shape[0]
    boxes = None if boxes is None else [torch.tensor(b, dtype=torch.long).view(-1, 5)
                                        for b in boxes]
    return MetricBatch(model=None, images=torch.zeros(n, 3, *maps.shape[1:]),
                       targets=torch.zeros(n, dtype=torch.long) if targets is None
                       else torch.tensor(targets),
                       saliency=maps, clean_probs=torch.ones(n), explain_forward=None,
                       explain_backward=None, explain_seconds=None,
                       degenerate=torch.zeros(n, dtype=torch.bool) if degenerate is None
                       else torch.tensor(degenerate), boxes=boxes)


def score(metric, batch) -> list[float]:
    return metric.score(batch)[""].tolist()


def peak(y: int, x: int, size: int = SIZE) -> torch.Tensor:
    out = torch.linspace(0, 0.5, size * size).view(size, size)
    out[y, x] = 1.0
    return out


def torchray_hit(mask: torch.Tensor, point: tuple[int, int], tolerance: int) -> bool:
    """TorchRay's PointingGame.evaluate, pixel by pixel: a disk of squared radius < tol^2."""
    v, u = torch.meshgrid((torch.arange(mask.shape[0]).float() - point[1]) ** 2,
                          (torch.arange(mask.shape[1]).float() - point[0]) ** 2, indexing="ij")
    return bool((mask & ((v + u) < tolerance ** 2)).any())


# -- pointing game -------------------------------------------------------------------------

@pytest.mark.parametrize("x1,expected", [(4, 0.0), (5, 0.0), (6, 1.0)])
def test_pointing_game_tolerance_is_strict_as_torchray(x1, expected):
    # peak at x = 20: the box's nearest pixel is 16, 15, 14 px away; hit iff d^2 < 15^2
    batch = batch_of(peak(10, 20)[None], [[(0, 8, x1, 12, 0)]])
    assert score(PointingGame(), batch) == [expected]
    mask = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    mask[8:13, 0:x1 + 1] = True
    assert torchray_hit(mask, (20, 10), 15) == bool(expected)


def test_pointing_game_matches_torchray_on_random_boxes():
    generator = torch.Generator().manual_seed(0)
    maps = torch.rand(24, SIZE, SIZE, generator=generator)
    corners = torch.randint(0, SIZE - 4, (24, 2), generator=generator)
    ends = torch.minimum(corners + torch.randint(0, 12, (24, 2), generator=generator),
                         torch.tensor(SIZE - 1))
    boxes = [[(int(c[0]), int(c[1]), int(e[0]), int(e[1]), 0)] for c, e in zip(corners, ends)]
    for tolerance in (0, 3, 15):
        ours = score(PointingGame(tolerance=tolerance), batch_of(maps, boxes))
        reference = []
        for i, ((x0, y0, x1, y1, _),) in enumerate(boxes):
            mask = torch.zeros(SIZE, SIZE, dtype=torch.bool)
            mask[y0:y1 + 1, x0:x1 + 1] = True
            y, x = divmod(int(maps[i].argmax()), SIZE)
            hit = bool(mask[y, x]) if tolerance == 0 else torchray_hit(mask, (x, y), tolerance)
            reference.append(float(hit))
        assert ours == reference
    assert 0 < sum(ours) < len(ours)  # both outcomes occur


def test_pointing_game_ties_and_degenerate_maps():
    tied = torch.zeros(SIZE, SIZE)
    tied[0, 0] = tied[30, 30] = 1.0  # first maximum (raster order) far from the box
    box = [(28, 28, 31, 31, 0)]
    assert score(PointingGame(tolerance=0), batch_of(tied[None], [box])) == [0.0]
    assert score(PointingGame(tolerance=0, ties="any"), batch_of(tied[None], [box])) == [1.0]
    # a degenerate map is all zeros in a MetricBatch: every pixel "is the maximum", still a miss
    whole = [(0, 0, SIZE - 1, SIZE - 1, 0)]
    flat = batch_of(torch.zeros(1, SIZE, SIZE), [whole], degenerate=[True])
    assert score(PointingGame(ties="any"), flat) == [0.0]


def test_images_without_a_target_box_are_excluded_never_hits():
    maps = torch.stack([peak(5, 5), peak(5, 5), peak(5, 5)])
    boxes = [[(0, 0, 9, 9, 0)], [(0, 0, 9, 9, 1)], []]  # target 0; the 2nd box is of class 1
    for metric in (PointingGame(), EnergyPointingGame(), RelevanceRankAccuracy()):
        values = score(metric, batch_of(maps, boxes))
        assert values[0] > 0 and math.isnan(values[1]) and math.isnan(values[2])
    anywhere = score(PointingGame(boxes_of="any"), batch_of(maps, boxes))
    assert anywhere[:2] == [1.0, 1.0] and math.isnan(anywhere[2])
    assert all(math.isnan(v) for v in score(PointingGame(), batch_of(maps, None)))
    assert PointingGame(boxes_of="any").variant == "boxes_of=any"


# -- energy pointing game and relevance rank accuracy --------------------------------------

def test_energy_pointing_game_known_answers():
    box = [(4, 6, 11, 9, 0)]  # 8 x 4 = 32 pixels
    indicator = torch.zeros(1, SIZE, SIZE)
    indicator[0, 6:10, 4:12] = 1.0
    assert score(EnergyPointingGame(), batch_of(indicator, [box])) == [1.0]
    quarter = indicator * 0.75 + 0.25  # 1 inside, 0.25 outside
    expected = 32 / (32 + 0.25 * (SIZE * SIZE - 32))
    assert score(EnergyPointingGame(), batch_of(quarter, [box]))[0] == pytest.approx(expected)
    # two overlapping boxes count their shared pixels once
    both = [(4, 6, 11, 9, 0), (8, 6, 15, 9, 0)]
    wide = torch.zeros(1, SIZE, SIZE)
    wide[0, 6:10, 4:16] = 1.0
    assert score(EnergyPointingGame(), batch_of(wide, [both])) == [1.0]
    zero = batch_of(torch.zeros(1, SIZE, SIZE), [box], degenerate=[True])
    assert score(EnergyPointingGame(), zero) == [0.0]


def test_relevance_rank_accuracy_known_answers():
    box = [(0, 0, 3, 3, 0)]  # K = 16 pixels
    ramp = torch.linspace(0.5, 0.0, SIZE * SIZE).view(1, SIZE, SIZE)
    inside = ramp.clone()
    inside[0, :4, :4] = 1.0
    assert score(RelevanceRankAccuracy(), batch_of(inside, [box])) == [1.0]
    half = ramp.clone()
    half[0, :2, :4] = 1.0  # 8 box pixels on top ...
    half[0, 20, :8] = 0.9  # ... then 8 outside, above the rest of the box
    assert score(RelevanceRankAccuracy(), batch_of(half, [box])) == [0.5]
    # ties keep raster order: a flat map ranks the first rows first
    flat = torch.zeros(1, SIZE, SIZE)
    assert score(RelevanceRankAccuracy(), batch_of(flat, [[(0, 0, 15, 0, 0)]])) == [1.0]
    assert score(RelevanceRankAccuracy(), batch_of(flat, [[(0, 0, 15, 0, 0)]],
                                                   degenerate=[True])) == [0.0]


# -- complexity ------------------------------------------------------------------------------

def test_complexity_known_answers():
    two = torch.tensor([[0.0, 0.0, 1.0, 1.0]])  # sorted weights -3 -1 1 3: G = 4 / (4 * 2)
    assert gini(two).item() == pytest.approx(0.5)
    assert entropy(two).item() == pytest.approx(math.log(2))
    single = torch.zeros(1, SIZE, SIZE)
    single[0, 3, 7] = 1.0
    assert gini(single).item() == pytest.approx((SIZE * SIZE - 1) / (SIZE * SIZE))
    assert entropy(single).item() == 0.0
    uniform = torch.ones(1, SIZE, SIZE)
    assert gini(uniform).item() == pytest.approx(0.0, abs=1e-12)
    assert entropy(uniform).item() == pytest.approx(math.log(SIZE * SIZE))
    zero = batch_of(torch.zeros(1, SIZE, SIZE), [[]], degenerate=[True])
    assert score(Sparseness(), zero) == [0.0]
    assert score(Complexity(), zero) == [pytest.approx(math.log(SIZE * SIZE))]
    # scale-free: a map and its double agree
    maps = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(gini(maps), gini(2 * maps)) and torch.allclose(entropy(maps),
                                                                        entropy(2 * maps))


# -- Quantus 0.6.0 ---------------------------------------------------------------------------

quantus = pytest.importorskip("quantus")


def _quantus(metric_cls, maps: torch.Tensor, masks: torch.Tensor, **kwargs) -> np.ndarray:
    n = maps.shape[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = metric_cls(disable_warnings=True, **kwargs)(
            model=None, x_batch=np.zeros((n, 3, SIZE, SIZE), np.float32),
            y_batch=np.zeros(n, dtype=int), a_batch=maps[:, None].numpy().copy(),
            s_batch=masks[:, None].numpy().astype(np.float32))
    return np.asarray(out, dtype=np.float64)


def _random_case(n=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    maps = torch.rand(n, SIZE, SIZE, generator=generator)  # distinct values: no ties
    boxes, masks = [], torch.zeros(n, SIZE, SIZE, dtype=torch.bool)
    for i in range(n):
        own = []
        for _ in range(1 + i % 3):
            x0, y0 = torch.randint(0, SIZE - 6, (2,), generator=generator).tolist()
            w, h = torch.randint(2, 14, (2,), generator=generator).tolist()
            x1, y1 = min(x0 + w, SIZE - 1), min(y0 + h, SIZE - 1)
            own.append((x0, y0, x1, y1, 0))
            masks[i, y0:y1 + 1, x0:x1 + 1] = True
        boxes.append(own)
    return maps, boxes, masks


def test_agrees_with_quantus_on_the_same_maps_and_boxes():
    maps, boxes, masks = _random_case()
    batch = batch_of(maps, boxes)
    pairs = [(PointingGame(tolerance=0), quantus.PointingGame, 0.0),
             (EnergyPointingGame(), quantus.RelevanceMassAccuracy, 1e-6),
             (RelevanceRankAccuracy(), quantus.RelevanceRankAccuracy, 0.0),
             (Sparseness(), quantus.Sparseness, 1e-6),
             (Complexity(), quantus.Complexity, 1e-5)]
    for ours, theirs, atol in pairs:
        expected = _quantus(theirs, maps, masks)
        np.testing.assert_allclose(score(ours, batch), expected, atol=atol, rtol=0,
                                   err_msg=ours.name)
    hits = score(PointingGame(tolerance=0), batch)
    assert 0 < sum(hits) < len(hits)


def test_deliberate_differences_from_quantus():
    """Each line: Quantus 0.6.0's value, ours, and why."""
    maps, boxes, masks = _random_case(n=4, seed=3)
    # 1. an image without a box: Quantus sets NaN into a bool array, i.e. True (a hit);
    #    relevance mass/rank accuracy give NaN there as we do
    maps[0], masks[0], boxes[0] = peak(2, 2), False, []
    # 2. a constant map: every pixel is "the maximum", so Quantus counts a hit whenever the image
    #    has a box; ours is a miss (the harness flags it degenerate and hands over zeros)
    maps[1] = 0.0
    theirs = _quantus(quantus.PointingGame, maps, masks)
    batch = batch_of(maps, boxes, degenerate=[False, True, False, False])
    ours = score(PointingGame(tolerance=0), batch)
    assert theirs[0] == 1.0 and math.isnan(ours[0])
    assert theirs[1] == 1.0 and ours[1] == 0.0
    np.testing.assert_array_equal(theirs[2:], ours[2:])
    # 3. TorchRay's 15 px tolerance (Quantus has none): a peak 10 px from the box is a hit
    near = batch_of(peak(10, 20)[None], [[(0, 8, 10, 12, 0)]])
    mask = torch.zeros(1, SIZE, SIZE, dtype=torch.bool)
    mask[0, 8:13, 0:11] = True
    assert _quantus(quantus.PointingGame, peak(10, 20)[None], mask)[0] == 0.0
    assert score(PointingGame(), near) == [1.0]
    # 4. complexity of a map without mass: Quantus divides 0 by 0 (NaN); ours is ln(n), the
    #    uniform map's (and sparseness 0, where Quantus's +1e-7 also gives 0)
    zero = torch.zeros(1, SIZE, SIZE)
    zero_and_one = torch.stack([zero[0], peak(3, 3)])
    none = torch.zeros(2, SIZE, SIZE, dtype=torch.bool)
    assert math.isnan(_quantus(quantus.Complexity, zero_and_one, none)[0])
    assert score(Complexity(), batch_of(zero, [[]], degenerate=[True]))[0] == pytest.approx(
        math.log(SIZE * SIZE))
    assert _quantus(quantus.Sparseness, zero_and_one, none)[0] == pytest.approx(0.0, abs=1e-9)


# -- families ------------------------------------------------------------------------------

def test_metrics_accepts_family_names():
    from xbench.runner import select_metrics

    registry = build_registry()
    assert select_metrics(registry, "localisation") == [
        "energy-pointing-game", "pointing-game", "relevance-rank-accuracy"]
    # "complexity" is the family (no metric is called so): sparseness and Bhatt's entropy
    assert select_metrics(registry, "complexity") == ["entropy-complexity", "sparseness"]
    assert select_metrics(registry, "sparseness,complexity") == ["sparseness",
                                                                 "entropy-complexity"]
    faithfulness = select_metrics(registry, "faithfulness")
    assert "insertion" in faithfulness and "pointing-game" not in faithfulness
    assert select_metrics(registry, "cost") == ["backward-passes", "forward-passes", "time"]
    with pytest.raises(Exception, match="pointng"):
        select_metrics(registry, "pointng-game")


# -- end to end ------------------------------------------------------------------------------

def test_run_scores_boxed_images_and_skips_the_rest(tmp_path, monkeypatch):
    from conftest import _toy_plugin, write_images

    import xbench_plugins.localisation as localisation
    from xbench.boxes import ImageBoxes, input_boxes
    from xbench.errors import UserError
    from xbench.runner import RunConfig, Runner

    folder = tmp_path / "imgs"
    write_images(folder, [f"im{i}.png" for i in range(4)], size=36)  # 43 x 36 each
    (tmp_path / "labels.csv").write_text("file,label\n" + "".join(
        f"im{i}.png,{i}\n" for i in range(4)))
    registry = build_registry(extra_plugins=[("toy", _toy_plugin())])
    config = dict(explainers="gradcam", model="toy-cnn", data=str(folder),
                  labels=str(tmp_path / "labels.csv"), batch_size=4, device="cpu",
                  channels_last=False, target_rule="label")
    with pytest.raises(UserError, match="--metrics pointing-game: needs object boxes"):
        Runner(RunConfig(metrics="pointing-game", **config), registry, tmp_path / "out")
    plain = Runner(RunConfig(metrics="all", **config), registry, tmp_path / "out")
    assert "pointing-game" not in plain.metric_names and "sparseness" in plain.metric_names

    # boxes of im0..im2, in a 86 x 72 original (the stored images are half size); none for im3
    (tmp_path / "imgs_boxes.csv").write_text(
        "file,width,height,x0,y0,x1,y1\nim0.png,86,72,0,0,40,30\nim0.png,86,72,50,40,85,71\n"
        "im1.png,86,72,10,10,60,60\nim2.png,86,72,20,5,70,50\n")
    seen = []
    real_pad = localisation.pad_boxes
    monkeypatch.setattr(localisation, "pad_boxes",
                        lambda boxes, device: seen.append(boxes) or real_pad(boxes, device))
    runner = Runner(RunConfig(metrics="localisation,complexity", **config), registry,
                    tmp_path / "out", name="boxed")
    summary = runner.run()
    rows = [r for r in summary.folder.rows() if r.explainer]
    by_metric = {}
    for row in rows:
        assert row.status == "ok", row.error
        by_metric.setdefault(row.metric, []).append(row)
    assert runner.metric_names == ["energy-pointing-game", "pointing-game",
                                   "relevance-rank-accuracy", "entropy-complexity", "sparseness"]
    for name in ("pointing-game", "energy-pointing-game", "relevance-rank-accuracy"):
        assert sorted(r.image for r in by_metric[name]) == ["im0.png", "im1.png", "im2.png"]
    assert {r.value for r in by_metric["pointing-game"]} <= {0.0, 1.0}
    assert len(by_metric["sparseness"]) == len(by_metric["entropy-complexity"]) == 4
    assert summary.header.dataset["boxes"]["source"].endswith("imgs_boxes.csv")
    # the metric saw each image's boxes after its resize (36 -> 37 short side) and crop (32)
    box = ImageBoxes(86, 72, ((0, 0, 40, 30, None), (50, 40, 85, 71, None)))
    assert torch.equal(seen[0][0], input_boxes(box, (43, 36), 37, 32, 0))
    assert seen[0][3].shape == (0, 5)
