"""``xbench report RUN_DIR``: one self-contained HTML page of a run (opens from disk)."""

from __future__ import annotations

import argparse
from pathlib import Path

from xbench.cli.console import message_console


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("report", help="write a self-contained HTML report of a run",
                              description=__doc__)
    p.add_argument("run", help="run folder (the one holding run.json)")
    p.add_argument("-o", "--output", help="HTML file to write (default: RUN/report.html)")
    add_gallery_options(p)
    p.set_defaults(func=run)


def add_gallery_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-images", type=int, default=24,
                   help="at most this many images in the gallery (default 24)")
    p.add_argument("--sample-seed", type=int, default=0,
                   help="seed of the gallery's image sample when the run has more images")
    p.add_argument("--page-size", type=int, default=6, help="gallery images per page")


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
