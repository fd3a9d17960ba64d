"""Object boxes: reading the ILSVRC2012 annotation formats and following the image's
preprocessing, so that a box lands on the same input pixels as the object it frames.

Formats understood by :func:`read_boxes` (``--boxes FILE``, or found beside the data by
:func:`find_boxes`):

- a ``file,width,height,x0,y0,x1,y1`` CSV, one row per box, with the annotated image's width
  and height (../shared/data/ilsvrc2012_val_1000_boxes.csv); the box's object is of the image's
  labelled class;
- Kaggle's ``LOC_val_solution.csv``: ``ImageId,PredictionString`` with ``wnid x0 y0 x1 y1``
  repeated (no image size: the stored image is taken to be the annotated one);
- the devkit's per-image XML files (``ILSVRC2012_bbox_val_v3``, a folder holding ``*.xml``
  directly or under ``val/``): ``<size>`` and one ``<object><name>wnid</name><bndbox>`` each.

Coordinates are 0-based inclusive pixel indices of the annotated image (the shared CSV's
convention, made from the same annotations: 228 of its boxes start at 0, none ends at the
width or height). Boxes are keyed by the image's file stem (``ILSVRC2012_val_00000347``), so
the CSV's ``.JPEG`` names, Kaggle's bare ids and the XML's ``<filename>`` all match.

Geometry (PROTOCOL "Localisation"): pixel index ``i`` covers the continuous interval
``[i, i + 1)``. A box ``x0..x1`` covers ``[x0, x1 + 1)``; it is scaled by
``stored / annotated`` size per axis (images stored squashed to 227x227), then by the resize
of the short side (torchvision's rule: the long side becomes ``int(size * long / short)``),
then shifted by the center crop's offset; an input pixel belongs to the box when its centre
``j + 0.5`` lies inside. Boxes clipped away by the crop are dropped.
"""

from __future__ import annotations

import csv
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import torch

from xbench.errors import UserError

#: a box of the annotated image: x0, y0, x1, y1 (0-based, inclusive), class index or None
#: (None: the object is of the image's labelled class)
Box = tuple[int, int, int, int, int | None]
CSV_COLUMNS = ("file", "width", "height", "x0", "y0", "x1", "y1")


@dataclass(frozen=True)
class ImageBoxes:
    """The boxes of one image, in the coordinates of the image they were drawn on."""

    width: int | None  # annotated image size; None: the stored image itself
    height: int | None
    boxes: tuple[Box, ...]


@dataclass(frozen=True)
class BoxTable:
    """Boxes of a dataset: {file stem: ImageBoxes}, and where they came from."""

    source: str
    layout: str
    images: dict[str, ImageBoxes]

    def get(self, image_id: str) -> ImageBoxes | None:
        return self.images.get(Path(image_id).stem)


def find_boxes(root: Path) -> Path | None:
    """A boxes file beside the data, as labels are found (first match wins): ``boxes.csv`` in
    the folder, a sibling ``<folder>_boxes.csv``, ``LOC_val_solution.csv`` in or beside it, an
    ``ILSVRC2012_bbox_val_v3`` folder in or beside it."""
    for candidate in (root / "boxes.csv", root.parent / f"{root.name}_boxes.csv",
                      root / "LOC_val_solution.csv", root.parent / "LOC_val_solution.csv",
                      root / "ILSVRC2012_bbox_val_v3", root.parent / "ILSVRC2012_bbox_val_v3"):
        if candidate.exists():
            return candidate
    return None


def read_boxes(path: Path, option: str = "--boxes") -> BoxTable:
    """Read any of the three formats (see the module docstring); UserError naming the file."""
    if not path.exists():
        raise UserError(f"{option} {path}: no such file or folder (give a file,width,height,"
                        "x0,y0,x1,y1 CSV, LOC_val_solution.csv or the ILSVRC2012_bbox_val_v3 "
                        "folder of XML files)")
    if path.is_dir():
        return _read_xml_folder(path, option)
    with path.open(newline="", encoding="utf-8") as handle:
        header = next(csv.reader(handle), [])
    header = [h.strip() for h in header]
    if {"ImageId", "PredictionString"} <= set(header):
        return _read_kaggle(path, option)
    if set(CSV_COLUMNS) <= set(header):
        return _read_csv(path, option)
    raise UserError(f"{option} {path}: unknown boxes format (header {header}); expected the "
                    f"columns {','.join(CSV_COLUMNS)}, Kaggle's ImageId,PredictionString, or a "
                    "folder of devkit XML files")


