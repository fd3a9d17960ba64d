"""An example third-party plugin, as a plugin author would write it.

Installed with pip, it is found through the ``xbench`` entry-point group; nothing in xbench
needs to change. It provides:
- ``vanilla-gradient``: |d y^c / d x| max over colour channels (Simonyan et al. 2014, eq. 1);
- ``map-mass-top15``: share of the normalised map's total mass in its top 15% pixels.
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

    def explain(self, model, images, targets):
        with torch.enable_grad():
            x = images.detach().requires_grad_(True)
            score = model(x).gather(1, targets[:, None]).sum()
            (gradient,) = torch.autograd.grad(score, x)
        return gradient.abs().amax(dim=1)


class MapMassTop15(xbench.Metric):
    name = "map-mass-top15"
    direction = "higher"
    unit = "fraction"
    summary = "fraction of saliency mass in the top 15% of pixels (concentration)"

    def score(self, batch):
        flat = batch.saliency.flatten(1)
        keep = math.ceil(0.15 * flat.shape[1])
        top = flat.topk(keep, dim=1).values.sum(dim=1)
        total = flat.sum(dim=1)
        return {"": torch.where(total > 0, top / total.clamp_min(1e-12), torch.zeros_like(total))}


@xbench.hookimpl
def register_explainers(register):
    register(VanillaGradient)


@xbench.hookimpl
def register_metrics(register):
    register(MapMassTop15)
