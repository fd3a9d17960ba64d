"""``xbench train lcam``: train an L-CAM-Fm or L-CAM-Img attention head on a frozen classifier.

L-CAM-Fm trains on *cached* features: the frozen backbone runs once per training view before
the first epoch and the head and the classifier tail then train on the stored feature maps
(exact, since the backbone is frozen and in eval mode; it just skips recomputing identical
features every epoch). ``--views V`` stores V views per image: the center crop plus V-1 random
224 crops with random horizontal flips of the 256x256 center square (the usual ImageNet
training augmentation, seeded). L-CAM-Img needs the whole network forward and backward on every
masked image, so it draws a fresh random view per image per epoch instead.

Checkpoints are written every ``--checkpoint-every`` epochs and at the end; ``--resume``
continues from ``--out`` (the optimizer state, epoch counter and random generator are restored).
"""

from __future__ import annotations

import argparse
import shlex
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from xbench.data import load_image, open_dataset
from xbench.errors import UserError
from xbench.model import ClassifierHandle


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="registered model name, e.g. efficientnet-lite0")
    parser.add_argument("--weights", default=None, help="model weights file (model plugin default otherwise)")
    parser.add_argument("--variant", required=True, choices=("fm", "img"),
                        help="fm: mask the feature maps (L-CAM-Fm); img: mask the image (L-CAM-Img)")
    parser.add_argument("--data", required=True, help="training images (any layout xbench run accepts)")
    parser.add_argument("--labels", default=None, help="labels file for --data, when needed")
    parser.add_argument("--layer", default=None, help="feature layer (default: the model's CAM layer)")
    parser.add_argument("--epochs", type=int, required=True, help="total number of epochs")
    parser.add_argument("--out", required=True, help="checkpoint file to write (and --resume from)")
    parser.add_argument("--seed", type=int, default=0, help="seed for initialisation, order, views")
    parser.add_argument("--lr", type=float, default=1e-4, help="learning rate (default 1e-4)")
    parser.add_argument("--head-init", choices=("zero", "pytorch"), default="zero",
                        help="initial head weights: zero (masks start at 0.5; default) or "
                             "PyTorch's default uniform init")
    parser.add_argument("--optimizer", choices=("adam", "sgd"), default="adam",
                        help="adam (default) or the authors' SGD with Nesterov momentum 0.9")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--views", type=int, default=1,
                        help="fm only: cached views per image (1 = center crop only)")
    parser.add_argument("--limit", type=int, default=None, help="use a seeded subset of N images")
    parser.add_argument("--checkpoint-every", type=int, default=1, metavar="EPOCHS")
    parser.add_argument("--resume", action="store_true", help="continue training from --out")
    parser.add_argument("--ship", default=None, metavar="FILE",
                        help="also write a compact copy (fp16 head, no training state) at the end, "
                             "e.g. plugins/assets/lcam-fm_efficientnet-lite0.pt")
    parser.add_argument("--init", default=None, metavar="CKPT",
                        help="start from the head weights of another checkpoint for the same model "
                             "and layer (e.g. an L-CAM-Img head from a trained L-CAM-Fm head)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--lambda-ce", type=float, default=1.5, help="cross-entropy weight")
    parser.add_argument("--lambda-area", type=float, default=2.0, help="average-mask weight")
    parser.add_argument("--lambda-tv", type=float, default=0.01, help="total-variation weight")
    parser.add_argument("--area-power", type=float, default=0.3, help="exponent of the mask in the area term")


