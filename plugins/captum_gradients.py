"""The input-gradient family as adapters over captum (Kokhlikyan et al., 2020; captum >= 0.7).

Why adapters: captum is already a dependency, its implementations are the reference the
literature compares with, and these methods are one library call each; an adapter is tested
against calling captum directly (tests/test_captum_gradients.py). Every call goes through the
:class:`~xbench.model.ClassifierHandle` (pixel-space input, normalisation inside), so passes
are counted by the harness. Attributions are w.r.t. pixel-space images in [0, 1], target =
pre-softmax logit y^c.

Methods and captum calls (a = attribution, (B, 3, H, W)):

- ``saliency`` (Simonyan et al., ICLR-W 2014): a = dy^c/dx; ``Saliency(f).attribute(x, target,
  abs=False)``. 1 F + 1 B.
- ``input-x-gradient`` (Shrikumar et al., 2016): a = x * dy^c/dx; ``InputXGradient``. 1 F + 1 B.
- ``integrated-gradients`` (Sundararajan et al., ICML 2017): a = (x - x') * int_0^1
  dy^c(x' + t (x - x'))/dx dt, ``IntegratedGradients(f).attribute(x, baselines=x', target,
  n_steps, method)``. ``steps`` F + ``steps`` B.
- ``smoothgrad`` (Smilkov et al., 2017): a = 1/n sum_i dy^c/dx (x + N(0, s^2)),
  ``NoiseTunnel(Saliency(f)).attribute(x, nt_type="smoothgrad", nt_samples=n, stdevs=s,
  abs=False)``; the paper's n = 50 and s = 15% of the input range (0.15 in pixel space).
  n F + n B.
- ``vargrad`` (Adebayo et al., 2018): a = Var_i dy^c/dx (x + N(0, s^2)), ``nt_type="vargrad"``,
  otherwise as smoothgrad. n F + n B.
- ``gradient-shap`` (Lundberg & Lee, NeurIPS 2017): a = E_{t ~ U(0,1), e ~ N(0, s^2)}
  [(x - x') dy^c(x' + t (x + e - x'))/dx], ``GradientShap(f).attribute(x, baselines=x',
  n_samples, stdevs)``. n F + n B.
- ``deeplift`` (Shrikumar et al., ICML 2017), rescale rule: multipliers Delta y / Delta x at
  every elementwise nonlinearity, a = (x - x') * m; ``DeepLift(f).attribute(x, baselines=x',
  target)``. captum runs x and x' as one batch of 2: 2 F + 2 B per image.
- ``deeplift-shap`` (Lundberg & Lee, NeurIPS 2017, "DeepSHAP"): DeepLift's rescale-rule
  attribution against each of n references x'_j of a reference distribution, averaged:
  a = 1/n sum_j (x - x'_j) * m(x, x'_j); ``DeepLiftShap(f).attribute(x, baselines=X', target)``
  with the same extended rule table as ``deeplift``. captum runs the n (input, reference)
  pairs as one batch of 2n: 2n F + 2n B per image.
- ``expected-gradients`` (Erion et al., Nature Machine Intelligence 2021, "Improving
  performance of deep learning models with axiomatic attribution priors and expected
  gradients", eq. 4): a = E_{x' ~ D, t ~ U(0, 1)} [(x - x') dy^c(x' + t (x - x'))/dx],
  estimated with k draws; D = the reference distribution. This is exactly captum's
  ``GradientShap(f).attribute(x, baselines=X', n_samples=k, stdevs=0)`` (it draws a reference
  from X' uniformly, with replacement, and t ~ U(0, 1) per sample), so it is that call.
  k F + k B.
- ``deconvolution`` (Zeiler & Fergus, ECCV 2014): backward through every rectifier as
  ReLU(grad_out), ignoring the forward; ``Deconvolution(f).attribute(x, target)``. 1 F + 1 B.

Module types captum does not handle (why two methods use subclasses of captum's classes):
captum's DeepLift applies its rule only to modules whose type is *exactly* one of ReLU, ELU,
LeakyReLU, Sigmoid, Tanh, Softplus (plus pooling and Softmax); any other activation (ReLU6 of
EfficientNet-Lite, SiLU, GELU, Hardswish, ...) silently passes its plain gradient, which breaks
DeepLift's summation-to-delta. ``deeplift`` here extends captum's rule table with the rescale
rule for ReLU6, Hardtanh, SiLU, GELU, Hardswish, Hardsigmoid and Mish (the rescale rule is
defined for any elementwise nonlinearity; the paper's own implementation applies it to every
activation), and refuses, naming the module, any other activation module. captum's
Deconvolution hooks only ``nn.ReLU``; ``deconvolution`` here hooks ReLU6 and LeakyReLU too
(the deconvnet rule rectifies the backward signal whatever the unit's forward). In-place
ReLUs (torchvision ResNets) are fine: captum reads inputs in forward pre-hooks. Activations
called as functions (``F.relu(x)`` in a forward) cannot be hooked by either: they keep their
ordinary gradient, and nothing can detect them.

The map for metrics is the ``reduction`` over channels (max of |a| by default; sum of |a|;
sum, clipped at 0 because maps must be >= 0, i.e. positive evidence; L2 norm), recorded in the
variant. Baselines x' (IG, GradientShap, DeepLift): ``black`` (0 in pixel space), ``blur``
(the image blurred by a Gaussian of sigma = ``blur_sigma`` x min(H, W), border reflected), or
``uniform`` (U[0, 1) noise). Random draws (noise samples, uniform baselines) are seeded from
the run seed and the image's content (:func:`xbench_plugins.controls.image_seed`), image by
image, so a batch gives the maps of its images explained one by one.

Reference distribution of ``deeplift-shap`` and ``expected-gradients`` (``reference``, with
``references`` = n images): ``uniform`` (default: n images of U[0, 1) noise, drawn per image from
its seed), ``blur`` (the image blurred by n Gaussians of sigma = ``blur_sigma`` x min(H, W) x
j / n, j = 1..n) or ``black`` (n black images: DeepLiftShap is then DeepLift, Expected
Gradients a Monte-Carlo Integrated Gradients). Erion et al. draw references from the training
data; an explainer plugin sees no data set, so xbench pins a data-free distribution (recorded
in the variant) and says so.
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from captum.attr import (DeepLift, DeepLiftShap, Deconvolution, GradientShap, InputXGradient,
                         IntegratedGradients, NoiseTunnel, Saliency)
from captum.attr._core import deep_lift as captum_deep_lift
from torch import nn

import xbench
from xbench import Explainer, UserError, hookimpl, masked_batch_size
from xbench_plugins.controls import image_generator, image_seed

REDUCTIONS = ("max-abs", "sum-abs", "sum", "l2")
BASELINES = ("black", "blur", "uniform")
REFERENCES = ("uniform", "blur", "black")


def reduce_channels(attribution: torch.Tensor, reduction: str) -> torch.Tensor:
    """(B, C, H, W) attributions -> (B, H, W) maps >= 0."""
    if reduction == "max-abs":
        return attribution.abs().amax(dim=1)
    if reduction == "sum-abs":
        return attribution.abs().sum(dim=1)
    if reduction == "sum":
        return attribution.sum(dim=1).clamp(min=0)
    if reduction == "l2":
        return attribution.pow(2).sum(dim=1).sqrt()
    raise ValueError(f"unknown reduction {reduction!r}; choose one of {', '.join(REDUCTIONS)}")


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur (radius ceil(3 sigma), border reflected) of (B, C, H, W)."""
    radius = max(1, int(-(-3 * sigma // 1)))
    radius = min(radius, images.shape[-1] - 1, images.shape[-2] - 1)  # reflect needs pad < side
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-offsets ** 2 / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    x = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(x, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def make_baselines(images: torch.Tensor, kind: str, seed: int, blur_sigma: float) -> torch.Tensor:
    """Baselines x' (B, 3, H, W) in pixel space, one per image."""
    if kind == "black":
        return torch.zeros_like(images)
    if kind == "blur":
        return gaussian_blur(images, blur_sigma * min(images.shape[-2:]))
    if kind == "uniform":
        return torch.stack([torch.rand(image.shape, generator=image_generator(seed, image))
                            for image in images]).to(images.device, images.dtype)
    raise ValueError(f"unknown baseline {kind!r}; choose one of {', '.join(BASELINES)}")


def make_references(image: torch.Tensor, kind: str, count: int, seed: int,
                    blur_sigma: float) -> torch.Tensor:
    """The reference distribution X' (count, 3, H, W) of one pixel-space image (3, H, W)."""
    if kind == "uniform":
        return torch.rand((count, *image.shape), generator=image_generator(seed, image)).to(
            image.device, image.dtype)
    if kind == "blur":
        side = min(image.shape[-2:])
        return torch.cat([gaussian_blur(image[None], blur_sigma * side * j / count)
                          for j in range(1, count + 1)])
    if kind == "black":
        return torch.zeros((count, *image.shape), device=image.device, dtype=image.dtype)
    raise ValueError(f"unknown reference {kind!r}; choose one of {', '.join(REFERENCES)}")


@contextlib.contextmanager
def seeded(seed: int, device: torch.device):
    """The global generators captum draws from (torch's; numpy's for GradientShap's path
    points) seeded within the block, restored after it."""
    devices = [device] if device.type == "cuda" else []
    numpy_state = np.random.get_state()
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            np.random.seed(seed % 2 ** 32)
            yield
    finally:
        np.random.set_state(numpy_state)


class GradientOptions(xbench.Options):
    reduction: str = xbench.option("max-abs", "channels -> one map: max |a|, sum |a|, "
                                   "ReLU(sum a) or L2 norm", choices=REDUCTIONS)


class BaselineOptions(GradientOptions):
    baseline: str = xbench.option("black", "baseline x': black (0 in pixel space), the "
                                  "image blurred, or U[0,1) noise", choices=BASELINES)
    blur_sigma: float = xbench.option(0.05, "sigma of the blurred baseline, as a fraction of "
                                      "the image's shorter side", above=0.0)


class CaptumGradient(Explainer):
    """Base of the adapters: ``attribute`` gives (B, 3, H, W), ``explain`` reduces it."""

    needs_gradients = True
    uses_layer = False
    library = "captum"
    #: whether captum draws random numbers (then images are attributed one by one, seeded)
    stochastic = False
    passes = xbench.Passes(1, 1)  # saliency, input x gradient, deconvolution

    Options = GradientOptions

    def attribute(self, model, images, targets) -> torch.Tensor:
        raise NotImplementedError

    def baselines(self, images: torch.Tensor) -> torch.Tensor:
        return make_baselines(images, self.options.baseline, self.seed, self.options.blur_sigma)

    def explain(self, model, images, targets):
        images = images.detach().requires_grad_(True)  # captum warns when it has to set it
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Setting (forward|backward)")
            if self.stochastic:
                parts = []
                for i in range(len(images)):
                    with seeded(image_seed(self.seed, images[i]), images.device):
                        parts.append(self.attribute(model, images[i:i + 1], targets[i:i + 1]))
                attribution = torch.cat(parts)
            else:
                attribution = self.attribute(model, images, targets)
        return reduce_channels(attribution.detach(), self.options.reduction)


class SaliencyMap(CaptumGradient):
    """a = dy^c/dx, captum ``Saliency(abs=False)`` (Simonyan et al. 2014); 1 F + 1 B."""

    name = "saliency"
    summary = "Saliency: input gradient, captum Saliency (1 F + 1 B)"

    def attribute(self, model, images, targets):
        return Saliency(model).attribute(images, target=targets, abs=False)


class InputXGradientMap(CaptumGradient):
    """a = x * dy^c/dx, captum ``InputXGradient`` (Shrikumar et al. 2016); 1 F + 1 B."""

    name = "input-x-gradient"
    summary = "Input x Gradient, captum InputXGradient (1 F + 1 B)"

    def attribute(self, model, images, targets):
        return InputXGradient(model).attribute(images, target=targets)


class IntegratedGradientsMap(CaptumGradient):
    """a = (x - x') * mean over the path quadrature of dy^c/dx, captum ``IntegratedGradients``
    (Sundararajan et al. 2017); ``steps`` F + ``steps`` B."""

    name = "integrated-gradients"
    summary = "Integrated Gradients, captum IntegratedGradients (steps F + steps B)"

    class Options(BaselineOptions):
        steps: int = xbench.option(50, "path steps n_steps (captum's default; the paper: "
                                   "20 to 300)", minimum=1)
        method: str = xbench.option("gausslegendre", "quadrature of the path integral",
                                    choices=("gausslegendre", "riemann_trapezoid",
                                             "riemann_left", "riemann_right", "riemann_middle"))
        batch_size: int | None = xbench.option(None, "path points per forward pass (default: "
                                               "by device)", minimum=1, in_variant=False)

    profiles = {"quick": {"steps": 16}}

    @classmethod
    def expected_passes(cls, options, facts):
        return xbench.Passes(options.steps, options.steps)

    def attribute(self, model, images, targets):
        chunk = self.options.batch_size or masked_batch_size(images.device)
        return IntegratedGradients(model).attribute(
            images, baselines=self.baselines(images), target=targets, n_steps=self.options.steps,
            method=self.options.method, internal_batch_size=chunk)


class NoiseOptions(GradientOptions):
    samples: int = xbench.option(50, "noisy copies n (SmoothGrad paper: 50)", minimum=1)
    stdev: float = xbench.option(0.15, "noise sigma in pixel space (SmoothGrad paper: 15% of "
                                 "the input range)", minimum=0.0)
    batch_size: int | None = xbench.option(None, "noisy copies per forward pass (default: by "
                                           "device)", minimum=1, in_variant=False)


class SmoothGradMap(CaptumGradient):
    """a = mean of dy^c/dx over n noisy copies, captum ``NoiseTunnel(Saliency)``,
    nt_type="smoothgrad" (Smilkov et al. 2017); n F + n B."""

    name = "smoothgrad"
    summary = "SmoothGrad: mean gradient of noisy copies, captum NoiseTunnel (n F + n B)"
    stochastic = True
    nt_type = "smoothgrad"
    Options = NoiseOptions
    profiles = {"quick": {"samples": 10}}

    @classmethod
    def expected_passes(cls, options, facts):
        return xbench.Passes(options.samples, options.samples)

    def attribute(self, model, images, targets):
        chunk = self.options.batch_size or masked_batch_size(images.device)
        return NoiseTunnel(Saliency(model)).attribute(
            images, nt_type=self.nt_type, nt_samples=self.options.samples,
            nt_samples_batch_size=chunk, stdevs=self.options.stdev, target=targets, abs=False)


class VarGradMap(SmoothGradMap):
    """a = variance of dy^c/dx over n noisy copies, captum ``NoiseTunnel(Saliency)``,
    nt_type="vargrad" (Adebayo et al. 2018); n F + n B."""

    name = "vargrad"
    summary = "VarGrad: gradient variance over noisy copies, captum NoiseTunnel (n F + n B)"
    nt_type = "vargrad"


class GradientShapMap(CaptumGradient):
    """a = E[(x - x') dy^c(x' + t (x + e - x'))/dx], t ~ U(0, 1), e ~ N(0, s^2), captum
    ``GradientShap`` (Lundberg & Lee 2017); n F + n B."""

    name = "gradient-shap"
    summary = "GradientSHAP: expected gradients on random path points, captum GradientShap (n F + n B)"
    stochastic = True

    class Options(BaselineOptions):
        samples: int = xbench.option(50, "random path points n", minimum=1)
        stdev: float = xbench.option(0.0, "noise sigma added to the input (captum's default "
                                     "0)", minimum=0.0)

    profiles = {"quick": {"samples": 10}}

    @classmethod
    def expected_passes(cls, options, facts):
        return xbench.Passes(options.samples, options.samples)

    def attribute(self, model, images, targets):
        return GradientShap(model).attribute(
            images, baselines=self.baselines(images), n_samples=self.options.samples,
            stdevs=self.options.stdev, target=targets)


#: elementwise activations captum's DeepLift leaves to their plain gradient; rescale rule here
EXTRA_RESCALE = (nn.ReLU6, nn.Hardtanh, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Mish)
#: activation modules nobody's rule covers: refused rather than silently mis-attributed
UNHANDLED_ACTIVATIONS = (nn.PReLU, nn.RReLU, nn.CELU, nn.SELU, nn.GLU, nn.LogSigmoid,
                         nn.Softmin, nn.LogSoftmax, nn.Softsign, nn.Tanhshrink, nn.Threshold,
                         nn.Softshrink, nn.Hardshrink, nn.AdaptiveMaxPool2d)


class _AnyActivationRules:
    """captum's DeepLift rule table with the rescale rule also at ``EXTRA_RESCALE`` modules."""

    rules = {**captum_deep_lift.SUPPORTED_NON_LINEAR,
             **{t: captum_deep_lift.nonlinear for t in EXTRA_RESCALE}}

    def _is_non_linear(self, module):
        return type(module) in self.rules

    def _backward_hook(self, module, grad_input, grad_output):
        if not self.satisfies_attribute_criteria(module):  # as captum: a reused module
            raise RuntimeError(f"DeepLift: module {module} is used more than once per forward")
        multipliers = self.rules[type(module)](module, module.input, module.output, grad_input,
                                               grad_output, eps=self.eps)
        del module.input
        del module.output
        return multipliers


class _DeepLiftAnyActivation(_AnyActivationRules, DeepLift):
    """captum's DeepLift with the rescale rule also at ``EXTRA_RESCALE`` modules."""


class _DeepLiftShapAnyActivation(_AnyActivationRules, DeepLiftShap):
    """captum's DeepLiftShap with the rescale rule also at ``EXTRA_RESCALE`` modules."""


def refuse_unhandled_activations(model, explainer: str) -> None:
    for name, module in model.net.named_modules():
        if type(module) in UNHANDLED_ACTIVATIONS:
            raise UserError(
                f"{explainer}: module {name!r} of the model is a {type(module).__name__}, for "
                f"which neither captum nor xbench has a DeepLift rule (supported: ReLU, "
                f"ReLU6, ELU, LeakyReLU, Sigmoid, Tanh, Softplus, SiLU, GELU, Hardswish, "
                f"Hardsigmoid, Mish, max pooling); use integrated-gradients instead")


class DeepLiftMap(CaptumGradient):
    """DeepLift rescale rule, a = (x - x') * multipliers, captum ``DeepLift`` with the rule also
    at ReLU6/Hardtanh/SiLU/GELU/Hardswish/Hardsigmoid/Mish (Shrikumar et al. 2017); 2 F + 2 B."""

    name = "deeplift"
    summary = "DeepLIFT (rescale rule), captum DeepLift extended to ReLU6 & co (2 F + 2 B)"
    Options = BaselineOptions
    passes = xbench.Passes(2, 2)

    def attribute(self, model, images, targets):
        refuse_unhandled_activations(model, self.name)
        return _DeepLiftAnyActivation(model).attribute(
            images, baselines=self.baselines(images), target=targets)


class ReferenceOptions(GradientOptions):
    reference: str = xbench.option("uniform", "reference distribution: U[0,1) noise images, "
                                   "the image blurred at n widths, or black",
                                   choices=REFERENCES)
    blur_sigma: float = xbench.option(0.05, "blur references: the widest sigma, as a fraction "
                                      "of the image's shorter side", above=0.0)


class DeepLiftShapMap(CaptumGradient):
    """a = 1/n sum_j DeepLift(x; x'_j), x'_j from the reference distribution, captum
    ``DeepLiftShap`` extended to ReLU6 & co as ``deeplift`` (Lundberg & Lee 2017);
    2n F + 2n B."""

    name = "deeplift-shap"
    summary = "DeepLiftSHAP: DeepLift averaged over n references, captum DeepLiftShap (2n F + 2n B)"
    stochastic = True  # the uniform references are drawn per image

    class Options(ReferenceOptions):
        references: int = xbench.option(16, "references n (one DeepLift pass pair each)",
                                        minimum=1)

    profiles = {"quick": {"references": 8}}

    @classmethod
    def expected_passes(cls, options, facts):
        return xbench.Passes(2 * options.references, 2 * options.references)

    def attribute(self, model, images, targets):
        refuse_unhandled_activations(model, self.name)
        o = self.options
        references = make_references(images[0].detach(), o.reference, o.references, self.seed,
                                     o.blur_sigma)
        return _DeepLiftShapAnyActivation(model).attribute(images, baselines=references,
                                                           target=targets)


class ExpectedGradientsMap(CaptumGradient):
    """a = E_{x' ~ D, t ~ U(0,1)}[(x - x') dy^c(x' + t (x - x'))/dx] over k draws (Erion et
    al. 2021), = captum ``GradientShap(baselines=D, n_samples=k, stdevs=0)``; k F + k B."""

    name = "expected-gradients"
    summary = "Expected Gradients: path gradients from references drawn at random, captum GradientShap (k F + k B)"
    stochastic = True

    class Options(ReferenceOptions):
        samples: int = xbench.option(50, "draws k of (reference, t)", minimum=1)
        references: int = xbench.option(16, "size n of the reference set drawn from",
                                        minimum=1)

    profiles = {"quick": {"samples": 16}}

    @classmethod
    def expected_passes(cls, options, facts):
        return xbench.Passes(options.samples, options.samples)

    def attribute(self, model, images, targets):
        o = self.options
        references = make_references(images[0].detach(), o.reference, o.references, self.seed,
                                     o.blur_sigma)
        return GradientShap(model).attribute(images, baselines=references,
                                             n_samples=o.samples, stdevs=0.0, target=targets)


class _DeconvolutionAllRectifiers(Deconvolution):
    """captum's Deconvolution, hooking ReLU6 and LeakyReLU as well as ReLU."""

    def _register_hooks(self, module):
        if isinstance(module, (nn.ReLU, nn.ReLU6, nn.LeakyReLU)):
            self.backward_hooks.extend(
                captum_deep_lift._register_backward_hook(module, self._backward_hook, self))


class DeconvolutionMap(CaptumGradient):
    """Deconvnet: backward through every ReLU/ReLU6/LeakyReLU as ReLU(grad_out), captum
    ``Deconvolution`` (Zeiler & Fergus 2014); 1 F + 1 B."""

    name = "deconvolution"
    summary = "Deconvnet backward (ReLU of the signal at every rectifier), captum Deconvolution (1 F + 1 B)"

    def attribute(self, model, images, targets):
        return _DeconvolutionAllRectifiers(model).attribute(images, target=targets)


@hookimpl
def register_explainers(register):
    for cls in (SaliencyMap, InputXGradientMap, IntegratedGradientsMap, SmoothGradMap,
                VarGradMap, GradientShapMap, DeepLiftMap, DeconvolutionMap, DeepLiftShapMap,
                ExpectedGradientsMap):
        register(cls)
