"""Tests for modbalance.prototypes: label binning, class means and PrototypeCalibrator."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import modbalance.prototypes as prototypes_module
from modbalance._checks import ModbalanceError, value_checks
from modbalance.prototypes import (
    CalibrationOutput,
    PrototypeCalibrator,
    class_means,
    sentiment_classes,
)

# ----------------------------------------------------------------------------- sentiment_classes

SCORES = [
    -3.7,
    -3.0,
    -2.5,
    -1.5,
    -1.2,
    -0.6,
    -0.5,
    -0.4,
    0.0,
    0.4,
    0.5,
    0.6,
    1.5,
    2.5,
    2.51,
    3.0,
    3.4,
]
# Hand-computed: clip, round half to even, shift. 2 classes: y >= 0.
TABLES = {
    7: [0, 0, 1, 1, 2, 2, 3, 3, 3, 3, 3, 4, 5, 5, 6, 6, 6],
    5: [0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 3, 4, 4, 4, 4, 4],
    3: [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2],
    2: [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1],
}


@pytest.mark.parametrize("k", [7, 5, 3, 2])
def test_sentiment_classes_tables(k, device):
    y = torch.tensor(SCORES, device=device)
    out = sentiment_classes(y, k)
    assert out.dtype == torch.long
    assert out.tolist() == TABLES[k]
    # float64 and extra dimensions give the same bins
    y2 = torch.tensor(SCORES, dtype=torch.float64, device=device).reshape(1, -1)
    assert sentiment_classes(y2, k).reshape(-1).tolist() == TABLES[k]


def test_sentiment_classes_negative_zero_is_non_negative():
    assert sentiment_classes(torch.tensor([-0.0]), 2).tolist() == [1]
    assert sentiment_classes(torch.tensor([-0.0]), 3).tolist() == [1]


def test_sentiment_classes_errors():
    with pytest.raises(ModbalanceError, match="`num_classes` must be one of 7, 5, 3, 2; got 4"):
        sentiment_classes(torch.zeros(3), 4)
    with pytest.raises(TypeError, match="`y` must have a floating dtype"):
        sentiment_classes(torch.zeros(3, dtype=torch.long), 7)
    with pytest.raises(ModbalanceError, match="`y` must contain only finite values, got 1 NaN"):
        sentiment_classes(torch.tensor([0.0, float("nan")]), 7)


# ----------------------------------------------------------------------------------- class_means


def test_class_means_matches_loop(device):
    h = torch.randn(12, 5, device=device)
    y = torch.randint(0, 4, (12,), device=device)
    mask = torch.rand(12, device=device) > 0.3
    h[~mask] = float("nan")  # masked-out values never enter
    out = class_means(h, y, 4, mask)
    for k in range(4):
        sel = (y == k) & mask
        assert out.counts[k].item() == sel.sum().item()
        want = h[sel].mean(0) if sel.any() else torch.zeros(5, device=device)
        torch.testing.assert_close(out.means[k], want)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_class_means_rejects_non_finite_masked_in_features(bad):
    h = torch.randn(6, 3)
    y = torch.tensor([0, 1, 1, 2, 0, 7])  # label 7 is outside [0, 3): that row is in no class
    h[2, 1] = bad
    with pytest.raises(ModbalanceError, match=r"`features` must contain only finite.*\[0, 2\]"):
        class_means(h, y, 3)
    mask = torch.ones(6, dtype=torch.bool)
    mask[2] = False  # masking the row out makes the call valid again
    assert torch.isfinite(class_means(h, y, 3, mask).means).all()
    h2 = torch.randn(6, 3)
    h2[5] = bad  # a row whose label is in no class never enters either
    assert torch.isfinite(class_means(h2, y, 3).means).all()
    import modbalance

    with modbalance.value_checks(False):  # the check reads data: it can be switched off
        assert not torch.isfinite(class_means(h, y, 3).means).all()


# ------------------------------------------------------------------------------ reference helpers


def ref_ema(state, feats, labels, mask, momentum, metric):
    """Slow loop reference of one EMA step in float64. state = (protos, init, counts) lists."""
    protos, init, counts = state
    protos, init, counts = protos.clone(), list(init), list(counts)
    for k in range(protos.shape[0]):
        rows = [i for i in range(len(labels)) if bool(mask[i]) and int(labels[i]) == k]
        if not rows:
            continue
        zs = []
        for i in rows:
            z = feats[i].double()
            if metric == "cosine":
                z = z / z.norm()
            zs.append(z)
        mean = sum(zs) / len(zs)
        if metric == "cosine":
            mean = mean / mean.norm()
        if init[k]:
            new = momentum * protos[k] + (1 - momentum) * mean
            if metric == "cosine":
                new = new / new.norm()
        else:
            new = mean
        protos[k] = new
        init[k] = True
        counts[k] += len(rows)
    return protos, init, counts


# ------------------------------------------------------------------------------------ gradients


@pytest.mark.parametrize("metric", ["cosine", "sqeuclidean"])
@pytest.mark.parametrize("weights", [(1.0, 0.0), (0.0, 1.0), (1.0, 1.0)])
def test_loss_gradient_reaches_encoder_not_prototypes(metric, weights, device):
    pull, ce = weights
    encoder = torch.nn.Linear(6, 8).to(device)
    calib = PrototypeCalibrator(3, 8, metric=metric, pull_weight=pull, ce_weight=ce).to(device)
    assert list(calib.parameters()) == []
    x = torch.randn(20, 6, device=device)
    y = torch.arange(20, device=device) % 3
    for _ in range(2):  # second batch: prototypes exist before this step
        encoder.zero_grad()
        out = calib(encoder(x), y)
        assert isinstance(out, CalibrationOutput)
        out.loss.backward()
    assert encoder.weight.grad is not None
    assert encoder.weight.grad.abs().sum() > 0
    assert encoder.bias.grad.abs().sum() > 0
    for buf in (calib.prototypes, out.prototypes):
        assert not buf.requires_grad and buf.grad is None and buf.grad_fn is None


@pytest.mark.parametrize("metric", ["cosine", "sqeuclidean"])
def test_gradient_treats_prototypes_as_constants(metric):
    """The feature gradient equals the one of a hand-written loss with frozen prototypes."""
    torch.manual_seed(0)
    calib = PrototypeCalibrator(4, 5, metric=metric, momentum=0.7, temperature=0.5)
    calib(torch.randn(16, 5), torch.arange(16) % 4)  # warm-up
    h = torch.randn(10, 5, dtype=torch.float32, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 1])
    out = calib(h, y)
    (g,) = torch.autograd.grad(out.loss, h)

    p = out.prototypes  # constants: the buffer after this step's update
    h2 = h.detach().clone().requires_grad_(True)
    if metric == "cosine":
        z = F.normalize(h2, dim=-1)
        dist = 1 - (z * p[y]).sum(-1)
        logits = z @ p.T / 0.5
    else:
        dist = ((h2 - p[y]) ** 2).sum(-1)
        logits = -torch.cdist(h2, p).pow(2) / 0.5
    ref = (dist + F.cross_entropy(logits, y, reduction="none")).mean()
    (g_ref,) = torch.autograd.grad(ref, h2)
    torch.testing.assert_close(out.loss, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.logits, logits.detach(), atol=1e-4, rtol=1e-4)


def test_backward_after_a_later_update_still_works():
    calib = PrototypeCalibrator(2, 3)
    h1 = torch.randn(4, 3, requires_grad=True)
    loss1 = calib(h1, torch.tensor([0, 1, 0, 1])).loss
    calib(torch.randn(4, 3), torch.tensor([1, 1, 0, 0]))  # in-place EMA step in between
    loss1.backward()
    assert h1.grad is not None and torch.isfinite(h1.grad).all()


def test_class_means_output_is_differentiable():
    calib = PrototypeCalibrator(3, 4, metric="sqeuclidean")
    h = torch.randn(6, 4, requires_grad=True)
    out = calib(h, torch.tensor([0, 0, 1, 1, 1, 0]))
    torch.testing.assert_close(out.class_means[0], h[[0, 1, 5]].mean(0))
    assert out.class_means[2].abs().sum() == 0
    assert out.class_counts.tolist() == [3.0, 3.0, 0.0]
    out.class_means.sum().backward()
    assert h.grad.abs().sum() > 0


# -------------------------------------------------------------------------------- EMA arithmetic


def test_ema_matches_hand_computation_sqeuclidean():
    """Hand-computed numbers, momentum 0.5, 3 classes, D = 2."""
    calib = PrototypeCalibrator(3, 2, metric="sqeuclidean", momentum=0.5)
    # batch 1: classes 0 and 1 (class 2 absent)
    calib(torch.tensor([[1.0, 1.0], [3.0, 1.0], [0.0, 4.0]]), torch.tensor([0, 0, 1]))
    assert calib.prototypes.tolist() == [[2.0, 1.0], [0.0, 4.0], [0.0, 0.0]]
    assert calib.initialized.tolist() == [True, True, False]
    assert calib.counts.tolist() == [2, 1, 0]
    # batch 2: one class only (class 1): 0.5 * [0, 4] + 0.5 * mean([2, 0], [4, 3]) = [1.5, 2.75]
    calib(torch.tensor([[2.0, 0.0], [4.0, 3.0]]), torch.tensor([1, 1]))
    assert calib.prototypes.tolist() == [[2.0, 1.0], [1.5, 2.75], [0.0, 0.0]]
    assert calib.counts.tolist() == [2, 3, 0]
    # batch 3: lacks class 1; class 2 first seen (initialised to its mean), class 0 EMA
    out = calib(torch.tensor([[4.0, 3.0], [6.0, 2.0], [-2.0, 6.0]]), torch.tensor([0, 2, 2]))
    assert calib.prototypes.tolist() == [[3.0, 2.0], [1.5, 2.75], [2.0, 4.0]]
    assert calib.initialized.tolist() == [True, True, True]
    assert calib.counts.tolist() == [3, 3, 2]
    assert out.prototypes.tolist() == calib.prototypes.tolist()


@pytest.mark.parametrize("metric", ["cosine", "sqeuclidean"])
def test_ema_matches_reference_over_several_batches(metric, device):
    k, d, m = 4, 6, 0.9
    calib = PrototypeCalibrator(k, d, metric=metric, momentum=m).to(device).double()
    state = (torch.zeros(k, d, dtype=torch.float64), [False] * k, [0] * k)
    batches = [
        (torch.randn(10, d), torch.tensor([0, 1, 0, 1, 0, 1, 0, 1, 0, 1])),  # lacks 2, 3
        (torch.randn(5, d), torch.tensor([3, 3, 3, 3, 3])),  # one-class batch
        (torch.randn(8, d), torch.tensor([0, 2, 2, 0, 1, 3, 2, 0])),
        (torch.randn(4, d), torch.tensor([1, 1, 2, 2])),  # lacks 0, 3
    ]
    for i, (h, y) in enumerate(batches):
        mask = torch.ones(len(y), dtype=torch.bool)
        if i == 2:
            mask[[1, 4]] = False
        calib(h.double().to(device), y.to(device), mask.to(device))
        state = ref_ema(state, h, y, mask, m, metric)
        torch.testing.assert_close(calib.prototypes.cpu(), state[0], atol=1e-12, rtol=1e-12)
        assert calib.initialized.tolist() == list(state[1])
        assert calib.counts.tolist() == list(state[2])
    if metric == "cosine":
        torch.testing.assert_close(
            calib.prototypes.norm(dim=1).cpu(), torch.ones(k, dtype=torch.float64)
        )


def test_float_labels_are_binned():
    calib = PrototypeCalibrator(7, 3, label_bins=7)
    y = torch.tensor([-3.4, -2.5, 0.49, 2.6])
    out = calib(torch.randn(4, 3), y)
    assert out.class_counts.tolist() == [1, 1, 0, 1, 0, 0, 1]
    assert calib.initialized.tolist() == [True, True, False, True, False, False, True]
    # NaN scores of masked-out samples are ignored
    y_nan = torch.tensor([float("nan"), 3.0])
    calib(torch.randn(2, 3), y_nan, torch.tensor([False, True]))
    assert calib.counts.tolist() == [1, 1, 0, 1, 0, 0, 2]
    # integer labels still work with binning enabled
    calib(torch.randn(2, 3), torch.tensor([4, 4]))
    assert calib.counts.tolist() == [1, 1, 0, 1, 2, 0, 2]


# ---------------------------------------------------------------------- uninitialised classes


def test_uninitialised_classes_never_appear():
    calib = PrototypeCalibrator(5, 4)
    h = torch.randn(6, 4)
    # nothing initialised yet
    assert torch.isneginf(calib.similarity(h)).all()
    assert calib.confidence(h).tolist() == [0.0] * 6
    out = calib(h, torch.tensor([1, 3, 1, 3, 1, 3]))
    init = torch.tensor([False, True, False, True, False])
    assert calib.initialized.tolist() == init.tolist()
    assert torch.isneginf(out.logits[:, ~init]).all()
    assert torch.isfinite(out.logits[:, init]).all()
    assert torch.isneginf(calib.similarity(torch.randn(9, 4))[:, ~init]).all()
    pred = out.logits.argmax(1)
    assert init[pred].all()
    assert torch.softmax(out.logits, 1)[:, ~init].abs().sum() == 0
    # confidence with labels of an uninitialised class is 0; label-free is a max prob over 2
    conf_true = calib.confidence(h, torch.tensor([0, 1, 2, 3, 4, 1]))
    assert conf_true[[0, 2, 4]].tolist() == [0.0, 0.0, 0.0]
    conf = calib.confidence(h)
    assert ((conf >= 0.5 - 1e-6) & (conf <= 1.0)).all()


def test_confidence_matches_softmax_of_logits():
    calib = PrototypeCalibrator(3, 4, temperature=0.3)
    calib(torch.randn(9, 4), torch.arange(9) % 3)
    calib.eval()
    h = torch.randn(5, 4, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0, 1])
    probs = torch.softmax(calib(h, y).logits, 1)
    torch.testing.assert_close(calib.confidence(h), probs.max(1).values)
    torch.testing.assert_close(calib.confidence(h, y), probs.gather(1, y[:, None]).squeeze(1))
    calib.confidence(h).sum().backward()
    assert h.grad.abs().sum() > 0


def test_loss_zero_and_connected_when_nothing_qualifies():
    calib = PrototypeCalibrator(3, 4).eval()  # eval: nothing ever gets initialised
    h = torch.randn(5, 4, requires_grad=True)
    out = calib(h, torch.tensor([0, 1, 2, 0, 1]))
    assert out.loss.item() == 0.0 and out.loss.requires_grad
    out.loss.backward()
    assert h.grad is not None and h.grad.abs().sum() == 0
    # training with every sample masked out: same
    calib.train()
    h.grad = None
    out = calib(h, torch.tensor([0, 1, 2, 0, 1]), torch.zeros(5, dtype=torch.bool))
    assert out.loss.item() == 0.0 and out.loss.requires_grad
    assert not calib.initialized.any() and calib.counts.sum() == 0


@settings(max_examples=25, deadline=None)
@given(
    k=st.integers(1, 5),
    n=st.integers(1, 10),
    metric=st.sampled_from(["cosine", "sqeuclidean"]),
    seed=st.integers(0, 2**16),
)
def test_loss_zero_when_features_equal_prototypes(k, n, metric, seed):
    g = torch.Generator().manual_seed(seed)
    calib = PrototypeCalibrator(k, 4, metric=metric, ce_weight=0.0).double()
    calib(torch.randn(3 * k, 4, generator=g, dtype=torch.float64), torch.arange(3 * k) % k)
    y = torch.randint(0, k, (n,), generator=g)
    h = calib.prototypes[y].clone().requires_grad_(True)
    out = calib(h, y)  # training mode: the EMA step keeps them where they are
    assert abs(out.loss.item()) < 1e-12
    torch.testing.assert_close(calib.prototypes[y], h.detach())
    # a feature away from its prototype gives a positive pull loss
    assert calib(h + 0.5 * torch.randn(h.shape, generator=g, dtype=h.dtype), y).loss.item() > 0


def test_cross_entropy_term_not_zero_at_prototypes():
    """Documented: only the pull term vanishes on the prototypes; the CE term separates classes."""
    calib = PrototypeCalibrator(3, 4, ce_weight=1.0)
    calib(torch.randn(12, 4), torch.arange(12) % 3)
    y = torch.tensor([2, 0, 1])
    assert calib(calib.prototypes[y].clone(), y).loss.item() > 0


def test_logits_are_differentiable():
    calib = PrototypeCalibrator(3, 4, metric="sqeuclidean")
    h = torch.randn(6, 4, requires_grad=True)
    out = calib(h, torch.arange(6) % 3)
    out.logits.sum().backward()
    assert h.grad.abs().sum() > 0


# ---------------------------------------------------------------------------- state / dtype / mode


def test_state_dict_round_trip_exact():
    calib = PrototypeCalibrator(4, 3, metric="sqeuclidean", momentum=0.8)
    for _ in range(3):
        calib(torch.randn(6, 3), torch.randint(0, 3, (6,)))  # class 3 never seen
    sd = calib.state_dict()
    assert set(sd) == {"prototypes", "initialized", "counts"}
    fresh = PrototypeCalibrator(4, 3, metric="sqeuclidean", momentum=0.8)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.prototypes, calib.prototypes)
    assert torch.equal(fresh.initialized, calib.initialized)
    assert torch.equal(fresh.counts, calib.counts)
    assert fresh.initialized.dtype == torch.bool and fresh.counts.dtype == torch.long
    h, y = torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1])
    a, b = calib(h, y), fresh(h, y)
    assert torch.equal(a.loss, b.loss) and torch.equal(a.logits, b.logits)
    assert torch.equal(calib.prototypes, fresh.prototypes)


def test_to_dtype_and_device_follow(device):
    calib = PrototypeCalibrator(3, 4)
    calib(torch.randn(6, 4), torch.arange(6) % 3)
    before = calib.prototypes.clone()
    calib = calib.to(device=device, dtype=torch.float64)
    assert calib.prototypes.dtype == torch.float64 and calib.prototypes.device.type == device.type
    assert calib.initialized.dtype == torch.bool and calib.counts.dtype == torch.long
    torch.testing.assert_close(calib.prototypes.cpu(), before.double())
    h = torch.randn(6, 4, dtype=torch.float64, device=device, requires_grad=True)
    out = calib(h, torch.arange(6, device=device) % 3)
    assert out.loss.dtype == torch.float64 and out.logits.dtype == torch.float64
    assert out.prototypes.dtype == torch.float64 and out.class_means.dtype == torch.float64
    out.loss.backward()
    # float32 features into a float64 calibrator: EMA in float64, outputs in float32
    out32 = calib(h.detach().float(), torch.arange(6, device=device) % 3)
    assert out32.logits.dtype == torch.float32 and calib.prototypes.dtype == torch.float64


def test_eval_mode_does_not_update():
    calib = PrototypeCalibrator(3, 4)
    calib(torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 0, 1]))
    snap = copy.deepcopy(calib.state_dict())
    calib.eval()
    out = calib(torch.randn(6, 4), torch.tensor([2, 2, 2, 0, 1, 0]))
    for name, value in calib.state_dict().items():
        assert torch.equal(value, snap[name]), name
    assert out.loss.item() > 0  # still a loss on the initialised classes
    assert torch.isneginf(out.logits[:, 2]).all()


def test_mask_respected():
    h = torch.randn(8, 4)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    mask = torch.tensor([True, False, True, True, False, True, False, True])
    a = PrototypeCalibrator(3, 4, momentum=0.6)
    b = PrototypeCalibrator(3, 4, momentum=0.6)
    a(torch.randn(6, 4), torch.arange(6) % 3)
    b.load_state_dict(a.state_dict())
    h_bad = h.clone()
    h_bad[~mask] = float("nan")
    y_bad = y.clone()
    y_bad[~mask] = -100  # ignore_index-style padding labels are fine when masked out
    out_a = a(h_bad, y_bad, mask)
    out_b = b(h[mask], y[mask])
    torch.testing.assert_close(a.prototypes, b.prototypes)
    assert torch.equal(a.counts, b.counts)
    torch.testing.assert_close(out_a.loss, out_b.loss)
    torch.testing.assert_close(out_a.logits[mask], out_b.logits)
    torch.testing.assert_close(out_a.class_counts, out_b.class_counts)
    assert not torch.isnan(out_a.logits).any()
    # masked-out rows get exactly zero gradient, and no NaN anywhere
    h_req = h_bad.clone().requires_grad_(True)
    a(h_req, y_bad, mask).loss.backward()
    assert torch.isfinite(h_req.grad).all()
    assert h_req.grad[~mask].abs().sum() == 0


def test_distributed_reduction_is_the_only_difference(monkeypatch):
    """Simulate 2 ranks: rank 0's result equals a single process on the concatenated batch."""
    h0, y0 = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 0, 1, 1, 0, 1])
    h1, y1 = torch.randn(5, 4, dtype=torch.float64), torch.tensor([2, 2, 1, 2, 1])
    init = PrototypeCalibrator(3, 4, momentum=0.7).double()
    init(torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 0, 1, 0, 1]))

    recorded: list[torch.Tensor] = []

    def record(t):
        recorded.append(t.clone())
        return t

    rank1 = copy.deepcopy(init)
    monkeypatch.setattr(prototypes_module, "all_reduce_sum", record)
    rank1(h1, y1)
    assert len(recorded) == 2  # class sums and class counts

    calls = iter(recorded)

    def add_other_rank(t):
        t.add_(next(calls))
        return t

    rank0 = copy.deepcopy(init)
    monkeypatch.setattr(prototypes_module, "all_reduce_sum", add_other_rank)
    out0 = rank0(h0, y0)
    monkeypatch.undo()

    single = copy.deepcopy(init)
    single(torch.cat([h0, h1]), torch.cat([y0, y1]))
    torch.testing.assert_close(rank0.prototypes, single.prototypes)
    assert torch.equal(rank0.counts, single.counts)
    assert torch.equal(rank0.initialized, single.initialized)
    assert out0.class_counts.tolist() == [3.0, 3.0, 0.0]  # local, not reduced


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 12),
    metric=st.sampled_from(["cosine", "sqeuclidean"]),
    seed=st.integers(0, 2**16),
)
def test_permutation_equivariance(n, metric, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    mask = torch.rand(n, generator=g) > 0.2
    perm = torch.randperm(n, generator=g)
    a = PrototypeCalibrator(3, 5, metric=metric, momentum=0.5).double()
    a(torch.randn(6, 5, generator=g, dtype=torch.float64), torch.tensor([0, 1, 0, 1, 0, 1]))
    b = copy.deepcopy(a)
    out_a = a(h, y, mask)
    out_b = b(h[perm], y[perm], mask[perm])
    torch.testing.assert_close(out_b.logits, out_a.logits[perm])
    torch.testing.assert_close(out_b.loss, out_a.loss)
    torch.testing.assert_close(out_b.class_means, out_a.class_means)
    torch.testing.assert_close(b.prototypes, a.prototypes)
    assert torch.equal(b.counts, a.counts)
    torch.testing.assert_close(b.confidence(h[perm]), a.confidence(h)[perm])


# ---------------------------------------------------------------------------------- bad inputs


def test_bad_constructor_arguments():
    with pytest.raises(ModbalanceError, match=r"`momentum` must be <= 1\.0, got 1\.5"):
        PrototypeCalibrator(3, 4, momentum=1.5)
    with pytest.raises(ModbalanceError, match="`metric` must be one of 'cosine', 'sqeuclidean'"):
        PrototypeCalibrator(3, 4, metric="l1")
    with pytest.raises(ModbalanceError, match="`temperature` must be > 0"):
        PrototypeCalibrator(3, 4, temperature=0.0)
    with pytest.raises(ModbalanceError, match="`num_classes` must be >= 1, got 0"):
        PrototypeCalibrator(0, 4)
    with pytest.raises(ModbalanceError, match="`ce_weight` must be >= 0"):
        PrototypeCalibrator(3, 4, ce_weight=-1.0)
    with pytest.raises(ModbalanceError, match=r"`label_bins` \(7\) must equal `num_classes` \(3\)"):
        PrototypeCalibrator(3, 4, label_bins=7)
    with pytest.raises(ModbalanceError, match="`label_bins` must be one of 7, 5, 3, 2; got 4"):
        PrototypeCalibrator(4, 4, label_bins=4)


def test_bad_forward_inputs():
    calib = PrototypeCalibrator(3, 4)
    h = torch.randn(5, 4)
    y = torch.tensor([0, 1, 2, 0, 1])
    with pytest.raises(ModbalanceError, match=r"class indices in \[0, 3\).*e\.g\. 3"):
        calib(h, torch.tensor([0, 1, 3, 0, 1]))
    with pytest.raises(ModbalanceError, match=r"class indices in \[0, 3\).*e\.g\. -1"):
        calib(h, torch.tensor([0, 1, -1, 0, 1]))
    with pytest.raises(ModbalanceError, match=r"floating point.*label_bins=7\|5\|3\|2"):
        calib(h, y.float())
    with pytest.raises(ModbalanceError, match=r"`features` must have shape \(N, 4\).*\(5, 6\)"):
        calib(torch.randn(5, 6), y)
    with pytest.raises(ModbalanceError, match="`features` must have 2 dimensions"):
        calib(torch.randn(5), y)
    with pytest.raises(ModbalanceError, match="`features` must contain only finite values"):
        calib(torch.tensor([[float("nan"), 0, 0, 0]]).expand(5, 4), y)
    with pytest.raises(ModbalanceError, match="`features` must not be empty"):
        calib(torch.randn(0, 4), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ModbalanceError, match=r"`labels` must have shape \(5,\).*\(4,\)"):
        calib(h, y[:4])
    with pytest.raises(TypeError, match="`mask` must have a bool dtype"):
        calib(h, y, torch.ones(5))
    with pytest.raises(ModbalanceError, match=r"`mask` must have shape \(5,\)"):
        calib(h, y, torch.ones(3, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"`labels` must be a torch\.Tensor"):
        calib(h, [0, 1, 2, 0, 1])
    with pytest.raises(TypeError, match="`features` must have a floating dtype"):
        calib(torch.ones(5, 4, dtype=torch.long), y)
    with pytest.raises(ModbalanceError, match=r"`features` must have shape \(N, 4\)"):
        calib.similarity(torch.randn(2, 3))
    with pytest.raises(ModbalanceError, match=r"class indices in \[0, 3\)"):
        calib.confidence(h, torch.tensor([0, 1, 5, 0, 1]))
    assert not calib.initialized.any()  # failed calls changed nothing


def test_value_checks_can_be_disabled():
    calib = PrototypeCalibrator(3, 4)
    h = torch.randn(5, 4)
    h[0, 0] = float("nan")
    with value_checks(False):
        out = calib(h, torch.tensor([0, 1, 2, 0, 1]))
    assert out.logits.shape == (5, 3)