def _number(value: str, path: Path, line: int, column: str, option: str) -> int:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        raise UserError(f"{option} {path}, line {line}: {column} {value!r} is not a number") \
            from None


def _checked(box: tuple[int, int, int, int], size: tuple[int | None, int | None], where: str) -> None:
    x0, y0, x1, y1 = box
    width, height = size
    if x1 < x0 or y1 < y0 or x0 < 0 or y0 < 0 or (width is not None and x1 >= width) \
            or (height is not None and y1 >= height):
        raise UserError(f"{where}: box {box} is not inside a {width}x{height} image with "
                        "x0 <= x1, y0 <= y1 (0-based inclusive pixel indices)")


def _read_csv(path: Path, option: str) -> BoxTable:
    images: dict[str, tuple[int, int, list[Box]]] = {}
    with path.open(newline="", encoding="utf-8") as handle:
        for line, row in enumerate(csv.DictReader(handle), start=2):
            get = lambda c: _number(row[c], path, line, c, option)  # noqa: E731
            size = (get("width"), get("height"))
            box = (get("x0"), get("y0"), get("x1"), get("y1"))
            _checked(box, size, f"{option} {path}, line {line}")
            stem = Path(row["file"]).stem
            entry = images.setdefault(stem, (*size, []))
            if entry[:2] != size:
                raise UserError(f"{option} {path}, line {line}: {row['file']} has size "
                                f"{size[0]}x{size[1]} here but {entry[0]}x{entry[1]} above")
            entry[2].append((*box, None))
    table = {stem: ImageBoxes(w, h, tuple(b)) for stem, (w, h, b) in images.items()}
    return BoxTable(str(path), "boxes CSV (file,width,height,x0,y0,x1,y1)", table)


def _read_kaggle(path: Path, option: str) -> BoxTable:
    from xbench.imagenet import wnid_to_index

    index = wnid_to_index()
    table = {}
    with path.open(newline="", encoding="utf-8") as handle:
        for line, row in enumerate(csv.DictReader(handle), start=2):
            parts = row["PredictionString"].split()
            if len(parts) % 5:
                raise UserError(f"{option} {path}, line {line}: PredictionString must repeat "
                                f"'wnid x0 y0 x1 y1', got {len(parts)} fields")
            boxes = []
            for k in range(0, len(parts), 5):
                wnid = parts[k]
                if wnid not in index:
                    raise UserError(f"{option} {path}, line {line}: {wnid!r} is not an "
                                    "ImageNet-1k WNID")
                box = tuple(_number(v, path, line, "coordinate", option) for v in parts[k + 1:k + 5])
                _checked(box, (None, None), f"{option} {path}, line {line}")
                boxes.append((*box, index[wnid]))
            table[Path(row["ImageId"]).stem] = ImageBoxes(None, None, tuple(boxes))
    return BoxTable(str(path), "kaggle LOC_val_solution.csv", table)


def _read_xml_folder(folder: Path, option: str) -> BoxTable:
    from xbench.imagenet import wnid_to_index

    files = sorted(folder.glob("*.xml")) or sorted(folder.glob("val/*.xml"))
    if not files:
        raise UserError(f"{option} {folder}: no devkit *.xml files in it or in its val/ folder")
    index = wnid_to_index()
    table = {}
    for file in files:
        try:
            root = ET.parse(file).getroot()
            size = (int(root.findtext("size/width")), int(root.findtext("size/height")))
            boxes = []
            for obj in root.iter("object"):
                wnid = obj.findtext("name", "").strip()
                box = tuple(int(float(obj.findtext(f"bndbox/{k}")))
                            for k in ("xmin", "ymin", "xmax", "ymax"))
                if wnid not in index:
                    raise ValueError(f"{wnid!r} is not an ImageNet-1k WNID")
                _checked(box, size, f"{option} {file}")
                boxes.append((*box, index[wnid]))
        except (ET.ParseError, TypeError, ValueError) as exc:
            raise UserError(f"{option} {file}: not a devkit bounding-box XML file ({exc})") \
                from None
        stem = Path(root.findtext("filename", file.stem).strip()).stem or file.stem
        table[stem] = ImageBoxes(*size, tuple(boxes))
    return BoxTable(str(folder), "devkit XML (ILSVRC2012_bbox_val_v3)", table)


