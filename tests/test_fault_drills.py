"""Fault drills: kills, bad plugins, bad images and failing disks lose nothing."""

from __future__ import annotations

import errno
import json
import os
import random
import re
import signal
import struct
import subprocess
import sys
import textwrap
import time
import types
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import xbench
from conftest import _toy_plugin, write_images
from xbench.errors import UserError
from xbench.plugins import build_registry
from xbench.records import RunFolder
from xbench.runner import RunConfig, Runner


def _config(data, **overrides) -> RunConfig:
    base = dict(explainers="gradcam", metrics="average-drop,average-increase,forward-passes",
                model="toy-cnn", data=str(data), batch_size=1, device="cpu", channels_last=False)
    base.update(overrides)
    return RunConfig(**base)


# -- kill -9 at random points --------------------------------------------------------------

DRILL_PLUGIN = '''
import xbench
from xbench.testing import toy_model

class DrillToy(xbench.Model):
    name = "toy-cnn"
    def load(self):
        return toy_model(seed=0).loaded

class SlowDrillToy(DrillToy):
    name = "slow-toy-cnn"
    def load(self):
        import time
        time.sleep(1.5)  # the model and engine set-up of a real run, between check and write
        return super().load()

@xbench.hookimpl
def register_models(register):
    register(DrillToy)
    register(SlowDrillToy)
'''


@pytest.fixture
def drill_env(tmp_path):
    """A subprocess environment where the toy model is an installed (entry-point) plugin."""
    site = tmp_path / "site"
    info = site / "xbench_drill-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: xbench-drill\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[xbench]\ndrill = xbench_drill\n")
    (site / "xbench_drill.py").write_text(textwrap.dedent(DRILL_PLUGIN))
    return {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}


