"""``xbench explain IMAGE``: one explainer's heatmap over one image, as a PNG."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from xbench.errors import UserError


DESCRIPTION = """Write one explainer's heatmap over one image as a PNG overlay, titled with
the class explained and its probability ([degenerate map] when the map is constant).

Plugin options (-o), --checkpoint and --engine mean what they mean in xbench run; the
explainer runs with its declared defaults (the paper profile) unless -o changes them."""


def add_parser(subparsers) -> None:
    from xbench.cli.options import (add_explanation_options, add_model_options,
                                    add_output_option, add_plugin_options, examples, group)

    p = subparsers.add_parser(
        "explain", help="write a heatmap overlay PNG for one image", description=DESCRIPTION,
        epilog=lambda: examples(
            "xbench explain photo.jpg                                  # Grad-CAM, top-1 class",
            "xbench explain photo.jpg --explainer rise -o rise.n_masks=500 --output rise.png",
            "xbench explain photo.jpg --explainer gradcam++ --target 281 --layer _blocks.15",
            "xbench explain photo.jpg --explainer lcam-fm --checkpoint heads/lcam_fm.pt",
            note=_installed_explainers()))
    p.add_argument("image", help="the image file to explain")
    group(p, "explanation").add_argument(
        "--explainer", default="gradcam", help="a registered explainer name (listed below)")
    add_explanation_options(p, many_layers=False,
                            seed_help="seed of the explainer's random masks or baselines")
    add_model_options(p, default_engine="eager")
    add_plugin_options(p)
    add_output_option(p, "the PNG to write", default="explanation.png", metavar="FILE")
    p.set_defaults(func=run)


def _installed_explainers() -> str:
    import textwrap

    from xbench.plugins import build_registry

    names = build_registry().names("explainer")
    return "installed explainers:\n" + textwrap.fill(
        ", ".join(names), width=92, initial_indent="  ", subsequent_indent="  ",
        break_on_hyphens=False) + ("\n\n--engine defaults to eager here: one image does not "
                                    "repay an ONNX export (xbench run's auto picks one on CPU)")


def run(args: argparse.Namespace) -> int:
    import contextlib

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from xbench.cli import blocked_plugins
    from xbench.cli.options import plugin_option_values
    from xbench.data import load_image
    from xbench.engine import auto_engine
    from xbench.environment import resolve_device
    from xbench.model import ClassifierHandle, masked_batch_size
    from xbench.plan import apply_model_flags
    from xbench.plugins import build_registry
    from xbench.saliency import normalize_maps

    if args.target == "label":
        raise UserError("--target label: xbench explain has no label for one image; give a "
                        "class index (--target N) or leave the top-1 prediction")
    if args.layers == "all" or "," in args.layers:
        raise UserError(f"--layer {args.layers}: xbench explain draws one layer; give 'last' or "
                        "one NAME (xbench run --layer all sweeps them)")
    registry = build_registry(blocked=blocked_plugins(args))
    path = Path(args.image)
    if not path.is_file():
        raise UserError(f"{path}: no such image file")
    output = Path(args.output)
    _check_writable(output)
    explainer_cls = registry.explainer(args.explainer)
    model_cls = registry.model(args.model)
    classes = {args.explainer: explainer_cls, args.model: model_cls}
    options = plugin_option_values(args.options, classes)
    apply_model_flags(options, classes, args.model, checkpoint=args.checkpoint,
                      member=args.member, weights=args.weights)
    layer = None if args.layers == "last" else args.layers
    device = resolve_device(args.device)
    loaded = _make("model", model_cls, options.get(args.model, {})).load()
    handle = ClassifierHandle(loaded, device, name=args.model)
    if explainer_cls.uses_layer:
        handle.layer(layer)  # unknown, or no spatial map: refused before explaining
    autocast = (torch.autocast(device.type, dtype=getattr(torch, _DTYPES[args.dtype]))
                if args.dtype != "fp32" else contextlib.nullcontext())
    engine = args.engine
    if engine == "auto":
        engine, _ = auto_engine(device, args.dtype)
    if engine != "eager":
        handle.use_engine(engine, masked_batch_size(device), autocast)
    try:
        image = load_image(path, loaded.resize_size, loaded.input_size)[None].to(device)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"cannot read image {path}: {exc}") from exc
    probs = handle.probabilities(image)[0]
    target = int(probs.argmax()) if args.target == "predicted" else args.target
    if not 0 <= target < handle.num_classes:
        raise UserError(f"--target {target}: must be a class index in [0, {handle.num_classes})")
    explainer = _make("explainer", explainer_cls, {**options.get(args.explainer, {}),
                                                   "layer": layer, "seed": args.seed})
    grad = torch.enable_grad() if explainer.needs_gradients else torch.no_grad()
    with grad, autocast:
        maps = explainer.explain(handle, image, torch.tensor([target], device=device))
    saliency, degenerate = normalize_maps(maps.float(), image.shape[-2:])
    figure, axis = plt.subplots(figsize=(4, 4.4), dpi=100)
    axis.imshow(image[0].permute(1, 2, 0).cpu().numpy())
    axis.imshow(saliency[0].cpu().numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
    name = loaded.class_names[target]
    axis.set_title(f"{args.explainer}: {name} (p={probs[target]:.2f})"
                   + (" [degenerate map]" if bool(degenerate[0]) else ""), fontsize=9)
    axis.axis("off")
    figure.tight_layout()
    try:
        figure.savefig(output)
    except OSError as exc:
        raise UserError(f"--output {output}: cannot write the PNG: {exc.strerror or exc}") from exc
    finally:
        plt.close(figure)
    print(output)
    return 0


#: --dtype -> torch dtype attribute (xbench.runner.DTYPES, without importing the runner)
_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


def _make(kind: str, cls: type, options: dict):
    try:
        return cls(**options)
    except TypeError as exc:
        raise UserError(f"{kind} {cls.name!r}: bad options {options}: {exc}") from exc
    except ValueError as exc:
        raise UserError(f"{kind} {cls.name!r}: {exc}") from exc


def _check_writable(output: Path) -> None:
    """Refuse an output the PNG cannot be written to, before loading the model."""
    folder = output.parent
    if not folder.is_dir():
        raise UserError(f"--output {output}: folder {folder} does not exist; create it or choose "
                        f"another output path.")
    if output.is_dir():
        raise UserError(f"--output {output}: is a folder; give a file name such as {output / 'x.png'}")
    import os

    if not os.access(folder, os.W_OK):
        raise UserError(f"--output {output}: folder {folder} is not writable; choose another path.")
