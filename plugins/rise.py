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

from xbench import Explainer, hookimpl
from xbench.model import ClassifierHandle, masked_batch_size

DEFAULTS = {"n_masks": 4000, "s": 7, "p1": 0.5}


class RISE(Explainer):
    """Monte-Carlo saliency from N random soft masks (N forwards per image)."""

    name = "rise"
    needs_gradients = False
    uses_layer = False
    summary = "RISE: confidence-weighted average of N random masks (N forwards per image)"

    def __init__(self, layer: str | None = None, seed: int = 0, n_masks: int = 4000, s: int = 7,
                 p1: float = 0.5, batch_size: int | None = None, **options) -> None:
        super().__init__(layer=layer, seed=seed, **options)
        checks = {"n_masks": (n_masks, int(n_masks) >= 1, "an integer >= 1"),
                  "s": (s, int(s) >= 1, "an integer >= 1 (grid cells per side)"),
                  "p1": (p1, 0 < float(p1) <= 1, "in (0, 1] (keep probability of a cell)"),
                  "batch_size": (batch_size, batch_size is None or int(batch_size) >= 1,
                                 "an integer >= 1 (masked images per forward pass)")}
        for option, (value, ok, expected) in checks.items():
            if not ok:
                raise ValueError(f"explainer 'rise': option {option} must be {expected}, "
                                 f"got {value!r}")
        self.n_masks, self.s, self.p1 = int(n_masks), int(s), float(p1)
        #: masked images per forward; None: :func:`xbench.model.masked_batch_size` of the device
        self.batch_size = None if batch_size is None else int(batch_size)
        self._cache: dict[tuple[int, int, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @property
    def variant(self) -> str:
        settings = {"n_masks": self.n_masks, "s": self.s, "p1": self.p1}
        return ",".join(f"{k}={v:g}" for k, v in settings.items() if v != DEFAULTS[k])

    def expected_forward_passes(self, model: ClassifierHandle) -> int:
        return self.n_masks

    def prepare(self, model: ClassifierHandle, shape: tuple[int, int, int]) -> None:
        """Draw the masks' random part before timing starts (called by the harness warm-up)."""
        self._random_part(shape[-2], shape[-1], model.device)

    def _random_part(self, height: int, width: int,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(grids (N, 1, s, s) in {0, 1}, row shifts (N,), column shifts (N,)), cached."""
        key = (height, width, str(device))
        if key not in self._cache:
            generator = torch.Generator().manual_seed(self.seed)
            cell_h, cell_w = math.ceil(height / self.s), math.ceil(width / self.s)
            grids = (torch.rand(self.n_masks, 1, self.s, self.s, generator=generator)
                     < self.p1).float()
            rows = torch.randint(0, cell_h, (self.n_masks,), generator=generator)
            cols = torch.randint(0, cell_w, (self.n_masks,), generator=generator)
            self._cache[key] = (grids.to(device), rows.to(device), cols.to(device))
        return self._cache[key]

    def masks(self, start: int, stop: int, height: int, width: int,
              device: torch.device) -> torch.Tensor:
        """Masks ``start:stop`` as a (n, H, W) tensor: upsampled grids cropped at their shifts."""
        grids, rows, cols = self._random_part(height, width, device)
        cell_h, cell_w = math.ceil(height / self.s), math.ceil(width / self.s)
        up = F.interpolate(grids[start:stop], size=((self.s + 1) * cell_h, (self.s + 1) * cell_w),
                           mode="bilinear", align_corners=False)[:, 0]
        index = torch.arange(stop - start, device=device)[:, None, None]
        r = rows[start:stop, None, None] + torch.arange(height, device=device)[None, :, None]
        c = cols[start:stop, None, None] + torch.arange(width, device=device)[None, None, :]
        return up[index, r, c]  # one gather: every mask cropped at its own shift

    def explain(self, model, images, targets):
        batch, _, height, width = images.shape
        chunk = self.batch_size or masked_batch_size(images.device)
        per_chunk = max(1, chunk // batch)  # masks per forward, shared by the batch
        if model.engine_batch_size:  # fill whole engine batches: no padded forwards
            per_chunk = math.lcm(batch, model.engine_batch_size) // batch
        fmt = torch.channels_last if model.channels_last else torch.contiguous_format
        buffer = torch.empty((batch * per_chunk, *images.shape[1:]), dtype=images.dtype,
                             device=images.device).contiguous(memory_format=fmt)
        saliency = torch.zeros(batch, height * width, device=images.device)
        with torch.inference_mode():
            for start in range(0, self.n_masks, per_chunk):
                stop = min(start + per_chunk, self.n_masks)
                masks = self.masks(start, stop, height, width, images.device)  # (n, H, W)
                n = stop - start
                masked = buffer[: batch * n]
                torch.mul(images[:, None], masks[None, :, None],
                          out=masked.view(batch, n, *images.shape[1:]))  # x * M_i
                probs = model.predict(masked).float().softmax(dim=1)
                p_c = probs.view(batch, n, -1).gather(2, targets.view(batch, 1, 1).expand(
                    batch, n, 1))[..., 0]  # (B, n): p_c(x * M_i)
                saliency += p_c @ masks.view(n, -1)  # sum_i p_c(x * M_i) M_i
            saliency = saliency / (self.n_masks * self.p1)  # 1 / (N p1) = 1 / (N E[M])
        return saliency.view(batch, height, width).clone()


@hookimpl
def register_explainers(register):
    register(RISE)
