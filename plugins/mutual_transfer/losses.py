"""The method (eqs. 1, 4, 5): attention maps, local regions, their Pearson correlation, the
region mask and the two students' losses."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from xbench import UserError


def attention_map(activation: torch.Tensor) -> torch.Tensor:
    """F(A) = sum_c |A_c|^2 over the channels of a (B, C, H, W) activation -> (B, H, W) (eq. 1)."""
    if activation.dim() != 4:
        raise ValueError(f"attention_map needs a (B, C, H, W) activation, got {tuple(activation.shape)}")
    return activation.pow(2).sum(dim=1)


def match_size(map1: torch.Tensor, map2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring two (B, H, W) maps to the smaller common size by adaptive average pooling."""
    height = min(map1.shape[-2], map2.shape[-2])
    width = min(map1.shape[-1], map2.shape[-1])

    def resize(m: torch.Tensor) -> torch.Tensor:
        if tuple(m.shape[-2:]) == (height, width):
            return m
        return F.adaptive_avg_pool2d(m[:, None], (height, width))[:, 0]

    return resize(map1), resize(map2)


def parse_grid(spec: str | Sequence[int]) -> tuple[int, int]:
    """'2x3' or (2, 3) -> (rows, cols); a single number n means n x n."""
    if isinstance(spec, str):
        parts = spec.lower().replace("×", "x").split("x")
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise UserError(f"--grid {spec!r}: expected ROWSxCOLS such as 2x2 or 4x4") from None
    else:
        values = [int(v) for v in spec]
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) < 1:
        raise UserError(f"--grid {spec!r}: expected two positive integers ROWSxCOLS such as 2x2")
    return values[0], values[1]


