"""Grad-CAM (Selvaraju et al., ICCV 2017)."""

from __future__ import annotations

import torch

from xbench import ClassifierHandle, Explainer, capture_activations, hookimpl
from xbench import Passes


def target_layer_gradients(model: ClassifierHandle, layer: str | None, images: torch.Tensor,
                           targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward and one backward pass: (activations A, dy^c/dA, logits), A and grad (B,K,h,w).

    y^c is the pre-softmax score of the target class, as in the Grad-CAM paper. The images of
    a batch are independent (eval mode), so back-propagating the sum of their target scores
    gives every image its own gradient in one backward pass.
    """
    module = model.layer(layer)
    with torch.enable_grad(), capture_activations(module, keep_grad=False, name=layer) as store:
        logits = model(images.detach().requires_grad_(True))
        activation = store["activation"]
        score = logits.gather(1, targets[:, None]).sum()
        (gradient,) = torch.autograd.grad(score, activation)
    return activation.detach(), gradient.detach(), logits.detach()


class GradCAM(Explainer):
    """L^c = ReLU(sum_k alpha_k^c A^k), alpha_k^c = mean_ij dy^c/dA^k_ij (paper eqs. 1-2)."""

    name = "gradcam"
    needs_gradients = True
    summary = "Grad-CAM: gradient-weighted class activation map (1 forward + 1 backward)"
    passes = Passes(1, 1)

    def explain(self, model, images, targets):
        activation, gradient, _ = target_layer_gradients(model, self.layer, images, targets)
        weights = gradient.mean(dim=(2, 3), keepdim=True)  # eq. 1, global-average-pooled grads
        return torch.relu((weights * activation).sum(dim=1))  # eq. 2


@hookimpl
def register_explainers(register):
    register(GradCAM)
