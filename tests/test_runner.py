"""End-to-end runs on the toy model: rows, failures, resume and the leaderboard."""

from __future__ import annotations

import json
import types

import pytest
import torch

import xbench
from conftest import _toy_plugin, write_images
from xbench import leaderboard
from xbench.errors import UserError
from xbench.plugins import build_registry
from xbench.records import RunFolder
from xbench.runner import RunConfig, Runner

EXPLAINERS = "gradcam"
METRICS = "average-drop,average-increase,forward-passes,backward-passes,time"


def _config(data, **overrides) -> RunConfig:
    base = dict(explainers=EXPLAINERS, metrics=METRICS, model="toy-cnn", data=str(data),
                batch_size=2, device="cpu", channels_last=False)
    base.update(overrides)
    return RunConfig(**base)


def _comparable(folder: RunFolder) -> list[dict]:
    """Rows as dicts, with the measured wall time (the one non-deterministic value, per image
    and per batch) removed."""
    out = []
    for row in folder.rows():
        data = json.loads(row.to_json())
        if data["metric"] == "time":
            data["value"] = data["batch_seconds"] = None
        out.append(data)
    return out


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "imgs"
    write_images(folder, [f"im{i}.png" for i in range(5)], size=36)
    (tmp_path / "labels.csv").write_text("file,label\n" + "".join(
        f"im{i}.png,{i}\n" for i in range(5)))
    return folder


def _registry_with(*plugins):
    return build_registry(extra_plugins=[("toy", _toy_plugin()), *plugins])


def test_run_writes_header_rows_and_leaderboard(tmp_path, images, toy_registry):
    runner = Runner(_config(images, labels=str(tmp_path / "labels.csv")), toy_registry,
                    tmp_path / "out")
    summary = runner.run()
    header = summary.folder.header()
    assert header.config["explainers"] == ["gradcam"] and header.profile == "paper"
    assert header.dataset["images"] == 5 and len(header.dataset["subset_hash"]) == 16
    assert header.environment["packages"]["torch"] == torch.__version__
    rows = list(summary.folder.rows())
    # 5 image rows + 5 images x (3 AD + 3 AI + fw + bw + time) metric rows
    assert len(rows) == 5 + 5 * 9
    fw = [r.value for r in rows if r.metric == "forward-passes"]
    bw = [r.value for r in rows if r.metric == "backward-passes"]
    assert fw == [1.0] * 5 and bw == [1.0] * 5  # docs/protocol.md: Grad-CAM costs 1 F + 1 B
    assert {r.protocol for r in rows} == {xbench.PROTOCOL_VERSION} == {"2"} and {r.dtype for r in rows} == {"fp32"}
    assert all(r.dataset_hash == header.dataset["subset_hash"] for r in rows)
    import numpy as np

    previews = sorted((summary.folder.path / "maps").glob("*.npz"))
    assert [p.name for p in previews] == [f"batch00000{b}__gradcam__head.npz" for b in range(3)]
    first = np.load(previews[0])
    assert list(first["images"]) == ["im0.png", "im1.png"]
    assert first["maps"].shape == (2, 56, 56) and first["maps"].dtype == np.uint8
    assert first["maps"].max() == 255 and first["maps"].min() == 0  # min-max normalised
    leaderboard.write(tmp_path / "out")
    assert leaderboard.check(tmp_path / "out") == []
    text = (tmp_path / "out" / "LEADERBOARD.md").read_text()
    assert "| gradcam |" in text and "average-drop@r=100% ↓" in text
    # regenerating is byte-identical; editing the file is detected
    first = (tmp_path / "out" / "leaderboard.csv").read_bytes()
    leaderboard.write(tmp_path / "out")
    assert (tmp_path / "out" / "leaderboard.csv").read_bytes() == first
    (tmp_path / "out" / "LEADERBOARD.md").write_text(text.replace("gradcam", "gradkam"))
    assert leaderboard.check(tmp_path / "out") == [str(tmp_path / "out" / "LEADERBOARD.md")]


