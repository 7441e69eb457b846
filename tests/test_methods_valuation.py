"""Sample-level modality valuation: parity with the released code, gradients, masks, errors, state.

The parity tests compare our method with a transcription of the authors' code
(GeWu-Lab/Valuate-and-Enhance-Multimodal-Cooperation), written out below in plain torch/python
float64:

* ``code/sample_level.py`` ``execute_modulation``: per-sample contributions from the
  correctness of the fused prediction and of ``exec_drop``'s two single-modality predictions
  (``value_all = 2.0``, ``value_a``/``value_v = 1.0``);
* ``code/datasets/dataloader.py`` ``AV_KS_Dataset_sample_level``: 1/2/3 copies of a sample with
  every modality but one zeroed (``drop``), by bins of the contribution;
* ``code/modality_level.py`` with ``AV_KS_Dataset_modality_level``: mean contributions of a
  ``part_ratio`` subset, gaps ``1 - con``, ``difference = |gap_a - gap_v| / 3 * 2 * alpha``
  copies per sample of the modality with the larger gap;
* ``code/models/models.py`` ``AVClassifier.forward(..., drop)`` and ``exec_drop``: a
  concatenation head on encoder outputs, a dropped modality's outputs set to zero.

The released code has two modalities and classification only; the M = 3 and regression
references are a brute-force enumeration of the Shapley value written out by hand.
"""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _reference import assert_grads_close, grads, make_data
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from modbalance import ModbalanceError
from modbalance.balancing import StepOutput, balanced_step, combine_losses, task_loss
from modbalance.methods.valuation import (
    ModalityValuation,
    coalition_outputs,
    modality_rates,
    sample_contributions,
    valuation_copies,
)

DIMS2 = {"audio": 3, "visual": 5}
DIMS3 = {"text": 3, "audio": 2, "visual": 4}
HIDDEN = 4
CLASSES = 3


