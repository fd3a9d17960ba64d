"""Named run profiles: option values that trade fidelity for time, recorded in every row.

``paper`` is the settings of the papers (docs/protocol.md) and the default on ILSVRC2012 val;
``quick`` keeps the embedded default run (6 images, EfficientNet-Lite0, 2 CPU cores) within a
few minutes. The values are declared by each plugin on its class (``profiles = {"quick":
{...}}``), so third-party plugins take part; a plugin may also name a profile of its own.
"""

from __future__ import annotations

from typing import Any

PROFILES: tuple[str, ...] = ("paper", "quick")


def profile_names(classes: list[type]) -> list[str]:
    """The built-in profiles plus any profile a plugin declares."""
    names = set(PROFILES)
    for cls in classes:
        names.update(getattr(cls, "profiles", {}))
    return sorted(names)


def plugin_options(profile: str, cls: type) -> dict[str, Any]:
    """The options ``cls`` declares for ``profile`` (empty when it declares none)."""
    return dict(getattr(cls, "profiles", {}).get(profile, {}))
