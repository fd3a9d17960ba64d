"""The core's progress display (xbench.progress) and in-memory image sets
(xbench.data.load_labelled_images), shared by the study commands."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

from xbench.data import ImageItem, load_labelled_images, open_dataset
from xbench.errors import UserError
from xbench.progress import Progress, unit_progress


def plain_console() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=False, width=200), buffer


def test_progress_logs_one_plain_line_per_tenth_when_not_a_terminal():
    console, buffer = plain_console()
    with Progress(console) as progress:
        bar = progress.bar("reading", total=20)
        for _ in range(20):
            bar.advance()
        quiet = progress.bar("batches", total=5, log=False)
        for _ in range(5):
            quiet.advance(status="loss 1.0")
    lines = buffer.getvalue().splitlines()
    assert [re.sub(r"^\d\d:\d\d:\d\d ", "", line) for line in lines] == [
        f"reading: {done}/20" for done in range(2, 21, 2)]


def test_progress_counts_a_jump_over_several_tenths_once():
    console, buffer = plain_console()
    with Progress(console) as progress:
        bar = progress.bar("caching", total=100)
        bar.advance(64)  # crosses 1..6 tenths: one line
        bar.update(completed=100)
    assert [line[9:] for line in buffer.getvalue().splitlines()] == [
        "caching: 64/100", "caching: 100/100"]


def test_progress_without_plain_lines_prints_nothing():
    console, buffer = plain_console()
    with Progress(console, plain_lines=False) as progress:
        progress.bar("x", total=3).advance(3)
    assert buffer.getvalue() == ""


def test_unit_progress_keeps_the_runner_contract(capsys):
    """``advance(running, amount)`` adds, ``completed=`` sets; nothing is drawn off a terminal."""
    with unit_progress(total=10, completed=2, description="run") as advance:
        advance("batch 0: gradcam", 3)
        advance("batch 1: images", completed=9)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def write_png(path: Path, rgb: tuple[int, int, int], size: tuple[int, int] = (12, 8)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), rgb, dtype=np.uint8)).save(path)


def test_labelled_images_are_read_exactly_as_uint8(tmp_path):
    write_png(tmp_path / "cat" / "a.png", (10, 200, 30))
    write_png(tmp_path / "dog" / "b.png", (255, 0, 128))
    write_png(tmp_path / "dog" / "c.png", (1, 2, 3), size=(40, 10))
    dataset = open_dataset(str(tmp_path))
    read = load_labelled_images(dataset.items, 8, 6, source="--data x")
    assert read.images.dtype == torch.uint8 and read.images.shape == (3, 3, 6, 6)
    assert read.labels.tolist() == [0, 1, 1]
    # a solid colour survives resize and crop unchanged
    for image, rgb in zip(read.images, [(10, 200, 30), (255, 0, 128), (1, 2, 3)]):
        assert image.flatten(1).unique(dim=1).tolist() == [[v] for v in rgb]
    assert read.unlabelled == 0 and read.unreadable == ()


def test_unreadable_files_fail_naming_the_file_or_are_skipped(tmp_path):
    write_png(tmp_path / "a.png", (5, 5, 5))
    (tmp_path / "broken.png").write_bytes(b"not an image")
    items = [ImageItem("a.png", tmp_path / "a.png", 3),
             ImageItem("broken.png", tmp_path / "broken.png", 1),
             ImageItem("nolabel.png", tmp_path / "a.png", None)]
    with pytest.raises(UserError, match=r"--data D: cannot read .*broken\.png"):
        load_labelled_images(items, 4, 4, source="--data D")
    read = load_labelled_images(items, 4, 4, source="--data D", skip_unreadable=True)
    assert read.labels.tolist() == [3] and read.images.shape == (1, 3, 4, 4)
    assert read.unlabelled == 1
    assert [Path(path).name for path, _ in read.unreadable] == ["broken.png"]


def test_no_labelled_image_is_an_error_before_reading(tmp_path):
    items = [ImageItem("a.png", tmp_path / "missing.png", None)]
    with pytest.raises(UserError, match="--data D: no labelled, readable images .*1 without a label"):
        load_labelled_images(items, 4, 4, source="--data D")


def test_reading_draws_a_bar(tmp_path):
    write_png(tmp_path / "a.png", (5, 5, 5))
    console, buffer = plain_console()
    with Progress(console) as progress:
        load_labelled_images([ImageItem("a.png", tmp_path / "a.png", 0)], 4, 4, source="--data D",
                             progress=progress)
    assert buffer.getvalue().splitlines()[-1].endswith("reading --data D: 1/1")
