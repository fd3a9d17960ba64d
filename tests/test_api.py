"""xbench.api: the notebook entry points agree with the runner and the explainers they wrap."""

from __future__ import annotations

import pytest
import torch

import xbench
from xbench.errors import UserError
from xbench.saliency import normalize_maps
from xbench.testing import TOY_SIZE, toy_images, toy_model
from xbench_plugins.gradcam import GradCAM


@pytest.fixture(scope="module")
def images():
    return toy_images(batch=3, seed=1, size=TOY_SIZE)


@pytest.fixture(scope="module")
def frame(images):
    return xbench.run(toy_model(), images, labels=[1, 2, 3], explainers="gradcam,rise",
                      metrics="average-drop,forward-passes", options={"rise.n_masks": 16},
                      engine="eager")


def test_run_returns_every_record_of_the_matrix(frame):
    scored = frame[frame.explainer != ""]
    # 3 images x (gradcam: 3 AD retentions + 1 pass count; rise: the same)
    assert len(scored) == 3 * 2 * 4 and (scored.status == "ok").all()
    assert set(scored.column) == {"average-drop@r=100%", "average-drop@r=50%",
                                  "average-drop@r=15%", "forward-passes"}
    passes = scored[scored.metric == "forward-passes"].groupby("explainer").value.first()
    assert passes["gradcam"] == 1 and passes["rise"] == 16  # the options reached the plugin
    clean = frame[frame.metric == "confidence"]
    assert sorted(clean.label) == [1, 2, 3] and frame.attrs["header"]["model"]["name"] == "toy-cnn"
    assert frame.attrs["folder"] is None  # no out=: records were read and removed


def test_tensor_data_equals_the_same_pictures_as_files(frame, images, tmp_path):
    from PIL import Image

    folder = tmp_path / "tensors"
    folder.mkdir()
    pixels = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i, array in enumerate(pixels):
        Image.fromarray(array).save(folder / f"image{i:05d}.png")
    (folder / "labels.csv").write_text("file,label\nimage00000.png,1\nimage00001.png,2\n"
                                       "image00002.png,3\n")
    from_files = xbench.run(toy_model(), folder, explainers="gradcam,rise",
                            metrics="average-drop,forward-passes",
                            options=["rise.n_masks=16"], engine="eager", out=tmp_path / "out")
    key = ["image", "explainer", "column"]
    a = frame.sort_values(key).reset_index(drop=True)
    b = from_files.sort_values(key).reset_index(drop=True)
    assert a[key + ["value"]].equals(b[key + ["value"]])
    assert (tmp_path / "out" / from_files.attrs["header"]["run_name"] / "rows.jsonl").is_file()


def test_a_plain_module_with_its_preprocessing(images):
    handle = toy_model()
    frame = xbench.run(handle.net, images[:1], explainers="gradcam", metrics="forward-passes",
                       engine="eager", preprocessing=dict(input_size=TOY_SIZE, mean=(0.5,) * 3,
                                                          std=(0.25,) * 3, layer="head"))
    assert frame.attrs["header"]["model"]["name"] == "in-memory"
    assert frame[frame.metric == "forward-passes"].value.tolist() == [1.0]


def test_explain_equals_the_explainer_normalised_as_the_metrics_see_it(images):
    handle = toy_model()
    image = images[0]
    target = int(handle(image[None]).argmax())
    with torch.enable_grad():
        raw = GradCAM(layer="head").explain(handle, image[None], torch.tensor([target]))
    expected, _ = normalize_maps(raw, (TOY_SIZE, TOY_SIZE))
    got = xbench.explain(image, "gradcam", handle)
    assert got.shape == (TOY_SIZE, TOY_SIZE)
    torch.testing.assert_close(got, expected[0])
    other = xbench.explain(image, "gradcam", handle, target=(target + 1) % 10)
    assert not torch.allclose(other, got)  # the target reaches the explainer


@pytest.mark.parametrize("call, message", [
    (lambda: xbench.run(toy_model(), "sample", limits=2), "Did you mean 'limit'"),
    (lambda: xbench.run(torch.nn.Linear(2, 2)), "needs its preprocessing"),
    (lambda: xbench.run(toy_model(), torch.rand(2, 32, 32)), "shape (N, 3, H, W)"),
    (lambda: xbench.run(toy_model(), torch.rand(2, 3, 8, 8) * 2), "pixel space [0, 1]"),
    (lambda: xbench.explain(torch.rand(3, 8, 8), "gradcam", toy_model(), target=99),
     "class index in [0, 10)"),
    (lambda: xbench.explain("missing.jpg", "gradcam", toy_model()), "no such file"),
    (lambda: xbench.explain(torch.rand(3, 8, 8), "gradcamm", toy_model()), "gradcam"),
])
def test_bad_input_is_named(call, message):
    with pytest.raises(UserError) as info:
        call()
    assert message in str(info.value)
