"""Mutual transfer of local attention maps (Cheng et al. 2022): known answers on toy tensors,
training-step behaviour, checkpoints, the Model plugin and the training command."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from xbench.errors import UserError
from xbench_plugins import mutual_transfer as mt


# --- eq. 1: attention map ---------------------------------------------------------------------

def test_attention_map_is_channel_sum_of_squares():
    a = torch.tensor([[[[1.0, -2.0], [0.0, 3.0]],
                       [[2.0, 1.0], [-1.0, 0.5]]]])  # (1, 2, 2, 2)
    expected = torch.tensor([[[1 + 4, 4 + 1], [0 + 1, 9 + 0.25]]])
    assert torch.equal(mt.attention_map(a), expected)


def test_attention_map_rejects_non_4d():
    with pytest.raises(ValueError, match="B, C, H, W"):
        mt.attention_map(torch.ones(2, 3, 4))


def test_match_size_pools_to_the_smaller_map():
    big = torch.arange(16.0).view(1, 4, 4)
    small = torch.zeros(1, 2, 2)
    a, b = mt.match_size(big, small)
    assert b is small
    assert torch.equal(a, torch.tensor([[[2.5, 4.5], [10.5, 12.5]]]))  # 2x2 block means


# --- regions and eq. 4: Pearson --------------------------------------------------------------

def test_region_slices_raster_order_and_uneven_bounds():
    cells = mt.region_slices(5, 4, (2, 2))
    assert [(r.start, r.stop, c.start, c.stop) for r, c in cells] == [
        (0, 2, 0, 2), (0, 2, 2, 4), (2, 5, 0, 2), (2, 5, 2, 4)]
    maps = torch.arange(20.0).view(1, 5, 4)
    regions = mt.split_regions(maps, (2, 2))
    assert torch.equal(regions[1], torch.tensor([[2.0, 3.0, 6.0, 7.0]]))
    assert regions[3].shape == (1, 6)


def test_region_slices_refuse_grid_finer_than_map():
    with pytest.raises(UserError, match="coarser grid"):
        mt.region_slices(2, 2, (3, 3))


@pytest.mark.parametrize("spec, expected", [("2x2", (2, 2)), ("3X4", (3, 4)), ("4", (4, 4)), ((1, 2), (1, 2))])
def test_parse_grid(spec, expected):
    assert mt.parse_grid(spec) == expected


@pytest.mark.parametrize("spec", ["2x", "0x2", "a", "2x2x2"])
def test_parse_grid_errors_name_the_option(spec):
    with pytest.raises(UserError, match="--grid"):
        mt.parse_grid(spec)


def test_pearson_hand_computed():
    x = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    y = torch.tensor([[2.0, 4.0, 7.0], [3.0, 2.0, 1.0], [10.0, 20.0, 30.0], [1.0, 2.0, 4.0]])
    # row 0: centred x (-1, 0, 1), centred y (-7/3, -1/3, 8/3): cov 5, |x|^2 2, |y|^2 114/9
    r0 = 5 / math.sqrt(2 * 114 / 9)
    got = mt.pearson(x, y)
    assert torch.allclose(got, torch.tensor([r0, -1.0, 1.0, 0.0]), atol=1e-6)  # constant row -> 0


def test_pearson_agrees_with_numpy_corrcoef():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(5, 9, generator=g, dtype=torch.float64), torch.rand(5, 9, generator=g, dtype=torch.float64)
    import numpy as np

    ref = [np.corrcoef(a, b)[0, 1] for a, b in zip(x.numpy(), y.numpy())]
    assert torch.allclose(mt.pearson(x, y), torch.tensor(ref, dtype=torch.float64), atol=1e-12)


def test_region_mask_threshold_is_strict_and_minus_one_keeps_all():
    r = torch.tensor([[0.9, 0.2, -0.5, 0.5, -1.0]])
    assert mt.region_mask(r, 0.5).tolist() == [[True, False, False, False, False]]
    assert mt.region_mask(r, 0.0).tolist() == [[True, True, False, True, False]]
    assert mt.region_mask(r, -1.0).all()


# --- eq. 5: the loss --------------------------------------------------------------------------

def _toy_pair():
    # one 2x4 map per student, grid 1x2 -> regions [1,2,5,6] | [3,4,7,8] and [1,2,5,7] | [8,7,4,3]
    m1 = torch.tensor([[[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]])
    m2 = torch.tensor([[[1.0, 2.0, 8.0, 7.0], [5.0, 7.0, 4.0, 3.0]]])
    return m1, m2


def _hand_distance(a, b):
    na, nb = math.sqrt(sum(v * v for v in a)), math.sqrt(sum(v * v for v in b))
    return math.sqrt(sum((u / na - v / nb) ** 2 for u, v in zip(a, b)))


def test_loss_value_on_toy_pair():
    m1, m2 = _toy_pair()
    logits = torch.zeros(1, 3)
    labels = torch.tensor([1])
    d0 = _hand_distance([1, 2, 5, 6], [1, 2, 5, 7])  # r ~ 0.99: transfers at lambda 0
    d1 = math.sqrt(68 / 138)  # [3,4,7,8] vs [8,7,4,3]: r = -1, dropped at lambda 0
    assert abs(_hand_distance([3, 4, 7, 8], [8, 7, 4, 3]) - d1) < 1e-12
    beta = 4.0
    loss1, loss2, terms = mt.mutual_transfer_losses(logits, logits, labels, [m1], [m2], (1, 2), 0.0, beta)
    assert terms.kept == 1 and terms.total == 2
    assert loss1.item() == pytest.approx(math.log(3) + beta / 2 * d0, rel=1e-6)
    assert loss2.item() == pytest.approx(math.log(3) + beta / 2 * d0, rel=1e-6)
    loss1, _, terms = mt.mutual_transfer_losses(logits, logits, labels, [m1], [m2], (1, 2), -1.0, beta)
    assert terms.kept == 2
    assert loss1.item() == pytest.approx(math.log(3) + beta / 2 * (d0 + d1), rel=1e-6)


def test_lambda_minus_one_is_global_transfer():
    g = torch.Generator().manual_seed(1)
    maps1 = [torch.rand(3, 8, 8, generator=g), torch.rand(3, 4, 4, generator=g)]
    maps2 = [torch.rand(3, 8, 8, generator=g), torch.rand(3, 5, 5, generator=g)]
    terms = mt.transfer_terms(maps1, maps2, (2, 2), -1.0)
    assert terms.kept == terms.total == 2 * 3 * 4
    manual = torch.zeros(3)
    for a, b in zip(maps1, maps2):
        a, b = mt.match_size(a, b)
        for qa, qb in zip(mt.split_regions(a, (2, 2)), mt.split_regions(b, (2, 2))):
            manual += (qa / qa.norm(dim=1, keepdim=True) - qb / qb.norm(dim=1, keepdim=True)).norm(dim=1)
    assert torch.allclose(terms.student1, manual, atol=1e-6)
    assert torch.allclose(terms.student2, manual, atol=1e-6)
    # with one region per map this is attention transfer on whole maps (Zagoruyko & Komodakis)
    whole = mt.transfer_terms(maps1, maps2, (1, 1), -1.0).student1
    at = torch.zeros(3)
    for a, b in zip(maps1, maps2):
        a, b = mt.match_size(a, b)
        at += (F.normalize(a.flatten(1), dim=1) - F.normalize(b.flatten(1), dim=1)).norm(dim=1)
    assert torch.allclose(whole, at, atol=1e-6)


def test_higher_lambda_never_keeps_more_regions():
    g = torch.Generator().manual_seed(2)
    maps1, maps2 = [torch.rand(4, 8, 8, generator=g)], [torch.rand(4, 8, 8, generator=g)]
    kept = [mt.transfer_terms(maps1, maps2, (4, 4), lam).kept for lam in (-1, -0.5, 0, 0.5, 0.99)]
    assert kept == sorted(kept, reverse=True) and kept[0] == 64 and kept[-1] < kept[0]


def test_each_loss_reaches_its_own_student_only():
    g = torch.Generator().manual_seed(3)
    a1 = torch.rand(2, 4, 4, 4, generator=g, requires_grad=True)
    a2 = torch.rand(2, 6, 4, 4, generator=g, requires_grad=True)
    logits = torch.zeros(2, 3)
    loss1, loss2, _ = mt.mutual_transfer_losses(logits, logits, torch.tensor([0, 1]), [mt.attention_map(a1)],
                                                [mt.attention_map(a2)], (2, 2), -1.0, 1.0)
    g1 = torch.autograd.grad(loss1, (a1, a2), allow_unused=True)
    assert g1[0].abs().sum() > 0 and (g1[1] is None or g1[1].abs().sum() == 0)
    g2 = torch.autograd.grad(loss2, (a1, a2), allow_unused=True)
    assert g2[1].abs().sum() > 0 and (g2[0] is None or g2[0].abs().sum() == 0)


# --- training steps, checkpoints, the Model plugin --------------------------------------------

def _tiny_set(n=8, classes=10):
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(n, 3, 32, 32, generator=g) * 255).to(torch.uint8)
    return mt.ImageSet(images, torch.arange(n) % classes, tuple(str(i) for i in range(classes)), "tiny")


def _students():
    return {"st1": mt.build_student("small-wrn", 10, pretrained=False, seed=0),
            "st2": mt.build_student("small-mobilenet", 10, pretrained=False, seed=1)}


def test_two_training_steps_change_both_students():
    students = _students()
    before = {k: [p.detach().clone() for p in s.net.parameters()] for k, s in students.items()}
    config = mt.TrainConfig("small-wrn", "small-mobilenet", "tiny", lam=0.0, beta=1.0, epochs=1, batch_size=4)
    trainer = mt.MutualTrainer(students["st1"], students["st2"], config, steps_per_epoch=2)
    row = trainer.train_epoch(_tiny_set())
    assert trainer.epoch == 1 and 0 <= row["kept"] <= 1 and row["transfer_st1"] > 0
    for name, student in students.items():
        changed = [not torch.equal(a, b) for a, b in zip(before[name], student.net.parameters())]
        assert sum(changed) == len(changed), f"{name}: some parameters did not move"


def test_checkpoint_round_trip(tmp_path):
    students = _students()
    config = mt.TrainConfig("small-wrn", "small-mobilenet", "tiny", lam=0.3, beta=2.0, epochs=1)
    trainer = mt.MutualTrainer(students["st1"], students["st2"], config, steps_per_epoch=1)
    path = tmp_path / "mt.pt"
    mt.save_checkpoint(path, students, [str(i) for i in range(10)], trainer.state())
    restored, payload = mt.load_students(path)
    assert payload["config"] == config.as_dict() and mt.TrainConfig.from_dict(payload["config"]) == config
    x = torch.rand(2, 3, 32, 32)
    for name in mt.MEMBERS:
        students[name].net.eval()
        restored[name].net.eval()
        assert restored[name].spec() == students[name].spec()
        with torch.no_grad():
            assert torch.equal(restored[name].net(restored[name].prepare(x)),
                               students[name].net(students[name].prepare(x)))
    trainer2 = mt.MutualTrainer(restored["st1"], restored["st2"], config, steps_per_epoch=1)
    trainer2.load_state(payload)
    assert trainer2.scheduler.state_dict() == trainer.scheduler.state_dict()


def test_foreign_files_are_refused(tmp_path):
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(UserError, match="not a mutual-transfer checkpoint"):
        mt.read_checkpoint(other)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(UserError, match="not a readable mutual-transfer checkpoint"):
        mt.read_checkpoint(text)
    with pytest.raises(UserError, match="no such file"):
        mt.read_checkpoint(tmp_path / "missing.pt")


def test_model_plugin_loads_member_and_classifies(tmp_path):
    from xbench.model import ClassifierHandle
    from xbench.plugins import build_registry
    from xbench_plugins.gradcam import GradCAM

    students = _students()
    path = tmp_path / "mt.pt"
    config = mt.TrainConfig("small-wrn", "small-mobilenet", "tiny", lam=0.3, beta=2.0, epochs=1)
    mt.save_checkpoint(path, students, [f"c{i}" for i in range(10)], {"config": config.as_dict(), "epoch": 1})
    cls = build_registry().model("mutual-transfer")
    x = torch.rand(3, 3, 32, 32)
    for member in mt.MEMBERS:
        loaded = cls(checkpoint=str(path), member=member).load()
        assert loaded.input_size == 32 and loaded.class_names[3] == "c3"
        assert loaded.default_layer == students[member].default_layer and loaded.extra["member"] == member
        handle = ClassifierHandle(loaded)
        students[member].net.eval()
        with torch.no_grad():
            expected = students[member].net(students[member].prepare(x))
        assert torch.allclose(handle(x), expected, atol=1e-6)
        maps = GradCAM().explain(handle, x, handle(x).argmax(1))
        assert maps.shape[0] == 3 and torch.isfinite(maps).all() and (maps >= 0).all()


def test_model_plugin_errors_say_what_to_do():
    with pytest.raises(UserError, match="xbench train mutual-transfer"):
        mt.MutualTransferModel().load()
    with pytest.raises(UserError, match="member"):
        mt.MutualTransferModel(checkpoint="x.pt", member="st3")


def test_efficientnet_transfer_points_are_stage_ends():
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0")
    assert mt.efficientnet_stage_ends(net, 224) == ("_blocks.4", "_blocks.10", "_blocks.15")


# --- the command ------------------------------------------------------------------------------

def _cli(out, *extra):
    from xbench.cli import main

    return main(["train", "mutual-transfer", "--data", "digits", "--limit", "40", "--val-limit", "20",
                 "--batch-size", "20", "--pretrain-epochs", "0", "--epochs", "2", "--lambda", "0.2",
                 "--out", str(out), *extra])


def test_cli_resume_repeats_the_uninterrupted_run(tmp_path, monkeypatch):
    assert _cli(tmp_path / "a.pt") == 0
    full, _ = mt.load_students(tmp_path / "a.pt")
    original = mt.MutualTrainer.train_epoch

    def stop_in_second_epoch(self, data, on_step=None):
        if self.epoch == 1:
            raise KeyboardInterrupt
        return original(self, data, on_step)

    monkeypatch.setattr(mt.MutualTrainer, "train_epoch", stop_in_second_epoch)
    assert _cli(tmp_path / "b.pt") == 130
    assert mt.read_checkpoint(tmp_path / "b.pt")["epoch"] == 1
    monkeypatch.setattr(mt.MutualTrainer, "train_epoch", original)
    assert _cli(tmp_path / "b.pt", "--resume") == 0
    resumed, payload = mt.load_students(tmp_path / "b.pt")
    assert payload["epoch"] == 2 and [r["phase"] for r in payload["history"]] == ["before", "mutual", "mutual"]
    for name in mt.MEMBERS:
        for (key, a), b in zip(full[name].net.state_dict().items(), resumed[name].net.state_dict().values()):
            assert torch.equal(a, b), f"{name}.{key} differs after resume"


def test_cli_resume_refuses_other_settings(tmp_path, capsys):
    path = tmp_path / "a.pt"
    students = _students()
    config = mt.TrainConfig("small-wrn", "small-mobilenet", "digits", lam=0.9, beta=1.0, epochs=2)
    trainer = mt.MutualTrainer(students["st1"], students["st2"], config, 1)
    mt.save_checkpoint(path, students, [str(i) for i in range(10)], trainer.state())
    assert _cli(path, "--resume") == 2
    assert "different settings" in capsys.readouterr().err


def test_cifar_offline_error_names_the_folder(tmp_path, capsys):
    from xbench.cli import main

    code = main(["train", "mutual-transfer", "--data", "cifar10", "--data-root", str(tmp_path),
                 "--out", str(tmp_path / "c.pt")])
    err = capsys.readouterr().err  # messages are never folded (message_console)
    assert code == 2 and "cifar-10-batches-py" in err and "never downloads" in err


def test_cli_compare_trains_the_three_table1_rows_from_one_start(tmp_path):
    import json

    from xbench.cli import main

    out = tmp_path / "cmp"
    code = main(["train", "mutual-transfer", "--data", "digits", "--limit", "40", "--val-limit", "20",
                 "--batch-size", "20", "--pretrain-epochs", "1", "--epochs", "1", "--lambda", "0.5",
                 "--compare", "--out", str(out)])
    assert code == 0
    table = json.loads((out / "table1.json").read_text())
    rows = {r["regime"]: r for r in table["rows"]}
    assert list(rows) == ["independent", "global", "local"]
    assert rows["independent"]["beta"] == 0 and rows["global"]["lambda"] == -1 and rows["local"]["lambda"] == 0.5
    assert rows["global"]["kept"] == 1.0 and rows["local"]["kept"] < 1.0
    starts = [table["histories"][r][1] for r in rows]  # [0] is the pretraining epoch, [1] "before"
    assert all(s["phase"] == "before" and s == starts[0] for s in starts)
    initial, _ = mt.load_students(out / "initial.pt")
    for regime in rows:
        trained, payload = mt.load_students(out / f"{regime}.pt")
        assert payload["history"][0]["phase"] == "pretrain"
        assert not torch.equal(next(iter(trained["st2"].net.parameters())),
                               next(iter(initial["st2"].net.parameters())))


def test_cifar10_folder_is_read_without_download(tmp_path, monkeypatch):
    """A tiny CIFAR-10 folder in torchvision's pickle format (md5 checks bypassed: the files are
    ours) is read as uint8 (N, 3, 32, 32) images with labels, class names and flips."""
    import pickle

    import numpy as np
    import torchvision.datasets.cifar as tv_cifar

    from xbench.cli.train_mutual_transfer import load_cifar

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    names = [f"class{i}" for i in range(10)]
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
                         "labels": rng.integers(0, 10, 4).tolist()}
        (folder / name).write_bytes(pickle.dumps(batches[name]))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    monkeypatch.setattr(tv_cifar.CIFAR10, "_check_integrity", lambda self: True)

    train, test = load_cifar("cifar10", str(tmp_path))
    assert tuple(train.images.shape) == (20, 3, 32, 32) and train.images.dtype == torch.uint8
    assert tuple(test.images.shape) == (4, 3, 32, 32)
    assert train.class_names == tuple(names) and train.flip and test.flip
    first = batches["data_batch_1"]
    assert torch.equal(train.images[0], torch.from_numpy(first["data"][0].reshape(3, 32, 32)))
    assert train.labels[:4].tolist() == first["labels"]
    assert test.labels.tolist() == batches["test_batch"]["labels"]
