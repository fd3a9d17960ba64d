"""Inference engines (xbench.engine): agreement with eager PyTorch, batching that never
changes a number, exact pass counts, clear errors, and how runs choose and record them."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from conftest import write_images

from xbench.engine import InferenceEngine, auto_engine, build_engine
from xbench.errors import UserError
from xbench.runner import RunConfig, Runner
from xbench.testing import toy_images, toy_model

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "imgs"
    write_images(folder, [f"im{i}.png" for i in range(5)], size=36)
    return folder


def test_onnxruntime_agrees_with_eager_and_batching_changes_nothing():
    model = toy_model(seed=3)
    images = toy_images(11, seed=4)
    eager = model.predict(images)
    engine = model.use_engine("onnxruntime", batch_size=4)
    assert model.engine == "onnxruntime" and model.engine_batch_size == 4
    assert engine.max_logit_difference < 1e-4
    with model.counting() as counts:
        logits = model.predict(images)  # calls of 4 + 4 + 3 rows
    assert counts["forward"] == 11  # passes are the rows asked for
    torch.testing.assert_close(logits, eager, atol=1e-4, rtol=1e-4)
    # every row depends on its own input only: alone, in a full or a short batch, bit for bit
    for i in (0, 5, 10):
        assert torch.equal(model.predict(images[i:i + 1])[0], logits[i])
    assert torch.equal(model.predict(images[3:7]), logits[3:7])
    probs = model.probabilities(images, batch_size=5)  # the engine's batch size wins
    torch.testing.assert_close(probs, logits.softmax(dim=1), atol=0, rtol=0)


def test_compiled_engine_agrees_with_eager():
    pytest.importorskip("torch._inductor")
    model = toy_model(seed=1)
    images = toy_images(5, seed=2)
    eager = model.predict(images)
    try:
        model.use_engine("compiled", batch_size=4)
    except UserError as exc:  # no C++ compiler on this machine: the error says what to do
        assert "--engine compiled" in str(exc) and "--engine eager" in str(exc)
        pytest.skip(str(exc))
    torch.testing.assert_close(model.predict(images), eager, atol=1e-4, rtol=1e-4)  # 4 + 1 padded


class _Unexportable(nn.Module):
    """Runs eagerly, but ONNX has no FFT operator for the exporter to map it to."""

    def forward(self, x):
        return torch.fft.rfft2(x).abs().flatten(1)[:, :10]


def test_engine_errors_name_the_engine_and_the_way_out():
    with pytest.raises(UserError, match="--engine onnxruntime: cannot run the model.*"
                                        "--engine eager"):
        build_engine("onnxruntime", _Unexportable(), 2, (3, 8, 8), torch.device("cpu"),
                     torch.contiguous_format)
    with pytest.raises(UserError, match="CPU only.*--engine compiled or eager"):
        build_engine("onnxruntime", _Unexportable(), 2, (3, 8, 8), torch.device("cuda"),
                     torch.contiguous_format)

    class Wrong(InferenceEngine):
        name = "wrong"

        def _build(self, net, probe):
            return lambda x: net(x) + 1.0

    with pytest.raises(UserError, match="--engine wrong: its logits differ from eager"):
        Wrong(toy_model().net, 2, (3, 32, 32), torch.device("cpu"))


def test_auto_picks_onnxruntime_only_for_fp32_on_cpu(images, toy_registry):
    assert auto_engine(torch.device("cpu"), "fp32")[0] == "onnxruntime"
    assert auto_engine(torch.device("cpu"), "bf16")[0] == "eager"
    assert auto_engine(torch.device("cuda"), "fp32")[0] == "eager"
    with pytest.raises(UserError, match="--engine onnxruntime runs fp32 forwards, not --dtype "
                                        "bf16: use --engine eager or compiled"):
        Runner(_config(images, engine="onnxruntime", dtype="bf16"), toy_registry, images)
    with pytest.raises(UserError, match="--engine 'fast': choose one of auto, eager"):
        Runner(_config(images, engine="fast"), toy_registry, images)


def _config(images, **changes):
    base = dict(explainers="scorecam,gradcam", metrics="average-drop,insertion,forward-passes",
                model="toy-cnn", data=str(images), batch_size=3, profile="paper",
                options=("insertion.step=64",))
    return RunConfig(**{**base, **changes})


def _values(folder):
    return {(r.image, r.explainer, r.metric, r.variant): r.value for r in folder.rows()}


def test_runs_record_the_engine_and_agree_across_engines(tmp_path, images, toy_registry):
    auto = Runner(_config(images), toy_registry, tmp_path, name="auto").run()
    eager = Runner(_config(images, engine="eager"), toy_registry, tmp_path, name="eager").run()
    engine = auto.folder.header().environment["engine"]
    assert engine["name"] == "onnxruntime" and engine["reason"].startswith("auto")
    assert {r.engine for r in auto.folder.rows()} == {"onnxruntime"}
    assert {r.engine for r in eager.folder.rows()} == {"eager"}
    a, e = _values(auto.folder), _values(eager.folder)
    assert a.keys() == e.keys()
    for key, value in a.items():  # float rounding of the logits, nothing more
        assert value == pytest.approx(e[key], abs=1e-4), key
    # the same command twice: identical rows with the engine too
    again = Runner(_config(images), toy_registry, tmp_path, name="again").run()
    assert _values(again.folder) == a


def test_auto_falls_back_to_eager_with_the_reason(tmp_path, images, toy_registry, monkeypatch):
    def failing(*args, **kwargs):
        raise UserError("--engine onnxruntime: cannot run the model (boom)")

    monkeypatch.setattr("xbench.model.build_engine", failing)
    summary = Runner(_config(images, explainers="gradcam"), toy_registry, tmp_path).run()
    engine = summary.folder.header().environment["engine"]
    assert engine["name"] == "eager" and "onnxruntime failed" in engine["reason"]
    assert {r.engine for r in summary.folder.rows()} == {"eager"}
    with pytest.raises(UserError, match="cannot run the model"):  # asked for by name: an error
        Runner(_config(images, explainers="gradcam", engine="onnxruntime"), toy_registry,
               tmp_path, name="named").run()


def test_resume_with_another_engine_is_refused(tmp_path, images, toy_registry):
    Runner(_config(images, explainers="gradcam"), toy_registry, tmp_path, name="r").run()
    with pytest.raises(UserError, match="different settings.*engine"):
        Runner(_config(images, explainers="gradcam", engine="eager"), toy_registry, tmp_path,
               name="r").run(resume=True)
    # a run from before engines existed ran eager: resuming it eagerly is allowed
    header = tmp_path / "r" / "run.json"
    data = json.loads(header.read_text())
    del data["config"]["engine"], data["environment"]["engine"]
    header.write_text(json.dumps(data))
    Runner(_config(images, explainers="gradcam", engine="eager"), toy_registry, tmp_path,
           name="r").run(resume=True)


def _count_engine_calls(model) -> list[int]:
    engine, calls = model._engine, []
    run = engine._run
    engine._run = lambda chunk: (calls.append(len(chunk)), run(chunk))[1]
    return calls


def test_insertion_deletion_and_rise_fill_whole_engine_batches():
    from xbench import MetricBatch
    from xbench.saliency import normalize_maps
    from xbench_plugins.insertion_deletion import Insertion
    from xbench_plugins.rise import RISE

    model = toy_model(seed=0)
    model.use_engine("onnxruntime", batch_size=4)
    calls = _count_engine_calls(model)
    images = toy_images(1, seed=5)
    saliency, degenerate = normalize_maps(torch.rand(1, 4, 4), (32, 32))
    probs = model.probabilities(images)
    targets = probs.argmax(dim=1)
    calls.clear()
    with model.counting() as counts:
        Insertion(step=64).score(MetricBatch(
            model=model, images=images, targets=targets, saliency=saliency,
            degenerate=degenerate, clean_probs=probs[0, targets], explain_forward=None,
            explain_backward=None, explain_seconds=None))
    rows = 2 * (32 * 32 // 64 + 1)  # deletion and insertion, 17 points each
    assert counts["forward"] == rows
    assert len(calls) == -(-rows // 4)  # 9 engine calls: all full but the last

    rise = RISE(n_masks=8, seed=0)
    rise.prepare(model, (3, 32, 32))
    images = toy_images(3, seed=6)
    calls.clear()
    with model.counting() as counts, torch.no_grad():
        rise.explain(model, images, model.probabilities(images).argmax(dim=1))
    assert counts["forward"] == 3 * 8 + 3  # + the 3 forwards that chose the targets
    assert len(calls) == 1 + 3 * 8 // 4  # 1 for the targets, then 6 full batches, no padding
