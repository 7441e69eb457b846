"""EMC and IMTD (EBMC's balancing terms): parity with the released code, masks, gradients, state.

The parity tests compare our methods with a transcription of the authors' code
(kangverse/EBMC: ``EBMC/modules/emc.py`` ``compute_emc_loss`` and ``EBMC/modules/imtd.py``
``compute_imtd_loss``, called as ``EBMC/ebmc.py``'s ``_forward_stage2`` does, and the Stage-II
sum of ``EBMC/train_EBMC.py``), written out below in plain torch, float64, with the code's
``[B, L, C]`` shapes at ``L = 1`` and no utterance mask (``umask=None``: all ones). The code has
three modalities; its IMTD drops ``None`` teachers (so M = 2 is the code with one teacher
``None``); its EMC hard-codes the three pairs, generalised here to every pair ``m < n``.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from modbalance import ModbalanceError
from modbalance.balancing import StepOutput, balanced_step, combine_losses
from modbalance.methods.ebmc import EMC, IMTD, trust_weights
from modbalance.teachers import TeacherOutput

NAMES3 = ("audio", "text", "vision")
NAMES2 = ("audio", "text")
CLASSES = 4
D = 5
N = 7
TIGHT = {"rtol": 1e-10, "atol": 1e-12}


# ==========================================================================================
# The released code, transcribed (float64, [B, L, C] with L = 1, umask None)
# ==========================================================================================


def _agg_seq(x, mask):
    """``_agg_seq``: masked mean over the utterance axis, [B, L, D] -> [B, D]."""
    w = mask[:, :, None]
    return (x * w).sum(1) / w.sum(1).clamp(min=1.0)


def released_emc(x_outs, logits, teachers, label, classification, alpha, beta, gamma, delta):
    """``compute_emc_loss``: energies, the gap over every pair, the norm-only gradient penalty.

    ``x_outs``/``logits``/``teachers``: one ``[B, 1, *]`` tensor per modality (teachers may be
    ``None``: uncertainty 0). ``label``: ``[B]``.
    """
    b, length, _ = x_outs[0].shape
    mask = torch.ones(b, length, dtype=x_outs[0].dtype)
    energies, norms = [], []
    for x, lg, t in zip(x_outs, logits, teachers):
        if t is None:
            u = torch.tensor(0.0, dtype=x.dtype)
        elif classification:
            p = F.softmax(_agg_seq(t, mask), dim=-1)
            u = (-(p * p.clamp(min=1e-8).log()).sum(-1)).mean()
        else:
            u = _agg_seq(t, mask).squeeze(-1).var()
        z_norm = (_agg_seq(x, mask) ** 2).mean()
        pred = _agg_seq(lg, mask)
        if lg.shape[-1] == 1 and not classification:
            loss = F.mse_loss(pred.squeeze(-1), label.to(x.dtype))
        else:
            loss = F.cross_entropy(pred, label.long())
        energies.append(alpha * z_norm + beta * loss + gamma * u)
        norms.append(z_norm)
    gap = sum(
        (energies[i] - energies[j]) ** 2 for i, j in itertools.combinations(range(len(energies)), 2)
    )
    reg = torch.tensor(0.0, dtype=x_outs[0].dtype)
    for z_norm, x in zip(norms, x_outs):
        (g,) = torch.autograd.grad(alpha * z_norm, x, create_graph=True, retain_graph=True)
        reg = reg + (g**2).mean()
    return gap + delta * reg


def _trust(sigma):
    """``_compute_trust_weights``."""
    c = torch.exp(-sigma)
    rho = 1.0 / (torch.log(1.0 + sigma**2) + 0.1)
    raw = c * rho
    return raw / (raw.sum(dim=-1, keepdim=True) + 1e-8)


def released_imtd(student, teachers, classification, tau):
    """``compute_imtd_loss`` with ``_imtd_regression`` / ``_imtd_classification``.

    ``student``: ``[B, 1, C]`` fused logits; ``teachers``: ``[B, 1, C]`` or ``None`` each.
    """
    b, length, _ = student.shape
    mask = torch.ones(b, length, dtype=student.dtype)
    s = _agg_seq(student, mask)
    ts = [_agg_seq(t, mask) for t in teachers if t is not None]
    if not classification:
        ts = [t.squeeze(-1) for t in ts]
        stack = torch.stack(ts, dim=-1)
        w = _trust((stack - stack.mean(dim=-1, keepdim=True)).abs())
        total = sum((w[:, m] * (s.squeeze(-1) - t) ** 2).mean() for m, t in enumerate(ts))
        return total / len(ts)
    probs = [F.softmax(t / tau, dim=-1) for t in ts]
    ents = [-(p * p.clamp(min=1e-8).log()).sum(-1) for p in probs]
    w = _trust(torch.stack(ents, dim=-1))
    logq = F.log_softmax(s / tau, dim=-1)
    total = sum(
        (w[:, m, None] * F.kl_div(logq, p, reduction="none").sum(-1, keepdim=True)).mean()
        for m, p in enumerate(probs)
    )
    return total * tau**2 / len(probs)


# ==========================================================================================
# Helpers: leaves for both sides
# ==========================================================================================


def make_leaves(names, task, seed=0, n=N):
    g = torch.Generator().manual_seed(seed)
    out_dim = 1 if task == "regression" else CLASSES
    kw = {"dtype": torch.float64, "generator": g}
    z = {m: torch.randn(n, D, **kw).requires_grad_() for m in names}
    uni = {m: torch.randn(n, out_dim, **kw).requires_grad_() for m in names}
    teach = {m: 2 * torch.randn(n, out_dim, **kw) for m in names}
    fused = torch.randn(n, out_dim, **kw).requires_grad_()
    if task == "regression":
        y = torch.randn(n, **kw)
    else:
        y = torch.randint(0, CLASSES, (n,), generator=g)
    return z, uni, teach, fused, y


def step_output(names, task, z, uni, teach, fused, y, present=None, phase=2):
    def flat(x):
        return x[:, 0] if task == "regression" else x

    return StepOutput(
        features=z,
        unimodal={m: flat(uni[m]) for m in names},
        fused=flat(fused),
        present=present or {},
        target=y,
        task=task,
        phase=phase,
        teacher=TeacherOutput({}, {m: flat(teach[m]) for m in names}),
    )


def grads_of(tensors):
    out = []
    for t in tensors:
        out.append(torch.zeros_like(t) if t.grad is None else t.grad.clone())
        t.grad = None
    return out


def leaves(names, z, uni, fused):
    return [*(z[m] for m in names), *(uni[m] for m in names), fused]


CASES = [
    pytest.param(NAMES3, "regression", id="M3-reg"),
    pytest.param(NAMES3, "classification", id="M3-cls"),
    pytest.param(NAMES2, "regression", id="M2-reg"),
    pytest.param(NAMES2, "classification", id="M2-cls"),
]
EMC_SETTINGS = [
    pytest.param({}, id="released-defaults"),
    pytest.param({"alpha": 0.5, "beta": 2.0, "gamma": 0.3, "delta": 3.0}, id="custom"),
]


def ours_emc(names, task, z, uni, teach, fused, y, present=None, **kw):
    out = step_output(names, task, z, uni, teach, fused, y, present)
    method = EMC(names, weight=1.0, **kw)
    term = method.losses(out, {})["emc"]
    term.backward()
    return term.detach(), grads_of(leaves(names, z, uni, fused)), method


def ref_emc(names, task, z, uni, teach, fused, y, teachers=None, **kw):
    cfg = {"alpha": 1.0, "beta": 1.0, "gamma": 1.0, "delta": 0.01, **kw}
    teachers = teachers if teachers is not None else [teach[m][:, None] for m in names]
    loss = released_emc(
        [z[m][:, None] for m in names],
        [uni[m][:, None] for m in names],
        teachers,
        y,
        task == "classification",
        **cfg,
    )
    loss.backward()
    return loss.detach(), grads_of(leaves(names, z, uni, fused))


def assert_all_close(a, b, **tol):
    tol = tol or TIGHT
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **tol)


# ==========================================================================================
# EMC: parity
# ==========================================================================================


@pytest.mark.parity
@pytest.mark.parametrize(("names", "task"), CASES)
@pytest.mark.parametrize("cfg", EMC_SETTINGS)
def test_emc_matches_the_released_code(names, task, cfg):
    z, uni, teach, fused, y = make_leaves(names, task)
    value, ours, method = ours_emc(names, task, z, uni, teach, fused, y, **cfg)
    ref_value, ref = ref_emc(names, task, z, uni, teach, fused, y, **cfg)
    torch.testing.assert_close(value, ref_value, **TIGHT)
    assert_all_close(ours, ref)
    # not vacuous: every feature and unimodal prediction got a gradient, the fused one none
    assert all(g.abs().sum() > 0 for g in ours[:-1])
    assert ours[-1].abs().sum() == 0
    assert value > 0 and method.energies.min() > 0


def _perturbed_emc(names, task, z, uni, teach, y, how):
    """The released EMC with one part of the rule changed."""
    x_outs = [z[m][:, None] for m in names]
    energies, norms = [], []
    for x, m in zip(x_outs, names):
        t = teach[m]
        if task == "regression":
            u = t[:, 0].var(correction=0 if how == "biased-var" else 1)
            loss = F.mse_loss(uni[m][:, 0], y) if how != "l1" else F.l1_loss(uni[m][:, 0], y)
        else:
            p = F.softmax(t, -1)
            u = (-(p * p.clamp(min=1e-8).log()).sum(-1)).mean()
            loss = F.cross_entropy(uni[m], y)
        z_norm = (x[:, 0] ** 2).sum(-1).mean() if how == "sum-norm" else (x[:, 0] ** 2).mean()
        energies.append(z_norm + loss + (0 if how == "no-uncertainty" else u))
        norms.append(z_norm)
    pairs = itertools.combinations(range(len(names)), 2)
    gap = sum(
        (energies[i] - energies[j]).abs() if how == "abs-gap" else (energies[i] - energies[j]) ** 2
        for i, j in pairs
    )
    reg = 0
    for z_norm, x in zip(norms, x_outs):
        (g,) = torch.autograd.grad(z_norm, x, create_graph=True)
        reg = reg + (g**2).mean()
    return gap + (0.0 if how == "no-reg" else 0.01) * reg


@pytest.mark.parity
@pytest.mark.parametrize(
    ("task", "how"),
    [
        ("regression", "biased-var"),
        ("regression", "l1"),
        ("regression", "sum-norm"),
        ("classification", "no-uncertainty"),
        ("classification", "abs-gap"),
        ("classification", "no-reg"),
        ("regression", "no-reg"),
    ],
)
def test_emc_parity_catches_a_perturbed_rule(task, how):
    names = NAMES3
    z, uni, teach, fused, y = make_leaves(names, task)
    value, ours, _ = ours_emc(names, task, z, uni, teach, fused, y)
    # the unperturbed transcription agrees ...
    same = _perturbed_emc(names, task, z, uni, teach, y, "none")
    torch.testing.assert_close(value, same.detach(), **TIGHT)
    # ... and the perturbed one does not (value or gradient)
    bad = _perturbed_emc(names, task, z, uni, teach, y, how)
    bad.backward()
    bad_grads = grads_of(leaves(names, z, uni, fused))
    value_differs = not torch.allclose(value, bad.detach(), **TIGHT)
    grads_differ = any(not torch.allclose(a, b, **TIGHT) for a, b in zip(ours, bad_grads))
    assert value_differs or grads_differ


@pytest.mark.parity
def test_emc_regulariser_is_the_released_double_backward_in_closed_form():
    """Only the penalty: weight 1 with alpha=beta=gamma=0 leaves nothing; beta=gamma=0 with equal
    norms leaves the penalty alone, and its gradient (the code's double backward) matches."""
    names = NAMES2
    z, uni, teach, fused, y = make_leaves(names, "regression")
    with torch.no_grad():
        z["text"].copy_(z["audio"])  # equal norms: the gap is zero, the penalty is all
    cfg = {"alpha": 1.7, "beta": 0.0, "gamma": 0.0, "delta": 1.0}
    value, ours, _ = ours_emc(names, "regression", z, uni, teach, fused, y, **cfg)
    ref_value, ref = ref_emc(names, "regression", z, uni, teach, fused, y, **cfg)
    expected = sum(4 * 1.7**2 * (z[m].detach() ** 2).mean() / (N * D) ** 2 for m in names)
    torch.testing.assert_close(value, expected, **TIGHT)
    torch.testing.assert_close(value, ref_value, **TIGHT)
    assert_all_close(ours, ref)
    assert ours[0].abs().sum() > 0


# ==========================================================================================
# IMTD: parity
# ==========================================================================================


def ours_imtd(names, task, z, uni, teach, fused, y, present=None, **kw):
    out = step_output(names, task, z, uni, teach, fused, y, present)
    method = IMTD(names, weight=1.0, **kw)
    term = method.losses(out, {})["imtd"]
    term.backward()
    return term.detach(), grads_of(leaves(names, z, uni, fused)), method


@pytest.mark.parity
@pytest.mark.parametrize(("names", "task"), CASES)
@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_imtd_matches_the_released_code(names, task, tau):
    z, uni, teach, fused, y = make_leaves(names, task)
    value, ours, method = ours_imtd(names, task, z, uni, teach, fused, y, tau=tau)
    # the released code with three teacher slots, the missing ones None (M = 2)
    slots = [teach[m][:, None] for m in names] + [None] * (3 - len(names))
    ref_value = released_imtd(fused[:, None], slots, task == "classification", tau)
    ref_value.backward()
    ref = grads_of(leaves(names, z, uni, fused))
    torch.testing.assert_close(value, ref_value.detach(), **TIGHT)
    assert_all_close(ours, ref)
    assert ours[-1].abs().sum() > 0  # the fused prediction learns ...
    assert all(g.abs().sum() == 0 for g in ours[:-1])  # ... nothing else does
    torch.testing.assert_close(float(method.coefficients.sum()), 1.0)


def _perturbed_imtd(fused, teachers, task, tau, how):
    s, ts = fused, teachers
    if task == "regression":
        s, ts = s[:, 0], [t[:, 0] for t in ts]
        stack = torch.stack(ts, -1)
        centre = (
            stack.median(-1, keepdim=True).values
            if how == "median"
            else stack.mean(-1, keepdim=True)
        )
        sigma = (stack - centre).abs()
    else:
        probs = [F.softmax(t / tau, -1) for t in ts]
        sigma = torch.stack([-(p * p.clamp(min=1e-8).log()).sum(-1) for p in probs], -1)
    rho = 1.0 / (torch.log(1.0 + sigma**2) + (1e-3 if how == "no-eps" else 0.1))
    raw = torch.exp(-sigma) * rho
    w = (
        torch.full_like(raw, 1 / raw.shape[1])
        if how == "uniform"
        else raw / (raw.sum(-1, keepdim=True) + 1e-8)
    )
    if task == "regression":
        total = sum((w[:, m] * (s - t) ** 2).mean() for m, t in enumerate(ts))
        return total / len(ts)
    logq = F.log_softmax(s / tau, -1)
    total = sum(
        (w[:, m] * F.kl_div(logq, p, reduction="none").sum(-1)).mean() for m, p in enumerate(probs)
    )
    return total * (1.0 if how == "no-tau2" else tau**2) / len(ts)


@pytest.mark.parity
@pytest.mark.parametrize(
    ("task", "how"),
    [
        ("regression", "median"),
        ("regression", "no-eps"),
        ("regression", "uniform"),
        ("classification", "uniform"),
        ("classification", "no-tau2"),
        ("classification", "no-eps"),
    ],
)
def test_imtd_parity_catches_a_perturbed_rule(task, how):
    names = NAMES3
    z, uni, teach, fused, y = make_leaves(names, task)
    tau = 2.0
    value, _, _ = ours_imtd(names, task, z, uni, teach, fused, y, tau=tau)
    teachers = [teach[m] for m in names]
    same = _perturbed_imtd(fused.detach(), teachers, task, tau, "none")
    torch.testing.assert_close(value, same, **TIGHT)
    bad = _perturbed_imtd(fused.detach(), teachers, task, tau, how)
    assert not torch.allclose(value, bad, **TIGHT)


# ==========================================================================================
# Stage II: the released sum (without the backbone's MSD and CCE terms) through balanced_step
# ==========================================================================================


class TinyEBMC(nn.Module):
    """Encoders, unimodal heads, a concatenation fusion head; plus frozen teachers."""

    def __init__(self, names, dims, out_dim):
        super().__init__()
        self.names = names
        self.enc = nn.ModuleDict({m: nn.Linear(dims[m], D) for m in names})
        self.heads = nn.ModuleDict({m: nn.Linear(D, out_dim) for m in names})
        self.fusion = nn.Linear(D * len(names), out_dim)
        self.teacher = nn.ModuleDict({m: nn.Linear(dims[m], out_dim) for m in names})
        self.teacher.requires_grad_(False)
        self.double()

    def forward(self, x, present):
        z = {m: torch.tanh(self.enc[m](x[m] * present[m][:, None])) for m in self.names}
        uni = {m: self.heads[m](z[m]) for m in self.names}
        fused = self.fusion(torch.cat([z[m] for m in self.names], 1))
        with torch.no_grad():
            teach = {m: self.teacher[m](x[m] * present[m][:, None]) for m in self.names}
        return z, uni, fused, teach


def _stage_two_data(names, task, seed=3):
    g = torch.Generator().manual_seed(seed)
    dims = {m: 3 + i for i, m in enumerate(names)}
    x = {m: torch.randn(N, dims[m], dtype=torch.float64, generator=g) for m in names}
    y = (
        torch.randn(N, dtype=torch.float64, generator=g)
        if task == "regression"
        else torch.randint(0, CLASSES, (N,), generator=g)
    )
    return dims, x, y


@pytest.mark.parity
@pytest.mark.parametrize(("names", "task"), CASES)
def test_stage_two_step_matches_the_released_sum(names, task):
    """``loss_c + lambda_emc * emc + lambda_imtd * imtd`` (0.1 each) of ``train_EBMC.py``, with the
    backbone's ``lambda_msd``/``lambda_cce`` terms left out, against balanced_step([EMC, IMTD])."""
    torch.manual_seed(0)
    out_dim = 1 if task == "regression" else CLASSES
    dims, x, y = _stage_two_data(names, task)
    model = TinyEBMC(names, dims, out_dim)
    full = {m: torch.ones(N, dtype=torch.bool) for m in names}
    fused_loss = (
        (lambda p: F.mse_loss(p[:, 0], y))
        if task == "regression"
        else (lambda p: F.cross_entropy(p, y))
    )
    # released
    z, uni, fused, teach = model(x, full)
    x_outs = [z[m][:, None] for m in names]
    emc = released_emc(
        x_outs,
        [uni[m][:, None] for m in names],
        [teach[m][:, None] for m in names],
        y,
        task == "classification",
        1.0,
        1.0,
        1.0,
        0.01,
    )
    slots = [teach[m][:, None] for m in names] + [None] * (3 - len(names))
    imtd = released_imtd(fused[:, None], slots, task == "classification", 1.0)
    (fused_loss(fused) + 0.1 * emc + 0.1 * imtd).backward()
    ref = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    # ours
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    z, uni, fused, teach = model(x, full)
    out = step_output(names, task, z, uni, teach, fused, y, full)
    terms = balanced_step(out, {"task": fused_loss(fused)}, [EMC(names), IMTD(names)], opt)
    assert set(terms) == {"task", "emc", "imtd"}
    for k, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, ref[k], rtol=1e-9, atol=1e-12, msg=k)
            assert p.grad.abs().sum() > 0, k
        else:
            assert p.grad is None, k


