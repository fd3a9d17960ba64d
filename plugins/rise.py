"""RISE: Randomized Input Sampling for Explanation (Petsiuk et al., BMVC 2018).

Mask generation (paper, "Mask generation"): N binary grids of s x s cells, each cell kept with probability
p1; each grid is bilinearly upsampled to (s + 1) * ceil(H / s) pixels per side and cropped to
H x W at a random shift in [0, ceil(H / s)), so mask edges are soft and fall anywhere. Saliency
(the paper's Monte Carlo estimate of E[f(x * M) | M(lambda) = 1]):

    S_c(lambda) = 1 / (N p1) * sum_i p_c(x * M_i) M_i(lambda)

p_c is the softmax probability of the target; masking is in pixel space (docs/protocol.md "Inputs").

The random part (grids and shifts) is drawn once per explainer instance from ``seed`` on the CPU
(identical on every device) and cached per (input size, device); masks are materialised chunk
by chunk from it and shared by all images of a batch, so N masks never sit in memory at once
(N = 4000 at 224 px would be 800 MB). The upsampling uses torch's bilinear interpolation with
edge clamping; the official code resizes with scikit-image's ``mode='reflect'``, which differs
only in the outermost half cell of the upsampled grid.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import xbench
from xbench import ClassifierHandle, Explainer, hookimpl, masked_batch_size

class RISE(Explainer):
    """Monte-Carlo saliency from N random soft masks (N forwards per image)."""

    name = "rise"
    needs_gradients = False
    uses_layer = False
    summary = "RISE: confidence-weighted average of N random masks (N forwards per image)"

    class Options(xbench.Options):
        n_masks: int = xbench.option(4000, "random masks N (one forward pass each)", minimum=1)
        s: int = xbench.option(7, "grid cells per side of a mask", minimum=1)
        p1: float = xbench.option(0.5, "keep probability of a grid cell", above=0.0, maximum=1.0)
        batch_size: int | None = xbench.option(
            None, "masked images per forward pass (default: by device)", minimum=1,
            in_variant=False)

    # 500 masks instead of 4000 (~7 s per image instead of ~56 s here); s and p1 as in the paper
    profiles = {"quick": {"n_masks": 500}}

    def __init__(self, layer: str | None = None, seed: int = 0, **options) -> None:
        super().__init__(layer=layer, seed=seed, **options)
        self._cache: dict[tuple[int, int, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def expected_passes(cls, options, facts):
        return xbench.Passes(options.n_masks)

    def prepare(self, model: ClassifierHandle, shape: tuple[int, int, int]) -> None:
        """Draw the masks' random part before timing starts (called by the harness warm-up)."""
        self._random_part(shape[-2], shape[-1], model.device)

    def _random_part(self, height: int, width: int,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(grids (N, 1, s, s) in {0, 1}, row shifts (N,), column shifts (N,)), cached."""
        key = (height, width, str(device))
        if key not in self._cache:
            generator = torch.Generator().manual_seed(self.seed)
            cell_h, cell_w = math.ceil(height / self.options.s), math.ceil(width / self.options.s)
            grids = (torch.rand(self.options.n_masks, 1, self.options.s, self.options.s, generator=generator)
                     < self.options.p1).float()
            rows = torch.randint(0, cell_h, (self.options.n_masks,), generator=generator)
            cols = torch.randint(0, cell_w, (self.options.n_masks,), generator=generator)
            self._cache[key] = (grids.to(device), rows.to(device), cols.to(device))
        return self._cache[key]

    def masks(self, start: int, stop: int, height: int, width: int,
              device: torch.device) -> torch.Tensor:
        """Masks ``start:stop`` as a (n, H, W) tensor: upsampled grids cropped at their shifts."""
        grids, rows, cols = self._random_part(height, width, device)
        cell_h, cell_w = math.ceil(height / self.options.s), math.ceil(width / self.options.s)
        up = F.interpolate(grids[start:stop], size=((self.options.s + 1) * cell_h, (self.options.s + 1) * cell_w),
                           mode="bilinear", align_corners=False)[:, 0]
        index = torch.arange(stop - start, device=device)[:, None, None]
        r = rows[start:stop, None, None] + torch.arange(height, device=device)[None, :, None]
        c = cols[start:stop, None, None] + torch.arange(width, device=device)[None, None, :]
        return up[index, r, c]  # one gather: every mask cropped at its own shift

    def explain(self, model, images, targets):
        batch, _, height, width = images.shape
        chunk = self.options.batch_size or masked_batch_size(images.device)
        per_chunk = max(1, chunk // batch)  # masks per forward, shared by the batch
        if model.engine_batch_size:  # fill whole engine batches: no padded forwards
            per_chunk = math.lcm(batch, model.engine_batch_size) // batch
        fmt = torch.channels_last if model.channels_last else torch.contiguous_format
        buffer = torch.empty((batch * per_chunk, *images.shape[1:]), dtype=images.dtype,
                             device=images.device).contiguous(memory_format=fmt)
        saliency = torch.zeros(batch, height * width, device=images.device)
        with torch.inference_mode():
            for start in range(0, self.options.n_masks, per_chunk):
                stop = min(start + per_chunk, self.options.n_masks)
                masks = self.masks(start, stop, height, width, images.device)  # (n, H, W)
                n = stop - start
                masked = buffer[: batch * n]
                torch.mul(images[:, None], masks[None, :, None],
                          out=masked.view(batch, n, *images.shape[1:]))  # x * M_i
                probs = model.predict(masked).float().softmax(dim=1)
                p_c = probs.view(batch, n, -1).gather(2, targets.view(batch, 1, 1).expand(
                    batch, n, 1))[..., 0]  # (B, n): p_c(x * M_i)
                saliency += p_c @ masks.view(n, -1)  # sum_i p_c(x * M_i) M_i
            saliency = saliency / (self.options.n_masks * self.options.p1)  # 1 / (N p1) = 1 / (N E[M])
        return saliency.view(batch, height, width).clone()


@hookimpl
def register_explainers(register):
    register(RISE)