def run(args: argparse.Namespace) -> int:
    from xbench_plugins import lcam

    console = Console(stderr=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = lcam.TrainConfig(
        variant=args.variant, epochs=args.epochs, seed=args.seed, lr=args.lr,
        optimizer=args.optimizer, head_init=args.head_init, weight_decay=args.weight_decay, batch_size=args.batch_size,
        views=args.views if args.variant == "fm" else 1,
        loss=lcam.LossWeights(ce=args.lambda_ce, area=args.lambda_area, tv=args.lambda_tv,
                              area_power=args.area_power))
    model = build_model(args.model, args.weights)
    lcam.freeze(model)
    layer = args.layer or model.default_layer
    model.layer(layer)  # validates the name
    tail = lcam.classifier_tail(model.net, layer) if config.variant == "fm" else None
    dataset = open_dataset(args.data, args.labels).subset(args.limit, args.seed)
    items = [item for item in dataset.items if item.label is not None]
    if not items:
        raise UserError(f"--data {args.data}: no labelled images; L-CAM trains on ground-truth labels")
    console.print(f"L-CAM-{config.variant.capitalize()} on {args.model} layer {layer!r}: "
                  f"{len(items)} labelled images from {dataset.name} ({dataset.layout}); "
                  f"{config.epochs} epochs, batch {config.batch_size}, {config.optimizer} lr {config.lr}")

    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    squares = load_squares(model, items, console)
    labels = torch.tensor([item.label for item in items])
    channels = lcam.layer_features(model, layer, crop_batch(model, squares[:1], None)).shape[1]
    head = lcam.AttentionHead(channels, model.num_classes, init=config.head_init)
    optimizer = lcam.make_optimizer(head, config)
    out = Path(args.out)
    start_epoch = 0
    if args.init and not args.resume:
        warm_start(Path(args.init), head, args.model, layer, console)
    if args.resume:
        start_epoch = restore(out, head, optimizer, generator, args.model, layer, config, console)

    info = lcam.HeadInfo(
        model=args.model, layer=layer, variant=config.variant, num_classes=model.num_classes,
        in_channels=channels, command=command_line(args),
        seed=config.seed, data=f"{dataset.name} ({len(items)} images, subset {dataset.subset_hash})",
        loss_weights={k: float(v) for k, v in vars(config.loss).items()},
        notes=f"optimizer={config.optimizer} lr={config.lr} wd={config.weight_decay} "
              f"batch={config.batch_size} views={config.views} "
              f"init={args.init or config.head_init}")

    features = None
    if config.variant == "fm":
        features, labels = cache_features(model, layer, squares, labels, config, console)
    started = time.perf_counter()
    with progress_bar(console) as progress:
        task = progress.add_task("epoch", total=config.epochs, completed=start_epoch, status="")
        for epoch in range(start_epoch, config.epochs):
            stats = run_epoch(head, optimizer, config, model, tail, layer, squares, labels,
                              features, generator, progress)
            summary = lcam.mean_stats(stats)
            progress.update(task, advance=1, status=(
                f"loss {summary['loss']:.3f} (ce {summary['ce']:.3f} area {summary['area']:.3f} "
                f"tv {summary['tv']:.3f}) masked acc {summary['acc']:.3f}"))
            console.print(f"epoch {epoch + 1}/{config.epochs}: " + " ".join(
                f"{k} {v:.4f}" for k, v in summary.items()), highlight=False)
            info.epochs_done = epoch + 1
            if (epoch + 1) % args.checkpoint_every == 0 or epoch + 1 == config.epochs:
                lcam.save_checkpoint(out, head, info, training={
                    "epoch": epoch + 1, "optimizer": optimizer.state_dict(),
                    "generator": generator.get_state(), "last": summary})
    if args.ship:
        lcam.save_checkpoint(args.ship, head, info, half=True)
        console.print(f"wrote the compact head {args.ship}")
    console.print(f"wrote {out} after {time.perf_counter() - started:.0f} s of training")
    return 0


_RECORDED = ("model", "weights", "variant", "data", "labels", "layer", "epochs", "out", "seed",
             "lr", "optimizer", "head_init", "weight_decay", "batch_size", "views", "limit",
             "checkpoint_every", "resume", "init", "ship", "lambda_ce", "lambda_area", "lambda_tv",
             "area_power")


def command_line(args: argparse.Namespace) -> str:
    """The training command with every setting spelled out (defaults included)."""
    words = ["xbench", "train", "lcam"]
    for name in _RECORDED:
        value = getattr(args, name, None)
        if value is None or value is False:
            continue
        words.append("--" + name.replace("_", "-"))
        if value is not True:
            words.append(shlex.quote(str(value)))
    return " ".join(words)


def build_model(name: str, weights: str | None) -> ClassifierHandle:
    from xbench.plugins import build_registry

    registry = build_registry()
    loaded = registry.model(name)(weights=weights).load()
    return ClassifierHandle(loaded, name=name)


def load_squares(model: ClassifierHandle, items, console: Console) -> torch.Tensor:
    """uint8 (N, 3, S, S): resized short side, center S x S square, S = resize size (256)."""
    size = model.loaded.resize_size
    out = torch.empty(len(items), 3, size, size, dtype=torch.uint8)
    with progress_bar(console) as progress:
        task = progress.add_task("loading images", total=len(items), status="")
        for i, item in enumerate(items):
            try:
                image = load_image(item.path, size, size)
            except (OSError, ValueError) as exc:
                raise UserError(f"cannot read training image {item.path}: {exc}") from exc
            out[i] = image.mul(255).round().to(torch.uint8)
            progress.advance(task)
            log_line(console, "loading images", i + 1, len(items))
    return out


def crop_batch(model: ClassifierHandle, squares: torch.Tensor,
               generator: torch.Generator | None) -> torch.Tensor:
    from xbench_plugins.lcam import augmented_view

    return augmented_view(squares.float().div_(255), model.input_size, generator)


def cache_features(model, layer, squares, labels, config, console):
    """fm: features of ``config.views`` views per image, computed once (frozen backbone)."""
    from xbench_plugins.lcam import layer_features

    view_generator = torch.Generator().manual_seed(config.seed + 1)
    chunks, chunk_labels = [], []
    with progress_bar(console) as progress:
        task = progress.add_task("caching features", total=config.views * len(squares), status="")
        for view in range(config.views):
            for index in torch.arange(len(squares)).split(64):
                images = crop_batch(model, squares[index], None if view == 0 else view_generator)
                chunks.append(layer_features(model, layer, images))
                chunk_labels.append(labels[index])
                progress.advance(task, len(index))
                log_line(console, "caching features", view * len(squares) + int(index[-1]) + 1,
                         config.views * len(squares), len(index))
    return torch.cat(chunks), torch.cat(chunk_labels)


def run_epoch(head, optimizer, config, model, tail, layer, squares, labels, features, generator,
              progress):
    from xbench_plugins.lcam import batches, layer_features, train_step

    count = len(features) if features is not None else len(squares)
    task = progress.add_task("  batches", total=-(-count // config.batch_size), status="")
    stats = []
    for index in batches(count, config.batch_size, generator):
        if features is not None:
            stats.append(train_step(head, optimizer, config, labels[index], features[index], tail=tail))
        else:
            images = crop_batch(model, squares[index], generator)
            feats = layer_features(model, layer, images)
            with torch.enable_grad():
                stats.append(train_step(head, optimizer, config, labels[index], feats,
                                        model=model, images=images))
        progress.update(task, advance=1, status=f"loss {stats[-1].loss:.3f}")
        if features is None:  # img epochs are long: report batches too
            log_line(progress.console, "  batches", len(stats), -(-count // config.batch_size))
    progress.remove_task(task)
    return stats


def restore(out, head, optimizer, generator, model_name, layer, config, console) -> int:
    from xbench_plugins.lcam import load_checkpoint

    if not out.is_file():
        raise UserError(f"--resume: {out} does not exist yet; drop --resume to start training")
    loaded, info, training = load_checkpoint(out)
    if (info.model, info.layer, info.variant) != (model_name, layer, config.variant):
        raise UserError(f"--resume: {out} holds a {info.variant} head for {info.model} layer "
                        f"{info.layer!r}, not {config.variant} for {model_name} layer {layer!r}")
    if training is None:
        raise UserError(f"--resume: {out} has no training state (a shipped head?); start afresh")
    head.load_state_dict(loaded.state_dict())
    optimizer.load_state_dict(training["optimizer"])
    generator.set_state(training["generator"])
    console.print(f"resuming from {out} after epoch {training['epoch']}")
    return int(training["epoch"])


def warm_start(path: Path, head, model_name: str, layer: str, console: Console) -> None:
    from xbench_plugins.lcam import load_checkpoint

    loaded, info, _ = load_checkpoint(path)
    if (info.model, info.layer) != (model_name, layer) or loaded.conv.weight.shape != head.conv.weight.shape:
        raise UserError(f"--init: {path} holds a head for {info.model} layer {info.layer!r}, "
                        f"not for {model_name} layer {layer!r}")
    head.load_state_dict(loaded.state_dict())
    console.print(f"initialised the head from {path} ({info.variant}, {info.epochs_done} epochs)")


def progress_bar(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
                    console=console, transient=False, disable=not console.is_terminal)


def log_line(console: Console, label: str, done: int, total: int, increment: int = 1) -> None:
    """Plain progress lines (at each 10%) when stderr is not a terminal (background runs)."""
    if console.is_terminal or total <= 0:
        return
    if (10 * done) // total > (10 * (done - increment)) // total:
        console.print(f"{time.strftime('%H:%M:%S')} {label}: {done}/{total}", highlight=False)
