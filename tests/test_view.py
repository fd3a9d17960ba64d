"""The shared view of a run's records (xbench/view.py), the vectorised statistics and the
leaderboard grouped by metric family: same content as before on the committed runs."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from xbench import leaderboard, stats, view
from xbench.records import RecordError, RunFolder, row_kind

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
COMMITTED = [p.parent for p in sorted(RESULTS.glob("*/run.json"))]


def _module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench_scale = _module("bench_scale", ROOT / "benchmarks" / "bench_scale.py")


#: the last commit whose leaderboard computed every cell on its own, before the shared view
PRE_VIEW_COMMIT = "de5808b"


def _main_leaderboard(tmp_path: Path):
    """xbench/leaderboard.py as it was before the view (commit de5808b, the reference the
    vectorised matrix must reproduce); skipped where the checkout has no such history."""
    try:
        source = subprocess.run(["git", "-C", str(ROOT), "show",
                                 f"{PRE_VIEW_COMMIT}:xbench/leaderboard.py"],
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"no git history with commit {PRE_VIEW_COMMIT} here (a shallow clone?)")
    path = tmp_path / "main_leaderboard.py"
    path.write_text(source)
    try:
        return _module("main_leaderboard", path)
    except ImportError as exc:
        pytest.skip(f"the main implementation needs what this tree lacks: {exc}")


def _plain(values) -> list:
    return [None if isinstance(v, float) and np.isnan(v) else v for v in values]


@pytest.fixture
def copy_results(tmp_path) -> Path:
    out = tmp_path / "results"
    shutil.copytree(RESULTS, out, ignore=shutil.ignore_patterns("maps", view.VIEW_FOLDER))
    return out


# -- the view -------------------------------------------------------------------------------


@pytest.mark.parametrize("run", COMMITTED, ids=lambda p: p.name)
def test_view_holds_exactly_the_rows(run, tmp_path):
    folder = RunFolder(run)
    rows = list(folder.rows())
    records = view.read_records(folder)
    loaded = view.RunView(folder, *records)
    assert list(loaded.result_rows()) == rows  # curves included, file order
    frame = loaded.frame()
    main = _main_leaderboard(tmp_path)
    before = main.rows_frame(rows)
    for name in before.columns:
        assert _plain(frame[name].tolist()) == _plain(before[name].tolist()), name
    assert frame["kind"].tolist() == [row_kind(row) for row in rows]


def test_row_kind_follows_the_contract():
    base = {"status": "ok", "explainer": "gradcam", "metric": "insertion", "direction": "higher"}
    assert row_kind(base) == "score"
    assert row_kind({**base, "status": "failed"}) == "failure"
    assert row_kind({**base, "explainer": "", "metric": "confidence"}) == "confidence"
    assert row_kind({**base, "explainer": "", "metric": "similarity-value"}) == "model-score"
    assert row_kind({**base, "direction": "", "metric": "scorecam:skipped-channels"}) == "diagnostic"
    assert row_kind({**base, "kind": "diagnostic"}) == "diagnostic"  # recorded kind wins


def test_cache_is_kept_reused_and_invalidated(tmp_path):
    folder = bench_scale.write_synthetic_run(tmp_path, images=12, explainers=2)
    view._memo.clear()
    first = view.load(folder)
    expected, count = first.frame(), len(first)
    where = folder.path / view.VIEW_FOLDER
    assert (where / view.KEY_FILE).exists()
    assert not (where / view.CURVES_FILE).exists()  # built when first asked for, not before
    view._memo.clear()
    cached = view.load(folder)
    assert cached._scalars is None and cached._scalars_path is not None  # read from Parquet
    assert cached.frame().equals(expected)
    assert list(cached.result_rows()) == list(folder.rows())  # curves built and kept
    assert json.loads((where / view.CURVES_KEY_FILE).read_text()) == view.cache_key(folder)
    built = (where / view.CURVES_FILE).stat().st_mtime_ns
    view._memo.clear()
    assert list(view.load(folder).result_rows()) == list(folder.rows())
    assert (where / view.CURVES_FILE).stat().st_mtime_ns == built  # reused

    # a torn tail past the last progress line: not part of the records, not in the view
    with folder.rows_path.open("ab") as handle:
        handle.write(b'{"torn": ')
    view._memo.clear()
    assert len(view.load(folder)) == count

    # an edit inside the records (same size): the time stamp changes, the view follows
    data = folder.rows_path.read_bytes()
    at = data.index(b'"value": ') + len(b'"value": ')
    old_digit = data[at:at + 1]
    new_digit = b"7" if old_digit != b"7" else b"8"
    folder.rows_path.write_bytes(data[:at] + new_digit + data[at + 1:])
    view._memo.clear()
    assert view.load(folder).frame().value.iloc[0] == list(folder.rows())[0].value
    assert not (where / view.CURVES_KEY_FILE).exists()  # the old curves no longer count

    # a new finished unit: the view holds its rows
    row = list(folder.rows())[0]
    folder.completed_units()  # cut the torn tail, as --resume does
    folder.append_unit("extra", [row])
    view._memo.clear()
    assert len(view.load(folder)) == count + 1


def test_stale_or_broken_cache_is_rebuilt(tmp_path):
    folder = bench_scale.write_synthetic_run(tmp_path, images=6, explainers=1)
    view._memo.clear()
    expected = view.load(folder).frame()
    (folder.path / view.VIEW_FOLDER / view.SCALARS_FILE).write_bytes(b"not parquet")
    view._memo.clear()
    assert view.load(folder).frame().equals(expected)
    key = json.loads((folder.path / view.VIEW_FOLDER / view.KEY_FILE).read_text())
    key["limit"] -= 1
    (folder.path / view.VIEW_FOLDER / view.KEY_FILE).write_text(json.dumps(key))
    view._memo.clear()
    assert view.load(folder).frame().equals(expected)


def test_curves_of_records_changed_since_the_view_are_read_afresh(tmp_path):
    folder = bench_scale.write_synthetic_run(tmp_path, images=4, explainers=1)
    view._memo.clear()
    stale = view.load(folder)
    row = list(folder.rows())[0]
    folder.append_unit("extra", [row])
    assert list(stale.result_rows())[0].curve == row.curve  # read, not cached as current
    assert not (folder.path / view.VIEW_FOLDER / view.CURVES_KEY_FILE).exists()


def test_a_writer_error_reaches_the_reader():
    def fail(batch, offset):
        raise OSError("disk full")

    writer = view._Overlapped(fail)
    writer(None, 0)
    with pytest.raises(OSError, match="disk full"):
        writer.close()


def test_a_bad_row_is_named_by_file_and_line(tmp_path):
    folder = bench_scale.write_synthetic_run(tmp_path, images=4, explainers=1)
    lines = folder.rows_path.read_bytes().splitlines(keepends=True)
    lines[5] = lines[5].replace(b'"value": ', b'"value": "x", "oops": ')
    size = sum(map(len, lines))
    folder.rows_path.write_bytes(b"".join(lines))
    progress = [json.loads(line) for line in folder.progress_path.read_text().splitlines()]
    progress[-1]["rows_bytes"] = size
    folder.progress_path.write_text("".join(json.dumps(p) + "\n" for p in progress))
    view._memo.clear()
    with pytest.raises(RecordError, match=re.escape(f"{folder.rows_path}:6")):
        view.load(folder)


# -- statistics -----------------------------------------------------------------------------


def _historical_ci(values: np.ndarray, seed: int) -> tuple[float, float]:
    """bootstrap_ci as it was written before the shared draws (the reference)."""
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(2000, values.size))].mean(axis=1)
    tail = (1.0 - 0.95) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def test_shared_draws_give_bit_identical_intervals_up_to_the_threshold():
    rng = np.random.default_rng(3)
    vectors = [rng.normal(size=n) * 10 for n in (2, 5, 50, 50, 999, stats.EXACT_MAX_IMAGES)]
    assert stats.bootstrap_cis(vectors, seed=4) == [_historical_ci(v, 4) for v in vectors]
    assert all(np.isnan(stats.bootstrap_ci(np.array([]))))
    assert stats.bootstrap_ci(np.array([2.5])) == (2.5, 2.5)


def test_counts_path_matches_the_indexing_path_above_the_threshold():
    rng = np.random.default_rng(5)
    vectors = [rng.exponential(size=stats.EXACT_MAX_IMAGES + 301) for _ in range(3)]
    fast = stats.bootstrap_cis(vectors, seed=1)
    for vector, (low, high) in zip(vectors, fast):
        ref_low, ref_high = _historical_ci(vector, 1)
        assert low == pytest.approx(ref_low, rel=1e-12)
        assert high == pytest.approx(ref_high, rel=1e-12)


def test_chunked_draws_are_the_draws_at_once():
    whole = np.random.default_rng(9).integers(0, 1234, size=(250, 1234))
    rng = np.random.default_rng(9)
    chunks = np.concatenate([rng.integers(0, 1234, size=(100, 1234)),
                             rng.integers(0, 1234, size=(100, 1234)),
                             rng.integers(0, 1234, size=(50, 1234))])
    assert np.array_equal(whole, chunks)


def test_matrix_matches_the_main_implementation_at_large_n(tmp_path):
    """1,200 images (the counts path): same means, medians, best and ties as cell by cell;
    intervals to float rounding."""
    main = _main_leaderboard(tmp_path)
    folder = bench_scale.write_synthetic_run(tmp_path, images=stats.EXACT_MAX_IMAGES + 200,
                                             explainers=3)
    rows = list(folder.rows())
    before = main.matrix(main.rows_frame(rows), seed=0)
    view._memo.clear()
    after = leaderboard.matrix(view.load(folder).frame(categorical=True), seed=0)
    assert list(after.drop(columns="family").columns) == list(before.columns)
    for name in ("explainer", "layer", "column", "metric", "mean", "median", "q1", "q3",
                 "images", "order", "best", "tied_with_best"):
        assert after[name].tolist() == before[name].tolist(), name
    np.testing.assert_allclose(after[["ci_low", "ci_high"]], before[["ci_low", "ci_high"]],
                               rtol=1e-12)


# -- the committed leaderboard, cell for cell -----------------------------------------------


def _cells(markdown: str) -> dict[tuple[str, ...], str]:
    """{(run, explainer[, layer], column): text} of every filled cell of a LEADERBOARD.md, and
    {(run, "fact", i): line} of its runs' facts, whatever tables the cells sit in."""
    cells, run, head, facts = {}, "", None, 0
    for line in markdown.splitlines():
        if line.startswith("## "):
            run, head, facts = line[3:], None, 0
        elif line.startswith("- ") and run:
            cells[(run, "fact", str(facts))] = line
            facts += 1
        elif line.startswith("|---"):
            continue
        elif line.startswith("| "):
            parts = [part.strip() for part in line.strip("|").split(" | ")]
            if parts[0] in ("explainer", "metric"):
                head = parts
                continue
            names = 2 if head[1] == "layer" else 1
            for column, text in zip(head[names:], parts[names:]):
                if text:  # a blank cell (no such column for the explainer) is no content
                    cells[(run, *parts[:names], column)] = text
    return cells