class AVNet(nn.Module):
    """``AVClassifier`` of the released code: encoders and a ``ConcatFusion`` ``fc_out``."""

    def __init__(self, dims, out_dim, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.modalities = tuple(dims)
        self.encoders = nn.ModuleDict({m: nn.Linear(d, HIDDEN) for m, d in dims.items()})
        self.fc_out = nn.Linear(HIDDEN * len(dims), out_dim)
        self.double()

    def encode(self, x):
        return {m: torch.tanh(self.encoders[m](x[m])) for m in self.modalities}

    def fuse(self, z, present):
        """Concatenation; an absent modality zero-filled (the released ``drop``)."""
        parts = [z[m] * present[m].to(z[m].dtype)[:, None] for m in self.modalities]
        return self.fc_out(torch.cat(parts, 1))

    def step(self, x, y, task, present=None, phase=2, step=0):
        z = self.encode(x)
        n = y.shape[0]
        present = present or {m: torch.ones(n, dtype=torch.bool) for m in self.modalities}
        fused = self.fuse(z, present)
        out = StepOutput(z, {}, fused, present, y, task, phase=phase, fuse=self.fuse, step=step)
        return out, {"task": task_loss(fused, y, task)}


# ==========================================================================================
# transcriptions of the released code
# ==========================================================================================


def released_forward(net: AVNet, x, drop):
    """``AVClassifier.forward(audio, visual, drop)``: ``drop == 1`` zeroes ``a``, ``2`` ``v``."""
    a, v = net.encode(x).values()
    a, v = a.clone(), v.clone()
    for i in range(len(drop)):
        if drop[i] == 1:
            a[i, :] = 0.0
        elif drop[i] == 2:
            v[i, :] = 0.0
    return net.fc_out(torch.cat((a, v), 1))


def released_exec_drop(net: AVNet, a, v, drop):
    """``AVClassifier.exec_drop``."""
    if drop == "audio":
        ad, vd = torch.zeros_like(a), v
    else:
        ad, vd = a, torch.zeros_like(v)
    return net.fc_out(torch.cat((ad, vd), 1))


def released_contributions(net: AVNet, x, label, value_all_correct=2.0):
    """``execute_modulation`` of ``sample_level.py`` (and ``modality_level.py``), one batch.

    ``value_all_correct`` is the code's ``2.0``; the perturbation tests change it.
    """
    net.eval()
    with torch.no_grad():
        a, v = net.encode(x).values()
        out = net.fc_out(torch.cat((a, v), 1))
        out_v = released_exec_drop(net, a, v, drop="audio")
        out_a = released_exec_drop(net, a, v, drop="visual")
        prediction = F.softmax(out, dim=1)
        pred_v = F.softmax(out_v, dim=1)
        pred_a = F.softmax(out_a, dim=1)
    net.train()
    contribution = {}
    for i in range(len(label)):
        index_all = np.argmax(prediction[i].numpy())
        index_v = np.argmax(pred_v[i].numpy())
        index_a = np.argmax(pred_a[i].numpy())
        value_all = value_all_correct if index_all == label[i] else 0.0
        value_v = 1.0 if index_v == label[i] else 0.0
        value_a = 1.0 if index_a == label[i] else 0.0
        contrib_a = (value_a + value_all - value_v) / 2.0
        contrib_v = (value_v + value_all - value_a) / 2.0
        contribution[i] = (contrib_a, contrib_v)
    return contribution


def released_resample(contribution, bins=(0.4, -0.1, 1.0)):
    """``AV_KS_Dataset_sample_level.__init__``: the appended ``(index, drop)`` items.

    ``drop = 2`` (visual zeroed) is a copy for audio, ``drop = 1`` one for visual.
    """
    hi, lo, top = bins
    items = []
    for i in range(len(contribution)):
        contrib_a, contrib_v = contribution[i]
        for value, drop in ((contrib_a, 2), (contrib_v, 1)):
            if hi < value < top:
                copies = 1
            elif lo < value < hi:
                copies = 2
            elif value < lo:
                copies = 3
            else:
                copies = 0
            items += [(i, drop)] * copies
    return items


def released_copies(contribution, n, **kw):
    """``(N, 2)`` copies per (sample, modality) of :func:`released_resample`."""
    counts = torch.zeros(n, 2, dtype=torch.float64)
    for i, drop in released_resample(contribution, **kw):
        counts[i, 0 if drop == 2 else 1] += 1
    return counts


def released_modality_level(part_cona, part_conv, alpha, func="linear"):
    """``AV_KS_Dataset_modality_level``: ``(difference, drop)`` of the appended copies."""
    gap_a = 1.0 - part_cona
    gap_v = 1.0 - part_conv
    if func == "linear":
        difference = (abs(gap_a - gap_v) / 3 * 2) * alpha
    elif func == "tanh":
        difference = float(torch.tanh(torch.tensor((abs(gap_a - gap_v) / 3 * 2) * alpha)))
    else:
        difference = (abs(gap_a - gap_v) / 3 * 2) ** 1.5 * alpha
    return difference, (2 if gap_a > gap_v else 1)


def brute_force_shapley(net: AVNet, x, y, task, present=None, tolerance=1.0, scaled=True):
    """Shapley values by enumerating every permutation, one sample and coalition at a time.

    ``v_i(S) = |S & P_i| * correct_i(S)`` (``P_i`` the modalities sample ``i`` has; regression:
    ``correct = 1 - |err| / tolerance``), with the modalities outside ``S`` (and those the
    sample lacks) zeroed in the concatenation head.
    """
    names = net.modalities
    n = y.shape[0]
    present = present or {m: torch.ones(n, dtype=torch.bool) for m in names}
    with torch.no_grad():
        z = net.encode(x)
    phi = torch.zeros(n, len(names), dtype=torch.float64)
    perms = list(itertools.permutations(range(len(names))))
    for i in range(n):

        def value(coalition, i=i):
            if not coalition:
                return 0.0
            parts = []
            for j, m in enumerate(names):
                keep = j in coalition and bool(present[m][i])
                parts.append(z[m][i] if keep else torch.zeros_like(z[m][i]))
            with torch.no_grad():
                out = net.fc_out(torch.cat(parts))
            if task == "classification":
                score = 1.0 if int(out.argmax()) == int(y[i]) else 0.0
            else:
                score = 1.0 - abs(float(out[0]) - float(y[i])) / tolerance
            kept = sum(1 for j in coalition if bool(present[names[j]][i]))
            return (kept if scaled else 1) * score

        for perm in perms:
            before: set[int] = set()
            for j in perm:
                phi[i, j] += value(before | {j}) - value(before)
                before = before | {j}
    return phi / len(perms)


# ==========================================================================================
# parity: the valuation
# ==========================================================================================


@pytest.mark.parity
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_contributions_match_the_released_execute_modulation(seed):
    net = AVNet(DIMS2, CLASSES, seed=seed)
    x, y = make_data(DIMS2, 64, "classification", seed)
    ref = released_contributions(net, x, y)
    ours = sample_contributions(net.fuse, net.encode(x), {}, y, "classification", net.modalities)
    want = torch.tensor([ref[i] for i in range(64)], dtype=torch.float64)
    torch.testing.assert_close(ours, want, rtol=0, atol=1e-12)
    assert len(set(want.flatten().tolist())) >= 3  # several correctness patterns: not vacuous


@pytest.mark.parity
@pytest.mark.parametrize(
    ("dims", "task"),
    [
        pytest.param(DIMS2, "classification", id="M2-cls"),
        pytest.param(DIMS3, "classification", id="M3-cls"),
        pytest.param(DIMS2, "regression", id="M2-reg"),
        pytest.param(DIMS3, "regression", id="M3-reg"),
    ],
)
@pytest.mark.parametrize("missing", [False, True])
def test_contributions_match_brute_force_enumeration(dims, task, missing):
    net = AVNet(dims, 1 if task == "regression" else CLASSES)
    x, y = make_data(dims, 24, task, seed=3)
    g = torch.Generator().manual_seed(1)
    present = {m: torch.rand(24, generator=g) > (0.3 if missing else -1.0) for m in dims}
    ref = brute_force_shapley(net, x, y, task, present, tolerance=0.7)
    ours = sample_contributions(
        net.fuse, net.encode(x), present, y, task, net.modalities, tolerance=0.7
    )
    assert not ours.requires_grad
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-10)
    if missing:  # a modality a sample lacks contributes nothing
        for j, m in enumerate(dims):
            assert ours[~present[m], j].abs().max() < 1e-12


