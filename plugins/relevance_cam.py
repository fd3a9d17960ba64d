"""relevance-cam: a relevance-weighted CAM that explains shallow layers.

Follows Cheng Yan et al., "A class activation mapping algorithm that explains shallow layers"
(Computer Science 52(6A), 2025), which publishes no code: the relevance of the target class is
propagated from the output down through adjacent layers to the target layer; from it come
inter-layer (channel) relevance weights and a spatial weight map; the feature maps, masked by
the spatial map and multiplied by the channel weights, are summed, passed through ReLU and
normalised. The precise formulas below are our choices, built from the two works that paper
builds on; each choice is marked [choice].

Notation: A in R^{K x h x w} is the output of the target layer (``--layer``), y^c the
pre-softmax score of the target class c, R^{(l)} the relevance at layer l.

1. Relevance at the target layer (LRP, Bach et al., PLoS ONE 2015). Initial relevance
   R^{(L)} = y^c at the output unit c, 0 elsewhere (Bach et al. sec. 2.1; Lee et al. 2021
   sec. 3.2). Every linear map (convolution of any groups, i.e. depthwise too; linear; batch
   norm in eval mode, an affine map; average pooling; zero padding; residual additions) is
   propagated with the epsilon rule (Bach et al. eq. 58 / Montavon et al., "Layer-wise relevance
   propagation: an overview", 2019, eq. "LRP-eps")::

       R_i = sum_j  x_i w_ij / (z_j + eps * sign(z_j))  R_j,      z_j = sum_i x_i w_ij + b_j

   and relevance passes unchanged through an elementwise activation a = g(z) (R_z = R_a,
   Bach et al. sec. 3; captum's rule for ReLU). Max pooling is winner-take-all. Composing these
   rules gives a closed form (Ancona et al., "Towards better understanding of gradient-based
   attribution methods", ICLR 2018, proposition 1):

       R^{(t)} = A (.) d~y^c / dA,                                           (1)

   the gradient computed by autograd with the derivative of every activation module replaced
   by g(z) / (z + eps * sign(z)) (z its input). This is how it is implemented: one forward
   and one backward pass, any architecture, any layer.
   [choice] eps is applied once per linear stage, at its activation (conv -> batch norm ->
   activation counts as one affine stage, as in LRP practice of fusing batch norm into the
   convolution); the top layer (logits) and linear stages not followed by an activation (the
   projection convolutions of EfficientNet's MBConv blocks) use eps = 0, where the rule is
   exact because nothing is divided there. Default eps = 1e-9 (captum's EpsilonRule default),
   i.e. LRP-0; the ``epsilon`` option changes it.
   [choice, deviation from Relevance-CAM] Lee et al. propagate with the z+ (alpha=1, beta=0)
   rule from a contrastive start (CLRP: target relevance minus that of the other classes).
   z+ needs a separately re-weighted copy of every layer (w+ only), which has no single
   modified backward pass and is ill-defined through batch norm with negative scales, so it
   cannot cover EfficientNet-Lite's depthwise-conv + batch-norm stages generically; the
   epsilon rule can, and is the rule of captum's LRP for every layer type it supports.
   The start is the target logit only (non-contrastive), as in Bach et al.

   Per architecture: for ReLU networks made of conv/linear/pooling layers (torchvision VGG-16,
   AlexNet) the result is captum's LRP/LayerLRP with EpsilonRule on every layer (the test suite
   checks agreement with captum's LayerLRP on a small such network and on torchvision VGG-16,
   max abs difference ~1e-8). captum cannot handle
   EfficientNet-Lite (ReLU6, a module reused at every call site, functional residual
   additions); there the same formula (1) is the fallback: ReLU6 gets the ratio
   min(max(z,0),6) / (z + eps sign z) (which, unlike its gradient, passes relevance through
   saturated units, as the LRP activation rule requires), batch norm and depthwise
   convolutions are affine maps propagated by the epsilon rule through the chain rule, and the
   squeeze-and-excitation gate (absent from EfficientNet-Lite) would keep its plain gradient.
   Activation modules handled: ReLU, ReLU6/Hardtanh, LeakyReLU, ELU, SiLU, Hardswish, GELU,
   Tanh, Mish; activations written as functions (F.relu) keep their plain gradient, which for
   ReLU is the same ratio.

2. Inter-layer relevance weight of channel k (Relevance-CAM, Lee et al., CVPR 2021, sec. 3:
   the weighting component is the relevance map of the channel summed over space)::

       alpha_k = sum_{i,j} R^{(t)}_{k,ij}                                      (2)

3. Spatial weight map used as a mask [choice: the paper names it without a formula; we take
   the channel-summed relevance, the LRP heat map of the target layer, kept positive and
   scaled to [0, 1] so that it acts as a soft mask]::

       S_ij = ReLU(sum_k R^{(t)}_{k,ij}) / max_ij ReLU(sum_k R^{(t)}_{k,ij})   (3)

   (S = 0 when no location has positive relevance).

4. Map: masked feature maps times the inter-layer weights, summed over channels, ReLU,
   normalised to [0, 1] by its maximum [choice: max rather than min-max, so 0 keeps meaning
   "no positive evidence"; the harness min-maxes maps before scoring anyway]::

       L^c = ReLU(sum_k alpha_k (A_k (.) S)),   L^c <- L^c / max L^c           (4)

The map keeps the target layer's spatial size (h, w); the harness upsamples it.
Cost: 1 forward + 1 backward pass per image.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

import xbench
from xbench import ClassifierHandle, Explainer, capture_activations, hookimpl

#: elementwise activations whose derivative is replaced by the LRP ratio g(z) / z; all have
#: g(0) = 0, so the ratio is taken as 0 where z = 0 (the unit carries no relevance there)
ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.Hardtanh, nn.LeakyReLU, nn.ELU, nn.SiLU, nn.Hardswish, nn.GELU, nn.Tanh, nn.Mish)


class _LRPActivation(torch.autograd.Function):
    """Identity on the activation's output whose backward to the input z is the LRP ratio.

    forward(z, out) returns ``out`` (a view, no copy); backward multiplies the incoming
    gradient by g(z) / (z + eps sign z) (sign(0) = +1, Bach et al. eq. 58), computed only for
    the activations the backward pass actually reaches. At z = 0 the ratio is 0 (g(0) = 0).
    """

    @staticmethod
    def forward(ctx, z, out, epsilon):
        ctx.save_for_backward(z, out)
        ctx.epsilon = epsilon
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        z, out = ctx.saved_tensors
        eps = ctx.epsilon
        # in place where possible: this runs at every activation between the target and the
        # logits, on the largest tensors of the network
        ratio = out / torch.where(z >= 0, eps, -eps).to(z.dtype).add_(z)
        if eps == 0:
            ratio.nan_to_num_(nan=0.0)  # 0 / 0 where z = 0
        return ratio.mul_(grad), None, None


@contextlib.contextmanager
def lrp_activations(net: nn.Module, epsilon: float,
                    after: nn.Module | None = None) -> Iterator[None]:
    """Within the block, every activation module's backward is the LRP ratio g(z)/(z+eps sign z).

    The forward values are unchanged bit for bit (the output passes through
    :class:`_LRPActivation`). With ``after``, only activations called after that module's
    forward has returned are changed: the ones upstream of a target layer never see the
    backward pass, so they are left alone (less work). In-place activations get a copy of their
    input so that z survives. Hooks are removed on exit whatever happens.
    """
    state = {"active": after is None}
    handles = []
    if after is not None:
        handles.append(after.register_forward_hook(
            lambda _m, _i, _o: state.__setitem__("active", True)))
    for module in net.modules():
        if isinstance(module, ACTIVATIONS):
            slot: dict[str, torch.Tensor] = {}

            def pre_hook(mod, inputs, slot=slot):
                if not state["active"]:
                    return None
                slot["z"] = inputs[0]
                if getattr(mod, "inplace", False):
                    return (inputs[0].clone(),) + tuple(inputs[1:])
                return None

            def hook(_mod, _inputs, output, slot=slot):
                z = slot.pop("z", None)
                if z is None or not (z.requires_grad and isinstance(output, torch.Tensor)):
                    return None
                return _LRPActivation.apply(z, output.detach(), epsilon)

            handles.append(module.register_forward_pre_hook(pre_hook))
            handles.append(module.register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def target_layer_relevance(model: ClassifierHandle, layer: str | None, images: torch.Tensor,
                           targets: torch.Tensor, epsilon: float = 1e-9
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, R, logits): target-layer activations and their LRP relevance (B, K, h, w), eq. (1).

    One forward and one backward pass. Initial relevance y^c at the target logit: the seed of
    the backward pass is 1 and R = A (.) d~y^c/dA, so that sum R = y^c on a bias-free ReLU
    network with eps = 0 (conservation). The images of a batch are independent (eval mode):
    back-propagating the sum of their target logits gives each its own relevance.
    """
    module = model.layer(layer)
    with torch.enable_grad(), lrp_activations(model.net, epsilon, after=module), \
            capture_activations(module, keep_grad=False, name=layer) as store:
        logits = model(images.detach().requires_grad_(True))
        activation = store["activation"]
        score = logits.gather(1, targets[:, None]).sum()
        (modified_gradient,) = torch.autograd.grad(score, activation)
    activation = activation.detach()
    return activation, activation * modified_gradient.detach(), logits.detach()


