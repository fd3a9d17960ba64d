"""Every built-in plugin passes the same conformance kit third-party plugins use."""

from __future__ import annotations

import pytest

from xbench.plugins import build_registry
from xbench.profiles import plugin_options
from xbench.testing import check_explainer, check_metric, check_model

REGISTRY = build_registry()
BUILTIN = lambda kind: [n for n in REGISTRY.names(kind)  # noqa: E731
                        if REGISTRY.info(kind, n).distribution == "xbench"]
# Explainers that need a trained checkpoint for the model they run on are checked in their
# own test files, on the model their shipped checkpoint belongs to.
NEEDS_CHECKPOINT = {"lcam-fm", "lcam-img"}


@pytest.mark.parametrize("name", [n for n in BUILTIN("explainer") if n not in NEEDS_CHECKPOINT])
def test_builtin_explainer_conforms(name):
    check_explainer(REGISTRY.explainer(name), options=plugin_options("quick", REGISTRY.explainer(name)))


@pytest.mark.parametrize("name", BUILTIN("metric"))
def test_builtin_metric_conforms(name):
    check_metric(REGISTRY.metric(name), options=plugin_options("quick", REGISTRY.metric(name)))


@pytest.mark.parametrize("name", ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"])
def test_efficientnet_lite_conforms(name):
    loaded = check_model(REGISTRY.model(name))
    assert loaded.default_layer == "_swish._bn1"
    assert loaded.mean == (127 / 255,) * 3 and loaded.std == (128 / 255,) * 3
