"""G2D and UMT: parity with the released code and the port, routing, SMP, masks, errors, state.

G2D's parity tests compare our method with a transcription of the authors' code (rAIson-Lab/G2D:
``student.py``'s ``train`` with ``exp_name = 'aT+aTF+vT+vTF-to-mS'``, ``distillation_loss``,
``feature_loss``; ``utils/utils.py``'s ``modulate_gradients_based_on_scores_from_two_modalities``;
the ``late`` fusion of ``models/fusion_modules.py``), written out below in float64. The code has two
modalities and classification only, so the M = 3 and regression references generalise it by hand
(the strongest teacher's modality held back, or only the weakest one learning; L1 distances and a
-MAE teacher score).
UMT's reference is BalanceMM's port (GeWu-Lab/BalanceBenchmark ``balancemm/trainer/
UMT_trainer.py::training_step``: ``CE + scaling * sum_m MSELoss(teacher_feat_m, feat_m)``).
"""

from __future__ import annotations

import copy

import _reference
import pytest
import torch
import torch.nn.functional as F
from _reference import grads, make_data
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from modbalance import ModbalanceError
from modbalance.balancing import StepOutput, balanced_step, combine_losses
from modbalance.methods.g2d import G2D, g2d_logit_distance, g2d_teacher_scores, smp_mask
from modbalance.methods.umt import UMT, masked_feature_mse
from modbalance.teachers import TeacherOutput, UnimodalTeachers

DIMS2 = {"audio": 3, "visual": 5}
DIMS3 = {"text": 3, "audio": 2, "visual": 4}
HIDDEN = 4
CLASSES = 3
N = 10


class Net(nn.Module):
    """Encoders and the released ``LateFusion`` head: the mean of ``fc_m(z_m)`` (float64)."""

    def __init__(self, dims, out_dim):
        super().__init__()
        self.modalities = tuple(dims)
        self.out_dim = out_dim
        self.encoders = nn.ModuleDict({m: nn.Linear(d, HIDDEN) for m, d in dims.items()})
        self.fusion = nn.ModuleDict({m: nn.Linear(HIDDEN, out_dim) for m in dims})
        self.double()

    def encode(self, x):
        return {m: torch.tanh(self.encoders[m](x[m])) for m in self.modalities}

    def pred(self, logits):
        return logits[:, 0] if self.out_dim == 1 else logits

    def fuse(self, z, present):
        """Mean over the present modalities (the released ``(fc_x(x) + fc_y(y)) / 2``)."""
        total, count = 0, 0
        for m in self.modalities:
            w = present[m].to(z[m].dtype)[:, None]
            total = total + self.fusion[m](z[m]) * w
            count = count + w
        return self.pred(total / count.clamp_min(1.0))

    def step(self, x, y, task, teacher=None, present=None):
        z = self.encode(x)
        full = {m: torch.ones(y.shape[0], dtype=torch.bool) for m in self.modalities}
        present = present or full
        fused = self.fuse(z, present)
        uni = {m: self.pred(self.fusion[m](z[m])) for m in self.modalities}
        out = StepOutput(z, uni, fused, present, y, task, fuse=self.fuse, teacher=teacher)
        loss = F.l1_loss(fused, y) if task == "regression" else F.cross_entropy(fused, y)
        return out, {"task": loss}


def make_teachers(dims, out_dim, seed=1):
    torch.manual_seed(seed)
    enc = {m: nn.Sequential(nn.Linear(d, HIDDEN), nn.Tanh()).double() for m, d in dims.items()}
    heads = {m: nn.Linear(HIDDEN, out_dim).double() for m in dims}
    return UnimodalTeachers(enc, heads)


def teacher_output(teachers, x, y, task, boost=None):
    """The teachers' outputs, ``boost[m]`` making teacher ``m`` more right (or wrong if < 0)."""
    t = teachers(x)
    uni = dict(t.unimodal)
    for m, b in (boost or {}).items():
        if task == "classification":
            uni[m] = uni[m] + b * F.one_hot(y, CLASSES).double()
        else:
            uni[m] = y + (uni[m] - y) * float(torch.exp(torch.tensor(-b)))
    return TeacherOutput(t.features, uni)


def assert_grads_close(a, b):
    _reference.assert_grads_close(a, b, rtol=1e-9, atol=1e-12)


def grads_differ(a, b):
    return _reference.grads_differ(a, b, rtol=1e-6, atol=1e-9)


def full(dims, n):
    return {m: torch.ones(n, dtype=torch.bool) for m in dims}


# ==========================================================================================
# G2D: the released rule, transcribed (float64)
# ==========================================================================================


def distillation_loss(student_logits, teacher_logits, temp):
    """``student.py::distillation_loss``."""
    soft_teacher = F.softmax(teacher_logits / temp, dim=1)
    log_student = F.log_softmax(student_logits / temp, dim=1)
    return F.kl_div(log_student, soft_teacher, reduction="batchmean") * (temp**2)


def feature_loss(student_features, teacher_features):
    """``student.py::feature_loss``."""
    return F.mse_loss(student_features, teacher_features)


