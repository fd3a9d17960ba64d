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
                 "--limit", "2", "--batch-size", "2", "--out", str(out)])
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
                 "--limit", "2", "--batch-size", "2", "--out", str(results)])
    assert code == 2
    assert "already holds a run. Use --resume" in capsys.readouterr().err
    code = main(["run", "--explainers", "gradcam", "--metrics", "average-drop,time",
                 "--limit", "2", "--batch-size", "2", "--out", str(results), "--resume"])
    assert code == 0
    assert "0 units computed, 2 already done" in capsys.readouterr().err


def test_explain_writes_an_overlay_png(tmp_path):
    image = next(path for name, path, _ in sample_images() if name == "coffee.png")
    output = tmp_path / "coffee_gradcam.png"
    assert main(["explain", str(image), "--explainer", "gradcam", "-o", str(output)]) == 0
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
