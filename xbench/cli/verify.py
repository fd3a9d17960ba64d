"""``xbench verify RUN --sample K --seed S``: recompute K randomly chosen units of a run from
its own header and compare them with its records (exit 1 naming each mismatching unit, row and
field; docs/ci.md). The whole run's records are checked too: schema, every unit finished,
provenance, no row missing."""

from __future__ import annotations

import argparse
from pathlib import Path

from xbench.cli.console import message_console


def add_parser(subparsers) -> None:
    from xbench.cli.options import add_plugin_options, examples, group, non_negative_int, \
        positive_int

    p = subparsers.add_parser(
        "verify", help="recompute a sample of a run's units and compare them with its records",
        description="Recompute K randomly chosen units of a run from its own header and compare "
                    "them with its records (exit 1 naming each mismatching unit, row and field; "
                    "docs/ci.md). The whole run's records are checked too: schema, every unit "
                    "finished, provenance, no row missing.",
        epilog=examples("xbench verify results/reference_efficientnet-lite0_sample_quick",
                        "xbench verify RUN --sample 8 --seed 1 --data /path/to/ILSVRC2012/val"))
    p.add_argument("run", help="run folder (the one holding run.json)")
    sample = group(p, "sample")
    sample.add_argument("--sample", type=positive_int, default=4, metavar="K",
                        help="units to recompute")
    sample.add_argument("--seed", type=non_negative_int, default=0,
                        help="seed of the choice of units")
    data = group(p, "data")
    data.add_argument("--data", metavar="FOLDER", help="the run's data folder, when run.json "
                      "records it relative to another working directory (default: as recorded)")
    data.add_argument("--labels", metavar="FILE", help="the run's labels file (same reason)")
    data.add_argument("--boxes", metavar="FILE|FOLDER",
                      help="the run's boxes file (same reason)")
    group(p, "model").add_argument("--device",
                                   help="device to recompute on (default: the recorded setting)")
    add_plugin_options(p, takes_options=False)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.markup import escape

    from xbench.cli import blocked_plugins
    from xbench.plugins import build_registry
    from xbench.verify import TOLERANCES, verify

    console = message_console()
    registry = build_registry(blocked=blocked_plugins(args))
    report = verify(Path(args.run), registry, args.sample, args.seed, data=args.data,
                    labels=args.labels, boxes=args.boxes, device=args.device)
    for finding in report.findings:
        console.print(f"[red]mismatch[/]: {escape(str(finding))}", highlight=False)
    checked = f"{len(report.sampled)} of {report.units_total} units recomputed " \
              f"({', '.join(report.sampled)})"
    if report.findings:
        units = sorted({f.unit for f in report.findings if f.unit})
        console.print(f"verify failed: {report.run}: {len(report.findings)} finding(s) in "
                      f"{len(units)} unit(s); {checked}", highlight=False)
        return 1
    tolerance = ", ".join(f"{k} rtol {r:g} atol {a:g}" for k, (r, a) in TOLERANCES.items())
    console.print(f"verified {report.run}: {checked}; records complete; floats within "
                  f"{tolerance}, everything else identical", highlight=False)
    return 0