def released_g2d_step(net, x, y, teacher, temp=1.0, wl=1.0, wf=1.0, how=None):
    """``train`` for ``aT+aTF+vT+vTF-to-mS`` with ``modulation = 'G2D'``; ``how`` perturbs it.

    CE(fused) + per teacher ``distillation_loss * logit_weight + feature_loss * feature_weight``,
    ``backward``, then ``modulate_gradients_based_on_scores_from_two_modalities``: the sums of
    the teachers' true-class probabilities; the higher one's encoder ``grad * 0``, the other's
    ``grad * 1`` (released: the 4-D conv weights of ``audio*``/``visual*``; here the encoders).
    """
    a, v = net.modalities
    net.zero_grad(set_to_none=True)
    z = net.encode(x)
    out = (net.fusion[a](z[a]) + net.fusion[v](z[v])) / 2
    loss = F.cross_entropy(out, y) * 1.0
    for m in (a, v):
        t_logits, t_feat = teacher.unimodal[m], teacher.features[m]
        if how == "kl-reversed":
            log_t, p_s = F.log_softmax(t_logits / temp, 1), F.softmax(out / temp, 1)
            kd = F.kl_div(log_t, p_s, reduction="batchmean") * temp**2
        elif how == "no-t2":
            kd = distillation_loss(out, t_logits, temp) / temp**2
        else:
            kd = distillation_loss(out, t_logits, temp)
        loss = loss + kd * wl
        if how != "no-feature":
            loss = loss + feature_loss(z[m], t_feat) * wf
    loss.backward()
    src = {m: net.fusion[m](z[m]).detach() for m in (a, v)} if how == "student-scores" else None
    logits = src or {m: teacher.unimodal[m] for m in (a, v)}
    score = {m: sum(F.softmax(logits[m], 1)[i][y[i]] for i in range(y.shape[0])) for m in (a, v)}
    if score[a] > score[v]:
        coeff = {a: 0.0, v: 1.0}
    elif score[a] < score[v]:
        coeff = {a: 1.0, v: 0.0}
    else:
        raise ValueError("equal teacher scores")
    if how == "smp-reversed":
        coeff = {m: 1.0 - c for m, c in coeff.items()}
    for m in (a, v):
        for p in net.encoders[m].parameters():
            p.grad = p.grad * coeff[m]
    return grads(net), coeff


def generalised_g2d_step(net, x, y, task, teacher, temp=1.0, rule="drop_strongest"):
    """The released rule generalised by hand: M modalities, regression (L1, score -MAE).

    ``rule``: ``drop_strongest`` zeroes the strongest teacher's encoder only (the default),
    ``keep_weakest`` zeroes every encoder but the weakest teacher's. Returns the gradients and
    the 0/1 factor per modality.
    """
    net.zero_grad(set_to_none=True)
    z = net.encode(x)
    out = sum(net.pred(net.fusion[m](z[m])) for m in net.modalities) / len(net.modalities)
    if task == "regression":
        loss = F.l1_loss(out, y)
        for m in net.modalities:
            loss = (
                loss + F.l1_loss(out, teacher.unimodal[m]) + feature_loss(z[m], teacher.features[m])
            )
        scores = [-(teacher.unimodal[m] - y).abs().mean() for m in net.modalities]
    else:
        loss = F.cross_entropy(out, y)
        for m in net.modalities:
            loss = loss + distillation_loss(out, teacher.unimodal[m], temp)
            loss = loss + feature_loss(z[m], teacher.features[m])
        scores = [F.softmax(teacher.unimodal[m], 1)[torch.arange(len(y)), y].sum()
                  for m in net.modalities]  # fmt: skip
    loss.backward()
    weakest = min(range(len(scores)), key=lambda i: float(scores[i]))
    strongest = max(range(len(scores)), key=lambda i: float(scores[i]))
    if rule == "keep_weakest":
        factor = [float(i == weakest) for i in range(len(scores))]
    else:
        factor = [float(i != strongest) for i in range(len(scores))]
    for i, m in enumerate(net.modalities):
        for p in net.encoders[m].parameters():
            p.grad = p.grad * factor[i]
    return grads(net), factor


def ours_g2d_step(net, x, y, task, teacher, present=None, **options):
    net.zero_grad(set_to_none=True)
    out, base = net.step(x, y, task, teacher, present)
    g2d = G2D(net.modalities, net.encoders, **options)
    terms = g2d.losses(out, base)
    combine_losses(terms).backward()
    with g2d.around_step(out, torch.optim.SGD(net.parameters(), lr=0.0)):
        got = grads(net)
    return got, terms, g2d


@pytest.mark.parity
@pytest.mark.parametrize("temp", [1.0, 2.0])
@pytest.mark.parametrize("boost", ["audio", "visual"])
@pytest.mark.parametrize(("wl", "wf"), [(1.0, 1.0), (0.5, 2.0)])
def test_g2d_gradients_match_the_released_code(temp, boost, wl, wf):
    torch.manual_seed(0)
    net = Net(DIMS2, CLASSES)
    x, y = make_data(DIMS2, N, "classification")
    teacher = teacher_output(make_teachers(DIMS2, CLASSES), x, y, "classification", {boost: 3.0})
    ours, terms, g2d = ours_g2d_step(
        net, x, y, "classification", teacher, temperature=temp, logit_weight=wl, feature_weight=wf
    )
    ref, coeff = released_g2d_step(net, x, y, teacher, temp, wl, wf)
    assert_grads_close(ours, ref)
    assert coeff[boost] == 0.0  # the stronger teacher's modality was switched off
    assert g2d.coefficients.tolist() == [coeff[m] for m in DIMS2]
    for m, c in coeff.items():  # not vacuous: the kept encoder and the head have gradient
        total = sum(float(g.abs().sum()) for k, g in ours.items() if k.startswith(f"encoders.{m}"))
        assert (total > 0) == (c == 1.0)
    assert all(float(g.abs().sum()) > 0 for k, g in ours.items() if k.startswith("fusion"))
    assert set(terms) == {"task", *(f"g2d_{k}_{m}" for k in ("kd", "feat") for m in DIMS2)}


