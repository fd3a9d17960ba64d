"""Sanity gates: known answers on hand-built per-image scores, and the leaderboard's marks."""

from __future__ import annotations

import numpy as np
import pytest

from xbench import gates, leaderboard
from xbench.records import ResultRow


def _row(explainer, image, metric, value, direction="higher", variant=""):
    return ResultRow(run="r", image=image, index=int(image[1:]), label=None, predicted=0,
                     target=0, explainer=explainer, explainer_variant="", layer="-",
                     metric=metric, variant=variant, direction=direction, value=value)


def _frame(table):
    """{explainer: {metric: (direction, [values per image])}} -> rows frame."""
    rows = [_row(e, f"i{i}", m, v, d) for e, metrics in table.items()
            for m, (d, values) in metrics.items() for i, v in enumerate(values)]
    return leaderboard.rows_frame(rows)


def test_beats_known_answers():
    # every per-image difference is positive: every resampled mean is > 0
    assert gates.beats(np.array([3.0, 2.0, 4.0]), np.array([1.0, 1.0, 1.0]), "higher")
    # differences [1, -1]: a quarter of the resamples have mean -1, so the 2.5% quantile is -1
    assert not gates.beats(np.array([2.0, 0.0]), np.array([1.0, 1.0]), "higher")
    assert not gates.beats(np.array([1.0, 1.0]), np.array([1.0, 1.0]), "higher")  # ties lose
    # lower is better: below the control everywhere beats it, above never does
    assert gates.beats(np.array([0.1, 0.2, 0.0]), np.array([0.5, 0.6, 0.4]), "lower")
    assert not gates.beats(np.array([0.1, 0.2, 0.0]), np.array([0.5, 0.6, 0.4]), "higher")


def test_evaluate_marks_each_control_lost():
    frame = _frame({
        "random": {"deletion": ("lower", [0.5, 0.5, 0.5]), "insertion": ("higher", [0.2, 0.2, 0.2]),
                   "forward-passes": ("lower", [0, 0, 0])},
        "centre-gaussian": {"deletion": ("lower", [0.1, 0.1, 0.1]),
                            "insertion": ("higher", [0.2, 0.2, 0.2]),
                            "forward-passes": ("lower", [0, 0, 0])},
        # beats random on deletion, not the centre prior; beats both on insertion
        "good": {"deletion": ("lower", [0.3, 0.2, 0.25]), "insertion": ("higher", [0.5, 0.6, 0.7]),
                 "forward-passes": ("lower", [1, 1, 1])},
        # loses to both on insertion (equal to them)
        "flat": {"deletion": ("lower", [0.0, 0.05, 0.02]), "insertion": ("higher", [0.2, 0.2, 0.2]),
                 "forward-passes": ("lower", [1, 1, 1])},
    })
    found = gates.evaluate(frame)
    assert [(f.explainer, f.column, f.controls) for f in found] == [
        ("flat", "insertion", ("random", "centre-gaussian")),
        ("good", "deletion", ("centre-gaussian",))]  # cost columns and controls are not gated
    assert all(f.mark == gates.CONTROL_MARK for f in found)


def test_no_claim_without_controls_or_common_images():
    assert gates.evaluate(_frame({"good": {"insertion": ("higher", [0.5, 0.6])}})) == []
    frame = _frame({"random": {"insertion": ("higher", [0.9])},
                    "good": {"insertion": ("higher", [0.1])}})
    assert gates.evaluate(frame) == []  # one common image: no claim


def test_model_randomisation_gate():
    # similarity after randomising the weights (lower is better), threshold 0.5
    assert gates.fails_randomisation(np.array([0.9, 0.8, 0.95]), "lower")
    assert not gates.fails_randomisation(np.array([0.1, 0.2, 0.15]), "lower")
    # straddles the threshold: the interval contains 0.5, no failure is claimed
    assert not gates.fails_randomisation(np.array([0.3, 0.7]), "lower")
    assert gates.fails_randomisation(np.array([0.1, 0.2, 0.05]), "higher")  # a dissimilarity
    frame = _frame({"random": {"model-randomisation": ("lower", [1.0, 1.0, 1.0])},
                    "gradcam": {"model-randomisation": ("lower", [0.1, 0.3, 0.2])}})
    found = gates.evaluate(frame)
    assert [(f.explainer, f.randomisation, f.mark) for f in found] == [
        ("random", True, gates.RANDOMISATION_MARK)]  # controls are gated here (they fail it)