# ==========================================================================================
# Trust weights
# ==========================================================================================


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(0.0, 20.0), min_size=2, max_size=5),
    st.lists(st.booleans(), min_size=5, max_size=5),
)
def test_trust_weights_are_a_distribution_that_prefers_certain_teachers(sigmas, flags):
    sigma = torch.tensor([sigmas], dtype=torch.float64)
    present = torch.tensor([flags[: len(sigmas)]])
    w = trust_weights(sigma, present)
    assert (w >= 0).all() and (w[~present] == 0).all()
    # rows sum to one up to the released code's 1e-8 in the denominator (which matters where
    # every present teacher is very uncertain: then the weights shrink towards zero)
    raw = (torch.exp(-sigma) / (torch.log1p(sigma**2) + 0.1) * present).sum()
    torch.testing.assert_close(w.sum(), raw / (raw + 1e-8), rtol=1e-9, atol=0.0)
    if not present.any():
        assert float(w.sum()) == 0.0
    on = [i for i, f in enumerate(flags[: len(sigmas)]) if f]
    for i, j in itertools.permutations(on, 2):
        if sigmas[i] < sigmas[j]:
            assert w[0, i] >= w[0, j]


@pytest.mark.parity
def test_trust_weights_match_the_released_formula():
    sigma = torch.rand(6, 3, dtype=torch.float64) * 3
    torch.testing.assert_close(trust_weights(sigma), _trust(sigma), **TIGHT)


