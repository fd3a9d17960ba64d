"""A third-party plugin package installed with pip is discovered and passes the kit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from xbench.plugins import build_registry
from xbench.testing import check_explainer, check_metric

EXAMPLE = Path(__file__).parent / "example_plugin"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """pip-install the example package (no deps) into a private target folder on sys.path."""
    target = tmp_path_factory.mktemp("site")
    build = tmp_path_factory.mktemp("build")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--no-index", "--target", str(target), str(EXAMPLE)],
                   check=True, cwd=build, env={**os.environ, "PIP_NO_INPUT": "1"})
    sys.path.insert(0, str(target))
    yield target
    sys.path.remove(str(target))
    for name in [m for m in sys.modules if m.startswith("xbench_example")]:
        del sys.modules[name]


def test_installed_plugin_is_discovered_with_its_distribution(installed):
    registry = build_registry()
    info = registry.info("explainer", "vanilla-gradient")
    assert (info.plugin, info.distribution, info.version) == ("example", "xbench-example", "0.4.0")
    assert registry.info("metric", "map-mass-top15").source == "xbench-example"
    assert "xbench-example" in registry.versions()


def test_installed_plugin_passes_the_conformance_kit(installed):
    registry = build_registry()
    check_explainer(registry.explainer("vanilla-gradient"))
    scores = check_metric(registry.metric("map-mass-top15"))
    assert ((scores[""] > 0.15) & (scores[""] <= 1)).all()  # top 15% hold >= 15% of the mass


def test_cli_lists_it_and_blocks_it(installed):
    env = {**os.environ, "PYTHONPATH": str(installed), "COLUMNS": "200"}
    listed = subprocess.run([sys.executable, "-m", "xbench", "plugins", "--kind", "explainer"],
                            capture_output=True, text=True, env=env, check=False)
    assert "vanilla-gradient" in listed.stdout and "xbench-example" in listed.stdout
    blocked = subprocess.run([sys.executable, "-m", "xbench", "-p", "no:example", "plugins"],
                             capture_output=True, text=True, env=env, check=False)
    assert "vanilla-gradient" not in blocked.stdout
    disabled = subprocess.run([sys.executable, "-m", "xbench", "plugins"], capture_output=True,
                              text=True, env={**env, "XBENCH_DISABLE_PLUGIN_AUTOLOAD": "1"},
                              check=False)
    assert "vanilla-gradient" not in disabled.stdout and "gradcam" in disabled.stdout


def test_vanilla_gradient_of_a_linear_model_is_its_weights(installed):
    """y^c = sum(w * x) has gradient w: the map is max_c |w| per pixel."""
    from xbench.base import LoadedModel
    from xbench.model import ClassifierHandle

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2, bias=False))
    handle = ClassifierHandle(LoadedModel(net, 8, (0.0,) * 3, (1.0,) * 3, ("a", "b"), "1"))
    explainer = build_registry().explainer("vanilla-gradient")()
    maps = explainer.explain(handle, torch.rand(1, 3, 8, 8), torch.tensor([1]))
    expected = net[1].weight[1].view(3, 8, 8).abs().amax(dim=0)
    assert torch.allclose(maps[0], expected)


def test_declared_options_change_the_map_and_reach_the_variant(installed):
    registry = build_registry()
    cls = registry.explainer("vanilla-gradient")
    assert [s.name for s in cls.option_specs()] == ["reduce"]
    assert cls().variant == "" and cls(reduce="mean").variant == "reduce=mean"
    metric = registry.metric("map-mass-top15")
    assert metric(top=0.5).row_variant("") == "top=0.5"
    check_explainer(cls, options={"reduce": "mean"})  # the kit also checks options -> variant
    scores = check_metric(metric, options={"top": 1.0})
    assert torch.allclose(scores[""], torch.ones(2, dtype=scores[""].dtype))  # all mass in 100%


def test_its_subcommand_is_added_and_blocked_with_the_plugin(installed, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(installed), "COLUMNS": "200"}
    (tmp_path / "rows.jsonl").write_text('{"status": "ok"}\n{"status": "ok"}\n{"status": "failed"}\n')
    done = subprocess.run([sys.executable, "-m", "xbench", "example-stats", str(tmp_path)],
                          capture_output=True, text=True, env=env, check=False)
    assert (done.returncode, done.stdout) == (0, "failed 1\nok 2\n"), done.stderr
    missing = subprocess.run([sys.executable, "-m", "xbench", "example-stats", str(tmp_path / "x")],
                             capture_output=True, text=True, env=env, check=False)
    assert missing.returncode == 2 and "rows.jsonl not found" in missing.stderr
    blocked = subprocess.run([sys.executable, "-m", "xbench", "-p", "no:example", "example-stats",
                              str(tmp_path)], capture_output=True, text=True, env=env, check=False)
    assert blocked.returncode == 2 and "invalid choice: 'example-stats'" in blocked.stderr


def test_blocking_a_study_plugin_removes_its_command():
    env = {**os.environ, "COLUMNS": "200"}
    listed = subprocess.run([sys.executable, "-m", "xbench", "--help"], capture_output=True,
                            text=True, env=env, check=True)
    assert "similarity" in listed.stdout and "train" in listed.stdout
    blocked = subprocess.run([sys.executable, "-m", "xbench", "-p", "no:similarity", "similarity",
                              "--output", "x"], capture_output=True, text=True, env=env, check=False)
    assert blocked.returncode == 2 and "invalid choice: 'similarity'" in blocked.stderr
