"""Layer-wise Relevance Propagation (Bach et al., PLoS ONE 2015; Montavon et al., "Layer-Wise
Relevance Propagation: An Overview", 2019) as an adapter over zennit (Anders et al., 2021).

The relevance of the target, R = y^c at the logits, is sent back layer by layer; at a linear
layer z_k = sum_j x_j w_jk + b_k a rule redistributes R_k to its inputs:

- epsilon: R_j = sum_k x_j w_jk / (z_k + eps sign(z_k)) R_k;
- z+ (zennit's ``ZPlus``): R_j = sum_k (x_j^+ w_jk^+ + x_j^- w_jk^-) / (sum_j' ...) R_k;
- alpha2-beta1: 2 x the positive share minus 1 x the negative share;
- flat (first layer): R_j = sum_k 1 / (number of inputs of k) R_k;
- gamma (0.25) and z^B (bounded by the pixel range) in ``epsilon-gamma-box``.

Activations pass relevance unchanged; average pooling and sums distribute it in proportion to
their inputs (zennit's ``Norm``). Composite (``composite``, recorded): ``epsilon-plus-flat``
(default: flat at the first layer, z+ at every other convolution, epsilon = 1e-6 at fully
connected layers -- zennit's recommendation for CNNs, Kohlbrenner et al. 2020),
``epsilon-alpha2-beta1-flat``, ``epsilon-gamma-box``, or ``epsilon`` (epsilon at every layer:
on a bias-free ReLU network this is gradient x input, a known answer the tests check). The
map is the channel ``reduction`` of the input relevance (max |R| by default, as the gradient
family). 1 F + 1 B.

Why zennit and not captum's ``LRP``: EfficientNet-Lite (the default model) uses ReLU6, depthwise
convolutions, batch norm after every convolution and residual additions. captum's LRP has no
rule for ReLU6 (it refuses it), treats batch norm as one more epsilon layer, and sends the
whole relevance of a residual addition down *both* branches (autograd's gradient of x + y),
so relevance is not conserved. zennit applies rules through the same gradient mechanism but
has *canonizers*, which rewrite the network into an equivalent one the rules are defined on
for the duration of the call: xbench applies

1. a batch-norm merge: every ``BatchNorm2d`` registered directly after the ``Conv2d`` that
   feeds it (same parent module, matching channels) is folded into it (zennit's
   ``MergeBatchNorm``); the logits are unchanged (tested);
2. a residual canonizer: the addition of every EfficientNet-Lite ``MBConvBlock`` with a skip,
   and of every torchvision ResNet ``BasicBlock``/``Bottleneck`` (zennit's own
   ``ResNetCanonizer``), goes through a ``Sum`` module that splits relevance in proportion to
   the two inputs.

With them, relevance is conserved wherever the network has no biases: the input relevance sums
to y^c - b^c (the classifier bias is left out by the epsilon rule) on a random ResNet-18 (its
batch-norm biases are 0) and to y^c on EfficientNet-Lite0 with every bias zeroed, to the
stabilisers' tolerance (tests/test_lrp.py). With its real biases, much of Lite0's relevance is
absorbed by them (mostly at the depthwise convolutions, whose 3 x 3 single-channel inputs are
often outweighed by the merged batch-norm bias): that is the rules' definition, not a leak. Other networks with functional residual additions (which
no module sees) keep autograd's behaviour there: relevance is duplicated at each skip;
activations called as functions keep their gradient. Relevance is taken at the network's
input (the normalised tensor: R_pixel = R_network / std is multiplied back by std).
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

import xbench
from xbench import Explainer, hookimpl
from xbench_plugins.captum_gradients import REDUCTIONS, reduce_channels

COMPOSITES = ("epsilon-plus-flat", "epsilon-alpha2-beta1-flat", "epsilon-gamma-box", "epsilon")


def batch_norm_pairs(net: nn.Module) -> list[tuple[tuple[str], str]]:
    """(conv name, batch-norm name) for every BatchNorm2d registered right after a Conv2d of
    the same parent with as many output channels."""
    pairs = []
    for parent_name, parent in net.named_modules():
        previous = None
        for child_name, child in parent.named_children():
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if (isinstance(child, nn.BatchNorm2d) and previous is not None
                    and isinstance(previous[1], nn.Conv2d)
                    and previous[1].out_channels == child.num_features):
                pairs.append(((previous[0],), name))
            previous = (name, child)
    return pairs


class _MergeBatchNorm:
    """zennit's ``NamedMergeBatchNorm`` leaves the emptied batch norm computing
    x / sqrt(1 + eps) (running variance set to 1, eps kept): 0.05% per layer at
    EfficientNet-Lite's eps = 1e-3, 0.02 on its logits. Here the variance is set to 1 - eps,
    so the emptied layer is the identity (the parameters are restored on removal as before)."""

    @staticmethod
    def make(name_map):
        from zennit.canonizers import NamedMergeBatchNorm

        class Exact(NamedMergeBatchNorm):
            @staticmethod
            def merge_batch_norm(modules, batch_norm):
                NamedMergeBatchNorm.merge_batch_norm(modules, batch_norm)
                batch_norm.running_var.data = batch_norm.running_var.data - batch_norm.eps

        return Exact(name_map)


def _mbconv_forward(self, inputs, drop_connect_rate=None):
    """EfficientNet-Lite's MBConvBlock forward (eval mode, no squeeze-excitation) with the skip
    addition through a zennit ``Sum``."""
    x = inputs
    if self._block_args.expand_ratio != 1:
        x = self._swish(self._bn0(self._expand_conv(inputs)))
    x = self._swish(self._bn1(self._depthwise_conv(x)))
    x = self._bn2(self._project_conv(x))
    return self.canonizer_sum(torch.stack([inputs, x], dim=-1))


def _has_skip(module: nn.Module) -> bool:
    args = module._block_args
    return bool(module.id_skip and args.stride in (1, [1], (1,), [1, 1], (1, 1))
                and args.input_filters == args.output_filters)


def canonizers(net: nn.Module) -> list:
    from zennit.canonizers import AttributeCanonizer
    from zennit.layer import Sum

    def mbconv(_name, module):
        if type(module).__name__ != "MBConvBlock" or not hasattr(module, "_block_args"):
            return None
        if getattr(module, "has_se", False):
            raise xbench.UserError("lrp: EfficientNet blocks with squeeze-excitation have no "
                                   "canonizer in xbench (EfficientNet-Lite has none); use "
                                   "another explainer")
        if not _has_skip(module):
            return None
        return {"forward": _mbconv_forward.__get__(module), "canonizer_sum": Sum()}

    found = [_MergeBatchNorm.make(batch_norm_pairs(net)), AttributeCanonizer(mbconv)]
    try:
        from torchvision.models.resnet import BasicBlock, Bottleneck
        from zennit.torchvision import ResNetBasicBlockCanonizer, ResNetBottleneckCanonizer
    except ImportError:
        return found
    if any(isinstance(m, (BasicBlock, Bottleneck)) for m in net.modules()):
        found += [ResNetBasicBlockCanonizer(), ResNetBottleneckCanonizer()]
    return found


def make_composite(name: str, epsilon: float, model, canonizer_list: list):
    from zennit import composites
    from zennit.rules import Epsilon
    from zennit.types import Linear

    if name == "epsilon-plus-flat":
        return composites.EpsilonPlusFlat(epsilon=epsilon, canonizers=canonizer_list)
    if name == "epsilon-alpha2-beta1-flat":
        return composites.EpsilonAlpha2Beta1Flat(epsilon=epsilon, canonizers=canonizer_list)
    if name == "epsilon-gamma-box":  # z^B bounds: the pixel range [0, 1], normalised
        mean = torch.as_tensor(model.loaded.mean, device=model.device)[None, :, None, None]
        std = torch.as_tensor(model.loaded.std, device=model.device)[None, :, None, None]
        size = (1, 3, model.input_size, model.input_size)
        return composites.EpsilonGammaBox(low=((0 - mean) / std).expand(size),
                                          high=((1 - mean) / std).expand(size),
                                          epsilon=epsilon, canonizers=canonizer_list)
    if name == "epsilon":
        return composites.LayerMapComposite(
            layer_map=composites.layer_map_base() + [(Linear, Epsilon(epsilon=epsilon))],
            canonizers=canonizer_list)
    raise ValueError(f"unknown composite {name!r}; choose one of {', '.join(COMPOSITES)}")


class LRP(Explainer):
    """Input relevance of y^c by zennit's rules (composite ``epsilon-plus-flat`` by default)
    with batch-norm and residual canonizers (Bach et al. 2015; Montavon et al. 2019);
    1 F + 1 B."""

    name = "lrp"
    needs_gradients = True
    uses_layer = False
    library = "zennit"
    passes = xbench.Passes(1, 1)
    summary = "LRP: layer-wise relevance (epsilon / z+ / flat rules), zennit with canonizers (1 F + 1 B)"

    class Options(xbench.Options):
        composite: str = xbench.option("epsilon-plus-flat", "rule set: flat first layer, z+ "
                                       "convolutions, epsilon dense (zennit's CNN default); "
                                       "or alpha2-beta1, gamma + z^B box, epsilon everywhere",
                                       choices=COMPOSITES)
        epsilon: float = xbench.option(1e-6, "epsilon of the epsilon rule (zennit's default)",
                                       above=0.0)
        reduction: str = xbench.option("max-abs", "channels -> one map: max |R|, sum |R|, "
                                       "ReLU(sum R) or L2 norm", choices=REDUCTIONS)

    def relevance(self, model, images, targets) -> torch.Tensor:
        """(B, 3, H, W) relevance at the network's input; R = y^c at the logits."""
        found = canonizers(model.net)
        composite = make_composite(self.options.composite, self.options.epsilon, model, found)
        std = torch.as_tensor(model.loaded.std, device=images.device)[None, :, None, None]
        with torch.enable_grad(), composite.context(model.net):
            x = images.detach().requires_grad_(True)
            logits = model(x)
            onehot = torch.zeros_like(logits).scatter_(1, targets[:, None], 1.0)
            (grad,) = torch.autograd.grad(logits, x, grad_outputs=onehot * logits.detach())
        return grad.detach() * std

    def explain(self, model, images, targets):
        return reduce_channels(self.relevance(model, images, targets), self.options.reduction)


@hookimpl
def register_explainers(register):
    # zennit is an extra (pip install 'xbench[lrp]'): without it, lrp is simply not offered
    if importlib.util.find_spec("zennit") is not None:
        register(LRP)
