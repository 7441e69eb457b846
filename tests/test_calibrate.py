"""``calibrate``: every modality's calibration in one batched pass, equal to one call each.

The reference is the obvious one, ``{m: cal[m](features[m], labels, present[m])}``, on
deep copies of the same calibrators. The batched pass runs the same operations with a
leading modality dimension (batched matrix products, reductions along another layout), so
floats match to rounding and the integer state (flags, counts, class sizes) exactly.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modbalance import ModbalanceError
from modbalance import prototypes as prototypes_module
from modbalance.prototypes import CalibrationOutput, PrototypeCalibrator, calibrate

NAMES = ("text", "audio", "vision")
FIELDS = ("loss", "logits", "prototypes", "class_means", "class_counts")
CLOSE = {"atol": 1e-6, "rtol": 1e-5}


def _pair(n_mod=3, **kwargs):
    cals = {m: PrototypeCalibrator(5, 6, **kwargs) for m in NAMES[:n_mod]}
    return cals, copy.deepcopy(cals)


def _batch(seed, n=10, n_mod=3, float_labels=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    feats = {m: torch.randn(n, 6, generator=g, dtype=dtype) for m in NAMES[:n_mod]}
    present = {m: torch.rand(n, generator=g) > 0.25 for m in NAMES[:n_mod]}
    labels = (
        torch.randn(n, generator=g) * 1.5
        if float_labels
        else torch.randint(0, 5, (n,), generator=g)
    )
    return feats, present, labels


def _leaves(feats):
    return {m: f.clone().requires_grad_(True) for m, f in feats.items()}


def _run_both(cals, ref, feats, present, labels):
    a, b = _leaves(feats), _leaves(feats)
    out = calibrate(cals, a, labels, present)
    expected = {m: ref[m](b[m], labels, present[m]) for m in ref}
    for m in ref:
        for field in FIELDS:
            got, want = getattr(out[m], field), getattr(expected[m], field)
            torch.testing.assert_close(got, want, **CLOSE, equal_nan=False, msg=f"{m} {field}")
        assert torch.equal(out[m].class_counts, expected[m].class_counts)

    def objective(outputs, feats_, use_output_conf):
        total = 0.0
        for m, o in outputs.items():
            rows = torch.where(present[m].unsqueeze(1), feats_[m], 0.0)  # absent rows: any value
            conf = o.confidence() if use_output_conf else ref[m].confidence(rows)
            total = total + o.loss + 0.01 * o.logits.clamp_min(-30).sum() + o.class_means.sum()
            total = total + torch.where(present[m], conf, 0.0).sum()
        return total

    objective(out, a, True).backward()
    objective(expected, b, False).backward()
    for m in ref:
        torch.testing.assert_close(a[m].grad, b[m].grad, atol=1e-6, rtol=1e-5)
    return out


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("float_labels", [True, False])
def test_batched_equals_one_calibrator_at_a_time(adaptive, float_labels):
    cals, ref = _pair(label_bins=5 if float_labels else None, adaptive=adaptive)
    for step in range(4):
        feats, present, labels = _batch(step, float_labels=float_labels)
        _run_both(cals, ref, feats, present, labels)
    for m in NAMES:
        for key, value in cals[m].state_dict().items():
            want = ref[m].state_dict()[key]
            if value.is_floating_point():
                torch.testing.assert_close(value, want, **CLOSE)
            else:
                assert torch.equal(value, want), (m, key)
    assert all(bool(cals[m].initialized.any()) for m in NAMES)


def test_eval_mode_and_float64_match_and_update_nothing():
    cals, ref = _pair(label_bins=5)
    _run_both(cals, ref, *_batch(0))
    for c in (*cals.values(), *ref.values()):
        c.eval()
    before = copy.deepcopy({m: c.state_dict() for m, c in cals.items()})
    _run_both(cals, ref, *_batch(1))
    for m in NAMES:
        for key, value in cals[m].state_dict().items():
            assert torch.equal(value, before[m][key])
    cals64, ref64 = _pair(label_bins=5)
    for c in (*cals64.values(), *ref64.values()):
        c.double()
    _run_both(cals64, ref64, *_batch(2, dtype=torch.float64)[:1], *_batch(2)[1:])


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(1, 12),
    n_mod=st.integers(2, 3),
    absent=st.sampled_from(["none", "one modality", "random"]),
)
def test_batched_equals_reference_for_any_masks(seed, n, n_mod, absent):
    cals, ref = _pair(n_mod, label_bins=5, adaptive=True)
    for step in range(2):
        feats, present, labels = _batch(seed + step, n=n, n_mod=n_mod)
        if absent == "none":
            present = {m: torch.ones(n, dtype=torch.bool) for m in feats}
        elif absent == "one modality":
            present = {m: torch.full((n,), i != 0) for i, m in enumerate(feats)}
        # an absent row may hold anything, NaN included
        first = next(iter(feats))
        feats[first] = torch.where(present[first].unsqueeze(1), feats[first], float("nan"))
        _run_both(cals, ref, feats, present, labels)


def test_every_modality_gets_gradient_from_the_loss():
    cals, _ = _pair(label_bins=5)
    feats, present, labels = _batch(3)
    calibrate(cals, feats, labels, present)  # initialise the prototypes
    leaves = _leaves(feats)
    out = calibrate(cals, leaves, labels, present)
    sum(o.loss for o in out.values()).backward()
    for m in NAMES:
        assert leaves[m].grad[present[m]].abs().sum() > 0
        assert leaves[m].grad[~present[m]].abs().sum() == 0


def test_confidence_of_the_output_matches_the_calibrator():
    cals, _ = _pair(label_bins=5)
    feats, present, labels = _batch(4)
    assert calibrate(cals, feats, labels, present)["text"].confidence().shape == (10,)
    fresh = PrototypeCalibrator(5, 6, label_bins=5).eval()  # nothing initialised: confidence 0
    out = calibrate(
        {"a": fresh, "b": copy.deepcopy(fresh)}, {"a": feats["text"], "b": feats["audio"]}, labels
    )
    assert out["a"].confidence().tolist() == [0.0] * 10
    out = calibrate(cals, feats, labels, present)
    for m in NAMES:
        expected = cals[m].confidence(feats[m])
        got = out[m].confidence()
        torch.testing.assert_close(got[present[m]], expected[present[m]])
        assert ((got >= 0) & (got <= 1)).all()


def test_other_settings_fall_back_to_one_call_each(monkeypatch):
    calls = []
    monkeypatch.setattr(
        prototypes_module, "_calibrate_batched", lambda *a: calls.append(a) or pytest.fail()
    )
    feats, present, labels = _batch(5)
    mixed = {
        m: PrototypeCalibrator(5, 6, label_bins=5, temperature=t)
        for m, t in zip(NAMES, (0.1, 0.2, 0.1))
    }
    ref = copy.deepcopy(mixed)
    _run_both(mixed, ref, feats, present, labels)
    sq, sq_ref = _pair(label_bins=5, metric="sqeuclidean")
    _run_both(sq, sq_ref, feats, present, labels)
    single, single_ref = _pair(1, label_bins=5)
    _run_both(single, single_ref, {"text": feats["text"]}, present, labels)
    hooked, hooked_ref = _pair(label_bins=5)
    seen = []
    hooked["audio"].register_forward_hook(lambda *args: seen.append(1))
    _run_both(hooked, hooked_ref, feats, present, labels)
    assert seen == [1]  # the hook saw its module called
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = calibrate(_pair(label_bins=5)[0], feats, labels, present)
    assert set(out) == set(NAMES)
    assert not calls


def test_simulated_two_ranks_reduce_once_for_all_modalities(monkeypatch):
    """Rank 0's prototypes equal one process on both shards; sums and counts reduced once."""
    cals, _ = _pair(label_bins=5)
    feats0, present0, labels0 = _batch(6, n=7)
    feats1, present1, labels1 = _batch(7, n=5)
    init = copy.deepcopy(cals)
    recorded = []
    monkeypatch.setattr(
        prototypes_module, "all_reduce_sum", lambda t: recorded.append(t.clone()) or t
    )
    rank1 = copy.deepcopy(init)
    calibrate(rank1, feats1, labels1, present1)
    assert [tuple(t.shape) for t in recorded] == [(3, 5, 6), (3, 5)]
    other = iter(recorded)
    monkeypatch.setattr(prototypes_module, "all_reduce_sum", lambda t: t.add_(next(other)))
    rank0 = copy.deepcopy(init)
    calibrate(rank0, feats0, labels0, present0)
    monkeypatch.undo()
    single = copy.deepcopy(init)
    both = {m: torch.cat([feats0[m], feats1[m]]) for m in NAMES}
    mask = {m: torch.cat([present0[m], present1[m]]) for m in NAMES}
    calibrate(single, both, torch.cat([labels0, labels1]), mask)
    for m in NAMES:
        torch.testing.assert_close(rank0[m].prototypes, single[m].prototypes)
        assert torch.equal(rank0[m].counts, single[m].counts)