def region_slices(height: int, width: int, grid: tuple[int, int]) -> list[tuple[slice, slice]]:
    """The k = rows*cols grid cells of an H x W map, raster order, near-equal integer bounds."""
    rows, cols = grid
    if rows > height or cols > width:
        raise UserError(f"--grid {rows}x{cols} has more cells than the {height}x{width} attention "
                        "map of a paired layer; use a coarser grid")
    row_edges = [i * height // rows for i in range(rows + 1)]
    col_edges = [j * width // cols for j in range(cols + 1)]
    return [(slice(row_edges[i], row_edges[i + 1]), slice(col_edges[j], col_edges[j + 1]))
            for i in range(rows) for j in range(cols)]


def split_regions(maps: torch.Tensor, grid: tuple[int, int]) -> list[torch.Tensor]:
    """Split (B, H, W) maps into k local maps, each flattened to (B, n_r)."""
    return [maps[:, rs, cs].flatten(1) for rs, cs in region_slices(maps.shape[-2], maps.shape[-1], grid)]


def pearson(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Pearson correlation of each row of x and y, (B, n) -> (B,) (eq. 4).

    r = sum (x - mean x)(y - mean y) / sqrt(sum (x - mean x)^2 * sum (y - mean y)^2);
    a row with zero variance in either input gives 0. Clamped to [-1, 1]: rounding can put a
    proportional pair at 1 + 1e-7, which a threshold lambda = 1 must still drop.
    """
    xc = x - x.mean(dim=1, keepdim=True)
    yc = y - y.mean(dim=1, keepdim=True)
    cov = (xc * yc).sum(dim=1)
    scale = xc.pow(2).sum(dim=1).sqrt() * yc.pow(2).sum(dim=1).sqrt()
    r = torch.where(scale > eps, cov / scale.clamp_min(eps), torch.zeros_like(cov))
    return r.clamp(-1.0, 1.0)


def region_correlations(regions1: list[torch.Tensor], regions2: list[torch.Tensor]) -> torch.Tensor:
    """Pearson r of every region pair: (B, k)."""
    return torch.stack([pearson(a, b) for a, b in zip(regions1, regions2)], dim=1)


def region_mask(correlations: torch.Tensor, lam: float) -> torch.Tensor:
    """Regions that transfer: r > lambda; lambda <= -1 keeps all (global transfer)."""
    if lam <= -1:
        return torch.ones_like(correlations, dtype=torch.bool)
    return correlations > lam


def normalized_distance(q1: torch.Tensor, q2: torch.Tensor) -> torch.Tensor:
    """|| q1/||q1||_2 - q2/||q2||_2 ||_2 per row, (B, n) -> (B,) (the summand of eq. 5)."""
    return (F.normalize(q1, dim=1) - F.normalize(q2, dim=1)).norm(dim=1)


@dataclass
class TransferTerms:
    """Per-image attention-transfer sums for each student and what the mask kept."""

    student1: torch.Tensor  # (B,) sum over layers and kept regions, gradient to student 1 only
    student2: torch.Tensor  # (B,) same, gradient to student 2 only
    kept: int = 0
    total: int = 0
    correlations: list[torch.Tensor] = field(default_factory=list)  # per layer (B, k)
    layer_kept: list[int] = field(default_factory=list)  # kept regions per layer pair
    layer_total: list[int] = field(default_factory=list)

    @property
    def kept_fraction(self) -> float:
        return self.kept / self.total if self.total else 0.0

    @property
    def layer_kept_fractions(self) -> list[float]:
        return [k / t if t else 0.0 for k, t in zip(self.layer_kept, self.layer_total)]


def transfer_terms(maps1: Sequence[torch.Tensor], maps2: Sequence[torch.Tensor],
                   grid: tuple[int, int], lam: float, detach_target: bool = True) -> TransferTerms:
    """Local attention-map transfer in both directions over paired layers (eqs. 4-5).

    ``maps1[j]`` and ``maps2[j]`` are the (B, H, W) attention maps of paired layer j. Each
    student's term compares its own local maps with the other's; with ``detach_target`` the
    other's map is a constant, so each term's gradient reaches one student only. The mask
    comes from detached maps (a selection, not something to learn through).
    """
    if len(maps1) != len(maps2):
        raise ValueError(f"students have {len(maps1)} and {len(maps2)} transfer layers; pair them")
    batch = maps1[0].shape[0]
    sum1 = maps1[0].new_zeros(batch)
    sum2 = maps1[0].new_zeros(batch)
    terms = TransferTerms(sum1, sum2)
    for m1, m2 in zip(maps1, maps2):
        m1, m2 = match_size(m1, m2)
        regions1, regions2 = split_regions(m1, grid), split_regions(m2, grid)
        with torch.no_grad():
            r = region_correlations([q.detach() for q in regions1], [q.detach() for q in regions2])
        keep = region_mask(r, lam).to(m1.dtype)
        terms.correlations.append(r)
        terms.layer_kept.append(int(keep.sum()))
        terms.layer_total.append(keep.numel())
        terms.kept += terms.layer_kept[-1]
        terms.total += terms.layer_total[-1]
        for k, (q1, q2) in enumerate(zip(regions1, regions2)):
            target2 = q2.detach() if detach_target else q2
            target1 = q1.detach() if detach_target else q1
            sum1 = sum1 + keep[:, k] * normalized_distance(q1, target2)
            sum2 = sum2 + keep[:, k] * normalized_distance(q2, target1)
    terms.student1, terms.student2 = sum1, sum2
    return terms


def mutual_transfer_losses(logits1: torch.Tensor, logits2: torch.Tensor, labels: torch.Tensor,
                           maps1: Sequence[torch.Tensor], maps2: Sequence[torch.Tensor],
                           grid: tuple[int, int], lam: float, beta: float,
                           detach_target: bool = True) -> tuple[torch.Tensor, torch.Tensor, TransferTerms]:
    """(L_1, L_2, terms): L_i = CE_i + beta/2 * batch mean of student i's transfer sum (eq. 5)."""
    terms = transfer_terms(maps1, maps2, grid, lam, detach_target)
    loss1 = F.cross_entropy(logits1, labels) + beta / 2 * terms.student1.mean()
    loss2 = F.cross_entropy(logits2, labels) + beta / 2 * terms.student2.mean()
    return loss1, loss2, terms
