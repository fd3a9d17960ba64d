"""``xbench run``: score the explainer x metric matrix and record every row."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from xbench import leaderboard
from xbench.cli.console import message_console, table_console
from xbench.cli.progress import rich_progress
from xbench.engine import ENGINES
from xbench.plugins import build_registry
from xbench.errors import UserError
from xbench.runner import DTYPES, TARGET_RULES, RunConfig, Runner


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("run", help="score explainers x metrics on a dataset",
                              description=__doc__)
    p.add_argument("--explainers", default="all", help="'all' or a comma-separated list")
    p.add_argument("--metrics", default="all", help="'all' or a comma-separated list")
    p.add_argument("--model", default="efficientnet-lite0", help="a registered model name")
    p.add_argument("--weights", help="local weights file (state dict) for the model")
    p.add_argument("--checkpoint", help="checkpoint for plugins that take one (L-CAM heads, "
                   "mutual-transfer models)")
    p.add_argument("--member", help="which member of a multi-network model (st1|st2)")
    p.add_argument("--data", default="sample", help="'sample' (embedded photos) or a folder")
    p.add_argument("--labels", help="labels file: file,label CSV, LOC_val_solution.csv or devkit "
                   "ground truth")
    p.add_argument("--boxes", help="object boxes: file,width,height,x0,y0,x1,y1 CSV, "
                   "LOC_val_solution.csv or the ILSVRC2012_bbox_val_v3 folder (default: found "
                   "beside --data, e.g. <folder>_boxes.csv)")
    p.add_argument("--limit", type=int, help="use a seeded subset of N images")
    p.add_argument("--seed", type=int, default=0, help="seed for subsets, masks and bootstrap")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES),
                   help="fp32, or autocast bf16/fp16 for explanations")
    p.add_argument("--batch-size", type=int, default=8, help="images per explainer call")
    p.add_argument("--layers", help="target layer(s): 'last' (the model's default) or NAME,NAME")
    p.add_argument("--profile", default="auto", help="quick | paper | auto (quick on the "
                   "embedded sample, paper otherwise)")
    p.add_argument("--target", dest="target_rule", default="predicted", choices=TARGET_RULES,
                   help="explain the top-1 prediction (default) or the ground-truth label")
    p.add_argument("-o", "--option", dest="options", action="append", default=[],
                   metavar="PLUGIN.KEY=VALUE", help="plugin option, e.g. rise.n_masks=8000")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                   help="keep the model in contiguous memory format")
    p.add_argument("--engine", default="auto", choices=ENGINES,
                   help="how the hook-free forwards of Score-CAM, RISE and the metrics run: "
                   "auto (onnxruntime for fp32 on CPU, else eager), eager, onnxruntime, or "
                   "compiled (torch.compile); recorded in every row")
    p.add_argument("--timeout", type=float, help="seconds an explainer may spend per image; "
                   "a slower image is recorded as failed and the run goes on")
    p.add_argument("--no-maps", dest="save_maps", action="store_false",
                   help="do not keep map previews (maps/*.npz, used by reports)")
    p.add_argument("--out", default="results", help="results folder (one sub-folder per run)")
    p.add_argument("--name", help="run folder name (default: model_data_profile[_nN-sS])")
    p.add_argument("--resume", action="store_true", help="finish an interrupted run")
    p.add_argument("--overwrite", action="store_true", help="start the run folder afresh")
    p.add_argument("--distributed", action="store_true", help="shard the run over the processes "
                   "torchrun started (implied when WORLD_SIZE > 1)")
    p.add_argument("--no-leaderboard", dest="leaderboard", action="store_false",
                   help="do not regenerate LEADERBOARD.md in --out")
    p.add_argument("--report", action="store_true",
                   help="also write RUN_DIR/report.html (xbench report, default options)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the units, passes per explainer and metric and an estimated "
                   "wall time (a short throughput probe here), then exit without writing")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from xbench.cli import blocked_plugins

    from xbench import distributed

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
        dtype=args.dtype, batch_size=args.batch_size, profile=args.profile, layers=args.layers,
        weights=args.weights, target_rule=args.target_rule, channels_last=args.channels_last,
        options=tuple(args.options), checkpoint=args.checkpoint, member=args.member,
        engine=args.engine, timeout=args.timeout, save_maps=args.save_maps)
    out = Path(args.out)
    runner = Runner(config, registry, out, name=args.name, progress=rich_progress)
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
    print_matrix(console, summary.folder, table)
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


def print_matrix(console: Console, folder, table) -> None:
    header = folder.header()
    frame = leaderboard.run_frame(folder)
    accuracy, labelled = leaderboard.top1_accuracy(frame)
    engine = header.environment.get("engine", {}).get("name", "eager")
    title = (f"{header.run_name} — protocol v{header.protocol}, profile {header.profile}, "
             f"engine {engine}, "
             f"top-1 {leaderboard.format_number(accuracy)} ({labelled} labelled)")
    model = leaderboard.model_scores(frame, seed=header.config.get("seed", 0))
    for _, line in model.iterrows():
        console.print(f"model-scope {line.column}: {leaderboard.format_number(line['mean'])} "
                      f"[{leaderboard.format_number(line.ci_low)}, "
                      f"{leaderboard.format_number(line.ci_high)}] over {line.images} images",
                      highlight=False)
    if table.empty:
        console.print(f"{title}: no explainer scores")
        return
    # Transposed for the terminal: one line per metric column, one column per explainer, and
    # as many tables as it takes to fit the width (never folded cells); intervals are in
    # LEADERBOARD.md.
    explainers = leaderboard.explainer_layers(table)
    show_layer = len({layer for _, layer in explainers if layer != "-"}) > 1
    cells = table.set_index(["column", "explainer", "layer"])
    columns = leaderboard.column_order(table)
    labels = [f"{column} {leaderboard.ARROWS.get(direction, '')}".strip()
              for column in columns
              for direction in [table[table.column == column].direction.iloc[0]]]
    texts = {key: leaderboard.cell_text(cells.loc[key], markdown=False, interval=False)
             for key in cells.index}
    headers = [f"{explainer}\n{layer}" if show_layer else explainer
               for explainer, layer in explainers]

    def width(index: int) -> int:
        explainer, layer = explainers[index]
        content = [len(part) for part in headers[index].split("\n")]
        content += [len(texts.get((column, explainer, layer), "")) for column in columns]
        return max(content) + 3  # padding and the border

    room = max(console.width - max(map(len, labels)) - 4, 1)
    groups: list[list[int]] = [[]]
    for index in range(len(explainers)):
        if groups[-1] and sum(map(width, groups[-1])) + width(index) > room:
            groups.append([])
        groups[-1].append(index)
    for number, group in enumerate(groups):
        last = number == len(groups) - 1
        rich_table = Table(
            title=title if number == 0 else None,
            caption="bold: best; ≈: tied with best (paired bootstrap); 95% intervals in "
                    "LEADERBOARD.md" if last else None)
        rich_table.add_column("metric", no_wrap=True)
        for index in group:
            rich_table.add_column(headers[index], justify="right", no_wrap=True)
        for column, label in zip(columns, labels):
            rich_table.add_row(label, *(texts.get((column, *explainers[index]), "")
                                        for index in group))
        console.print(rich_table)