@pytest.mark.parity
@pytest.mark.parametrize("how", ["kl-reversed", "no-t2", "smp-reversed", "no-feature"])
def test_g2d_parity_catches_a_perturbed_rule(how):
    torch.manual_seed(0)
    net = Net(DIMS2, CLASSES)
    x, y = make_data(DIMS2, N, "classification")
    teacher = teacher_output(make_teachers(DIMS2, CLASSES), x, y, "classification", {"audio": 2})
    ours, _, _ = ours_g2d_step(net, x, y, "classification", teacher, temperature=2.0)
    ref, _ = released_g2d_step(net, x, y, teacher, 2.0, how=how)
    assert grads_differ(ours, ref)


@pytest.mark.parity
def test_g2d_parity_catches_prioritisation_by_the_students_scores():
    """SMP reads the teachers' scores; the students' (logged only in the code) rank otherwise."""
    torch.manual_seed(0)
    net = Net(DIMS2, CLASSES)
    x, y = make_data(DIMS2, N, "classification")
    z = net.encode(x)
    with torch.no_grad():
        prob = {m: F.softmax(net.fusion[m](z[m]), 1)[torch.arange(N), y] for m in DIMS2}
    student = {m: float(p.sum()) for m, p in prob.items()}
    weaker = min(student, key=student.get)  # its teacher is made the strong one
    teacher = teacher_output(make_teachers(DIMS2, CLASSES), x, y, "classification", {weaker: 5})
    ours, _, _ = ours_g2d_step(net, x, y, "classification", teacher)
    assert_grads_close(ours, released_g2d_step(net, x, y, teacher)[0])
    assert grads_differ(ours, released_g2d_step(net, x, y, teacher, how="student-scores")[0])


@pytest.mark.parity
@pytest.mark.parametrize(
    ("dims", "task"),
    [(DIMS3, "classification"), (DIMS2, "regression"), (DIMS3, "regression")],
    ids=["M3-cls", "M2-reg", "M3-reg"],
)
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("rule", ["drop_strongest", "keep_weakest"])
def test_g2d_generalised_rule_for_m3_and_regression(dims, task, seed, rule):
    torch.manual_seed(seed)
    out_dim = 1 if task == "regression" else CLASSES
    net = Net(dims, out_dim)
    x, y = make_data(dims, N, task, seed)
    boost = {list(dims)[seed]: 2.0}
    teacher = teacher_output(make_teachers(dims, out_dim, seed), x, y, task, boost)
    ours, _, g2d = ours_g2d_step(net, x, y, task, teacher, smp=rule)
    ref, factor = generalised_g2d_step(net, x, y, task, teacher, rule=rule)
    assert_grads_close(ours, ref)
    assert g2d.coefficients.tolist() == factor
    other = "keep_weakest" if rule == "drop_strongest" else "drop_strongest"
    theirs, other_factor = generalised_g2d_step(net, x, y, task, teacher, rule=other)
    if len(dims) > 2:  # the two rules differ from three modalities on, and parity sees it
        assert other_factor != factor and grads_differ(ours, theirs)
    else:  # and coincide at two (the released rule)
        assert other_factor == factor
    # perturbed: the strongest teacher's modality kept alone
    perturbed = {k: v.clone() for k, v in ref.items()}
    net.zero_grad(set_to_none=True)
    out, base = net.step(x, y, task, teacher)
    combine_losses(G2D(net.modalities, net.encoders).losses(out, base)).backward()
    strongest = max(range(len(dims)), key=lambda i: float(g2d.teacher_scores[i]))
    for i, m in enumerate(dims):
        for name, p in net.encoders[m].named_parameters():
            perturbed[f"encoders.{m}.{name}"] = p.grad * float(i == strongest)
    assert grads_differ(ours, perturbed)


