"""``xbench analyze RUN``: rank stability of a run. The explainers' ranks per metric column with
bootstrap rank intervals (images resampled, seeded), Kendall's tau between the rankings of every
pair of columns, and the explainer pairs whose order flips between protocol variants of one
metric (docs/protocol.md "Rank stability"); ``--output`` writes a heatmap PNG of the taus."""

from __future__ import annotations

import argparse
from pathlib import Path

from xbench.cli.console import message_console


def add_parser(subparsers) -> None:
    from xbench.cli.options import (add_output_option, add_plugin_options, examples, group,
                                    non_negative_int, positive_int)

    p = subparsers.add_parser(
        "analyze", help="rank stability: bootstrap rank intervals, Kendall's tau between "
                        "columns and protocol variants",
        description="Rank stability of a run: the explainers' ranks per metric column with "
                    "bootstrap rank intervals (images resampled, seeded), Kendall's tau between "
                    "the rankings of every pair of columns, and the explainer pairs whose order "
                    "flips between protocol variants of one metric (docs/protocol.md, \"Rank "
                    "stability\").",
        epilog=examples("xbench analyze results/val50_quick",
                        "xbench analyze RUN --include-cost --output tau.png",
                        "xbench analyze RUN --controls"))
    p.add_argument("run", help="run folder (the one holding run.json)")
    bootstrap = group(p, "bootstrap")
    bootstrap.add_argument("--seed", type=non_negative_int,
                           help="bootstrap seed (default: the run's seed)")
    bootstrap.add_argument("--resamples", type=positive_int, default=2000,
                           help="bootstrap resamples")
    bootstrap.add_argument("--include-cost", action="store_true",
                           help="rank the cost columns (passes, time) too")
    p.add_argument("--controls", action="store_true",
                   help="instead of the ranks: a markdown table of which explainer beats the "
                        "random and centre-gaussian controls on which column (the leaderboard's "
                        "sanity gate, docs/protocol.md \"Sanity gates\")")
    add_plugin_options(p, takes_options=False)
    add_output_option(p, "PNG heatmap of the tau matrix to write (default: none)",
                      metavar="FILE")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from xbench.analyze import analyze, draw_tau_heatmap, format_text
    from xbench.cli.plot import open_run
    from xbench.errors import UserError
    from xbench.leaderboard import run_frame

    if args.resamples < 1:
        raise UserError(f"--resamples must be >= 1, got {args.resamples}")
    folder = open_run(args.run)
    header = folder.header()
    seed = header.config.get("seed", 0) if args.seed is None else args.seed
    if args.controls:
        from xbench.analyze import controls_text

        print(controls_text(folder, seed), end="")
        return 0
    result = analyze(run_frame(folder), seed=seed, resamples=args.resamples,
                     include_cost=args.include_cost)
    if not result.columns:
        raise UserError(f"{args.run}: no column with at least two explainers to rank")
    print(format_text(result), end="")
    if args.output:
        path = draw_tau_heatmap(result.tau, Path(args.output),
                                f"{header.run_name}: Kendall's tau between metric rankings")
        message_console().print(f"wrote {path}", highlight=False)
    return 0
