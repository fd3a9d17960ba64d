"""Saliency-map post-processing shared by the runner and the metrics (docs/protocol.md)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def normalize_maps(maps: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Upsample (B, h, w) maps to ``size`` and min-max each to [0, 1].

    Returns (maps, degenerate). A map with NaN/Inf, or constant after upsampling (all zeros
    included), is degenerate and returned as all zeros (docs/protocol.md "Saliency maps").
    """
    if maps.dim() != 3:
        raise ValueError(f"saliency maps must have shape (B, h, w), got {tuple(maps.shape)}")
    maps = maps.detach().float()
    finite = torch.isfinite(maps).flatten(1).all(dim=1)
    maps = torch.where(torch.isfinite(maps), maps, torch.zeros_like(maps))
    if tuple(maps.shape[-2:]) != tuple(size):
        maps = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    flat = maps.flatten(1)
    low = flat.min(dim=1).values
    high = flat.max(dim=1).values
    span = high - low
    degenerate = ~finite | (span <= 0)
    safe_span = torch.where(degenerate, torch.ones_like(span), span)
    out = (maps - low[:, None, None]) / safe_span[:, None, None]
    out = torch.where(degenerate[:, None, None], torch.zeros_like(out), out)
    return out, degenerate


def descending_order(maps: torch.Tensor) -> torch.Tensor:
    """Pixel indices (B, H*W) by descending saliency; ties keep raster order (stable sort)."""
    return torch.sort(maps.flatten(1), dim=1, descending=True, stable=True).indices


def retention_masks(maps: torch.Tensor, retentions: tuple[float, ...],
                    binary: bool = False) -> list[torch.Tensor]:
    """:func:`retention_mask` at each of ``retentions``, sorting every map once (and not at
    all for r = 1, which keeps every pixel)."""
    for retention in retentions:
        if not 0 < retention <= 1:
            raise ValueError(f"retention must be in (0, 1], got {retention}")
    batch, height, width = maps.shape
    order = None
    out = []
    for retention in retentions:
        keep = math.ceil(retention * height * width)
        mask = torch.ones(batch, height * width, dtype=torch.bool, device=maps.device)
        if keep < height * width:
            if order is None:
                order = descending_order(maps)
            mask = torch.zeros_like(mask).scatter_(1, order[:, :keep], True)
        mask = mask.view(batch, height, width)
        out.append(mask.to(maps.dtype) if binary else maps * mask)
    return out


def retention_mask(maps: torch.Tensor, retention: float, binary: bool = False) -> torch.Tensor:
    """Keep the top ceil(r*H*W) pixels of each map (B, H, W), zero the rest.

    Continuous (default, L-CAM/TAME protocol): kept pixels keep their saliency weight.
    Binary: kept pixels are 1. r = 1 with continuous weights is the plain map.
    """
    return retention_masks(maps, (retention,), binary)[0]
