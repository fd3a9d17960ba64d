"""``xbench report RUN_DIR``: one self-contained HTML page of a run (opens from disk)."""

from __future__ import annotations

import argparse
from pathlib import Path

from xbench.cli.console import message_console
from xbench.cli.options import (add_output_option, add_plugin_options, examples, group,
                                non_negative_int, positive_int)


DESCRIPTION = """Write one self-contained HTML page of a run: header and protocol variant, the
matrix with intervals, a gallery of overlays with per-image scores, curves, layer plots, costs,
failures and degenerate maps. It opens from disk (no network)."""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "report", help="write a self-contained HTML report of a run", description=DESCRIPTION,
        epilog=examples("xbench report results/reference_efficientnet-lite0_sample_quick",
                        "xbench report RUN --output report.html --max-images 48",
                        note="xbench run --report writes the same page at the end of a run."))
    p.add_argument("run", help="run folder (the one holding run.json)")
    add_gallery_options(p)
    add_plugin_options(p, takes_options=False)
    add_output_option(p, "HTML file to write (default: RUN/report.html)", metavar="FILE")
    p.set_defaults(func=run)


def add_gallery_options(p: argparse.ArgumentParser) -> None:
    gallery = group(p, "gallery")
    gallery.add_argument("--max-images", type=non_negative_int, default=24, metavar="N",
                         help="at most this many images in the gallery")
    gallery.add_argument("--sample-seed", type=non_negative_int, default=0, metavar="SEED",
                         help="seed of the gallery's image sample when the run has more images")
    gallery.add_argument("--page-size", type=positive_int, default=6, metavar="N",
                         help="gallery images per page")


def run(args: argparse.Namespace) -> int:
    from xbench.cli import blocked_plugins
    from xbench.plugins import build_registry
    from xbench.report import write_report

    registry = build_registry(blocked=blocked_plugins(args))
    output = write_report(Path(args.run), Path(args.output) if args.output else None,
                          max_images=args.max_images, sample_seed=args.sample_seed,
                          page_size=args.page_size, registry=registry)
    message_console().print(f"wrote {output}", highlight=False)
    return 0
