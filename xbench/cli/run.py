"""``xbench run``: score the explainer x metric matrix and record every row."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from xbench import leaderboard
from xbench.cli.console import message_console, table_console
from xbench.cli.matrix import print_matrix
from xbench.cli.options import (add_data_options, add_explanation_options, add_model_options,
                                add_output_option, add_plugin_options, examples, group,
                                positive_int)
from xbench.errors import UserError
from xbench.plugins import build_registry
from xbench.progress import unit_progress
from xbench.runner import RunConfig, Runner

__all__ = ["add_parser", "run", "print_matrix"]


DESCRIPTION = """Score the explainer x metric matrix on a dataset and record every row.

Writes one run folder of records (OUTPUT/RUN/rows.jsonl, run.json, maps), prints the matrix
and regenerates OUTPUT/LEADERBOARD.md. The choices that change a number are plugin options
(-o) and profiles, pinned in docs/protocol.md."""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "run", help="score explainers x metrics on a dataset", description=DESCRIPTION,
        epilog=lambda: examples(
            "xbench run                                  # embedded photos, quick profile",
            "xbench run --data /path/to/ILSVRC2012/val --limit 50 --explainers gradcam,rise \\",
            "           --metrics faithfulness -o rise.n_masks=2000",
            "xbench run --layer all --explainers gradcam --output sweeps",
            "xbench -p no:NAME run ...   # or: xbench run -p no:NAME ...",
            note=installed_names()))
    selection = group(p, "selection")
    selection.add_argument("--explainers", default="all", metavar="all|NAME,NAME",
                           help="'all' or a comma-separated list of explainer names (listed "
                                "below)")
    selection.add_argument("--metrics", default="all", metavar="all|NAME,NAME",
                           help="'all' (model-scope metrics left out) or a comma-separated list "
                                "of metric and family names (listed below)")
    selection.add_argument("--profile", default="auto", metavar="auto|quick|paper",
                           help="plugin option presets (or a profile a plugin declares): auto "
                                "is quick on the embedded sample, paper otherwise")
    add_model_options(p)
    model = group(p, "model")
    model.add_argument("--batch-size", type=positive_int, default=8, metavar="N",
                       help="images per explainer call")
    model.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                       help="keep the model in contiguous memory format (default: channels-last)")
    model.add_argument("--timeout", type=float, metavar="SECONDS",
                       help="seconds an explainer may spend per image; a slower image is "
                            "recorded as failed and the run goes on (default: no limit)")
    add_data_options(p)
    add_explanation_options(p)
    add_plugin_options(p)
    output = add_output_option(p, "results folder (one sub-folder per run)", default="results",
                               metavar="FOLDER", old=["--out"])
    output.add_argument("--name", help="run folder name (default: MODEL_DATA_PROFILE[_nN-sS])")
    output.add_argument("--resume", action="store_true", help="finish an interrupted run")
    output.add_argument("--overwrite", action="store_true", help="start the run folder afresh")
    output.add_argument("--no-maps", dest="save_maps", action="store_false",
                        help="do not keep map previews (maps/*.npz, used by reports)")
    output.add_argument("--no-leaderboard", dest="leaderboard", action="store_false",
                        help="do not regenerate LEADERBOARD.md in --output")
    output.add_argument("--report", action="store_true",
                        help="also write RUN/report.html (as xbench report does)")
    execution = group(p, "execution")
    execution.add_argument("--distributed", action="store_true",
                           help="shard the run over the processes torchrun started (implied "
                                "when WORLD_SIZE > 1; docs/scale.md)")
    execution.add_argument("--dry-run", action="store_true",
                           help="print the units, passes per explainer and metric and an "
                                "estimated wall time (a short throughput probe here), then exit "
                                "without writing")
    p.set_defaults(func=run)


def installed_names() -> str:
    """The installed explainers and metrics (by family), for the help's epilog."""
    from collections import defaultdict

    from xbench.plugins import build_registry

    registry = build_registry()
    families: dict[str, list[str]] = defaultdict(list)
    for name in registry.names("metric"):
        families[registry.metric(name).metric_family()].append(name)
    lines = ["installed explainers:", _wrapped(registry.names("explainer")),
             "installed metrics (family: names; a family name selects all of it):"]
    lines += [_wrapped(names, f"{family}: ") for family, names in sorted(families.items())]
    return "\n".join(lines)


