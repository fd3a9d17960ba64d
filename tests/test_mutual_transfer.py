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


# --- the gate on a toy pair of students with hand-built attention maps ------------------------

# Student 1's 4x4 map has the block [[1,2],[3,4]] in each 2x2 region; student 2's regions are
# built so that the Pearson r with [1,2,3,4] is known by hand (raster order inside a region):
TOY_REGIONS2 = ([1.0, 2.0, 3.0, 5.0],   # centred cov 6.5, |x|^2 5, |y|^2 8.75: r = 6.5/sqrt(43.75)
                [1.0, 3.0, 2.0, 4.0],   # cov 4, |x|^2 = |y|^2 = 5: r = 0.8
                [1.0, 4.0, 4.0, 1.0],   # cov 0: r = 0
                [4.0, 3.0, 2.0, 1.0])   # reversed: r = -1
TOY_R = (6.5 / math.sqrt(43.75), 0.8, 0.0, -1.0)
TOY_REGION1 = [1.0, 2.0, 3.0, 4.0]


def _toy_map(regions):
    m = torch.zeros(4, 4, dtype=torch.float64)
    for k, (r0, c0) in enumerate([(0, 0), (0, 2), (2, 0), (2, 2)]):
        m[r0:r0 + 2, c0:c0 + 2] = torch.tensor(regions[k], dtype=torch.float64).view(2, 2)
    return m


class _ToyNet(torch.nn.Module):
    """A = x[:, :1] * w, so on an all-ones input the attention map (eq. 1) is w^2 = the hand-built
    map; logits = fc(mean A) with fc weights (1, 0, -1): CE has a gradient too."""

    def __init__(self, attention):
        super().__init__()
        self.w = torch.nn.Parameter(attention.sqrt())
        self.feat = torch.nn.Identity()
        self.fc = torch.nn.Linear(1, 3, dtype=torch.float64)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0], [0.0], [-1.0]]))
            self.fc.bias.zero_()

    def forward(self, x):
        a = self.feat(x[:, :1].to(self.w.dtype) * self.w)
        return self.fc(a.mean(dim=(1, 2, 3))[:, None])


def _toy_students():
    maps = (_toy_map([TOY_REGION1] * 4), _toy_map(TOY_REGIONS2))
    return [mt.Student(f"toy{i}", _ToyNet(m), 3, 4, 4, (0.5,) * 3, (0.5,) * 3, ("feat",), "feat", False)
            for i, m in enumerate(maps)]


def _ones(n=2):
    return torch.ones(n, 3, 4, 4)  # pixel 1.0 -> (1 - 0.5) / 0.5 = 1 after prepare


def _hand_ce(mean_a, label):
    logits = [mean_a, 0.0, -mean_a]
    return math.log(sum(math.exp(v) for v in logits)) - logits[label]


@pytest.mark.parametrize("lam, kept", [(-1.0, [1, 1, 1, 1]), (-0.5, [1, 1, 1, 0]), (0.0, [1, 1, 0, 0]),
                                       (0.5, [1, 1, 0, 0]), (0.9, [1, 0, 0, 0]), (0.99, [0, 0, 0, 0])])
def test_gate_keeps_exactly_regions_above_lambda_and_loss_is_hand_computed(lam, kept):
    st1, st2 = _toy_students()
    labels = torch.tensor([0, 2])
    logits1, maps1 = mt.student_forward(st1, _ones())
    logits2, maps2 = mt.student_forward(st2, _ones())
    assert torch.allclose(maps1[0][0], _toy_map([TOY_REGION1] * 4)) and torch.allclose(maps2[0][1], _toy_map(TOY_REGIONS2))
    beta = 3.0
    loss1, loss2, terms = mt.mutual_transfer_losses(logits1, logits2, labels, maps1, maps2, (2, 2), lam, beta)
    assert torch.allclose(terms.correlations[0], torch.tensor([TOY_R, TOY_R], dtype=torch.float64), atol=1e-12)
    assert mt.region_mask(terms.correlations[0], lam).long().tolist() == [kept, kept]
    assert terms.kept == 2 * sum(kept) and terms.total == 8 and terms.layer_kept_fractions == [sum(kept) / 4]
    distance = sum(_hand_distance(TOY_REGION1, q) for q, k in zip(TOY_REGIONS2, kept) if k)
    mean1 = sum(math.sqrt(v) for v in TOY_REGION1) / 4  # mean of A = mean of w = mean of sqrt(map)
    mean2 = sum(math.sqrt(v) for q in TOY_REGIONS2 for v in q) / 16
    ce1 = (_hand_ce(mean1, 0) + _hand_ce(mean1, 2)) / 2
    ce2 = (_hand_ce(mean2, 0) + _hand_ce(mean2, 2)) / 2
    assert loss1.item() == pytest.approx(ce1 + beta / 2 * distance, rel=1e-12, abs=1e-12)
    assert loss2.item() == pytest.approx(ce2 + beta / 2 * distance, rel=1e-12, abs=1e-12)


