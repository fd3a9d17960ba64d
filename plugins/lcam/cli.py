"""``xbench train lcam``: train an L-CAM-Fm or L-CAM-Img attention head on a frozen classifier.

L-CAM-Fm trains on *cached* features: the frozen backbone runs once per training view before
the first epoch and the head and the classifier tail then train on the stored feature maps
(exact, since the backbone is frozen and in eval mode; it just skips recomputing identical
features every epoch). ``--views V`` stores V views per image: the center crop plus V-1 random
224 crops with random horizontal flips of the 256x256 center square (the usual ImageNet
training augmentation, seeded). L-CAM-Img needs the whole network forward and backward on every
masked image, so it draws a fresh random view per image per epoch instead.

Checkpoints are written every ``--checkpoint-every`` epochs and at the end; ``--resume``
continues from ``--output`` (the optimizer state, epoch counter and random generator are restored).
"""

from __future__ import annotations

import argparse
import shlex
import time
from pathlib import Path

import torch

from xbench import ClassifierHandle, Progress, UserError, build_registry, message_console, open_dataset
from xbench.cli.options import (add_data_options, add_layer_option, add_model_options,
                                add_output_option, add_plugin_options, add_seed_option, adjust,
                                examples, group, positive_int)
from xbench_plugins.lcam import checkpoint as lcam_checkpoint
from xbench_plugins.lcam import train as lcam_train
from xbench_plugins.lcam.head import AttentionHead, classifier_tail, layer_features
from xbench_plugins.lcam.loss import LossWeights


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``xbench train lcam``: the shared model, data, layer, seed and output flags
    (:mod:`xbench.cli.options`, meaning what they mean in ``xbench run``) plus the training's."""
    parser.description = (
        "Train an L-CAM-Fm (masked feature maps) or L-CAM-Img (masked image) attention head on "
        "a frozen classifier, from the images' labels. Checkpoints are written every "
        "--checkpoint-every epochs and at the end; --resume continues from --output.")
    parser.epilog = examples(
        "xbench train lcam --variant fm --data /path/to/ILSVRC2012/train_subset --limit 2000 \\",
        "                  --epochs 20 --output heads/fm.pt",
        "xbench train lcam --variant fm --data /path/to/ILSVRC2012/train_subset --limit 2000 \\",
        "                  --epochs 30 --output heads/fm.pt --resume   # ten more epochs",
        "xbench explain photo.jpg --explainer lcam-fm --checkpoint heads/fm.pt --output fm.png",
        note="docs/lcam.md: the method, the shipped heads and how they were trained.")
    add_model_options(parser, checkpoint=False, member=False, device=False, dtype=False,
                      engine=False)
    add_layer_option(parser, many_layers=False, title="model",
                     help="the feature layer the head attends to: last (the model's CAM layer) "
                          "or one NAME")
    add_data_options(parser, boxes=False, default_data=None)
    adjust(parser, "--data", metavar="FOLDER", help="labelled training images (any layout xbench run accepts; "
                                  "docs/data.md)")
    add_plugin_options(parser, takes_options=False)
    training = group(parser, "training")
    training.add_argument("--variant", required=True, choices=("fm", "img"),
                          help="fm: mask the feature maps (L-CAM-Fm); img: mask the image "
                               "(L-CAM-Img)")
    training.add_argument("--epochs", type=positive_int, required=True, metavar="E",
                          help="total number of epochs")
    add_seed_option(parser, "seed for initialisation, order, views and the --limit subset",
                    title="training")
    training.add_argument("--lr", type=float, default=1e-4, help="learning rate")
    training.add_argument("--head-init", choices=("zero", "pytorch"), default="zero",
                          help="initial head weights: zero (masks start at 0.5) or PyTorch's "
                               "default uniform init")
    training.add_argument("--optimizer", choices=("adam", "sgd"), default="adam",
                          help="adam, or the authors' SGD with Nesterov momentum 0.9")
    training.add_argument("--weight-decay", type=float, metavar="WD", default=0.0, help="weight decay")
    training.add_argument("--batch-size", type=positive_int, default=64, metavar="N",
                          help="images per step")
    training.add_argument("--views", type=positive_int, default=1, metavar="V",
                          help="fm only: cached views per image (1 = center crop only)")
    training.add_argument("--init", default=None, metavar="CKPT",
                          help="start from the head weights of another checkpoint for the same "
                               "model and layer (e.g. an L-CAM-Img head from a trained L-CAM-Fm "
                               "head)")
    training.add_argument("--threads", type=positive_int, default=None, metavar="N",
                          help="torch CPU threads")
    loss = group(parser, "loss")
    loss.add_argument("--lambda-ce", type=float, metavar="W", default=1.5, help="cross-entropy weight")
    loss.add_argument("--lambda-area", type=float, metavar="W", default=2.0, help="average-mask weight")
    loss.add_argument("--lambda-tv", type=float, metavar="W", default=0.01, help="total-variation weight")
    loss.add_argument("--area-power", type=float, metavar="P", default=0.3,
                      help="exponent of the mask in the area term")
    output = add_output_option(parser, "checkpoint file to write (and --resume from)",
                               metavar="CKPT", old=["--out"], required=True)
    output.add_argument("--checkpoint-every", type=positive_int, default=1, metavar="EPOCHS",
                        help="write --output every EPOCHS epochs (and at the end)")
    output.add_argument("--resume", action="store_true", help="continue training from --output")
    output.add_argument("--ship", default=None, metavar="FILE",
                        help="also write a compact copy (fp16 head, no training state) at the "
                             "end, e.g. plugins/assets/lcam-fm_efficientnet-lite0.pt")


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
    layer = model.default_layer if args.layers == "last" else args.layers
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
    out = Path(args.output)
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


#: (args attribute, flag) of every setting the checkpoint's command records
_RECORDED = (("model", "--model"), ("weights", "--weights"), ("variant", "--variant"),
             ("data", "--data"), ("labels", "--labels"), ("layers", "--layer"),
             ("epochs", "--epochs"), ("output", "--output"), ("seed", "--seed"), ("lr", "--lr"),
             ("optimizer", "--optimizer"), ("head_init", "--head-init"),
             ("weight_decay", "--weight-decay"), ("batch_size", "--batch-size"),
             ("views", "--views"), ("limit", "--limit"), ("checkpoint_every", "--checkpoint-every"),
             ("resume", "--resume"), ("init", "--init"), ("ship", "--ship"),
             ("lambda_ce", "--lambda-ce"), ("lambda_area", "--lambda-area"),
             ("lambda_tv", "--lambda-tv"), ("area_power", "--area-power"))


def command_line(args: argparse.Namespace) -> str:
    """The training command with every setting spelled out (defaults included)."""
    words = ["xbench", "train", "lcam"]
    for name, flag in _RECORDED:
        value = getattr(args, name, None)
        if value is None or value is False:
            continue
        words.append(flag)
        if value is not True:
            words.append(shlex.quote(str(value)))
    return " ".join(words)


def build_model(name: str, weights: str | None) -> ClassifierHandle:
    registry = build_registry()
    loaded = registry.model(name)(weights=weights).load()
    return ClassifierHandle(loaded, name=name)
