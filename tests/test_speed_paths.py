"""The fast paths of the paper's training step equal the computations they replace.

Each fast path (issue 23: the fixed per-step cost of PaSE's paper configuration) is checked
against a reference written out here as the code it replaced computed it, in float64, values
and gradients:

* the graph-free Sinkhorn iterations in the scaling domain (``_scaling_iterations``) against
  the log-domain iterations (``logsumexp``), and the range guard that selects them;
* :meth:`SinkhornAligner.pairwise` (checks and normalisation once per modality, one autograd
  node for the last iteration, the value and the structure term) against per-pair composite
  operations, with and without zero masses, for both metrics and every gradient side;
* :class:`PrototypeCalibrator` (one autograd node for the cosine calibration, the batch
  statistics computed once) against the composite operations, state included;
* the gated fusion (``addcmul`` gate scores) and the label-free prototype confidence against
  their written-out formulas, and the game's values with both computed once per sample against
  every repeated row;
* the one-read value checks still raise on NaN/inf and only then.
"""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import modbalance.fusion as mfusion
import modbalance.ot as mot
import modbalance.prototypes as mproto
from modbalance import value_checks
from modbalance._checks import ModbalanceError
from modbalance._geometry import unit
from modbalance.fusion import PrototypeGatedFusion
from modbalance.ot import SinkhornAligner
from modbalance.prototypes import PrototypeCalibrator
from modbalance.shapley import ModalityGame

F64 = torch.float64
CLOSE = {"rtol": 1e-10, "atol": 1e-12}


# ----------------------------------------------------------------------------- references
def log_domain_iterations(cost, log_a, log_b, eps, n_loop):
    """The graph-free loop as it was: two log-sum-exps per iteration, from ``y = 0``."""
    y = cost.new_zeros((*cost.shape[:-2], cost.shape[-1]))
    mb = log_b.unsqueeze(-2) - cost / eps
    ma_t = (log_a.unsqueeze(-1) - cost / eps).transpose(-1, -2)
    for _ in range(n_loop):
        w = torch.logsumexp(mb - y.unsqueeze(-2), dim=-1)
        y = torch.logsumexp(ma_t - w.unsqueeze(-2), dim=-1)
    return y


def log_weights(m, size, like):
    if m is None:
        return torch.full((size,), -math.log(size), dtype=like.dtype)
    return torch.where(m > 0, m.clamp_min(torch.finfo(like.dtype).tiny).log(), -math.inf)


def reference_alignment(x, y, a, b, *, eps=0.05, iters=50, structure=1.0, metric="cosine"):
    """The aligner's loss and plan per pair as the composite code computed them (envelope)."""
    if metric == "cosine":
        xn, yn = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
        cost = ((1.0 - xn @ yn.transpose(-1, -2)) * 0.5).clamp(0.0, 1.0)
    else:
        sq = (
            x.pow(2).sum(-1).unsqueeze(-1)
            + y.pow(2).sum(-1).unsqueeze(-2)
            - 2.0 * (x @ y.transpose(-1, -2))
        ).clamp_min(0.0)
        keep = torch.ones_like(sq, dtype=torch.bool)
        if a is not None:
            keep = keep & (a > 0).unsqueeze(-1) & (b > 0).unsqueeze(-2)
        scale = torch.where(keep, sq, 0.0).detach().amax(dim=(-2, -1), keepdim=True)
        cost = sq / scale.clamp_min(1e-12)
    k = cost.shape[-1]
    a = None if a is None else a / a.sum(-1, keepdim=True)
    b = None if b is None else b / b.sum(-1, keepdim=True)
    la, lb = log_weights(a, k, cost), log_weights(b, k, cost)
    with torch.no_grad():
        y_in = log_domain_iterations(cost, la, lb, eps, iters - 1)
    ce = cost / eps
    w = torch.logsumexp(lb.unsqueeze(-2) - ce - y_in.unsqueeze(-2), dim=-1)
    yy = torch.logsumexp((la.unsqueeze(-1) - ce).transpose(-1, -2) - w.unsqueeze(-2), dim=-1)
    f, g = -eps * w, -eps * yy
    potentials = (f.unsqueeze(-1) + g.unsqueeze(-2) - cost) / eps
    log_plan = la.unsqueeze(-1) + lb.unsqueeze(-2) + potentials
    plan = torch.exp(log_plan)
    a_val = a if a is not None else la.exp().expand_as(f)
    b_val = b if b is not None else lb.exp().expand_as(g)
    pd = plan.detach()
    value = (f.detach() * a_val).sum(-1) + (g.detach() * b_val).sum(-1)
    value = value - eps * (pd.sum((-2, -1)) - 1) + (pd * (cost - cost.detach())).sum((-2, -1))
    core = (f + g - torch.diagonal(cost, dim1=-2, dim2=-1)) / eps
    valid = (torch.isfinite(la) & torch.isfinite(lb)).expand(core.shape)
    terms = torch.where(valid, 2 * core + la + lb, 0.0)
    struct = -0.5 * terms.sum(-1) / valid.sum(-1).clamp_min(1)
    return value + structure * struct, plan


