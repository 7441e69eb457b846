"""ReconBoost: parity with the released code, the schedule, gradient routing, masks, errors, state.

The parity tests compare the method with a transcription of the authors' code
(``huacong/ReconBoost``: ``train.py``'s two phases per stage, ``train_MSA.py``'s three-modality
order, ``models/dynamic_net.py``'s ``DynamicNet.forward``/``forward_grad``), written out below in
plain torch and float64. The released code has classification only; the regression references
are our residual form written out by hand.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from modbalance import ModbalanceError
from modbalance.balancing import StepOutput, balanced_step, combine_losses, task_loss
from modbalance.methods.reconboost import (
    TERMS,
    ReconBoost,
    reconboost_boosting_loss,
    reconboost_consolidation,
    reconboost_ensemble,
    reconboost_stage,
)

DIMS2 = {"audio": 3, "visual": 5}
DIMS3 = {"text": 3, "visual": 4, "audio": 2}  # train_MSA.py's stage order
HIDDEN = 4
CLASSES = 3


class Net(nn.Module):
    """Encoders, unimodal heads (one shared head: the released ``common_space``) and a fusion."""

    def __init__(self, dims, out_dim, shared_head=False):
        super().__init__()
        self.modalities = tuple(dims)
        self.encoders = nn.ModuleDict({m: nn.Linear(d, HIDDEN) for m, d in dims.items()})
        if shared_head:
            head = nn.Linear(HIDDEN, out_dim)
            self.heads = nn.ModuleDict(dict.fromkeys(dims, head))
        else:
            self.heads = nn.ModuleDict({m: nn.Linear(HIDDEN, out_dim) for m in dims})
        self.fusion = nn.Linear(HIDDEN * len(dims), out_dim)
        self.regression = out_dim == 1

    def learner(self, m, x):
        """The released ``model(x)``: encoder then head (``fc``)."""
        out = self.heads[m](torch.tanh(self.encoders[m](x[m])))
        return out[:, 0] if self.regression else out

    def step(self, x, y, task, present=None, step=0, phase=2):
        z = {m: torch.tanh(self.encoders[m](x[m])) for m in self.modalities}
        uni = {m: self.heads[m](z[m]) for m in self.modalities}
        if self.regression:
            uni = {m: u[:, 0] for m, u in uni.items()}
        fused = self.fusion(torch.cat([z[m] for m in self.modalities], 1))
        fused = fused[:, 0] if self.regression else fused
        out = StepOutput(z, uni, fused, present or {}, y, task, phase=phase, step=step)
        return out, {"task": task_loss(fused, y, task), "readout": fused.sum() * 0.0}


def make_data(dims, n, task, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = {m: torch.randn(n, d, generator=g, dtype=dtype) for m, d in dims.items()}
    if task == "regression":
        return x, torch.randn(n, generator=g, dtype=dtype)
    return x, torch.randint(0, CLASSES, (n,), generator=g)


def make_net(dims, task, shared=False, seed=0):
    torch.manual_seed(seed)
    return Net(dims, 1 if task == "regression" else CLASSES, shared).double()


def grads(params):
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]


def all_params(net, rb):
    return [*net.encoders.parameters(), *net.heads.parameters(), rb.boost_rate]


# ==========================================================================================
# The released rule, transcribed (train.py / train_MSA.py, DynamicNet)
# ==========================================================================================


def released_out_join(net, x, mask_model, eta):
    """``DynamicNet.forward(data, mask_model)``: every other learner's output summed, no grad."""
    prediction = None
    with torch.no_grad():
        for name in net.modalities:
            if name == mask_model:
                continue
            pred = net.learner(name, x)
            prediction = pred if prediction is None else prediction + pred
    return eta * prediction


