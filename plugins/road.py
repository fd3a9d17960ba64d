"""ROAD, RemOve And Debias (Rong et al., "A consistent and efficient evaluation strategy for
attribution methods", ICML 2022): remove a fraction of the pixels in the map's order, fill them
by noisy linear imputation, and read the target's softmax probability on the filled image.

Noisy linear imputation (the paper's sec. 4, official code's ``NoisyLinearImputer``): every
removed pixel takes the weighted mean of its 8 neighbours (weight 1/6 for the 4 direct, 1/12
for the 4 diagonal ones; a pixel on the border divides by the weight of the neighbours that
exist), which for all removed pixels at once is the sparse linear system, per channel,

    S_i x_i - sum_{j removed} w_ij x_j = sum_{j kept} w_ij x_j,   S_i = sum_{j in image} w_ij,

then Gaussian noise of std ``noise`` (pixel units) is added to the removed pixels. The system
is symmetric positive definite whenever a pixel is kept, and is solved for every image, channel,
percentage and order at once by conjugate gradients (3x3 convolutions as the operator, started
from the mean of the kept pixels) to a max-norm residual below ``tolerance``: the same solution
as a direct sparse solve (Quantus's ``noisy_linear_imputation`` calls scipy's spsolve; tested
against it to 1e-4).

- ``road-morf``: most relevant first: the top p% pixels of the map (descending order, ties in
  raster order, as every xbench metric) are removed. Mean over ``percentages`` of the target's
  probability; lower is better.
- ``road-lerf``: least relevant first: the bottom p% (the last in that order) removed; higher
  is better.
The target is the run's target (``--target``), never class 0. The noise (3, H, W) per
percentage comes from a generator seeded with ``seed``, shared by every image (an image's score
never depends on its batch). Per-image curves over the percentages are kept in the rows.
Opt-in (``--metrics road``): 2 x len(percentages) forwards per image and map plus the solves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import xbench
from xbench import Metric, MetricBatch, descending_order, hookimpl

NEIGHBOURS = torch.tensor([[1 / 12, 1 / 6, 1 / 12],
                           [1 / 6, 0.0, 1 / 6],
                           [1 / 12, 1 / 6, 1 / 12]], dtype=torch.float64)


def _neighbour_sum(x: torch.Tensor) -> torch.Tensor:
    """sum_j w_ij x_j over in-image neighbours, for (M, H, W)."""
    kernel = NEIGHBOURS.to(device=x.device, dtype=x.dtype)[None, None]
    return F.conv2d(x[:, None], kernel, padding=1)[:, 0]


def linear_imputation(images: torch.Tensor, removed: torch.Tensor, tolerance: float = 1e-4,
                      max_iterations: int = 5000) -> torch.Tensor:
    """Fill the ``removed`` (M, H, W) pixels of (M, C, H, W) images with the solution of the
    neighbour-mean system (module docstring); kept pixels are returned unchanged."""
    m, c, h, w = images.shape
    x = images.double().reshape(m * c, h, w)
    mask = removed[:, None].expand(m, c, h, w).reshape(m * c, h, w).double()
    kept = 1 - mask
    total = _neighbour_sum(torch.ones_like(x[:1]))  # S_i, (1, H, W)

    def operator(v: torch.Tensor) -> torch.Tensor:
        return mask * (total * v - _neighbour_sum(v * mask))

    rhs = mask * _neighbour_sum(x * kept)
    kept_count = kept.sum(dim=(1, 2)).clamp(min=1)
    start = (x * kept).sum(dim=(1, 2)) / kept_count
    v = mask * start[:, None, None]
    r = rhs - operator(v)
    p = r.clone()
    rr = (r * r).sum(dim=(1, 2))
    for _ in range(max_iterations):
        if float(r.abs().amax()) <= tolerance:
            break
        ap = operator(p)
        alpha = rr / (p * ap).sum(dim=(1, 2)).clamp(min=1e-300)
        v = v + alpha[:, None, None] * p
        r = r - alpha[:, None, None] * ap
        rr_new = (r * r).sum(dim=(1, 2))
        beta = rr_new / rr.clamp(min=1e-300)
        p = r + beta[:, None, None] * p
        rr = rr_new
    filled = x * kept + v * mask
    return filled.reshape(m, c, h, w).to(images.dtype)


def removal_masks(saliency: torch.Tensor, percentages: tuple[float, ...],
                  most_relevant_first: bool) -> torch.Tensor:
    """(P, B, H, W) bool: the int(H*W*p/100) pixels removed at each percentage."""
    b, h, w = saliency.shape
    n = h * w
    order = descending_order(saliency)
    if not most_relevant_first:
        order = order.flip(1)
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(n, device=order.device).expand(b, n))
    counts = torch.tensor([int(n * p / 100) for p in percentages], device=order.device)
    return (rank[None] < counts[:, None, None]).view(len(percentages), b, h, w)


class _Road(Metric):
    family = "faithfulness"
    unit = "p"
    opt_in = True
    most_relevant_first: bool

    class Options(xbench.Options):
        percentages: tuple[float, ...] = xbench.option(
            (10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0),
            "percent of the pixels removed at each step")
        noise: float = xbench.option(0.01, "std of the imputation noise, pixel units",
                                     minimum=0.0)
        seed: int = xbench.option(0, "seed of the imputation noise")
        tolerance: float = xbench.option(1e-4, "max |residual| of the imputation solve",
                                         above=0.0, in_variant=False)

    profiles = {"quick": {"percentages": (10.0, 30.0, 50.0, 70.0, 90.0)}}

    def score(self, batch: MetricBatch) -> dict[str, torch.Tensor]:
        o = self.options
        if not o.percentages or any(not 0 <= p < 100 for p in o.percentages):
            raise xbench.UserError(f"metric {self.name!r}: percentages must be in [0, 100), "
                                   f"got {o.percentages}")
        key = ("road/curves", self.most_relevant_first, o.percentages, o.noise, o.seed,
               o.tolerance)
        if key not in batch.cache:
            batch.cache[key] = road_curve(batch, o.percentages, self.most_relevant_first,
                                          o.noise, o.seed, o.tolerance)
        curve = batch.cache[key]
        batch.curves[(self.name, "")] = curve
        return {"": curve.mean(dim=1)}


def road_curve(batch: MetricBatch, percentages: tuple[float, ...], most_relevant_first: bool,
               noise: float, seed: int, tolerance: float) -> torch.Tensor:
    """(B, P) target probability after removing each percentage and imputing."""
    images, targets = batch.images, batch.targets
    b = images.shape[0]
    masks = removal_masks(batch.saliency, percentages, most_relevant_first)  # (P, B, H, W)
    p = len(percentages)
    stacked = images[None].expand(p, *images.shape).reshape(p * b, *images.shape[1:])
    filled = linear_imputation(stacked, masks.reshape(p * b, *masks.shape[2:]), tolerance)
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randn((p, *images.shape[1:]), generator=generator).to(images.device) * noise
    filled = filled + (draws[:, None] * masks[:, :, None]).reshape(filled.shape)
    probs = []
    for chunk, chunk_targets in zip(filled.split(b), targets.repeat(p).split(b)):
        out = batch.model.predict(chunk).float().softmax(dim=1)
        probs.append(out.gather(1, chunk_targets[:, None])[:, 0])
    return torch.stack(probs, dim=1)


class RoadMoRF(_Road):
    name = "road-morf"
    direction = "lower"
    most_relevant_first = True
    summary = "ROAD (Rong 2022): target probability, most relevant pixels imputed first"


class RoadLeRF(_Road):
    name = "road-lerf"
    direction = "higher"
    most_relevant_first = False
    summary = "ROAD (Rong 2022): target probability, least relevant pixels imputed first"


@hookimpl
def register_metrics(register):
    register(RoadMoRF)
    register(RoadLeRF)
