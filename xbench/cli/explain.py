"""``xbench explain IMAGE``: one explainer's heatmap over one image, as a PNG."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from xbench.errors import UserError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("explain", help="write a heatmap overlay PNG for one image",
                              description=__doc__)
    p.add_argument("image", help="image file")
    p.add_argument("--explainer", default="gradcam")
    p.add_argument("--model", default="efficientnet-lite0")
    p.add_argument("--weights")
    p.add_argument("--layer", help="target layer (default: the model's)")
    p.add_argument("--target", type=int, help="class index (default: top-1 prediction)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", default="explanation.png")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from xbench.cli import blocked_plugins
    from xbench.data import load_image
    from xbench.environment import resolve_device
    from xbench.model import ClassifierHandle
    from xbench.plugins import build_registry
    from xbench.saliency import normalize_maps

    registry = build_registry(blocked=blocked_plugins(args))
    path = Path(args.image)
    if not path.is_file():
        raise UserError(f"{path}: no such image file")
    _check_writable(Path(args.output))
    explainer_cls = registry.explainer(args.explainer)
    device = resolve_device(args.device)
    loaded = registry.model(args.model)(weights=args.weights).load()
    handle = ClassifierHandle(loaded, device, name=args.model)
    if explainer_cls.uses_layer:
        handle.layer(args.layer)  # unknown, or no spatial map: refused before explaining
    try:
        image = load_image(path, loaded.resize_size, loaded.input_size)[None].to(device)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"cannot read image {path}: {exc}") from exc
    probs = handle.probabilities(image)[0]
    target = int(probs.argmax()) if args.target is None else args.target
    if not 0 <= target < handle.num_classes:
        raise UserError(f"--target {target}: must be a class index in [0, {handle.num_classes})")
    explainer = explainer_cls(layer=args.layer, seed=args.seed)
    grad = torch.enable_grad() if explainer.needs_gradients else torch.no_grad()
    with grad:
        maps = explainer.explain(handle, image, torch.tensor([target], device=device))
    saliency, degenerate = normalize_maps(maps, image.shape[-2:])
    figure, axis = plt.subplots(figsize=(4, 4.4), dpi=100)
    axis.imshow(image[0].permute(1, 2, 0).cpu().numpy())
    axis.imshow(saliency[0].cpu().numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
    name = loaded.class_names[target]
    axis.set_title(f"{args.explainer}: {name} (p={probs[target]:.2f})"
                   + (" [degenerate map]" if bool(degenerate[0]) else ""), fontsize=9)
    axis.axis("off")
    figure.tight_layout()
    try:
        figure.savefig(args.output)
    except OSError as exc:
        raise UserError(f"-o {args.output}: cannot write the PNG: {exc.strerror or exc}") from exc
    finally:
        plt.close(figure)
    print(args.output)
    return 0


def _check_writable(output: Path) -> None:
    """Refuse an output the PNG cannot be written to, before loading the model."""
    folder = output.parent
    if not folder.is_dir():
        raise UserError(f"-o {output}: folder {folder} does not exist; create it or choose "
                        f"another output path.")
    if output.is_dir():
        raise UserError(f"-o {output}: is a folder; give a file name such as {output / 'x.png'}")
    import os

    if not os.access(folder, os.W_OK):
        raise UserError(f"-o {output}: folder {folder} is not writable; choose another path.")
