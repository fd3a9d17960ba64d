"""Class average images I_i: simple, most / least confident, and network-driven."""

from __future__ import annotations

import torch

from xbench import ClassifierHandle


AVERAGE_KINDS = ("simple", "confident", "unconfident", "network")


def simple_average(images: torch.Tensor) -> torch.Tensor:
    """Per-class mean image, each channel stretched onto the class data's range.

    With X the class images (N, C, H, W), M = mean_n X_n and, per channel c,
    lo_d = min X[:, c], hi_d = max X[:, c] (over images and pixels), lo_m = min M_c, hi_m = max M_c:

        I_c = lo_d + (M_c - lo_m) * (hi_d - lo_d) / (hi_m - lo_m)

    i.e. M_c is rescaled by the ratio of the data's extreme-value spread to the mean image's, so
    the average is not washed out. Where lo_d = lo_m (e.g. a background that is 0 in every
    image, as for the digits) this is the plain ratio I_c = M_c * hi_d / hi_m. A constant mean
    channel (hi_m = lo_m) is returned unchanged.
    """
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"simple_average needs images (N>0, C, H, W), got {tuple(images.shape)}")
    images = images.double()
    mean = images.mean(dim=0)
    lo_d, hi_d = images.amin(dim=(0, 2, 3)), images.amax(dim=(0, 2, 3))
    lo_m, hi_m = mean.amin(dim=(1, 2)), mean.amax(dim=(1, 2))
    span_m = hi_m - lo_m
    flat = span_m <= 0
    scale = torch.where(flat, torch.ones_like(span_m), (hi_d - lo_d) / torch.where(flat, 1, span_m))
    offset_from, offset_to = torch.where(flat, 0, lo_m), torch.where(flat, 0, lo_d)
    out = offset_to[:, None, None] + (mean - offset_from[:, None, None]) * scale[:, None, None]
    return out.float()


def confidence_averages(images: torch.Tensor, confidence: torch.Tensor,
                        k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Data-driven averages: (mean of the k most confident images, mean of the k least).

    ``confidence`` (N,) is the model's probability of the class on each of the class's images;
    ranking is a stable descending sort (ties keep dataset order); k is capped at N.
    """
    if k < 1:
        raise ValueError(f"top-K for data-driven averages must be >= 1, got {k}")
    if len(images) != len(confidence) or len(images) == 0:
        raise ValueError("confidence_averages needs as many confidences as images (N > 0)")
    order = torch.sort(confidence, descending=True, stable=True).indices
    k = min(k, len(order))
    return images[order[:k]].mean(dim=0), images[order[-k:]].mean(dim=0)


def network_driven_average(model: ClassifierHandle, start: torch.Tensor, cls: int,
                           steps: int = 100, lr: float = 0.02, weight_decay: float = 1e-3) -> torch.Tensor:
    """Activation maximisation from the simple average (reference picture only, as the thesis).

    Maximises y_cls(x) - weight_decay * ||x - start||^2 over pixel-space x with Adam, clamping x
    to [0, 1] after every step.
    """
    x = start.detach().clone()[None].requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            loss = -model(x)[0, cls] + weight_decay * (x - start).pow(2).sum()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                x.clamp_(0.0, 1.0)
    return x.detach()[0]
