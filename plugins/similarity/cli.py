"""``xbench similarity``: neuron similarity values from class average images (Wang 2022).

See :mod:`xbench_plugins.similarity` for the definitions. Writes into ``--output``:
``similarity.csv`` (tidy: class, layer, neuron, method, similarity, activated, activation),
``layer_curves.csv`` / ``layer_curves.png``, ``top_bottom.csv`` and ``neurons/*.png``,
``averages.png`` (all kinds of class average images), ``pruning.csv`` (thesis Table 5-1) and
``run.json`` (every setting that produced the numbers).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from rich.console import Console
from rich.table import Table

from xbench import (PROTOCOL_VERSION, ClassifierHandle, Progress, UserError, __version__,
                    build_registry, load_labelled_images, message_console, open_dataset,
                    table_console)
from xbench.cli.options import (add_data_options, add_layer_option, add_model_options,
                                add_output_option, add_plugin_options, add_seed_option, adjust,
                                blocked_plugins, examples, group)
from xbench_plugins import similarity as sim


DESCRIPTION = """Per-neuron similarity values (Wang Xinyuan 2022, docs/protocol.md "Neuron similarity
value"): the guided-backprop visualisation of every channel of the chosen layers, computed from
each class average image I_i, compared by cosine with I_i (method 1) or with the guided backprop
of the class logit (method 2); per-layer curves; and the pruning check (zero the top vs bottom
--ratio neurons of a layer by similarity, no fine-tuning, compare test accuracy). The default
runs on CPU in a few minutes: scikit-learn digits with a small VGG-like CNN (shipped weights).
"""


def add_arguments(parser) -> None:
    """The flags of ``xbench similarity`` (registered by the similarity plugin): the shared
    model, data, layer, seed and output flags (:mod:`xbench.cli.options`, meaning what they mean
    in ``xbench run``) plus the analysis's."""
    parser.description = DESCRIPTION
    parser.epilog = examples(
        "xbench similarity --output runs/similarity      # digits-vgg on scikit-learn digits",
        "xbench similarity --layers features.relu1,features.relu5 --classes 0,3 --output sim",
        "xbench similarity --model efficientnet-lite0 --data /path/to/ILSVRC2012/val \\",
        "                  --labels LOC_val_solution.csv --classes 1,2 --no-prune --output sim-in",
        note="docs/similarity.md: the definitions, the outputs and the results.")
    add_model_options(parser, checkpoint=False, member=False, dtype=False, engine=False,
                      default_model="digits-vgg")
    adjust(parser, "--model", help="a registered model name (xbench plugins --kind model; "
                                   "digits-vgg has shipped weights)")
    adjust(parser, "--device", default="cpu")
    add_layer_option(parser, title="model", default="all",
                     help="the layers analysed: all (the ReLU after every convolution, else the "
                          "convolution), last (the model's CAM layer), NAME or NAME,NAME")
    add_data_options(parser, boxes=False, default_data="digits")
    adjust(parser, "--data", metavar="digits|FOLDER",
           help="'digits' (scikit-learn) or a folder of labelled images (class folders, "
                "labels.csv, ILSVRC val...; docs/data.md): class averages are computed from it")
    adjust(parser, "--limit", default=500,
           help="at most this many test images for the pruning accuracy on folder data "
                "(seeded subset, --seed)")
    data = group(parser, "data")
    data.add_argument("--test-data", metavar="FOLDER",
                      help="labelled images for the pruning accuracy (default: the digits test "
                           "split, or --data for folders)")
    data.add_argument("--classes", metavar="N,N",
                      help="comma-separated class indices (default: every class that has images "
                           "in --data)")
    add_plugin_options(parser, takes_options=False)
    analysis = group(parser, "analysis")
    analysis.add_argument("--method", choices=["1", "2", "both"], default="both",
                          help="1: cos(GBP, I_i); 2: cos(GBP, GBP of the class logit)")
    analysis.add_argument("--average", choices=["simple", "confident", "unconfident", "network"],
                          default="simple", help="which class average image I_i is analysed "
                                                 "(all kinds are drawn in averages.png)")
    analysis.add_argument("--top-k", type=int, default=10, metavar="K",
                          help="K of the data-driven averages (mean of the K most / least "
                               "confident images of the class)")
    analysis.add_argument("--ascent-steps", type=int, default=100, metavar="N",
                          help="gradient-ascent steps of the network-driven average (0: skip)")
    analysis.add_argument("--channel-batch", type=int, default=64, metavar="N",
                          help="channels back-propagated per backward pass (memory vs speed)")
    pruning = group(parser, "pruning check")
    pruning.add_argument("--ratio", type=float, default=0.4,
                         help="share of a layer's neurons zeroed in the pruning check")
    pruning.add_argument("--no-prune", action="store_true", help="skip the pruning check")
    pruning.add_argument("--random-draws", type=int, default=5, metavar="N",
                         help="random prunings of the same size averaged as a reference")
    add_seed_option(parser, "seed of the --limit subset and of the random prunings",
                    title="pruning check")
    output = add_output_option(parser, "folder to write the analysis in", metavar="FOLDER",
                               old=["--out"], required=True)
    output.add_argument("--show", type=int, default=4, metavar="N",
                        help="top and bottom neurons drawn per layer in neurons/*.png")


def run(args: argparse.Namespace) -> int:
    console = message_console()
    started = time.perf_counter()
    _check_numbers(args)
    registry = build_registry(blocked=blocked_plugins(args))
    for message in registry.load_errors:
        console.print(f"[yellow]warning:[/] {message}", highlight=False)
    if args.model == "digits-vgg" and not args.weights and not sim.default_digits_weights().exists():
        console.print(f"training digits-vgg on first use (cached in {sim.digits_checkpoint_path()})")
    loaded = registry.model(args.model)(weights=args.weights).load()
    model = ClassifierHandle(loaded, device=_device(args.device), name=args.model)
    source, test, data_info = _datasets(args, loaded, model)
    classes = _classes(args.classes, source, model.num_classes)
    layers = sim.probe_layers(model, _layer_names(args.layers, model))
    methods = (1, 2) if args.method == "both" else (int(args.method),)
    layer_names = [info.name for info in layers]
    console.print(f"model {args.model}, {len(classes)} classes, layers "
                  f"{', '.join(f'{i.name} ({i.channels})' for i in layers)}; "
                  f"{len(classes) * sum(i.channels for i in layers)} neuron visualisations")

    averages = _averages(model, source, classes, args)
    out = Path(args.output)
    (out / "neurons").mkdir(parents=True, exist_ok=True)
    sim.plot_averages(averages, loaded.class_names, out / "averages.png")
    with Progress(console, transient=True) as progress:
        bar = progress.bar("guided backprop per neuron", log=False)
        table, visuals = sim.neuron_similarities(
            model, averages[args.average], layer_names, methods,
            channel_batch=args.channel_batch, show=args.show,
            progress=lambda done, total: bar.update(completed=done, total=total))
    curves = sim.layer_curves(table)
    table.to_csv(out / "similarity.csv", index=False)
    curves.to_csv(out / "layer_curves.csv", index=False)
    sim.plot_curves(curves, out / "layer_curves.png")
    _write_extremes(visuals, out / "top_bottom.csv")
    for (cls, method) in {(c, m) for (c, _, m) in visuals}:
        sim.plot_neurons(visuals, averages[args.average][cls], cls, method, layer_names,
                         out / "neurons" / f"method{method}_class{cls}.png",
                         f"{args.model}: class {loaded.class_names[cls]}, method {method}, "
                         f"{args.average} average; GBP of top / bottom neurons (index, similarity)")
    pruning = None
    if not args.no_prune:
        console.print(f"pruning check on {len(test.labels)} test images")
        pruning = sim.pruning_table(model, table, layers, test, ratio=args.ratio,
                                    random_draws=args.random_draws, seed=args.seed)
        pruning.to_csv(out / "pruning.csv", index=False)
    _write_run(out / "run.json", args, loaded, data_info, classes, layers, methods, started)
    _print_results(table_console(), curves, pruning)
    console.print(f"results in {out}")
    return 0


def _check_numbers(args: argparse.Namespace) -> None:
    if not 0 < args.ratio < 1:
        raise UserError(f"--ratio must be in (0, 1), got {args.ratio}")
    for option in ("top_k", "channel_batch", "limit"):
        if getattr(args, option) < 1:
            raise UserError(f"--{option.replace('_', '-')} must be >= 1, got {getattr(args, option)}")
    if args.show < 0 or args.ascent_steps < 0 or args.random_draws < 0:
        raise UserError("--show, --ascent-steps and --random-draws must be >= 0")
    if args.average == "network" and args.ascent_steps == 0:
        raise UserError("--average network needs --ascent-steps > 0")


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _datasets(args, loaded, model):
    """(images for the class averages, test images for pruning, description for run.json)."""
    if args.data == "digits":
        if loaded.input_size != sim.DIGITS_SIZE or model.num_classes != 10:
            raise UserError(f"--data digits needs a 10-class {sim.DIGITS_SIZE}-px model such as "
                            f"digits-vgg; {args.model} takes {loaded.input_size} px and "
                            f"{model.num_classes} classes: pass --data FOLDER")
        if args.test_data:
            raise UserError("--test-data is for folder data; --data digits tests on its own split")
        train, test = sim.digits_data()
        return train, test, {"data": "sklearn digits (train split: averages; test split: "
                                     "pruning)", "train": len(train.labels), "test": len(test.labels)}
    dataset = open_dataset(args.data, args.labels)
    wanted = None
    if args.classes:  # decode only the images the class averages need
        try:
            wanted = {int(part) for part in _split(args.classes)}
        except ValueError:
            raise UserError(f"--classes {args.classes}: expected comma-separated class "
                            "indices") from None
    source = _load([i for i in dataset.items if wanted is None or i.label in wanted], loaded,
                   f"--data {args.data}")
    test_set = open_dataset(args.test_data) if args.test_data else dataset
    test_set = test_set.subset(args.limit, args.seed)
    test = _load(test_set.items, loaded,
                 f"--test-data {args.test_data}" if args.test_data else f"--data {args.data}")
    return source, test, {"data": dataset.root, "layout": dataset.layout,
                          "subset_hash": dataset.subset_hash, "test_data": test_set.root,
                          "test_subset_hash": test_set.subset_hash, "test": len(test.labels)}


def _load(items, loaded, source: str):
    """Labelled images as uint8 (N, 3, S, S) (4x less memory than float; exact for 8-bit files);
    unreadable files are skipped with a note."""
    read = load_labelled_images(items, loaded.resize_size, loaded.input_size, source=source,
                                skip_unreadable=True)
    for path, reason in read.unreadable:
        message_console().print(f"[yellow]skipped[/] {path}: {reason}", highlight=False)
    return sim.ImageSplit(read.images, read.labels)


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _layer_names(text: str, model: ClassifierHandle) -> list[str] | None:
    """--layer: 'all' -> None (the analysis's default layers), 'last' -> the model's CAM layer."""
    if text == "all":
        return None
    if text == "last":
        return [model.default_layer]
    return _split(text)


def _classes(text: str | None, source, num_classes: int) -> list[int]:
    present = sorted(set(source.labels.tolist()))
    if text is None:
        return present
    try:
        classes = [int(part) for part in _split(text)]
    except ValueError:
        raise UserError(f"--classes {text}: expected comma-separated class indices") from None
    for cls in classes:
        if not 0 <= cls < num_classes:
            raise UserError(f"--classes: {cls} is not a class index of the model (0..{num_classes - 1})")
        if cls not in present:
            raise UserError(f"--classes: class {cls} has no images in --data")
    return list(dict.fromkeys(classes))


def _averages(model, source, classes, args) -> dict[str, dict[int, torch.Tensor]]:
    """{kind: {class: (3, H, W)}} for the kinds of class average image."""
    out: dict[str, dict[int, torch.Tensor]] = {kind: {} for kind in sim.AVERAGE_KINDS}
    for cls in classes:
        images = source.images[source.labels == cls]
        images = images.float().div(255) if images.dtype == torch.uint8 else images
        out["simple"][cls] = sim.simple_average(images)
        confidence = model.probabilities(images.to(model.device))[:, cls].cpu()
        out["confident"][cls], out["unconfident"][cls] = sim.confidence_averages(
            images, confidence, args.top_k)
        if args.ascent_steps:
            out["network"][cls] = sim.network_driven_average(
                model, out["simple"][cls].to(model.device), cls, steps=args.ascent_steps).cpu()
    return out


def _write_extremes(visuals, path: Path) -> None:
    rows = []
    for (cls, layer, method), v in visuals.items():
        for kind, neurons, values in (("top", v.top, v.top_values), ("bottom", v.bottom, v.bottom_values)):
            rows += [{"class": cls, "layer": layer, "method": method, "kind": kind, "rank": r + 1,
                      "neuron": n, "similarity": s} for r, (n, s) in enumerate(zip(neurons, values))]
    pd.DataFrame(rows).to_csv(path, index=False)


def _write_run(path, args, loaded, data_info, classes, layers, methods, started) -> None:
    info = {
        "analysis": "neuron similarity value (Wang 2022)", "protocol": PROTOCOL_VERSION,
        "model": args.model, "weights": loaded.weights, "model_extra": loaded.extra,
        **data_info, "classes": classes,
        "layers": {i.name: i.channels for i in layers}, "methods": list(methods),
        "average": args.average, "top_k": args.top_k, "ascent_steps": args.ascent_steps,
        "ratio": None if args.no_prune else args.ratio, "random_draws": args.random_draws,
        "channel_batch": args.channel_batch,
        "similarity": "cosine over all pixels and channels of the raw guided-backprop gradient",
        "device": args.device, "seed": args.seed, "threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - started, 1),
        "versions": {"xbench": __version__, "torch": torch.__version__,
                     "python": platform.python_version()},
        "command": " ".join(["xbench"] + sys.argv[1:]),
    }
    path.write_text(json.dumps(info, indent=2, default=str) + "\n")


def _print_results(console: Console, curves: pd.DataFrame, pruning: pd.DataFrame | None) -> None:
    table = Table(title="similarity value per layer (average over classes: mean +- std)")
    for column in ("method", "layer", "mean", "std", "never visualised"):
        table.add_column(column)
    for row in curves[curves["class"] == "all"].itertuples():
        table.add_row(str(row.method), str(row.layer), f"{row.mean:.4f}", f"{row.std:.4f}",
                      f"{row.n_nan}/{row.neurons}")
    console.print(table)
    if pruning is None:
        return
    table = Table(title="pruning check (Table 5-1): accuracy % after zeroing neurons")
    for column in ("method", "layer", "neurons", "ratio", "pruned", "baseline", "prune top",
                   "prune bottom", "difference", "prune random"):
        table.add_column(column)
    for row in pruning.itertuples():
        table.add_row(str(row.method), row.layer, str(row.neurons), f"{row.ratio:g}",
                      str(row.pruned), f"{row.acc_baseline:.2f}", f"{row.acc_prune_top:.2f}",
                      f"{row.acc_prune_bottom:.2f}", f"{row.difference:+.2f}",
                      f"{row.acc_prune_random:.2f}")
    console.print(table)
    for method, rows in pruning.groupby("method"):
        console.print(f"method {method}: pruning the top-similarity neurons costs more accuracy "
                      f"than pruning the bottom ones in {(rows['difference'] > 0).sum()} of "
                      f"{len(rows)} layers (equal in {(rows['difference'] == 0).sum()}); mean "
                      f"difference {rows['difference'].mean():+.2f} points")
