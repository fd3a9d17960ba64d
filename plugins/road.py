"""ROAD, RemOve And Debias (Rong et al., "A consistent and efficient evaluation strategy for
attribution methods", ICML 2022): remove a fraction of the pixels in the map's order, fill them
by noisy linear imputation, and read the target's softmax probability on the filled image.

Noisy linear imputation (the paper's sec. 4, official code's ``NoisyLinearImputer``): every
removed pixel takes the weighted mean of its 8 neighbours (weight 1/6 for the 4 direct, 1/12
for the 4 diagonal ones; a pixel on the border divides by the weight of the neighbours that
exist), which for all removed pixels at once is the sparse linear system, per channel,

    S_i x_i - sum_{j removed} w_ij x_j = sum_{j kept} w_ij x_j,   S_i = sum_{j in image} w_ij,

then Gaussian noise of std ``noise`` (pixel units) is added to the removed pixels. The system
is assembled with array operations (one pass per neighbour offset) and solved directly, one
sparse LU factorisation (scipy) per image and mask with the three channels as right-hand
sides: the solution Quantus's ``noisy_linear_imputation`` gets from scipy's spsolve (tested to
1e-6). A conjugate-gradient solve on 3x3 convolutions was tried and dropped: on the large
connected regions a real map removes it needed thousands of iterations (tens of seconds per
image) to come within the noise of the exact solution.

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

import numpy as np
import torch

import xbench
from xbench import Metric, MetricBatch, descending_order, hookimpl

OFFSETS = ((-1, -1, 1 / 12), (-1, 0, 1 / 6), (-1, 1, 1 / 12), (0, -1, 1 / 6), (0, 1, 1 / 6),
           (1, -1, 1 / 12), (1, 0, 1 / 6), (1, 1, 1 / 12))


def imputation_system(removed: np.ndarray) -> tuple[object, np.ndarray, list]:
    """The sparse matrix of the neighbour-mean system for one (H, W) bool mask, assembled with
    array operations (8 neighbour offsets, no pixel loop): (A as CSC, removed flat indices,
    [(rows, kept neighbour flat indices, weight)] for the right-hand side)."""
    from scipy.sparse import coo_matrix

    h, w = removed.shape
    flat = np.flatnonzero(removed)
    ys, xs = np.divmod(flat, w)
    variable = np.full(h * w, -1, dtype=np.int64)
    variable[flat] = np.arange(len(flat))
    rows, cols, vals = [np.arange(len(flat))], [np.arange(len(flat))], []
    diagonal = np.zeros(len(flat))
    rhs_terms = []
    for dy, dx, weight in OFFSETS:
        ny, nx = ys + dy, xs + dx
        inside = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
        diagonal += weight * inside
        neighbour = np.where(inside, ny * w + nx, 0)
        is_removed = inside & removed.reshape(-1)[neighbour]
        rows.append(np.flatnonzero(is_removed))
        cols.append(variable[neighbour[is_removed]])
        vals.append(np.full(int(is_removed.sum()), -weight))
        is_kept = inside & ~is_removed
        rhs_terms.append((np.flatnonzero(is_kept), neighbour[is_kept], weight))
    matrix = coo_matrix((np.concatenate([diagonal] + vals),
                         (np.concatenate(rows), np.concatenate(cols))),
                        shape=(len(flat), len(flat))).tocsc()
    return matrix, flat, rhs_terms


def linear_imputation(images: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """Fill the ``removed`` (M, H, W) pixels of (M, C, H, W) images with the solution of the
    neighbour-mean system (module docstring); kept pixels are returned unchanged. One sparse
    LU factorisation per mask (scipy), the C channels solved as its right-hand sides."""
    from scipy.sparse.linalg import splu

    out = images.detach().double().cpu().numpy().copy()
    masks = removed.cpu().numpy()
    m, c = out.shape[:2]
    for k in range(m):  # one linear system per image and mask, not a loop over pixels
        if not masks[k].any():
            continue
        if masks[k].all():
            raise ValueError("noisy linear imputation needs at least one kept pixel")
        matrix, flat, rhs_terms = imputation_system(masks[k])
        channels = out[k].reshape(c, -1)
        rhs = np.zeros((len(flat), c))
        for rows, neighbours, weight in rhs_terms:
            np.add.at(rhs, rows, weight * channels[:, neighbours].T)
        # symmetric matrix: a minimum-degree ordering of A + A^T fills in least (~2x faster)
        lu = splu(matrix, permc_spec="MMD_AT_PLUS_A", options={"SymmetricMode": True})
        channels[:, flat] = lu.solve(rhs).T
    return torch.from_numpy(out).to(device=images.device, dtype=images.dtype)


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

    profiles = {"quick": {"percentages": (10.0, 30.0, 50.0, 70.0, 90.0)}}

    @classmethod
    def expected_passes(cls, options, facts):
        return xbench.Passes(len(options.percentages))

    def score(self, batch: MetricBatch) -> dict[str, torch.Tensor]:
        o = self.options
        if not o.percentages or any(not 0 <= p < 100 for p in o.percentages):
            raise xbench.UserError(f"metric {self.name!r}: percentages must be in [0, 100), "
                                   f"got {o.percentages}")
        key = ("road/curves", self.most_relevant_first, o.percentages, o.noise, o.seed)
        if key not in batch.cache:
            batch.cache[key] = road_curve(batch, o.percentages, self.most_relevant_first,
                                          o.noise, o.seed)
        curve = batch.cache[key]
        batch.curves[(self.name, "")] = curve
        return {"": curve.mean(dim=1)}


def road_curve(batch: MetricBatch, percentages: tuple[float, ...], most_relevant_first: bool,
               noise: float, seed: int) -> torch.Tensor:
    """(B, P) target probability after removing each percentage and imputing."""
    images, targets = batch.images, batch.targets
    b = images.shape[0]
    masks = removal_masks(batch.saliency, percentages, most_relevant_first)  # (P, B, H, W)
    p = len(percentages)
    stacked = images[None].expand(p, *images.shape).reshape(p * b, *images.shape[1:])
    filled = linear_imputation(stacked, masks.reshape(p * b, *masks.shape[2:]))
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
