"""The perturbation family as adapters over captum (Kokhlikyan et al., 2020; captum >= 0.7).

Why adapters: captum's implementations are the reference, and one call each; its forward
function here is the run's engine: f(x) = softmax(``model.predict(x)``)_c (the score the
occlusion paper reads, ``output="probability"``) or the logit y^c (``output="logit"``), so the
perturbed copies never run hooks or autograd, and ``perturbations_per_eval`` is chosen so that
every call of the engine gets a full batch (its batch size, else 16 on CPU / 64 on GPU, as
RISE). Tested against captum called directly (tests/test_captum_perturbation.py).

- ``occlusion`` (Zeiler & Fergus, ECCV 2014): a_p = mean over the windows W covering p of
  f(x) - f(x with W set to ``fill``); ``Occlusion(f).attribute(x, sliding_window_shapes=(3, w,
  w), strides=(3, s, s), baselines=fill, target)``. 1 + windows forwards per image, windows =
  (floor((H - w) / s) + 1) x (floor((W - w) / s) + 1).
- ``feature-ablation``: a_p = f(x) - f(x with p's segment set to ``fill``);
  ``FeatureAblation(f).attribute(x, baselines=fill, feature_mask, target)``. 1 + segments
  forwards per image.
- ``lime`` (Ribeiro et al., KDD 2016): weights of a linear model fitted to f on random
  subsets of segments (kept segments as they are, others set to ``fill``);
  ``Lime(f, interpretable_model=SkLearnLasso(alpha=lasso_alpha), similarity_func=exp(-d^2 /
  w^2), d cosine distance, w = 1.0 (captum's defaults)).attribute(x, baselines=fill,
  feature_mask, n_samples, target)``. ``samples`` forwards per image. Its default ``output`` is
  the logit: the L1 penalty zeroes all weights fitted to probability differences on images
  the model is unsure of.
- ``kernel-shap`` (Lundberg & Lee, NeurIPS 2017): Shapley kernel-weighted linear regression
  on random coalitions of segments; ``KernelShap(f).attribute(x, baselines=fill,
  feature_mask, n_samples, target)``. ``samples`` forwards per image.
- ``shapley-value-sampling`` (Castro et al., Computers & OR 2009; Strumbelj & Kononenko,
  JMLR 2010): a_s = mean over n random orderings of the segments of f(segments up to and
  including s present) - f(segments before s present), absent segments set to ``fill``;
  captum's ``ShapleyValueSampling(f).attribute(x, baselines=fill, feature_mask, n_samples,
  target)`` written out (the one method here that is not a captum call: captum's spends about
  3x the forwards' time mapping every pixel to its segment in Python, once per ordering; the
  written-out version draws the same orderings from torch's generator and equals captum's
  maps, tests/test_captum_perturbation.py). 1 + n x segments forwards per image (the
  all-absent image once, then every ordering adds the segments one at a time, copies of all
  orderings batched together); images one by one, seeded per image.

Segments (``segments``): ``patches``, squares of ``patch`` pixels (the last row and column of
squares are cut by the border), or ``slic``: SLIC superpixels (Achanta et al., TPAMI 2012) by
``skimage.segmentation.slic(image, n_segments, compactness, sigma, start_label=0)`` on the
pixel-space image; both recorded in the variant. Maps: the attribution of a pixel's window or
segment (the same on the three channels), its positive part by default (``sign="positive"``,
evidence for the class) or its absolute value (``sign="abs"``). Random draws (Lime, KernelShap)
are seeded from the run seed and the image (:func:`xbench_plugins.controls.image_seed`), and
images are attributed one by one (captum's Lime and KernelShap take one image at a time), so a
batch gives the maps of its images explained alone.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from captum._utils.models.linear_model import SkLearnLasso
from captum.attr import FeatureAblation, KernelShap, Lime, Occlusion

import xbench
from xbench import Explainer, hookimpl, masked_batch_size
from xbench_plugins.captum_gradients import seeded
from xbench_plugins.controls import image_seed


def patch_mask(height: int, width: int, patch: int, device=None) -> torch.Tensor:
    """(H, W) long segment ids of ``patch`` x ``patch`` squares, row-major."""
    rows = torch.arange(height, device=device) // patch
    cols = torch.arange(width, device=device) // patch
    per_row = -(-width // patch)
    return rows[:, None] * per_row + cols[None, :]


def slic_mask(image: torch.Tensor, n_segments: int, compactness: float,
              sigma: float) -> torch.Tensor:
    """(H, W) long SLIC superpixel ids of one pixel-space image (3, H, W)."""
    from skimage.segmentation import slic

    array = image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy().astype(np.float64)
    labels = slic(array, n_segments=n_segments, compactness=compactness, sigma=sigma,
                  start_label=0, channel_axis=-1)
    return torch.from_numpy(labels).long().to(image.device)


class PerturbationOptions(xbench.Options):
    output: str = xbench.option("probability", "score perturbed: softmax probability or "
                                "logit of the target", choices=("probability", "logit"))
    fill: float = xbench.option(0.0, "pixel value of removed regions (0 = black in pixel "
                                "space)", minimum=0.0, maximum=1.0)
    sign: str = xbench.option("positive", "map: positive part of the attribution, or its "
                              "absolute value", choices=("positive", "abs"))
    batch_size: int | None = xbench.option(None, "perturbed copies per forward pass (default: "
                                           "the engine's batch, else by device)", minimum=1,
                                           in_variant=False)


class SegmentOptions(PerturbationOptions):
    segments: str = xbench.option("slic", "features: SLIC superpixels or square patches",
                                  choices=("slic", "patches"))
    n_segments: int = xbench.option(50, "SLIC: approximate number of superpixels", minimum=1)
    compactness: float = xbench.option(10.0, "SLIC: colour vs space trade-off (skimage's "
                                       "default)", above=0.0)
    slic_sigma: float = xbench.option(1.0, "SLIC: Gaussian pre-smoothing sigma in pixels",
                                      minimum=0.0)
    patch: int = xbench.option(32, "patches: side of a square in pixels", minimum=1)


class CaptumPerturbation(Explainer):
    """Base: images one by one through captum, forwards via ``model.predict`` in full batches."""

    needs_gradients = False
    uses_layer = False
    library = "captum"
    stochastic = False
    Options = PerturbationOptions

    def forward_func(self, model):
        def f(x: torch.Tensor) -> torch.Tensor:
            logits = model.predict(x).float()
            return logits.softmax(dim=1) if self.options.output == "probability" else logits
        return f

    def per_eval(self, model, images) -> int:
        return self.options.batch_size or model.engine_batch_size or masked_batch_size(
            images.device)

    def feature_mask(self, image: torch.Tensor) -> torch.Tensor:
        """(1, 1, H, W) segment ids of one image (3, H, W)."""
        if self.options.segments == "slic":
            mask = slic_mask(image, self.options.n_segments, self.options.compactness,
                             self.options.slic_sigma)
        else:
            mask = patch_mask(image.shape[-2], image.shape[-1], self.options.patch, image.device)
        return mask[None, None]

    def attribute(self, model, image, target) -> torch.Tensor:
        raise NotImplementedError

    def explain(self, model, images, targets):
        maps = []
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(batch|scalar).*")
            for i in range(len(images)):
                with seeded(image_seed(self.seed, images[i]), images.device):
                    a = self.attribute(model, images[i:i + 1], targets[i:i + 1])
                maps.append(a.detach()[:, 0].float())  # the same on all three channels
        maps = torch.cat(maps)
        return maps.clamp(min=0) if self.options.sign == "positive" else maps.abs()


class OcclusionMap(CaptumPerturbation):
    """a_p = mean over windows covering p of f(x) - f(x occluded), captum ``Occlusion``
    (Zeiler & Fergus 2014); 1 + windows forwards."""

    name = "occlusion"
    summary = "Occlusion: score drop under a sliding square, captum Occlusion (1 + windows F)"

    class Options(PerturbationOptions):
        window: int = xbench.option(16, "side of the occluding square in pixels", minimum=1)
        stride: int = xbench.option(8, "step of the sliding square in pixels", minimum=1)

    profiles = {"quick": {"window": 32, "stride": 32}}

    @classmethod
    def expected_passes(cls, options, facts):
        height, width = facts.input_size
        w, s = options.window, options.stride
        return xbench.Passes(1 + ((height - w) // s + 1) * ((width - w) // s + 1))

    def windows(self, height: int, width: int) -> int:
        w, s = self.options.window, self.options.stride
        return ((height - w) // s + 1) * ((width - w) // s + 1)

    def attribute(self, model, image, target):
        w, s = self.options.window, self.options.stride
        if w > min(image.shape[-2:]):
            raise xbench.UserError(f"occlusion: option window={w} is larger than the image "
                                   f"({image.shape[-2]}x{image.shape[-1]}); choose "
                                   f"-o occlusion.window=N with N <= {min(image.shape[-2:])}")
        return Occlusion(self.forward_func(model)).attribute(
            image, sliding_window_shapes=(3, w, w), strides=(3, s, s), baselines=self.options.fill,
            target=target, perturbations_per_eval=self.per_eval(model, image))


class FeatureAblationMap(CaptumPerturbation):
    """a_p = f(x) - f(x with p's segment removed), captum ``FeatureAblation``; 1 + segments
    forwards."""

    name = "feature-ablation"
    summary = "Feature ablation: score drop per removed segment, captum FeatureAblation (1 + segments F)"
    Options = SegmentOptions
    profiles = {"quick": {"n_segments": 25}}

    @classmethod
    def expected_passes(cls, options, facts):
        if options.segments == "patches":
            height, width = facts.input_size
            return xbench.Passes(1 + -(-height // options.patch) * -(-width // options.patch))
        return xbench.Passes(1 + options.n_segments, bound="about")  # SLIC's count varies

    def attribute(self, model, image, target):
        return FeatureAblation(self.forward_func(model)).attribute(
            image, baselines=self.options.fill, feature_mask=self.feature_mask(image[0]),
            target=target, perturbations_per_eval=self.per_eval(model, image))


class SampledOptions(SegmentOptions):
    samples: int = xbench.option(1000, "random perturbations n (the lime package's image "
                                 "default)", minimum=1)


class LimeMap(CaptumPerturbation):
    """Lasso weights of a local linear model on random segment subsets, captum ``Lime``
    (Ribeiro et al. 2016); n forwards."""

    name = "lime"
    summary = "LIME: sparse linear surrogate on random segment subsets, captum Lime (n F)"
    stochastic = True

    class Options(SampledOptions):
        # Lasso(alpha=0.01) on probability differences zeroes every weight when p_c is modest
        # (the embedded cat photo, p = 0.38 on EfficientNet-Lite0: an all-zero map); logits
        # keep the surrogate's weights above the L1 penalty.
        output: str = xbench.option("logit", "score perturbed: logit or softmax probability "
                                    "of the target", choices=("logit", "probability"))
        lasso_alpha: float = xbench.option(0.01, "L1 weight of the surrogate (captum's "
                                           "default)", minimum=0.0)

    profiles = {"quick": {"samples": 100}}

    @classmethod
    def expected_passes(cls, options, facts):
        return xbench.Passes(options.samples)

    def attribute(self, model, image, target):
        lime = Lime(self.forward_func(model),
                    interpretable_model=SkLearnLasso(alpha=self.options.lasso_alpha))
        return lime.attribute(image, baselines=self.options.fill,
                              feature_mask=self.feature_mask(image[0]), target=target,
                              n_samples=self.options.samples,
                              perturbations_per_eval=self.per_eval(model, image))


class KernelShapMap(CaptumPerturbation):
    """Shapley-kernel weighted regression on random coalitions of segments, captum
    ``KernelShap`` (Lundberg & Lee 2017); n forwards."""

    name = "kernel-shap"
    summary = "KernelSHAP: Shapley-kernel regression on segment coalitions, captum KernelShap (n F)"
    stochastic = True
    Options = SampledOptions
    profiles = {"quick": {"samples": 100}}

    @classmethod
    def expected_passes(cls, options, facts):
        return xbench.Passes(options.samples)

    def attribute(self, model, image, target):
        return KernelShap(self.forward_func(model)).attribute(
            image, baselines=self.options.fill, feature_mask=self.feature_mask(image[0]),
            target=target, n_samples=self.options.samples,
            perturbations_per_eval=self.per_eval(model, image))


class ShapleyValueSamplingMap(CaptumPerturbation):
    """a_s = mean over n random segment orderings of the score gained when segment s joins,
    captum ``ShapleyValueSampling``'s algorithm and draws, batched across orderings (Castro et
    al. 2009, Strumbelj & Kononenko 2010); 1 + n x segments forwards."""

    name = "shapley-value-sampling"
    library = "xbench"
    summary = "Shapley value sampling: mean marginal gain over random segment orderings, captum ShapleyValueSampling (1 + n x segments F)"
    stochastic = True

    class Options(SegmentOptions):
        samples: int = xbench.option(25, "random orderings n (captum's default)", minimum=1)

    # 2 orderings of ~25 superpixels: ~51 forwards per image
    profiles = {"quick": {"samples": 2, "n_segments": 25}}

    @classmethod
    def expected_passes(cls, options, facts):
        if options.segments == "patches":
            height, width = facts.input_size
            return xbench.Passes(1 + options.samples * -(-height // options.patch)
                                 * -(-width // options.patch))
        return xbench.Passes(1 + options.samples * options.n_segments, bound="about")

    def attribute(self, model, image, target):
        """captum's algorithm, written out: the same orderings (``torch.randperm`` per sample
        from torch's generator, as captum draws them) and the same differences, but every
        ordering's copies are built by one mask product and batched across orderings, where
        captum maps every pixel to its segment in Python for each ordering (~3x the forwards'
        time at 224 px)."""
        mask = self.feature_mask(image[0])[0, 0]
        count = int(mask.max()) + 1
        member = torch.nn.functional.one_hot(mask, count).permute(2, 0, 1).to(image.dtype)
        fill = torch.full_like(image, self.options.fill)
        f = self.forward_func(model)
        start = f(fill)[:, target[0]]
        orders = torch.stack([torch.randperm(count) for _ in range(self.options.samples)])
        steps = orders.flatten()  # the segment each copy adds, ordering after ordering
        scores = []
        chunk = self.per_eval(model, image)
        for first in range(0, len(steps), chunk):
            rows = torch.arange(first, min(first + chunk, len(steps)))
            position = rows % count  # copies of one ordering hold its segments 0..position
            ordering = orders[rows // count]
            added = torch.arange(count)[None, :] <= position[:, None]  # (rows, count)
            present = torch.zeros(len(rows), count, dtype=image.dtype)
            present.scatter_(1, ordering, added.to(image.dtype))
            keep = torch.einsum("rc,chw->rhw", present.to(image.device), member)[:, None]
            scores.append(f(image * keep + fill * (1 - keep))[:, target[0]])
        scores = torch.cat(scores).view(self.options.samples, count)
        previous = torch.cat([start.expand(self.options.samples, 1), scores[:, :-1]], dim=1)
        gains = torch.zeros(count, device=scores.device, dtype=torch.float32)
        gains.index_add_(0, steps.to(scores.device), (scores - previous).flatten().float())
        attribution = (gains / self.options.samples)[mask]
        return attribution[None, None].expand(1, 3, -1, -1)


@hookimpl
def register_explainers(register):
    for cls in (OcclusionMap, FeatureAblationMap, LimeMap, KernelShapMap,
                ShapleyValueSamplingMap):
        register(cls)
