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

from xbench import ClassifierHandle, Progress, UserError, build_registry, message_console, open_dataset
from xbench_plugins.lcam import checkpoint as lcam_checkpoint
from xbench_plugins.lcam import train as lcam_train
from xbench_plugins.lcam.head import AttentionHead, classifier_tail, layer_features
from xbench_plugins.lcam.loss import LossWeights


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
    console = message_console()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = lcam_train.TrainConfig(
        variant=args.variant, epochs=args.epochs, seed=args.seed, lr=args.lr,
        optimizer=args.optimizer, head_init=args.head_init, weight_decay=args.weight_decay, batch_size=args.batch_size,
        views=args.views if args.variant == "fm" else 1,
        loss=LossWeights(ce=args.lambda_ce, area=args.lambda_area, tv=args.lambda_tv,
                         area_power=args.area_power))
    model = build_model(args.model, args.weights)
    lcam_train.freeze(model)
    layer = args.layer or model.default_layer
    model.layer(layer)  # validates the name
    tail = classifier_tail(model.net, layer) if config.variant == "fm" else None
    dataset = open_dataset(args.data, args.labels).subset(args.limit, args.seed)
    items = [item for item in dataset.items if item.label is not None]
    if not items:
        raise UserError(f"--data {args.data}: no labelled images; L-CAM trains on ground-truth labels")
    console.print(f"L-CAM-{config.variant.capitalize()} on {args.model} layer {layer!r}: "
                  f"{len(items)} labelled images from {dataset.name} ({dataset.layout}); "
                  f"{config.epochs} epochs, batch {config.batch_size}, {config.optimizer} lr {config.lr}")

    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    with Progress(console) as progress:
        squares = lcam_train.load_squares(model, items, f"--data {args.data}", progress)
    labels = torch.tensor([item.label for item in items])
    channels = layer_features(model, layer, lcam_train.crop_batch(model, squares[:1], None)).shape[1]
    head = AttentionHead(channels, model.num_classes, init=config.head_init)
    optimizer = lcam_train.make_optimizer(head, config)
    out = Path(args.out)
    start_epoch = 0
    if args.init and not args.resume:
        lcam_train.warm_start(Path(args.init), head, args.model, layer, console)
    if args.resume:
        start_epoch = lcam_train.restore(out, head, optimizer, generator, args.model, layer, config, console)

    info = lcam_checkpoint.HeadInfo(
        model=args.model, layer=layer, variant=config.variant, num_classes=model.num_classes,
        in_channels=channels, command=command_line(args),
        seed=config.seed, data=f"{dataset.name} ({len(items)} images, subset {dataset.subset_hash})",
        loss_weights={k: float(v) for k, v in vars(config.loss).items()},
        notes=f"optimizer={config.optimizer} lr={config.lr} wd={config.weight_decay} "
              f"batch={config.batch_size} views={config.views} "
              f"init={args.init or config.head_init}")

    features = None
    if config.variant == "fm":
        with Progress(console) as progress:
            features, labels = lcam_train.cache_features(model, layer, squares, labels, config,
                                                         progress)
    started = time.perf_counter()
    with Progress(console) as progress:
        bar = progress.bar("epoch", total=config.epochs, completed=start_epoch)
        for epoch in range(start_epoch, config.epochs):
            stats = lcam_train.run_epoch(head, optimizer, config, model, tail, layer, squares, labels,
                              features, generator, progress)
            summary = lcam_train.mean_stats(stats)
            bar.advance(status=(
                f"loss {summary['loss']:.3f} (ce {summary['ce']:.3f} area {summary['area']:.3f} "
                f"tv {summary['tv']:.3f}) masked acc {summary['acc']:.3f}"))
            console.print(f"epoch {epoch + 1}/{config.epochs}: " + " ".join(
                f"{k} {v:.4f}" for k, v in summary.items()), highlight=False)
            info.epochs_done = epoch + 1
            if (epoch + 1) % args.checkpoint_every == 0 or epoch + 1 == config.epochs:
                lcam_checkpoint.save_checkpoint(out, head, info, training={
                    "epoch": epoch + 1, "optimizer": optimizer.state_dict(),
                    "generator": generator.get_state(), "last": summary})
    if args.ship:
        lcam_checkpoint.save_checkpoint(args.ship, head, info, half=True)
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
    registry = build_registry()
    loaded = registry.model(name)(weights=weights).load()
    return ClassifierHandle(loaded, name=name)