def test_errors_name_the_problem():
    cals, _ = _pair(label_bins=5)
    feats, present, labels = _batch(8)
    with pytest.raises(ModbalanceError, match=r"`features` has no entry .*\['vision'\]"):
        calibrate(cals, {m: feats[m] for m in ("text", "audio")}, labels, present)
    with pytest.raises(ModbalanceError, match=r"`present` has no entry .*\['audio'\]"):
        calibrate(cals, feats, labels, {"text": present["text"], "vision": present["vision"]})
    with pytest.raises(TypeError, match="`features` must be a mapping"):
        calibrate(cals, list(feats.values()), labels)
    bad = dict(feats)
    bad["audio"] = feats["audio"].clone()
    bad["audio"][int(present["audio"].nonzero()[0])] = float("nan")
    with pytest.raises(ModbalanceError, match="features"):
        calibrate(cals, bad, labels, present)
    int_cals = {m: PrototypeCalibrator(5, 6) for m in NAMES}
    with pytest.raises(ModbalanceError, match=r"class indices in \[0, 5\)"):
        calibrate(int_cals, feats, torch.full((10,), 7))
    with pytest.raises(ModbalanceError, match="shape"):
        calibrate(cals, {**feats, "vision": torch.randn(10, 4)}, labels)
    assert not any(bool(c.initialized.any()) for c in int_cals.values())