@pytest.mark.parity
@pytest.mark.parametrize("how", ["unit-value", "no-zeroing", "brute-not-scaled"])
def test_contribution_parity_catches_a_perturbed_rule(how):
    net = AVNet(DIMS2, CLASSES)
    x, y = make_data(DIMS2, 64, "classification")
    ours = sample_contributions(net.fuse, net.encode(x), {}, y, "classification", net.modalities)
    if how == "unit-value":  # BalanceMM's v(N) = 1
        ref = released_contributions(net, x, y, value_all_correct=1.0)
        want = torch.tensor([ref[i] for i in range(64)], dtype=torch.float64)
    elif how == "no-zeroing":  # only the flags cleared: this head ignores them
        want = sample_contributions(
            lambda z, p: net.fc_out(torch.cat([z[m] for m in net.modalities], 1)),
            net.encode(x),
            {},
            y,
            "classification",
            net.modalities,
            masking="present",
        )
    else:  # the brute force without the |S| factor (BalanceMM's value, any M)
        want = brute_force_shapley(net, x, y, "classification", scaled=False)
        same = brute_force_shapley(net, x, y, "classification")
        torch.testing.assert_close(ours, same, rtol=0, atol=1e-12)
    assert not torch.allclose(ours, want)


# ==========================================================================================
# parity: the re-sampling rules
# ==========================================================================================


@pytest.mark.parity
@pytest.mark.parametrize("seed", [0, 1])
def test_sample_level_copies_match_the_released_dataset(seed):
    net = AVNet(DIMS2, CLASSES, seed=seed)
    x, y = make_data(DIMS2, 64, "classification", seed)
    ref = released_copies(released_contributions(net, x, y), 64)
    phi = sample_contributions(net.fuse, net.encode(x), {}, y, "classification", net.modalities)
    torch.testing.assert_close(valuation_copies(phi), ref)
    assert set(ref.flatten().tolist()) >= {0.0, 1.0, 2.0}  # not vacuous
    # a perturbed rule (bins moved) is told apart
    moved = released_copies(released_contributions(net, x, y), 64, bins=(0.6, -0.1, 1.0))
    assert not torch.equal(valuation_copies(phi), moved)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-3, 3, allow_nan=False), min_size=2, max_size=2))