def test_trust_weights_errors():
    with pytest.raises(ModbalanceError, match="must have 2 dimensions"):
        trust_weights(torch.zeros(3))
    with pytest.raises(TypeError, match="floating dtype"):
        trust_weights(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ModbalanceError, match="must have the shape of `sigma`"):
        trust_weights(torch.zeros(2, 2), torch.ones(2, 3, dtype=torch.bool))


# ==========================================================================================
# Missing modalities
# ==========================================================================================


def _garbage(names, task, z, uni, teach, absent_rows, m):
    """Copies where the absent rows of modality ``m`` hold NaN."""
    z2 = {k: v.detach().clone().requires_grad_() for k, v in z.items()}
    uni2 = {k: v.detach().clone().requires_grad_() for k, v in uni.items()}
    teach2 = {k: v.clone() for k, v in teach.items()}
    with torch.no_grad():
        z2[m][absent_rows] = float("nan")
        uni2[m][absent_rows] = float("nan")
        teach2[m][absent_rows] = float("nan")
    return z2, uni2, teach2


@pytest.mark.parametrize(("names", "task"), CASES)
@pytest.mark.parametrize("cls", [EMC, IMTD])
def test_absent_samples_reach_neither_value_nor_gradient(names, task, cls):
    z, uni, teach, fused, y = make_leaves(names, task)
    m = names[1]
    absent = torch.tensor([1, 4])
    present = {k: torch.ones(N, dtype=torch.bool) for k in names}
    present[m] = present[m].clone()
    present[m][absent] = False
    run = ours_emc if cls is EMC else ours_imtd
    value, g1, _ = run(names, task, z, uni, teach, fused, y, present)
    z2, uni2, teach2 = _garbage(names, task, z, uni, teach, absent, m)
    value2, g2, _ = run(names, task, z2, uni2, teach2, fused, y, present)
    assert torch.isfinite(value2)
    torch.testing.assert_close(value, value2, **TIGHT)
    assert_all_close(g1, g2)
    i = names.index(m)
    assert (g2[i][absent] == 0).all() and (g2[len(names) + i][absent] == 0).all()


