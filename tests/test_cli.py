"""The command line: run, leaderboard --check, explain, plugins and error messages."""

from __future__ import annotations

import pytest
from PIL import Image

from xbench.cli import main
from xbench.data import sample_images


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    code = main(["run", "--explainers", "gradcam", "--metrics", "average-drop,time",
                 "--limit", "2", "--batch-size", "2", "--output", str(out)])
    assert code == 0
    return out


def test_run_writes_records_and_leaderboard(results, capsys):
    run = results / "efficientnet-lite0_sample_quick_n2-s0"
    assert (run / "run.json").is_file() and (run / "rows.jsonl").is_file()
    text = (results / "LEADERBOARD.md").read_text()
    assert "efficientnet-lite0_sample_quick_n2-s0" in text and "| gradcam |" in text
    assert main(["leaderboard", str(results), "--check"]) == 0


def test_leaderboard_check_fails_on_a_stale_file(results, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(results, copy)
    (copy / "leaderboard.csv").write_text("edited\n")
    assert main(["leaderboard", str(copy), "--check"]) == 1
    assert main(["leaderboard", str(copy)]) == 0
    assert main(["leaderboard", str(copy), "--check"]) == 0


def test_rerunning_a_finished_run_needs_resume(results, capsys):
    code = main(["run", "--explainers", "gradcam", "--metrics", "average-drop,time",
                 "--limit", "2", "--batch-size", "2", "--output", str(results)])
    assert code == 2
    assert "already holds a run. Use --resume" in capsys.readouterr().err
    code = main(["run", "--explainers", "gradcam", "--metrics", "average-drop,time",
                 "--limit", "2", "--batch-size", "2", "--output", str(results), "--resume"])
    assert code == 0
    assert "0 units computed, 2 already done" in capsys.readouterr().err


def test_explain_writes_an_overlay_png(tmp_path):
    image = next(path for name, path, _ in sample_images() if name == "coffee.png")
    output = tmp_path / "coffee_gradcam.png"
    assert main(["explain", str(image), "--explainer", "gradcam", "--output", str(output)]) == 0
    with Image.open(output) as png:
        assert png.format == "PNG" and png.size == (400, 440)


@pytest.mark.parametrize("argv,message", [
    (["run", "--explainers", "gradcma"], "Did you mean 'gradcam'"),
    (["run", "--data", "/no/such/folder"], "no such file or directory"),
    (["run", "--model", "resnet5"], "Did you mean"),
    (["explain", "/no/such.png"], "no such image file"),
    (["-p", "gradcam", "plugins"], "only '-p no:NAME'"),
    (["leaderboard", "/no/such/results"], "no such results folder"),
])
def test_bad_input_gets_a_clear_message_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_the_matrix_is_split_to_fit_the_terminal_never_folded():
    import io
    from pathlib import Path

    from rich.console import Console

    from xbench import leaderboard
    from xbench.cli.run import print_matrix
    from xbench.records import RunFolder

    # the committed default run: ten explainers, far wider than 80 columns
    folder = RunFolder(Path(__file__).parents[1] / "results" / "reference_efficientnet-lite0_sample_quick")
    _, table = leaderboard.run_section(folder)
    buffer = io.StringIO()
    print_matrix(Console(file=buffer, width=80), folder, table)
    lines = buffer.getvalue().splitlines()
    assert max(map(len, lines)) <= 80
    header_lines = [line for line in lines if line.startswith("┃ metric")]
    assert len(header_lines) >= 2  # more than one table
    shown = {name.strip() for line in header_lines for name in line.split("┃")[2:-1]}
    assert shown == set(table.explainer)  # every explainer, each name whole
    assert sum("average-drop@r=100% ↓" in line for line in lines) == len(header_lines)


def test_messages_keep_long_paths_on_one_line(tmp_path, capsys):
    missing = tmp_path / ("a-long-folder-name-" * 8) / "run"
    assert main(["report", str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "not a run folder" in err  # not folded at 80 columns


def test_plugins_keeps_its_bracketed_tags(capsys):
    # rich reads "[gradients]" as a style tag and drops it unless the text is escaped
    main(["plugins"])
    out = capsys.readouterr().out
    gradcam = next(line for line in out.splitlines() if "│ gradcam " in line)
    average_drop = next(line for line in out.splitlines() if "│ average-drop " in line)
    rise = next(line for line in out.splitlines() if "│ rise " in line)
    assert "[gradients]" in gradcam and "[gradients]" not in rise
    assert "[lower is better]" in average_drop


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["-p", "no:rise", "--help"]])
def test_help_and_version_import_neither_torch_nor_subcommands(argv):
    import subprocess
    import sys

    code = ("import sys\nfrom xbench.cli import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit as exc:\n    assert exc.code == 0\n"
            "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')\n"
            "                or m in ('xbench.runner', 'xbench.cli.run', 'xbench.cli.explain'))\n"
            "print('LOADED', loaded)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert "LOADED []" in done.stdout
    assert "run" in done.stdout and "report" in done.stdout or "xbench 0." in done.stdout


def test_a_subcommand_gets_its_full_parser_only_when_named(capsys):
    with pytest.raises(SystemExit):
        main(["-p", "no:rise", "run", "--help"])
    assert "--explainers" in capsys.readouterr().out


# ------------------------------------------------------------------ the shared vocabulary
RUN_DIR = "results/reference_efficientnet-lite0_sample_quick"
#: every core command, with its positional arguments, and whether it writes an output path
COMMANDS = {
    "run": (["run"], True),
    "explain": (["explain", "photo.png"], True),
    "report": (["report", RUN_DIR], True),
    "plot curves": (["plot", "curves", RUN_DIR], True),
    "plot layers": (["plot", "layers", RUN_DIR], True),
    "leaderboard": (["leaderboard"], True),
    "plugins": (["plugins"], False),
    "check": (["check", RUN_DIR], False),
    "verify": (["verify", RUN_DIR], False),
    "analyze": (["analyze", RUN_DIR], True),
    "plot pareto": (["plot", "pareto", RUN_DIR, "--metric", "insertion"], True),
    # the study commands plugins register; their --output is required (a later one wins)
    "train lcam": (["train", "lcam", "--variant", "fm", "--epochs", "1", "--data", "imgs",
                    "--output", "head.pt"], True),
    "train mutual-transfer": (["train", "mutual-transfer", "--output", "mt.pt"], True),
    "similarity": (["similarity", "--output", "sim"], True),
}
TAKES_PLUGIN_OPTIONS = {"run", "explain"}
STUDIES = ("train lcam", "train mutual-transfer", "similarity")


def parse(argv):
    from xbench.cli import build_parser

    return build_parser(argv).parse_args(argv)


def parse_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        parse(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_blocks_plugins_after_its_name(command):
    from xbench.cli import blocked_plugins

    argv, _ = COMMANDS[command]
    assert blocked_plugins(parse([*argv, "-p", "no:a", "-p", "no:b"])) == ["a", "b"]
    assert blocked_plugins(parse(["-p", "no:a", *argv])) == ["a"]
    assert blocked_plugins(parse(["-p", "no:a", *argv, "-p", "no:b"])) == ["a", "b"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_output_is_one_flag(command, tmp_path):
    argv, writes = COMMANDS[command]
    if writes:
        assert parse([*argv, "--output", str(tmp_path / "x")]).output == str(tmp_path / "x")
    else:
        with pytest.raises(SystemExit):
            parse([*argv, "--output", "x"])


@pytest.mark.parametrize("command", COMMANDS)
def test_o_is_a_plugin_option_everywhere(command, capsys):
    argv, _ = COMMANDS[command]
    err = parse_error([*argv, "-o", "heatmap.png"], capsys)
    assert "argument -o/--option: 'heatmap.png' is not PLUGIN.KEY=VALUE" in err
    assert "an output path is --output" in err
    if command in TAKES_PLUGIN_OPTIONS:
        args = parse([*argv, "-o", "rise.n_masks=500", "--option", "average-drop.masking=binary"])
        assert args.options == ["rise.n_masks=500", "average-drop.masking=binary"]
    else:
        err = parse_error([*argv, "-o", "rise.n_masks=500"], capsys)
        assert "argument -o/--option" in err and "takes no plugin options" in err


@pytest.mark.parametrize("command", ["run", "explain"])
def test_model_and_explanation_flags_mean_the_same_in_run_and_explain(command, capsys):
    argv, _ = COMMANDS[command]
    args = parse([*argv, "--model", "resnet18", "--weights", "w.pt", "--checkpoint", "c.pt",
                  "--member", "st1", "--device", "cpu", "--dtype", "bf16", "--engine", "eager",
                  "--target", "281", "--layer", "_blocks.15", "--seed", "3"])
    assert (args.model, args.weights, args.checkpoint, args.member, args.device, args.dtype,
            args.engine) == ("resnet18", "w.pt", "c.pt", "st1", "cpu", "bf16", "eager")
    assert (args.target, args.layers, args.seed) == (281, "_blocks.15", 3)
    assert parse([*argv, "--layers", "_blocks.2"]).layers == "_blocks.2"  # the same flag
    assert parse([*argv, "--target", "label"]).target == "label"
    assert parse(argv).target == "predicted" and parse(argv).layers == "last"
    assert "argument --target: 'x': choose predicted, label or a class index" in parse_error(
        [*argv, "--target", "x"], capsys)
    assert "argument --target: '-1': a class index is an integer >= 0" in parse_error(
        [*argv, "--target=-1"], capsys)
    assert "argument --engine: invalid choice: 'onnx'" in parse_error(
        [*argv, "--engine", "onnx"], capsys)
    assert "argument --dtype: invalid choice: 'fp8'" in parse_error([*argv, "--dtype", "fp8"],
                                                                    capsys)


def test_run_takes_the_data_flags_and_checks_numbers(capsys):
    args = parse(["run", "--data", "imgs", "--labels", "l.csv", "--boxes", "b.csv", "--limit", "5"])
    assert (args.data, args.labels, args.boxes, args.limit) == ("imgs", "l.csv", "b.csv", 5)
    assert "argument --limit: '0': must be at least 1" in parse_error(["run", "--limit", "0"],
                                                                       capsys)
    assert "argument --batch-size: 'two' is not an integer" in parse_error(
        ["run", "--batch-size", "two"], capsys)


def test_old_spelling_out_still_works_and_says_so(capsys):
    assert parse(["run", "--out", "elsewhere"]).output == "elsewhere"
    assert "--out is deprecated; use --output" in capsys.readouterr().err


@pytest.mark.parametrize("command", STUDIES)
def test_a_study_needs_its_output_and_still_takes_out(command, capsys):
    argv, _ = COMMANDS[command]
    without = argv[:argv.index("--output")]
    assert "one of the arguments --output is required" in parse_error(without, capsys)
    assert parse([*without, "--out", "old"]).output == "old"
    assert "--out is deprecated; use --output" in capsys.readouterr().err
    help_text = _help(command)
    assert "--output" in help_text and "--out " not in help_text


def _help(command: str) -> str:
    from xbench.cli import build_parser

    argv, _ = COMMANDS[command]
    parser = build_parser(argv)
    for word in command.split():
        parser = next(action for action in parser._actions
                      if isinstance(action, __import__("argparse")._SubParsersAction)
                      ).choices[word]
    return parser.format_help()


def test_the_study_commands_take_the_shared_flags(capsys):
    from xbench_plugins.lcam.cli import command_line

    lcam = COMMANDS["train lcam"][0]
    args = parse([*lcam, "--model", "resnet18", "--weights", "w.pt", "--labels", "l.csv",
                  "--limit", "4", "--layer", "layer4", "--seed", "3"])
    assert (args.model, args.weights, args.data, args.labels, args.limit, args.layers,
            args.seed, args.output) == ("resnet18", "w.pt", "imgs", "l.csv", 4, "layer4", 3,
                                        "head.pt")
    assert parse(lcam).model == "efficientnet-lite0" and parse(lcam).layers == "last"
    recorded = command_line(args)
    assert "--output head.pt" in recorded and "--layer layer4" in recorded
    assert "--out " not in recorded and "--layers" not in recorded
    assert "the following arguments are required: --data" in parse_error(
        ["train", "lcam", "--variant", "fm", "--epochs", "1", "--output", "h.pt"], capsys)
    assert "argument --limit: '0': must be at least 1" in parse_error([*lcam, "--limit", "0"],
                                                                       capsys)

    similarity = COMMANDS["similarity"][0]
    args = parse(similarity)
    assert (args.model, args.data, args.limit, args.layers, args.device, args.seed) == \
        ("digits-vgg", "digits", 500, "all", "cpu", 0)
    args = parse([*similarity, "--layers", "features.relu1,features.relu5", "--device", "auto",
                  "--data", "imgs", "--labels", "l.csv", "--limit", "20", "--seed", "2"])
    assert (args.layers, args.device, args.data, args.labels, args.limit, args.seed) == \
        ("features.relu1,features.relu5", "auto", "imgs", "l.csv", 20, 2)

    mutual = COMMANDS["train mutual-transfer"][0]
    args = parse([*mutual, "--data", "cifar10", "--limit", "40", "--seed", "1",
                  "--lambdas", "-1,0.5"])
    assert (args.data, args.limit, args.seed, args.lambdas) == ("cifar10", 40, 1, "-1,0.5")
    for flag in ("--labels", "--model"):  # no such choice in this study: refused, not ignored
        assert f"unrecognized arguments: {flag}" in parse_error([*mutual, flag, "x"], capsys)


@pytest.mark.parametrize("argv,message", [
    (["run", "--target", "3"], "--target 3: xbench run explains each image's predicted class"),
    (["explain", "photo.png", "--target", "label"], "--target label: xbench explain has no label"),
    (["explain", "photo.png", "--layer", "all"], "--layer all: xbench explain draws one layer"),
    (["leaderboard", "results", "--check", "--output", "x"], "--check compares"),
])
def test_values_a_command_cannot_use_are_refused_before_any_work(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_explain_passes_plugin_options_to_the_explainer(tmp_path, monkeypatch):
    from xbench.cli import explain

    made = {}
    original = explain._make

    def spy(kind, cls, options):
        made[kind] = dict(options)
        return original(kind, cls, options)

    monkeypatch.setattr(explain, "_make", spy)
    image = next(path for name, path, _ in sample_images() if name == "coffee.png")
    output = tmp_path / "rise.png"
    assert main(["explain", str(image), "--explainer", "rise", "-o", "rise.n_masks=8",
                 "--seed", "5", "--output", str(output)]) == 0
    assert made["explainer"]["n_masks"] == 8 and made["explainer"]["seed"] == 5
    assert output.is_file()


def test_explain_names_the_option_a_plugin_refuses(capsys):
    image = next(path for name, path, _ in sample_images() if name == "coffee.png")
    assert main(["explain", str(image), "--explainer", "rise", "-o", "rise.n_masks=many"]) == 2
    assert "-o rise.n_masks=many: explainer 'rise': option n_masks expects" in \
        capsys.readouterr().err
    assert main(["explain", str(image), "-o", "rise.n_masks=8"]) == 2  # rise is not in use
    assert "'rise' is not a plugin this command uses (gradcam, efficientnet-lite0)" in \
        capsys.readouterr().err


def test_a_plugin_command_builds_the_same_flags():
    import argparse

    from xbench.cli.options import (XbenchParser, add_data_options, add_model_options,
                                    add_output_option, add_plugin_options, blocked_plugins)
    from xbench.commands import PluginCommand, add_commands

    def configure(parser):
        add_model_options(parser, dtype=False)
        add_data_options(parser, boxes=False)
        add_plugin_options(parser)
        add_output_option(parser, "folder to write", metavar="FOLDER")

    parser = XbenchParser(prog="xbench")
    sub = parser.add_subparsers(dest="command")
    add_commands(sub, [PluginCommand(("demo", "study"), "a study", configure, lambda a: 0, "demo")],
                 ["demo", "study"])
    args = parser.parse_args(["demo", "study", "--model", "m", "--data", "d", "--limit", "2",
                              "-o", "m.key=1", "--output", "out", "-p", "no:x"])
    assert (args.model, args.data, args.limit, args.options, args.output) == \
        ("m", "d", 2, ["m.key=1"], "out")
    assert blocked_plugins(args) == ["x"]
    assert not hasattr(args, "dtype") and not hasattr(args, "boxes")
    assert isinstance(args, argparse.Namespace)


def test_the_shared_choices_are_the_runners():
    from xbench.cli.options import DTYPE_CHOICES, ENGINE_CHOICES, TARGET_RULES
    from xbench.engine import ENGINES
    from xbench.runner import DTYPES
    from xbench.runner import TARGET_RULES as RULES

    assert set(DTYPE_CHOICES) == set(DTYPES) and tuple(ENGINE_CHOICES) == tuple(ENGINES)
    assert tuple(TARGET_RULES) == tuple(RULES)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_groups_defaults_and_examples(command):
    from xbench.cli import build_parser

    argv, _ = COMMANDS[command]
    parser = build_parser(argv)
    words = command.split()
    for word in words:
        parser = next(action for action in parser._actions
                      if isinstance(action, __import__("argparse")._SubParsersAction)
                      ).choices[word]
    text = parser.format_help()
    assert "plugins:" in text and "examples:\n  xbench " in text
    assert "``" not in text and ":mod:" not in text
    undocumented = [action.dest for action in parser._actions if not action.help]
    assert undocumented == []
    if command in ("run", "explain", "report", *STUDIES):
        assert "(default: " in text and "output:" in text


def test_run_help_lists_the_installed_explainers_and_metrics(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    assert "installed explainers:" in out and "gradcam++" in out
    assert "faithfulness: average-drop" in out and "cost: " in out and "(default: 8)" in out
    for title in ("selection:", "model:", "data:", "explanation:", "plugins:", "output:"):
        assert title in out


# ----------------------------------------------------------------------- the console matrix
def _piped_matrix(width=100):
    import io
    from pathlib import Path

    from rich.console import Console

    from xbench import leaderboard
    from xbench.cli.matrix import print_matrix
    from xbench.records import RunFolder

    folder = RunFolder(Path(__file__).parents[1] / RUN_DIR)
    _, table = leaderboard.run_section(folder)
    buffer = io.StringIO()
    console = Console(file=buffer, width=width)  # a file: no terminal, no styles
    assert not console.is_terminal
    print_matrix(console, folder, table)
    return buffer.getvalue(), table


def test_piped_matrix_marks_the_best_and_the_ties_in_text():
    text, table = _piped_matrix()
    assert "\x1b[" not in text  # no escape codes: the marks are characters
    rows: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith("│   "):
            label, *cells = [cell.strip() for cell in line.strip("│").split("│")]
            rows.setdefault(label, []).extend(cells)
    for column, group in table.groupby("column"):
        direction = group.direction.iloc[0]
        label = f"{column} {'↓' if direction == 'lower' else '↑' if direction == 'higher' else ''}"
        cells = rows[label.strip()]
        assert sum(cell.endswith(" *") for cell in cells) == int(group.best.sum())
        assert sum(cell.endswith(" ≈") for cell in cells) == int(group.tied_with_best.sum())
    assert "* best of the line; ≈ tied with the best" in text


def test_piped_matrix_groups_lines_by_family_and_keeps_the_title_whole():
    text, table = _piped_matrix(width=60)
    lines = text.splitlines()
    assert lines[0] == "reference_efficientnet-lite0_sample_quick"
    families = [line.strip("│ ").split()[0] for line in lines
                if line.startswith("│ ") and not line.startswith("│  ")]
    first_table = families[:families.index("diagnostics") + 1]
    assert first_table == ["faithfulness", "complexity", "cost", "diagnostics"]
    block = lines[lines.index(next(l for l in lines if l.startswith("│ cost"))):]
    cost_rows = [l for l in block[:4] if l.startswith("│   ")]
    assert [l.split("│")[1].strip() for l in cost_rows] == ["backward-passes ↓",
                                                            "forward-passes ↓", "time ↓"]
    assert max(map(len, lines)) <= 60


def test_one_number_format_per_line():
    import re

    from xbench.cli.matrix import number_format

    assert [number_format([1.0, 0.0, 500.0])(v) for v in (1.0, 0.0, 500.0)] == ["1", "0", "500"]
    assert [number_format([1.0, 0.0, 500.5])(v) for v in (1.0, 0.0, 500.5)] == \
        ["1.0", "0.0", "500.5"]
    assert [number_format([0.5, 0.0123])(v) for v in (0.5, 0.0123)] == ["0.500", "0.012"]
    assert number_format([0.0123, 0.004])(0.004) == "0.0040"
    assert number_format([float("nan"), 2.5])(float("nan")) == "–"
    text, _ = _piped_matrix()
    decimals: dict[str, set[int]] = {}
    for line in text.splitlines():
        if line.startswith("│   "):
            label, *cells = [cell.strip() for cell in line.strip("│").split("│")]
            for cell in cells:
                number = re.match(r"-?\d+(?:\.(\d+))?", cell)
                if number:
                    decimals.setdefault(label, set()).add(len(number.group(1) or ""))
    assert decimals and all(len(found) == 1 for found in decimals.values()), decimals


def test_degenerate_maps_are_named_under_the_table():
    from xbench.cli.matrix import degenerate_note

    _, table = _piped_matrix()
    assert degenerate_note(table).endswith(": none")
    table = table.copy()
    table.loc[table.explainer == "scorecam", "degenerate"] = 2
    images = int(table[table.explainer == "scorecam"].images.max())
    assert f"scorecam 2 of {images} images" in degenerate_note(table)
    assert "gradcam" not in degenerate_note(table)
