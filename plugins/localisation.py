"""Localisation: does the map point at the object? Scored against the object boxes
(``MetricBatch.boxes``, in input pixels after the image's resize and crop, xbench.boxes).

- Pointing game (Zhang et al., "Top-down neural attention by excitation backprop", ECCV 2016 /
  IJCV 2018; TorchRay's ``PointingGame``): 1 (hit) when the map's maximum point p lies within
  ``tolerance`` px of a box pixel q, ``|p - q|^2 < tolerance^2`` (TorchRay's rule, 15 px),
  else 0 (miss). Ties: ``ties=first`` takes the first maximum in raster order (TorchRay's
  ``argmax``), ``ties=any`` hits when any maximal pixel does. A degenerate map (constant or
  non-finite: it points nowhere) is a miss.
- Energy-based pointing game (Wang et al., Score-CAM, CVPRW 2020, sec. 5.2; Quantus's
  "relevance mass accuracy", Arras et al. 2022): sum of the map inside the boxes over its
  total sum, on the harness's min-max normalised map; a map without mass scores 0.
- Relevance rank accuracy (Arras et al., "CLEVR-XAI", Information Fusion 2022): with K the
  number of box pixels, the fraction of the K highest-ranked pixels that lie in a box; ranks
  by descending saliency, ties in raster order (the stable order every xbench metric uses);
  a degenerate map scores 0.

Which boxes count (``boxes_of``): ``target`` (default) keeps the boxes whose object is of the
explained class. ILSVRC2012 annotates only the objects of the image's one labelled class, so
with ``--target predicted`` an image whose prediction is not its label has no box of the
target and is excluded; ``any`` scores every map against all the image's boxes (the labelled
object), whatever class was explained. An image with no usable box gets NaN: no row, never a
hit. Everything is batched over images and boxes ((B, K, H, W) distances, no pixel loops).
"""

from __future__ import annotations

import torch

import xbench
from xbench import Metric, MetricBatch, descending_order, hookimpl
from xbench import box_distance2, pad_boxes

BOXES_OF = ("target", "any")
TIES = ("first", "any")


def target_boxes(batch: MetricBatch, boxes_of: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, K, 5) boxes and (B, K) validity: the boxes each image is scored against."""
    device = batch.saliency.device
    if batch.boxes is None:
        n = batch.saliency.shape[0]
        return (torch.zeros(n, 1, 5, dtype=torch.long, device=device),
                torch.zeros(n, 1, dtype=torch.bool, device=device))
    boxes, valid = pad_boxes(batch.boxes, device)
    if boxes_of == "target":
        valid = valid & (boxes[..., 4] == batch.targets.to(device)[:, None])
    return boxes, valid


class _BoxMetric(Metric):
    family = "localisation"
    needs_boxes = True
    passes = xbench.Passes(0)  # the map against the boxes: no forward

    class Options(xbench.Options):
        boxes_of: str = xbench.option(
            "target", "boxes scored against: of the target's class, or any of the image",
            choices=BOXES_OF)

    def score(self, batch: MetricBatch) -> dict[str, torch.Tensor]:
        boxes, valid = target_boxes(batch, self.options.boxes_of)
        height, width = batch.saliency.shape[-2:]
        values = self.per_image(batch, boxes, valid, height, width)
        has_box = valid.any(dim=1)
        return {"": torch.where(has_box, values.double(), torch.full_like(values.double(),
                                                                         float("nan")))}

    def inside(self, boxes: torch.Tensor, valid: torch.Tensor, height: int,
               width: int) -> torch.Tensor:
        """(B, H, W) bool: pixels inside a usable box."""
        return ((box_distance2(boxes, height, width) == 0) & valid[..., None, None]).any(dim=1)

    def per_image(self, batch, boxes, valid, height, width) -> torch.Tensor:
        raise NotImplementedError


class PointingGame(_BoxMetric):
    name = "pointing-game"
    direction = "higher"
    unit = "hit"
    summary = "pointing game (TorchRay): the map's maximum within 15 px of a target box"

    class Options(_BoxMetric.Options):
        tolerance: int = xbench.option(15, "hit radius in input pixels (TorchRay: 15)",
                                       minimum=0)
        ties: str = xbench.option("first", "which maximum points: the first in raster order, "
                                  "or any of them", choices=TIES)

    def per_image(self, batch, boxes, valid, height, width):
        tolerance = self.options.tolerance
        distance2 = box_distance2(boxes, height, width)
        near = distance2 < tolerance * tolerance if tolerance > 0 else distance2 == 0
        near = (near & valid[..., None, None]).any(dim=1).flatten(1)  # (B, H*W)
        flat = batch.saliency.flatten(1)
        if self.options.ties == "first":
            hit = near.gather(1, flat.argmax(dim=1, keepdim=True))[:, 0]
        else:
            top = flat == flat.max(dim=1, keepdim=True).values
            hit = (near & top).any(dim=1)
        return (hit & ~batch.degenerate.to(hit.device)).double()


class EnergyPointingGame(_BoxMetric):
    name = "energy-pointing-game"
    direction = "higher"
    unit = "share"
    summary = "energy-based pointing game (Score-CAM): share of the map's mass inside the boxes"

    def per_image(self, batch, boxes, valid, height, width):
        maps = batch.saliency.double()
        inside = self.inside(boxes, valid, height, width)
        total = maps.flatten(1).sum(dim=1)
        within = (maps * inside).flatten(1).sum(dim=1)
        return torch.where(total > 0, within / total.clamp(min=1e-300), torch.zeros_like(total))


class RelevanceRankAccuracy(_BoxMetric):
    name = "relevance-rank-accuracy"
    direction = "higher"
    unit = "share"
    summary = "relevance rank accuracy (Arras 2022): share of the top-K pixels inside the boxes"

    def per_image(self, batch, boxes, valid, height, width):
        inside = self.inside(boxes, valid, height, width).flatten(1)
        size = inside.sum(dim=1)  # K per image
        order = descending_order(batch.saliency)
        ranked_inside = inside.gather(1, order)
        in_top = torch.arange(order.shape[1], device=order.device)[None] < size[:, None]
        hits = (ranked_inside & in_top).sum(dim=1).double()
        accuracy = hits / size.clamp(min=1).double()
        return torch.where(batch.degenerate.to(accuracy.device), torch.zeros_like(accuracy),
                           accuracy)


@hookimpl
def register_metrics(register):
    register(PointingGame)
    register(EnergyPointingGame)
    register(RelevanceRankAccuracy)