def test_copies_rule_matches_the_released_bins_on_any_value(pair):
    contribution = {0: (pair[0], pair[1])}
    ref = released_copies(contribution, 1)
    ours = valuation_copies(torch.tensor([pair], dtype=torch.float64))
    torch.testing.assert_close(ours, ref)


def test_copies_rule_on_the_bounds():
    values = torch.tensor([-0.1, 0.4, 1.0, 0.999, -0.0999, 0.4 + 1e-12], dtype=torch.float64)
    assert valuation_copies(values).tolist() == [0.0, 0.0, 0.0, 1.0, 2.0, 0.0]


@pytest.mark.parity
@pytest.mark.parametrize("func", ["linear", "tanh", "square"])
@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("cons", [(0.9, 0.3), (0.2, 1.1), (0.7, 0.7), (-0.2, 0.5)])
def test_modality_level_rates_match_the_released_difference(func, alpha, cons):
    difference, drop = released_modality_level(*cons, alpha=alpha, func=func)
    rate = modality_rates(torch.tensor(cons, dtype=torch.float64), alpha, func)
    weak = 0 if drop == 2 else 1  # drop 2 zeroes visual: audio is re-fed alone
    # the code's tanh runs on a float32 ``torch.tensor``
    assert rate[weak].item() == pytest.approx(difference, rel=1e-6, abs=1e-12)
    assert rate[1 - weak].item() == 0.0


@pytest.mark.parity
def test_modality_level_parity_catches_a_perturbed_rule():
    cons = torch.tensor([0.9, 0.3], dtype=torch.float64)
    difference, drop = released_modality_level(0.9, 0.3, alpha=1.0)
    rate = modality_rates(cons, 1.0)
    assert drop == 1 and rate[1] == pytest.approx(difference)
    # the strong modality re-fed instead, or the 2/3 factor dropped: both differ
    assert rate[0] != pytest.approx(difference)
    assert rate[1] != pytest.approx(abs(0.6) * 1.0)


def test_modality_rates_for_three_modalities_and_missing():
    cons = torch.tensor([1.0, 0.4, 0.7], dtype=torch.float64)
    rate = modality_rates(cons, 1.0)
    gap = 1 - cons
    want = [
        sum(max(gap[m] - gap[k], 0.0) for k in range(3) if k != m) / 2 * 2 / 3 for m in range(3)
    ]
    torch.testing.assert_close(rate, torch.tensor(want, dtype=torch.float64))
    valid = torch.tensor([True, False, True])
    rate = modality_rates(cons, 1.0, valid=valid)
    assert rate[1] == 0 and rate[0] == 0 and rate[2] == pytest.approx(0.3 * 2 / 3)


# ==========================================================================================
# parity: one epoch of re-fed copies vs the weighted terms
# ==========================================================================================


@pytest.mark.parity
def test_sample_level_step_equals_the_released_augmented_epoch():
    """Our step's gradient = the gradient summed over the released augmented set (B = N)."""
    net = AVNet(DIMS2, CLASSES)
    x, y = make_data(DIMS2, 32, "classification", seed=5)
    n = y.shape[0]
    # released: originals (drop 0) + copies, every item weighted 1 / B in its batch's mean
    items = [(i, 0) for i in range(n)] + released_resample(released_contributions(net, x, y))
    assert len(items) > n
    net.zero_grad(set_to_none=True)
    idx = torch.tensor([i for i, _ in items])
    drop = [d for _, d in items]
    out = released_forward(net, {m: v[idx] for m, v in x.items()}, drop)
    (F.cross_entropy(out, y[idx], reduction="sum") / n).backward()
    ref = grads(net)
    # ours: one step over the N originals
    net.zero_grad(set_to_none=True)
    out, base = net.step(x, y, "classification")
    method = ModalityValuation(net.modalities, modules=[net])
    combine_losses(method.losses(out, base)).backward()
    assert_grads_close(grads(net), ref)
    counts = released_copies(released_contributions(net, x, y), n)
    torch.testing.assert_close(method.coefficients.double(), counts.mean(0).float().double())