@pytest.mark.parametrize("task", ["regression", "classification"])
def test_emc_modality_absent_from_the_batch_leaves_the_gap(task):
    z, uni, teach, fused, y = make_leaves(NAMES3, task)
    present = {m: torch.ones(N, dtype=torch.bool) for m in NAMES3}
    present["vision"] = torch.zeros(N, dtype=torch.bool)
    value, grads3, method = ours_emc(NAMES3, task, z, uni, teach, fused, y, present)
    value2, grads2, _ = ours_emc(NAMES2, task, z, uni, teach, fused, y)
    torch.testing.assert_close(value, value2, **TIGHT)
    assert_all_close([grads3[0], grads3[1], grads3[3], grads3[4]], grads2[:4])
    assert method.energies[2] == 0 and method.summary()["energy_vision"] == 0.0


@pytest.mark.parity
@pytest.mark.parametrize("task", ["regression", "classification"])
def test_imtd_modality_absent_from_the_batch_is_the_released_none_teacher(task):
    z, uni, teach, fused, y = make_leaves(NAMES3, task)
    present = {m: torch.ones(N, dtype=torch.bool) for m in NAMES3}
    present["text"] = torch.zeros(N, dtype=torch.bool)
    value, _, method = ours_imtd(NAMES3, task, z, uni, teach, fused, y, present)
    ref = released_imtd(
        fused.detach()[:, None],
        [teach["audio"][:, None], None, teach["vision"][:, None]],
        task == "classification",
        1.0,
    )
    torch.testing.assert_close(value, ref, **TIGHT)
    assert method.coefficients[1] == 0


