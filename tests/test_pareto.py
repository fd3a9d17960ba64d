"""Cost against faithfulness: the Pareto front on hand-made points, and the plot command."""

from __future__ import annotations

from pathlib import Path

import pytest

from xbench import leaderboard, pareto
from xbench.errors import UserError
from xbench.records import ResultRow

RESULTS = Path(__file__).resolve().parents[1] / "results"


def test_front_known_answer():
    #            0    1    2    3    4     5
    costs = [0.0, 1.0, 2.0, 2.0, 10.0, 500.0]
    scores = [0.1, 0.3, 0.2, 0.35, 0.3, 0.5]
    # 2 is beaten by 3 (same cost, better), 4 by 3 (cheaper, better); the rest trade off
    assert pareto.pareto_front(costs, scores, "higher").tolist() == [0, 1, 3, 5]
    # lower is better: 0 is cheapest and best, it dominates all others
    assert pareto.pareto_front(costs, scores, "lower").tolist() == [0]
    # identical points dominate neither each other: both stay
    assert pareto.pareto_front([1, 1, 2], [0.5, 0.5, 0.4], "higher").tolist() == [0, 1]


def _rows():
    def row(explainer, image, metric, value, direction, variant=""):
        return ResultRow(run="r", image=image, index=0, label=None, predicted=0, target=0,
                         explainer=explainer, explainer_variant="", layer="-", metric=metric,
                         variant=variant, direction=direction, value=value)

    table = {"cheap": (1, 0, [0.2, 0.4]), "dear": (100, 0, [0.6, 0.8]),
             "waste": (50, 50, [0.1, 0.3]), "free": (0, 0, [0.1, 0.1])}
    rows = []
    for name, (forward, backward, values) in table.items():
        for i, value in enumerate(values):
            rows += [row(name, f"i{i}", "forward-passes", forward, "lower"),
                     row(name, f"i{i}", "backward-passes", backward, "lower"),
                     row(name, f"i{i}", "insertion", value, "higher", "step=9")]
    return leaderboard.rows_frame(rows)


def test_points_from_rows():
    frame = _rows()
    column = pareto.resolve_column(frame, "insertion")
    assert column == "insertion@step=9"
    points = pareto.pareto_points(frame, column).set_index("explainer")
    assert points.passes.to_dict() == {"cheap": 1, "dear": 100, "free": 0, "waste": 100}
    assert points["mean"].to_dict() == pytest.approx({"cheap": 0.3, "dear": 0.7, "free": 0.1,
                                                      "waste": 0.2})
    assert points.front.to_dict() == {"cheap": True, "dear": True, "free": True, "waste": False}
    assert (points.ci_low <= points["mean"]).all() and (points["mean"] <= points.ci_high).all()
    with pytest.raises(UserError, match="choose one of: insertion@step=9"):
        pareto.resolve_column(frame, "deletion")
    no_costs = frame[~frame.metric.isin(pareto.PASS_METRICS)]
    with pytest.raises(UserError, match="forward-passes or backward-passes"):
        pareto.pareto_points(no_costs, column)


def test_plot_pareto_cli(tmp_path):
    from xbench.cli import main

    run = RESULTS / "reference_efficientnet-lite0_sample_quick"
    if not (run / "run.json").exists():
        pytest.skip("committed reference run not present")
    output = tmp_path / "pareto.png"
    assert main(["plot", "pareto", str(run), "--metric", "insertion", "--output", str(output)]) == 0
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", "pareto", str(run), "--metric", "nonsense", "--output", str(output)]) == 2