def released_phase1_loss(net, x, lbl, stage, eta, w1, w2, alpha, ga_detach_current=True):
    """One batch of the released "phase 1" (``use_ga``, ``use_pretrain``: all learners added).

    ``ga_detach_current=False`` is the released line with the current learner's softmax left
    attached (what ``consolidation_grad=True`` computes).
    """
    names = net.modalities
    model_name, pre_model_name = names[stage % len(names)], names[(stage - 1) % len(names)]
    out_join = released_out_join(net, x, model_name, eta)
    out_obj = net.learner(model_name, x)
    target = torch.zeros(lbl.shape[0], CLASSES, dtype=out_obj.dtype).scatter_(1, lbl.view(-1, 1), 1)
    boosting_loss = -w1 * (target * out_obj.log_softmax(1)).mean(-1) + w2 * (
        target * out_join.detach().softmax(1) * out_obj.log_softmax(1)
    ).mean(-1)
    if stage == 0:
        loss = boosting_loss
    else:
        pre_out_obj = net.learner(pre_model_name, x)
        current = out_obj.detach() if ga_detach_current else out_obj
        ga_loss = F.mse_loss(current.softmax(1), pre_out_obj.detach().softmax(1))
        loss = boosting_loss + alpha * ga_loss
    return loss.mean(), model_name


def released_phase2_loss(net, x, lbl, eta):
    """``forward_grad``: ``boost_rate * sum of all learners``, then ``CrossEntropyLoss``."""
    prediction = None
    for name in net.modalities:
        pred = net.learner(name, x)
        prediction = pred if prediction is None else prediction + pred
    return F.cross_entropy(eta * prediction, lbl)


def released_training(net, eta, batches, stages, s_steps, r_steps, lr, w1, w2, alpha):
    """The released ``main`` loop with plain SGD: a new optimizer per stage and per correction."""
    eta = nn.Parameter(torch.tensor(eta, dtype=torch.float64))
    it = iter(batches)
    for stage in range(stages):
        name = net.modalities[stage % len(net.modalities)]
        learner = [*net.encoders[name].parameters(), *net.heads[name].parameters()]
        optimizer = torch.optim.SGD(learner, lr=lr)
        for _ in range(s_steps):
            x, lbl = next(it)
            optimizer.zero_grad()
            loss, _ = released_phase1_loss(net, x, lbl, stage, eta, w1, w2, alpha)
            loss.backward()
            optimizer.step()
        params = [*net.encoders.parameters(), *net.heads.parameters(), eta]
        optimizer_correct = torch.optim.SGD(params, lr=lr)
        for _ in range(r_steps):
            x, lbl = next(it)
            optimizer_correct.zero_grad()
            released_phase2_loss(net, x, lbl, eta).backward()
            optimizer_correct.step()
    return eta


def our_training(net, rb, batches, lr):
    """The library's loop: one optimizer over everything, one ``balanced_step`` per batch."""
    params = [*net.parameters(), *rb.parameters()]
    opt = torch.optim.SGD(params, lr=lr)
    for step, (x, lbl) in enumerate(batches):
        out, base = net.step(x, lbl, "classification", step=step)
        balanced_step(out, base, [rb], opt)


# ==========================================================================================
# parity
# ==========================================================================================