@pytest.mark.parity
def test_g2d_balanced_step_with_sgd_matches_the_released_loop():
    """Two optimiser steps (SGD, momentum 0.9, weight decay: ``config.py``'s optimiser)."""
    torch.manual_seed(0)
    net = Net(DIMS2, CLASSES)
    ref_net = copy.deepcopy(net)
    teachers = make_teachers(DIMS2, CLASSES)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    ref_opt = torch.optim.SGD(ref_net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    g2d = G2D(net.modalities, net.encoders)
    for step, boost in enumerate(["audio", "visual"]):
        x, y = make_data(DIMS2, N, "classification", seed=step)
        teacher = teacher_output(teachers, x, y, "classification", {boost: 3.0})
        out, base = net.step(x, y, "classification", teacher)
        balanced_step(out._replace(step=step), base, [g2d], opt)
        ref_opt.zero_grad()
        released_g2d_step(ref_net, x, y, teacher)
        ref_opt.step()
        for a, b in zip(net.parameters(), ref_net.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert g2d.summary()["kept_fraction_audio"] == 0.5


# ------------------------------------------------------------------------------------------
# G2D: terms, routing, masks
# ------------------------------------------------------------------------------------------


def hand_teacher(dims, n, out_shape, requires_grad=True, seed=3):
    """A TeacherOutput of leaf tensors that would collect gradient if any reached them."""
    g = torch.Generator().manual_seed(seed)
    feats = {m: torch.randn(n, HIDDEN, generator=g, dtype=torch.float64) for m in dims}
    uni = {m: torch.randn(n, *out_shape, generator=g, dtype=torch.float64) for m in dims}
    for t in [*feats.values(), *uni.values()]:
        t.requires_grad_(requires_grad)
    return TeacherOutput(feats, uni)


@pytest.mark.parametrize("dims", [DIMS2, DIMS3], ids=["M2", "M3"])
@pytest.mark.parametrize("task", ["classification", "regression"])
def test_g2d_feature_terms_reach_their_encoder_and_kd_terms_the_fused_path(dims, task):
    out_dim = 1 if task == "regression" else CLASSES
    net = Net(dims, out_dim)
    x, y = make_data(dims, N, task)
    teacher = hand_teacher(dims, N, () if out_dim == 1 else (CLASSES,))
    leaves = [*teacher.features.values(), *teacher.unimodal.values()]
    m0 = next(iter(dims))
    out, base = net.step(x, y, task, teacher)
    terms = G2D(net.modalities, net.encoders).losses(out, base)
    terms[f"g2d_feat_{m0}"].backward()
    assert net.encoders[m0].weight.grad.abs().sum() > 0
    assert all(net.encoders[m].weight.grad is None for m in dims if m != m0)
    assert all(p.grad is None for p in net.fusion.parameters())
    net.zero_grad(set_to_none=True)
    out, base = net.step(x, y, task, teacher)
    G2D(net.modalities, net.encoders).losses(out, base)[f"g2d_kd_{m0}"].backward()
    assert all(p.grad.abs().sum() > 0 for p in net.fusion.parameters())
    assert all(net.encoders[m].weight.grad.abs().sum() > 0 for m in dims)
    assert all(t.grad is None for t in leaves)  # never the teachers


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_g2d_term_values(task):
    out_dim = 1 if task == "regression" else CLASSES
    net = Net(DIMS3, out_dim)
    x, y = make_data(DIMS3, N, task)
    teacher = hand_teacher(DIMS3, N, () if out_dim == 1 else (CLASSES,), requires_grad=False)
    out, base = net.step(x, y, task, teacher)
    weights = {"text": 0.5, "audio": 2.0, "visual": 1.0}
    features = {"text": 0.0, "audio": 1.0, "visual": 4.0}
    g2d = G2D(net.modalities, net.encoders, temperature=3.0, logit_weight=weights,
              feature_weight=features)  # fmt: skip
    terms = g2d.losses(out, base)
    assert "g2d_feat_text" not in terms  # a zero weight leaves its term out
    for m, w in weights.items():
        t = teacher.unimodal[m]
        if task == "regression":
            kd = (out.fused - t).abs().mean()
        else:
            kd = distillation_loss(out.fused, t, 3.0)
        torch.testing.assert_close(terms[f"g2d_kd_{m}"], w * kd)
    torch.testing.assert_close(
        terms["g2d_feat_visual"],
        4.0 * F.mse_loss(out.features["visual"], teacher.features["visual"]),
    )
    torch.testing.assert_close(terms["task"], base["task"])


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_g2d_absent_samples_change_nothing(task):
    out_dim = 1 if task == "regression" else CLASSES
    net = Net(DIMS3, out_dim)
    x, y = make_data(DIMS3, 8, task)
    teacher = hand_teacher(DIMS3, 8, () if out_dim == 1 else (CLASSES,), requires_grad=False)
    present = full(DIMS3, 8)
    present["audio"] = torch.tensor([True, False, True, False, True, True, False, True])
    ours, terms, g2d = ours_g2d_step(net, x, y, task, teacher, present)
    # the audio terms by hand, on the present rows only
    keep = present["audio"]
    out, _ = net.step(x, y, task, teacher, present)
    feat = F.mse_loss(out.features["audio"][keep], teacher.features["audio"][keep])
    torch.testing.assert_close(terms["g2d_feat_audio"], feat)
    if task == "classification":
        kd = distillation_loss(out.fused[keep], teacher.unimodal["audio"][keep], 1.0)
    else:
        kd = (out.fused[keep] - teacher.unimodal["audio"][keep]).abs().mean()
    torch.testing.assert_close(terms["g2d_kd_audio"], kd)
    # absent rows may hold anything: NaN teacher rows, huge student inputs
    bad_uni = teacher.unimodal["audio"].clone()
    bad_uni[~keep] = float("nan")
    bad_feat = teacher.features["audio"].clone()
    bad_feat[~keep] = float("nan")
    bad = TeacherOutput(
        {**teacher.features, "audio": bad_feat}, {**teacher.unimodal, "audio": bad_uni}
    )
    x2 = {**x, "audio": x["audio"].clone()}
    x2["audio"][~keep] = 100.0
    again, _, g2d2 = ours_g2d_step(net, x2, y, task, bad, present)
    assert_grads_close(again, ours)
    torch.testing.assert_close(g2d2.teacher_scores, g2d.teacher_scores)


def test_g2d_teacher_scores_and_the_mask_rule():
    y = torch.tensor([0, 1, 2, 0])
    strong = 10.0 * F.one_hot(y, 3).double()
    teacher = TeacherOutput({}, {"a": strong, "b": torch.zeros(4, 3), "c": -strong})
    present = {"c": torch.zeros(4, dtype=torch.bool)}
    s = g2d_teacher_scores(teacher, y, present, ("a", "b", "c"), "classification")
    torch.testing.assert_close(s[:2], torch.tensor([1 / (1 + 2 * torch.e**-10), 1 / 3]).double())
    assert s[2] == float("inf")  # absent from the batch: never the one kept
    assert smp_mask(s, "keep_weakest").tolist() == [0.0, 1.0, 0.0]
    assert smp_mask(s).tolist() == [0.0, 1.0, 1.0]  # the absent one is not the strongest
    reg = TeacherOutput({}, {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0, 0.0])})
    s = g2d_teacher_scores(reg, torch.tensor([1.0, 1.0]), {}, ("a", "b"), "regression")
    assert s.tolist() == [-0.5, -1.0]
    tie = torch.tensor([0.3, 0.3, 0.9])
    assert smp_mask(tie, "keep_weakest").tolist() == [1.0, 0.0, 0.0]  # ties: first
    assert smp_mask(torch.tensor([0.9, 0.3, 0.9])).tolist() == [1.0, 1.0, 0.0]  # ties: last
    with pytest.raises(ModbalanceError, match="`rule` must be one of"):
        smp_mask(tie, "keep_strongest")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-5, 5, allow_nan=False, width=32), min_size=2, max_size=5))