def _wrapped(names: list[str], head: str = "", width: int = 92) -> str:
    import textwrap

    return textwrap.fill(head + ", ".join(names), width=width, initial_indent="  ",
                         subsequent_indent="    ", break_on_hyphens=False)


def run(args: argparse.Namespace) -> int:
    from xbench.cli import blocked_plugins

    from xbench import distributed

    if isinstance(args.target, int):
        raise UserError(f"--target {args.target}: xbench run explains each image's predicted "
                        "class or its label (--target predicted|label); a fixed class index "
                        "is for xbench explain")
    rank, world, device = 0, 1, args.device
    if args.distributed or distributed.from_environment()[1] > 1:
        rank, world, device = distributed.initialise(args.device)
    console = table_console(quiet=rank != 0)
    err = message_console(quiet=rank != 0)
    registry = build_registry(blocked=blocked_plugins(args))
    for message in registry.load_errors:
        err.print(f"[yellow]warning:[/] {message}", highlight=False)
    config = RunConfig(
        explainers=args.explainers, metrics=args.metrics, model=args.model, data=args.data,
        labels=args.labels, boxes=args.boxes, limit=args.limit, seed=args.seed, device=device,
        dtype=args.dtype, batch_size=args.batch_size, profile=args.profile,
        layers=None if args.layers == "last" else args.layers,
        weights=args.weights, target_rule=args.target, channels_last=args.channels_last,
        options=tuple(args.options), checkpoint=args.checkpoint, member=args.member,
        engine=args.engine, timeout=args.timeout, save_maps=args.save_maps)
    out = Path(args.output)
    runner = Runner(config, registry, out, name=args.name, progress=unit_progress)
    if getattr(args, "dry_run", False):
        console.print(runner.dry_run(), highlight=False, markup=False)
        return 0
    err.print(f"xbench run [bold]{runner.run_name}[/]: {len(runner.dataset.items)} images, "
              f"explainers {', '.join(runner.explainer_names)}; profile {runner.profile}",
              highlight=False)
    start = time.perf_counter()
    summary = runner.run(resume=args.resume, overwrite=args.overwrite, shard=(rank, world))
    elapsed = time.perf_counter() - start
    if rank != 0:
        return 0
    text, table = leaderboard.run_section(summary.folder)
    print_matrix(console, summary.folder, table, registry=registry)
    if summary.failed_cells or summary.failed_images:
        console.print(f"[red]{summary.failed_cells} failed cells, {summary.failed_images} "
                      f"unreadable images[/]; most frequent reasons:", highlight=False)
    for count, explainer, layer, message in summary.failure_reasons:
        where = explainer or "reading images"
        where += f" @{layer}" if layer not in ("", "-") else ""
        console.print(f"  {count}x {where}: {message}", highlight=False)
    # This run's records are safe on disk now: nothing below may turn it into a failure.
    if args.leaderboard:
        skipped: list[str] = []
        try:
            leaderboard.write(out, skipped)
        except (UserError, OSError) as exc:
            skipped.append(f"leaderboard of {out} not written: {exc}")
        for problem in skipped:
            err.print(f"[yellow]warning:[/] {problem}", highlight=False)
    if args.report:
        from xbench.report import write_report

        err.print(f"wrote {write_report(summary.folder.path, registry=registry)}", highlight=False)
    engine = summary.header.environment.get("engine", {})
    if "failed" in engine.get("reason", ""):
        err.print(f"[yellow]warning:[/] forwards ran eagerly ({engine['reason']})", highlight=False)
    if summary.host_overloaded:
        load = summary.header.host_load
        err.print(f"[yellow]warning:[/] host load (1 min) was {load.get('start', ['?'])[0]} at the "
                  f"start and {(load.get('end') or ['?'])[0]} at the end, above its "
                  f"{load['cores']} cores: timings of a busy host are not comparable",
                  highlight=False)
    err.print(f"{summary.units_done} units computed, {summary.units_skipped} already done, "
              f"{summary.failed_cells} failed cells, {summary.failed_images} unreadable images "
              f"in {elapsed:.1f} s; records in {summary.folder.path}", highlight=False)
    return 1 if summary.failed_cells or summary.failed_images else 0
