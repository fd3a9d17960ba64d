"""xbench verify: an honest run verifies; a tampered value, a removed row, changed plugin
versions or changed data are found and named."""

from __future__ import annotations

import json

import pytest

from conftest import write_images
from xbench.errors import UserError
from xbench.records import RunFolder, parse_row
from xbench.recompute import unit_of
from xbench.runner import RunConfig, Runner
from xbench.verify import choose_units, compare_unit, recorded_units, verify

METRICS = "average-drop,deletion,forward-passes,time"


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A toy run on 3 images in batches of 2 (2 data units + 2 Grad-CAM units + 2 random)."""
    from xbench.plugins import build_registry
    from conftest import _toy_plugin

    registry = build_registry(extra_plugins=[("toy", _toy_plugin())])
    root = tmp_path_factory.mktemp("verify")
    write_images(root / "imgs", ["a.png", "b.png", "c.png"], size=36)
    config = RunConfig(explainers="gradcam,random", metrics=METRICS, model="toy-cnn",
                       data=str(root / "imgs"), batch_size=2, device="cpu",
                       channels_last=False, options=("deletion.step=128",), save_maps=False)
    folder = Runner(config, registry, root / "out", name="toy").run().folder
    return registry, folder


@pytest.fixture
def run(recorded, tmp_path):
    """A fresh copy of the recorded run (tests tamper with it)."""
    import shutil

    registry, folder = recorded
    copy = tmp_path / "toy"
    shutil.copytree(folder.path, copy)
    return registry, RunFolder(copy)


def _rewrite(folder: RunFolder, change) -> None:
    """Rewrite rows.jsonl and progress.jsonl consistently (as a careful forger would):
    ``change(unit, rows)`` returns the unit's new rows."""
    data = folder.rows_path.read_bytes()
    payload, progress, start = b"", [], 0
    for unit, end in folder.finished_units().items():
        rows = [parse_row(line)[0] for line in data[start:end].splitlines()]
        start = end
        payload += "".join(r.to_json() + "\n" for r in change(unit, rows)).encode()
        progress.append(json.dumps({"unit": unit, "rows_bytes": len(payload)}, sort_keys=True))
    folder.rows_path.write_bytes(payload)
    folder.progress_path.write_text("".join(line + "\n" for line in progress))


def test_honest_run_verifies(run):
    registry, folder = run
    report = verify(folder.path, registry, sample=100, seed=0)
    assert report.findings == []
    assert report.sampled == list(folder.finished_units())  # all 6 units
    assert len(report.sampled) == 6


def test_tampered_value_is_named(run):
    import dataclasses

    registry, folder = run

    def tamper(unit, rows):
        return [dataclasses.replace(r, value=r.value * 0.99)
                if unit == "batch000001:gradcam:head" and r.metric == "deletion" else r
                for r in rows]

    _rewrite(folder, tamper)
    report = verify(folder.path, registry, sample=100, seed=0)
    assert [(f.unit, f.row, f.field) for f in report.findings] == [
        ("batch000001:gradcam:head", "[c.png gradcam @head deletion@step=128]", "value")]
    assert "recorded" in str(report.findings[0]) and "recomputed" in str(report.findings[0])


def test_removed_row_is_found_without_recomputing_its_unit(run):
    registry, folder = run
    _rewrite(folder, lambda unit, rows: [r for r in rows if not (
        unit == "batch000000:random:-" and r.image == "b.png" and r.metric == "forward-passes")])
    # the unit is not in the sample: completeness over the whole run still finds the row
    recorded = recorded_units(folder)  # a recomputation that agrees with the records
    report = verify(folder.path, registry, sample=1, seed=0,
                    compute=lambda runner, units: [r for u in units for r in recorded[u]])
    assert report.sampled != ["batch000000:random:-"]
    missing = [f for f in report.findings if f.field == "row"]
    assert [(f.unit, f.row) for f in missing] == [
        ("batch000000:random:-", "[b.png random forward-passes]")]


def test_removed_row_breaks_the_progress_log(run):
    registry, folder = run
    lines = folder.rows_path.read_text().splitlines(keepends=True)
    folder.rows_path.write_text("".join(lines[:3] + lines[4:]))
    report = verify(folder.path, registry, sample=100, seed=0)
    assert any(f.field == "records" and "is not the end of a line" in f.detail
               for f in report.findings)
    assert not report.ok