def test_kill_9_at_20_random_points_then_resume_gives_byte_identical_rows(tmp_path, drill_env):
    data = tmp_path / "imgs"
    write_images(data, [f"im{i}.png" for i in range(8)], size=36)
    command = [sys.executable, "-m", "xbench", "run", "--model", "toy-cnn", "--data", str(data),
               "--explainers", "gradcam", "--metrics", "average-drop,forward-passes",
               "--batch-size", "1", "--no-leaderboard", "--device", "cpu", "--name", "r"]
    subprocess.run(command + ["--output", str(tmp_path / "ref")], env=drill_env, check=True,
                   capture_output=True)
    reference = (tmp_path / "ref" / "r" / "rows.jsonl").read_bytes()
    progress = tmp_path / "run" / "r" / "progress.jsonl"
    total_units = 16
    rng = random.Random(0)
    kills = 0
    for attempt in range(20):
        target = rng.randrange(0, total_units)
        process = subprocess.Popen(command + ["--output", str(tmp_path / "run"), "--resume"],
                                   env=drill_env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        while process.poll() is None:
            done = progress.read_bytes().count(b"\n") if progress.exists() else 0
            if done >= target:
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.001)
        kills += process.wait() == -signal.SIGKILL
    final = subprocess.run(command + ["--output", str(tmp_path / "run"), "--resume"],
                           env=drill_env, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    assert kills >= 15  # most attempts really were killed mid-run
    rows = (tmp_path / "run" / "r" / "rows.jsonl").read_bytes()
    assert rows == reference
    units = [json.loads(line)["unit"] for line in progress.read_text().splitlines()]
    assert len(units) == len(set(units)) == total_units


# -- plugins that misbehave ------------------------------------------------------------------

class _Hangs(xbench.Explainer):
    name = "hangs"
    needs_gradients = False

    def explain(self, model, images, targets):
        time.sleep(30)
        return torch.ones(len(images), 4, 4)


class _WrongDevice(xbench.Explainer):
    name = "wrong-device"
    needs_gradients = False

    def explain(self, model, images, targets):
        return torch.ones(len(images), 4, 4, device="meta")


class _LeaksHooks(xbench.Explainer):
    name = "leaks-hooks"
    needs_gradients = False

    def explain(self, model, images, targets):
        model.layer(None).register_forward_hook(lambda m, i, o: o * 0)  # corrupts later passes
        return torch.rand(len(images), 4, 4, generator=torch.Generator().manual_seed(0)) + 0.1


class _InfMap(xbench.Explainer):
    name = "inf-map"
    needs_gradients = False

    def explain(self, model, images, targets):
        maps = torch.rand(len(images), 4, 4)
        maps[:, 0, 0] = float("inf")
        return maps


def _bad_registry():
    @xbench.hookimpl
    def register_explainers(register):
        for cls in (_Hangs, _WrongDevice, _LeaksHooks, _InfMap):
            register(cls)

    plugin = types.SimpleNamespace(register_explainers=register_explainers)
    return build_registry(extra_plugins=[("toy", _toy_plugin()), ("bad", plugin)])


def test_misbehaving_plugins_are_recorded_and_the_matrix_completes(tmp_path):
    data = tmp_path / "imgs"
    write_images(data, ["a.png", "b.png"], size=36)
    registry = _bad_registry()
    clean = Runner(_config(data), registry, tmp_path / "clean").run().folder
    config = _config(data, explainers="hangs,wrong-device,leaks-hooks,inf-map,gradcam",
                     timeout=0.3)
    started = time.perf_counter()
    summary = Runner(config, registry, tmp_path / "out").run()
    assert time.perf_counter() - started < 20  # two 30 s hangs were cut at 0.3 s each
    rows = list(summary.folder.rows())
    by = lambda name: [r for r in rows if r.explainer == name]  # noqa: E731
    assert [r.status for r in by("hangs")] == ["failed", "failed"]
    assert "exceeded the 0.3 s time limit" in by("hangs")[0].error
    assert all(r.status == "failed" and "meta" in r.error for r in by("wrong-device"))
    assert all(r.status == "failed" and "left 1 hook(s)" in r.error for r in by("leaks-hooks"))
    assert all(r.status == "ok" for r in by("inf-map"))
    assert all(r.degenerate == (r.metric != "forward-passes") for r in by("inf-map"))
    # gradcam after the leaky plugin scores exactly as in a clean run: the hook was removed
    grad = [(r.image, r.column, r.value) for r in by("gradcam")]
    assert grad == [(r.image, r.column, r.value) for r in clean.rows() if r.explainer == "gradcam"]
    assert summary.failed_cells == 6


# -- images that are not what they claim -----------------------------------------------------

def _png_header_only(path, width, height):
    """A PNG announcing width x height pixels with no data: opening must not allocate them."""
    def chunk(kind, payload):
        return (struct.pack(">I", len(payload)) + kind + payload
                + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_bad_images_are_named_in_failures_and_the_run_completes(tmp_path):
    data = tmp_path / "imgs"
    write_images(data, ["good.jpg"], size=64)
    raw = (data / "good.jpg").read_bytes()
    (data / "truncated.jpg").write_bytes(raw[: len(raw) // 2])
    (data / "zero.jpg").write_bytes(b"")
    (data / "notanimage.png").write_text("hello")
    _png_header_only(data / "huge.png", 20000, 20000)
    rgb = np.full((40, 40, 3), 90, np.uint8)
    Image.fromarray(rgb).convert("CMYK").save(data / "cmyk.jpg")
    Image.fromarray(rgb[..., 0]).save(data / "grey.png")
    Image.fromarray(np.full((40, 40), 30000, np.uint16)).save(data / "deep16.png")
    registry = build_registry(extra_plugins=[("toy", _toy_plugin())])
    summary = Runner(_config(data), registry, tmp_path / "out").run()
    rows = list(summary.folder.rows())
    failed = {r.image: r.error for r in rows if r.status == "failed"}
    assert set(failed) == {"truncated.jpg", "zero.jpg", "notanimage.png", "huge.png"}
    assert all(name in error for name, error in failed.items())
    assert "20000" in failed["huge.png"] or "decompression" in failed["huge.png"].lower()
    explained = {r.image for r in rows if r.explainer == "gradcam" and r.status == "ok"}
    assert explained == {"good.jpg", "cmyk.jpg", "grey.png", "deep16.png"}
    assert summary.failed_images == 4


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file_is_a_failure(tmp_path):
    data = tmp_path / "imgs"
    write_images(data, ["a.png", "b.png"], size=36)
    (data / "b.png").chmod(0)
    registry = build_registry(extra_plugins=[("toy", _toy_plugin())])
    rows = list(Runner(_config(data), registry, tmp_path / "out").run().folder.rows())
    assert [r.image for r in rows if r.status == "failed"] == ["b.png"]


# -- the disk fills up -----------------------------------------------------------------------

def test_full_disk_stops_cleanly_and_resume_completes(tmp_path, monkeypatch):
    data = tmp_path / "imgs"
    write_images(data, [f"im{i}.png" for i in range(3)], size=36)
    registry = build_registry(extra_plugins=[("toy", _toy_plugin())])
    reference = Runner(_config(data), registry, tmp_path / "ref").run().folder
    original = RunFolder.append_raw_unit
    calls = {"n": 0}

    def full_disk(self, unit, payload):
        calls["n"] += 1
        if calls["n"] == 4:
            with self.rows_path.open("ab") as handle:  # part of the unit made it to disk
                handle.write(payload[:50])
            raise OSError(errno.ENOSPC, "No space left on device")
        original(self, unit, payload)

    monkeypatch.setattr(RunFolder, "append_raw_unit", full_disk)
    with pytest.raises(UserError, match="No space left on device.*--resume"):
        Runner(_config(data), registry, tmp_path / "run").run()
    assert not (tmp_path / "run" / Runner(_config(data), registry, tmp_path).run_name
                / "LOCK").exists()
    monkeypatch.setattr(RunFolder, "append_raw_unit", original)
    summary = Runner(_config(data), registry, tmp_path / "run").run(resume=True)
    assert summary.folder.rows_path.read_bytes() == reference.rows_path.read_bytes()


# -- two runs on one folder ------------------------------------------------------------------

def test_two_runs_on_one_folder_exactly_one_writes_and_no_row_is_lost(tmp_path, drill_env):
    """Two runs on one --output/--name, the second started 0, 1 and 3 s after the first, in both
    orders; the six scenarios run side by side (each in its own folder) to keep the drill short.
    The slow-loading toy leaves the 1.5 s window between the folder check and the first write
    that a real model's set-up leaves."""
    data = tmp_path / "imgs"
    write_images(data, ["a.png", "b.png"], size=36)

    def start(explainer, out):
        return subprocess.Popen(
            [sys.executable, "-m", "xbench", "run", "--model", "slow-toy-cnn", "--data",
             str(data), "--explainers", explainer, "--metrics", "forward-passes",
             "--batch-size", "1", "--no-leaderboard", "--device", "cpu", "--engine", "eager",
             "--output", str(out), "--name", "same"],
            env=drill_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    scenarios = [(offset, first, second) for offset in (0, 1, 3)
                 for first, second in (("gradcam", "layercam"), ("layercam", "gradcam"))]
    processes = {}
    for offset, first, second in scenarios:
        processes[offset, first] = {first: start(first, tmp_path / f"{offset}-{first}")}
    began = time.perf_counter()
    for offset, first, second in sorted(scenarios):
        time.sleep(max(0.0, began + offset - time.perf_counter()))
        processes[offset, first][second] = start(second, tmp_path / f"{offset}-{first}")
    for (offset, first), pair in processes.items():
        results = {name: (process.wait(), process.communicate()[1])
                   for name, process in pair.items()}
        winners = [name for name, (code, _) in results.items() if code == 0]
        assert len(winners) == 1, (offset, first, results)
        (loser_code, loser_err), = [result for name, result in results.items()
                                    if name != winners[0]]
        assert loser_code == 2, loser_err
        assert ("in use by another xbench run (process" in loser_err
                or "already holds a run" in loser_err), loser_err
        folder = RunFolder(tmp_path / f"{offset}-{first}" / "same")
        rows = list(folder.rows())
        assert len(folder.finished_units()) == folder.header().units_total == 4
        assert sorted((r.image, r.explainer) for r in rows) == sorted(
            (image, explainer) for image in ("a.png", "b.png") for explainer in ("", winners[0]))
        assert not (folder.path / "LOCK").exists()


# -- records that cannot be read --------------------------------------------------------------

def _cli_registry(monkeypatch, registry):
    """Make in-process `xbench ...` commands use ``registry`` (the toy model and friends)."""
    import xbench.cli.run
    import xbench.plugins

    monkeypatch.setattr(xbench.cli.run, "build_registry", lambda blocked=(): registry)
    monkeypatch.setattr(xbench.plugins, "build_registry", lambda blocked=(): registry)


def _cli_run(data, out, *extra):
    from xbench.cli import main

    return main(["run", "--model", "toy-cnn", "--data", str(data), "--metrics",
                 "average-drop,forward-passes", "--batch-size", "1", "--device", "cpu",
                 "--no-channels-last", "--output", str(out), *extra])


def test_one_corrupt_record_is_named_and_never_blocks_other_runs(tmp_path, monkeypatch,
                                                                 capsys):
    from xbench import leaderboard
    from xbench.cli import main

    data = tmp_path / "imgs"
    write_images(data, ["a.png", "b.png"], size=36)
    registry = build_registry(extra_plugins=[("toy", _toy_plugin())])
    _cli_registry(monkeypatch, registry)
    out = tmp_path / "out"
    for name in ("good", "corrupt", "old-schema"):
        assert _cli_run(data, out, "--explainers", "gradcam", "--name", name) == 0
    corrupt = RunFolder(out / "corrupt")
    lines = corrupt.rows_path.read_bytes().split(b"\n")
    lines[1] = lines[1][:40]  # the hand-edit that left an unterminated string
    corrupt.rows_path.write_bytes(b"\n".join(lines))
    header = json.loads((out / "old-schema" / "run.json").read_text())
    header["schema_version"] = 0
    (out / "old-schema" / "run.json").write_text(json.dumps(header))
    capsys.readouterr()

    skipped = []
    markdown, _ = leaderboard.render(out, skipped)
    assert "## good" in markdown
    assert any(f"{corrupt.rows_path}:2: not valid JSON" in problem for problem in skipped)
    assert any("schema version 0" in problem for problem in skipped)
    assert f"{corrupt.rows_path}:2" in markdown  # listed in the leaderboard itself

    # a later run in the same folder succeeds, prints its summary and names the bad sibling
    assert _cli_run(data, out, "--explainers", "gradcam", "--name", "later") == 0
    err = capsys.readouterr().err
    assert "records in" in err and f"{corrupt.rows_path}:2" in err
    assert "## later" in (out / "LEADERBOARD.md").read_text()

    assert main(["leaderboard", str(out), "--check"]) == 1
    assert f"{corrupt.rows_path}:2" in capsys.readouterr().err
    with pytest.raises(UserError, match=rf"rows.jsonl:2: not valid JSON.*xbench check"):
        list(corrupt.rows())

    # xbench check names each bad line (JSON, schema, progress log) and passes a sound run
    assert main(["check", str(out / "good")]) == 0
    lines[3] = re.sub(rb'"index": \d+', b'"index": "one"', lines[3])
    corrupt.rows_path.write_bytes(b"\n".join(lines))
    with corrupt.progress_path.open("ab") as handle:
        handle.write(b'{"unit": "batch000009:gradcam:head", "rows_bytes": 3}\n')
    assert main(["check", str(out / "corrupt"), str(out / "old-schema")]) == 1
    err = capsys.readouterr().err
    assert f"{corrupt.rows_path}:2: not valid JSON" in err
    assert f"{corrupt.rows_path}:4: field 'index' has str 'one'" in err
    assert f"{corrupt.progress_path}:5: rows_bytes 3 goes back" in err
    assert "schema version 0" in err


# -- outputs that cannot be written ------------------------------------------------------------

def test_unwritable_outputs_fail_at_once_before_loading_anything(tmp_path, monkeypatch, capsys):
    from xbench.cli import main

    data = tmp_path / "imgs"
    write_images(data, ["a.png"], size=36)
    registry = build_registry(extra_plugins=[("toy", _toy_plugin())])

    def no_loading(self):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(Runner, "_load_model", no_loading)
    a_file = tmp_path / "file"
    a_file.write_text("not a folder")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "taken").write_text("a file where the run folder goes")
    # /proc takes no new folders, even from root; a file as --output; a file as the run folder
    for out, name in [(Path("/proc/x"), None), (a_file, None), (tmp_path / "out", "taken")]:
        started = time.perf_counter()
        with pytest.raises(UserError, match="cannot write results to"):
            Runner(_config(data), registry, out, name=name).run()
        assert time.perf_counter() - started < 1
    with pytest.raises(UserError, match=r"--name '../x'.*inside --output"):
        Runner(_config(data), registry, tmp_path / "out", name="../x")
    _cli_registry(monkeypatch, registry)
    assert _cli_run(data, a_file, "--explainers", "gradcam") == 2
    assert "cannot write results to" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_overwrite_removes_everything_the_old_run_wrote(tmp_path):
    data = tmp_path / "imgs"
    write_images(data, ["a.png", "b.png"], size=36)
    registry = build_registry(extra_plugins=[("toy", _toy_plugin())])
    folder = Runner(_config(data), registry, tmp_path / "out").run().folder
    assert list((folder.path / "maps").iterdir())
    (folder.path / "report.html").write_text("<html>old run</html>")
    (folder.path / "shards" / "rank001").mkdir(parents=True)
    config = _config(data, save_maps=False, explainers="layercam")
    Runner(config, registry, tmp_path / "out").run(overwrite=True)
    assert sorted(p.name for p in folder.path.iterdir()) == ["progress.jsonl", "rows.jsonl",
                                                             "run.json"]
    assert {r.explainer for r in folder.rows()} == {"", "layercam"}


# -- failures the console must explain -------------------------------------------------------

class _Raises(xbench.Explainer):
    name = "raises"
    needs_gradients = False
    uses_layer = False

    def explain(self, model, images, targets):
        raise ValueError("boom")


def test_a_layer_without_a_spatial_map_is_refused_before_set_up(tmp_path, monkeypatch):
    data = tmp_path / "imgs"
    write_images(data, ["a.png"], size=36)
    registry = build_registry(extra_plugins=[("toy", _toy_plugin())])

    def no_engine(self, handle):
        raise AssertionError("the engine was set up before the layers were checked")

    monkeypatch.setattr(Runner, "_start_engine", no_engine)
    with pytest.raises(UserError, match="has no spatial map") as refused:
        Runner(_config(data, layers="fc"), registry, tmp_path / "out").run()
    assert "block.1, block, head" in str(refused.value) and "'head'" in str(refused.value)
    with pytest.raises(UserError, match="model 'toy-cnn' has no layer 'nope'") as unknown:
        Runner(_config(data, layers="nope"), registry, tmp_path / "out2").run()
    hint = str(unknown.value)
    # only layers a CAM can use are suggested: a spatial map larger than 1 x 1 (not the
    # global pool's, a constant map), run once per forward
    assert "act.head" in hint and "pool" not in hint and "fc" not in hint


def test_the_summary_says_why_cells_failed_and_both_counts_agree(tmp_path, monkeypatch, capsys):
    data = tmp_path / "imgs"
    write_images(data, ["a.png", "b.png"], size=36)
    (data / "c.png").write_text("not an image")

    @xbench.hookimpl
    def register_explainers(register):
        register(_Raises)

    registry = build_registry(extra_plugins=[
        ("toy", _toy_plugin()),
        ("raises", types.SimpleNamespace(register_explainers=register_explainers))])
    _cli_registry(monkeypatch, registry)
    assert _cli_run(data, tmp_path / "out", "--explainers", "raises,gradcam") == 1
    captured = capsys.readouterr()
    assert "2 failed cells, 1 unreadable images; most frequent reasons:" in captured.out
    assert "2x raises: explainer 'raises' on a.png: ValueError: boom" in captured.out
    assert "1x reading images: cannot read" in captured.out
    assert "2 failed cells, 1 unreadable images in" in captured.err


# -- xbench explain ------------------------------------------------------------------------------

def test_explain_refuses_a_missing_output_folder_and_a_flat_layer(tmp_path, monkeypatch, capsys):
    from xbench.cli import main

    image = write_images(tmp_path / "imgs", ["a.png"], size=36)[0]
    _cli_registry(monkeypatch, build_registry(extra_plugins=[("toy", _toy_plugin())]))
    common = ["explain", str(image), "--model", "toy-cnn", "--device", "cpu"]
    assert main(common + ["--output", str(tmp_path / "missing" / "x.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(common + ["--layer", "fc", "--output", str(tmp_path / "x.png")]) == 2
    assert "has no spatial map" in capsys.readouterr().err
    assert main(common + ["--output", str(tmp_path / "x.png")]) == 0


# -- time per image and host load ---------------------------------------------------------------

def test_time_is_per_image_with_the_batch_time_kept_and_host_load_recorded(tmp_path,
                                                                           monkeypatch, capsys):
    data = tmp_path / "imgs"
    write_images(data, ["a.png", "b.png", "c.png"], size=36)
    registry = build_registry(extra_plugins=[("toy", _toy_plugin())])
    monkeypatch.setattr(os, "getloadavg", lambda: (64.0, 32.0, 16.0))
    summary = Runner(_config(data, metrics="time,forward-passes", batch_size=2), registry,
                     tmp_path / "out").run()
    rows = [r for r in summary.folder.rows() if r.explainer == "gradcam"]
    timed = [r for r in rows if r.metric == "time"]
    assert [r.batch_images for r in timed] == [2, 2, 1]
    assert all(r.value == pytest.approx(r.batch_seconds / r.batch_images) for r in timed)
    assert timed[0].batch_seconds == timed[1].batch_seconds
    assert all(r.batch_seconds is None for r in rows if r.metric != "time")
    load = summary.folder.header().host_load
    assert load["start"] == load["end"] == [64.0, 32.0, 16.0]
    assert load["cores"] == os.cpu_count() and summary.host_overloaded
    _cli_registry(monkeypatch, registry)
    assert _cli_run(data, tmp_path / "cli", "--explainers", "gradcam") == 0
    assert "timings of a busy host are not comparable" in capsys.readouterr().err


# -- progress ------------------------------------------------------------------------------------

def test_progress_labels_the_running_unit_and_weighs_it_by_its_forward_passes(tmp_path):
    import contextlib

    data = tmp_path / "imgs"
    write_images(data, ["a.png", "b.png"], size=36)
    registry = build_registry(extra_plugins=[("toy", _toy_plugin())])
    calls = []

    @contextlib.contextmanager
    def recorder(total, completed=0, description=""):
        calls.append(("total", total))
        yield lambda running, amount=0, completed=None: calls.append((running, amount))

    config = _config(data, explainers="gradcam,rise", metrics="forward-passes",
                     options=("rise.n_masks=40",))
    Runner(config, registry, tmp_path / "out", progress=recorder).run()
    metrics = 1
    weights = {"images": 1, "gradcam @head": 1 + metrics, "rise": 40 + metrics}
    expected = [("total", 2 * sum(weights.values()))]
    for index in range(2):
        for unit, weight in weights.items():
            expected += [(f"batch {index}: {unit}", 0), (f"batch {index}: {unit}", weight)]
    assert calls == expected


# -- records written by another schema version ----------------------------------------------

def test_results_from_another_schema_version_are_refused_clearly(tmp_path):
    data = tmp_path / "imgs"
    write_images(data, ["a.png"], size=36)
    registry = build_registry(extra_plugins=[("toy", _toy_plugin())])
    folder = Runner(_config(data), registry, tmp_path / "out").run().folder
    header = json.loads(folder.header_path.read_text())
    header["schema_version"] = 0
    folder.header_path.write_text(json.dumps(header))
    with pytest.raises(UserError, match="schema version 0.*reads version 1"):
        Runner(_config(data), registry, tmp_path / "out").run(resume=True)
    from xbench import leaderboard

    skipped = []
    leaderboard.render(tmp_path / "out", skipped)  # listed, not fatal: other runs still show
    assert len(skipped) == 1 and "schema version 0" in skipped[0]