def test_imtd_sample_without_modalities_is_left_out():
    names, task = NAMES2, "regression"
    z, uni, teach, fused, y = make_leaves(names, task)
    present = {m: torch.ones(N, dtype=torch.bool) for m in names}
    for m in names:
        present[m] = present[m].clone()
        present[m][0] = False
    value, grads, _ = ours_imtd(names, task, z, uni, teach, fused, y, present)
    assert grads[-1][0].abs().sum() == 0 and grads[-1][1:].abs().sum() > 0
    rest = released_imtd(fused.detach()[1:, None], [teach[m][1:, None] for m in names], False, 1.0)
    torch.testing.assert_close(value, rest, **TIGHT)


# ==========================================================================================
# Gradient routing in a model
# ==========================================================================================


@pytest.mark.parametrize(("names", "task"), CASES)
@pytest.mark.parametrize("cls", [EMC, IMTD])
def test_each_term_reaches_what_it_should(names, task, cls):
    torch.manual_seed(0)
    out_dim = 1 if task == "regression" else CLASSES
    dims, x, y = _stage_two_data(names, task)
    model = TinyEBMC(names, dims, out_dim)
    full = {m: torch.ones(N, dtype=torch.bool) for m in names}
    z, uni, fused, teach = model(x, full)
    out = step_output(names, task, z, uni, teach, fused, y, full)
    terms = cls(names).losses(out, {})
    assert set(terms) == {"emc" if cls is EMC else "imtd"}
    combine_losses(terms).backward()
    for m in names:
        assert model.enc[m].weight.grad.abs().sum() > 0
        assert model.teacher[m].weight.grad is None
        heads = model.heads[m].weight.grad
        assert (heads is not None and heads.abs().sum() > 0) if cls is EMC else heads is None
    fusion = model.fusion.weight.grad
    assert fusion is None if cls is EMC else fusion.abs().sum() > 0