def reference_calibration(cal, features, labels, mask):
    """PrototypeCalibrator.forward (cosine) as the composite code computed it; updates ``cal``."""
    valid = torch.ones(len(labels), dtype=torch.bool) if mask is None else mask
    member = (labels.unsqueeze(1) == torch.arange(cal.num_classes)) & valid.unsqueeze(1)
    rows = member.any(1)
    clean = torch.where(rows.unsqueeze(1), features, 0.0)
    emb = F.normalize(clean, dim=-1)
    wt = member.to(emb.dtype)
    sums = wt.t() @ torch.where(rows.unsqueeze(1), emb, 0.0)
    counts = wt.sum(0)
    means = sums / counts.clamp_min(1).unsqueeze(1)
    with torch.no_grad():
        n = member.sum(0)
        batch_mean = F.normalize(sums / n.clamp_min(1).to(sums.dtype).unsqueeze(1), dim=-1)
        ema = F.normalize(cal.momentum * cal.prototypes + (1 - cal.momentum) * batch_mean, dim=-1)
        new = torch.where(cal.initialized.unsqueeze(1), ema, batch_mean)
        cal.prototypes.copy_(torch.where((n > 0).unsqueeze(1), new, cal.prototypes))
        cal.initialized |= n > 0
        cal.counts += n
    protos, init = cal.prototypes.clone(), cal.initialized.clone()
    y = labels.clamp(0, cal.num_classes - 1)
    qualified = rows & init[y]
    logits = (F.normalize(clean, dim=-1) @ protos.t()).masked_fill(~init, -math.inf)
    logits = logits / cal.temperature
    per = 0.0 * clean.sum(-1)
    per = per + cal.pull_weight * (1.0 - (emb * protos[y]).sum(-1))
    finite = logits.masked_fill(~init, torch.finfo(logits.dtype).min)
    per = per - cal.ce_weight * F.log_softmax(finite, -1).gather(1, y.unsqueeze(1)).squeeze(1)
    loss = torch.where(qualified, per, 0.0).sum() / qualified.sum().clamp_min(1)
    return loss, logits, means, counts


# ----------------------------------------------------------------------------- Sinkhorn loop
@pytest.mark.parametrize("shape", [(7, 7), (1, 7, 7), (6, 7, 7), (3, 5, 4), (28, 2, 2)])
@pytest.mark.parametrize("zeros", [False, True])
def test_scaling_iterations_equal_log_domain_iterations(shape, zeros):
    g = torch.Generator().manual_seed(0)
    cost = torch.rand(shape, generator=g, dtype=F64)
    k, n = shape[-2], shape[-1]
    a = torch.rand(shape[:-1], generator=g, dtype=F64)
    b = torch.rand((*shape[:-2], n), generator=g, dtype=F64)
    if zeros:  # absent classes: zero mass, log weight -inf
        a[..., 0] = 0.0
        b[..., -1] = 0.0
    la = log_weights(a / a.sum(-1, keepdim=True), k, cost)
    lb = log_weights(b / b.sum(-1, keepdim=True), n, cost)
    assert mot._scaling_safe(cost, 1.0, 0.05)
    fast = mot._scaling_iterations(cost, la, lb, 0.05, 49, tuple(shape))
    torch.testing.assert_close(fast, log_domain_iterations(cost, la, lb, 0.05, 49), **CLOSE)