def test_committed_leaderboard_content_is_unchanged(copy_results):
    """Against the committed LEADERBOARD.md and leaderboard.csv (what `--check` guards):
    every cell and fact, every CSV value; only the grouping (and the family column) is new."""
    markdown, csv = leaderboard.render(copy_results)
    committed_md = (RESULTS / leaderboard.LEADERBOARD_MD).read_text(encoding="utf-8")
    assert _cells(markdown) == _cells(committed_md)
    committed = pd.read_csv(RESULTS / leaderboard.LEADERBOARD_CSV, keep_default_na=False)
    rendered = pd.read_csv(io.StringIO(csv), keep_default_na=False)
    assert rendered.drop(columns="family").equals(committed.drop(columns="family",
                                                                 errors="ignore"))
    assert set(rendered.family) <= set(view.FAMILY_ORDER) | {view.DIAGNOSTIC_FAMILY}
    # one table per family, in the pinned order
    for section in markdown.split("\n## ")[1:]:
        families = re.findall(r"^### (\S+)$", section, flags=re.M)
        assert families == sorted(families, key=view.family_rank), families
    # and the cache gives the same bytes
    view._memo.clear()
    assert leaderboard.render(copy_results) == (markdown, csv)
    leaderboard.write(copy_results)
    assert leaderboard.check(copy_results) == []