def test_smp_mask_keeps_exactly_the_first_lowest_score(scores):
    mask = smp_mask(torch.tensor(scores), "keep_weakest")
    lowest = scores.index(min(scores))
    assert mask.tolist() == [float(i == lowest) for i in range(len(scores))]
    if len(scores) == 2 and scores[0] != scores[1]:  # the released two-modality comparison
        assert mask.tolist() == ([0.0, 1.0] if scores[0] > scores[1] else [1.0, 0.0])
    dropped = len(scores) - 1 - scores[::-1].index(max(scores))
    drop = smp_mask(torch.tensor(scores))
    assert drop.tolist() == [float(i != dropped) for i in range(len(scores))]
    if len(scores) == 2:  # both rules are the released one at M = 2, ties included
        assert drop.tolist() == mask.tolist()


def test_g2d_smp_window_phases_and_epoch_summary():
    net = Net(DIMS2, CLASSES)
    x, y = make_data(DIMS2, N, "classification")
    teacher = teacher_output(make_teachers(DIMS2, CLASSES), x, y, "classification", {"audio": 3})
    g2d = G2D(net.modalities, net.encoders, smp_until=1)
    opt = torch.optim.SGD(net.parameters(), lr=0.0)

    def step(k, phase=2):
        net.zero_grad(set_to_none=True)
        out, base = net.step(x, y, "classification", teacher)
        out = out._replace(step=k, phase=phase)
        combine_losses(g2d.losses(out, base)).backward()
        before = grads(net)
        with g2d.around_step(out, opt):
            return before, grads(net)

    before, after = step(0)
    assert g2d.coefficients.tolist() == [0.0, 1.0]
    assert float(after["encoders.audio.weight"].abs().sum()) == 0.0
    assert torch.equal(after["encoders.visual.weight"], before["encoders.visual.weight"])
    before, after = step(1)  # past the window: nothing is masked
    assert g2d.coefficients.tolist() == [1.0, 1.0]
    assert_grads_close(after, before)
    out, base = net.step(x, y, "classification", teacher)
    assert g2d.losses(out._replace(phase=1), base) == base
    summary = g2d.summary()
    assert summary["coefficient_audio"] == 1.0 and summary["kept_fraction_visual"] == 1.0
    assert summary["kept_fraction_audio"] == 0.0 and summary["teacher_score_audio"] > 0.5
    assert all(isinstance(v, float) for v in summary.values())
    g2d.epoch_end(0)
    assert g2d.smp_steps == 0 and g2d.kept_steps.tolist() == [0.0, 0.0]


def test_g2d_under_adam_a_zeroed_encoder_still_moves_on_momentum():
    """The docstring's claim: SMP withholds the fresh gradient, Adam's moments keep moving."""
    net = Net(DIMS2, CLASSES)
    teachers = make_teachers(DIMS2, CLASSES)
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    g2d = G2D(net.modalities, net.encoders)
    for step, boost in enumerate(["visual", "audio"]):  # audio kept, then switched off
        x, y = make_data(DIMS2, N, "classification", seed=step)
        teacher = teacher_output(teachers, x, y, "classification", {boost: 5.0})
        out, base = net.step(x, y, "classification", teacher)
        before = net.encoders["audio"].weight.detach().clone()
        balanced_step(out, base, [g2d], opt)
    assert g2d.coefficients.tolist() == [0.0, 1.0]
    assert float(net.encoders["audio"].weight.grad.abs().sum()) == 0.0
    assert not torch.equal(net.encoders["audio"].weight, before)


