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
    device = resolve_device(args.device)
    loaded = registry.model(args.model)(weights=args.weights).load()
    handle = ClassifierHandle(loaded, device, name=args.model)
    try:
        image = load_image(path, loaded.resize_size, loaded.input_size)[None].to(device)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"cannot read image {path}: {exc}") from exc
    probs = handle.probabilities(image)[0]
    target = int(probs.argmax()) if args.target is None else args.target
    if not 0 <= target < handle.num_classes:
        raise UserError(f"--target {target}: must be a class index in [0, {handle.num_classes})")
    explainer = registry.explainer(args.explainer)(layer=args.layer, seed=args.seed)
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
    figure.savefig(args.output)
    plt.close(figure)
    print(args.output)
    return 0
