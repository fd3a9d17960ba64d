"""The runner's three parts: the plan (pure, passes declared per plugin), the row kinds, the
dry run, and recomputed units of a committed reference run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from conftest import write_images
from xbench.base import MetricBatch, Passes
from xbench.errors import UserError
from xbench.plan import ModelFacts, RunConfig, RunPlan, RunSelection, combine
from xbench.records import ROW_KINDS, ResultRow, RunFolder, parse_row, row_kind
from xbench.runner import Runner
from xbench.testing import toy_images, toy_model

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "results" / "reference_efficientnet-lite0_sample_quick"
#: the toy CNN as a plan sees it, written by hand (no model is loaded)
TOY = ModelFacts(name="toy-cnn", input_size=32, default_layer="head",
                 block_layers=("block.1", "head"), channels={"block.1": 8, "head": 16},
                 layer_kinds={"head": "post-activation"})


def _config(data, **overrides) -> RunConfig:
    base = dict(model="toy-cnn", data=str(data), batch_size=2, device="cpu",
                channels_last=False)
    base.update(overrides)
    return RunConfig(**base)


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "imgs"
    write_images(folder, [f"im{i}.png" for i in range(5)], size=36)
    return folder


# -- the plan, without a model ------------------------------------------------------------------

def test_plan_lays_out_units_and_passes_from_hand_written_facts(tmp_path, images, toy_registry,
                                                                monkeypatch):
    import xbench.model

    def no_model(*args, **kwargs):
        raise AssertionError("the plan loaded a model")

    monkeypatch.setattr(xbench.model.ClassifierHandle, "__init__", no_model)
    config = _config(images, explainers="gradcam,rise,scorecam", layers="all",
                     metrics="average-drop,average-increase,forward-passes",
                     options=("rise.n_masks=8", "scorecam.max_channels=12"))
    plan = RunPlan.build(RunSelection(config, toy_registry, tmp_path), TOY)
    assert plan.layers == ("block.1", "head")
    assert [c.label for c in plan.cells] == ["gradcam @block.1", "gradcam @head", "rise",
                                             "scorecam @block.1", "scorecam @head"]
    passes = {c.label: c.passes for c in plan.cells}
    assert passes["gradcam @head"] == Passes(1, 1)
    assert passes["rise"] == Passes(8)
    # Score-CAM: 1 + min(K, max_channels), an upper bound (constant channels are skipped)
    assert passes["scorecam @block.1"] == Passes(1 + 8, bound="at most")
    assert passes["scorecam @head"] == Passes(1 + 12, bound="at most")
    # batches of 2, 2, 1: one data unit + 5 cells each, in the order they are written
    assert plan.units_total == 3 * 6 and plan.order[:3] == [
        "batch000000:data", "batch000000:gradcam:block.1", "batch000000:gradcam:head"]
    assert plan.order[-1] == "batch000002:scorecam:head"
    units = {u.id: u for u in plan.units}
    # AD and AI read the same 3 masked forwards: a unit pays them once
    assert units["batch000000:gradcam:head"].forward == 2 * (1 + 3)
    assert units["batch000000:gradcam:head"].backward == 2 * 1
    assert units["batch000002:rise:-"].forward == 1 * (8 + 3)
    assert units["batch000001:data"].forward == 2  # classify each image once
    assert units["batch000000:scorecam:head"].bound == "at most"
    forward, backward, unknown = plan.totals()
    assert unknown == 0 and backward == 5 * 2  # gradcam at two layers, 5 images
    assert forward == 5 * (1 + 2 * (1 + 3) + (8 + 3) + (9 + 3) + (13 + 3))


def test_undeclared_passes_are_unknown_not_guessed(tmp_path, images, toy_registry):
    import types

    import xbench
    from xbench.plugins import build_registry
    from conftest import _toy_plugin

    class Undeclared(xbench.Explainer):
        name = "undeclared"
        uses_layer = False

        def explain(self, model, images, targets):
            return images.mean(dim=1)

    @xbench.hookimpl
    def register_explainers(register):
        register(Undeclared)

    registry = build_registry(extra_plugins=[
        ("toy", _toy_plugin()), ("u", types.SimpleNamespace(register_explainers=register_explainers))])
    plan = RunPlan.build(RunSelection(_config(images, explainers="undeclared,gradcam",
                                              metrics="sparseness"), registry, tmp_path), TOY)
    assert plan.cells[0].passes is None
    units = {u.id: u for u in plan.units}
    assert units["batch000000:undeclared:-"].forward is None
    assert plan.totals() == (5 * (1 + 1), 5 * 1, 3)
    assert combine([Passes(1), None]) is None
    assert combine([Passes(3, shared="k"), Passes(3, shared="k"), Passes(2, 1)]) == Passes(5, 1)


# -- declared passes against the counted ones and against docs/protocol.md ----------------------

SMALL = ("rise.n_masks=6", "integrated-gradients.steps=3", "smoothgrad.samples=2",
         "occlusion.window=16", "occlusion.stride=8", "lime.samples=5", "ablation-cam.max_channels=5",
         "lime.segments=patches", "lime.patch=16")
MEASURED = ("gradcam,guided-gradcam,scorecam,rise,saliency,integrated-gradients,smoothgrad,"
            "deeplift,occlusion,lime,eigencam,ablation-cam,random")


@pytest.mark.slow
def test_planned_passes_equal_the_counted_passes_of_a_run(tmp_path, images, toy_registry):
    config = _config(images, explainers=MEASURED, metrics="forward-passes,backward-passes",
                     options=SMALL)
    runner = Runner(config, toy_registry, tmp_path / "out")
    plan = runner.plan()
    rows = list(runner.run().folder.rows())
    checked = 0
    for cell in plan.cells:
        assert cell.passes is not None, f"{cell.label}: no declared passes"
        for metric, declared in (("forward-passes", cell.passes.forward),
                                 ("backward-passes", cell.passes.backward)):
            counted = {r.value for r in rows if r.explainer == cell.explainer
                       and r.metric == metric}
            assert counted, cell.label
            if cell.passes.bound == "at most":
                assert max(counted) <= declared, (cell.label, metric, counted, declared)
            else:
                assert counted == {declared}, (cell.label, metric, counted, declared)
            checked += 1
    assert checked == 2 * 13
    # the toy's 16 channels at 'head' are never constant: Score-CAM meets its bound
    assert {r.value for r in rows if r.explainer == "scorecam"
            and r.metric == "forward-passes"} == {17.0}


def _metric_batch(model, batch=2):
    images = toy_images(batch)
    targets = torch.tensor([1, 4][:batch])
    saliency = torch.rand(batch, 32, 32, generator=torch.Generator().manual_seed(1))
    return MetricBatch(model=model, images=images, targets=targets, saliency=saliency,
                       degenerate=torch.zeros(batch, dtype=torch.bool),
                       clean_probs=model.probabilities(images).gather(1, targets[:, None])[:, 0],
                       explain_forward=None, explain_backward=None, explain_seconds=None)


@pytest.mark.parametrize("name, options", [
    ("average-drop", {}), ("average-increase", {"masking": "binary"}),
    ("insertion", {"step": 100}), ("deletion", {}), ("sparseness", {}),
    ("faithfulness-correlation", {"runs": 5, "subset_size": 16}), ("infidelity", {"samples": 3}),
    ("road-morf", {"percentages": (10.0, 50.0)}), ("road-lerf", {}),
])
def test_declared_metric_passes_equal_the_counted_ones(toy_registry, name, options):
    model = toy_model()
    cls = toy_registry.metric(name)
    metric = cls(**options)
    batch = _metric_batch(model)
    with model.counting() as counts:
        metric.score(batch)
    from xbench.base import PassFacts

    declared = cls.expected_passes(metric.options, PassFacts(batch_size=2, input_size=(32, 32)))
    assert (counts["forward"] / 2, counts["backward"] / 2) == (declared.forward, declared.backward)


def _protocol_formulas() -> dict[str, str]:
    """{explainer: "passes per image" cell} of docs/protocol.md's table, plus its sentence of
    expected counts for the CAM family."""
    text = (ROOT / "docs" / "protocol.md").read_text()
    out: dict[str, str] = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and re.search(r"\d|F", cells[3]) and cells[0].startswith("`"):
            for name in re.findall(r"`([^`]+)`", cells[0]):
                out[name] = cells[3]
    sentence = re.search(r"Expected counts per image: (.*?)\n\n", text, re.S).group(1)
    assert "Grad-CAM, Grad-CAM++, LayerCAM, guided backprop and relevance-cam\n1 forward + " \
           "1 backward" in sentence and "guided Grad-CAM 1 + 2" in sentence
    assert "Score-CAM 1 + K - skipped" in sentence and "RISE N" in sentence
    for name in ("gradcam", "gradcam++", "layercam", "guided-backprop", "relevance-cam"):
        out[name] = "1 F + 1 B"
    out.update({"guided-gradcam": "1 F + 2 B", "scorecam": "1 + K F", "rise": "N F"})
    return out


def _evaluate(formula: str, name: str, options, channels: int, size: int) -> tuple[float, float]:
    """A protocol cell ("steps F + steps B", "1 + windows F", "0") for these options."""
    if name == "eigencam":  # "1 F + 1 B (EigenCAM 1 F)"
        formula = "1 F"
    formula = re.sub(r"\(.*?\)", "", formula).strip()
    if formula == "0":
        return 0.0, 0.0
    symbols = {"K": channels, "N": getattr(options, "n_masks", None)}
    for key in ("steps", "samples"):
        if hasattr(options, key):
            symbols["steps" if key == "steps" else "n"] = getattr(options, key)
    if hasattr(options, "references"):  # deeplift-shap's n; expected-gradients' k draws
        symbols.setdefault("n", options.references)
        symbols["k"] = getattr(options, "samples", None)
    if hasattr(options, "window"):
        symbols["windows"] = ((size - options.window) // options.stride + 1) ** 2
    if hasattr(options, "n_segments"):
        symbols["segments"] = options.n_segments
    if getattr(options, "max_channels", None):
        symbols["K"] = min(channels, options.max_channels)
    formula = re.sub(r"(\d)([a-z])", r"\1*\2", formula.replace(" x ", "*"))  # 2n, n x segments
    totals = {"F": 0.0, "B": 0.0}
    for amount, letter in re.findall(r"((?:[\w*]+ \+ )?[\w*]+) ([FB])\b", formula):
        totals[letter] = float(eval(amount, {}, symbols))  # noqa: S307 - the doc's own formula
    return totals["F"], totals["B"]


@pytest.mark.parametrize("profile", ["paper", "quick"])
def test_declared_passes_follow_the_protocol_table(toy_registry, profile):
    from xbench.base import PassFacts
    from xbench.profiles import plugin_options

    formulas = _protocol_formulas()
    size, channels = 224, 1280
    checked = []
    for name in toy_registry.names("explainer"):
        cls = toy_registry.explainer(name)
        if name not in formulas:
            continue
        options = cls.make_options(plugin_options(profile, cls))
        facts = PassFacts(batch_size=8, input_size=(size, size),
                          layer="x" if cls.uses_layer else None,
                          channels=channels if cls.uses_layer else None)
        declared = cls.expected_passes(options, facts)
        assert declared is not None, f"{name}: the protocol states its passes; declare them"
        expected = _evaluate(formulas[name], name, options, channels, size)
        assert (declared.forward, declared.backward) == expected, (name, formulas[name])
        checked.append(name)
    assert len(checked) >= 25, checked


# -- row kinds ----------------------------------------------------------------------------------

def test_row_kind_derives_the_kind_of_rows_written_before_it_existed():
    old = {"status": "ok", "explainer": "", "metric": "confidence", "direction": "higher"}
    assert row_kind(old) == "confidence"
    assert row_kind({**old, "status": "failed"}) == "failure"
    assert row_kind({**old, "metric": "similarity-value"}) == "model-score"
    assert row_kind({**old, "explainer": "scorecam", "metric": "scorecam:skipped-channels",
                     "direction": ""}) == "diagnostic"
    assert row_kind({**old, "explainer": "gradcam", "metric": "average-drop",
                     "direction": "lower"}) == "score"
    assert row_kind({**old, "kind": "score"}) == "score"  # a written kind wins
    line = ROOT / "results" / "val50_quick" / "rows.jsonl"  # written before rows had a kind
    first = line.read_text().splitlines()[0]
    assert "kind" not in json.loads(first)
    row, problem = parse_row(first.encode())
    assert problem == "" and row.kind == "confidence" and row_kind(row) == "confidence"
    with pytest.raises(ValueError, match="row kind 'other'"):
        ResultRow(**{**json.loads(first), "kind": "other"})


def test_every_row_of_a_run_carries_its_kind(tmp_path, images, toy_registry):
    (images / "corrupt.png").write_bytes(b"not a png")
    config = _config(images, explainers="gradcam,scorecam", metrics="average-drop,sparseness",
                     options=("average-drop.retentions=0.5",))
    rows = list(Runner(config, toy_registry, tmp_path / "out").run().folder.rows())
    kinds = {r.kind for r in rows}
    assert kinds == {"confidence", "score", "diagnostic", "failure"} <= set(ROW_KINDS)
    for row in rows:
        # the kind written agrees with the derivation old readers use
        assert row_kind({k: v for k, v in row.__dict__.items() if k != "kind"}) == row.kind
    stored = [json.loads(line) for line in (tmp_path / "out").glob("*/rows.jsonl").__next__()
              .read_text().splitlines()]
    assert all("kind" in line for line in stored)


# -- dry run ------------------------------------------------------------------------------------

def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, images, toy_registry, monkeypatch,
                                                     capsys):
    from xbench.cli import main
    import xbench.cli.run as cli_run

    import xbench.plugins

    monkeypatch.setattr(cli_run, "build_registry", lambda blocked=(): toy_registry)
    monkeypatch.setattr(xbench.plugins, "build_registry", lambda blocked=(): toy_registry)
    out = tmp_path / "out"
    code = main(["run", "--model", "toy-cnn", "--data", str(images), "--device", "cpu",
                 "--batch-size", "2", "--explainers", "gradcam,rise", "-o", "rise.n_masks=8",
                 "--metrics", "average-drop,forward-passes", "--output", str(out), "--dry-run"])
    printed = capsys.readouterr().out
    assert code == 0 and not out.exists()
    assert "units: 9 (3 data + 3 x 2 explainer units)" in printed
    assert re.search(r"explainer gradcam @head\s+1 F \+ 1 B", printed)
    assert re.search(r"explainer rise\s+8 F", printed)
    assert re.search(r"metric\s+average-drop\s+3 F", printed)
    assert f"total: {5 * (1 + 1 + 3 + 8 + 3):g} forward + 5 backward passes" in printed
    seconds = re.search(r"estimated wall time: ([\d.e+-]+) (ms|s|min|h)", printed)
    assert seconds and float(seconds.group(1)) > 0


# -- the reference run's rows are unchanged --------------------------------------------------------

@pytest.mark.slow
def test_recomputed_units_of_the_reference_run_equal_its_rows(tmp_path):
    folder = RunFolder(REFERENCE)
    if not folder.exists():
        pytest.skip("reference run not present")
    from xbench.plugins import build_registry

    header = folder.header()
    stored = header.config
    config = RunConfig(**{**{k: v for k, v in stored.items()
                             if k in RunConfig.__dataclass_fields__},
                          "explainers": "gradcam", "metrics": ",".join(stored["metrics"]),
                          "options": tuple(stored["options"]), "device": "cpu"})
    runner = Runner(config, build_registry(), tmp_path, name=header.run_name)
    units = ["batch000000:data", "batch000000:gradcam:_swish._bn1"]
    recomputed = runner.compute_units(units)
    recorded = [row for row in folder.rows()
                if row.explainer in ("", "gradcam") and row.index < 8]

    def comparable(row: ResultRow) -> dict:
        data = json.loads(row.to_json())
        data.pop("kind")  # the one field this issue adds
        if data["metric"] == "time":
            data["value"] = data["batch_seconds"] = None
        return data

    assert [comparable(r) for r in recomputed] == [comparable(r) for r in recorded]
    assert {r.kind for r in recomputed} == {"confidence", "score"}
    with pytest.raises(UserError, match="not a unit of run"):
        runner.compute_units(["batch000000:rise:-"])