def test_g2d_state_round_trip():
    net = Net(DIMS2, CLASSES)
    x, y = make_data(DIMS2, N, "classification")
    teacher = teacher_output(make_teachers(DIMS2, CLASSES), x, y, "classification", {"visual": 3})
    _, _, g2d = ours_g2d_step(net, x, y, "classification", teacher)
    state = g2d.state_dict()
    assert {"coefficients", "teacher_scores", "kept_steps", "smp_steps"} <= set(state)
    fresh = G2D(net.modalities, net.encoders)
    fresh.load_state_dict(state)
    for k, v in state.items():
        torch.testing.assert_close(fresh.state_dict()[k], v)
    assert fresh.coefficients.tolist() == [1.0, 0.0]
    swapped = G2D(["visual", "audio"], {m: net.encoders[m] for m in ("visual", "audio")})
    with pytest.raises(ModbalanceError, match="saved with modalities"):
        swapped.load_state_dict(state)
    with pytest.raises(ModbalanceError, match="must be >= 0"):
        fresh.load_state_dict({**state, "kept_steps": torch.tensor([-1.0, 0.0])})
    assert G2D.needs_teacher and fresh.phases == (2,) and fresh.predict({}, None) is None
    assert not list(fresh.parameters())  # the groups are the model's, not the method's


# ==========================================================================================
# UMT: BalanceMM's port, transcribed
# ==========================================================================================


def port_umt_step(net, x, y, task, teacher, scaling, how=None):
    """``UMTTrainer.training_step``: ``criterion(out, label) + scaling * MSE(t_m, h_m)``."""
    net.zero_grad(set_to_none=True)
    z = net.encode(x)
    out = sum(net.pred(net.fusion[m](z[m])) for m in net.modalities) / len(net.modalities)
    loss = F.cross_entropy(out, y) if task == "classification" else F.l1_loss(out, y)
    names = list(net.modalities)
    for i, m in enumerate(names):
        t = teacher.features[names[i - 1] if how == "swapped" else m]
        if how == "sum":
            loss = loss + scaling * F.mse_loss(t, z[m], reduction="sum")
        else:
            loss = loss + (1.0 if how == "scaling" else scaling) * nn.MSELoss()(t, z[m])
    loss.backward()
    return grads(net)


def ours_umt_step(net, x, y, task, teacher, present=None, **options):
    net.zero_grad(set_to_none=True)
    out, base = net.step(x, y, task, teacher, present)
    umt = UMT(net.modalities, **options)
    terms = umt.losses(out, base)
    combine_losses(terms).backward()
    return grads(net), terms, umt


@pytest.mark.parity
@pytest.mark.parametrize("dims", [DIMS2, DIMS3], ids=["M2", "M3"])
@pytest.mark.parametrize("task", ["classification", "regression"])
@pytest.mark.parametrize("scaling", [10.0, 0.5])
def test_umt_gradients_match_balancemm(dims, task, scaling):
    torch.manual_seed(0)
    out_dim = 1 if task == "regression" else CLASSES
    net = Net(dims, out_dim)
    x, y = make_data(dims, N, task)
    teacher = make_teachers(dims, out_dim)(x)
    ours, terms, _ = ours_umt_step(net, x, y, task, teacher, weight=scaling)
    assert_grads_close(ours, port_umt_step(net, x, y, task, teacher, scaling))
    assert set(terms) == {"task", *(f"umt_{m}" for m in dims)}
    assert all(float(g.abs().sum()) > 0 for g in ours.values())


@pytest.mark.parity
@pytest.mark.parametrize("how", ["scaling", "sum", "swapped"])
def test_umt_parity_catches_a_perturbed_rule(how):
    torch.manual_seed(0)
    net = Net(DIMS3, CLASSES)
    x, y = make_data(DIMS3, N, "classification")
    teacher = make_teachers(DIMS3, CLASSES)(x)
    ours, _, _ = ours_umt_step(net, x, y, "classification", teacher)
    assert grads_differ(ours, port_umt_step(net, x, y, "classification", teacher, 10.0, how))


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_umt_terms_reach_their_own_encoder_only(task):
    out_dim = 1 if task == "regression" else CLASSES
    net = Net(DIMS3, out_dim)
    x, y = make_data(DIMS3, N, task)
    teacher = hand_teacher(DIMS3, N, () if out_dim == 1 else (CLASSES,))
    out, base = net.step(x, y, task, teacher)
    terms = UMT(net.modalities, weight={"text": 1.0, "audio": 2.0, "visual": 0.0}).losses(out, base)
    terms["umt_audio"].backward()
    assert net.encoders["audio"].weight.grad.abs().sum() > 0
    assert net.encoders["text"].weight.grad is None and net.encoders["visual"].weight.grad is None
    assert all(p.grad is None for p in net.fusion.parameters())
    assert all(t.grad is None for t in teacher.features.values())  # never the teachers
    expected = 2.0 * F.mse_loss(out.features["audio"], teacher.features["audio"])
    torch.testing.assert_close(terms["umt_audio"], expected)
    assert float(terms["umt_visual"].detach()) == 0.0