def test_outputs_are_calibration_outputs_in_the_calibrators_order():
    cals, _ = _pair(label_bins=5)
    feats, present, labels = _batch(9)
    reordered = {m: feats[m] for m in reversed(NAMES)}
    out = calibrate(cals, reordered, labels, present)
    assert list(out) == list(NAMES)
    assert all(isinstance(o, CalibrationOutput) for o in out.values())


def test_the_example_gate_reads_its_confidence_from_the_calibration(monkeypatch):
    """Phase 2 of the paper's model: no second confidence pass, the same fused prediction."""
    from benchmarks.speed import make_batch
    from examples.pase import PAPER_SWITCHES, PaSEConfig, PaSEModel

    dims = {"text": 7, "audio": 5}
    config = PaSEConfig(tuple(dims), dims, dim=8, dropout=0.0, **PAPER_SWITCHES)
    model = PaSEModel(config).train()
    batch = make_batch(12, 6, dims, "regression", 7, "cpu", seed=1)
    batch["mask"]["audio"][:3] = False  # three samples without audio
    for _ in range(2):
        model(batch, 1)  # phase 1 initialises the prototypes
    calls = []
    original = PrototypeCalibrator.confidence
    monkeypatch.setattr(
        PrototypeCalibrator, "confidence", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    out, losses = model(batch, 2)
    assert not calls
    recomputed = model.fuse(out.features, out.present)  # the confidence computed again
    assert len(calls) == len(dims)
    torch.testing.assert_close(out.fused, recomputed)
    losses["task"].backward()
    assert all(p.grad is not None for p in model.fusion.parameters())
