"""``xbench train mutual-transfer``: two students with local attention map mutual transfer.

Cheng, Wang, Cui, Zhan, Computer Science 49(5):64-70, 2022; the method lives in
``xbench_plugins.mutual_transfer``. This module runs (and resumes) the training on the images
of ``data`` with progress on stderr, and writes checkpoints that the
``mutual-transfer`` Model plugin reads (``--model mutual-transfer --checkpoint CKPT --member st1``).

``--compare`` trains the rows of the paper's Table 1 from the same starting point
(independent training = beta 0, global transfer = lambda -1, local transfer at each of
``--lambdas``) and prints their held-out accuracies with intervals, the kept-region fractions
and paired tests between regimes (``xbench_plugins.mutual_transfer.report``).
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from xbench import Progress, UserError, table_console
from xbench.cli.options import (add_data_options, add_output_option, add_plugin_options,
                                add_seed_option, adjust, examples, group, positive_int)
from xbench_plugins.mutual_transfer.checkpoint import load_students, save_checkpoint
from xbench_plugins.mutual_transfer.data import load_data
from xbench_plugins.mutual_transfer.losses import parse_grid
from xbench_plugins.mutual_transfer.report import bits, paired_tests, parse_lambdas, regime_name, sweep_row
from xbench_plugins.mutual_transfer.students import ARCHS, SMALL_ARCHS, build_student
from xbench_plugins.mutual_transfer.trainer import (MutualTrainer, TrainConfig, correct_predictions,
                                                    epoch_batches, pretrain)


DEFAULT_LAMBDAS = "0.5,0.6,0.7,0.8,0.85,0.9,0.99"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``xbench train mutual-transfer``: the shared data, seed and output flags
    (:mod:`xbench.cli.options`, meaning what they mean in ``xbench run``) plus the study's."""
    parser.description = (
        "Train ST1 (with prior knowledge) and ST2 together; regions of their attention maps whose "
        "Pearson correlation exceeds --lambda transfer in both directions (Cheng et al. 2022). "
        "The checkpoint is what --model mutual-transfer --checkpoint CKPT --member st1|st2 "
        "reads.")
    parser.epilog = examples(
        "xbench train mutual-transfer --data digits --compare --output runs/mt-digits   # Table 1",
        "xbench train mutual-transfer --data digits --lambda 0.8 --epochs 4 --output mt.pt",
        "xbench run --model mutual-transfer --checkpoint mt.pt --member st1 --explainers gradcam",
        note="docs/mutual-transfer.md: the method, the regimes of --compare and the results.")
    students = group(parser, "students")
    students.add_argument("--st1", default="small-wrn", choices=ARCHS,
                          help="student 1, the one with prior knowledge")
    students.add_argument("--st2", default="small-mobilenet", choices=ARCHS, help="student 2")
    add_data_options(parser, labels=False, boxes=False, default_data="digits")
    adjust(parser, "--data", metavar="digits|cifar10|cifar100|FOLDER",
           help="training data: scikit-learn digits (embedded, held-out 30%% split), "
                "CIFAR-10/100 from --data-root, or an image folder (layouts: docs/data.md)")
    adjust(parser, "--limit", help="train on a seeded subset of N images (--seed)")
    data = group(parser, "data")
    data.add_argument("--data-root", default="data", metavar="DIR",
                      help="folder holding cifar-10-batches-py / cifar-100-python (never "
                           "downloaded)")
    data.add_argument("--val-data", metavar="FOLDER",
                      help="evaluation images for a folder --data (e.g. /path/to/ILSVRC2012/val)")
    data.add_argument("--val-limit", type=positive_int, metavar="N",
                      help="evaluate on a seeded subset of N images")
    add_plugin_options(parser, takes_options=False)
    transfer = group(parser, "transfer")
    transfer.add_argument("--lambda", dest="lam", type=float, default=0.5, metavar="L",
                          help="Pearson threshold: regions with r > L transfer; -1 = global "
                               "transfer")
    transfer.add_argument("--beta", type=float, default=1.0, metavar="B",
                          help="weight of the transfer term, loss = CE + B/2 * sum")
    transfer.add_argument("--grid", default="2x2", metavar="RxC",
                          help="local regions per attention map, rows x cols (2x2: k = 4)")
    transfer.add_argument("--target-grad", action="store_true",
                          help="ablation: let gradients flow into the other student's map too "
                               "(default: the other's map is a constant target)")
    transfer.add_argument("--compare", action="store_true",
                          help="train the Table-1 rows (independent, global, local at each "
                               "--lambdas) from one starting point; --output is then a folder")
    # argparse < 3.13 reads "-1,0.5" as an unknown option; this parser has no option that looks
    # like a negative number, so such a token can only be a value
    parser._negative_number_matcher = re.compile(r"^-\d*\.?\d+([,\s]+-?\d*\.?\d+)*$")
    transfer.add_argument("--lambdas", default=DEFAULT_LAMBDAS, metavar="L,L,...",
                          help="with --compare: one local-transfer run per lambda (-1 = the "
                               "global row, always trained; these keep from ~100%% to well under "
                               "50%% of the regions in the digits demo)")
    training = group(parser, "training")
    training.add_argument("--epochs", type=int, default=3, metavar="E",
                          help="mutual-training epochs")
    add_seed_option(parser, "seeds initialisation, data order, flips, dropout and the --limit "
                            "subset", title="training")
    training.add_argument("--lr", type=float, metavar="LR",
                          help="SGD (Nesterov, momentum 0.9, weight decay 5e-4) learning rate, "
                               "cosine-annealed per step (default 0.05 for small nets, 0.001 when "
                               "an EfficientNet-Lite student is fine-tuned: 0.005 already "
                               "diverges)")
    training.add_argument("--batch-size", type=int, default=32, metavar="N",
                          help="images per step")
    training.add_argument("--pretrain-epochs", type=int, metavar="N",
                          help="cross-entropy epochs giving a from-scratch ST1 its prior knowledge "
                               "before mutual training (default 2 for small nets, 0 for "
                               "ImageNet-pretrained ST1)")
    training.add_argument("--freeze-bn", action="store_true",
                          help="keep BatchNorm running statistics fixed (advised when "
                               "fine-tuning pretrained students with small batches)")
    training.add_argument("--threads", type=positive_int, metavar="N", help="torch CPU threads")
    output = add_output_option(parser, "checkpoint path (a folder with --compare); written after "
                                       "every epoch", metavar="CKPT", old=["--out"], required=True)
    output.add_argument("--resume", action="store_true",
                        help="continue from --output if it exists")