def test_umt_absent_samples_change_nothing():
    net = Net(DIMS2, CLASSES)
    x, y = make_data(DIMS2, 8, "classification")
    teacher = hand_teacher(DIMS2, 8, (CLASSES,), requires_grad=False)
    present = full(DIMS2, 8)
    present["visual"] = torch.tensor([False, True, True, False, True, True, True, False])
    keep = present["visual"]
    ours, terms, _ = ours_umt_step(net, x, y, "classification", teacher, present)
    out, _ = net.step(x, y, "classification", teacher, present)
    expected = 10.0 * F.mse_loss(out.features["visual"][keep], teacher.features["visual"][keep])
    torch.testing.assert_close(terms["umt_visual"], expected)
    bad = teacher.features["visual"].clone()
    bad[~keep] = float("nan")
    x2 = {**x, "visual": x["visual"].clone()}
    x2["visual"][~keep] = 50.0
    teacher2 = TeacherOutput({**teacher.features, "visual": bad}, teacher.unimodal)
    again, _, _ = ours_umt_step(net, x2, y, "classification", teacher2, present)
    assert_grads_close(again, ours)
    none = {**present, "visual": torch.zeros(8, dtype=torch.bool)}
    _, terms, _ = ours_umt_step(net, x, y, "classification", teacher, none)
    assert float(terms["umt_visual"].detach()) == 0.0  # no sample has it: zero, still in the graph


def test_masked_feature_mse_is_mse_loss_on_the_present_rows():
    g = torch.Generator().manual_seed(0)
    z, t = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    mask = torch.tensor([True, True, False, True, False, True])
    torch.testing.assert_close(masked_feature_mse(z, t, mask), F.mse_loss(z[mask], t[mask]))
    torch.testing.assert_close(masked_feature_mse(z, t, torch.ones(6, dtype=torch.bool)),
                               F.mse_loss(z, t))  # fmt: skip
    assert float(masked_feature_mse(z, t, torch.zeros(6, dtype=torch.bool))) == 0.0


def test_g2d_logit_distance_matches_kl_batchmean_and_l1():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    ones = torch.ones(5, dtype=torch.bool)
    for temp in (1.0, 4.0):
        got = g2d_logit_distance(s, t, ones, "classification", temp)
        torch.testing.assert_close(got, distillation_loss(s, t, temp))
    got = g2d_logit_distance(s[:, :1], t[:, 0], ones, "regression")  # (N, 1) against (N,)
    torch.testing.assert_close(got, (s[:, 0] - t[:, 0]).abs().mean())


def test_umt_state_round_trip_and_summary():
    umt = UMT(["text", "audio"], weight={"text": 2.0, "audio": 0.5})
    assert umt.summary() == {"coefficient_text": 2.0, "coefficient_audio": 0.5}
    state = umt.state_dict()
    fresh = UMT(["text", "audio"])
    fresh.load_state_dict(state)
    assert fresh.coefficients.tolist() == [2.0, 0.5]
    with pytest.raises(ModbalanceError, match="saved with modalities"):
        UMT(["audio", "text"]).load_state_dict(state)
    with pytest.raises(ModbalanceError, match="must be >= 0"):
        fresh.load_state_dict({**state, "coefficients": torch.tensor([-1.0, 1.0])})
    assert UMT.needs_teacher and fresh.phases == (2,) and fresh.predict({}, None) is None
    out = StepOutput({}, {}, None, {}, torch.zeros(2), "regression", phase=1)
    base = {"task": torch.tensor(1.0)}
    assert fresh.losses(out, base) == base


# ==========================================================================================
# both: errors, the example model, host synchronisation
# ==========================================================================================


def _simple_out(task="classification", teacher=None, **changes):
    net = Net(DIMS2, CLASSES if task == "classification" else 1)
    x, y = make_data(DIMS2, 6, task)
    out, base = net.step(x, y, task, teacher)
    return net, out._replace(**changes), base


@pytest.mark.parametrize("which", ["g2d", "umt"])
def test_a_step_without_teachers_is_refused(which):
    net, out, base = _simple_out()
    method = G2D(net.modalities, net.encoders) if which == "g2d" else UMT(net.modalities)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    msg = r"distils from alone-trained unimodal teachers and `out.teacher` is None"
    with pytest.raises(ModbalanceError, match=msg):
        balanced_step(out, base, [method], opt)
    with pytest.raises(ModbalanceError, match=msg):
        method.losses(out, base)
    with pytest.raises(ModbalanceError, match="UnimodalTeachers"):
        balanced_step(out, base, [method], opt)