@pytest.mark.parity
def test_sample_level_epoch_parity_catches_copies_in_the_wrong_modality():
    net = AVNet(DIMS2, CLASSES)
    x, y = make_data(DIMS2, 32, "classification", seed=5)
    n = y.shape[0]
    swapped = [(i, 3 - d) for i, d in released_resample(released_contributions(net, x, y))]
    items = [(i, 0) for i in range(n)] + swapped
    net.zero_grad(set_to_none=True)
    idx = torch.tensor([i for i, _ in items])
    out = released_forward(net, {m: v[idx] for m, v in x.items()}, [d for _, d in items])
    (F.cross_entropy(out, y[idx], reduction="sum") / n).backward()
    ref = grads(net)
    net.zero_grad(set_to_none=True)
    out, base = net.step(x, y, "classification")
    combine_losses(ModalityValuation(net.modalities).losses(out, base)).backward()
    assert any(not torch.allclose(g, ref[k]) for k, g in grads(net).items())


@pytest.mark.parity
def test_modality_level_term_is_the_expected_released_copies():
    """After an epoch: the weak modality alone, weight = released ``difference`` per sample."""
    net = AVNet(DIMS2, CLASSES)
    x, y = make_data(DIMS2, 40, "classification", seed=2)
    method = ModalityValuation(net.modalities, level="modality", part_ratio=1.0, modules=[net])
    out, base = net.step(x, y, "classification")
    method.losses(out, base)
    method.epoch_end(0)
    part = method.contribution.tolist()  # the mean of the drawn subset
    difference, drop = released_modality_level(*part, alpha=1.0)
    weak = 0 if drop == 2 else 1
    assert method.coefficients[weak].item() == pytest.approx(difference, rel=1e-6)
    assert method.coefficients[1 - weak].item() == 0.0
    net.zero_grad(set_to_none=True)
    out, base = net.step(x, y, "classification", step=1)
    terms = method.losses(out, base)
    dropped = [drop] * 40
    with torch.no_grad():
        ref = F.cross_entropy(released_forward(net, x, dropped), y) * difference
    name = f"valuation_{net.modalities[weak]}"
    torch.testing.assert_close(terms[name].detach().double(), ref, rtol=1e-5, atol=1e-7)
    assert terms[f"valuation_{net.modalities[1 - weak]}"].item() == 0.0


def test_modality_level_subset_mean_is_the_contribution_of_identical_samples():
    net = AVNet(DIMS2, CLASSES)
    x, y = make_data(DIMS2, 1, "classification", seed=4)
    x = {m: v.expand(30, -1).clone() for m, v in x.items()}
    y = y.expand(30).clone()
    method = ModalityValuation(net.modalities, level="modality", part_ratio=0.2)
    out, base = net.step(x, y, "classification")
    method.losses(out, base)
    phi = sample_contributions(net.fuse, out.features, {}, y, "classification", net.modalities)
    torch.testing.assert_close(method.contribution, phi[0])
    assert method.contribution_count.tolist() == [6.0, 6.0]  # int(30 * 0.2) draws


# ==========================================================================================
# gradients, masks, schedule
# ==========================================================================================


def _all_wrong_net(dims, task):
    """A net whose every prediction is wrong: every sample gets copies of every modality."""
    net = AVNet(dims, 1 if task == "regression" else CLASSES)
    with torch.no_grad():
        net.fc_out.bias.fill_(100.0 if task == "regression" else 0.0)
        if task == "classification":
            net.fc_out.bias[0] = 100.0  # always class 0
    return net


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_each_term_reaches_its_encoder_and_the_head_only(task):
    net = _all_wrong_net(DIMS3, task)
    x, y = make_data(DIMS3, 12, task)
    if task == "classification":
        y = torch.randint(1, CLASSES, (12,))
    out, base = net.step(x, y, task)
    terms = ModalityValuation(net.modalities).losses(out, base)
    for m in net.modalities:
        net.zero_grad(set_to_none=True)
        terms[f"valuation_{m}"].backward(retain_graph=True)
        assert net.encoders[m].weight.grad.abs().sum() > 0
        assert net.fc_out.weight.grad.abs().sum() > 0
        for k in net.modalities:
            if k != m:
                g = net.encoders[k].weight.grad
                assert g is None or torch.all(g == 0), (m, k)


