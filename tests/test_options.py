"""Declared plugin options: conversion by type, checks, variants, and the reference runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import xbench
from xbench import OptionError
from xbench.plugins import build_registry

RESULTS = Path(__file__).resolve().parents[1] / "results"
REGISTRY = build_registry()


class _Sampler(xbench.Explainer):
    name = "sampler"

    class Options(xbench.Options):
        n_samples: int = xbench.option(8, "noisy copies averaged", minimum=1, maximum=1000)
        sigma: float = xbench.option(0.15, "noise level", above=0.0)
        mode: str = xbench.option("abs", "how gradients are combined", choices=("abs", "square"))
        smooth: bool = xbench.option(True, "smooth the map")
        scales: tuple[float, ...] = xbench.option((1.0,), "input scales", above=0.0)
        batch_size: int | None = xbench.option(None, "copies per pass", minimum=1,
                                               in_variant=False)

    profiles = {"quick": {"n_samples": 4}}

    def explain(self, model, images, targets):
        raise NotImplementedError


@pytest.mark.parametrize("key, raw, expected", [
    ("n_samples", "16", 16),
    ("sigma", "0.3", 0.3),
    ("sigma", "1", 1.0),
    ("mode", "square", "square"),
    ("smooth", "false", False),
    ("smooth", "Yes", True),
    ("scales", "0.5,1,2", (0.5, 1.0, 2.0)),
    ("scales", "(0.5, 1.0)", (0.5, 1.0)),
    ("batch_size", "none", None),
    ("batch_size", "32", 32),
])
def test_command_line_values_convert_by_declared_type(key, raw, expected):
    value = _Sampler.parse_option(key, raw)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("key, raw, message", [
    ("n_samples", "abc", "explainer 'sampler': option n_samples expects integer, got 'abc'"),
    ("n_samples", "1.5", "option n_samples expects integer, got '1.5'"),
    ("n_samples", "0", "option n_samples must be >= 1 and <= 1000, got 0"),
    ("n_samples", "1001", "option n_samples must be >= 1 and <= 1000, got 1001"),
    ("sigma", "0", "option sigma must be > 0, got 0"),
    ("sigma", "nan", "option sigma must be a finite number, got nan"),
    ("mode", "cube", "option mode must be one of abs, square, got cube"),
    ("smooth", "maybe", "option smooth expects true/false, got 'maybe'"),
    ("scales", "1,x", "option scales expects comma-separated numbers, got '1,x'"),
    ("n_sample", "3", "unknown option 'n_sample'. Did you mean 'n_samples'\\? Valid options: "
                      "n_samples, sigma, mode, smooth, scales, batch_size."),
])
def test_bad_command_line_values_name_key_type_and_bounds(key, raw, message):
    with pytest.raises(OptionError, match=message):
        _Sampler.parse_option(key, raw)


def test_python_values_are_checked_the_same_way():
    assert _Sampler(n_samples=16, sigma=1).options.sigma == 1.0  # int accepted for a float
    with pytest.raises(OptionError, match="option n_samples expects integer, got '16'"):
        _Sampler(n_samples="16")
    with pytest.raises(OptionError, match="option smooth expects true/false, got 1"):
        _Sampler(smooth=1)
    with pytest.raises(OptionError, match="unknown option 'layers'"):
        _Sampler(layers="x")
    assert isinstance(_Sampler().options, _Sampler.Options)
    with pytest.raises(Exception):  # frozen: options never change after construction
        _Sampler().options.n_samples = 3


def test_variant_lists_changed_output_options_in_declaration_order():
    assert _Sampler().variant == ""
    assert _Sampler(layer="x", seed=3).variant == ""  # harness arguments are not options
    assert _Sampler(batch_size=4).variant == ""  # declared in_variant=False
    assert _Sampler(n_samples=4, smooth=False).variant == "n_samples=4,smooth=false"
    assert _Sampler(sigma=0.25, scales=(0.5, 1.0), n_samples=8).variant == "sigma=0.25,scales=0.5/1"
    assert _Sampler(mode="square").variant == "mode=square"


def test_options_of_a_plugin_without_declarations_are_refused():
    class Plain(xbench.Metric):
        name = "plain"
        direction = "higher"

        def score(self, batch):
            return {}

    with pytest.raises(OptionError, match="metric 'plain': unknown option 'k'. Valid options: none"):
        Plain(k=1)
    assert Plain().variant == "" and Plain().row_variant("r=1") == "r=1"


def test_metric_rows_record_the_key_and_the_changed_options():
    class Noisy(xbench.Metric):
        name = "noisy"
        direction = "higher"

        class Options(xbench.Options):
            n: int = xbench.option(2, "draws", minimum=1)

        def score(self, batch):
            return {}

    assert Noisy(n=5).row_variant("") == "n=5"
    assert Noisy(n=5).row_variant("r=50%") == "r=50%,n=5"
    assert Noisy().row_variant("r=50%") == "r=50%"


def test_models_declare_weights_and_their_own_options():
    mutual = REGISTRY.model("mutual-transfer")
    assert [s.name for s in mutual.option_specs()] == ["weights", "checkpoint", "member"]
    model = mutual(weights="w.pt", member="st2")
    assert (model.weights, model.checkpoint, model.options.member) == ("w.pt", "w.pt", "st2")
    with pytest.raises(OptionError, match="model 'efficientnet-lite0': unknown option 'member'"):
        REGISTRY.model("efficientnet-lite0")(member="st1")


def _reference_runs() -> list[Path]:
    return sorted(p.parent for p in RESULTS.glob("*/rows.jsonl"))


@pytest.mark.parametrize("run", _reference_runs(), ids=lambda p: p.name)
def test_reference_run_variants_are_recomputed_from_their_recorded_options(run):
    """Rows of the committed runs keep their variants: the options recorded in each run's
    header give back, through the declared options, exactly the variants of its rows."""
    config = json.loads((run / "run.json").read_text())["config"]
    recorded: dict[str, set[str]] = {}
    metric_keys: dict[str, set[str]] = {}
    for line in (run / "rows.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["explainer"]:
            recorded.setdefault(row["explainer"], set()).add(row["explainer_variant"])
        if row["metric"] in config["metrics"]:
            metric_keys.setdefault(row["metric"], set()).add(row["variant"])
    for name in config["explainers"]:
        explainer = REGISTRY.explainer(name)(**config["plugin_options"][name])
        assert recorded[name] == {explainer.variant}, name
    from xbench_plugins.average_drop import _variant as retention_variant
    from xbench_plugins.insertion_deletion import _variant as step_variant
    from xbench_plugins.randomisation import SIMILARITIES

    for name in config["metrics"]:
        metric = REGISTRY.metric(name)(**config["plugin_options"][name])
        options = metric.options
        if hasattr(options, "step"):
            keys = {step_variant(options.step, options.blur_padding)}
        elif hasattr(options, "retentions"):
            keys = {retention_variant(r, options.masking) for r in options.retentions}
        elif hasattr(options, "stages"):  # model-randomisation: a row per stage and similarity
            keys = {f"stage={f:g},similarity={s}" for f in options.stages for s in SIMILARITIES}
        elif name == "random-logit":
            keys = {f"similarity={s}" for s in SIMILARITIES}
        else:
            keys = {""}
        assert {metric.row_variant(k) for k in keys} == metric_keys[name], name


def test_profiles_are_declared_on_the_plugin_classes():
    from xbench.profiles import plugin_options, profile_names

    assert plugin_options("quick", REGISTRY.explainer("rise")) == {"n_masks": 500}
    assert plugin_options("quick", REGISTRY.explainer("scorecam")) == {"max_channels": 128}
    assert plugin_options("paper", REGISTRY.explainer("rise")) == {}
    assert plugin_options("quick", _Sampler) == {"n_samples": 4}
    assert profile_names([_Sampler, type("P", (), {"profiles": {"fast": {}}})]) == [
        "fast", "paper", "quick"]


def test_the_kit_catches_an_option_that_does_not_reach_the_variant():
    from xbench.testing import check_options_reach_variant

    class Forgetful(_Sampler):
        name = "forgetful"

        @property
        def variant(self):
            return ""

    check_options_reach_variant(_Sampler)
    with pytest.raises(AssertionError, match="explainer 'forgetful': option n_samples=1 changes "
                                             "the output but not the recorded variant"):
        check_options_reach_variant(Forgetful)
