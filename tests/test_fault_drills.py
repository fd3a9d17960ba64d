"""Fault drills: kills, bad plugins, bad images and failing disks lose nothing."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import struct
import subprocess
import sys
import textwrap
import time
import types
import zlib

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

@xbench.hookimpl
def register_models(register):
    register(DrillToy)
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
    subprocess.run(command + ["--out", str(tmp_path / "ref")], env=drill_env, check=True,
                   capture_output=True)
    reference = (tmp_path / "ref" / "r" / "rows.jsonl").read_bytes()
    progress = tmp_path / "run" / "r" / "progress.jsonl"
    total_units = 16
    rng = random.Random(0)
    kills = 0
    for attempt in range(20):
        target = rng.randrange(0, total_units)
        process = subprocess.Popen(command + ["--out", str(tmp_path / "run"), "--resume"],
                                   env=drill_env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        while process.poll() is None:
            done = progress.read_bytes().count(b"\n") if progress.exists() else 0
            if done >= target:
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.001)
        kills += process.wait() == -signal.SIGKILL
    final = subprocess.run(command + ["--out", str(tmp_path / "run"), "--resume"],
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

    with pytest.raises(UserError, match="schema version 0"):
        leaderboard.render(tmp_path / "out")