def test_the_valuation_pass_carries_no_gradient_and_runs_in_eval_mode():
    net = AVNet(DIMS2, CLASSES)
    head = nn.Sequential(nn.Dropout(0.9), nn.Linear(2 * HIDDEN, CLASSES)).double()

    def fuse(z, present):
        return head(torch.cat([z[m] for m in net.modalities], 1))

    x, y = make_data(DIMS2, 16, "classification")
    z = net.encode(x)
    runs = [
        sample_contributions(fuse, z, {}, y, "classification", net.modalities, eval_modules=[head])
        for _ in range(3)
    ]
    assert all(torch.equal(runs[0], r) for r in runs) and head.training
    assert not runs[0].requires_grad


def test_missing_modalities_are_never_re_fed():
    net = _all_wrong_net(DIMS2, "classification")
    x, _ = make_data(DIMS2, 10, "classification")
    y = torch.ones(10, dtype=torch.long)
    present = {"audio": torch.arange(10) < 4, "visual": torch.ones(10, dtype=torch.bool)}
    out, base = net.step(x, y, "classification", present)
    method = ModalityValuation(net.modalities)
    terms = method.losses(out, base)
    # every prediction wrong: contribution 0, 2 copies of every modality a sample has
    assert method.coefficients.tolist() == pytest.approx([2 * 4 / 10, 2.0])
    net.zero_grad(set_to_none=True)
    x2 = {m: v.clone().requires_grad_(True) for m, v in x.items()}
    out, base = net.step(x2, y, "classification", present)
    terms = ModalityValuation(net.modalities).losses(out, base)
    terms["valuation_audio"].backward()
    assert torch.all(x2["audio"].grad[4:] == 0) and x2["audio"].grad[:4].abs().sum() > 0