def test_recorded_family_wins_and_unknown_is_other():
    header = type("H", (), {"config": {"metric_families": {"mystery": "robustness"}}})()
    families = view.metric_families(["mystery", "no-such-metric", "x:diag", "insertion"],
                                    header, {"x:diag": "diagnostic"})
    assert families["mystery"] == "robustness"
    assert families["no-such-metric"] == view.OTHER_FAMILY
    assert families["x:diag"] == view.DIAGNOSTIC_FAMILY
    assert families["insertion"] in ("faithfulness", view.OTHER_FAMILY)
    order = sorted(["other", "cost", "diagnostic", "zeta", "faithfulness", "complexity"],
                   key=view.family_rank)
    assert order == ["faithfulness", "complexity", "cost", "zeta", "diagnostic", "other"]


# -- the scale benchmark's machinery, small ---------------------------------------------------


def test_scale_benchmark_machinery_on_a_small_run(tmp_path):
    bench_scale.write_synthetic_run(tmp_path, images=60, explainers=2)
    folder = RunFolder(tmp_path / "synthetic")
    assert folder.verify() == []  # every line a valid ResultRow, progress consistent
    assert len(list(folder.rows())) == 60 * (1 + 2 * len(bench_scale.METRICS))
    results = bench_scale.regenerate_and_check(tmp_path)
    assert set(results) == {"cold", "warm", "check", "check cold"}
    for seconds, peak in results.values():
        assert 0 < seconds < bench_scale.BUDGET_S and 0 < peak < bench_scale.BUDGET_BYTES
    assert (tmp_path / leaderboard.LEADERBOARD_MD).read_text().count("### ") == 2
    assert os.path.exists(folder.path / view.VIEW_FOLDER / view.SCALARS_FILE)