def test_scaling_iterations_only_where_they_stay_in_range():
    cost = torch.rand(3, 7, 7)
    assert mot._scaling_safe(cost, 1.0, 0.05)  # the aligner's default: R = 20
    assert not mot._scaling_safe(cost, None, 0.05)  # no bound known: log domain
    assert not mot._scaling_safe(cost, 1.0, 0.01)  # e^{2R} would overflow float32
    assert mot._scaling_safe(cost.double(), 1.0, 0.01)  # not float64
    assert not mot._scaling_safe(cost.half(), 1.0, 0.05)  # half precision: log domain
    assert not mot._scaling_safe(cost.bfloat16(), 1.0, 0.05)


def test_broadcast_shapes_equals_torch():
    cases = [((3,), (3,)), ((1, 3), (2, 1)), ((), (4, 2)), ((5, 1, 3), (4, 3)), ((0,), (1,))]
    for shapes in cases:
        assert mot._broadcast_shapes(*shapes) == torch.broadcast_shapes(*shapes)
    with pytest.raises(RuntimeError):
        mot._broadcast_shapes((2,), (3,))


# ----------------------------------------------------------------------------- the aligner
@pytest.mark.parametrize(
    ("m", "masses", "structure", "metric", "side"),
    [
        *itertools.product((2, 4), (False, True), (1.0, 0.0), ("cosine",), ("both",)),
        (3, True, 1.0, "sqeuclidean", "both"),
        (3, False, 0.5, "sqeuclidean", "both"),
        (3, True, 1.0, "cosine", "x"),
        (3, True, 1.0, "cosine", "y"),
    ],
)
def test_pairwise_equals_composite_reference(m, masses, structure, metric, side):
    g = torch.Generator().manual_seed(m)
    k = 7
    protos = {i: torch.randn(k, 16, generator=g, dtype=F64) for i in range(m)}
    weights = None
    if masses:
        weights = {i: torch.randint(0, 4, (k,), generator=g).to(F64) for i in range(m)}
        for v in weights.values():
            v[0] += 1.0  # some mass in every problem; the zeros are absent classes
    aligner = SinkhornAligner(structure_weight=structure, metric=metric, gradient_side=side)
    leaves = {i: p.clone().requires_grad_(True) for i, p in protos.items()}
    out = aligner.pairwise(leaves, weights)
    grad_l = torch.randn(out.losses.shape, generator=g, dtype=F64)
    grad_p = torch.randn(out.plans.shape, generator=g, dtype=F64)
    ((out.losses * grad_l).sum() + (out.plans * grad_p).sum()).backward()

    ref_leaves = {i: p.clone().requires_grad_(True) for i, p in protos.items()}
    idx = list(itertools.combinations(range(m), 2))
    x = torch.stack([ref_leaves[i] for i, _ in idx])
    y = torch.stack([ref_leaves[j] for _, j in idx])
    if side == "x":
        y = y.detach()
    elif side == "y":
        x = x.detach()
    a = b = None
    if masses:
        a = torch.stack([weights[i] for i, _ in idx])
        b = torch.stack([weights[j] for _, j in idx])
    loss, plan = reference_alignment(x, y, a, b, structure=structure, metric=metric)
    ((loss * grad_l).sum() + (plan * grad_p).sum()).backward()

    torch.testing.assert_close(out.losses, loss, **CLOSE)
    torch.testing.assert_close(out.plans, plan, **CLOSE)
    for i in range(m):
        got, want = leaves[i].grad, ref_leaves[i].grad
        if want is None:
            assert got is None or not got.any()
        else:
            torch.testing.assert_close(got, want, **CLOSE)