def test_terms_compose_and_act_in_their_phases_only():
    names, task = NAMES3, "regression"
    z, uni, teach, fused, y = make_leaves(names, task)
    base = {"task": fused.sum()}
    out1 = step_output(names, task, z, uni, teach, fused, y, phase=1)
    for cls in (EMC, IMTD):
        assert cls(names).losses(out1, base) == base
        assert cls(names, phases=(1, 2)).losses(out1, base).keys() == {"task", cls(names).name}
    out = step_output(names, task, z, uni, teach, fused, y)
    both = IMTD(names).losses(out, EMC(names).losses(out, base))
    assert set(both) == {"task", "emc", "imtd"} and both["task"] is base["task"]
    weighted = EMC(names, weight=0.5).losses(out, {})["emc"]
    torch.testing.assert_close(weighted, 5 * EMC(names, weight=0.1).losses(out, {})["emc"])


def test_balanced_step_refuses_without_teachers_and_on_a_shared_term():
    names, task = NAMES2, "regression"
    z, uni, teach, fused, y = make_leaves(names, task)
    out = step_output(names, task, z, uni, teach, fused, y)
    opt = torch.optim.SGD([fused], lr=0.1)
    with pytest.raises(ModbalanceError, match=r"out\.teacher` is None"):
        balanced_step(out._replace(teacher=None), {"task": fused.sum()}, [IMTD(names)], opt)
    with pytest.raises(ModbalanceError, match="already has one of that name"):
        balanced_step(out, {"task": fused.sum()}, [EMC(names), EMC(names)], opt)


