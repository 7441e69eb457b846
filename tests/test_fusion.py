"""Tests for modbalance.fusion.PrototypeGatedFusion."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modbalance._checks import ModbalanceError
from modbalance.fusion import FusionOutput, PrototypeGatedFusion
from modbalance.prototypes import PrototypeCalibrator

NAMES = ["text", "audio", "vision", "depth", "thermal"]


def make_inputs(mods, n, d, device=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = {m: torch.randn(n, d, generator=g, dtype=dtype).to(device) for m in mods}
    conf = {m: torch.rand(n, generator=g, dtype=dtype).to(device) for m in mods}
    return feats, conf


@torch.no_grad()
def reference(fusion, feats, conf, present=None):
    """Per-sample, per-modality loop written straight from the formula in the docstring."""
    mods = fusion.modalities
    n = next(iter(feats.values())).shape[0]
    fused, gates = [], []
    for i in range(n):
        scores, on = [], []
        for j, m in enumerate(mods):
            c = float(conf[m][i])
            s = float(fusion.scale[j]) * c + float(fusion.bias[j])
            if fusion.hidden:
                for u in range(fusion.hidden):
                    a = math.tanh(
                        float(fusion.mlp_in_weight[j, u]) * c + float(fusion.mlp_in_bias[j, u])
                    )
                    s += float(fusion.mlp_out_weight[j, u]) * a
            scores.append(s / fusion.temperature)
            on.append(True if present is None else bool(present[m][i]))
        z = sum(math.exp(s) for s, o in zip(scores, on) if o)
        g = [math.exp(s) / z if o else 0.0 for s, o in zip(scores, on)]
        parts = [
            g[j] * feats[m][i].double() if on[j] else 0 * feats[m][i].double().nan_to_num()
            for j, m in enumerate(mods)
        ]
        fused.append(sum(parts) if fusion.mode == "sum" else torch.cat(parts))
        gates.append(g)
    return torch.stack(fused).cpu(), torch.tensor(gates, dtype=torch.float64)


@pytest.mark.parametrize("m", [2, 3, 5])
@pytest.mark.parametrize("mode", ["sum", "concat"])
@pytest.mark.parametrize("hidden", [0, 4])
def test_matches_reference(m, mode, hidden, device):
    mods = NAMES[:m]
    fusion = PrototypeGatedFusion(mods, 3, mode=mode, hidden=hidden, temperature=0.7)
    fusion = fusion.to(device).double()
    feats, conf = make_inputs(mods, 6, 3, device, torch.float64)
    g = torch.Generator().manual_seed(1)
    present = {k: (torch.rand(6, generator=g) > 0.4).to(device) for k in mods}
    present[mods[0]][0] = True
    for k in mods[1:]:
        present[k][0] = False  # sample 0: one modality only
    for k in mods:
        present[k][1] = False  # sample 1: nothing present
    out = fusion(feats, conf, present)
    assert isinstance(out, FusionOutput)
    assert fusion.out_dim == (3 if mode == "sum" else 3 * m)
    assert out.fused.shape == (6, fusion.out_dim) and out.gates.shape == (6, m)
    want_fused, want_gates = reference(fusion, feats, conf, present)
    torch.testing.assert_close(out.gates.cpu(), want_gates)
    torch.testing.assert_close(out.fused.cpu(), want_fused)
    assert out.gates[0].tolist() == [1.0] + [0.0] * (m - 1)
    assert out.gates[1].abs().sum() == 0 and out.fused[1].abs().sum() == 0
    any_on = torch.stack([present[k] for k in mods], 1).any(1)
    torch.testing.assert_close(
        out.gates.sum(1)[any_on], torch.ones(int(any_on.sum()), dtype=torch.float64, device=device)
    )


@pytest.mark.parametrize("mode", ["sum", "concat"])
def test_gate_is_not_a_no_op_and_learns(mode):
    mods = NAMES[:3]
    fusion = PrototypeGatedFusion(mods, 4, mode=mode)
    feats, conf = make_inputs(mods, 5, 4)
    out = fusion(feats, conf)
    # different confidences -> different gates per modality, not a constant that cancels
    assert not torch.allclose(out.gates[:, 0], out.gates[:, 1])
    conf2 = dict(conf)
    conf2["audio"] = conf["audio"] + 0.5
    out2 = fusion(feats, conf2)
    assert (out2.fused - out.fused).abs().max() > 1e-3
    assert (out2.gates[:, 1] > out.gates[:, 1]).all()  # untrained gate favours confidence
    # every gate parameter receives a non-zero gradient
    weights = torch.randn(fusion.out_dim)
    (out.fused @ weights).sum().backward()
    for name, p in fusion.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_gates_differ_when_only_parameters_differ():
    """Equal confidences still give per-modality gates once the parameters differ."""
    fusion = PrototypeGatedFusion(["a", "b"], 2, hidden=0)
    with torch.no_grad():
        fusion.bias.copy_(torch.tensor([0.0, 1.0]))
    feats, _ = make_inputs(["a", "b"], 3, 2)
    conf = {"a": torch.full((3,), 0.5), "b": torch.full((3,), 0.5)}
    gates = fusion(feats, conf).gates
    torch.testing.assert_close(gates[:, 1], torch.full((3,), 1 / (1 + math.exp(-1.0))))


@pytest.mark.parametrize("m", [2, 3, 5])
@pytest.mark.parametrize("mode", ["sum", "concat"])
def test_absent_modality_has_zero_influence(m, mode, device):
    mods = NAMES[:m]
    fusion = PrototypeGatedFusion(mods, 4, mode=mode).to(device)
    feats, conf = make_inputs(mods, 6, 4, device)
    present = {k: torch.ones(6, dtype=torch.bool, device=device) for k in mods}
    absent = mods[-1]
    present[absent][[0, 2, 5]] = False
    base = fusion(feats, conf, present)
    for bad in (1e6, float("nan"), float("inf")):
        f2, c2 = dict(feats), dict(conf)
        f2[absent] = feats[absent].clone()
        c2[absent] = conf[absent].clone()
        f2[absent][[0, 2, 5]] = bad
        c2[absent][[0, 2, 5]] = bad
        out = fusion(f2, c2, present)
        assert torch.equal(out.fused, base.fused)
        assert torch.equal(out.gates, base.gates)
    # zero gradient to absent entries, finite everywhere
    f3 = {k: v.clone().requires_grad_(True) for k, v in feats.items()}
    f3[absent].data[[0, 2, 5]] = float("nan")
    fusion(f3, conf, present).fused.sum().backward()
    assert f3[absent].grad[[0, 2, 5]].abs().sum() == 0
    assert f3[absent].grad[[1, 3, 4]].abs().sum() > 0
    for p in fusion.parameters():
        assert torch.isfinite(p.grad).all()
    # the present modalities are fused as if the absent one did not exist
    if m > 2:
        sub = PrototypeGatedFusion(mods[:-1], 4, mode="sum").to(device)
        with torch.no_grad():
            for name, p in sub.named_parameters():
                p.copy_(getattr(fusion, name)[:-1])
        if mode == "sum":
            want = sub({k: feats[k] for k in mods[:-1]}, {k: conf[k] for k in mods[:-1]})
            torch.testing.assert_close(base.fused[[0, 2, 5]], want.fused[[0, 2, 5]])


def test_no_modality_present_gives_zeros_without_nan():
    mods = NAMES[:3]
    fusion = PrototypeGatedFusion(mods, 4, mode="concat")
    feats, conf = make_inputs(mods, 3, 4)
    feats = {k: v.clone().requires_grad_(True) for k, v in feats.items()}
    present = {k: torch.zeros(3, dtype=torch.bool) for k in mods}
    out = fusion(feats, conf, present)
    assert out.fused.abs().sum() == 0 and out.gates.abs().sum() == 0
    out.fused.sum().backward()
    for k in mods:
        assert feats[k].grad.abs().sum() == 0
    for p in fusion.parameters():
        assert torch.isfinite(p.grad).all()


def test_present_none_equals_all_present():
    mods = NAMES[:3]
    fusion = PrototypeGatedFusion(mods, 4)
    feats, conf = make_inputs(mods, 4, 4)
    a = fusion(feats, conf)
    b = fusion(feats, conf, {k: torch.ones(4, dtype=torch.bool) for k in mods})
    assert torch.equal(a.fused, b.fused) and torch.equal(a.gates, b.gates)


def test_mapping_order_does_not_matter():
    mods = NAMES[:3]
    fusion = PrototypeGatedFusion(mods, 4, mode="concat")
    feats, conf = make_inputs(mods, 4, 4)
    rev_feats = {k: feats[k] for k in reversed(mods)}
    out_a, out_b = fusion(feats, conf), fusion(rev_feats, conf)
    assert torch.equal(out_a.fused, out_b.fused)
    # concat blocks follow constructor order
    torch.testing.assert_close(out_a.fused[:, :4], out_a.gates[:, :1] * feats["text"])


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 10),
    m=st.integers(2, 5),
    mode=st.sampled_from(["sum", "concat"]),
    seed=st.integers(0, 2**16),
)
def test_permutation_equivariance(n, m, mode, seed):
    mods = NAMES[:m]
    torch.manual_seed(seed)
    fusion = PrototypeGatedFusion(mods, 3, mode=mode)
    feats, conf = make_inputs(mods, n, 3, seed=seed)
    g = torch.Generator().manual_seed(seed)
    present = {k: torch.rand(n, generator=g) > 0.3 for k in mods}
    perm = torch.randperm(n, generator=g)
    out = fusion(feats, conf, present)
    out_p = fusion(
        {k: v[perm] for k, v in feats.items()},
        {k: v[perm] for k, v in conf.items()},
        {k: v[perm] for k, v in present.items()},
    )
    torch.testing.assert_close(out_p.fused, out.fused[perm])
    torch.testing.assert_close(out_p.gates, out.gates[perm])


def test_state_dict_and_dtype(device):
    fusion = PrototypeGatedFusion(NAMES[:3], 4, hidden=8)
    fresh = PrototypeGatedFusion(NAMES[:3], 4, hidden=8)
    fresh.load_state_dict(copy.deepcopy(fusion.state_dict()))
    feats, conf = make_inputs(NAMES[:3], 5, 4)
    assert torch.equal(fusion(feats, conf).fused, fresh(feats, conf).fused)
    f64 = fusion.to(device=device, dtype=torch.float64)
    feats, conf = make_inputs(NAMES[:3], 5, 4, device, torch.float64)
    out = f64(feats, conf)
    assert out.fused.dtype == torch.float64 and out.gates.dtype == torch.float64
    assert out.fused.device.type == device.type


def test_with_calibrators_end_to_end():
    """Calibrator confidences drive the gate; the fused loss trains encoders and gate."""
    mods = ["text", "audio"]
    enc = {m: torch.nn.Linear(6, 4) for m in mods}
    calib = {m: PrototypeCalibrator(3, 4) for m in mods}
    fusion = PrototypeGatedFusion(mods, 4)
    x = {m: torch.randn(9, 6) for m in mods}
    y = torch.arange(9) % 3
    h = {m: enc[m](x[m]) for m in mods}
    cal_loss = sum(calib[m](h[m], y).loss for m in mods)
    conf = {m: calib[m].confidence(h[m]) for m in mods}
    out = fusion(h, conf)
    (out.fused.pow(2).mean() + cal_loss).backward()
    for m in mods:
        assert enc[m].weight.grad.abs().sum() > 0
    assert fusion.scale.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------- bad inputs


def test_bad_constructor_arguments():
    with pytest.raises(ModbalanceError, match="at least 2 modalities to fuse, got 1"):
        PrototypeGatedFusion(["text"], 4)
    with pytest.raises(ModbalanceError, match="must not repeat a name"):
        PrototypeGatedFusion(["text", "text"], 4)
    with pytest.raises(TypeError, match="`modalities` must be a sequence of names"):
        PrototypeGatedFusion("ta", 4)
    with pytest.raises(TypeError, match="`modalities` must hold strings"):
        PrototypeGatedFusion(["text", 3], 4)
    with pytest.raises(ModbalanceError, match="`mode` must be one of 'sum', 'concat'; got 'mean'"):
        PrototypeGatedFusion(["a", "b"], 4, mode="mean")
    with pytest.raises(ModbalanceError, match="`hidden` must be >= 0"):
        PrototypeGatedFusion(["a", "b"], 4, hidden=-1)
    with pytest.raises(ModbalanceError, match="`temperature` must be > 0"):
        PrototypeGatedFusion(["a", "b"], 4, temperature=0)
    with pytest.raises(ModbalanceError, match="`dim` must be >= 1"):
        PrototypeGatedFusion(["a", "b"], 0)


def test_bad_forward_inputs():
    mods = ["text", "audio", "vision"]
    fusion = PrototypeGatedFusion(mods, 4)
    feats, conf = make_inputs(mods, 5, 4)
    ones = {k: torch.ones(5, dtype=torch.bool) for k in mods}

    missing = {k: v for k, v in feats.items() if k != "audio"}
    with pytest.raises(ModbalanceError, match="`features` is missing modality 'audio'"):
        fusion(missing, conf)
    with pytest.raises(ModbalanceError, match="`confidence` is missing modality 'vision'"):
        fusion(feats, {k: conf[k] for k in ("text", "audio")})
    with pytest.raises(ModbalanceError, match="`present` is missing modality 'text'"):
        fusion(feats, conf, {"audio": ones["audio"], "vision": ones["vision"]})
    with pytest.raises(ModbalanceError, match="`features` has unknown modality 'depth'"):
        fusion({**feats, "depth": torch.randn(5, 4)}, conf)
    with pytest.raises(TypeError, match="`present\\['text'\\]` must have a bool dtype"):
        fusion(feats, conf, {**ones, "text": torch.ones(5)})
    with pytest.raises(ModbalanceError, match=r"`features\['audio'\]` must have shape \(5, 4\)"):
        fusion({**feats, "audio": torch.randn(5, 3)}, conf)
    with pytest.raises(ModbalanceError, match=r"`features\['vision'\]` must have shape \(5, 4\)"):
        fusion({**feats, "vision": torch.randn(6, 4)}, conf)
    with pytest.raises(ModbalanceError, match=r"`confidence\['audio'\]` must have shape \(5,\)"):
        fusion(feats, {**conf, "audio": torch.rand(4)})
    with pytest.raises(ModbalanceError, match=r"`present\['audio'\]` must have shape \(5,\)"):
        fusion(feats, conf, {**ones, "audio": torch.ones(2, dtype=torch.bool)})
    with pytest.raises(ModbalanceError, match="must not be an empty batch"):
        fusion(*make_inputs(mods, 0, 4))
    nan_feats = {**feats, "audio": feats["audio"].clone()}
    nan_feats["audio"][2, 1] = float("nan")
    with pytest.raises(ModbalanceError, match=r"features \(present modalities\).*1 NaN"):
        fusion(nan_feats, conf)
    with pytest.raises(ModbalanceError, match=r"confidence \(present modalities\)"):
        fusion(feats, {**conf, "text": torch.full((5,), float("inf"))})
    with pytest.raises(ModbalanceError, match=r"`features\['audio'\]` is torch.float64"):
        fusion({**feats, "audio": feats["audio"].double()}, conf)
    with pytest.raises(ModbalanceError, match=r"`confidence` must have shape \(N, 3\)"):
        fusion.gate_scores(torch.rand(5, 2))
    with pytest.raises(TypeError, match="`features` must be a mapping"):
        fusion([feats[k] for k in mods], conf)
    with pytest.raises(TypeError, match=r"`confidence\['text'\]` must have a floating dtype"):
        fusion(feats, {**conf, "text": torch.ones(5, dtype=torch.long)})
