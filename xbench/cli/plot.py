"""``xbench plot KIND RUN_DIR``: figures from the records of a run (PNG, no display needed).

Kinds: ``curves`` draws the mean insertion and deletion curves per explainer; ``layers`` the
overall score per target layer of a layer sweep (:mod:`xbench.layer_plots`). Each kind is a
function ``add_KIND(plots)`` registering its own sub-parser, listed in ``PLOTS``, so that more
kinds slot in beside it; each takes the run folder, ``--output`` and ``-p`` (shared builders,
:mod:`xbench.cli.options`).
"""

from __future__ import annotations

import argparse
from pathlib import Path


from xbench.cli.console import message_console
from xbench.cli.options import add_block_option, add_output_option, add_plugin_options, examples
from xbench.errors import UserError
from xbench.curves import draw_curves, mean_curves
from xbench.records import RunFolder


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "plot", help="draw figures from a run's records (PNG)",
        description="Draw figures from the records of a run, as PNG files (no display needed).",
        epilog=examples("xbench plot curves results/reference_efficientnet-lite0_sample_quick",
                        "xbench plot layers RUN --output layers.png",
                        note="xbench plot KIND --help lists a kind's flags."))
    add_block_option(parser)
    plots = parser.add_subparsers(dest="plot", required=True, metavar="KIND")
    for add in PLOTS.values():
        add(plots)


def add_curves(plots) -> None:
    p = plots.add_parser(
        "curves", help="mean insertion and deletion curves per explainer",
        description="Mean insertion and deletion curves per explainer, one panel each.",
        epilog=examples("xbench plot curves RUN",
                        "xbench plot curves RUN --variant step=224 --output curves.png"))
    p.add_argument("run", help="run folder (the one holding run.json)")
    p.add_argument("--variant", help="metric variant when the run has several (e.g. step=224; "
                                     "default: the only one)")
    add_plugin_options(p, takes_options=False)
    add_output_option(p, "PNG to write (default: RUN/curves.png)", metavar="FILE")
    p.set_defaults(func=run_curves)


def add_layers(plots) -> None:
    p = plots.add_parser(
        "layers", help="overall score (insertion - deletion AUC) per layer for each explainer",
        description="The overall score (insertion - deletion AUC) per target layer of a layer "
                    "sweep, one line per explainer.",
        epilog=examples("xbench run --layer all --explainers gradcam,layercam --name sweep",
                        "xbench plot layers results/sweep --output layers.png"))
    p.add_argument("run", help="run folder of a layer sweep (xbench run --layer all)")
    p.add_argument("--variant", help="insertion-deletion variant when the run has several "
                                     "(default: the only one)")
    add_plugin_options(p, takes_options=False)
    add_output_option(p, "PNG to write (default: RUN/layers.png)", metavar="FILE")
    p.set_defaults(func=run_layers)


def add_pareto(plots) -> None:
    p = plots.add_parser(
        "pareto", help="passes per image against a column's score, with the Pareto front",
        description="Forward and backward passes per image against one column's score (with "
                    "its interval), and the Pareto front of the explainers.",
        epilog=examples("xbench plot pareto RUN --metric insertion@step=3136",
                        "xbench plot pareto RUN --metric deletion --output pareto.png"))
    p.add_argument("run", help="run folder with forward-passes and backward-passes rows")
    p.add_argument("--metric", required=True, help="column, e.g. insertion@step=3136 (or a "
                   "metric name with one variant)")
    add_plugin_options(p, takes_options=False)
    add_output_option(p, "PNG to write (default: RUN/pareto.png)", metavar="FILE")
    p.set_defaults(func=run_pareto)


PLOTS = {"curves": add_curves, "layers": add_layers, "pareto": add_pareto}


def open_run(path: str | Path) -> RunFolder:
    folder = RunFolder(Path(path))
    if not folder.exists():
        raise UserError(f"{path}: not a run folder (no run.json); pass a folder written by "
                        "xbench run, e.g. results/efficientnet-lite0_sample_quick")
    return folder


def run_curves(args: argparse.Namespace) -> int:
    folder = open_run(args.run)
    header = folder.header()
    curves = mean_curves(folder.rows(), args.variant)
    images = max(c.images for c in curves)
    title = (f"{header.run_name}: {curves[0].variant}, {images} images, "
             f"protocol v{header.protocol}")
    output = Path(args.output) if args.output else folder.path / "curves.png"
    draw_curves(curves, title, output)
    message_console().print(f"wrote {output}", highlight=False)
    return 0


def run_layers(args: argparse.Namespace) -> int:
    from xbench.layer_plots import plot_layers

    folder = open_run(args.run)
    output = Path(args.output) if args.output else folder.path / "layers.png"
    plot_layers(folder.rows(), output, title=folder.header().run_name, variant=args.variant,
                seed=folder.header().config.get("seed", 0))
    message_console().print(f"wrote {output}", highlight=False)
    return 0


def run_pareto(args: argparse.Namespace) -> int:
    from xbench.leaderboard import run_frame
    from xbench.pareto import draw_pareto, pareto_points, resolve_column

    folder = open_run(args.run)
    header = folder.header()
    frame = run_frame(folder)
    column = resolve_column(frame, args.metric)
    points = pareto_points(frame, column, seed=header.config.get("seed", 0))
    direction = frame[frame.column == column].direction.iloc[0]
    output = Path(args.output) if args.output else folder.path / "pareto.png"
    draw_pareto(points, column, direction, output, f"{header.run_name}: cost against {column}")
    message_console().print(f"wrote {output}", highlight=False)
    return 0
