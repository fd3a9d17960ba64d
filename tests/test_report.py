"""The HTML run report: content derived from the records, and the page in headless Chromium."""

from __future__ import annotations

import base64
import io
import re
import shutil
import tempfile
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import xbench
from conftest import _toy_plugin, write_images
from xbench import leaderboard
from xbench.cli import main
from xbench.errors import UserError
from xbench.plugins import build_registry
from xbench.records import RunFolder
from xbench.report import (GalleryImage, model_class_names, overlay, render, sample_gallery,
                           write_report)
from xbench.runner import RunConfig, Runner

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
EXPLAINERS = ["constant", "gradcam", "layercam"]
METRICS = "insertion,deletion,average-drop,forward-passes,backward-passes,time"


class _Constant(xbench.Explainer):
    """A degenerate explainer: the same value everywhere (scored as the all-zero map)."""

    name = "constant"
    needs_gradients = False
    uses_layer = False

    def explain(self, model, images, targets):
        return torch.ones(len(images), 4, 4, device=images.device)


def _registry():
    @xbench.hookimpl
    def register_explainers(register):
        register(_Constant)

    return build_registry(extra_plugins=[
        ("toy", _toy_plugin()),
        ("constant", types.SimpleNamespace(register_explainers=register_explainers))])


def _images(folder: Path) -> Path:
    write_images(folder, [f"im{i}.png" for i in range(4)], size=36)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder.parent / "labels.csv").write_text(
        "file,label\n" + "".join(f"im{i}.png,{i}\n" for i in range(4)) + "broken.png,1\n")
    return folder


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> RunFolder:
    """4 readable toy images and 1 broken file; a degenerate explainer, Grad-CAM and LayerCAM;
    curves, Average Drop and cost metrics (coarse insertion/deletion steps: fast)."""
    root = tmp_path_factory.mktemp("report")
    images = _images(root / "imgs")
    config = RunConfig(explainers=",".join(EXPLAINERS), metrics=METRICS, model="toy-cnn",
                       data=str(images), labels=str(root / "labels.csv"), batch_size=2,
                       device="cpu", channels_last=False,
                       options=("insertion.step=128", "deletion.step=128"))
    return Runner(config, _registry(), root / "out").run().folder


