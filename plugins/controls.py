"""Control explainers: maps that explain nothing, to read every score against.

Quantus (Hedström et al., JMLR 2023) ships such "control" explainers; LATEC (Klein et al.,
NeurIPS 2024) reads its metrics against them too. A faithful method should beat all three on
every faithfulness metric; where it does not, the metric (or the method) says little.

- ``random``: uniform noise U[0, 1) per pixel, one independent map per image. The generator
  is seeded from the run seed and the image's content (:func:`image_seed`), so a map does not
  depend on the image's position in a batch, and two runs with one seed give the same maps.
- ``centre-gaussian``: exp(-((i - c_i)^2 + (j - c_j)^2) / (2 sigma^2)) with (c_i, c_j) the
  image centre ((H - 1) / 2, (W - 1) / 2) and sigma = ``sigma`` x min(H, W): the centre bias of
  ImageNet photos (objects are mostly centred), the same map for every image.
- ``sobel``: Sobel edge magnitude sqrt(G_x^2 + G_y^2) (Sobel & Feldman 1968; kernels
  [1, 2, 1]^T [-1, 0, 1] and its transpose, unnormalised, as ``scipy.ndimage.sobel``), border
  pixels repeated (scipy's ``mode="reflect"``), on the BT.601 luma 0.299 R + 0.587 G + 0.114 B
  (``channels="luma"``) or as the max over R, G, B of each channel's magnitude
  (``channels="max"``). Model-independent: it only sees the pixels.

None of them calls the model: 0 forward and 0 backward passes. Native implementations: they
are a few lines each, and Quantus is not a dependency.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

import xbench
from xbench import Explainer, hookimpl

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601


def image_seed(seed: int, image: torch.Tensor) -> int:
    """A 63-bit seed from the run seed and one image's content (quantised to 8 bits, so the
    same picture on another device or after a float round trip gives the same seed)."""
    pixels = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    digest = hashlib.blake2b(pixels.numpy().tobytes(), digest_size=8,
                             key=str(int(seed)).encode()).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def image_generator(seed: int, image: torch.Tensor) -> torch.Generator:
    """A CPU generator seeded by :func:`image_seed` (draw on the CPU, then move: identical maps
    on every device)."""
    return torch.Generator().manual_seed(image_seed(seed, image))


class RandomControl(Explainer):
    """Uniform noise U[0, 1) per pixel, seeded from the run seed and the image (0 passes)."""

    name = "random"
    needs_gradients = False
    uses_layer = False
    library = "xbench"
    summary = "Control: seeded uniform noise, one map per image (0 passes)"
    passes = xbench.Passes(0)

    def explain(self, model, images, targets):
        _, _, height, width = images.shape
        maps = [torch.rand(height, width, generator=image_generator(self.seed, image))
                for image in images]
        return torch.stack(maps).to(images.device)


def centre_gaussian(height: int, width: int, sigma: float,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """(H, W) isotropic Gaussian with peak 1 at the image centre, sigma in pixels."""
    rows = torch.arange(height, device=device, dtype=torch.float32) - (height - 1) / 2
    cols = torch.arange(width, device=device, dtype=torch.float32) - (width - 1) / 2
    squared = rows[:, None] ** 2 + cols[None, :] ** 2
    return torch.exp(-squared / (2 * sigma ** 2))


class CentreGaussian(Explainer):
    """exp(-|p - centre|^2 / (2 sigma^2)), sigma = ``sigma`` x min(H, W) (0 passes)."""

    name = "centre-gaussian"
    needs_gradients = False
    uses_layer = False
    library = "xbench"
    summary = "Control: isotropic Gaussian at the image centre, the same for every image (0 passes)"
    passes = xbench.Passes(0)

    class Options(xbench.Options):
        sigma: float = xbench.option(0.25, "standard deviation as a fraction of the image's "
                                     "shorter side", above=0.0)

    def explain(self, model, images, targets):
        batch, _, height, width = images.shape
        sigma = self.options.sigma * min(height, width)
        return centre_gaussian(height, width, sigma, images.device).expand(batch, -1, -1).clone()


def sobel_magnitude(planes: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H, W) Sobel gradient magnitude, border pixels repeated."""
    derivative = torch.tensor([-1.0, 0.0, 1.0], device=planes.device)
    smoothing = torch.tensor([1.0, 2.0, 1.0], device=planes.device)
    kernel_x = (smoothing[:, None] * derivative[None, :])  # d/dcolumn, as scipy's axis=-1
    kernel = torch.stack([kernel_x, kernel_x.T])[:, None]  # (2, 1, 3, 3)
    batch, channels, height, width = planes.shape
    padded = F.pad(planes.reshape(batch * channels, 1, height, width).float(), (1, 1, 1, 1),
                   mode="replicate")
    gradients = F.conv2d(padded, kernel)  # cross-correlation, as scipy.ndimage.correlate1d
    return gradients.pow(2).sum(dim=1).sqrt().view(batch, channels, height, width)


class SobelControl(Explainer):
    """Sobel edge magnitude of the image (luma, or the max over channels); 0 passes."""

    name = "sobel"
    needs_gradients = False
    uses_layer = False
    library = "xbench"
    summary = "Control: Sobel edge magnitude of the image, model-independent (0 passes)"
    passes = xbench.Passes(0)

    class Options(xbench.Options):
        channels: str = xbench.option("luma", "edges of the BT.601 luma, or the max over R, G, "
                                      "B of each channel's edges", choices=("luma", "max"))

    def explain(self, model, images, targets):
        if self.options.channels == "luma":
            weights = torch.tensor(LUMA, device=images.device, dtype=images.dtype)
            luma = (images * weights.view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
            return sobel_magnitude(luma)[:, 0]
        return sobel_magnitude(images).amax(dim=1)


@hookimpl
def register_explainers(register):
    register(RandomControl)
    register(CentreGaussian)
    register(SobelControl)
