"""LayerCAM (Jiang et al., IEEE TIP 2021): element-wise positive-gradient weighting.

    w^kc_ij = ReLU(dy^c/dA^k_ij)                     (per-location weight)
    M^c     = ReLU(sum_k w^kc_ij * A^k_ij)            (weighted activations summed over channels)

Unlike Grad-CAM's one weight per channel, every location keeps its own weight, which is what
makes LayerCAM usable on shallow, high-resolution layers (any ``--layer``). The tanh rescaling
of the paper is only for fusing maps of several layers and is not part of a single-layer
map. One forward and one backward pass.
"""

from __future__ import annotations

import torch

from xbench import Explainer, hookimpl
from xbench import Passes
from xbench_plugins.gradcam import target_layer_gradients


def layercam_map(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """(B, K, h, w) activations and gradients -> (B, h, w) LayerCAM maps."""
    return torch.relu((torch.relu(gradient) * activation).sum(dim=1))


class LayerCAM(Explainer):
    """Positive gradients as per-location weights of the activations (1 F + 1 B)."""

    name = "layercam"
    needs_gradients = True
    summary = "LayerCAM: per-location positive-gradient weights, works on shallow layers (1 F + 1 B)"
    passes = Passes(1, 1)

    def explain(self, model, images, targets):
        activation, gradient, _ = target_layer_gradients(model, self.layer, images, targets)
        return layercam_map(activation, gradient)


@hookimpl
def register_explainers(register):
    register(LayerCAM)
