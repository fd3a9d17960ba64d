"""``xbench plot curves``: mean curves from rows written with RunFolder, and a PNG that decodes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from xbench.cli import main
from xbench.curves import mean_curves
from xbench.errors import UserError
from xbench.records import SCHEMA_VERSION, ResultRow, RunFolder, RunHeader


def header(name: str = "toy-run") -> RunHeader:
    return RunHeader(schema_version=SCHEMA_VERSION, run_name=name, xbench_version="0.1.0",
                     protocol="1", profile="quick", config={}, model={"name": "toy"},
                     dataset={"name": "toy"}, environment={}, plugins={}, units_total=1)


def row(explainer, metric, curve, value=None, image="a.png", layer="body", variant="step=4",
        status="ok") -> ResultRow:
    if value is None and curve is not None:
        value = (sum(curve) - (curve[0] + curve[-1]) / 2) / (len(curve) - 1)
    return ResultRow(run="toy-run", image=image, index=0, label=None, predicted=0, target=0,
                     explainer=explainer, explainer_variant="", layer=layer, metric=metric,
                     variant=variant, direction="higher" if metric == "insertion" else "lower",
                     value=value, status=status, curve=tuple(curve) if curve else None)


def write_run(path, rows) -> RunFolder:
    folder = RunFolder(path)
    folder.path.mkdir(parents=True)
    folder.write_header(header())
    folder.append_unit("unit-0", rows)
    return folder


ROWS = [
    row("gradcam", "insertion", [0.1, 0.5, 0.9], image="a.png"),
    row("gradcam", "insertion", [0.3, 0.7, 0.9], image="b.png"),
    row("gradcam", "deletion", [0.9, 0.2, 0.1], image="a.png"),
    row("gradcam", "deletion", [0.9, 0.4, 0.1], image="b.png"),
    row("rise", "insertion", [0.2, 0.2, 0.9], layer="-"),
    row("rise", "deletion", [0.9, 0.8, 0.1], layer="-"),
    row("gradcam", "average-drop", None, value=12.0, variant="r=100%"),
    row("rise", "insertion", None, status="failed", layer="-", image="b.png"),
]


def test_mean_curves_by_hand(tmp_path):
    folder = write_run(tmp_path / "run", ROWS)
    curves = {(c.metric, c.label): c for c in mean_curves(folder.rows())}
    assert set(curves) == {("insertion", "gradcam"), ("deletion", "gradcam"),
                           ("insertion", "rise"), ("deletion", "rise")}
    np.testing.assert_allclose(curves[("insertion", "gradcam")].curve, [0.2, 0.6, 0.9])
    np.testing.assert_allclose(curves[("deletion", "gradcam")].curve, [0.9, 0.3, 0.1])
    # AUCs (.5 + .3 .. ) : a: (1.5 - .5)/2 = .5, b: (1.9 - .6)/2 = .65 -> mean .575
    assert curves[("insertion", "gradcam")].auc == pytest.approx(0.575)
    assert curves[("insertion", "gradcam")].images == 2
    assert curves[("insertion", "rise")].images == 1  # the failed row is left out


def test_explainer_at_several_layers_is_labelled_with_the_layer(tmp_path):
    rows = [row("gradcam", "insertion", [0.1, 0.9], layer=layer) for layer in ("l3", "l4")]
    curves = mean_curves(write_run(tmp_path / "run", rows).rows())
    assert sorted(c.label for c in curves) == ["gradcam@l3", "gradcam@l4"]


def test_plot_curves_writes_a_png(tmp_path):
    write_run(tmp_path / "run", ROWS)
    output = tmp_path / "figures" / "curves.png"
    assert main(["plot", "curves", str(tmp_path / "run"), "--output", str(output)]) == 0
    with Image.open(output) as image:
        image.load()
        assert image.format == "PNG"
        assert image.size == (1100, 450)
        pixels = np.asarray(image.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10  # lines and text, not blank


def test_default_output_is_in_the_run_folder(tmp_path):
    write_run(tmp_path / "run", ROWS)
    assert main(["plot", "curves", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "curves.png").stat().st_size > 0


def test_several_variants_need_a_choice(tmp_path, capsys):
    rows = ROWS + [row("gradcam", "insertion", [0.1, 0.4, 0.6, 0.9], variant="step=3")]
    folder = write_run(tmp_path / "run", rows)
    with pytest.raises(UserError, match="several variants.*--variant"):
        mean_curves(folder.rows())
    chosen = mean_curves(folder.rows(), "step=3")
    assert [(c.metric, len(c.curve)) for c in chosen] == [("insertion", 4)]
    assert main(["plot", "curves", str(tmp_path / "run"), "--variant", "step=9"]) == 2
    assert "step=9" in stderr(capsys)


def stderr(capsys) -> str:
    return " ".join(capsys.readouterr().err.split())  # rich wraps long lines


def test_errors_name_what_to_do(tmp_path, capsys):
    assert main(["plot", "curves", str(tmp_path / "missing")]) == 2
    assert "not a run folder" in stderr(capsys)
    write_run(tmp_path / "scalar", [row("gradcam", "average-drop", None, value=1.0)])
    assert main(["plot", "curves", str(tmp_path / "scalar")]) == 2
    assert "--metrics insertion,deletion" in stderr(capsys)