def test_gate_sends_gradient_into_kept_regions_only():
    st1, st2 = _toy_students()
    labels = torch.tensor([1, 1])

    def grad_w1(lam, beta):
        logits1, maps1 = mt.student_forward(st1, _ones())
        logits2, maps2 = mt.student_forward(st2, _ones())
        loss1, _, _ = mt.mutual_transfer_losses(logits1, logits2, labels, maps1, maps2, (2, 2), lam, beta)
        return torch.autograd.grad(loss1, st1.net.w)[0]

    ce_only = grad_w1(-1.0, 0.0)
    assert ce_only.abs().min() > 0
    transfer = grad_w1(0.5, 1.0) - ce_only  # lambda 0.5 keeps regions 0 (top left) and 1 (top right)
    assert transfer[:2, :2].abs().max() > 1e-6 and transfer[:2, 2:].abs().max() > 1e-6
    assert torch.all(transfer[2:] == 0)
    assert torch.equal(grad_w1(0.99, 1.0), ce_only)


def _params(students):
    return [p.detach().clone() for s in students for p in s.net.parameters()]


def test_lambda_above_every_r_is_independent_training_toy():
    import copy

    base = _toy_students()
    data = mt.ImageSet(torch.full((4, 3, 4, 4), 255, dtype=torch.uint8), torch.tensor([0, 1, 2, 0]),
                       ("a", "b", "c"), "ones")
    runs = {}
    for name, lam, beta in (("independent", -1.0, 0.0), ("gated off", 0.99, 1.0), ("local 0.5", 0.5, 1.0)):
        st1, st2 = copy.deepcopy(base)
        config = mt.TrainConfig("toy0", "toy1", "ones", lam=lam, beta=beta, epochs=1, batch_size=2, lr=0.1, seed=5)
        row = mt.MutualTrainer(st1, st2, config, steps_per_epoch=2).train_epoch(data)
        runs[name] = (row, _params((st1, st2)))
    row, params = runs["gated off"]
    assert row["kept"] == 0 and row["kept_l1"] == 0 and row["transfer_st1"] == 0 and row["transfer_st2"] == 0
    assert all(torch.equal(a, b) for a, b in zip(params, runs["independent"][1]))
    assert runs["local 0.5"][0]["kept"] == 0.5 and runs["local 0.5"][0]["transfer_st1"] > 0
    assert not all(torch.equal(a, b) for a, b in zip(runs["local 0.5"][1], runs["independent"][1]))
    assert not all(torch.equal(a, b) for a, b in zip(params, _params(base)))


def test_lambda_one_is_independent_training_for_real_students():
    """r <= 1 always (clamped), so lambda 1 transfers nothing: with BatchNorm, seeded data order and
    the same starting weights, the update equals beta 0 (independent) exactly."""
    import copy

    base = _students()
    results = []
    for lam, beta in ((-1.0, 0.0), (1.0, 1.0)):
        students = copy.deepcopy(base)
        config = mt.TrainConfig("small-wrn", "small-mobilenet", "tiny", lam=lam, beta=beta, epochs=1,
                                batch_size=4, seed=3)
        row = mt.MutualTrainer(students["st1"], students["st2"], config, 2).train_epoch(_tiny_set())
        results.append((row, _params(students.values())))
    assert results[1][0]["kept"] == 0 and results[1][0]["transfer_st1"] == 0
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


