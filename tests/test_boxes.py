"""Object boxes: the three file formats, lookup beside the data, and the geometry that makes a
box land on the same input pixels as the object drawn on the image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xbench.boxes import (ImageBoxes, box_masks, find_boxes, input_boxes, pad_boxes,
                          read_boxes, resized_size)
from xbench.data import load_image, open_dataset
from xbench.errors import UserError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SHARED_BOXES = SHARED / "ilsvrc2012_val_1000_boxes.csv"
SHARED_IMAGES = SHARED / "ilsvrc2012_val_1000"


def _mask(box: torch.Tensor, size: int) -> torch.Tensor:
    boxes, valid = pad_boxes([box])
    return box_masks(boxes, valid, size, size)[0]


def _profiles(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return mask.any(dim=0), mask.any(dim=1)  # columns, rows


def _drawn(width: int, height: int, box: tuple[int, int, int, int]) -> Image.Image:
    array = np.zeros((height, width, 3), dtype=np.uint8)
    x0, y0, x1, y1 = box
    array[y0:y1 + 1, x0:x1 + 1] = 255
    return Image.fromarray(array)


def _edges_clear(box, annotated, stored, resize, crop, margin=0.15) -> bool:
    """Whether every box edge falls at least ``margin`` px from an input pixel centre (at a
    centre a step edge filters to exactly one half and the 0.5 threshold is a coin toss)."""
    new_w, new_h = resized_size(*stored, resize)
    sx, sy = new_w / annotated[0], new_h / annotated[1]
    edges = [box[0] * sx, (box[2] + 1) * sx, box[1] * sy, (box[3] + 1) * sy]
    return all(abs((e % 1) - 0.5) > margin for e in edges)


def test_resized_size_is_torchvisions():
    from torchvision.transforms.v2 import functional as TF

    for width, height in [(500, 375), (375, 500), (227, 227), (333, 1000), (1237, 750)]:
        out = TF.resize(torch.zeros(1, height, width), [256])
        assert resized_size(width, height, 256) == (out.shape[2], out.shape[1])


@pytest.mark.parametrize("stored,resize,crop", [((150, 100), 40, 32), ((90, 140), 48, 40),
                                                ((64, 64), 36, 32)])
def test_a_drawn_box_lands_on_the_same_pixels(tmp_path, stored, resize, crop):
    generator = np.random.default_rng(0)
    checked = 0
    for trial in range(400):
        if checked == 8:
            break
        w, h = stored
        x0, y0 = int(generator.integers(0, w // 2)), int(generator.integers(0, h // 2))
        x1 = int(generator.integers(x0 + w // 5, w))
        y1 = int(generator.integers(y0 + h // 5, h))
        if not _edges_clear((x0, y0, x1, y1), stored, stored, resize, crop):
            continue
        path = tmp_path / f"box{trial}.png"
        _drawn(w, h, (x0, y0, x1, y1)).save(path)
        image = load_image(path, resize, crop)
        drawn = image[0] > 0.5
        box = input_boxes(ImageBoxes(None, None, ((x0, y0, x1, y1, 7),)), stored, resize, crop, 1)
        if len(box) == 0:
            assert not drawn.any()
            continue
        assert box[0, 4] == 7
        mask = _mask(box[0:1], crop)
        for ours, theirs in zip(_profiles(mask), _profiles(drawn)):
            assert torch.equal(ours, theirs), (box, ours.nonzero().flatten(),
                                               theirs.nonzero().flatten())
        # inside the box, away from its edges, every pixel is the drawn colour
        inner = mask.clone()
        inner[:, :] &= torch.roll(mask, 1, 0) & torch.roll(mask, -1, 0)
        inner &= torch.roll(mask, 1, 1) & torch.roll(mask, -1, 1)
        assert drawn[inner].all() and not drawn[~mask].any()
        checked += 1
    assert checked == 8


def test_squashed_227_boxes_follow_the_stored_image(tmp_path):
    """The shared CSV's case: boxes in a 500x375 original, image stored squashed to 227x227,
    then resize 256 / crop 224. Draw on the original, squash it as the data was, preprocess."""
    generator = np.random.default_rng(1)
    checked = 0
    for trial in range(2000):
        if checked == 6:
            break
        x0, y0 = int(generator.integers(0, 250)), int(generator.integers(0, 180))
        x1, y1 = int(generator.integers(x0 + 60, 500)), int(generator.integers(y0 + 60, 375))
        box = (x0, y0, x1, y1)
        if not _edges_clear(box, (500, 375), (227, 227), 256, 224, margin=0.25):
            continue
        path = tmp_path / f"squashed{trial}.png"
        _drawn(500, 375, box).resize((227, 227), Image.BILINEAR).save(path)
        image = load_image(path, 256, 224)
        ours = input_boxes(ImageBoxes(500, 375, (box + (None,),)), (227, 227), 256, 224, 3)
        assert ours[0, 4] == 3  # the CSV's boxes are of the image's labelled class
        mask = _mask(ours, 224)
        for a, b in zip(_profiles(mask), _profiles(image[0] > 0.5)):
            assert torch.equal(a, b)
        checked += 1
    assert checked == 6


def test_boxes_outside_the_crop_are_dropped_and_clipped():
    # 200x100 -> resize 50 -> 100x50 (scale 0.5), crop 50 starts at x = 25. Box 1: x in
    # [0, 41) -> [0, 20.5) - 25: wholly left of the crop, dropped. Box 2: x [40, 161) ->
    # [-5, 55.5) clipped to 0..49; y [10, 21) -> [5, 10.5): centres 5.5 .. 9.5, rows 5..9.
    boxes = ImageBoxes(None, None, ((0, 0, 40, 99, 1), (40, 10, 160, 20, 2)))
    out = input_boxes(boxes, (200, 100), 50, 50, None)
    assert out.tolist() == [[0, 5, 49, 9, 2]]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


XML = """<annotation><folder>val</folder><filename>ILSVRC2012_val_00000001</filename>
<size><width>500</width><height>375</height><depth>3</depth></size>
<object><name>n01751748</name><bndbox><xmin>111</xmin><ymin>108</ymin><xmax>441</xmax>
<ymax>193</ymax></bndbox></object>
<object><name>n01751748</name><bndbox><xmin>0</xmin><ymin>2</ymin><xmax>10</xmax>
<ymax>20</ymax></bndbox></object></annotation>"""


def test_three_formats_agree(tmp_path):
    from xbench.imagenet import wnid_to_index

    sea_snake = wnid_to_index()["n01751748"]
    csv_file = _write(tmp_path / "b.csv", "file,width,height,x0,y0,x1,y1\n"
                      "ILSVRC2012_val_00000001.JPEG,500,375,111,108,441,193\n"
                      "ILSVRC2012_val_00000001.JPEG,500,375,0,2,10,20\n")
    kaggle = _write(tmp_path / "LOC_val_solution.csv", "ImageId,PredictionString\n"
                    "ILSVRC2012_val_00000001,n01751748 111 108 441 193 n01751748 0 2 10 20 \n")
    folder = tmp_path / "ILSVRC2012_bbox_val_v3" / "val"
    folder.mkdir(parents=True)
    _write(folder / "ILSVRC2012_val_00000001.xml", XML)
    tables = [read_boxes(csv_file), read_boxes(kaggle), read_boxes(folder.parent)]
    coords = ((111, 108, 441, 193), (0, 2, 10, 20))
    for table in tables:
        found = table.get("ILSVRC2012_val_00000001.JPEG")
        assert tuple(b[:4] for b in found.boxes) == coords
    assert tables[0].get("x/ILSVRC2012_val_00000001.png").width == 500
    assert [b[4] for b in tables[0].get("ILSVRC2012_val_00000001").boxes] == [None, None]
    assert [b[4] for b in tables[1].get("ILSVRC2012_val_00000001").boxes] == [sea_snake] * 2
    assert (tables[2].get("ILSVRC2012_val_00000001").width,
            tables[2].get("ILSVRC2012_val_00000001").height) == (500, 375)


@pytest.mark.parametrize("text,needle", [
    ("file,label\na.png,1\n", "unknown boxes format"),
    ("file,width,height,x0,y0,x1,y1\na.png,10,10,0,0,10,5\n", "line 2"),
    ("file,width,height,x0,y0,x1,y1\na.png,10,10,5,0,2,5\n", "x0 <= x1"),
    ("file,width,height,x0,y0,x1,y1\na.png,10,10,zero,0,2,5\n", "x0 'zero' is not a number"),
    ("ImageId,PredictionString\na,n01751748 1 2 3\n", "repeat 'wnid x0 y0 x1 y1'"),
    ("ImageId,PredictionString\na,n99999999 1 2 3 4\n", "not an ImageNet-1k WNID"),
])
def test_bad_boxes_files_say_which_file_and_what(tmp_path, text, needle):
    path = _write(tmp_path / "boxes.csv", text)
    with pytest.raises(UserError, match=needle) as info:
        read_boxes(path)
    assert str(path) in str(info.value) and "--boxes" in str(info.value)


def test_missing_file_and_empty_folder(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        read_boxes(tmp_path / "nope.csv")
    with pytest.raises(UserError, match="no devkit"):
        read_boxes(tmp_path)


def test_boxes_found_beside_the_data_and_matched(tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    for name in ("a.png", "b.png"):
        _drawn(20, 10, (1, 1, 5, 5)).save(images / name)
    assert find_boxes(images) is None
    assert open_dataset(str(images)).boxes is None
    _write(tmp_path / "imgs_boxes.csv", "file,width,height,x0,y0,x1,y1\na.png,40,20,2,2,9,9\n")
    dataset = open_dataset(str(images))
    assert dataset.boxes is not None and dataset.boxes.get("a.png").width == 40
    assert dataset.boxes.get("b.png") is None
    assert dataset.subset(1, seed=0).boxes is dataset.boxes
    other = _write(tmp_path / "other.csv", "file,width,height,x0,y0,x1,y1\nz.png,4,4,0,0,1,1\n")
    with pytest.raises(UserError, match="none of its 1 images is in --data"):
        open_dataset(str(images), boxes=str(other))


@pytest.mark.real_data
@pytest.mark.skipif(not SHARED_BOXES.is_file(), reason="../shared/data is absent")
def test_shared_boxes_csv():
    table = read_boxes(SHARED_BOXES)
    assert len(table.images) == 1000
    assert sum(len(b.boxes) for b in table.images.values()) == 1491
    dataset = open_dataset(str(SHARED_IMAGES))  # found beside the folder
    assert dataset.boxes is not None and dataset.boxes.source.endswith("_boxes.csv")
    first = dataset.items[0]
    with Image.open(first.path) as image:
        assert image.size == (227, 227)
    out = input_boxes(dataset.boxes.get(first.id), (227, 227), 256, 224, first.label)
    assert len(out) >= 1 and (out[:, :4] >= 0).all() and (out[:, :4] <= 223).all()
    assert (out[:, 4] == first.label).all()