def test_regression_accepts_n_by_1_outputs():
    names, task = NAMES2, "regression"
    z, uni, teach, fused, y = make_leaves(names, task)
    out = step_output(names, task, z, uni, teach, fused, y)
    wide = out._replace(
        fused=fused,
        unimodal={m: uni[m] for m in names},
        teacher=TeacherOutput({}, {m: teach[m] for m in names}),
    )
    for cls in (EMC, IMTD):
        a = cls(names).losses(out, {})
        b = cls(names).losses(wide, {})
        torch.testing.assert_close(a, b)


# ==========================================================================================
# Errors
# ==========================================================================================


def test_constructor_errors():
    with pytest.raises(ModbalanceError, match="at least 2 modalities"):
        EMC(["text"])
    with pytest.raises(TypeError, match="ordered collection"):
        IMTD({"text", "audio"})
    with pytest.raises(ModbalanceError, match="`weight` must be >= 0"):
        EMC(NAMES2, weight=-0.1)
    for key in ("alpha", "beta", "gamma", "delta"):
        with pytest.raises(ModbalanceError, match=f"`{key}` must be >= 0"):
            EMC(NAMES2, **{key: -1.0})
    with pytest.raises(ModbalanceError, match="`tau` must be > 0"):
        IMTD(NAMES2, tau=0.0)
    with pytest.raises(TypeError, match="`name` must be a non-empty str"):
        IMTD(NAMES2, name="")
    with pytest.raises(TypeError, match="`name` must be a non-empty str"):
        EMC(NAMES2, name=3)
    with pytest.raises(ModbalanceError, match="phases"):
        EMC(NAMES2, phases=(3,))


@pytest.mark.parametrize("cls", [EMC, IMTD])
def test_step_errors(cls):
    names, task = NAMES2, "classification"
    z, uni, teach, fused, y = make_leaves(names, task)
    out = step_output(names, task, z, uni, teach, fused, y)
    method = cls(names)
    with pytest.raises(ModbalanceError, match=r"out\.teacher` is None"):
        method.losses(out._replace(teacher=None), {})
    with pytest.raises(TypeError, match="must be a TeacherOutput"):
        method.losses(out._replace(teacher=object()), {})
    with pytest.raises(ModbalanceError, match="missing 'text'"):
        method.losses(out._replace(teacher=TeacherOutput({}, {"audio": teach["audio"]})), {})
    uneven = TeacherOutput({}, {"audio": teach["audio"], "text": teach["text"][:, :2]})
    with pytest.raises(ModbalanceError, match="same shape"):
        method.losses(out._replace(teacher=uneven), {})
    with pytest.raises(ModbalanceError, match=r"`out\.task` must be one of"):
        method.losses(out._replace(task="ranking"), {})
    with pytest.raises(ModbalanceError, match="must be \\(N, C\\) logits"):
        method.losses(
            out._replace(teacher=TeacherOutput({}, {m: teach[m][:, 0] for m in names})), {}
        )
    with pytest.raises(ModbalanceError, match="must have shape \\(7,\\)"):
        method.losses(out._replace(present={"text": torch.ones(3, dtype=torch.bool)}), {})
    with pytest.raises(ModbalanceError, match="already has one of that name"):
        method.losses(out, {method.name: torch.tensor(0.0)})