def test_changed_plugin_versions_refuse(run):
    registry, folder = run
    header = json.loads(folder.header_path.read_text())
    header["plugins"]["xbench"] = "0.0.9"
    folder.header_path.write_text(json.dumps(header))
    from xbench import __version__

    with pytest.raises(UserError, match=rf"distribution xbench is {__version__} here, "
                                        r"the run recorded 0\.0\.9"):
        verify(folder.path, registry, sample=1)


def test_changed_data_refuses(run, tmp_path):
    registry, folder = run
    images = tmp_path / "other"
    write_images(images, ["a.png", "b.png", "d.png"], size=36)
    with pytest.raises(UserError, match="the data changed"):
        verify(folder.path, registry, sample=1, data=str(images))


def test_changed_pixels_are_mismatches(run, tmp_path):
    """Same file names (same subset hash), other pixels: the recomputed units differ."""
    registry, folder = run
    images = tmp_path / "other"
    write_images(images, ["a.png", "b.png", "c.png"], size=36, seed=1)
    report = verify(folder.path, registry, sample=100, data=str(images))
    assert {f.unit for f in report.findings} == set(folder.finished_units())
    assert any(f.field == "value" and "confidence" in f.row for f in report.findings)


def test_compare_unit_tolerances_and_exclusions(run):
    import dataclasses

    _, folder = run
    rows = [r for r in folder.rows() if r.explainer == "gradcam" and r.index < 2]
    unit = unit_of(rows[0], 2)
    nudged = [dataclasses.replace(r, value=r.value + 5e-6 if r.metric == "deletion" else
                                  r.value * 7 if r.metric == "time" else r.value,
                                  batch_seconds=123.0, versions="torch=0") for r in rows]
    assert compare_unit(unit, rows, nudged, exact_metrics=["forward-passes"]) == []
    passes = [dataclasses.replace(r, value=r.value + 1e-6) if r.metric == "forward-passes"
              else r for r in rows]
    found = compare_unit(unit, rows, passes, exact_metrics=["forward-passes"])
    assert {f.field for f in found} == {"value"} and len(found) == 2  # counts are exact
    curves = [dataclasses.replace(r, curve=tuple(v + 1e-3 for v in r.curve)) if r.curve else r
              for r in rows]
    assert {f.field for f in compare_unit(unit, rows, curves)} == {"curve"}


def test_choose_units_is_seeded_and_in_order():
    units = [f"u{i}" for i in range(10)]
    a = choose_units(units, 3, seed=5)
    assert a == choose_units(units, 3, seed=5) and len(set(a)) == 3
    assert a == sorted(a, key=units.index)
    assert choose_units(units, 50, seed=0) == units
    with pytest.raises(UserError, match="--sample"):
        choose_units(units, 0, seed=0)


def test_cli_exit_codes(run, monkeypatch, capsys):
    import dataclasses

    import xbench.plugins
    from xbench.cli import main

    registry, folder = run
    monkeypatch.setattr(xbench.plugins, "build_registry", lambda **kw: registry)
    assert main(["verify", str(folder.path), "--sample", "2", "--seed", "1"]) == 0
    _rewrite(folder, lambda unit, rows: [dataclasses.replace(r, predicted=(r.predicted or 0) + 1)
                                         if r.image == "a.png" else r for r in rows])
    assert main(["verify", str(folder.path), "--sample", "6"]) == 1
    err = capsys.readouterr().err
    assert "batch000000:data [a.png (model) confidence]: predicted" in err


def test_options_resolved_otherwise_refuse(run):
    registry, folder = run
    header = json.loads(folder.header_path.read_text())
    header["config"]["plugin_options"]["deletion"]["step"] = 64
    folder.header_path.write_text(json.dumps(header))
    with pytest.raises(UserError, match=r"resolves the run's settings differently: "
                                        r"plugin_options: recorded .*'step': 64"):
        verify(folder.path, registry, sample=1)


def test_unit_names_round_trip():
    from xbench.recompute import parse_unit

    assert parse_unit("batch000003:data") == (3, None, None)
    assert parse_unit("batch000012:gradcam:_blocks.3._swish._bn1") == (
        12, "gradcam", "_blocks.3._swish._bn1")
    with pytest.raises(UserError, match="expected batchNNNNNN"):
        parse_unit("gradcam:head")