@pytest.fixture(scope="module")
def tiny_page(tiny_run, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("page") / "report.html"
    return write_report(tiny_run.path, output, page_size=2, registry=_registry())


def _matrix(run: RunFolder):
    return leaderboard.matrix(leaderboard.run_frame(run), seed=0)


def _decoded_images(page: str) -> dict[str, Image.Image]:
    found = re.findall(r'alt="([^"]*)" src="data:image/png;base64,([^"]+)"', page)
    return {alt: Image.open(io.BytesIO(base64.b64decode(data))) for alt, data in found}


# -- content (no browser) ------------------------------------------------------------------


def test_page_is_self_contained(tiny_page):
    page = tiny_page.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "Content-Security-Policy" in page
    # nothing to fetch: no external src/href, all pictures inline, assets inlined
    assert not re.search(r'(src|href)="(?!data:image/png;base64,)', page)
    assert "<link" not in page and "function sortTable" in page and ".gallery-row" in page
    pictures = _decoded_images(page)
    assert pictures and all(p.format == "PNG" and p.width > 0 for p in pictures.values())


def test_matrix_cells_hold_the_recorded_means(tiny_run, tiny_page):
    page = tiny_page.read_text(encoding="utf-8")
    table = _matrix(tiny_run)
    body = page.split('<table id="leaderboard"', 1)[1].split("</table>", 1)[0]
    rows = re.findall(r'<tr data-explainer="([^"]+)"[^>]*>(.*?)</tr>', body)
    assert [name for name, _ in rows] == EXPLAINERS
    columns = re.findall(r'<th data-column="([^"]+)"', body)
    assert columns == leaderboard.column_order(table)
    assert any(arrow in body for arrow in ("↑", "↓"))
    for name, cells in rows:
        values = [float(v) for v in re.findall(r'data-value="([^"]*)"', cells)]
        expected = table[table.explainer == name].set_index("column")
        for column, value in zip(columns, values, strict=True):
            key = "median" if column == "time" else "mean"
            assert value == pytest.approx(expected.loc[column, key], rel=1e-12)
    # columns grouped by metric family under a header row of family names (spans add up)
    families = re.findall(r'<th class="family" colspan="(\d+)">([^<]*)</th>', body)[1:]
    assert [name for _, name in families] == ["faithfulness", "cost"]
    assert sum(int(span) for span, _ in families) == len(columns)
    assert list(table.drop_duplicates("column").set_index("column").loc[columns].family) == (
        ["faithfulness"] * int(families[0][0]) + ["cost"] * int(families[1][0]))
    # Grad-CAM costs 1 forward + 1 backward per image (docs/protocol.md "Cost")
    gradcam = table[(table.explainer == "gradcam") & (table.column == "forward-passes")]
    assert float(gradcam["mean"].iloc[0]) == 1.0


def test_gallery_shows_every_explainer_with_scores_and_classes(tiny_run, tiny_page):
    page = tiny_page.read_text(encoding="utf-8")
    lines = re.findall(r'<div class="gallery-row" data-page="(\d+)" data-image="([^"]+)">', page)
    assert lines == [("0", "im0.png"), ("0", "im1.png"), ("1", "im2.png"), ("1", "im3.png")]
    pictures = _decoded_images(page)
    for image in ("im0.png", "im1.png", "im2.png", "im3.png"):
        assert pictures[f"input {image}"].size == (176, 176)
        for explainer in EXPLAINERS:
            assert pictures[f"{explainer} on {image}"].size == (176, 176)
    # the toy model's class names, with the index; the per-image insertion score is shown
    rows = [r for r in tiny_run.rows() if r.image == "im2.png"]
    image_row = next(r for r in rows if r.explainer == "")
    assert "true: class2 (2)" in page
    assert f"predicted: class{image_row.predicted} ({image_row.predicted})" in page
    insertion = next(r for r in rows if r.explainer == "gradcam" and r.metric == "insertion")
    line = page.split('data-image="im2.png"', 1)[1].split('<div class="gallery-row"', 1)[0]
    gradcam = line.split("<b>gradcam</b>", 1)[1].split("</figure>", 1)[0]
    assert f"<td>{leaderboard.format_number(insertion.value)}</td>" in gradcam
    # the degenerate explainer is flagged on its overlay
    constant = line.split("<b>constant</b>", 1)[1].split("</figure>", 1)[0]
    assert "degenerate" in constant and "degenerate" not in gradcam


def test_failures_and_degenerate_maps_are_listed_with_file_names(tiny_run, tiny_page):
    page = tiny_page.read_text(encoding="utf-8")
    failures = page.split('<table id="failures"', 1)[1].split("</table>", 1)[0]
    broken = str(Path(tiny_run.header().dataset["root"]) / "broken.png")
    assert broken in failures and "cannot read" in failures
    degenerate = page.split('<table id="degenerate"', 1)[1].split("</table>", 1)[0]
    assert degenerate.count("<tr>") == 1 + 4  # header + the 4 readable images
    assert "constant" in degenerate and "gradcam" not in degenerate
    assert str(Path(tiny_run.header().dataset["root"]) / "im3.png") in degenerate


def test_curves_and_cost_plots_are_embedded(tiny_page):
    pictures = _decoded_images(tiny_page.read_text(encoding="utf-8"))
    assert "mean curves step=128" in pictures  # insertion.step=128 -> variant step=128
    for explainer in EXPLAINERS:
        assert f"curves {explainer} step=128" in pictures
    assert pictures["cost per explainer"].width > 300
    assert "layer sweep" not in pictures  # a single layer: no sweep plot


def test_layer_sweep_plot_when_the_run_has_several_layers(tmp_path):
    images = _images(tmp_path / "imgs")
    config = RunConfig(explainers="gradcam", metrics="insertion-deletion", model="toy-cnn",
                       data=str(images), labels=str(tmp_path / "labels.csv"), limit=2,
                       batch_size=2, device="cpu", channels_last=False, layers="block,head",
                       options=("insertion-deletion.step=256",))
    folder = Runner(config, _registry(), tmp_path / "out").run().folder
    page = render(folder)
    assert "<h2>Layer sweep</h2>" in page
    assert _decoded_images(page)["layer sweep"].width > 300
    body = page.split('<table id="leaderboard"', 1)[1].split("</table>", 1)[0]
    assert re.findall(r'data-layer="([^"]+)"', body) == ["block", "head"]


def test_missing_input_files_still_give_overlays(tiny_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(tiny_run.path, copy)
    header = (copy / "run.json").read_text().replace(tiny_run.header().config["data"],
                                                      str(tmp_path / "gone"))
    (copy / "run.json").write_text(header)
    pictures = _decoded_images(render(RunFolder(copy)))
    assert "input im0.png (file not available)" in pictures
    assert pictures["gradcam on im0.png"].size == (176, 176)


def test_a_run_without_map_previews_says_so(tiny_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(tiny_run.path, copy, ignore=shutil.ignore_patterns("maps"))
    page = render(RunFolder(copy))
    assert "kept no map previews" in page and "kept no map previews" not in render(tiny_run)
    assert "gradcam on im0.png: no map" in _decoded_images(page)


def test_an_interrupted_run_is_flagged_incomplete(tiny_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(tiny_run.path, copy)
    progress = (copy / "progress.jsonl").read_text().splitlines(keepends=True)
    (copy / "progress.jsonl").write_text("".join(progress[:2]))  # data unit + one explainer
    page = render(RunFolder(copy))
    total = tiny_run.header().units_total
    assert f"incomplete run: 2 of {total} units finished" in page
    assert "incomplete run" not in render(tiny_run)


def test_gallery_sample_is_seeded_capped_and_in_dataset_order():
    images = [GalleryImage(f"im{i}", i, None, 0, 0, 0.5, None) for i in range(30)]
    images.insert(3, GalleryImage("unreadable", 99, None, None, None, None, None))
    first = sample_gallery(images, 8, seed=0)
    assert len(first) == 8 and sample_gallery(images, 8, seed=0) == first
    assert [i.index for i in first] == sorted(i.index for i in first)
    assert sample_gallery(images, 8, seed=1) != first
    assert all(i.image != "unreadable" for i in sample_gallery(images, 100, seed=0))
    assert len(sample_gallery(images, 100, seed=0)) == 30


def test_overlay_blends_jet_half_over_the_input():
    black = np.zeros((8, 8, 3), np.uint8)
    white = np.full((8, 8, 3), 255, np.uint8)
    hot, cold = np.full((4, 4), 255, np.uint8), np.zeros((4, 4), np.uint8)

    def pixel(png: bytes) -> tuple[int, ...]:
        array = np.asarray(Image.open(io.BytesIO(png)))
        assert array.shape == (12, 12, 3) and (array == array[0, 0]).all()
        return tuple(int(v) for v in array[0, 0])

    # jet(1) = (0.5, 0, 0), jet(0) = (0, 0, 0.5); blended 50% with the input
    assert pixel(overlay(black, hot, size=12)) == (64, 0, 0)
    assert pixel(overlay(white, cold, size=12)) == (128, 128, 191)
    assert pixel(overlay(None, hot, size=12)) == (128, 0, 0)


def test_class_names_come_from_the_model_or_are_indices(tiny_run):
    header = tiny_run.header()
    assert model_class_names(header, _registry()) == tuple(f"class{i}" for i in range(10))
    assert model_class_names(header, build_registry()) is None  # toy-cnn not installed
    page = render(tiny_run, class_names=None)
    assert "true: 2<br>" in page and "class2" not in page


def test_bad_options_and_folders_are_user_errors(tiny_run, tmp_path):
    with pytest.raises(UserError, match="--max-images"):
        render(tiny_run, max_images=-1)
    with pytest.raises(UserError, match="not a run folder"):
        write_report(tmp_path)


def test_cli_report_and_run_report(tiny_run, tmp_path, monkeypatch, capsys):
    output = tmp_path / "r.html"
    assert main(["report", str(tiny_run.path), "--output", str(output), "--max-images", "1",
                 "--sample-seed", "3"]) == 0
    page = output.read_text(encoding="utf-8")
    assert page.count('<div class="gallery-row"') == 1 and "seed 3" in page
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "not a run folder" in capsys.readouterr().err
    # xbench run --report writes RUN_DIR/report.html after the run
    import xbench.cli.run as run_cli

    monkeypatch.setattr(run_cli, "build_registry", lambda blocked=(): _registry())
    images = _images(tmp_path / "imgs")
    code = main(["run", "--model", "toy-cnn", "--data", str(images), "--labels",
                 str(tmp_path / "labels.csv"), "--limit", "2", "--explainers", "gradcam",
                 "--metrics", "forward-passes", "--device", "cpu", "--output", str(tmp_path / "o"),
                 "--name", "r", "--report", "--no-leaderboard"])
    assert code == 0
    assert '<tr data-explainer="gradcam"' in (tmp_path / "o" / "r" / "report.html").read_text()


# -- the page in a real browser ------------------------------------------------------------


@pytest.fixture
def browser():
    """Headless Chromium through selenium, offline, with a fresh profile; skipped if absent."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip(f"headless Chromium not installed ({CHROMIUM}, {CHROMEDRIVER}): "
                    "apt-get install chromium chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    profile = tempfile.mkdtemp(prefix="xbench-chromium-")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
                 "--window-size=1400,1600"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _table_order(driver) -> list[str]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#leaderboard tbody tr'))"
        ".map(r => r.getAttribute('data-explainer'));")


def test_report_in_headless_chromium(browser, tiny_run, tiny_page, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(tiny_page.as_uri())
    assert browser.title == f"xbench report: {tiny_run.header().run_name}"
    # the table: one row per explainer, holding the recorded values
    table = _matrix(tiny_run)
    assert _table_order(browser) == EXPLAINERS
    cells = browser.execute_script(
        "const heads = Array.from(document.querySelectorAll('#leaderboard thead tr:last-child th'));"  # under the family row
        "const col = heads.findIndex(h => h.getAttribute('data-column') === 'insertion@step=128');"
        "return Array.from(document.querySelectorAll('#leaderboard tbody tr'))"
        ".map(r => parseFloat(r.cells[col].getAttribute('data-value')));")
    insertion = table[table.column == "insertion@step=128"].set_index("explainer")["mean"]
    assert cells == pytest.approx([insertion[e] for e in EXPLAINERS], rel=1e-12)
    # clicking a header sorts by that column (ascending, then descending)
    header = browser.find_element(By.CSS_SELECTOR, '#leaderboard th[data-column="insertion@step=128"]')
    header.click()
    ascending = sorted(EXPLAINERS, key=lambda e: insertion[e])
    assert _table_order(browser) == ascending and ascending != EXPLAINERS
    header.click()
    assert _table_order(browser) == ascending[::-1]
    browser.find_element(By.CSS_SELECTOR, "#leaderboard th.name").click()
    assert _table_order(browser) == sorted(EXPLAINERS)
    # every picture decodes; the gallery pages (2 images per page)
    sizes = browser.execute_script(
        "return Array.from(document.images).map(i => [i.complete, i.naturalWidth]);")
    assert len(sizes) >= 4 * (1 + len(EXPLAINERS)) + len(EXPLAINERS) + 2
    assert all(done and width > 0 for done, width in sizes)
    shown = lambda: [e.get_attribute("data-image") for e in  # noqa: E731
                     browser.find_elements(By.CSS_SELECTOR, ".gallery-row") if e.is_displayed()]
    assert shown() == ["im0.png", "im1.png"]
    browser.find_element(By.CSS_SELECTOR, ".pager .next").click()
    assert shown() == ["im2.png", "im3.png"]
    browser.find_element(By.CSS_SELECTOR, ".pager .all").click()
    assert len(shown()) == 4
    # no console errors (a blocked fetch or a script error would be SEVERE)
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []
    screenshot = tmp_path / "report.png"
    assert browser.save_screenshot(str(screenshot))
    assert Image.open(screenshot).size[0] > 0