def make_config(args: argparse.Namespace, lam: float | None = None, beta: float | None = None) -> Any:
    small_st1 = args.st1 in SMALL_ARCHS
    both_small = small_st1 and args.st2 in SMALL_ARCHS
    pretrain = args.pretrain_epochs if args.pretrain_epochs is not None else (2 if small_st1 else 0)
    for option, value in (("--epochs", args.epochs), ("--batch-size", args.batch_size)):
        if value < 1:
            raise UserError(f"{option} must be at least 1, got {value}")
    if pretrain < 0:
        raise UserError(f"--pretrain-epochs must be >= 0, got {pretrain}")
    return TrainConfig(
        st1=args.st1, st2=args.st2, data=args.data, lam=args.lam if lam is None else lam,
        beta=args.beta if beta is None else beta, epochs=args.epochs, grid=parse_grid(args.grid),
        seed=args.seed, lr=args.lr if args.lr is not None else (0.05 if both_small else 0.001),
        batch_size=args.batch_size, pretrain_epochs=pretrain, freeze_bn=args.freeze_bn,
        detach_target=not args.target_grad, limit=args.limit)


def initial_students(config: Any, train: Any, console: Console) -> tuple[dict[str, Any], list[dict]]:
    """ST1 (ImageNet weights, or ``pretrain_epochs`` of CE on the training data) and a seeded ST2."""
    n = len(train.class_names)
    st1 = build_student(config.st1, n, pretrained=True, seed=config.seed)
    st2 = build_student(config.st2, n, pretrained=True, seed=config.seed + 1)
    history: list[dict] = []
    if config.pretrain_epochs:
        steps = config.pretrain_epochs * -(-len(train) // config.batch_size)
        with Progress(console) as progress:
            bar = progress.bar("pretrain ST1 (prior knowledge)", total=steps)

            def on_step(_phase: str, epoch: int, row: dict[str, float]) -> None:
                bar.advance(status=f"ep {epoch} loss {row['loss_st1']:.3f}")

            history = pretrain(st1, train, config, on_step)
    return {"st1": st1, "st2": st2}, history


def evaluate_both(students: dict[str, Any], data: Any, console: Console, label: str) -> dict[str, Any]:
    """top1_st1/st2 and correct_st1/st2 (per-image '0'/'1' strings, for paired tests)."""
    out: dict[str, Any] = {}
    with Progress(console) as progress:
        for name, student in students.items():
            bar = progress.bar(f"{label}: top-1 {name} on {data.name}", total=len(data), log=False)
            hits = correct_predictions(student, data, on_batch=bar.advance)
            out[f"top1_{name}"] = int(hits.sum()) / max(len(data), 1)
            out[f"correct_{name}"] = bits(hits.tolist())
    return out


def train_run(config: Any, start: dict[str, Any] | None, pre_history: list[dict], train: Any, test: Any,
              out: Path, resume: bool, console: Console, tag: str = "",
              before: dict[str, float] | None = None) -> dict[str, Any]:
    """Train (or resume) one run to ``config.epochs``, saving ``out`` after every epoch.

    ``before``: accuracies of ``start`` on ``test`` when already known (runs sharing a start).
    """
    steps = len(epoch_batches(len(train), config.batch_size, 0))
    if resume and out.is_file():
        students, payload = load_students(out)
        saved = payload["config"]
        if saved != config.as_dict():
            diff = {k: (saved.get(k), v) for k, v in config.as_dict().items() if saved.get(k) != v}
            raise UserError(f"--resume: {out} was trained with different settings {diff} "
                            "(saved, requested); use another --output or the same options")
        trainer = MutualTrainer(students["st1"], students["st2"], config, steps)
        trainer.load_state(payload)
        console.print(f"{tag}resuming {out} after epoch {trainer.epoch}/{config.epochs}")
    else:
        students = copy.deepcopy(start)
        trainer = MutualTrainer(students["st1"], students["st2"], config, steps)
        trainer.history = list(pre_history)
        if test is not None:
            before = before or evaluate_both(students, test, console, f"{tag}before")
            trainer.history.append({"phase": "before", "epoch": 0, **before})
        save_checkpoint(out, students, train.class_names, trainer.state())
    while trainer.epoch < config.epochs:
        t0 = time.perf_counter()
        with Progress(console) as progress:
            bar = progress.bar(f"{tag}epoch {trainer.epoch + 1}/{config.epochs}", total=steps)

            def on_step(_phase: str, _epoch: int, row: dict[str, float]) -> None:
                bar.advance(status=(
                    f"L1 {row['loss_st1']:.3f} L2 {row['loss_st2']:.3f} kept {row['kept']:.0%}"))

            row = trainer.train_epoch(train, on_step)
        row = {"phase": "mutual", "epoch": trainer.epoch, "seconds": time.perf_counter() - t0, **row}
        if test is not None:
            row.update(evaluate_both(students, test, console, f"{tag}epoch {trainer.epoch}"))
        trainer.history.append(row)
        save_checkpoint(out, students, train.class_names, trainer.state())
        shown = {k: round(v, 4) for k, v in row.items() if isinstance(v, float)}
        console.print(f"{tag}epoch {trainer.epoch}: {shown}", highlight=False)
    return {"config": config.as_dict(), "history": trainer.history, "checkpoint": str(out)}


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    rows = [r for r in result["history"] if "top1_st1" in r]
    before = next((r for r in rows if r["phase"] == "before"), None)
    after = rows[-1] if rows else None
    return {"before": before, "after": after}


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console(stderr=True)
    out = Path(args.output)
    probe = [build_student(a, 10, pretrained=False) for a in (args.st1, args.st2)]
    largest = max(probe, key=lambda s: s.input_size)
    train, test = load_data(args, (largest.resize_size, largest.input_size), console)
    console.print(f"train {train.name}: {len(train)} images, {len(train.class_names)} classes; "
                  f"eval {test.name + f': {len(test)} images' if test is not None else 'none'}")
    if args.compare:
        return _compare(args, train, test, out, console)
    config = make_config(args)
    start, pre_history = (None, [])
    if not (args.resume and out.is_file()):
        start, pre_history = initial_students(config, train, console)
    result = train_run(config, start, pre_history, train, test, out, args.resume, console)
    summary = _summary(result)
    table = Table(title=f"mutual transfer: lambda {config.lam}, beta {config.beta}, grid "
                        f"{config.grid[0]}x{config.grid[1]}, seed {config.seed}")
    table.add_column("")
    table.add_column(f"ST1 {config.st1}")
    table.add_column(f"ST2 {config.st2}")
    for label in ("before", "after"):
        if summary[label]:
            table.add_row(f"top-1 {label}", f"{summary[label]['top1_st1']:.4f}", f"{summary[label]['top1_st2']:.4f}")
    table_console().print(table)
    console.print(f"checkpoint: {out}  (xbench run --model mutual-transfer --checkpoint {out} --member st1)")
    return 0


def _compare(args: argparse.Namespace, train: Any, test: Any, out: Path, console: Console) -> int:
    """Table 1 of the paper as a lambda sweep: independent (beta 0), global (lambda -1) and local
    transfer at each of --lambdas, all from one starting point, evaluated on the same images."""
    if test is None:
        raise UserError("--compare needs an evaluation set: use --data digits/cifar* or --val-data PATH")
    lambdas = parse_lambdas(args.lambdas)
    out.mkdir(parents=True, exist_ok=True)
    configs = {"independent": make_config(args, lam=-1.0, beta=0.0), "global": make_config(args, lam=-1.0)}
    for lam in lambdas:
        configs.setdefault(regime_name(lam, args.beta), make_config(args, lam=lam))
    initial = out / "initial.pt"
    if args.resume and initial.is_file():
        start, payload = load_students(initial)
        pre_history = list(payload["history"])
    else:
        start, pre_history = initial_students(configs["global"], train, console)
        save_checkpoint(initial, start, train.class_names,
                        {"config": configs["global"].as_dict(), "epoch": 0, "history": pre_history})
    results: dict[str, Any] = {}
    before = None
    for regime, config in configs.items():
        results[regime] = train_run(config, start, pre_history, train, test,
                                    out / f"{regime.replace(' ', '-')}.pt", args.resume, console,
                                    tag=f"{regime}: ", before=before)
        before = _summary(results[regime])["before"]
        before = {k: v for k, v in before.items() if k.startswith(("top1_", "correct_"))} if before else None
    histories = {r: results[r]["history"] for r in configs}
    rows = [sweep_row(r, results[r]["config"], histories[r]) for r in configs]
    for row in rows:
        mutual = [h for h in histories[row["regime"]] if h.get("phase") == "mutual"]
        row["r_quantiles_first"] = mutual[0].get("r_quantiles")
        row["r_quantiles_last"] = mutual[-1].get("r_quantiles")
    tests = paired_tests(histories)
    before = _summary(results["global"])["before"]

    def pct(v: float | None) -> str:
        return "" if v is None else f"{v:.1%}"

    def top1(row: dict[str, Any], member: str) -> str:
        ci = row.get(f"top1_{member}_ci95")
        return f"{row[f'top1_{member}']:.4f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")

    table = Table(title=(f"Table 1 as a lambda sweep on {train.name} -> {test.name} ({len(test)} images): "
                         f"top-1 [95% Wilson] after {args.epochs} epochs, seed {args.seed}, grid {args.grid}, "
                         f"beta {args.beta}; kept regions first -> last epoch, overall and per layer pair"))
    for column in ("regime", f"ST1 {args.st1}", f"ST2 {args.st2}", "kept", "kept per layer pair"):
        table.add_column(column)
    table.add_row("start", f"{before['top1_st1']:.4f}", f"{before['top1_st2']:.4f}", "", "")
    for row in rows:
        if row["beta"] == 0:
            kept = layers = "(no transfer)"
        else:
            kept = f"{pct(row['kept_first'])} -> {pct(row['kept_last'])}"
            layers = " ".join(f"{pct(a)}->{pct(b)}" for a, b in zip(row["kept_layers_first"], row["kept_layers_last"]))
        table.add_row(row["regime"], top1(row, "st1"), top1(row, "st2"), kept, layers)
    table_console().print(table)
    paired = Table(title=f"paired (McNemar exact) on the same {len(test)} images: regime minus reference, "
                         "images only the regime / only the reference gets right, two-sided p")
    for column in ("regime", "reference", "student", "delta top-1", "only regime", "only ref", "p"):
        paired.add_column(column)
    for t in tests:
        paired.add_row(t["regime"], t["reference"], t["student"].upper(), f"{t['delta']:+.4f}",
                       str(t["only_regime"]), str(t["only_reference"]), f"{t['p']:.3g}")
    table_console().print(paired)
    # transfer pulls r towards 1, so the global run's r says little about where a gate will
    # bite; the independent run's r is what the maps do without transfer
    for regime in ("independent", "global"):
        quant = [h for h in histories[regime] if h.get("phase") == "mutual"][-1].get("r_quantiles") or {}
        if quant:
            console.print(f"Pearson r of the regions, {regime} run, last epoch, quantiles "
                          + ", ".join(f"q{lv:g} {v:.4f}" for lv, v in zip(quant["levels"], quant["all"])),
                          highlight=False)
    (out / "table1.json").write_text(json.dumps(
        {"train": train.name, "test": test.name, "test_images": len(test), "seed": args.seed,
         "epochs": args.epochs, "grid": args.grid, "lambdas": lambdas, "start": before, "rows": rows,
         "paired_tests": tests, "histories": histories}, indent=2))
    console.print(f"wrote {out / 'table1.json'} and one checkpoint per regime in {out}")
    return 0