def test_g2d_errors_name_the_problem():
    net, out, base = _simple_out(teacher=hand_teacher(DIMS2, 6, (CLASSES,), False))
    enc = net.encoders
    with pytest.raises(ModbalanceError, match="at least 2"):
        G2D(["audio"], {"audio": enc["audio"]})
    with pytest.raises(ModbalanceError, match="one group per modality"):
        G2D(["audio", "text"], enc)
    with pytest.raises(ModbalanceError, match="overlap"):
        G2D(["audio", "visual"], {"audio": enc["audio"], "visual": enc["audio"].parameters()})
    with pytest.raises(ModbalanceError, match=r"`temperature` must be > 0"):
        G2D(net.modalities, enc, temperature=0.0)
    with pytest.raises(ModbalanceError, match=r"`logit_weight\['visual'\]` must be >= 0"):
        G2D(net.modalities, enc, logit_weight={"audio": 1.0, "visual": -1.0})
    with pytest.raises(ModbalanceError, match="missing modality 'visual'"):
        G2D(net.modalities, enc, feature_weight={"audio": 1.0})
    with pytest.raises(ModbalanceError, match=r"`smp_until` must be >= 0"):
        G2D(net.modalities, enc, smp_until=-1)
    with pytest.raises(TypeError, match="`smp_until` must be an int"):
        G2D(net.modalities, enc, smp_until=1.5)
    g2d = G2D(net.modalities, enc)
    with pytest.raises(ModbalanceError, match=r"`out\.fused` is None"):
        g2d.losses(out._replace(fused=None), base)
    with pytest.raises(ModbalanceError, match=r"`out\.task`"):
        g2d.losses(out._replace(task="ranking"), base)
    t = out.teacher
    with pytest.raises(TypeError, match=r"must be a modbalance\.teachers\.TeacherOutput"):
        g2d.losses(out._replace(teacher=(t.features, t.unimodal)), base)
    no_visual = TeacherOutput(t.features, {"audio": t.unimodal["audio"]})
    with pytest.raises(ModbalanceError, match=r"`out.teacher.unimodal`: missing 'visual'"):
        g2d.losses(out._replace(teacher=no_visual), base)
    with pytest.raises(ModbalanceError, match=r"`out.teacher.unimodal`: missing 'visual'"):
        with g2d.around_step(out._replace(teacher=no_visual), torch.optim.SGD(enc.parameters())):
            pass
    narrow = TeacherOutput({**t.features, "audio": t.features["audio"][:, :2]}, t.unimodal)
    with pytest.raises(ModbalanceError, match=r"must be the same \(N, D\)"):
        g2d.losses(out._replace(teacher=narrow), base)
    wrong_c = TeacherOutput(t.features, {**t.unimodal, "audio": torch.zeros(6, CLASSES + 1)})
    with pytest.raises(ModbalanceError, match=r"the teacher's \(6, 4\); they must be the same"):
        g2d.losses(out._replace(teacher=wrong_c), base)
    bad_mask = {**out.present, "audio": torch.ones(5, dtype=torch.bool)}
    with pytest.raises(ModbalanceError, match=r"`out.present\['audio'\]` must have shape \(6,\)"):
        g2d.losses(out._replace(present=bad_mask), base)
    with pytest.raises(ModbalanceError, match="already has"):
        g2d.losses(out, {**base, "g2d_kd_audio": base["task"]})
    with pytest.raises(ModbalanceError, match="updates no parameter of the 'audio' group"):
        with g2d.around_step(out, torch.optim.SGD(net.fusion.parameters(), lr=0.1)):
            pass


def test_umt_errors_name_the_problem():
    net, out, base = _simple_out(teacher=hand_teacher(DIMS2, 6, (CLASSES,), False))
    with pytest.raises(ModbalanceError, match="at least 2"):
        UMT(["audio"])
    with pytest.raises(ModbalanceError, match=r"`weight` must be >= 0"):
        UMT(net.modalities, weight=-1.0)
    with pytest.raises(TypeError, match="`weight` must be a real number"):
        UMT(net.modalities, weight="10")
    umt = UMT(net.modalities)
    t = out.teacher
    with pytest.raises(ModbalanceError, match=r"`out.teacher.features`: missing 'visual'"):
        umt.losses(out._replace(teacher=TeacherOutput({"audio": t.features["audio"]}, {})), base)
    with pytest.raises(ModbalanceError, match=r"`out.features`: missing 'visual'"):
        umt.losses(out._replace(features={"audio": out.features["audio"]}), base)
    with pytest.raises(ModbalanceError, match=r"must be the same \(N, D\)"):
        short = TeacherOutput({**t.features, "visual": t.features["visual"][:3]}, {})
        umt.losses(out._replace(teacher=short), base)
    with pytest.raises(ModbalanceError, match="already has"):
        umt.losses(out, {**base, "umt_visual": base["task"]})
    with pytest.raises(ModbalanceError, match="'umt_audio', which the step already has"):
        balanced_step(out, base, [umt, UMT(net.modalities)], torch.optim.SGD(net.parameters()))


@pytest.mark.parametrize("task", ["regression", "classification"])
def test_example_model_steps_without_host_synchronisation(task):
    """Both methods on the example's model (M = 3, sequence encoders), teachers from it."""
    from test_host_sync import DIMS, _assert_no_sync, count_syncs, make_batch

    from examples.pase import PaSEConfig, build

    options = {"task": task, "num_outputs": 4, "num_classes": 4} if task != "regression" else {}
    cfg = PaSEConfig(modalities=tuple(DIMS), input_dims=dict(DIMS), dim=8, heads=2, **options)
    parts = build(cfg)
    model = parts.model
    parts.teachers = UnimodalTeachers(model.encoders, model.unimodal_heads)
    parts.methods = [
        G2D(model.modalities, model.modality_groups()),
        UMT(model.modalities),
    ]
    batch = make_batch(task, 4) if task != "regression" else make_batch()
    counter = count_syncs(parts, batch)
    _assert_no_sync(counter, f"G2D + UMT ({task})")
    g2d = parts.methods[0]
    assert sorted(g2d.coefficients.tolist()) == [0.0, 1.0, 1.0]  # the strongest is held back
    assert g2d.summary()["kept_fraction_text"] in (0.0, 1 / 3, 2 / 3, 1.0)
