"""Tests for modbalance.ot: the batched log-domain Sinkhorn solver and SinkhornAligner.

The reference is POT (``ot.sinkhorn`` / ``ot.sinkhorn2`` with ``method="sinkhorn_log"``) in float64
on numpy arrays with a tight stopping threshold.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from _reference import PotAligner
from hypothesis import given, settings
from hypothesis import strategies as st

from modbalance._checks import ModbalanceError, value_checks
from modbalance.ot import (
    AlignmentResult,
    PairwiseAlignment,
    SinkhornAligner,
    SinkhornResult,
    sinkhorn,
)

ot = pytest.importorskip("ot")

SIZES = (1, 2, 7, 32, 128)
F64 = torch.float64


def _problem(k, n, *, seed=0, uniform=False, dtype=F64, device="cpu", zeros_a=(), zeros_b=()):
    gen = torch.Generator().manual_seed(seed)
    cost = torch.rand(k, n, generator=gen, dtype=F64)
    if uniform:
        a = torch.full((k,), 1.0 / k, dtype=F64)
        b = torch.full((n,), 1.0 / n, dtype=F64)
    else:
        a = torch.rand(k, generator=gen, dtype=F64) + 0.2
        b = torch.rand(n, generator=gen, dtype=F64) + 0.2
    for i in zeros_a:
        a[i] = 0.0
    for j in zeros_b:
        b[j] = 0.0
    a, b = a / a.sum(), b / b.sum()
    return cost.to(device, dtype), a.to(device, dtype), b.to(device, dtype)


def _pot(cost, a, b, eps, n_iter=50_000, thr=1e-13, linear_from_sinkhorn2=False):
    c, aa, bb = (t.detach().cpu().double().numpy() for t in (cost, a, b))
    plan = ot.sinkhorn(aa, bb, c, eps, method="sinkhorn_log", stopThr=thr, numItermax=n_iter)
    if linear_from_sinkhorn2:
        kw = dict(method="sinkhorn_log", stopThr=thr, numItermax=n_iter)
        lin = float(ot.sinkhorn2(aa, bb, c, eps, **kw))
    else:
        lin = float((plan * c).sum())
    ref = np.outer(aa, bb)
    pos = plan > 0
    kl = float((plan[pos] * np.log(plan[pos] / ref[pos])).sum())
    return plan, lin, lin + eps * kl


def _rel(x, y):
    return abs(x - y) / max(abs(y), 1e-300)


# ------------------------------------------------------------------------------------------
# agreement with POT
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", SIZES)
@pytest.mark.parametrize("n", SIZES)
def test_matches_pot_float64(k, n):
    uniform = (k + n) % 2 == 0
    cost, a, b = _problem(k, n, seed=k * 1000 + n, uniform=uniform)
    eps = 0.05
    plan_ref, lin_ref, val_ref = _pot(cost, a, b, eps, linear_from_sinkhorn2=True)
    res = sinkhorn(cost, a, b, epsilon=eps, max_iter=20_000, tol=1e-13)
    assert bool(res.converged)
    plan = res.plan.numpy()
    assert np.abs(plan - plan_ref).max() / plan_ref.max() <= 1e-6
    assert _rel(float(res.value_linear), lin_ref) <= 1e-6
    assert _rel(float(res.value), val_ref) <= 1e-6


def test_uniform_default_equals_explicit_uniform():
    cost, a, b = _problem(5, 3, uniform=True)
    r1 = sinkhorn(cost, epsilon=0.1, max_iter=30)
    r2 = sinkhorn(cost, a, b, epsilon=0.1, max_iter=30)
    torch.testing.assert_close(r1.plan, r2.plan, rtol=0, atol=1e-14)
    torch.testing.assert_close(r1.value, r2.value, rtol=0, atol=1e-14)


def test_small_epsilon_float32_is_finite_and_accurate():
    # Normalised squared-Euclidean prototype costs at eps = 1e-3 (POT's non-log solvers return 0.0
    # here in float32). Random prototypes converge very slowly at this eps, so the float32 solver
    # is compared with float64 POT after the same number of iterations: POT's `sinkhorn_log` on the
    # transposed problem performs exactly our updates in the same order.
    gen = torch.Generator().manual_seed(3)
    n_iter = 1000
    for k in (16,):
        x, y = (
            torch.randn(k, 16, generator=gen, dtype=F64),
            torch.randn(k, 16, generator=gen, dtype=F64),
        )
        cost = torch.cdist(x, y) ** 2
        cost = cost / cost.max()
        uni = np.full(k, 1.0 / k)
        plan_ref = ot.sinkhorn(
            uni, uni, cost.numpy().T.copy(), 1e-3, method="sinkhorn_log", stopThr=0.0,
            numItermax=n_iter, warn=False,
        ).T  # fmt: skip
        res = sinkhorn(cost.float(), epsilon=1e-3, max_iter=n_iter)
        assert torch.isfinite(res.plan).all() and torch.isfinite(res.value)
        assert np.abs(res.plan.double().numpy() - plan_ref).max() <= 1e-4
        assert abs(float(res.value_linear) - float((plan_ref * cost.numpy()).sum())) <= 1e-4
        # The float64 solver reproduces POT's iterates to round-off.
        res64 = sinkhorn(cost, epsilon=1e-3, max_iter=n_iter)
        assert np.abs(res64.plan.numpy() - plan_ref).max() <= 1e-10
    # A well-separated matching converges at once: compare with converged POT.
    off = 1.0 - torch.eye(32, dtype=F64)
    cost = off * (0.5 + 0.5 * torch.rand(32, 32, generator=gen, dtype=F64))
    cost = cost / cost.max()
    uni = torch.full((32,), 1.0 / 32, dtype=F64)
    plan_ref, lin_ref, val_ref = _pot(cost, uni, uni, 1e-3, n_iter=1000, thr=1e-12)
    res = sinkhorn(cost.float(), epsilon=1e-3, max_iter=20)
    assert torch.isfinite(res.plan).all() and bool(res.converged)
    assert np.abs(res.plan.double().numpy() - plan_ref).max() <= 1e-4
    assert abs(float(res.value) - val_ref) <= 1e-4
    assert abs(float(res.value_linear) - lin_ref) <= 1e-4


# ------------------------------------------------------------------------------------------
# properties
# ------------------------------------------------------------------------------------------

problems = st.tuples(
    st.integers(1, 8), st.integers(1, 8), st.integers(0, 10_000), st.floats(0.03, 1.0)
)


@settings(max_examples=40, deadline=None)
@given(problems)
def test_marginals_within_reported_error(p):
    k, n, seed, eps = p
    cost, a, b = _problem(k, n, seed=seed)
    # at epsilon = 0.03 some problems need a few thousand iterations to reach 1e-10
    # (hypothesis found (6, 6, 2, 0.03): 1.6e-10 after 2000, converged by 5000)
    res = sinkhorn(cost, a, b, epsilon=eps, max_iter=20_000, tol=1e-10)
    err = (res.plan.sum(-1) - a).abs().sum() + (res.plan.sum(-2) - b).abs().sum()
    assert float(err) <= float(res.marginal_error) + 1e-12
    assert bool(res.converged) and float(res.marginal_error) <= 1e-10
    assert (res.plan >= 0).all()
    # Short runs: the reported error is the true error, whatever its size.
    short = sinkhorn(cost, a, b, epsilon=eps, max_iter=2)
    err = (short.plan.sum(-1) - a).abs().sum() + (short.plan.sum(-2) - b).abs().sum()
    assert abs(float(err) - float(short.marginal_error)) <= 1e-12


@settings(max_examples=30, deadline=None)
@given(problems, st.randoms(use_true_random=False))
def test_permutation_equivariance(p, rnd):
    k, n, seed, eps = p
    cost, a, b = _problem(k, n, seed=seed)
    rows = list(range(k))
    cols = list(range(n))
    rnd.shuffle(rows)
    rnd.shuffle(cols)
    pr, pc = torch.tensor(rows), torch.tensor(cols)
    res = sinkhorn(cost, a, b, epsilon=eps, max_iter=40)
    perm = sinkhorn(cost[pr][:, pc], a[pr], b[pc], epsilon=eps, max_iter=40)
    torch.testing.assert_close(perm.plan, res.plan[pr][:, pc], rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(perm.value, res.value, rtol=1e-10, atol=1e-13)


@settings(max_examples=30, deadline=None)
@given(problems, st.floats(-5.0, 5.0))
def test_constant_shift_leaves_plan_unchanged(p, shift):
    k, n, seed, eps = p
    cost, a, b = _problem(k, n, seed=seed)
    res = sinkhorn(cost, a, b, epsilon=eps, max_iter=3000, tol=1e-12)
    moved = sinkhorn(cost + shift, a, b, epsilon=eps, max_iter=3000, tol=1e-12)
    torch.testing.assert_close(moved.plan, res.plan, rtol=1e-8, atol=1e-11)
    torch.testing.assert_close(moved.value, res.value + shift, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(moved.value_linear, res.value_linear + shift, rtol=1e-8, atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6), st.integers(1, 5), st.integers(0, 10_000))
def test_batched_equals_loop(k, n, batch, seed):
    gen = torch.Generator().manual_seed(seed)
    cost = torch.rand(batch, k, n, generator=gen, dtype=F64)
    a = torch.rand(batch, k, generator=gen, dtype=F64) + 0.1
    a = a / a.sum(-1, keepdim=True)
    b = torch.full((n,), 1.0 / n, dtype=F64)  # broadcast over the batch
    res = sinkhorn(cost, a, b, epsilon=0.1, max_iter=25)
    assert res.plan.shape == (batch, k, n) and res.value.shape == (batch,)
    for i in range(batch):
        one = sinkhorn(cost[i], a[i], b, epsilon=0.1, max_iter=25)
        torch.testing.assert_close(res.plan[i], one.plan, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(res.value[i], one.value, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(res.potentials[1][i], one.potentials[1], rtol=1e-12, atol=1e-14)


def test_multiple_batch_dims_and_broadcast_cost():
    cost = torch.rand(1, 3, 4, 5, dtype=F64)
    a = torch.softmax(torch.randn(2, 3, 4, dtype=F64), -1)
    res = sinkhorn(cost, a, epsilon=0.1, max_iter=10)
    assert res.plan.shape == (2, 3, 4, 5)
    assert res.potentials[0].shape == (2, 3, 4) and res.potentials[1].shape == (2, 3, 5)
    assert res.converged.shape == (2, 3) and res.converged.dtype == torch.bool


# ------------------------------------------------------------------------------------------
# iterations, tolerance, warm start, host synchronisation
# ------------------------------------------------------------------------------------------


def test_fixed_iterations_and_tolerance_checks():
    cost, a, b = _problem(6, 5)
    res = sinkhorn(cost, a, b, epsilon=0.05, max_iter=37)
    assert res.n_iter == 37 and isinstance(res.n_iter, int)
    res = sinkhorn(cost, a, b, epsilon=0.05, max_iter=5000, tol=1e-9, check_every=7)
    assert res.n_iter < 5000 and (res.n_iter - 1) % 7 == 0
    assert bool(res.converged) and float(res.marginal_error) <= 1e-9
    hard = sinkhorn(cost, a, b, epsilon=0.05, max_iter=3, tol=1e-12)
    assert hard.n_iter == 3 and not bool(hard.converged)


def test_warm_start_needs_fewer_iterations():
    cost, a, b = _problem(16, 16, seed=5)
    cold = sinkhorn(cost, a, b, epsilon=0.02, max_iter=5000, tol=1e-8)
    nudged = cost + 1e-5 * torch.rand_like(cost)
    cold2 = sinkhorn(nudged, a, b, epsilon=0.02, max_iter=5000, tol=1e-8)
    warm = sinkhorn(nudged, a, b, epsilon=0.02, max_iter=5000, tol=1e-8, init=cold.potentials)
    assert bool(warm.converged) and warm.n_iter < cold2.n_iter / 2
    torch.testing.assert_close(warm.plan, cold2.plan, rtol=1e-6, atol=1e-9)


def test_no_host_sync_without_tolerance(monkeypatch):
    cost = torch.rand(4, 6, 6, requires_grad=True)

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    with value_checks(False):
        for grad in ("envelope", "unrolled"):
            res = sinkhorn(cost, epsilon=0.05, max_iter=20, grad=grad)
            res.value.sum().backward()
        aligner = SinkhornAligner(max_iter=20, warm_start=True)
        protos = {m: torch.randn(5, 8, requires_grad=True) for m in "abc"}
        masses = {m: torch.tensor([1.0, 0.0, 2.0, 3.0, 1.0]) for m in "abc"}
        aligner.pairwise(protos, masses).loss.backward()
        aligner.pairwise(protos, masses)
    monkeypatch.undo()
    with pytest.raises(AssertionError, match="host synchronisation"):
        monkeypatch.setattr(torch.Tensor, "__bool__", forbidden)
        sinkhorn(cost, epsilon=0.05, max_iter=20, tol=1e-6)


def test_no_cuda_sync_without_tolerance(device):
    if device.type != "cuda":
        pytest.skip("needs CUDA")
    cost = torch.rand(8, 7, 7, device=device, requires_grad=True)
    sinkhorn(cost, max_iter=3)  # warm up lazy CUDA initialisation
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with value_checks(False):
            res = sinkhorn(cost, epsilon=0.05, max_iter=20)
            res.value.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert torch.isfinite(cost.grad).all()


# ------------------------------------------------------------------------------------------
# gradients
# ------------------------------------------------------------------------------------------


def test_gradcheck_unrolled():
    gen = torch.Generator().manual_seed(0)
    cost = torch.rand(2, 3, 4, generator=gen, dtype=F64, requires_grad=True)
    la = torch.randn(2, 3, generator=gen, dtype=F64, requires_grad=True)
    lb = torch.randn(4, generator=gen, dtype=F64, requires_grad=True)

    def fn(c, alpha, beta):
        res = sinkhorn(
            c, torch.softmax(alpha, -1), torch.softmax(beta, -1), epsilon=0.2, max_iter=12,
            grad="unrolled",
        )  # fmt: skip
        return res.value, res.value_linear, res.plan, res.potentials[0]

    assert torch.autograd.gradcheck(fn, (cost, la, lb))


def test_envelope_gradient_is_plan_and_centred_potentials():
    cost, a, b = _problem(5, 4, seed=7)
    cost.requires_grad_(True)
    a.requires_grad_(True)
    b.requires_grad_(True)
    eps = 0.1
    res = sinkhorn(cost, a, b, epsilon=eps, max_iter=5000, tol=1e-13)
    gc, ga, gb = torch.autograd.grad(res.value, (cost, a, b))
    f, g = res.potentials
    torch.testing.assert_close(gc, res.plan.detach(), rtol=0, atol=1e-15)
    torch.testing.assert_close(ga, (f - f.mean()).detach(), rtol=0, atol=1e-14)
    torch.testing.assert_close(gb, (g - g.mean()).detach(), rtol=0, atol=1e-14)

    # Independent check: central finite differences of the converged optimal value.
    def value(c, aa, bb):
        return float(sinkhorn(c, aa, bb, epsilon=eps, max_iter=5000, tol=1e-13).value)

    c0, a0, b0 = cost.detach(), a.detach(), b.detach()
    h = 1e-6
    for i, j in ((0, 0), (2, 3), (4, 1)):
        d = torch.zeros_like(c0)
        d[i, j] = h
        fd = (value(c0 + d, a0, b0) - value(c0 - d, a0, b0)) / (2 * h)
        assert abs(fd - float(gc[i, j])) <= 1e-7
    # Along the simplex: a + t (e_i - e_j).
    for i, j in ((0, 1), (3, 2)):
        d = torch.zeros_like(a0)
        d[i], d[j] = h, -h
        fd = (value(c0, a0 + d, b0) - value(c0, a0 - d, b0)) / (2 * h)
        assert abs(fd - float(ga[i] - ga[j])) <= 1e-6


def test_unrolled_value_gradient_matches_envelope_at_convergence():
    cost, a, b = _problem(6, 6, seed=11)
    grads = {}
    for mode in ("envelope", "unrolled"):
        c = cost.clone().requires_grad_(True)
        res = sinkhorn(c, a, b, epsilon=0.1, max_iter=400, grad=mode)
        grads[mode] = torch.autograd.grad(res.value, c)[0]
    torch.testing.assert_close(grads["unrolled"], grads["envelope"], rtol=1e-7, atol=1e-9)
    # The linear cost <P(C), C> differentiates to something else (POT sinkhorn2's gradient).
    c = cost.clone().requires_grad_(True)
    lin = sinkhorn(c, a, b, epsilon=0.1, max_iter=400, grad="unrolled").value_linear
    g_lin = torch.autograd.grad(lin, c)[0]
    rel = (g_lin - grads["envelope"]).norm() / grads["envelope"].norm()
    assert rel > 0.05


def _graph_size(t):
    seen, stack = set(), [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(nxt for nxt, _ in node.next_functions)
    return len(seen)


def test_envelope_graph_does_not_grow_with_iterations():
    cost = torch.rand(3, 5, 5, requires_grad=True)
    sizes = {}
    for mode in ("envelope", "unrolled"):
        for it in (2, 50):
            res = sinkhorn(cost, epsilon=0.05, max_iter=it, grad=mode)
            sizes[mode, it] = _graph_size(res.value + res.plan.sum() + res.value_linear)
    assert sizes["envelope", 2] == sizes["envelope", 50]
    assert sizes["unrolled", 50] > sizes["unrolled", 2] + 40


@pytest.mark.parametrize("mode", ["envelope", "unrolled"])
def test_zero_mass_marginals_no_nan(mode):
    cost, a, b = _problem(6, 5, seed=2, zeros_a=(0, 3), zeros_b=(4,))
    for t in (cost, a, b):
        t.requires_grad_(True)
    res = sinkhorn(cost, a, b, epsilon=0.05, max_iter=300, grad=mode)
    for t in (res.plan, res.value, res.value_linear, *res.potentials):
        assert torch.isfinite(t).all()
    assert (res.plan[[0, 3]] == 0).all() and (res.plan[:, 4] == 0).all()
    loss = res.value + res.value_linear + (res.plan**2).sum() + res.potentials[0].sum()
    grads = torch.autograd.grad(loss, (cost, a, b))
    for gr in grads:
        assert torch.isfinite(gr).all()
    # Same plan as POT on the problem without the empty rows/columns.
    keep_r, keep_c = [1, 2, 4, 5], [0, 1, 2, 3]
    ra, rb = a.detach()[keep_r], b.detach()[keep_c]
    plan_ref, _, val_ref = _pot(cost.detach()[keep_r][:, keep_c], ra, rb, 0.05)
    sub = res.plan.detach()[keep_r][:, keep_c].numpy()
    assert np.abs(sub - plan_ref).max() <= 1e-9
    assert _rel(float(res.value.detach()), val_ref) <= 1e-9


def test_gradients_flow_to_features():
    x = torch.randn(4, 7, 8, requires_grad=True)
    y = torch.randn(4, 7, 8, requires_grad=True)
    cost = torch.cdist(x, y) ** 2
    res = sinkhorn(cost, epsilon=0.5, max_iter=20)
    res.value.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0 and y.grad.abs().sum() > 0


def test_dtype_and_device_follow_input(device):
    cost = torch.rand(3, 4, device=device, dtype=F64)
    res = sinkhorn(cost, max_iter=5)
    for t in (res.plan, res.value, res.value_linear, *res.potentials, res.marginal_error):
        assert t.dtype == F64 and t.device == cost.device
    assert isinstance(res, SinkhornResult)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("epsilon", [1e-6, 1e-3, 0.05])
def test_half_precision_is_solved_in_float32(dtype, epsilon):
    cost = torch.rand(2, 5, 4, generator=torch.Generator().manual_seed(3)).to(dtype)
    res = sinkhorn(cost, epsilon=epsilon, max_iter=50)
    ref = sinkhorn(cost.float(), epsilon=epsilon, max_iter=50)
    for t in (res.plan, res.value, res.value_linear, *res.potentials, res.marginal_error):
        assert t.dtype == dtype and bool(torch.isfinite(t).all())
    torch.testing.assert_close(res.plan, ref.plan.to(dtype))
    torch.testing.assert_close(res.value, ref.value.to(dtype))
    leaf = cost.clone().requires_grad_(True)
    sinkhorn(leaf, epsilon=epsilon, max_iter=20).value.sum().backward()
    assert leaf.grad.dtype == dtype and bool(torch.isfinite(leaf.grad).all())


@pytest.mark.parametrize(
    ("scale", "dtype", "epsilon"),
    [
        (1e30, torch.float32, 0.05),
        (1e8, torch.float32, 0.05),
        (1e16, F64, 0.05),
        (1.0, torch.float16, 1e-8),
    ],
)
def test_cost_spread_beyond_precision_is_an_error(scale, dtype, epsilon):
    cost = (torch.rand(4, 5, generator=torch.Generator().manual_seed(0)) * scale).to(dtype)
    with pytest.raises(ModbalanceError, match=r"`cost` spans .* times `epsilon`.*normalise"):
        sinkhorn(cost, epsilon=epsilon)
    # the same problem in the cost's own units solves to a finite plan
    res = sinkhorn(cost / cost.amax(), epsilon=0.05)
    assert bool(torch.isfinite(res.plan).all())


def test_large_but_resolvable_cost_spread_is_finite():
    cost = torch.rand(4, 5, generator=torch.Generator().manual_seed(0)) * 1e4
    res = sinkhorn(cost, epsilon=5.0, max_iter=200)  # spans ~2e3 epsilons of 8.4e6: fine
    assert bool(torch.isfinite(res.plan).all())
    torch.testing.assert_close(res.plan.sum(), torch.tensor(1.0), atol=1e-3, rtol=0)


# ------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------


def test_sinkhorn_errors():
    c = torch.rand(3, 4)
    a = torch.full((3,), 1 / 3)
    b = torch.full((4,), 1 / 4)
    with pytest.raises(ModbalanceError, match=r"`cost` must have shape \(\.\.\., K, L\).*\(4\)"):
        sinkhorn(torch.rand(4))
    with pytest.raises(TypeError, match=r"`cost` must be a torch\.Tensor"):
        sinkhorn([[0.0, 1.0]])
    with pytest.raises(ModbalanceError, match=r"`cost` must not be empty"):
        sinkhorn(torch.rand(0, 3))
    with pytest.raises(
        ModbalanceError, match=r"`a` must have shape \(\.\.\., 3\).*got shape \(4\)"
    ):
        sinkhorn(c, b, b)
    with pytest.raises(
        ModbalanceError, match=r"`b` must have shape \(\.\.\., 4\).*got shape \(3\)"
    ):
        sinkhorn(c, a, a)
    with pytest.raises(ModbalanceError, match="`a` must be non-negative"):
        sinkhorn(c, torch.tensor([1.5, -0.5, 0.0]), b)
    with pytest.raises(ModbalanceError, match="`b` must sum to 1"):
        sinkhorn(c, a, torch.ones(4))
    with pytest.raises(ModbalanceError, match="`epsilon` must be > 0"):
        sinkhorn(c, epsilon=0.0)
    with pytest.raises(ModbalanceError, match="`epsilon` must be > 0"):
        sinkhorn(c, epsilon=-1.0)
    with pytest.raises(ModbalanceError, match="`cost` must contain only finite values, got 1 NaN"):
        sinkhorn(torch.tensor([[0.0, float("nan")], [1.0, 0.0]]))
    with pytest.raises(ModbalanceError, match=r"`cost` must contain only finite.*1 infinite"):
        sinkhorn(torch.tensor([[0.0, float("inf")], [1.0, 0.0]]))
    with pytest.raises(ModbalanceError, match="`max_iter` must be >= 1"):
        sinkhorn(c, max_iter=0)
    with pytest.raises(ModbalanceError, match="`tol` must be > 0"):
        sinkhorn(c, tol=0.0)
    with pytest.raises(ModbalanceError, match="`check_every` must be >= 1"):
        sinkhorn(c, check_every=0)
    with pytest.raises(ModbalanceError, match="`grad` must be one of"):
        sinkhorn(c, grad="implicit")
    with pytest.raises(ModbalanceError, match=r"`init\[1\]` must have shape \(4\)"):
        sinkhorn(c, init=(torch.zeros(3), torch.zeros(5)))
    with pytest.raises(ModbalanceError, match="`init` must be a pair"):
        sinkhorn(c, init=torch.zeros(3))
    with pytest.raises(ModbalanceError, match="batch shapes of `cost`"):
        sinkhorn(torch.rand(2, 3, 4), torch.full((5, 3), 1 / 3))
    with pytest.raises(TypeError, match="`a` must have a floating dtype"):
        sinkhorn(c, torch.tensor([1, 0, 0]))


def test_value_checks_can_be_disabled():
    with value_checks(False):
        res = sinkhorn(torch.rand(3, 4), torch.full((3,), 0.5), max_iter=3)
        wide = sinkhorn(torch.rand(3, 4) * 1e30, max_iter=3)  # not refused, not resolvable
    assert res.plan.shape == (3, 4) and wide.plan.shape == (3, 4)


# ------------------------------------------------------------------------------------------
# SinkhornAligner
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["cosine", "sqeuclidean"])
@pytest.mark.parametrize("grad", ["envelope", "unrolled"])
def test_aligner_gradient_reaches_both_sides(metric, grad, device):
    x = torch.randn(7, 16, device=device, requires_grad=True)
    y = torch.randn(7, 16, device=device, requires_grad=True)
    out = SinkhornAligner(metric=metric, grad=grad)(x, y)
    assert isinstance(out, AlignmentResult)
    assert out.loss.shape == () and out.plan.shape == (7, 7) and out.cost.shape == (7, 7)
    assert float(out.cost.detach().min()) >= 0 and float(out.cost.detach().max()) <= 1 + 1e-6
    out.loss.backward()
    for t in (x, y):
        assert torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_aligner_gradient_side():
    x = torch.randn(5, 8, requires_grad=True)
    y = torch.randn(5, 8, requires_grad=True)
    SinkhornAligner(gradient_side="x")(x, y).loss.backward()
    assert x.grad is not None and y.grad is None
    x.grad = None
    SinkhornAligner(gradient_side="y")(x, y).loss.backward()
    assert x.grad is None and y.grad is not None


def test_aligner_loss_is_value_plus_structure():
    gen = torch.Generator().manual_seed(4)
    x, y = (
        torch.randn(6, 10, generator=gen, dtype=F64),
        torch.randn(6, 10, generator=gen, dtype=F64),
    )
    counts_a = torch.tensor([3.0, 0.0, 1.0, 2.0, 5.0, 1.0], dtype=F64)
    counts_b = torch.tensor([1.0, 2.0, 0.0, 4.0, 1.0, 1.0], dtype=F64)
    kw = dict(epsilon=0.05, max_iter=3000, tol=1e-12)
    full = SinkhornAligner(structure_weight=2.0, **kw)(x, y, counts_a, counts_b)
    plain = SinkhornAligner(structure_weight=0.0, **kw)(x, y, counts_a, counts_b)
    a, b = counts_a / counts_a.sum(), counts_b / counts_b.sum()
    ref = sinkhorn(full.cost, a, b, epsilon=0.05, max_iter=3000, tol=1e-12)
    torch.testing.assert_close(plain.loss, ref.value, rtol=1e-12, atol=1e-14)
    p = full.plan
    valid = [0, 3, 4, 5]  # classes 1 and 2 are absent on one side
    diag = p.diagonal()[valid]
    structure = -0.5 * (torch.log(diag / a[valid]) + torch.log(diag / b[valid])).mean()
    torch.testing.assert_close(full.loss - plain.loss, 2.0 * structure, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("metric", ["cosine", "sqeuclidean"])
def test_aligner_ignores_absent_classes(metric):
    x = torch.randn(5, 8, dtype=F64, requires_grad=True)
    y = torch.randn(5, 8, dtype=F64)
    counts = torch.tensor([2.0, 1.0, 0.0, 3.0, 1.0], dtype=F64)  # class 2 absent in x
    aligner = SinkhornAligner(metric=metric, max_iter=200)
    out = aligner(x, y, counts, None)
    assert torch.isfinite(out.loss) and (out.plan[2] == 0).all()
    out.loss.backward()
    assert torch.isfinite(x.grad).all() and (x.grad[2] == 0).all() and x.grad.abs().sum() > 0
    moved = x.detach().clone()
    moved[2] = 100.0 * torch.randn(8, dtype=F64)  # an absent class may hold any (stale) value
    torch.testing.assert_close(aligner(moved, y, counts, None).loss, out.loss.detach())


def test_aligner_scale_invariance():
    x, y = torch.randn(6, 8, dtype=F64), torch.randn(6, 8, dtype=F64)
    for metric in ("cosine", "sqeuclidean"):
        aligner = SinkhornAligner(metric=metric, max_iter=100)
        torch.testing.assert_close(aligner(10 * x, 10 * y).loss, aligner(x, y).loss)


def test_pairwise_equals_separate_calls():
    names = ("text", "audio", "vision", "depth")
    protos = {m: torch.randn(5, 12, dtype=F64, requires_grad=True) for m in names}
    masses = {m: torch.randint(0, 4, (5,)).to(F64) + (i == 0) for i, m in enumerate(names)}
    masses["audio"][1] = 0.0
    for m in names:
        masses[m][0] = 1.0
    aligner = SinkhornAligner(metric="sqeuclidean", max_iter=60)
    out = aligner.pairwise(protos, masses)
    assert isinstance(out, PairwiseAlignment)
    assert out.pairs == (
        ("text", "audio"), ("text", "vision"), ("text", "depth"),
        ("audio", "vision"), ("audio", "depth"), ("vision", "depth"),
    )  # fmt: skip
    assert out.losses.shape == (6,) and out.plans.shape == (6, 5, 5) and out.loss.shape == ()
    for p, (mi, mj) in enumerate(out.pairs):
        one = aligner(protos[mi], protos[mj], masses[mi], masses[mj])
        torch.testing.assert_close(out.losses[p], one.loss, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(out.plans[p], one.plan, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out.loss, out.losses.mean())
    out.loss.backward()
    for m in names:
        assert torch.isfinite(protos[m].grad).all() and protos[m].grad.abs().sum() > 0


def test_pairwise_absent_classes_no_nan():
    protos = {m: torch.randn(4, 6, requires_grad=True) for m in ("t", "a", "v")}
    masses = {
        "t": torch.tensor([3, 0, 1, 2]),
        "a": torch.tensor([0, 2, 1, 2]),
        "v": torch.tensor([1, 1, 0, 2]),
    }
    for grad in ("envelope", "unrolled"):
        out = SinkhornAligner(grad=grad, max_iter=30).pairwise(protos, masses)
        assert torch.isfinite(out.losses).all() and torch.isfinite(out.plans).all()
        out.loss.backward()
        for t in protos.values():
            assert torch.isfinite(t.grad).all()
            t.grad = None


def test_aligner_warm_start_reduces_iterations():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 32, generator=gen, dtype=F64)
    y = x[torch.randperm(16, generator=gen)] + 0.3 * torch.randn(16, 32, generator=gen, dtype=F64)
    warm = SinkhornAligner(epsilon=0.05, max_iter=5000, tol=1e-5, warm_start=True)
    cold = SinkhornAligner(epsilon=0.05, max_iter=5000, tol=1e-5)
    first = warm(x, y)
    assert warm.warm_g is not None and warm.warm_g.shape == (16,)
    step = 1e-3 * torch.randn(16, 32, generator=gen, dtype=F64)
    second = warm(x + step, y)
    cold_out = cold(x + step, y)
    assert warm.last_n_iter < cold.last_n_iter / 4
    torch.testing.assert_close(second.plan, cold_out.plan, rtol=0, atol=1e-5)
    assert first.loss.shape == ()
    # A different shape does not reuse the buffers.
    warm(x[:5], y[:5])
    assert warm.warm_g.shape == (5,)
    warm.reset_warm_start()
    assert warm.warm_g is None


def test_aligner_state_dict_and_to_dtype():
    aligner = SinkhornAligner(warm_start=True, max_iter=200, tol=1e-6)
    x, y = torch.randn(4, 5, 8), torch.randn(4, 5, 8)
    aligner(x, y)
    assert aligner.warm_g.dtype == torch.float32
    assert dict(aligner.state_dict()) == {}  # warm-start potentials are not persistent
    fresh = SinkhornAligner(warm_start=True)
    fresh.load_state_dict(aligner.state_dict())
    aligner.to(F64)
    assert aligner.warm_g.dtype == F64 and aligner.warm_f.dtype == F64
    out = aligner(x.double(), y.double())
    assert out.loss.dtype == F64 and out.plan.dtype == F64 and out.loss.shape == (4,)
    assert "metric='cosine'" in repr(aligner)


def test_aligner_with_pot_iterations_matches_torch():
    gen = torch.Generator().manual_seed(1)
    protos = {m: torch.randn(6, 8, generator=gen, dtype=F64).requires_grad_() for m in "tav"}
    masses = {m: torch.tensor([1.0, 2.0, 0.0, 1.0, 1.0, 3.0], dtype=F64) for m in "tav"}
    kw = dict(metric="sqeuclidean", epsilon=0.1, max_iter=2000, tol=1e-10)
    ours = SinkhornAligner(**kw).pairwise(protos, masses)
    pot = PotAligner(**kw).pairwise(protos, masses)
    torch.testing.assert_close(pot.losses, ours.losses, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(pot.plans, ours.plans, rtol=1e-6, atol=1e-9)
    g_ours = torch.autograd.grad(ours.loss, protos["t"])[0]
    g_pot = torch.autograd.grad(pot.loss, protos["t"])[0]
    torch.testing.assert_close(g_pot, g_ours, rtol=1e-5, atol=1e-8)


def test_pot_is_imported_lazily():
    code = "import sys, modbalance.ot; print('ot' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_aligner_errors():
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    with pytest.raises(ModbalanceError, match="`metric` must be one of"):
        SinkhornAligner(metric="l1")
    with pytest.raises(ModbalanceError, match="`epsilon` must be > 0"):
        SinkhornAligner(epsilon=0)
    with pytest.raises(ModbalanceError, match="`structure_weight` must be >= 0"):
        SinkhornAligner(structure_weight=-1.0)
    with pytest.raises(TypeError, match="backend"):  # POT runs in the tests only
        SinkhornAligner(backend="pot")
    with pytest.raises(ModbalanceError, match="`gradient_side` must be one of"):
        SinkhornAligner(gradient_side="none")
    with pytest.raises(TypeError, match="`warm_start` must be a bool"):
        SinkhornAligner(warm_start=1)
    aligner = SinkhornAligner()
    with pytest.raises(ModbalanceError, match=r"needs as many prototypes.*K=4.*L=3"):
        aligner(x, torch.randn(3, 8))
    assert SinkhornAligner(structure_weight=0.0)(x, torch.randn(3, 8)).plan.shape == (4, 3)
    with pytest.raises(ModbalanceError, match="same feature size D"):
        aligner(x, torch.randn(4, 7))
    with pytest.raises(ModbalanceError, match=r"`x` must have shape \(\.\.\., K, D\)"):
        aligner(torch.randn(8), y)
    with pytest.raises(ModbalanceError, match="`a` must be non-negative"):
        aligner(x, y, torch.tensor([1.0, -1.0, 1.0, 1.0]))
    with pytest.raises(ModbalanceError, match="`b` must have positive total weight"):
        aligner(x, y, None, torch.zeros(4))
    with pytest.raises(ModbalanceError, match=r"`a` must have shape \(\.\.\., 4\)"):
        aligner(x, y, torch.ones(3))
    with pytest.raises(ModbalanceError, match="`y` must contain only finite"):
        aligner(x, torch.full((4, 8), math.nan))
    with pytest.raises(ModbalanceError, match="at least 2 modalities"):
        aligner.pairwise({"t": x})
    with pytest.raises(ModbalanceError, match=r"same shape \(K, D\)"):
        aligner.pairwise({"t": x, "a": torch.randn(5, 8)})
    with pytest.raises(ModbalanceError, match="same keys as `prototypes`"):
        aligner.pairwise({"t": x, "a": y}, {"t": torch.ones(4)})
    with pytest.raises(ModbalanceError, match=r"`masses\['a'\]` must have shape \(4\)"):
        aligner.pairwise({"t": x, "a": y}, {"t": torch.ones(4), "a": torch.ones(5)})
    with pytest.raises(TypeError, match="`prototypes` must be a mapping"):
        aligner.pairwise([x, y])