@pytest.mark.parity
@pytest.mark.parametrize("dims", [DIMS2, DIMS3], ids=["M2", "M3"])
@pytest.mark.parametrize("stage", [0, 1, 2, 4])
@pytest.mark.parametrize("shared", [False, True], ids=["heads", "common_space"])
def test_boosting_step_gradients_match_the_released_code(dims, stage, shared):
    w1, w2, alpha, eta = 5.0, 1.0, 0.5, 0.75
    net = make_net(dims, "classification", shared)
    x, y = make_data(dims, 9, "classification")
    ref = copy.deepcopy(net)
    loss, name = released_phase1_loss(ref, x, y, stage, eta, w1, w2, alpha)
    loss.backward()
    rb = ReconBoost(
        tuple(dims),
        net.heads,
        stage_steps=2,
        rectify_steps=1,
        boost_rate=eta,
        consolidation_grad=False,
    ).double()
    out, base = net.step(x, y, "classification", step=3 * stage + 1)
    terms = rb.losses(out, base)
    assert set(terms) == set(TERMS)
    total = combine_losses(terms)
    torch.testing.assert_close(total, loss.detach())
    total.backward()
    for a, b in zip(grads(all_params(net, rb)), grads(all_params(ref, rb))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    trained = {*net.encoders[name].parameters(), *net.heads[name].parameters()}
    for p in all_params(net, rb):  # only the stage's learner moves
        assert (p.grad is not None) == (p in trained)
    assert all(p.grad is None for p in net.fusion.parameters())


@pytest.mark.parity
@pytest.mark.parametrize("dims", [DIMS2, DIMS3], ids=["M2", "M3"])
def test_rectification_step_gradients_match_the_released_code(dims):
    net = make_net(dims, "classification", shared=True)
    x, y = make_data(dims, 9, "classification")
    ref = copy.deepcopy(net)
    eta_ref = nn.Parameter(torch.tensor(0.75, dtype=torch.float64))
    loss = released_phase2_loss(ref, x, y, eta_ref)
    loss.backward()
    rb = ReconBoost(tuple(dims), net.heads, stage_steps=2, rectify_steps=3, boost_rate=0.75)
    rb = rb.double()
    out, base = net.step(x, y, "classification", step=4)  # stage 0, rectifying
    terms = rb.losses(out, base)
    torch.testing.assert_close(terms["reconboost_rectify"], loss.detach())
    combine_losses(terms).backward()
    ours = grads([*net.encoders.parameters(), *net.heads.parameters(), rb.boost_rate])
    theirs = grads([*ref.encoders.parameters(), *ref.heads.parameters(), eta_ref])
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert rb.boost_rate.grad.abs() > 0
    assert all(p.grad is None for p in net.fusion.parameters())


@pytest.mark.parity
@pytest.mark.parametrize("dims", [DIMS2, DIMS3], ids=["M2", "M3"])
def test_training_matches_the_released_loop_stage_for_stage(dims):
    """Several stages of SGD: the released loop's parameters, to float64 precision."""
    w1, w2, alpha, eta, lr, s_steps, r_steps = 5.0, 1.0, 0.5, 1.0, 0.3, 2, 2
    stages = 2 * len(dims) + 1
    batches = [make_data(dims, 8, "classification", seed=s) for s in range(stages * 4)]
    net = make_net(dims, "classification", shared=True)
    ref = copy.deepcopy(net)
    eta_ref = released_training(ref, eta, batches, stages, s_steps, r_steps, lr, w1, w2, alpha)
    rb = ReconBoost(
        tuple(dims), net.heads, stage_steps=s_steps, rectify_steps=r_steps, consolidation_grad=False
    ).double()
    our_training(net, rb, batches, lr)
    for a, b in zip([*net.encoders.parameters(), *net.heads.parameters()], ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(rb.boost_rate.detach(), eta_ref.detach())
    assert not torch.allclose(rb.boost_rate.detach(), torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parity
@pytest.mark.parametrize(
    "perturbed",
    [
        {"weight2": 0.5},  # another down-weighting
        {"stage_steps": 3, "rectify_steps": 1},  # another schedule
        {"consolidation_grad": True},  # the consolidation's gradient (our default)
    ],
    ids=["weight2", "schedule", "consolidation"],
)
def test_the_parity_comparison_catches_a_perturbed_rule(perturbed):
    dims = DIMS2
    batches = [make_data(dims, 8, "classification", seed=s) for s in range(12)]
    net = make_net(dims, "classification", shared=True)
    ref = copy.deepcopy(net)
    released_training(ref, 1.0, batches, 3, 2, 2, 0.3, 5.0, 1.0, 0.5)
    options = {"stage_steps": 2, "rectify_steps": 2, "consolidation_grad": False, **perturbed}
    rb = ReconBoost(tuple(dims), net.heads, **options).double()
    our_training(net, rb, batches, 0.3)
    assert any(
        not torch.allclose(a, b, rtol=1e-9, atol=1e-12)
        for a, b in zip([*net.encoders.parameters(), *net.heads.parameters()], ref.parameters())
    )


@pytest.mark.parity
@pytest.mark.parametrize("dims", [DIMS2, DIMS3], ids=["M2", "M3"])
def test_consolidation_gradient_is_the_released_term_with_the_learner_attached(dims):
    net = make_net(dims, "classification")
    x, y = make_data(dims, 9, "classification")
    ref = copy.deepcopy(net)
    loss, name = released_phase1_loss(ref, x, y, 1, 1.0, 5.0, 1.0, 0.5, ga_detach_current=False)
    loss.backward()
    rb = ReconBoost(tuple(dims), net.heads, stage_steps=1, rectify_steps=0).double()
    out, base = net.step(x, y, "classification", step=1)
    combine_losses(rb.losses(out, base)).backward()
    for a, b in zip(grads(all_params(net, rb)), grads(all_params(ref, rb))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # it differs from the released (detached) term, and reaches the current learner only
    detached = make_net(dims, "classification")
    rb_off = ReconBoost(
        tuple(dims), detached.heads, stage_steps=1, rectify_steps=0, consolidation_grad=False
    ).double()
    out, base = detached.step(x, y, "classification", step=1)
    combine_losses(rb_off.losses(out, base)).backward()
    assert not torch.allclose(net.encoders[name].weight.grad, detached.encoders[name].weight.grad)
    prev = net.modalities[0]
    assert net.encoders[prev].weight.grad is None


# ==========================================================================================
# the schedule
# ==========================================================================================


def test_stage_sequence_alternates_modalities_with_rectification_after_each():
    seq = [reconboost_stage(s, 3, 2, 1) for s in range(9)]
    assert seq == [
        (0, 0, False),
        (0, 0, False),
        (0, 0, True),
        (1, 1, False),
        (1, 1, False),
        (1, 1, True),
        (2, 2, False),
        (2, 2, False),
        (2, 2, True),
    ]
    assert reconboost_stage(9, 3, 2, 1) == (3, 0, False)
    assert [reconboost_stage(s, 2, 1, 0) for s in range(3)] == [
        (0, 0, False),
        (1, 1, False),
        (2, 0, False),
    ]


@settings(max_examples=60, deadline=None)
@given(m=st.integers(2, 4), s=st.integers(1, 5), r=st.integers(0, 5), cycles=st.integers(1, 3))
def test_every_modality_gets_its_share_of_steps(m, s, r, cycles):
    steps = [reconboost_stage(i, m, s, r) for i in range(cycles * m * (s + r))]
    boosted = [idx for _, idx, rect in steps if not rect]
    assert all(boosted.count(k) == cycles * s for k in range(m))
    assert sum(rect for _, _, rect in steps) == cycles * m * r
    stages = [t for t, _, _ in steps]
    assert stages == sorted(stages) and stages[-1] == cycles * m - 1


def test_method_stage_names_the_modality():
    rb = ReconBoost(["a", "b", "c"], dict.fromkeys("abc", nn.Identity()), stage_steps=2)
    assert rb.rectify_steps == 2  # default: as many as the boosting steps
    assert [rb.stage(s) for s in (0, 2, 4, 11, 12)] == [
        (0, "a", False),
        (0, "a", True),
        (1, "b", False),
        (2, "c", True),
        (3, "a", False),
    ]


# ==========================================================================================
# the terms, by hand
# ==========================================================================================


def test_boosting_weight_shrinks_where_the_ensemble_fits():
    pred = torch.zeros(3, 4, dtype=torch.float64, requires_grad=True)
    ens = torch.tensor([[20.0, 0, 0, 0], [0, 0, 0, 0], [0, 20.0, 0, 0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 0])
    loss = reconboost_boosting_loss(pred, ens, y, "classification", weight1=2.0, weight2=1.5)
    q = torch.tensor([1.0, 0.25, 0.0], dtype=torch.float64)  # ensemble's true-class prob
    expected = ((-2.0 + 1.5 * q) * torch.log(torch.tensor(0.25, dtype=torch.float64)) / 4).mean()
    torch.testing.assert_close(loss, expected, atol=1e-8, rtol=1e-6)
    loss.backward()
    g = pred.grad.norm(dim=1)
    assert g[0] < g[1] < g[2]  # the fitted sample pushes least
    ens.requires_grad_(True)
    reconboost_boosting_loss(pred, ens, y, "classification")
    assert ens.grad is None


@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_regression_boosting_fits_the_residual_the_others_leave(kind):
    f = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64, requires_grad=True)
    others = torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)
    y = torch.tensor([2.0, 0.0, 0.0], dtype=torch.float64)
    eta = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    loss = reconboost_boosting_loss(
        f, others, y, "regression", boost_rate=eta, regression_loss=kind
    )
    diff = 0.5 * f.detach() - (y - others)
    expected = diff.abs().mean() if kind == "l1" else diff.square().mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert eta.grad is None and f.grad.abs().sum() > 0
    # it is the ensemble's loss with the others (and eta) frozen
    ens = 0.5 * f.detach() + others
    ref = (ens - y).abs().mean() if kind == "l1" else (ens - y).square().mean()
    torch.testing.assert_close(loss.detach(), ref)


def test_consolidation_values_by_hand():
    a = torch.tensor([[0.0, 0.0], [2.0, 0.0]], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([[0.0, 0.0], [0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    got = reconboost_consolidation(a, b, "classification")
    p = torch.softmax(torch.tensor([2.0, 0.0], dtype=torch.float64), 0)
    expected = ((p - 0.5) ** 2).sum() / 4
    torch.testing.assert_close(got, expected)
    got.backward()
    assert a.grad.abs().sum() > 0 and b.grad is None
    off = reconboost_consolidation(a, b, "classification", grad=False)
    assert not off.requires_grad
    torch.testing.assert_close(off, expected)
    masked = reconboost_consolidation(a, b, "classification", present=torch.tensor([True, False]))
    torch.testing.assert_close(masked, torch.zeros((), dtype=torch.float64))


@pytest.mark.parametrize("dims", [DIMS2, DIMS3], ids=["M2", "M3"])
@pytest.mark.parametrize("task", ["classification", "regression"])
def test_terms_with_missing_modalities_leave_absent_samples_out(dims, task):
    net = make_net(dims, task)
    n = 10
    x, y = make_data(dims, n, task, seed=3)
    g = torch.Generator().manual_seed(1)
    present = {m: torch.rand(n, generator=g) > 0.3 for m in dims}
    names = tuple(dims)
    present[names[1]][0] = False  # sample 0 lacks the previous learner
    rb = ReconBoost(names, net.heads, stage_steps=1, rectify_steps=1, boost_rate=0.625).double()
    out, base = net.step(x, y, task, present, step=2)  # stage 1: learner names[1]
    terms = rb.losses(out, base)
    m, prev = names[1], names[0]
    f = {k: net.learner(k, x).detach() for k in names}
    rows = [i for i in range(n) if present[m][i]]
    per = []
    for i in rows:
        e = sum(0.625 * f[k][i] for k in names if k != m and present[k][i])
        e = torch.zeros_like(f[m][i]) + e
        if task == "classification":
            q = torch.softmax(e, 0)[y[i]]
            per.append((-5.0 + q) * torch.log_softmax(f[m][i], 0)[y[i]] / CLASSES)
        else:
            per.append((0.625 * f[m][i] - (y[i] - e)).abs())
    torch.testing.assert_close(terms["reconboost_boost"], torch.stack(per).mean())
    both = [i for i in range(n) if present[m][i] and present[prev][i]]

    def sq(v):
        return torch.softmax(v, 0) if task == "classification" else v

    cons = torch.stack([((sq(f[m][i]) - sq(f[prev][i])) ** 2).mean() for i in both]).mean()
    torch.testing.assert_close(terms["reconboost_consolidation"], 0.5 * cons)
    # rectification: the sum over present learners, samples with none left out
    out, base = net.step(x, y, task, present, step=3)
    rect = rb.losses(out, base)["reconboost_rectify"]
    ens = reconboost_ensemble(f, present, 0.625)
    keep = torch.stack(list(present.values())).any(0)
    ref = task_loss(ens[keep], y[keep], task)
    torch.testing.assert_close(rect, ref.to(rect.dtype))


def test_a_batch_without_the_stage_modality_gives_a_zero_with_a_graph():
    net = make_net(DIMS2, "classification")
    x, y = make_data(DIMS2, 5, "classification")
    present = {"audio": torch.zeros(5, dtype=torch.bool), "visual": torch.ones(5, dtype=torch.bool)}
    rb = ReconBoost(tuple(DIMS2), net.heads, stage_steps=1).double()
    out, base = net.step(x, y, "classification", present, step=0)
    terms = rb.losses(out, base)
    assert (
        float(terms["reconboost_boost"].detach()) == 0.0 and terms["reconboost_boost"].requires_grad
    )
    combine_losses(terms).backward()
    assert net.encoders["audio"].weight.grad.abs().sum() == 0


# ==========================================================================================
# gradient routing, regression and classification, M = 2 and 3
# ==========================================================================================


@pytest.mark.parametrize("dims", [DIMS2, DIMS3], ids=["M2", "M3"])
@pytest.mark.parametrize("task", ["classification", "regression"])
def test_each_term_reaches_what_it_should(dims, task):
    names = tuple(dims)
    for step, term in (
        (2, "reconboost_boost"),
        (2, "reconboost_consolidation"),
        (3, "reconboost_rectify"),
    ):
        net = make_net(dims, task)
        x, y = make_data(dims, 8, task)
        rb = ReconBoost(names, net.heads, stage_steps=1, rectify_steps=1, boost_rate=0.875).double()
        out, base = net.step(x, y, task, step=step)
        terms = rb.losses(out, base)
        assert terms[term].requires_grad
        terms[term].backward()
        reached = {
            k
            for k in names
            if net.encoders[k].weight.grad is not None
            and net.encoders[k].weight.grad.abs().sum() > 0
        }
        expected = set(names) if term == "reconboost_rectify" else {names[1]}
        assert reached == expected, term
        assert (rb.boost_rate.grad is not None) == (term == "reconboost_rectify")
        assert all(p.grad is None for p in net.fusion.parameters())
        others = [TERMS[i] for i in range(3) if TERMS[i] != term]
        idle = [t for t in others if not terms[t].requires_grad]
        assert idle == ([*others] if term == "reconboost_rectify" else ["reconboost_rectify"])


def test_no_consolidation_in_stage_zero_or_with_alpha_zero():
    net = make_net(DIMS2, "classification")
    x, y = make_data(DIMS2, 6, "classification")
    out, base = net.step(x, y, "classification", step=0)
    rb = ReconBoost(tuple(DIMS2), net.heads, stage_steps=1).double()
    assert float(rb.losses(out, base)["reconboost_consolidation"].detach()) == 0.0
    out = out._replace(step=2)
    assert float(rb.losses(out, base)["reconboost_consolidation"].detach()) > 0.0
    rb0 = ReconBoost(tuple(DIMS2), net.heads, stage_steps=1, alpha=0.0).double()
    assert float(rb0.losses(out, base)["reconboost_consolidation"].detach()) == 0.0


def test_frozen_boost_rate_and_regression_rectification():
    net = make_net(DIMS3, "regression")
    x, y = make_data(DIMS3, 8, "regression")
    rb = ReconBoost(
        tuple(DIMS3),
        net.heads,
        stage_steps=1,
        learn_boost_rate=False,
        regression_loss="l2",
        boost_rate=0.5,
    ).double()
    out, base = net.step(x, y, "regression", step=1)
    rect = rb.losses(out, base)["reconboost_rectify"]
    ens = 0.5 * sum(net.learner(m, x) for m in DIMS3)
    torch.testing.assert_close(rect, (ens - y).square().mean())
    rect.backward()
    assert rb.boost_rate.grad is None


# ==========================================================================================
# inference
# ==========================================================================================


@pytest.mark.parametrize("dims", [DIMS2, DIMS3], ids=["M2", "M3"])
@pytest.mark.parametrize("task", ["classification", "regression"])
def test_predict_is_the_boosted_sum_over_present_learners(dims, task):
    net = make_net(dims, task)
    x, _ = make_data(dims, 6, task)
    z = {m: torch.tanh(net.encoders[m](x[m])) for m in dims}
    rb = ReconBoost(tuple(dims), net.heads, boost_rate=0.625).double()
    f = {m: net.learner(m, x) for m in dims}
    torch.testing.assert_close(rb.predict(z), 0.625 * sum(f.values()))
    present = {m: torch.tensor([True, False, True, True, False, True]) for m in dims}
    first = next(iter(dims))
    present[first] = torch.ones(6, dtype=torch.bool)
    rows = []
    for i in range(6):
        have = [f[m][i] for m in dims if present[m][i]]
        rows.append(0.625 * sum(have))
    got = rb.predict(z, present)
    torch.testing.assert_close(got, torch.stack(rows))
    assert got.shape == ((6,) if task == "regression" else (6, CLASSES))
    assert not torch.allclose(got, rb.predict(z))


# ==========================================================================================
# the example model, host syncs, state, contract, errors
# ==========================================================================================


def _factory(model, seed, device):
    """The factory proposed for ``examples.pase.step.METHODS``."""
    return ReconBoost(model.modalities, model.unimodal_heads, stage_steps=20)


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_with_the_example_model_no_fusion_head_and_no_host_sync(task, monkeypatch):
    from test_host_sync import DIMS, _assert_no_sync, count_syncs, make_batch

    from examples.pase import METHODS, PAPER_SWITCHES, PaSEConfig, build

    monkeypatch.setitem(METHODS, "reconboost", _factory)
    extra = {"num_outputs": 4, "num_classes": 4} if task == "classification" else {}
    cfg = PaSEConfig(tuple(DIMS), dict(DIMS), dim=8, heads=2, task=task, **extra, **PAPER_SWITCHES)
    parts = build(cfg, methods=["reconboost"])
    (rb,) = parts.methods
    assert any(p is rb.boost_rate for g in parts.optimizer.param_groups for p in g["params"])
    rb.stage_steps, rb.rectify_steps = 1, 1  # boosting, rectification and consolidation steps
    head_before = copy.deepcopy(parts.model.head.state_dict())
    batch = make_batch(task, 4)
    counter = count_syncs(parts, batch, phases=(1, 2, 2, 2, 2))
    _assert_no_sync(counter, f"ReconBoost ({task})")
    for k, v in parts.model.head.state_dict().items():
        torch.testing.assert_close(v, head_before[k], rtol=0, atol=0)
    assert float(rb.boost_rate.detach()) != 1.0  # the rectification steps trained it
    pred = parts.model.predict(batch)
    own = rb.predict(pred["features"], pred["present"])
    uni = pred["unimodal"]
    torch.testing.assert_close(own, rb.boost_rate.detach() * sum(uni[m] for m in DIMS))
    assert set(rb.summary()) == {"boost_rate"}


def test_state_round_trip_and_contract():
    heads = {m: nn.Linear(2, 1) for m in ("text", "audio")}
    rb = ReconBoost(["text", "audio"], heads, boost_rate=0.3)
    assert not hasattr(rb, "coefficients")
    assert rb.phases == (1, 2) and not rb.needs_game and not rb.takes_backward
    assert rb.summary() == pytest.approx({"boost_rate": 0.3})
    with torch.no_grad():
        rb.boost_rate.fill_(0.77)
    state = rb.state_dict()
    assert set(state) == {"boost_rate", "_extra_state"}
    fresh = ReconBoost(["text", "audio"], heads)
    fresh.load_state_dict(state)
    assert fresh.summary() == pytest.approx({"boost_rate": 0.77})
    with pytest.raises(ModbalanceError, match="saved with modalities"):
        ReconBoost(["audio", "text"], heads).load_state_dict(state)
    bad = {**state, "boost_rate": torch.tensor(float("nan"))}
    with pytest.raises(ModbalanceError):
        ReconBoost(["text", "audio"], heads).load_state_dict(bad)
    assert list(rb.parameters()) == [rb.boost_rate]  # the heads are the model's
    assert "stage_steps=20" in repr(rb)


def test_other_phases_and_keep():
    net = make_net(DIMS2, "classification")
    x, y = make_data(DIMS2, 6, "classification")
    out, base = net.step(x, y, "classification", phase=1)
    rb = ReconBoost(tuple(DIMS2), net.heads, phases=(2,)).double()
    assert rb.losses(out, base) == base
    kept = ReconBoost(tuple(DIMS2), net.heads, keep="readout").double().losses(out, base)
    assert set(kept) == {"readout", *TERMS}
    assert kept["readout"] is base["readout"]


def test_errors_name_the_argument():
    heads = {m: nn.Linear(2, 3) for m in ("a", "b")}
    with pytest.raises(ModbalanceError, match="at least 2"):
        ReconBoost(["a"], heads)
    with pytest.raises(ModbalanceError, match="missing 'b'"):
        ReconBoost(["a", "b"], {"a": heads["a"]})
    with pytest.raises(TypeError, match=r"`heads\['b'\]` must be callable"):
        ReconBoost(["a", "b"], {"a": heads["a"], "b": 3})
    with pytest.raises(TypeError, match="`heads` must map"):
        ReconBoost(["a", "b"], [heads["a"], heads["b"]])
    for kwargs, match in [
        ({"stage_steps": 0}, "`stage_steps` must be >= 1"),
        ({"rectify_steps": -1}, "`rectify_steps` must be >= 0"),
        ({"weight1": 0.0}, "`weight1` must be > 0"),
        ({"weight2": 6.0}, r"`weight2` must be <= 5.0"),
        ({"alpha": -1.0}, "`alpha` must be >= 0"),
        ({"boost_rate": 0.0}, "`boost_rate` must be > 0"),
        ({"regression_loss": "huber"}, "`regression_loss`"),
        ({"keep": ["reconboost_rectify"]}, "must not name ReconBoost's own term"),
        ({"phases": (3,)}, "`phases`"),
    ]:
        with pytest.raises(ModbalanceError, match=match):
            ReconBoost(["a", "b"], heads, **kwargs)
    with pytest.raises(TypeError, match="`stage_steps` must be an int"):
        ReconBoost(["a", "b"], heads, stage_steps=2.0)
    with pytest.raises(TypeError, match="`consolidation_grad` must be a bool"):
        ReconBoost(["a", "b"], heads, consolidation_grad=1)
    with pytest.raises(TypeError, match="`learn_boost_rate` must be a bool"):
        ReconBoost(["a", "b"], heads, learn_boost_rate="yes")
    rb = ReconBoost(["a", "b"], heads)
    with pytest.raises(ModbalanceError, match="missing 'b'"):
        rb.predict({"a": torch.randn(4, 2)})
    z = {m: torch.randn(4, 2) for m in heads}
    with pytest.raises(ModbalanceError, match=r"`present\['a'\]` must have shape \(4,\)"):
        rb.predict(z, {"a": torch.ones(5, dtype=torch.bool)})
    y = torch.zeros(4, dtype=torch.long)
    out = StepOutput({"a": z["a"]}, {"a": torch.zeros(4, 3)}, None, {}, y, "classification")
    with pytest.raises(ModbalanceError, match="missing 'b'"):
        rb.losses(out, {})
    full = out._replace(unimodal={"a": torch.zeros(4, 3), "b": torch.zeros(4, 3)})
    with pytest.raises(TypeError, match="`step` must be an int"):
        rb.losses(full._replace(step=torch.tensor(1)), {})
    with pytest.raises(ModbalanceError, match="`step` must be >= 0"):
        rb.losses(full._replace(step=-1), {})
    with pytest.raises(ModbalanceError, match=r"`out.present\['b'\]` must have shape"):
        rb.losses(full._replace(present={"b": torch.ones(3, dtype=torch.bool)}), {})
    with pytest.raises(ModbalanceError, match=r"`out\.task`"):
        rb.losses(full._replace(task="ranking"), {})


def test_function_errors_name_the_argument():
    logits, y = torch.zeros(4, 3), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ModbalanceError, match="same shape"):
        reconboost_boosting_loss(logits, torch.zeros(4, 2), y, "classification")
    with pytest.raises(TypeError, match="integer class indices"):
        reconboost_boosting_loss(logits, logits, y.float(), "classification")
    with pytest.raises(ModbalanceError, match=r"`target` must have shape \(4,\)"):
        reconboost_boosting_loss(logits, logits, y[:3], "classification")
    with pytest.raises(ModbalanceError, match=r"must be \(N, C\) logits"):
        reconboost_boosting_loss(torch.zeros(4), torch.zeros(4), y, "classification")
    with pytest.raises(ModbalanceError, match=r"regression `pred` must be \(N,\)"):
        reconboost_boosting_loss(logits, logits, y.float(), "regression")
    with pytest.raises(ModbalanceError, match="`task`"):
        reconboost_boosting_loss(logits, logits, y, "ranking")
    with pytest.raises(ModbalanceError, match="`regression_loss`"):
        reconboost_boosting_loss(
            y.float(), y.float(), y.float(), "regression", regression_loss="huber"
        )
    with pytest.raises(ModbalanceError, match=r"`present` must have shape \(4,\)"):
        reconboost_consolidation(logits, logits, "classification", present=torch.ones(2) > 0)
    with pytest.raises(ModbalanceError, match="`previous` must have the same shape"):
        reconboost_consolidation(logits, torch.zeros(4, 2), "classification")
    with pytest.raises(ModbalanceError, match="non-empty mapping"):
        reconboost_ensemble({})
    with pytest.raises(ModbalanceError, match="`exclude` must name"):
        reconboost_ensemble({"a": logits}, exclude="b")
    with pytest.raises(ModbalanceError, match="same shape"):
        reconboost_ensemble({"a": logits, "b": torch.zeros(4, 2)})
    with pytest.raises(TypeError, match=r"must be a torch\.Tensor"):
        reconboost_ensemble({"a": [1.0]})
    with pytest.raises(ModbalanceError, match="`num_modalities` must be >= 1"):
        reconboost_stage(0, 0, 1, 1)
