"""Score-CAM (Wang et al., CVPR-W 2020), as the authors' official implementation defines it.

For image x, target c and the K activation maps A^k of the target layer (official
``cam/scorecam.py``, github.com/haofanwang/Score-CAM):

    U^k   = Upsample_bilinear(A^k) to the input size (align_corners=False)
    skip k when max U^k == min U^k             (constant map: weight 0, no forward pass)
    M^k   = (U^k - min U^k) / (max U^k - min U^k)              (min-max to [0, 1])
    w^k   = softmax(f(x * M^k))_c                              (masked-input confidence)
    L^c   = ReLU(sum_k w^k U^k)                                (ReLU of the weighted sum)

The sum uses the *un-normalised, upsampled* maps U^k, as the official code does; because
bilinear upsampling is linear, sum_k w^k U^k = Upsample(sum_k w^k A^k), which is what is computed
(one upsampling instead of K), and the ReLU is applied after upsampling as in the official code.
Masking is in pixel space (docs/protocol.md "Inputs"; the official code multiplies the normalised
tensor, i.e. masks towards the mean colour instead of black).

Cost per image: 1 forward (activations) + K - skipped forwards, exactly (docs/protocol.md "Cost").
The number of skipped (constant) channels of the last call is kept in ``last_skipped``.

Speed: masked inputs are built chunk by chunk (``batch_size`` masks per forward) into one
reused buffer, in the model's memory format, under inference mode, and pushed through
``model.predict``, i.e. the run's inference engine (ONNX Runtime by default on CPU,
xbench/engine.py); nothing synchronises with the host inside the mask loop (one device-to-host
read per image, for the list of kept channels).

Option ``max_channels`` (default None: the paper's setting) is a *named approximation* for quick
runs: only the ``max_channels`` non-constant channels with the largest spatial mean activation
are scored, the others get weight 0. It is recorded in ``variant``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import xbench
from xbench import ClassifierHandle, Explainer, capture_activations, hookimpl, masked_batch_size


def upsampled_range(activation: torch.Tensor, size: tuple[int, int],
                    chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (min, max) of the bilinearly upsampled maps of ``activation`` (K, h, w),
    computed ``chunk`` channels at a time so the K upsampled maps never coexist in memory."""
    lows, highs = [], []
    for part in activation.split(chunk):
        up = F.interpolate(part[:, None].float(), size=size, mode="bilinear", align_corners=False)
        flat = up.flatten(1)
        lows.append(flat.amin(dim=1))
        highs.append(flat.amax(dim=1))
    return torch.cat(lows), torch.cat(highs)


def chosen_channels(activation: torch.Tensor, low: torch.Tensor, high: torch.Tensor,
                    max_channels: int | None) -> torch.Tensor:
    """Indices of the channels that get a forward pass: non-constant ones (official rule),
    limited to the ``max_channels`` largest by spatial mean activation when that is set."""
    varying = high > low
    if max_channels is not None and int(varying.sum()) > max_channels:
        means = activation.float().mean(dim=(1, 2)).masked_fill(~varying, float("-inf"))
        return means.topk(max_channels).indices.sort().values
    return varying.nonzero()[:, 0]


class ScoreCAM(Explainer):
    """Score-CAM with skipped constant channels, chunked masking and exact pass counts."""

    name = "scorecam"
    needs_gradients = False
    summary = "Score-CAM: activation maps weighted by masked-input confidence (1 + K forwards)"

    class Options(xbench.Options):
        max_channels: int | None = xbench.option(
            None, "score only the K most active channels (none: all, the paper)", minimum=1)
        batch_size: int | None = xbench.option(
            None, "masked images per forward pass (default: by device)", minimum=1,
            in_variant=False)

    # At the default layer of EfficientNet-Lite0 (K = 1280) Score-CAM costs 1281 forwards per
    # image (~18 s here); the 128 most active channels cost 129 (~1.8 s).
    profiles = {"quick": {"max_channels": 128}}

    def __init__(self, layer: str | None = None, seed: int = 0, **options) -> None:
        super().__init__(layer=layer, seed=seed, **options)
        #: (B,) constant channels skipped per image in the last ``explain`` call
        self.last_skipped = torch.zeros(0, dtype=torch.long)
        #: (B,) channels that got a forward pass per image in the last ``explain`` call
        self.last_scored = torch.zeros(0, dtype=torch.long)

    @classmethod
    def expected_passes(cls, options, facts):
        """1 + K (at most ``max_channels``): constant channels, found only while running, are
        skipped, so this is an upper bound."""
        if facts.channels is None:
            return None
        limit = options.max_channels
        scored = facts.channels if limit is None else min(facts.channels, limit)
        return xbench.Passes(1 + scored, bound="at most")

    def diagnostics(self) -> dict[str, torch.Tensor]:
        """Constant channels skipped (weight 0, no forward pass) per image of the last call."""
        return {"skipped-channels": self.last_skipped.double()}

    def explain(self, model, images, targets):
        module = model.layer(self.layer)
        with torch.inference_mode():
            with capture_activations(module, keep_grad=False, name=self.layer) as store:
                model(images)
            activations = store["activation"]
            if activations.dim() != 4:
                raise ValueError(f"explainer 'scorecam': layer {self.layer!r} gives shape "
                                 f"{tuple(activations.shape)}; it needs (B, K, h, w) feature maps")
            chunk = self.options.batch_size or masked_batch_size(images.device)
            buffer = self._buffer(model, images, chunk)
            results = [self._explain_one(model, image, int(target), activation, buffer)
                       for image, target, activation in zip(images, targets.tolist(), activations)]
        maps = torch.stack([r[0] for r in results])
        self.last_skipped = torch.tensor([r[1] for r in results], dtype=torch.long)
        self.last_scored = torch.tensor([r[2] for r in results], dtype=torch.long)
        return maps.clone()  # a normal tensor: callers may work on it outside inference mode

    @staticmethod
    def _buffer(model: ClassifierHandle, images: torch.Tensor, chunk: int) -> torch.Tensor:
        """The reused input buffer: ``chunk`` masked images in the model's memory format."""
        shape = (chunk, *images.shape[1:])
        fmt = torch.channels_last if model.channels_last else torch.contiguous_format
        return torch.empty(shape, dtype=images.dtype, device=images.device).contiguous(
            memory_format=fmt)

    def _explain_one(self, model: ClassifierHandle, image: torch.Tensor, target: int,
                     activation: torch.Tensor, buffer: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        size = (image.shape[-2], image.shape[-1])
        chunk_size = len(buffer)
        low, high = upsampled_range(activation, size, chunk_size)
        skipped = int((high <= low).sum())
        channels = chosen_channels(activation, low, high, self.options.max_channels)
        weights = torch.zeros(activation.shape[0], device=image.device)
        for chunk in channels.split(chunk_size):
            up = F.interpolate(activation[chunk][:, None].float(), size=size, mode="bilinear",
                               align_corners=False)
            masks = (up - low[chunk, None, None, None]) / (high - low)[chunk, None, None, None]
            masked = torch.mul(image, masks, out=buffer[: len(chunk)])  # x * M^k, pixel space
            probs = model.predict(masked).float().softmax(dim=1)
            weights[chunk] = probs[:, target]  # w^k = softmax(f(x * M^k))_c
        combined = (weights[:, None, None] * activation.float()).sum(dim=0)  # sum_k w^k A^k
        up = F.interpolate(combined[None, None], size=size, mode="bilinear", align_corners=False)
        return torch.relu(up[0, 0]), skipped, len(channels)  # ReLU(sum_k w^k U^k)


@hookimpl
def register_explainers(register):
    register(ScoreCAM)