def test_epoch_row_has_per_layer_kept_and_r_quantiles():
    students = _students()
    config = mt.TrainConfig("small-wrn", "small-mobilenet", "tiny", lam=0.3, beta=1.0, epochs=1, batch_size=4)
    row = mt.MutualTrainer(students["st1"], students["st2"], config, 2).train_epoch(_tiny_set())
    layers = [row[f"kept_l{j}"] for j in (1, 2, 3)]
    assert row["kept"] == pytest.approx(sum(layers) / 3)  # equal region counts per layer pair
    q = row["r_quantiles"]
    assert q["levels"] == list(mt.R_QUANTILE_LEVELS) and len(q["layers"]) == 3
    assert q["all"] == sorted(q["all"]) and -1 <= q["all"][0] <= q["all"][-1] <= 1


def test_correlation_summary_known_quantiles():
    steps = [[torch.tensor([[0.0, 0.25]]), torch.tensor([[1.0, -1.0]])],
             [torch.tensor([[0.5, 0.75]]), torch.tensor([[0.0, 0.0]])]]
    out = mt.correlation_summary(steps, levels=(0.0, 0.5, 1.0))
    assert out["layers"] == [[0.0, 0.375, 0.75], [-1.0, 0.0, 1.0]]
    assert out["all"] == [-1.0, 0.125, 1.0]  # 8 values: median between 0 and 0.25


def test_pearson_is_clamped_to_one():
    x = torch.tensor([[0.1, 0.7, 0.3, 0.9, 0.2]])
    assert mt.pearson(x, x * 3.7).item() <= 1.0 and mt.region_mask(mt.pearson(x, x * 3.7), 1.0).sum() == 0


# --- the sweep report: intervals and paired tests ---------------------------------------------

def test_wilson_interval_known_values():
    from xbench_plugins.mutual_transfer.report import wilson_interval

    z = 1.959963984540054
    lo, hi = wilson_interval(0, 10)  # p = 0: (0, z^2 / (n + z^2))
    assert lo == 0 and hi == pytest.approx(z * z / (10 + z * z), rel=1e-12)
    lo, hi = wilson_interval(5, 10)  # p = 1/2: centre 1/2, half z sqrt(1/40 + z^2/400) / (1 + z^2/10)
    half = z * math.sqrt(0.025 + z * z / 400) / (1 + z * z / 10)
    assert (lo, hi) == (pytest.approx(0.5 - half), pytest.approx(0.5 + half))
    assert (round(lo, 4), round(hi, 4)) == (0.2366, 0.7634)  # published value for 5/10
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_mcnemar_exact_known_values():
    from xbench_plugins.mutual_transfer.report import mcnemar_exact

    a = [True] * 5 + [False] * 0 + [True] * 10
    b = [False] * 5 + [True] * 10
    assert mcnemar_exact(a, b) == {"only_a": 5, "only_b": 0, "p": 2 / 32}
    # b = 1, c = 4: p = 2 * (1 + 5) / 32
    a = [True, False, False, False, False, True]
    b = [False, True, True, True, True, True]
    assert mcnemar_exact(a, b) == {"only_a": 1, "only_b": 4, "p": 12 / 32}
    assert mcnemar_exact([True, False], [True, False])["p"] == 1.0
    with pytest.raises(ValueError, match="same images"):
        mcnemar_exact([True], [True, False])


@pytest.mark.parametrize("spec, message", [("0.5,x", "not a number"), ("1.5", "outside"), (",", "at least one")])
def test_parse_lambdas_errors(spec, message):
    from xbench_plugins.mutual_transfer.report import parse_lambdas

    with pytest.raises(UserError, match=message):
        parse_lambdas(spec)


def test_parse_lambdas_keeps_order_and_drops_repeats():
    from xbench_plugins.mutual_transfer.report import parse_lambdas, regime_name

    assert parse_lambdas(" -1, 0.9,0.5,0.9") == [-1.0, 0.9, 0.5]
    assert [regime_name(v, 1) for v in (-1.0, 0.9)] == ["global", "local 0.9"]
    assert regime_name(0.9, 0) == "independent"


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