def test_leaderboard_marks_failing_cells():
    frame = _frame({"random": {"insertion": ("higher", [0.2, 0.3, 0.2])},
                    "flat": {"insertion": ("higher", [0.2, 0.3, 0.2])},
                    "good": {"insertion": ("higher", [0.5, 0.6, 0.7])}})
    table = gates.mark_matrix(frame, leaderboard.matrix(frame))
    head, body = leaderboard.wide_table(table)
    cells = {line[0]: line[1] for line in body}
    assert cells["flat"].endswith(gates.CONTROL_MARK)
    assert not cells["good"].endswith(gates.CONTROL_MARK)
    assert not cells["random"].endswith(gates.CONTROL_MARK)
    assert list(table.gate) == ["†" if e == "flat" else "" for e in table.explainer]


def test_a_cost_family_column_is_not_gated():
    """A plugin's cost metric (not one of the built-in names) is ungated by its family."""
    frame = _frame({"random": {"energy-joules": ("lower", [0.0, 0.0, 0.0])},
                    "good": {"energy-joules": ("lower", [2.0, 3.0, 4.0])}})
    table = leaderboard.matrix(frame)
    assert list(gates.mark_matrix(frame, table).gate) == ["†", ""]  # no family known: gated
    table["family"] = "cost"
    assert list(gates.mark_matrix(frame, table).gate) == ["", ""]


@pytest.mark.parametrize("values", [[0.5, 0.6, 0.7], [0.7, 0.5, 0.6]])
def test_order_of_images_does_not_matter(values):
    frame = _frame({"random": {"insertion": ("higher", [0.6, 0.6, 0.6])},
                    "e": {"insertion": ("higher", values)}})
    assert [f.explainer for f in gates.evaluate(frame)] == ["e"]


def test_controls_table_says_which_explainer_beats_which_control():
    frame = _frame({
        "random": {"deletion": ("lower", [0.5, 0.5, 0.5]), "insertion": ("higher", [0.2, 0.2, 0.2])},
        "centre-gaussian": {"deletion": ("lower", [0.1, 0.1, 0.1]),
                            "insertion": ("higher", [0.2, 0.2, 0.2])},
        "good": {"deletion": ("lower", [0.3, 0.2, 0.25]), "insertion": ("higher", [0.5, 0.6, 0.7])},
        "flat": {"deletion": ("lower", [0.0, 0.05, 0.02]), "insertion": ("higher", [0.2, 0.2, 0.2])},
    })
    outcomes = gates.control_outcomes(frame)
    cell = outcomes.set_index(["explainer", "column"])[["random", "centre-gaussian"]]
    assert cell.loc[("good", "deletion")].tolist() == [True, False]
    assert cell.loc[("good", "insertion")].tolist() == [True, True]
    assert cell.loc[("flat", "deletion")].tolist() == [True, True]
    assert cell.loc[("flat", "insertion")].tolist() == [False, False]
    assert set(outcomes.explainer) == {"good", "flat"}  # controls are not rows
    text = gates.format_controls(outcomes)
    lines = text.splitlines()
    assert lines[0] == "| explainer | deletion | insertion | beats all controls |"
    # sorted by wins (tied at 1 of 2 here), then by name; ½ = some controls, ✗ = none
    assert lines[2] == "| flat | ✓ | ✗ | 1 of 2 |"
    assert lines[3] == "| good | ½ | ✓ | 1 of 2 |"
    # the gate failures are the same cells the table marks
    assert {(f.explainer, f.column) for f in gates.evaluate(frame)} == {
        ("flat", "insertion"), ("good", "deletion")}


def test_controls_table_without_controls_says_so():
    frame = _frame({"good": {"insertion": ("higher", [0.5, 0.6])}})
    assert "no gated column" in gates.format_controls(gates.control_outcomes(frame))