@pytest.mark.parametrize("warm_start", [False, True])
@pytest.mark.parametrize("tol", [None, 1e-7])
def test_one_node_equals_composite_solve(monkeypatch, warm_start, tol):
    """The one-node tail of SinkhornAligner against its own composite path (same iterations)."""
    g = torch.Generator().manual_seed(1)
    protos = {i: torch.randn(5, 8, generator=g, dtype=F64) for i in range(3)}
    masses = {i: torch.tensor([1.0, 0.0, 2.0, 3.0, 1.0], dtype=F64) for i in range(3)}
    results = []
    for one_node in (True, False):
        if not one_node:
            monkeypatch.setattr(SinkhornAligner, "_one_node", lambda *args: False)
        aligner = SinkhornAligner(warm_start=warm_start, tol=tol)
        leaves = {i: p.clone().requires_grad_(True) for i, p in protos.items()}
        for _ in range(2 if warm_start else 1):
            out = aligner.pairwise(leaves, masses)
        out.loss.backward()
        results.append((out, [leaves[i].grad for i in range(3)], aligner))
    (fast, fast_grads, fast_al), (slow, slow_grads, slow_al) = results
    torch.testing.assert_close(fast.losses, slow.losses, **CLOSE)
    torch.testing.assert_close(fast.plans, slow.plans, **CLOSE)
    for u, v in zip(fast_grads, slow_grads):
        torch.testing.assert_close(u, v, **CLOSE)
    assert fast_al.last_n_iter == slow_al.last_n_iter
    if warm_start:
        torch.testing.assert_close(fast_al.warm_g, slow_al.warm_g, **CLOSE)
        assert not fast_al.warm_g.requires_grad


def test_pairwise_value_checks_still_raise():
    aligner = SinkhornAligner()
    good = {m: torch.randn(3, 4) for m in "ab"}
    bad = {"a": good["a"], "b": torch.tensor([[float("nan")] * 4] * 3)}
    with pytest.raises(ModbalanceError, match="finite"):
        aligner.pairwise(bad)
    with pytest.raises(ModbalanceError, match="non-negative"):
        aligner.pairwise(good, {"a": torch.tensor([1.0, -1.0, 1.0]), "b": torch.ones(3)})
    with pytest.raises(ModbalanceError, match="positive total"):
        aligner.pairwise(good, {"a": torch.zeros(3), "b": torch.ones(3)})
    with pytest.raises(ModbalanceError, match="finite"):
        aligner(torch.randn(3, 4), torch.full((3, 4), float("inf")))
    with value_checks(False):
        aligner.pairwise(good, {"a": torch.ones(3), "b": torch.ones(3)})
    # finite values whose sum overflows pass (the element-wise check decides)
    huge = {m: torch.full((3, 4), 3e38) for m in "ab"}
    aligner.pairwise(huge, {"a": torch.full((3,), 3e38), "b": torch.ones(3)})


# ----------------------------------------------------------------------------- calibration
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("warm", [0, 1, 3])
def test_calibration_equals_composite_reference(masked, warm):
    g = torch.Generator().manual_seed(warm)
    k, d, n = 5, 8, 14
    cal = PrototypeCalibrator(k, d, momentum=0.7).double()
    for _ in range(warm):
        cal(torch.randn(n, d, generator=g, dtype=F64), torch.randint(0, 3, (n,), generator=g))
    ref_cal = copy.deepcopy(cal)
    h = torch.randn(n, d, generator=g, dtype=F64)
    h[1] = 0.0  # a zero feature: F.normalize's clamped norm
    labels = torch.randint(0, k, (n,), generator=g)
    mask = torch.rand(n, generator=g) > 0.3 if masked else None
    if masked:
        h[~mask] = float("nan")  # masked-out rows never enter, not even as NaN
    grad_logits = torch.randn(n, k, generator=g, dtype=F64)
    grad_means = torch.randn(k, d, generator=g, dtype=F64)

    def total(loss, logits, means):
        finite = torch.where(torch.isfinite(logits), logits, 0.0)
        return 1.5 * loss + (finite * grad_logits).sum() + (means * grad_means).sum()

    x = h.clone().requires_grad_(True)
    out = cal(x, labels, mask)
    total(out.loss, out.logits, out.class_means).backward()
    x_ref = h.clone().requires_grad_(True)
    loss, logits, means, counts = reference_calibration(ref_cal, x_ref, labels, mask)
    total(loss, logits, means).backward()

    torch.testing.assert_close(out.loss, loss, **CLOSE)
    torch.testing.assert_close(out.logits, logits, **CLOSE)
    torch.testing.assert_close(out.class_means, means, **CLOSE)
    assert torch.equal(out.class_counts, counts)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-10)
    assert torch.isfinite(x.grad).all()
    if masked:
        assert not x.grad[~mask].any()
    torch.testing.assert_close(cal.prototypes, ref_cal.prototypes, **CLOSE)
    assert torch.equal(cal.initialized, ref_cal.initialized)
    assert torch.equal(cal.counts, ref_cal.counts)


