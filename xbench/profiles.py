"""Named run profiles: plugin options that trade fidelity for time, recorded in every row.

``paper`` is the settings of the papers (docs/protocol.md) and the default on ILSVRC2012 val;
``quick`` keeps the embedded default run (6 images, EfficientNet-Lite0, 2 CPU cores) within a
few minutes. Keys are plugin names; values are constructor options of that plugin.
"""

from __future__ import annotations

from typing import Any

PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {},
    "quick": {
        # 16 steps of 3136 pixels at 224x224 instead of 224 of 224: 34 forwards per image and
        # map instead of 450. One step for all three, so they share one set of curves.
        "insertion": {"step": 3136},
        "deletion": {"step": 3136},
        "insertion-deletion": {"step": 3136},
        # Score-CAM at the default layer _swish._bn1 (K = 1280) costs 1281 forwards per image (~18 s here); the named
        # approximation scores only the 128 most active channels: 129 forwards (~1.8 s).
        "scorecam": {"max_channels": 128},
        # RISE: 500 masks instead of 4000 (~7 s per image instead of ~56 s); s and p1 as in
        # the paper. Both settings are recorded in the explainer variant of every row.
        "rise": {"n_masks": 500},
    },
}


def plugin_options(profile: str, plugin: str) -> dict[str, Any]:
    return dict(PROFILES[profile].get(plugin, {}))