def test_perfect_samples_are_not_re_fed():
    net = AVNet(DIMS2, CLASSES)
    x, y = make_data(DIMS2, 16, "classification")

    def oracle(z, present):  # right from either modality alone
        return F.one_hot(y.repeat(z["audio"].shape[0] // 16), CLASSES).double() * 5 + 0 * (
            z["audio"].sum(1, keepdim=True) + z["visual"].sum(1, keepdim=True)
        )

    z = net.encode(x)
    full = {m: torch.ones(16, dtype=torch.bool) for m in net.modalities}
    out = StepOutput(z, {}, oracle(z, full), full, y, "classification", fuse=oracle)
    method = ModalityValuation(net.modalities)
    terms = method.losses(out, {"task": task_loss(out.fused, y, "classification")})
    assert method.contribution.tolist() == [1.0, 1.0]
    assert method.coefficients.tolist() == [0.0, 0.0]
    assert all(terms[f"valuation_{m}"].item() == 0.0 for m in net.modalities)


def test_every_values_only_on_its_steps_and_phases_are_honoured():
    net = AVNet(DIMS2, CLASSES)
    x, y = make_data(DIMS2, 12, "classification")
    method = ModalityValuation(net.modalities, every=3)
    out, base = net.step(x, y, "classification", step=1)
    terms = method.losses(out, base)
    assert terms["valuation_audio"].item() == 0.0 and not terms["valuation_audio"].requires_grad
    assert method.contribution.isnan().all()
    out, base = net.step(x, y, "classification", step=3)
    terms = method.losses(out, base)
    assert terms["valuation_audio"].requires_grad and not method.contribution.isnan().any()
    out, base = net.step(x, y, "classification", phase=1)
    assert method.losses(out, base) == base


def test_modality_level_waits_for_an_epoch_end_and_keeps_rates_without_values():
    net = AVNet(DIMS2, CLASSES)
    x, y = make_data(DIMS2, 12, "classification")
    method = ModalityValuation(net.modalities, level="modality", alpha=2.0)
    out, base = net.step(x, y, "classification")
    terms = method.losses(out, base)
    assert all(terms[f"valuation_{m}"].item() == 0.0 for m in net.modalities)
    method.epoch_end(0)
    rates = method.coefficients.clone()
    assert method.contribution_count.sum() == 0
    method.epoch_end(1)  # nothing valued this epoch: the rates stay
    torch.testing.assert_close(method.coefficients, rates)
    sample = ModalityValuation(net.modalities)
    assert sample.epoch_end(0) is None


@pytest.mark.parametrize(("dims", "task"), [(DIMS2, "regression"), (DIMS3, "classification")])
@pytest.mark.parametrize("level", ["sample", "modality"])
def test_balanced_step_trains_with_both_levels(dims, task, level):
    net = AVNet(dims, 1 if task == "regression" else CLASSES)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    method = ModalityValuation(net.modalities, level=level)
    x, y = make_data(dims, 16, task)
    before = copy.deepcopy(net.state_dict())
    for step in range(3):
        out, base = net.step(x, y, task, step=step)
        terms = balanced_step(out, base, [method], opt)
        assert {f"valuation_{m}" for m in dims} <= set(terms)
        assert all(torch.isfinite(v) for v in terms.values())
        method.epoch_end(step)
    assert any(not torch.equal(before[k], v) for k, v in net.state_dict().items())
    summary = method.summary()
    assert {f"coefficient_{m}" for m in dims} | {f"contribution_{m}" for m in dims} <= set(summary)
    assert all(isinstance(v, float) for v in summary.values())


def test_no_host_synchronisation_in_the_step():
    from test_host_sync import SyncCounter

    import modbalance

    net = AVNet(DIMS3, CLASSES)
    x, y = make_data(DIMS3, 16, "classification")
    for level in ("sample", "modality"):
        method = ModalityValuation(net.modalities, level=level, modules=[net])
        with modbalance.value_checks(False), SyncCounter() as counter:
            out, base = net.step(x, y, "classification")
            combine_losses(method.losses(out, base)).backward()
        assert not counter.hits, counter.report()


@pytest.mark.parametrize("task", ["regression", "classification"])
@pytest.mark.parametrize("level", ["sample", "modality"])
def test_the_example_model_trains_without_host_synchronisation(task, level):
    """The example's PaSE model (gated fusion, three modalities) through its ``train_step``."""
    from test_host_sync import DIMS as EX_DIMS
    from test_host_sync import _assert_no_sync, count_syncs, make_batch

    from examples.pase import PAPER_SWITCHES, PaSEConfig, build

    torch.manual_seed(0)
    extra = {"task": task, "num_outputs": 4, "num_classes": 4} if task != "regression" else {}
    cfg = PaSEConfig(
        modalities=tuple(EX_DIMS), input_dims=dict(EX_DIMS), dim=8, heads=2,
        **PAPER_SWITCHES, **extra,
    )  # fmt: skip
    method = ModalityValuation(tuple(EX_DIMS), level=level, part_ratio=None)
    parts = build(cfg, methods=[method])
    batch = make_batch(task, 4) if task != "regression" else make_batch()
    counter = count_syncs(parts, batch)
    _assert_no_sync(counter, f"ModalityValuation(level={level!r}, {task})")
    assert not method.contribution.isnan().any()
    assert method.coefficients.shape == (3,) and (method.coefficients >= 0).all()


# ==========================================================================================
# state
# ==========================================================================================


def test_state_dict_round_trip_restores_buffers_and_the_generator():
    net = AVNet(DIMS2, CLASSES)
    x, y = make_data(DIMS2, 20, "classification")
    method = ModalityValuation(net.modalities, level="modality", seed=3)
    out, base = net.step(x, y, "classification")
    method.losses(out, base)
    method.epoch_end(0)
    method.losses(out, base)
    state = copy.deepcopy(method.state_dict())
    other = ModalityValuation(net.modalities, level="modality", seed=99)
    other.load_state_dict(state)
    for k in ("coefficients", "contribution", "contribution_sum", "contribution_count"):
        torch.testing.assert_close(getattr(other, k), getattr(method, k), equal_nan=True)
    method.losses(out, base)
    other.losses(out, base)
    torch.testing.assert_close(other.contribution_sum, method.contribution_sum)  # same draws
    with pytest.raises(ModbalanceError, match="saved with modalities"):
        ModalityValuation(["visual", "audio"]).load_state_dict(state)
    bad = dict(state, coefficients=torch.tensor([-1.0, 0.0]))
    with pytest.raises(ModbalanceError, match=">= 0"):
        ModalityValuation(net.modalities, level="modality").load_state_dict(bad)


# ==========================================================================================
# errors
# ==========================================================================================


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"modalities": ["audio"]}, ModbalanceError, "at least 2"),
        ({"level": "batch"}, ModbalanceError, "level"),
        ({"alpha": 1.0}, ModbalanceError, "`alpha` belongs to the modality-level"),
        ({"part_ratio": 0.5}, ModbalanceError, "`part_ratio` belongs"),
        ({"func": "tanh"}, ModbalanceError, "`func` belongs"),
        ({"level": "modality", "alpha": -1.0}, ModbalanceError, "alpha"),
        ({"level": "modality", "func": "cubic"}, ModbalanceError, "func"),
        ({"level": "modality", "part_ratio": 0.0}, ModbalanceError, "part_ratio"),
        ({"level": "modality", "part_ratio": 1.5}, ModbalanceError, "part_ratio"),
        ({"every": 0}, ModbalanceError, "every"),
        ({"masking": "mean"}, ModbalanceError, "masking"),
        ({"tolerance": 0.0}, ModbalanceError, "tolerance"),
        ({"modules": [object()]}, TypeError, "nn.Module"),
        ({"seed": -1}, ModbalanceError, "seed"),
        ({"phases": (3,)}, ModbalanceError, "phases"),
    ],
)
def test_constructor_errors(kwargs, error, match):
    kwargs = {"modalities": ["audio", "visual"], **kwargs}
    with pytest.raises(error, match=match):
        ModalityValuation(**kwargs)


