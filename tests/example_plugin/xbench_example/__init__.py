"""An example third-party plugin, as a plugin author would write it.

Installed with pip, it is found through the ``xbench`` entry-point group; nothing in xbench
needs to change. It provides:
- ``vanilla-gradient``: |d y^c / d x| max over colour channels (Simonyan et al. 2014, eq. 1);
- ``map-mass-top15``: share of the normalised map's total mass in its top 15% pixels;
- ``xbench example-stats RUN_DIR``: a subcommand that counts a run's rows per status.
"""

from __future__ import annotations

import math

import torch

import xbench


class VanillaGradient(xbench.Explainer):
    name = "vanilla-gradient"
    needs_gradients = True
    uses_layer = False
    summary = "input gradient magnitude (Simonyan et al. 2014)"
    passes = xbench.Passes(1, 1)  # one forward and one backward per image (--dry-run)

    class Options(xbench.Options):
        reduce: str = xbench.option("max", "how colour channels are combined",
                                    choices=("max", "mean"))

    def explain(self, model, images, targets):
        with torch.enable_grad():
            x = images.detach().requires_grad_(True)
            score = model(x).gather(1, targets[:, None]).sum()
            (gradient,) = torch.autograd.grad(score, x)
        magnitude = gradient.abs()
        return magnitude.amax(dim=1) if self.options.reduce == "max" else magnitude.mean(dim=1)


class MapMassTop15(xbench.Metric):
    name = "map-mass-top15"
    direction = "higher"
    unit = "fraction"
    summary = "fraction of saliency mass in the top 15% of pixels (concentration)"
    passes = xbench.Passes(0)  # reads the map only

    class Options(xbench.Options):
        top: float = xbench.option(0.15, "share of pixels counted as the top", above=0.0,
                                   maximum=1.0)

    def score(self, batch):
        flat = batch.saliency.flatten(1)
        keep = math.ceil(self.options.top * flat.shape[1])
        top = flat.topk(keep, dim=1).values.sum(dim=1)
        total = flat.sum(dim=1)
        return {"": torch.where(total > 0, top / total.clamp_min(1e-12), torch.zeros_like(total))}


@xbench.hookimpl
def register_explainers(register):
    register(VanillaGradient)


@xbench.hookimpl
def register_metrics(register):
    register(MapMassTop15)


def add_stats_arguments(parser):
    parser.add_argument("run_dir", help="a run folder (xbench run --output)")


def run_stats(args):
    import collections
    import json
    from pathlib import Path

    rows = Path(args.run_dir) / "rows.jsonl"
    if not rows.is_file():
        raise xbench.UserError(f"xbench example-stats: {rows} not found; pass a run folder")
    counts = collections.Counter(json.loads(line)["status"]
                                 for line in rows.read_text().splitlines() if line.strip())
    for status, count in sorted(counts.items()):
        print(f"{status} {count}")
    return 0


@xbench.hookimpl
def register_commands(register):
    register("example-stats", help="count a run's rows per status (example plugin)",
             configure=add_stats_arguments, run=run_stats)
