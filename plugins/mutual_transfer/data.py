"""Training and evaluation images held in memory: scikit-learn digits (embedded), CIFAR-10/100
from a local folder (never downloaded), or an image folder read by the core loader."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console

from xbench import Progress, UserError, imagenet_class_names, load_labelled_images, open_dataset


@dataclass
class ImageSet:
    """Images held in memory as uint8 (N, 3, S, S) pixel-space tensors, with labels."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: tuple[str, ...]
    name: str
    #: whether a horizontal flip keeps the label (natural images yes, digits no)
    flip: bool = False

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4 or self.images.shape[1] != 3:
            raise ValueError("ImageSet.images must be a uint8 tensor (N, 3, S, S)")
        if len(self.images) != len(self.labels):
            raise ValueError("ImageSet needs one label per image")

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index].float().div_(255.0), self.labels[index]


BUILTIN_DATA = ("digits", "cifar10", "cifar100")


DIGITS_TEST_FRACTION = 0.3


DIGITS_SPLIT_SEED = 0  # fixed: --seed varies training only, never which digits are held out


def load_digits_split() -> tuple[Any, Any]:
    """scikit-learn's 1797 8x8 digits, upsampled to 32x32 (bilinear), greyscale copied to RGB,
    split 70/30 stratified with a fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # values 0..16
    pixels = F.interpolate(pixels, size=(32, 32), mode="bilinear", align_corners=False)
    images = (pixels.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(torch.arange(len(labels)).numpy(), test_size=DIGITS_TEST_FRACTION,
                                           stratify=labels.numpy(), random_state=DIGITS_SPLIT_SEED)
    names = tuple(str(i) for i in range(10))
    return (ImageSet(images[train_idx], labels[train_idx], names, "digits-train"),
            ImageSet(images[test_idx], labels[test_idx], names, "digits-test"))


def load_cifar(name: str, root: str) -> tuple[Any, Any]:
    """CIFAR-10/100 through torchvision from ``root`` (download=False: never a network call)."""
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    sets = []
    for train in (True, False):
        try:
            ds = cls(root, train=train, download=False)
        except RuntimeError as exc:
            raise UserError(
                f"--data {name}: not found under --data-root {root} (expected {Path(root) / folder}). "
                f"xbench never downloads it during training; on a machine with internet run "
                f"python -c \"import torchvision; torchvision.datasets.{cls.__name__}('{root}', "
                f"download=True)\" and copy the folder here ({exc})") from None
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        sets.append(ImageSet(images, torch.tensor(ds.targets, dtype=torch.long), tuple(ds.classes),
                             f"{name}-{'train' if train else 'test'}", flip=True))
    return sets[0], sets[1]


def _class_names(dataset: Any) -> tuple[str, ...]:
    if dataset.layout.startswith("class folders (sorted names)"):
        root = Path(dataset.root)
        return tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))
    if "ImageNet" in dataset.layout or "wnid" in dataset.layout or dataset.is_ilsvrc_val:
        return imagenet_class_names()
    labels = [i.label for i in dataset.items if i.label is not None]
    return tuple(str(i) for i in range(max(labels) + 1))


def load_folder(path: str, resize_size: int, crop_size: int, limit: int | None, seed: int,
                class_names: tuple[str, ...] | None, console: Console) -> Any:
    """An image folder (any layout xbench.data.open_dataset understands) as an in-memory ImageSet.

    Images are read with the protocol's resize/center-crop (short side ``resize_size``, crop
    ``crop_size``); unlabelled files are skipped with a note.
    """
    dataset = open_dataset(path).subset(limit, seed)
    names = class_names or _class_names(dataset)
    items = [i for i in dataset.items if i.label is not None]
    if not items:
        raise UserError(f"--data {path}: no labelled images ({dataset.layout}); use class folders "
                        "or a labels.csv with columns file,label")
    if len(items) < len(dataset.items):
        console.print(f"[yellow]note[/]: {len(dataset.items) - len(items)} unlabelled images in {path} skipped")
    bad = [i.id for i in items if i.label >= len(names)]
    if bad:
        raise UserError(f"--data {path}: labels of {bad[:3]} exceed the {len(names)} classes of the training data")
    with Progress(console) as progress:
        read = load_labelled_images(items, resize_size, crop_size, source=f"--data {path}",
                                    progress=progress)
    return ImageSet(read.images, read.labels, names, Path(path).name, flip=True)


def load_data(args: argparse.Namespace, students_input: tuple[int, int], console: Console) -> tuple[Any, Any]:
    """(train set, evaluation set or None) for ``--data`` / ``--val-data``."""
    if args.data == "digits":
        train, test = load_digits_split()
    elif args.data in ("cifar10", "cifar100"):
        train, test = load_cifar(args.data, args.data_root)
    else:
        resize, crop = students_input
        train = load_folder(args.data, resize, crop, args.limit, args.seed, None, console)
        test = None
        if args.val_data:
            test = load_folder(args.val_data, resize, crop, args.val_limit, 0, train.class_names, console)
        return train, test
    if args.val_data:
        raise UserError(f"--val-data is for folder datasets; --data {args.data} has its own test split")
    return _limit(train, args.limit, args.seed), _limit(test, args.val_limit, 0)


def _limit(data: Any, limit: int | None, seed: int) -> Any:
    if limit is None or limit >= len(data):
        return data
    if limit <= 0:
        raise UserError(f"--limit/--val-limit must be positive, got {limit}")
    index = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:limit].sort().values
    return type(data)(data.images[index], data.labels[index], data.class_names, data.name, data.flip)
