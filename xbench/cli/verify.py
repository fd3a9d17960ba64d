"""``xbench verify RUN --sample K --seed S``: recompute K randomly chosen units of a run from
its own header and compare them with its records (exit 1 naming each mismatching unit, row and
field; docs/ci.md). The whole run's records are checked too: schema, every unit finished,
provenance, no row missing."""

from __future__ import annotations

import argparse
from pathlib import Path

from xbench.cli.console import message_console


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("verify", help="recompute a sample of a run's units and compare "
                              "them with its records", description=__doc__)
    p.add_argument("run", help="run folder (the one holding run.json)")
    p.add_argument("--sample", type=int, default=4, help="units to recompute (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the choice of units")
    p.add_argument("--data", help="the run's data folder, when run.json records it relative "
                   "to another working directory")
    p.add_argument("--labels", help="the run's labels file (same reason)")
    p.add_argument("--boxes", help="the run's boxes file (same reason)")
    p.add_argument("--device", help="device to recompute on (default: the recorded setting)")
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