def test_efficientnet_student_uses_protocol_2_inputs():
    student = mt.build_student("efficientnet-lite0", 10, pretrained=False)
    assert student.default_layer == "_swish._bn1"
    x = torch.tensor([0.0, 127 / 255, 1.0]).view(1, 3, 1, 1).expand(1, 3, 224, 224)
    assert torch.allclose(student.prepare(x)[0, :, 0, 0], torch.tensor([-127 / 128, 0.0, 1.0]), atol=1e-6)


# --- the command ------------------------------------------------------------------------------

def _cli(out, *extra):
    from xbench.cli import main

    return main(["train", "mutual-transfer", "--data", "digits", "--limit", "40", "--val-limit", "20",
                 "--batch-size", "20", "--pretrain-epochs", "0", "--epochs", "2", "--lambda", "0.2",
                 "--output", str(out), *extra])


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
                 "--output", str(tmp_path / "c.pt")])
    err = capsys.readouterr().err  # messages are never folded (message_console)
    assert code == 2 and "cifar-10-batches-py" in err and "never downloads" in err


def test_cli_compare_sweeps_lambdas_from_one_start(tmp_path):
    import json

    from xbench.cli import main
    from xbench_plugins.mutual_transfer.report import plot_sweep, unbits, wilson_interval

    out = tmp_path / "cmp"
    code = main(["train", "mutual-transfer", "--data", "digits", "--limit", "40", "--val-limit", "20",
                 "--batch-size", "20", "--pretrain-epochs", "1", "--epochs", "1", "--lambdas", "-1,0.5,0.99",
                 "--compare", "--output", str(out)])
    assert code == 0
    table = json.loads((out / "table1.json").read_text())
    rows = {r["regime"]: r for r in table["rows"]}
    assert list(rows) == ["independent", "global", "local 0.5", "local 0.99"]
    assert rows["independent"]["beta"] == 0 and rows["independent"]["kept_last"] is None
    assert rows["global"]["lambda"] == -1 and rows["local 0.99"]["lambda"] == 0.99
    assert rows["global"]["kept_first"] == 1.0 and rows["global"]["kept_layers_last"] == [1.0, 1.0, 1.0]
    local = rows["local 0.99"]
    assert local["kept_last"] < 1.0 and len(local["kept_layers_first"]) == 3
    assert local["kept_first"] == local["kept_last"] == local["kept"]  # one epoch: first is last
    assert local["kept_last"] == pytest.approx(sum(local["kept_layers_last"]) / 3)
    quantiles = rows["global"]["r_quantiles_last"]["all"]
    assert quantiles == sorted(quantiles) and len(quantiles) == len(mt.R_QUANTILE_LEVELS)
    for regime, row in rows.items():
        final = [h for h in table["histories"][regime] if "correct_st1" in h][-1]
        hits = unbits(final["correct_st2"])
        assert len(hits) == 20 and sum(hits) / 20 == row["top1_st2"]
        assert row["top1_st2_ci95"] == [round(v, 6) for v in wilson_interval(sum(hits), 20)]
    tests = table["paired_tests"]
    assert {(t["regime"], t["reference"]) for t in tests} >= {("local 0.5", "independent"), ("local 0.5", "global")}
    assert all(0 < t["p"] <= 1 and t["only_regime"] + t["only_reference"] <= 20 for t in tests)
    starts = [table["histories"][r][1] for r in rows]  # [0] is the pretraining epoch, [1] "before"
    assert all(s["phase"] == "before" and s == starts[0] for s in starts)
    initial, _ = mt.load_students(out / "initial.pt")
    for regime in rows:
        trained, payload = mt.load_students(out / f"{regime.replace(' ', '-')}.pt")
        assert payload["history"][0]["phase"] == "pretrain"
        assert not torch.equal(next(iter(trained["st2"].net.parameters())),
                               next(iter(initial["st2"].net.parameters())))
    png = plot_sweep(table, tmp_path / "sweep.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_cifar10_folder_is_read_without_download(tmp_path, monkeypatch):
    """A tiny CIFAR-10 folder in torchvision's pickle format (md5 checks bypassed: the files are
    ours) is read as uint8 (N, 3, 32, 32) images with labels, class names and flips."""
    import pickle

    import numpy as np
    import torchvision.datasets.cifar as tv_cifar

    from xbench_plugins.mutual_transfer.data import load_cifar

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