@pytest.mark.parametrize(
    ("pull", "ce", "adaptive"),
    [(1.0, 1.0, False), (0.0, 1.0, False), (1.0, 0.0, False), (0.0, 0.0, False), (0.5, 2.0, True)],
)
def test_one_node_calibration_equals_composite(monkeypatch, pull, ce, adaptive):
    g = torch.Generator().manual_seed(3)
    cal = PrototypeCalibrator(6, 8, pull_weight=pull, ce_weight=ce, adaptive=adaptive).double()
    cal(torch.randn(10, 8, generator=g, dtype=F64), torch.randint(0, 4, (10,), generator=g))
    h = torch.randn(12, 8, generator=g, dtype=F64)
    labels = torch.randint(0, 6, (12,), generator=g)
    mask = torch.rand(12, generator=g) > 0.2
    grad_logits = torch.randn(12, 6, generator=g, dtype=F64)
    results = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(mproto, "_fusable", lambda *args: False)
        c = copy.deepcopy(cal)
        x = h.clone().requires_grad_(True)
        out = c(x, labels, mask)
        finite = torch.where(torch.isfinite(out.logits), out.logits, 0.0)
        (out.loss + (finite * grad_logits).sum() + out.class_means.sum()).backward()
        results.append((out, x.grad, c))
    (a, ga, ca), (b, gb, cb) = results
    for name in ("loss", "logits", "class_means", "class_counts", "prototypes"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name  # the same operations
    torch.testing.assert_close(ga, gb, **CLOSE)
    assert torch.equal(ca.prototypes, cb.prototypes)
    if adaptive:
        assert torch.equal(ca.separability, cb.separability)


def test_fused_calibration_only_where_it_applies(monkeypatch):
    cal = PrototypeCalibrator(3, 4)
    calls = []
    monkeypatch.setattr(mproto._CosineCalibration, "apply", lambda *a: calls.append(1) or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        cal(torch.randn(5, 4), torch.randint(0, 3, (5,)))  # float32 cosine: the one node
    assert calls
    calls.clear()
    PrototypeCalibrator(3, 4, metric="sqeuclidean")(torch.randn(5, 4), torch.randint(0, 3, (5,)))
    PrototypeCalibrator(3, 4).half()(torch.randn(5, 4).half(), torch.randint(0, 3, (5,)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        PrototypeCalibrator(3, 4)(torch.randn(5, 4), torch.randint(0, 3, (5,)))
    assert not calls


def test_unit_is_f_normalize():
    for dtype in (torch.float32, F64):
        x = torch.randn(50, 16, dtype=dtype)
        x[3] = 0.0
        x[4] = 1e-30
        assert torch.equal(unit(x), F.normalize(x, dim=-1))
        a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        grad = torch.randn_like(x)
        (unit(a) * grad).sum().backward()
        (F.normalize(b, dim=-1) * grad).sum().backward()
        assert torch.equal(a.grad, b.grad)


def test_calibration_value_checks_still_raise():
    cal = PrototypeCalibrator(3, 4)
    y = torch.tensor([0, 1, 2, 0])
    nan = torch.randn(4, 4)
    nan[2, 1] = float("nan")
    with pytest.raises(ModbalanceError, match="finite"):
        cal(nan, y)
    cal(nan, y, torch.tensor([True, True, False, True]))  # the NaN row is masked out
    with pytest.raises(ModbalanceError, match="out-of-range"):
        cal(torch.randn(4, 4), torch.tensor([0, 1, 3, 0]))
    with pytest.raises(ModbalanceError, match="finite"):  # features are checked first
        cal(nan, torch.tensor([0, 1, 3, 0]))
    cal(torch.randn(4, 4), torch.tensor([0, 1, 3, 0]), torch.tensor([True, True, False, True]))
    cal(torch.full((4, 4), 3e38), y)  # finite, only the sum overflows
    with pytest.raises(ModbalanceError, match="finite"):
        cal.confidence(nan)


# ----------------------------------------------------------------------------- gated fusion
def test_confidence_equals_written_out_formula():
    g = torch.Generator().manual_seed(0)
    cal = PrototypeCalibrator(5, 8).double()
    cal(torch.randn(9, 8, generator=g, dtype=F64), torch.randint(0, 3, (9,), generator=g))
    h = torch.randn(11, 8, generator=g, dtype=F64)
    protos, init = cal.prototypes, cal.initialized
    logits = (F.normalize(h, dim=-1) @ protos.t()).masked_fill(~init, -math.inf) / cal.temperature
    probs = torch.where(init, F.softmax(logits.masked_fill(~init, -1e300), -1), 0.0)
    torch.testing.assert_close(cal.confidence(h), probs.max(-1).values, **CLOSE)
    with torch.no_grad():  # no snapshot copies without grad mode, same values
        torch.testing.assert_close(cal.confidence(h), probs.max(-1).values, **CLOSE)
    labels = torch.randint(0, 5, (11,), generator=g)
    torch.testing.assert_close(cal.confidence(h, labels), probs.gather(1, labels[:, None])[:, 0])
    assert torch.equal(cal.confidence(torch.zeros(2, 8, dtype=F64)).isfinite(), torch.ones(2) > 0)


def test_confidence_without_grad_leaves_the_buffers_alone():
    cal = PrototypeCalibrator(3, 4)
    cal(torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]))
    with torch.no_grad():
        conf = cal.confidence(torch.randn(5, 4))
    before = cal.prototypes.clone()
    cal(torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]))  # in-place EMA step
    assert not torch.equal(before, cal.prototypes)
    assert conf.shape == (5,) and torch.isfinite(conf).all()


