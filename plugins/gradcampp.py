"""Grad-CAM++ (Chattopadhyay et al., WACV 2018), closed-form weights with exponential output.

With S^c = exp(Y^c) (Y^c the pre-softmax target score) and g = dY^c/dA^k_ij, the higher-order
derivatives of S^c are exp(Y^c) g^2 and exp(Y^c) g^3 (Y^c piecewise linear in A, as in ReLU
networks), and the paper's closed-form solution becomes

    alpha^kc_ij = g_ij^2 / (2 g_ij^2 + sum_ab A^k_ab g_ij^3)    (closed-form alpha, exp output)
    w^c_k       = sum_ij alpha^kc_ij ReLU(dS^c/dA^k_ij)        (pixel-weighted gradients)
    L^c_ij      = ReLU(sum_k w^c_k A^k_ij)                     (class saliency map)

exp(Y^c) cancels in alpha; in w it is one positive factor per image, which min-max
normalisation removes, so it is dropped (this also avoids exp overflow on large logits). Where
the denominator is 0 (g = 0 gives 0/0) alpha is set to 0; such a term has ReLU(g) = 0 and adds
nothing to w either way. A negative denominator is kept as the formula gives it.
One forward and one backward pass (the gradients come from ``target_layer_gradients``).
"""

from __future__ import annotations

import torch

from xbench import Explainer, hookimpl
from xbench import Passes
from xbench_plugins.gradcam import target_layer_gradients


def gradcampp_weights(activation: torch.Tensor, gradient: torch.Tensor,
                      eps: float = 0.0) -> torch.Tensor:
    """Channel weights w^c_k (B, K, 1, 1) from A and dY^c/dA, both (B, K, h, w).

    ``eps`` is added to the denominator; 0 is the paper. pytorch-grad-cam adds 1e-6, which is
    not negligible: mid-network gradients are ~1e-4..1e-3, so 2 g^2 is itself ~1e-7..1e-6
    (tests/test_explainers.py shows the peer equals this formula with eps=1e-6).
    """
    g2 = gradient.pow(2)
    g3 = g2 * gradient
    denominator = 2 * g2 + activation.sum(dim=(2, 3), keepdim=True) * g3 + eps  # alpha's denominator
    alpha = torch.where(denominator != 0, g2 / torch.where(denominator != 0, denominator, 1), 0)
    return (alpha * torch.relu(gradient)).sum(dim=(2, 3), keepdim=True)  # w^c_k, exp(Y^c) dropped


class GradCAMPlusPlus(Explainer):
    """L^c = ReLU(sum_k w^c_k A^k) with the closed-form Grad-CAM++ weights (1 F + 1 B)."""

    name = "gradcam++"
    needs_gradients = True
    summary = "Grad-CAM++: closed-form pixel-weighted gradients, exponential output (1 F + 1 B)"
    passes = Passes(1, 1)

    def explain(self, model, images, targets):
        activation, gradient, _ = target_layer_gradients(model, self.layer, images, targets)
        weights = gradcampp_weights(activation, gradient)
        return torch.relu((weights * activation).sum(dim=1))  # L^c = ReLU(sum_k w_k A^k)


@hookimpl
def register_explainers(register):
    register(GradCAMPlusPlus)