# -- geometry ------------------------------------------------------------------------------

def resized_size(width: int, height: int, resize_size: int) -> tuple[int, int]:
    """(width, height) after resizing the short side to ``resize_size`` (torchvision's rule)."""
    if width <= height:
        return resize_size, int(resize_size * height / width)
    return int(resize_size * width / height), resize_size


def crop_offset(size: int, crop: int) -> int:
    """Where the center crop starts along one axis (negative: torchvision pads first)."""
    if crop > size:
        return -((crop - size) // 2)
    return int(round((size - crop) / 2.0))


def input_boxes(boxes: ImageBoxes, stored_size: tuple[int, int], resize_size: int,
                crop_size: int, label: int | None) -> torch.Tensor:
    """(K, 5) long: x0, y0, x1, y1 in 0-based inclusive pixel indices of the model input, and
    the object's class (the image's ``label`` where the file gives none; -1 when unknown).
    Boxes wholly outside the crop are dropped. See the module docstring for the geometry."""
    stored_w, stored_h = stored_size
    new_w, new_h = resized_size(stored_w, stored_h, resize_size)
    annotated_w = boxes.width or stored_w
    annotated_h = boxes.height or stored_h
    if not boxes.boxes:
        return torch.zeros(0, 5, dtype=torch.long)
    raw = torch.tensor([b[:4] for b in boxes.boxes], dtype=torch.float64)
    scale = torch.tensor([new_w / annotated_w, new_h / annotated_h], dtype=torch.float64)
    offset = torch.tensor([crop_offset(new_w, crop_size), crop_offset(new_h, crop_size)],
                          dtype=torch.float64)
    low = raw[:, :2] * scale - offset  # continuous edges
    high = (raw[:, 2:] + 1) * scale - offset
    # pixel j is inside when low <= j + 0.5 < high
    first = torch.ceil(low - 0.5).clamp(min=0)
    last = (torch.ceil(high - 0.5) - 1).clamp(max=crop_size - 1)
    keep = (first <= last).all(dim=1)
    classes = torch.tensor([(b[4] if b[4] is not None else (label if label is not None else -1))
                            for b in boxes.boxes], dtype=torch.long)
    out = torch.cat([first.long(), last.long(), classes[:, None]], dim=1)
    return out[keep]


def pad_boxes(boxes: list[torch.Tensor], device: torch.device | str = "cpu"
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image (K_i, 5) boxes as one (B, K, 5) tensor and its (B, K) validity mask."""
    count = max((len(b) for b in boxes), default=0)
    out = torch.zeros(len(boxes), max(count, 1), 5, dtype=torch.long, device=device)
    valid = torch.zeros(len(boxes), max(count, 1), dtype=torch.bool, device=device)
    for i, b in enumerate(boxes):  # one copy per image, not per pixel
        out[i, :len(b)] = b.to(device)
        valid[i, :len(b)] = True
    return out, valid


def box_distance2(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, K, H, W) squared distance from each input pixel to the nearest pixel of each box
    (0 inside it): the clamp of the pixel to the box is its nearest box pixel."""
    rows = torch.arange(height, device=boxes.device)[None, None, :, None]
    cols = torch.arange(width, device=boxes.device)[None, None, None, :]
    x0, y0, x1, y1 = (boxes[..., k, None, None] for k in range(4))
    dx = (x0 - cols).clamp(min=0) + (cols - x1).clamp(min=0)
    dy = (y0 - rows).clamp(min=0) + (rows - y1).clamp(min=0)
    return dx * dx + dy * dy


def box_masks(boxes: torch.Tensor, valid: torch.Tensor, height: int, width: int,
              tolerance: int = 0) -> torch.Tensor:
    """(B, H, W) bool: pixels within ``tolerance`` px of a valid box (inside it for 0; the
    pointing game's rule: squared distance < tolerance**2, TorchRay)."""
    distance2 = box_distance2(boxes, height, width)
    near = distance2 < tolerance * tolerance if tolerance > 0 else distance2 == 0
    return (near & valid[..., None, None]).any(dim=1)