@pytest.mark.parametrize("hidden", [0, 16])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_gated_fusion_equals_written_out_formula(hidden, temperature):
    g = torch.Generator().manual_seed(hidden)
    names = ("a", "b", "c")
    fusion = PrototypeGatedFusion(names, 6, hidden=hidden, temperature=temperature).double()
    with torch.no_grad():
        for p in fusion.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64))
    feats = {m: torch.randn(8, 6, generator=g, dtype=F64, requires_grad=True) for m in names}
    conf = {m: torch.rand(8, generator=g, dtype=F64, requires_grad=True) for m in names}
    present = {m: torch.rand(8, generator=g) > 0.3 for m in names}
    out = fusion(feats, conf, present)
    out.fused.square().sum().backward()
    got = [t.grad.clone() for t in (*feats.values(), *conf.values())]
    for t in (*feats.values(), *conf.values()):
        t.grad = None

    on = torch.stack([present[m] for m in names], 1)
    c = torch.where(on, torch.stack([conf[m] for m in names], 1), 0.0)
    s = fusion.scale * c + fusion.bias
    if hidden:
        act = torch.tanh(c.unsqueeze(-1) * fusion.mlp_in_weight + fusion.mlp_in_bias)
        s = s + (act * fusion.mlp_out_weight).sum(-1)
    gates = torch.softmax((s / temperature).masked_fill(~on, -1e300), dim=1)
    gates = torch.where(on, gates, 0.0)
    h = torch.where(on.unsqueeze(-1), torch.stack([feats[m] for m in names], 1), 0.0)
    fused = (gates.unsqueeze(-1) * h).sum(1)
    fused.square().sum().backward()
    torch.testing.assert_close(out.fused, fused, **CLOSE)
    torch.testing.assert_close(out.gates, gates, **CLOSE)
    torch.testing.assert_close(fusion.gate_scores(c), s, **CLOSE)
    for u, t in zip(got, (*feats.values(), *conf.values())):
        torch.testing.assert_close(u, t.grad, **CLOSE)


