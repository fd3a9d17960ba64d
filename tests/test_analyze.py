"""Rank stability: ranks, bootstrap rank intervals, Kendall's tau and variant flips, checked
against hand-computed answers (and scipy's kendalltau as a peer)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from xbench import analyze, leaderboard
from xbench.records import ResultRow, RunFolder

RESULTS = Path(__file__).resolve().parents[1] / "results"


def _frame(table):
    """{column (metric, variant, direction): {explainer: [values per image]}} -> rows frame."""
    rows = [ResultRow(run="r", image=f"i{i}", index=i, label=None, predicted=0, target=0,
                      explainer=e, explainer_variant="", layer="-", metric=m, variant=v,
                      direction=d, value=value)
            for (m, v, d), cells in table.items() for e, values in cells.items()
            for i, value in enumerate(values) if value is not None]
    return leaderboard.rows_frame(rows)


def test_average_ranks_by_hand():
    assert analyze.average_ranks(np.array([3.0, 1.0, 2.0])).tolist() == [1, 3, 2]
    assert analyze.average_ranks(np.array([2.0, 2.0, 1.0])).tolist() == [1.5, 1.5, 3]
    assert analyze.average_ranks(np.array([[1.0, 2.0], [5.0, 5.0]])).tolist() == [[2, 1],
                                                                                 [1.5, 1.5]]


def test_kendall_tau_by_hand():
    # one discordant pair of 6: (5 - 1) / 6
    assert analyze.kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    # P = 4, Q = 0, one pair tied in x only, one in y only: 4 / sqrt(5 * 5)
    assert analyze.kendall_tau([1, 2, 2, 3], [1, 2, 3, 3]) == pytest.approx(0.8)
    assert analyze.kendall_tau([1, 2, 3], [3, 2, 1]) == -1.0
    assert np.isnan(analyze.kendall_tau([1, 1, 1], [1, 2, 3]))
    assert np.isnan(analyze.kendall_tau([1], [1]))


def test_kendall_tau_agrees_with_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for _ in range(20):
        x, y = rng.integers(0, 4, size=9), rng.integers(0, 4, size=9)  # many ties
        expected = stats.kendalltau(x, y).statistic
        got = analyze.kendall_tau(x, y)
        assert (np.isnan(got) and np.isnan(expected)) or got == pytest.approx(expected)


def test_bootstrap_ranks_known_answers():
    # separated by more than any resample can move: the interval is the rank itself
    values = np.array([[10.0, 11, 12], [1, 2, 3], [5, 5, 5]])
    ranks, low, high = analyze.bootstrap_ranks(values, "higher", seed=3, resamples=300)
    assert ranks.tolist() == low.tolist() == high.tolist() == [1, 3, 2]
    ranks, low, high = analyze.bootstrap_ranks(values, "lower", seed=3, resamples=300)
    assert ranks.tolist() == low.tolist() == high.tolist() == [3, 1, 2]
    # A = [1, 0], B = [0, 1]: a resample is (A wins, tie, B wins) w.p. (1/4, 1/2, 1/4), so each
    # rank's 95% interval is [1, 2] and the full-sample ranks tie at 1.5
    ranks, low, high = analyze.bootstrap_ranks(np.array([[1.0, 0], [0, 1]]), "higher", seed=0,
                                               resamples=2000)
    assert ranks.tolist() == [1.5, 1.5] and low.tolist() == [1, 1] and high.tolist() == [2, 2]
    same = analyze.bootstrap_ranks(values, "higher", seed=3, resamples=300)
    assert all(np.array_equal(a, b) for a, b in zip(same, analyze.bootstrap_ranks(
        values, "higher", seed=3, resamples=300)))  # seeded


def test_columns_tau_and_variant_flips():
    frame = _frame({
        ("insertion", "", "higher"): {"a": [0.9, 0.8, 0.9], "b": [0.5, 0.6, 0.5],
                                      "c": [0.1, 0.2, 0.1]},
        # same metric, another step size: a and b swap, c stays last
        ("deletion", "step=1", "lower"): {"a": [0.1, 0.1, 0.2], "b": [0.3, 0.3, 0.4],
                                          "c": [0.8, 0.9, 0.9]},
        ("deletion", "step=9", "lower"): {"a": [0.5, 0.5, 0.6], "b": [0.2, 0.2, 0.3],
                                          "c": [0.8, 0.9, 0.9]},
        # b misses an image: the column is ranked on the two images all three scored
        ("sparseness", "", "higher"): {"a": [0.1, 0.2, 0.3], "b": [0.9, None, 0.9],
                                       "c": [0.5, 0.5, 0.5]},
        ("forward-passes", "", "lower"): {"a": [1, 1, 1], "b": [5, 5, 5], "c": [0, 0, 0]},
    })
    result = analyze.analyze(frame, seed=0, resamples=200)
    by_column = {c.column: c for c in result.columns}
    assert list(by_column) == ["insertion", "deletion@step=1", "deletion@step=9", "sparseness"]
    assert by_column["insertion"].ranks.tolist() == [1, 2, 3]
    assert by_column["deletion@step=9"].ranks.tolist() == [2, 1, 3]
    assert by_column["sparseness"].images == 2 and by_column["sparseness"].ranks.tolist() == [3, 1, 2]
    tau = result.tau
    assert tau.loc["insertion", "deletion@step=1"] == 1.0
    # step=9 vs insertion: one discordant pair (a, b) of three: (2 - 1) / 3
    assert tau.loc["insertion", "deletion@step=9"] == pytest.approx(1 / 3)
    assert tau.loc["deletion@step=9", "insertion"] == tau.loc["insertion", "deletion@step=9"]
    # sparseness ranks (3, 1, 2) vs insertion (1, 2, 3): pairs ab -, ac -, bc +: -1/3
    assert tau.loc["insertion", "sparseness"] == pytest.approx(-1 / 3)
    [flip] = result.variants
    assert (flip.metric, flip.first, flip.second) == ("deletion", "deletion@step=1",
                                                      "deletion@step=9")
    assert flip.flips == [("a", "b")] and flip.significant == [("a", "b")]
    text = analyze.format_text(result)
    assert "FLIPS (1, 1 significant in both *): a / b *" in text
    assert "| a | 1 [1–1] |" in text
    with_cost = analyze.analyze(frame, seed=0, resamples=50, include_cost=True)
    assert "forward-passes" in with_cost.tau.index


def test_cli_on_a_committed_run(tmp_path, capsys):
    from xbench.cli import main

    run = RESULTS / "val50_quick"
    if not (run / "run.json").exists():
        pytest.skip("committed run val50_quick not present")
    output = tmp_path / "tau.png"
    assert main(["analyze", str(run), "--resamples", "50", "--output", str(output)]) == 0
    out = capsys.readouterr().out
    assert "Kendall's tau-b" in out and "insertion@step=" in out
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_controls_table_on_a_committed_run(capsys):
    """`xbench analyze RUN --controls` prints the gate outcome of every cell: the cells marked
    ✗/½ are exactly the leaderboard's † cells (same bootstrap, same seed)."""
    from xbench import gates
    from xbench.cli import main

    run = RESULTS / "reference_efficientnet-lite0_sample_quick"
    if not (run / "run.json").exists():
        pytest.skip("committed reference run not present")
    assert main(["analyze", str(run), "--controls"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[0] == "explainer" and header[-1] == "beats all controls"
    assert not {"random", "centre-gaussian"} & {line.split("|")[1].strip() for line in lines[2:]
                                                if line.startswith("| ")}
    failing = set()
    for line in lines[2:]:
        if not line.startswith("| "):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        name = cells[0].split(" @")[0]
        failing |= {(name, column) for column, cell in zip(header[1:-1], cells[1:-1])
                    if cell in ("✗", "½")}
    seed = json.loads((run / "run.json").read_text())["config"].get("seed", 0)
    marked = {(f.explainer, f.column) for f in gates.evaluate(
        leaderboard.run_frame(RunFolder(run)), seed)}
    assert failing and failing == marked
    assert main(["analyze", str(RESULTS / "val50_quick"), "--controls"]) == 0  # no controls
    assert "no gated column" in capsys.readouterr().out