def test_step_errors():
    net = AVNet(DIMS2, CLASSES)
    x, y = make_data(DIMS2, 8, "classification")
    method = ModalityValuation(net.modalities)
    out, base = net.step(x, y, "classification")
    with pytest.raises(ModbalanceError, match=r"needs it as `out\.fuse`"):
        method.losses(out._replace(fuse=None), base)
    with pytest.raises(ModbalanceError, match="missing 'visual'"):
        method.losses(out._replace(features={"audio": out.features["audio"]}), base)
    with pytest.raises(TypeError, match="integer class indices"):
        method.losses(out._replace(target=y.double()), base)
    with pytest.raises(ModbalanceError, match="shape"):
        method.losses(out._replace(target=y.view(-1, 1)), base)
    with pytest.raises(ModbalanceError, match=r"out.present\['audio'\]"):
        method.losses(out._replace(present={"audio": torch.ones(3, dtype=torch.bool)}), base)
    with pytest.raises(ModbalanceError, match=r"out\.task"):
        method.losses(out._replace(task="ranking"), base)
    with pytest.raises(ModbalanceError, match="one prediction row per input row"):
        method.losses(out._replace(fuse=lambda z, p: torch.zeros(3, CLASSES)), base)
    with pytest.raises(ModbalanceError, match="already in the step's terms"):
        method.losses(out, {**base, "valuation_audio": torch.zeros(())})


def test_coalition_outputs_zeroes_masked_features_and_clears_flags():
    seen = {}

    def fuse(z, p):
        seen.update(z=z, p=p)
        return z["a"].sum(1) + z["b"].sum(1)

    z = {"a": torch.ones(2, 2), "b": 2 * torch.ones(2, 1)}
    masks = torch.tensor([[True, False]])
    out = coalition_outputs(fuse, z, {"b": torch.tensor([True, False])}, ["a", "b"], masks)
    assert out.shape == (1, 2, 1) and out[0, :, 0].tolist() == [2.0, 2.0]
    assert seen["p"]["b"].tolist() == [False, False] and seen["p"]["a"].tolist() == [True, True]
    out = coalition_outputs(fuse, z, {}, ["a", "b"], masks, masking="present")
    assert out[0, :, 0].tolist() == [4.0, 4.0]  # features kept, only the flags cleared
    assert math.isfinite(float(out.sum()))