def test_gated_fusion_value_checks_still_raise():
    fusion = PrototypeGatedFusion(["a", "b"], 3)
    feats = {"a": torch.randn(2, 3), "b": torch.randn(2, 3)}
    conf = {"a": torch.rand(2), "b": torch.tensor([0.5, float("nan")])}
    with pytest.raises(ModbalanceError, match="confidence"):
        fusion(feats, conf)
    present = {"a": torch.ones(2, dtype=torch.bool), "b": torch.tensor([True, False])}
    fusion(feats, conf, present)  # the NaN is in an absent modality
    feats["a"] = torch.full((2, 3), float("inf"))
    with pytest.raises(ModbalanceError, match="features"):
        fusion(feats, conf, present)


# ----------------------------------------------------------------------------- the game's rows
def _gated_game(names, dim, generator):
    cals = {m: PrototypeCalibrator(4, dim).double() for m in names}
    for cal in cals.values():
        cal(torch.randn(12, dim, generator=generator, dtype=F64), torch.arange(12) % 4)
    fusion = PrototypeGatedFusion(names, dim).double()
    head = torch.nn.Linear(dim, 1).double()

    def fuse(feats, present):
        conf = {m: cals[m].confidence(feats[m]) for m in names}
        return head(fusion(feats, conf, present).fused).squeeze(-1)

    return ModalityGame(fuse, names, masking="present", value="neg_mae", modules=[head])


@pytest.mark.parametrize("m", [2, 4, 7])
def test_game_rows_once_per_sample_equal_every_row(monkeypatch, m):
    """Confidence and gate scores per sample, repeated, give the game's values of every row."""
    g = torch.Generator().manual_seed(m)
    names = [f"m{i}" for i in range(m)]
    game = _gated_game(names, 6, g)
    feats = {n: torch.randn(10, 6, generator=g, dtype=F64) for n in names}
    target = torch.randn(10, generator=g, dtype=F64)
    state = game.state_dict()
    fast = game(feats, target)
    calls = []
    real = mproto.PrototypeCalibrator.confidence

    def spy(self, features, labels=None):
        calls.append(features.shape[0])
        return real(self, features, labels)

    monkeypatch.setattr(mproto.PrototypeCalibrator, "confidence", spy)
    game.load_state_dict(state)
    game(feats, target)
    assert min(calls) == 10  # per sample: the game's repeated rows are computed once
    calls.clear()
    monkeypatch.setattr(mproto, "_TILES", "_off")
    monkeypatch.setattr(mfusion, "_TILES", "_off")
    game.load_state_dict(state)
    slow = game(feats, target)
    assert min(calls) == 10 * game.num_coalitions  # every row
    torch.testing.assert_close(fast.table, slow.table, equal_nan=True, **CLOSE)
    torch.testing.assert_close(fast.shapley, slow.shapley, **CLOSE)


def test_marked_rows_with_grad_use_every_row():
    cal = PrototypeCalibrator(3, 4)
    cal(torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]))
    base = torch.randn(5, 4)
    rows = base.repeat(3, 1).requires_grad_(True)
    rows._modbalance_tiles = (base, 3)
    conf = cal.confidence(rows)  # grad mode: computed on every row, differentiable
    assert conf.requires_grad and not hasattr(conf, "_modbalance_tiles")
    conf.sum().backward()
    assert rows.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(cal.confidence(rows), conf.detach())
        wrong = base.repeat(2, 1)
        wrong._modbalance_tiles = (base, 3)  # inconsistent marks are ignored
        assert cal.confidence(wrong).shape == (10,)