def test_emc_step_errors():
    names, task = NAMES2, "regression"
    z, uni, teach, fused, y = make_leaves(names, task)
    out = step_output(names, task, z, uni, teach, fused, y)
    emc = EMC(names)
    with pytest.raises(
        ModbalanceError, match=r"`out\.features` for every modality: missing 'text'"
    ):
        emc.losses(out._replace(features={"audio": z["audio"]}), {})
    with pytest.raises(
        ModbalanceError, match=r"`out\.unimodal` for every modality: missing 'audio'"
    ):
        emc.losses(out._replace(unimodal={"text": uni["text"][:, 0]}), {})
    with pytest.raises(ModbalanceError, match="must be \\(N,\\) or \\(N, 1\\)"):
        emc.losses(out._replace(unimodal={m: uni[m].expand(N, 3) for m in names}), {})
    with pytest.raises(ModbalanceError, match="the batch has 7"):
        emc.losses(out._replace(unimodal={m: uni[m][:5, 0] for m in names}), {})
    with pytest.raises(ModbalanceError, match="must have shape \\(N,\\)"):
        emc.losses(out._replace(target=y[:, None]), {})


def test_imtd_step_errors():
    names, task = NAMES2, "classification"
    z, uni, teach, fused, y = make_leaves(names, task)
    out = step_output(names, task, z, uni, teach, fused, y)
    imtd = IMTD(names)
    with pytest.raises(ModbalanceError, match=r"`out\.fused` is None"):
        imtd.losses(out._replace(fused=None), {})
    with pytest.raises(ModbalanceError, match=r"must have the shape of `out\.fused`"):
        imtd.losses(out._replace(fused=fused[:, :2]), {})


# ==========================================================================================
# State, summary, host synchronisation
# ==========================================================================================


@pytest.mark.parametrize("cls", [EMC, IMTD])
def test_state_dict_round_trip(cls):
    names, task = NAMES3, "classification"
    z, uni, teach, fused, y = make_leaves(names, task)
    method = cls(names)
    method.losses(step_output(names, task, z, uni, teach, fused, y), {})
    key = "energies" if cls is EMC else "coefficients"
    before = getattr(method, key).clone()
    assert not torch.allclose(before, cls(names).state_dict()[key])  # it moved off its start
    fresh = cls(names)
    fresh.load_state_dict(method.state_dict())
    torch.testing.assert_close(getattr(fresh, key), before)
    assert fresh.summary() == method.summary()
    with pytest.raises(ModbalanceError, match="saved with modalities"):
        cls(("text", "audio", "vision")).load_state_dict(method.state_dict())
    bad = method.state_dict()
    bad[key] = -bad[key]
    with pytest.raises(ModbalanceError, match="must be >= 0"):
        cls(names).load_state_dict(bad)


def test_coefficients_and_summary():
    names = NAMES3
    imtd, emc = IMTD(names), EMC(names)
    assert not hasattr(emc, "coefficients")
    torch.testing.assert_close(imtd.coefficients, torch.full((3,), 1 / 3))
    z, uni, teach, fused, y = make_leaves(names, "regression")
    teach["vision"] = teach["vision"] + 50.0  # far from the others: distrusted
    out = step_output(names, "regression", z, uni, teach, fused, y)
    imtd.losses(out, {})
    emc.losses(out, {})
    summary = imtd.summary()
    assert set(summary) == {f"coefficient_{m}" for m in names}
    assert all(isinstance(v, float) for v in summary.values())
    assert summary["coefficient_vision"] < 0.01 < summary["coefficient_audio"]
    assert set(emc.summary()) == {f"energy_{m}" for m in names}
    assert all(isinstance(v, float) and v > 0 for v in emc.summary().values())


@pytest.mark.parametrize("task", ["regression", "classification"])
def test_no_host_synchronisation(task):
    from test_host_sync import SyncCounter

    names = NAMES3
    z, uni, teach, fused, y = make_leaves(names, task)
    present = {m: torch.rand(N) > 0.3 for m in names}
    out = step_output(names, task, z, uni, teach, fused, y, present)
    emc, imtd = EMC(names), IMTD(names)
    with SyncCounter() as counter:
        terms = imtd.losses(out, emc.losses(out, {}))
        combine_losses(terms).backward()
    assert not counter.hits, counter.report()
