"""Insertion and deletion AUC (Petsiuk et al., RISE, BMVC 2018, sec. 4.1 "causal metrics").

Pixels are ordered by descending saliency (stable: ties keep raster order). Deletion starts
from the image x and, ``step`` pixels at a time, replaces them by the substrate (the model's
normalisation mean colour in pixel space); insertion starts from a Gaussian blur of x and puts
the original pixels back. The blur is the official RISE code's (``gkern(11, 5)`` convolved with
the normalised image, zero padding): the kernel is a unit impulse filtered by a sigma = 5
Gaussian with reflected boundaries on an 11 x 11 grid (it sums to 1 and is flatter than a
truncated, renormalised Gaussian), and the border is padded with zeros of the *normalised*
image, i.e. with the model's mean colour in pixel space (``blur_padding=mean``, the default);
``blur_padding=reflect`` pads by reflection instead (protocol v1's rule; up to ~0.1 insertion
AUC apart on single images). The curve a_0..a_n is p_c of the image after
0, 1, ..., n steps (n = ceil(H*W / step), the last step may move fewer pixels) and
AUC = (sum_k a_k - (a_0 + a_n) / 2) / n, the trapezoid rule on [0, 1] (docs/protocol.md).

The three metrics read the same curves, computed once per batch and memoised in
``MetricBatch.cache``: 2 x (n + 1) forward passes per image, batched across images and steps.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import xbench
from xbench import Metric, MetricBatch, descending_order, hookimpl

BLUR_KERNEL = 11
BLUR_SIGMA = 5.0
BLUR_PADDINGS = ("mean", "reflect")
DELETION, INSERTION = 0, 1


@dataclass(frozen=True)
class Curves:
    """Per-image deletion and insertion curves (B, n + 1) for one step size."""

    step: int
    deletion: torch.Tensor
    insertion: torch.Tensor


def step_counts(pixels: int, step: int) -> torch.Tensor:
    """Pixels moved after each of the n + 1 curve points: 0, step, 2 step, ..., pixels."""
    steps = math.ceil(pixels / step)
    return torch.clamp(torch.arange(steps + 1) * step, max=pixels)


def auc(curve: torch.Tensor) -> torch.Tensor:
    """Trapezoid AUC of (..., n + 1) curves on equally spaced points of [0, 1] (docs/protocol.md)."""
    steps = curve.shape[-1] - 1
    if steps < 1:
        raise ValueError("a curve needs at least two points (start and end) to have an area")
    return (curve.sum(dim=-1) - (curve[..., 0] + curve[..., -1]) / 2) / steps


@functools.cache
def rise_kernel(size: int = BLUR_KERNEL, sigma: float = BLUR_SIGMA) -> torch.Tensor:
    """(size, size) blur kernel of the official RISE code: ``gkern(klen, nsig)`` filters a unit
    impulse with scipy's Gaussian filter (reflect boundary, truncate 4 sigma); separable, so it
    is the outer product of the filtered 1-D impulse. Sums to 1."""
    from scipy.ndimage import gaussian_filter1d

    impulse = np.zeros(size)
    impulse[size // 2] = 1.0
    line = torch.from_numpy(gaussian_filter1d(impulse, sigma, mode="reflect"))
    return torch.outer(line, line).float()


def blurred(images: torch.Tensor, mean: torch.Tensor, padding: str = "mean") -> torch.Tensor:
    """Insertion's start image: the RISE blur (:func:`rise_kernel`) of pixel-space ``images``.

    ``padding="mean"``: the border is padded with the mean colour ``mean`` (1, 3, 1, 1), which
    is the official code's zero padding of the normalised image (the blur is linear per channel
    and the kernel sums to 1); ``"reflect"``: reflection padding."""
    if padding not in BLUR_PADDINGS:
        raise ValueError(f"blur padding must be one of {', '.join(BLUR_PADDINGS)}, got {padding!r}")
    channels = images.shape[1]
    kernel = rise_kernel().to(images.device, images.dtype).expand(channels, 1, -1, -1)
    half = BLUR_KERNEL // 2
    if padding == "mean":
        centred = images - mean.to(images.dtype)
        return F.conv2d(centred, kernel, padding=half, groups=channels) + mean.to(images.dtype)
    padded = F.pad(images, (half, half, half, half), mode="reflect")
    return F.conv2d(padded, kernel, groups=channels)


def pixel_ranks(saliency: torch.Tensor) -> torch.Tensor:
    """(B, H*W): the position of each pixel in the descending saliency order (0 = first moved)."""
    order = descending_order(saliency)
    ranks = torch.empty_like(order)
    positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
    return ranks.scatter_(1, order, positions)


def perturbed_images(images: torch.Tensor, blur: torch.Tensor, substrate: torch.Tensor,
                     ranks: torch.Tensor, counts: torch.Tensor, jobs: torch.Tensor) -> torch.Tensor:
    """The step images of ``jobs`` (J, 3) rows (curve, image, step), built on the fly.

    Deletion at step k: the k*step top-ranked pixels of x replaced by the substrate; insertion
    at step k: the blurred image with its k*step top-ranked pixels taken from x.
    """
    curve, image, step = jobs.unbind(1)
    moved = (ranks[image] < counts[step][:, None]).view(-1, 1, *images.shape[-2:])
    original = images[image]
    is_deletion = (curve == DELETION).view(-1, 1, 1, 1)
    # moved pixels: substrate (deletion) or x (insertion); others: x (deletion) or blur (insertion)
    moved_value = torch.where(is_deletion, substrate.expand_as(original), original)
    kept_value = torch.where(is_deletion, original, blur[image])
    return torch.where(moved, moved_value, kept_value)


def _job_chunks(images: int, points: int, chunk: int, multiple: int = 1) -> Iterator[torch.Tensor]:
    """All (curve, image, step) triples as (J, 3) rows, in the fewest chunks of at most ``chunk``
    rows, sized as evenly as possible (no small last chunk) when ``multiple`` is 1, else in
    multiples of ``multiple`` rows but the last (an engine's batch: full calls, and one padded
    one at most with the compiled engine); the steps of an image are adjacent."""
    total = 2 * images * points
    if multiple > 1:
        size = max(1, chunk // multiple) * multiple
        bounds = [*range(0, total, size), total]
    else:
        pieces = math.ceil(total / chunk)
        bounds = [i * total // pieces for i in range(pieces + 1)]
    for start, end in itertools.pairwise(bounds):
        flat = torch.arange(start, end)
        yield torch.stack([flat // (images * points), flat // points % images, flat % points], 1)


def compute_curves(batch: MetricBatch, step: int, chunk: int, blur_padding: str = "mean") -> Curves:
    """Deletion and insertion curves of every image of ``batch``: 2 (n + 1) forwards each."""
    images, targets = batch.images, batch.targets
    num, _, height, width = images.shape
    counts = step_counts(height * width, step).to(images.device)
    points = counts.numel()
    ranks = pixel_ranks(batch.saliency.to(images.device))
    substrate = batch.model.mean.to(images.dtype)
    blur = blurred(images, substrate, blur_padding)
    scores = torch.empty(2, num, points, dtype=torch.float64)
    for jobs in _job_chunks(num, points, chunk, batch.model.engine_batch_size or 1):
        jobs = jobs.to(images.device)
        inputs = perturbed_images(images, blur, substrate, ranks, counts, jobs)
        probs = batch.model.probabilities(inputs, batch_size=chunk)
        target = probs.gather(1, targets[jobs[:, 1]][:, None])[:, 0]
        curve, image, point = jobs.cpu().unbind(1)
        scores[curve, image, point] = target.double().cpu()
    return Curves(step=step, deletion=scores[DELETION], insertion=scores[INSERTION])


class _CausalMetric(Metric):
    """Shared options: ``step`` pixels per step (default: the image width, i.e. 224 at 224x224)
    ``blur_padding`` of insertion's blurred start image ("mean", the official RISE rule, or
    "reflect"; see the module docstring), and ``batch_size`` step images per forward pass (default: 8 on CPU, as fast as larger
    batches there in benchmarks/bench_metrics.py and light on memory; 64 on accelerators,
    which need wide batches to be busy). The batch size changes
    which images share a forward, never which pixels move: scores agree to the float rounding
    of the model (bit for bit when its per-image output does not depend on the batch)."""

    unit = "AUC"

    class Options(xbench.Options):
        step: int | None = xbench.option(
            None, "pixels moved per step (default: the image width)", minimum=1)
        blur_padding: str = xbench.option(
            "mean", "padding of insertion's blurred start image", choices=BLUR_PADDINGS)
        batch_size: int | None = xbench.option(
            None, "step images per forward pass (default: 8 on CPU, 64 on accelerators)",
            minimum=1, in_variant=False)

    # 16 steps of 3136 pixels at 224x224 instead of 224 of 224: 34 forwards per image and map
    # instead of 450. One step for all three metrics, so they share one set of curves.
    profiles = {"quick": {"step": 3136}}

    def format_variant(self, changed):
        # the score keys already name the step and the blur padding (see _variant)
        return ""

    @classmethod
    def expected_passes(cls, options, facts):
        """Both curves, n + 1 points each with n = ceil(H W / step), whichever of the three
        metrics asks: 2 (n + 1) forwards per image, shared by the metrics of one step."""
        height, width = facts.input_size
        step = options.step if options.step is not None else width
        points = math.ceil(height * width / step) + 1
        return xbench.Passes(2 * points, shared=f"insertion-deletion/curves:{step}:"
                                                f"{options.blur_padding}")

    def curves(self, batch: MetricBatch) -> Curves:
        """The batch's curves for this step size, computed by whichever metric asks first."""
        step = self.options.step if self.options.step is not None else int(batch.images.shape[-1])
        key = ("insertion-deletion/curves", step, self.options.blur_padding)
        if key not in batch.cache:
            chunk = self.options.batch_size or default_batch_size(batch.images.device)
            curves = compute_curves(batch, step, chunk, self.options.blur_padding)
            batch.cache[key] = curves
            variant = _variant(step, self.options.blur_padding)
            batch.curves[("deletion", variant)] = curves.deletion
            batch.curves[("insertion", variant)] = curves.insertion
        return batch.cache[key]

    def score(self, batch: MetricBatch) -> dict[str, torch.Tensor]:
        curves = self.curves(batch)
        return {_variant(curves.step, self.options.blur_padding): self.per_image(curves)}

    @staticmethod
    def per_image(curves: Curves) -> torch.Tensor:
        raise NotImplementedError


