"""Plugin discovery through entry points, and what happens with bad plugins."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from xbench.errors import UserError
from xbench.plugins import build_registry

BUILTIN_EXPLAINERS = {"gradcam"}
BUILTIN_METRICS = {"average-drop", "average-increase", "forward-passes", "backward-passes", "time"}


def test_builtins_are_discovered_through_entry_points():
    registry = build_registry()
    assert BUILTIN_EXPLAINERS <= set(registry.names("explainer"))
    assert BUILTIN_METRICS <= set(registry.names("metric"))
    assert {"efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2", "resnet50",
            "vgg16"} <= set(registry.names("model"))
    info = registry.info("explainer", "gradcam")
    assert info.plugin == "gradcam" and info.distribution == "xbench" and info.source == "built-in"
    assert registry.load_errors == [], registry.load_errors


def test_unknown_name_suggests_the_closest():
    registry = build_registry()
    with pytest.raises(UserError, match=r"unknown explainer 'gradcma'.*Did you mean 'gradcam'"):
        registry.explainer("gradcma")
    with pytest.raises(UserError, match=r"Did you mean 'resnet50'"):
        registry.select("model", "resnet5O")


def test_select_all_and_lists():
    registry = build_registry()
    assert registry.select("metric", "all") == registry.names("metric")
    assert registry.select("metric", "time, average-drop") == ["time", "average-drop"]


def test_blocking_a_plugin_removes_its_classes():
    registry = build_registry(blocked=["gradcam"])
    assert "gradcam" not in registry.names("explainer")
    assert "average-drop" in registry.names("metric")


def test_blocking_a_registered_name_removes_that_class_and_says_so():
    registry = build_registry(blocked=["guided-gradcam"])
    assert "guided-gradcam" not in registry.names("explainer")
    assert "guided-backprop" in registry.names("explainer")  # same plugin, not blocked
    assert registry.blocked == {"guided-gradcam": "explainer 'guided-gradcam' of plugin "
                                                  "'guided-backprop'"}
    with pytest.raises(UserError, match="explainer 'guided-gradcam' is blocked in this command"):
        registry.info("explainer", "guided-gradcam")


def test_an_explainer_unknown_because_its_plugin_is_blocked_says_so():
    registry = build_registry(blocked=["gradcampp"])
    assert registry.blocked == {"gradcampp": "plugin 'gradcampp' from xbench 0.1.0"}
    with pytest.raises(UserError, match=r"unknown explainer 'gradcam\+\+'.*blocked in this "
                                        r"command, which may provide it: -p no:gradcampp"):
        registry.info("explainer", "gradcam++")


def test_blocking_nothing_is_an_error():
    with pytest.raises(UserError, match="-p no:gradcamm: no plugin and no explainer.*nothing was "
                                        "blocked. Did you mean 'gradcam'"):
        build_registry(blocked=["gradcamm"])


def _fake_distribution(root: Path, dist: str, entry: str, module: str, source: str) -> None:
    """An installed distribution on sys.path: dist-info metadata + entry point + module."""
    info = root / f"{dist.replace('-', '_')}-1.2.3.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(f"[xbench]\n{entry} = {module}\n")
    (root / f"{module}.py").write_text(textwrap.dedent(source))


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("badplug_")]:
        del sys.modules[name]


def test_import_error_names_plugin_and_distribution(site):
    _fake_distribution(site, "broken-dist", "broken", "badplug_import", "import not_a_module_x\n")
    registry = build_registry()
    assert any("'broken'" in e and "broken-dist 1.2.3" in e and "not_a_module_x" in e
               for e in registry.load_errors), registry.load_errors
    assert "gradcam" in registry.names("explainer")  # the others still load


def test_wrong_hook_signature_is_reported(site):
    _fake_distribution(site, "sig-dist", "sig", "badplug_sig", """
        import xbench
        @xbench.hookimpl
        def register_explainers(register, extra):
            pass
    """)
    registry = build_registry()
    assert any("'sig'" in e and "sig-dist" in e and "extra" in e for e in registry.load_errors), \
        registry.load_errors


def test_misspelt_hook_is_an_error_naming_plugin_and_distribution(site):
    _fake_distribution(site, "typo-dist", "typo", "badplug_typo", """
        import torch, xbench
        class Flat(xbench.Explainer):
            name = "flat-typo"
            def explain(self, model, images, targets):
                return torch.ones(len(images), 4, 4)
        @xbench.hookimpl
        def register_explainer(register):
            register(Flat)
    """)
    registry = build_registry()
    assert any("plugin 'typo' from distribution typo-dist 1.2.3 implements unknown hook(s) "
               "register_explainer. Did you mean 'register_explainers'" in e
               for e in registry.load_errors), registry.load_errors
    assert "gradcam" in registry.names("explainer")  # the others still load


def test_duplicate_name_is_refused_with_both_plugins_named(site):
    _fake_distribution(site, "dup-dist", "dup", "badplug_dup", """
        import torch, xbench
        class Copy(xbench.Explainer):
            name = "gradcam"
            def explain(self, model, images, targets):
                return torch.zeros(len(images), 7, 7)
        @xbench.hookimpl
        def register_explainers(register):
            register(Copy)
    """)
    registry = build_registry()
    assert any("'gradcam' is registered twice" in e and "'dup'" in e
               for e in registry.load_errors), registry.load_errors
    assert registry.info("explainer", "gradcam").distribution == "xbench"


def test_non_subclass_and_abstract_classes_are_refused(site):
    _fake_distribution(site, "bad-dist", "bad", "badplug_bad", """
        import xbench
        class NotAnExplainer:
            name = "nope"
        class Half(xbench.Metric):
            name = "half"
            direction = "higher"
        @xbench.hookimpl
        def register_explainers(register):
            register(NotAnExplainer)
        @xbench.hookimpl
        def register_metrics(register):
            register(Half)
    """)
    errors = " ".join(build_registry().load_errors)
    assert "not a subclass of xbench.Explainer" in errors
    assert "metric 'half' does not implement score" in errors


def test_autoload_off_keeps_builtins_only(site):
    _fake_distribution(site, "extra-dist", "extra", "badplug_extra", """
        import torch, xbench
        class Flat(xbench.Explainer):
            name = "flat-extra"
            needs_gradients = False
            def explain(self, model, images, targets):
                return torch.ones(len(images), 4, 4)
        @xbench.hookimpl
        def register_explainers(register):
            register(Flat)
    """)
    assert "flat-extra" in build_registry().names("explainer")
    registry = build_registry(autoload=False)
    assert "flat-extra" not in registry.names("explainer")
    assert "gradcam" in registry.names("explainer")


def test_plugins_name_prints_the_declared_options(capsys, monkeypatch):
    from xbench.cli import main

    monkeypatch.setenv("COLUMNS", "200")
    assert main(["plugins", "rise"]) == 0
    out = capsys.readouterr().out
    lines = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
             for line in out.splitlines() if line.count("│") >= 6}
    assert lines["n_masks"][:4] == ["integer", "4000", ">= 1", "yes"]
    assert lines["p1"][:4] == ["number", "0.5", "> 0 and <= 1", "yes"]
    assert lines["batch_size"][:4] == ["integer or none", "none", ">= 1", "no"]
    assert lines["profile quick"][1] == "n_masks=500"
    assert main(["plugins", "--options", "average-drop"]) == 0
    assert "one of continuous, binary" in capsys.readouterr().out
    assert main(["plugins", "rse"]) == 2
    assert "Did you mean 'rise'" in capsys.readouterr().err


def test_plugins_json_lists_options_for_tools(capsys):
    import json

    from xbench.cli import main

    assert main(["-p", "no:gradcampp", "plugins", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    by_name = {p["name"]: p for p in listing["plugins"]}
    assert "gradcam++" not in by_name and listing["blocked"] == {
        "gradcampp": "plugin 'gradcampp' from xbench 0.1.0"}
    rise = by_name["rise"]
    assert (rise["kind"], rise["distribution"], rise["needs_gradients"]) == ("explainer", "xbench", False)
    assert rise["options"][0] == {"name": "n_masks", "type": "integer", "default": 4000,
                                  "doc": "random masks N (one forward pass each)", "minimum": 1,
                                  "maximum": None, "above": None, "choices": None,
                                  "in_variant": True}
    assert rise["profiles"] == {"quick": {"n_masks": 500}}
    assert by_name["insertion"]["profiles"] == {"quick": {"step": 3136}}
    assert by_name["average-drop"]["options"][0]["default"] == [1.0, 0.5, 0.15]
    assert [o["name"] for o in by_name["mutual-transfer"]["options"]] == [
        "weights", "checkpoint", "member"]
    assert main(["plugins", "--json", "--kind", "metric", "deletion"]) == 0
    only = json.loads(capsys.readouterr().out)
    assert [p["name"] for p in only["plugins"]] == ["deletion"]
    assert only["plugins"][0]["direction"] == "lower"