def test_same_command_twice_gives_the_same_rows(tmp_path, images, toy_registry):
    a = Runner(_config(images), toy_registry, tmp_path / "a").run().folder
    b = Runner(_config(images), toy_registry, tmp_path / "b").run().folder
    assert _comparable(a) == _comparable(b)


class _Crash(Exception):
    pass


@pytest.mark.parametrize("crash_after,torn", [(1, False), (3, True), (4, False)])
def test_interrupted_run_resumes_to_identical_rows(tmp_path, images, toy_registry, monkeypatch,
                                                   crash_after, torn):
    reference = Runner(_config(images), toy_registry, tmp_path / "ref").run().folder
    original = RunFolder.append_unit
    calls = {"n": 0}

    def crashing(self, unit, rows):
        if calls["n"] == crash_after:
            if torn:  # half a unit reached the disk, no progress line
                payload = "".join(r.to_json() + "\n" for r in rows)
                with self.rows_path.open("a") as handle:
                    handle.write(payload[: len(payload) // 2])
            raise _Crash
        calls["n"] += 1
        original(self, unit, rows)

    monkeypatch.setattr(RunFolder, "append_unit", crashing)
    with pytest.raises(_Crash):
        Runner(_config(images), toy_registry, tmp_path / "run").run()
    monkeypatch.setattr(RunFolder, "append_unit", original)
    runner = Runner(_config(images), toy_registry, tmp_path / "run")
    with pytest.raises(UserError, match="already holds a run. Use --resume"):
        runner.run()
    summary = runner.run(resume=True)
    assert summary.units_skipped == crash_after
    assert _comparable(summary.folder) == _comparable(reference)
    units = [json.loads(line)["unit"] for line in summary.folder.progress_path.read_text().splitlines()]
    assert len(units) == len(set(units))  # no unit twice


def test_resume_with_other_settings_is_refused(tmp_path, images, toy_registry):
    Runner(_config(images), toy_registry, tmp_path / "out", name="r").run()
    with pytest.raises(UserError, match="different settings.*seed"):
        Runner(_config(images, seed=1), toy_registry, tmp_path / "out", name="r").run(resume=True)


def test_second_writer_is_locked_out(tmp_path, images, toy_registry):
    runner = Runner(_config(images), toy_registry, tmp_path / "out")
    runner.folder.acquire_lock()
    try:
        with pytest.raises(UserError, match="in use by another xbench run"):
            Runner(_config(images), toy_registry, tmp_path / "out").run()
    finally:
        runner.folder.release_lock()


class _Raising(xbench.Explainer):
    name = "raises-on-im1"
    needs_gradients = False

    def explain(self, model, images, targets):
        model(images)
        if images.shape[0] > 1 or float(images.mean()) == _Raising.bad_mean:
            raise RuntimeError("boom")
        return torch.rand(len(images), 4, 4, generator=torch.Generator().manual_seed(0))


class _NaN(xbench.Explainer):
    name = "nan-map"
    needs_gradients = False

    def explain(self, model, images, targets):
        return torch.full((len(images), 4, 4), float("nan"))


class _WrongShape(xbench.Explainer):
    name = "wrong-shape"
    needs_gradients = False

    def explain(self, model, images, targets):
        return torch.ones(len(images), 3, 4, 4)


def _bad_plugins():
    @xbench.hookimpl
    def register_explainers(register):
        for cls in (_Raising, _NaN, _WrongShape):
            register(cls)

    return ("bad", types.SimpleNamespace(register_explainers=register_explainers))


def test_failures_are_recorded_and_the_rest_completes(tmp_path, images, monkeypatch):
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    from xbench.data import load_image

    _Raising.bad_mean = float(load_image(images / "im1.png", 37, 32).mean())
    registry = _registry_with(_bad_plugins())
    config = _config(images, explainers="gradcam,raises-on-im1,nan-map,wrong-shape",
                     metrics="average-drop,forward-passes")
    summary = Runner(config, registry, tmp_path / "out").run()
    rows = list(summary.folder.rows())
    corrupt = [r for r in rows if r.image == "corrupt.png"]
    assert len(corrupt) == 1 and corrupt[0].status == "failed"
    assert "cannot read" in corrupt[0].error and "corrupt.png" in corrupt[0].error
    raised = [r for r in rows if r.explainer == "raises-on-im1" and r.status == "failed"]
    assert [r.image for r in raised] == ["im1.png"] and "boom" in raised[0].error
    ok_raising = {r.image for r in rows if r.explainer == "raises-on-im1" and r.status == "ok"}
    assert ok_raising == {"im0.png", "im2.png", "im3.png", "im4.png"}  # retried one by one
    nan_rows = [r for r in rows if r.explainer == "nan-map" and r.metric == "average-drop"]
    assert nan_rows and all(r.degenerate and r.status == "ok" for r in nan_rows)
    # a degenerate map is scored as the all-zero map: O = p_c(0 image) for every retention
    wrong = [r for r in rows if r.explainer == "wrong-shape"]
    assert wrong and all(r.status == "failed" and "shape" in r.error for r in wrong)
    assert all(r.status == "ok" for r in rows if r.explainer == "gradcam")
    assert summary.failed_images == 1 and summary.failed_cells == len(raised) + len(wrong)


def test_bad_options_and_names_are_clear(tmp_path, images, toy_registry):
    with pytest.raises(UserError, match="Did you mean 'gradcam'"):
        Runner(_config(images, explainers="gradcm"), toy_registry, tmp_path)
    with pytest.raises(UserError, match="expected PLUGIN.KEY=VALUE"):
        Runner(_config(images, options=("gradcam",)), toy_registry, tmp_path)
    with pytest.raises(UserError, match="'gradcamm' is not a selected"):
        Runner(_config(images, options=("gradcamm.x=1",)), toy_registry, tmp_path)
    with pytest.raises(UserError, match="metric 'average-drop': option masking must be one of "
                                        "continuous, binary, got soft"):
        Runner(_config(images, options=("average-drop.masking=soft",)), toy_registry, tmp_path)
    with pytest.raises(UserError, match="model 'toy-cnn' has no layer 'hed'.*Did you mean 'head'"):
        Runner(_config(images, layers="hed"), toy_registry, tmp_path).run()


@pytest.mark.parametrize("options, message", [
    (("rise.nmasks=100",), "explainer 'rise': unknown option 'nmasks'. Did you mean 'n_masks'\\? "
                           "Valid options: n_masks, s, p1, batch_size."),
    (("rise.n_masks=abc",), "explainer 'rise': option n_masks expects integer, got 'abc'"),
    (("rise.p1=2",), "explainer 'rise': option p1 must be > 0 and <= 1, got 2"),
    (("scorecam.max_channels=none", "scorecam.batch_size=1.5"),
     "explainer 'scorecam': option batch_size expects integer or none, got '1.5'"),
])
def test_options_are_checked_by_declared_type_before_anything_loads(
        tmp_path, images, toy_registry, monkeypatch, options, message):
    import xbench.plan as plan_module

    def no_loading(*args, **kwargs):
        raise AssertionError("opened the dataset before checking the options")

    monkeypatch.setattr(plan_module, "open_dataset", no_loading)
    with pytest.raises(UserError, match=message) as caught:
        Runner(_config(images, explainers="rise,scorecam", options=options), toy_registry,
               tmp_path)
    # layer and seed are harness arguments, never listed as options
    assert "layer" not in str(caught.value) and "seed" not in str(caught.value)


def test_command_line_values_are_converted_by_the_declared_type(tmp_path, images, toy_registry):
    runner = Runner(_config(images, explainers="rise,scorecam", metrics="average-drop",
                            options=("rise.p1=0.25", "rise.n_masks=8", "scorecam.max_channels=none",
                                     "average-drop.retentions=0.5,0.15")),
                    toy_registry, tmp_path)
    assert runner.cli_options == {"rise": {"p1": 0.25, "n_masks": 8},
                                  "scorecam": {"max_channels": None},
                                  "average-drop": {"retentions": (0.5, 0.15)}}
    explainers = dict((e.name, e) for _, e in runner._explainers(["head"]))
    assert explainers["rise"].variant == "n_masks=8,p1=0.25"


def test_checkpoint_and_member_are_aliases_of_declared_options(tmp_path, images, toy_registry):
    runner = Runner(_config(images, explainers="lcam-fm,gradcam", checkpoint="head.pt"),
                    toy_registry, tmp_path)
    assert runner.cli_options == {"lcam-fm": {"checkpoint": "head.pt"}}
    with pytest.raises(UserError, match="--checkpoint: none of the selected plugins"):
        Runner(_config(images, explainers="gradcam", checkpoint="head.pt"), toy_registry, tmp_path)
    with pytest.raises(UserError, match="--member: model 'toy-cnn' has no members"):
        Runner(_config(images, explainers="gradcam", member="st2"), toy_registry, tmp_path)
    with pytest.raises(UserError, match="model 'mutual-transfer': option member must be one of "
                                        "st1, st2, got st3"):
        Runner(_config(images, explainers="gradcam", model="mutual-transfer", member="st3"),
               toy_registry, tmp_path)


class _WithDiagnostics(xbench.Explainer):
    name = "with-diagnostics"
    needs_gradients = False

    def explain(self, model, images, targets):
        model(images)
        self._count = torch.arange(len(images), dtype=torch.float64) + 10
        return torch.rand(len(images), 4, 4, generator=torch.Generator().manual_seed(0))

    def diagnostics(self):
        return {"things": self._count}


def test_explainer_diagnostics_become_rows_without_a_best(tmp_path, images):
    @xbench.hookimpl
    def register_explainers(register):
        register(_WithDiagnostics)

    registry = _registry_with(("diag", types.SimpleNamespace(register_explainers=register_explainers)))
    config = _config(images, explainers="with-diagnostics", metrics="forward-passes")
    summary = Runner(config, registry, tmp_path / "out").run()
    rows = [r for r in summary.folder.rows() if r.metric == "with-diagnostics:things"]
    assert [r.value for r in rows] == [10.0, 11.0, 10.0, 11.0, 10.0]  # batches of 2, 2, 1
    assert {r.direction for r in rows} == {""}
    table = leaderboard.matrix(leaderboard.run_frame(summary.folder))
    line = table[table.column == "with-diagnostics:things"].iloc[0]
    assert not line.best and line["mean"] == pytest.approx(10.4)


@pytest.mark.parametrize("disabled", [False, True])
def test_allocator_tuning_is_recorded_and_can_be_disabled(disabled):
    import os
    import platform
    import subprocess
    import sys

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("the allocator tuning is glibc-only")
    env = {**os.environ, "XBENCH_NO_MALLOPT": "1" if disabled else "0"}
    code = ("import torch; from xbench.environment import tune_allocator, environment; "
            "print(repr(tune_allocator())); env = environment(torch.device('cpu')); "
            "print(env['allocator']); print(env['cpu'])")
    tuned, allocator, cpu = subprocess.run([sys.executable, "-c", code], capture_output=True,
                                           text=True, env=env, check=True).stdout.splitlines()
    assert cpu and cpu != "default"  # the processor, for comparing timings across hosts
    if disabled:
        assert (tuned, allocator) == ("''", "default")
    else:
        assert "mallopt" in tuned and "mmap_threshold=1GiB" in allocator