def default_batch_size(device: torch.device) -> int:
    """Step images per forward when the ``batch_size`` option is not given."""
    return 8 if device.type == "cpu" else 64


def _variant(step: int, blur_padding: str = "mean") -> str:
    """``step=N``, plus the blur padding when it is not the protocol's default."""
    return f"step={step}" if blur_padding == "mean" else f"step={step},blur_padding={blur_padding}"


class Insertion(_CausalMetric):
    name = "insertion"
    direction = "higher"
    summary = "Insertion AUC (RISE): p_c while salient pixels return to a blurred image"

    @staticmethod
    def per_image(curves):
        return auc(curves.insertion)


class Deletion(_CausalMetric):
    name = "deletion"
    direction = "lower"
    summary = "Deletion AUC (RISE): p_c while salient pixels are replaced by the mean colour"

    @staticmethod
    def per_image(curves):
        return auc(curves.deletion)


class InsertionDeletion(_CausalMetric):
    name = "insertion-deletion"
    direction = "higher"
    summary = "AUC(insertion) - AUC(deletion), as in Group-CAM and layer-wise CAM papers"

    @staticmethod
    def per_image(curves):
        return auc(curves.insertion) - auc(curves.deletion)


@hookimpl
def register_metrics(register):
    register(Insertion)
    register(Deletion)
    register(InsertionDeletion)