def relevance_cam_map(activation: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """(B, K, h, w) activations and relevance -> (B, h, w) maps in [0, 1], eqs. (2)-(4)."""
    alpha = relevance.sum(dim=(2, 3), keepdim=True)  # eq. 2
    spatial = torch.relu(relevance.sum(dim=1, keepdim=True))  # eq. 3, before scaling
    spatial = spatial / _safe_max(spatial)[:, None]
    cam = torch.relu((alpha * activation * spatial).sum(dim=1))  # eq. 4
    return cam / _safe_max(cam)


def _safe_max(maps: torch.Tensor) -> torch.Tensor:
    """Per-image maximum as a (B, 1, 1) divisor; 1 where the map is all zeros."""
    peak = maps.flatten(1).amax(dim=1)
    return torch.where(peak > 0, peak, torch.ones_like(peak)).view(-1, 1, 1)


class RelevanceCAM(Explainer):
    """Shallow-layer relevance CAM (Cheng Yan et al. 2025): LRP channel weights x relevance mask."""

    name = "relevance-cam"
    needs_gradients = True
    summary = ("relevance-cam: LRP-eps relevance at the target layer as channel weights and "
               "spatial mask, for shallow layers (1 F + 1 B)")
    passes = xbench.Passes(1, 1)

    class Options(xbench.Options):
        epsilon: float = xbench.option(1e-9, "LRP-eps stabiliser", minimum=0.0)

    def format_variant(self, changed):
        # the rule and its epsilon are recorded even at their defaults (reference runs do)
        return f"rule=lrp-eps,epsilon={self.options.epsilon:g}"

    def explain(self, model, images, targets):
        activation, relevance, _ = target_layer_relevance(model, self.layer, images, targets,
                                                          self.options.epsilon)
        return relevance_cam_map(activation, relevance)


@hookimpl
def register_explainers(register):
    register(RelevanceCAM)
