"""Unimodal losses, G-Blending, MMPareto and AGM: parity with the official rules, behaviour, errors.

Every parity test compares our implementation with a short transcription of the official code
(MultiBench's ``gradient_blend.py``, GeWu-Lab/MMPareto_ICML2024 ``code/MMPareto.py`` and
``min_norm_solvers.py``, lihong2303/AGM ``run/*_main.py`` and ``model/*_net.py``) on the same
inputs, and checks that a perturbed transcription would be caught.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _reference import assert_grads_close, grads, grads_differ
from torch import nn

from modbalance._checks import ModbalanceError
from modbalance.balancing import StepOutput, combine_losses, task_loss
from modbalance.methods.agm import AGM, agm_coefficients, mono_modal_responses
from modbalance.methods.gblending import GBlending, gblend_weights
from modbalance.methods.mmpareto import MMPareto, min_norm_2
from modbalance.methods.unimodal import UnimodalLoss, unimodal_task_loss

# ------------------------------------------------------------------------------------------
# a tiny late-fusion model, built by hand
# ------------------------------------------------------------------------------------------


class TinyModel(nn.Module):
    """Linear encoders, one linear unimodal head each, a concat fusion head."""

    def __init__(self, dims: dict[str, int], out_dim: int, hidden: int = 4) -> None:
        super().__init__()
        self.modalities = tuple(dims)
        self.encoders = nn.ModuleDict({m: nn.Linear(d, hidden) for m, d in dims.items()})
        self.heads = nn.ModuleDict({m: nn.Linear(hidden, out_dim) for m in dims})
        self.fusion = nn.Linear(hidden * len(dims), out_dim)

    def fuse(self, feats, present):
        return self.fusion(torch.cat([feats[m] for m in self.modalities], 1))

    def step(self, x, y, task, *, present=None, phase=2, readout=True):
        feats = {m: torch.tanh(self.encoders[m](x[m])) for m in self.modalities}
        uni = {m: self.heads[m](feats[m]) for m in self.modalities}
        fused = self.fuse(feats, present or {})
        if task == "regression":
            uni = {m: u[:, 0] for m, u in uni.items()}
            fused = fused[:, 0]
        out = StepOutput(
            features=feats,
            unimodal=uni,
            fused=fused,
            present=present or {},
            target=y,
            task=task,
            phase=phase,
            fuse=self.fuse,
        )
        losses = {"task": task_loss(fused, y, task)}
        if readout:
            det = {m: self.heads[m](feats[m].detach()) for m in self.modalities}
            if task == "regression":
                det = {m: u[:, 0] for m, u in det.items()}
            losses["readout"] = sum(task_loss(det[m], y, task) for m in self.modalities)
        return out, losses


THIRDS = ("coefficient_text", "coefficient_audio", "coefficient_fused")


def make_data(dims, n, task, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = {m: torch.randn(n, d, generator=g) for m, d in dims.items()}
    if task == "regression":
        y = torch.randn(n, generator=g)
    else:
        y = torch.randint(0, classes, (n,), generator=g)
    return x, y


DIMS2 = {"audio": 3, "visual": 5}
DIMS3 = {"text": 3, "audio": 2, "visual": 4}


# ==========================================================================================
# UnimodalLoss
# ==========================================================================================


@pytest.mark.parametrize("task", ["regression", "classification"])
def test_unimodal_replaces_readout_and_weights_terms(task):
    torch.manual_seed(0)
    model = TinyModel(DIMS2, 1 if task == "regression" else 3)
    x, y = make_data(DIMS2, 8, task)
    out, base = model.step(x, y, task)
    method = UnimodalLoss(["audio", "visual"], weights={"audio": 2.0, "visual": 0.5})
    new = method.losses(out, base)
    assert set(new) == {"task", "unimodal_audio", "unimodal_visual"}
    assert new["task"] is base["task"]
    for m, w in (("audio", 2.0), ("visual", 0.5)):
        want = w * task_loss(out.unimodal[m], y, task)
        torch.testing.assert_close(new[f"unimodal_{m}"], want)


def test_unimodal_terms_train_the_encoders():
    torch.manual_seed(0)
    model = TinyModel(DIMS2, 3)
    x, y = make_data(DIMS2, 8, "classification")
    out, base = model.step(x, y, "classification")
    new = UnimodalLoss(["audio", "visual"]).losses(out, base)
    for m in ("audio", "visual"):
        model.zero_grad()
        new[f"unimodal_{m}"].backward(retain_graph=True)
        assert model.encoders[m].weight.grad.abs().sum() > 0
        assert model.heads[m].weight.grad.abs().sum() > 0


def test_unimodal_respects_presence():
    torch.manual_seed(0)
    model = TinyModel(DIMS2, 1)
    x, y = make_data(DIMS2, 6, "regression")
    present = {
        "audio": torch.tensor([True, True, False, True, False, True]),
        "visual": torch.ones(6, dtype=torch.bool),
    }
    out, base = model.step(x, y, "regression", present=present)
    new = UnimodalLoss(["audio", "visual"]).losses(out, base)
    keep = present["audio"]
    want = (out.unimodal["audio"][keep] - y[keep]).abs().mean()
    torch.testing.assert_close(new["unimodal_audio"], want)
    # the absent samples' inputs get no gradient from the audio term
    x2 = {m: v.clone().requires_grad_(True) for m, v in x.items()}
    out2, base2 = model.step(x2, y, "regression", present=present)
    UnimodalLoss(["audio", "visual"]).losses(out2, base2)["unimodal_audio"].backward()
    assert x2["audio"].grad[~keep].abs().sum() == 0
    assert x2["audio"].grad[keep].abs().sum() > 0


def test_unimodal_task_loss_no_sample_present_is_a_zero_in_the_graph():
    pred = torch.randn(4, requires_grad=True)
    loss = unimodal_task_loss(pred, torch.zeros(4), "regression", torch.zeros(4, dtype=bool))
    assert float(loss.detach()) == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(pred.grad, torch.zeros(4))
    with pytest.raises(ModbalanceError, match="presence mask must have shape"):
        unimodal_task_loss(pred, torch.zeros(4), "regression", torch.ones(3, dtype=bool))


def test_unimodal_phase_one_unchanged_and_three_modalities():
    torch.manual_seed(0)
    model = TinyModel(DIMS3, 1)
    x, y = make_data(DIMS3, 5, "regression")
    out, base = model.step(x, y, "regression", phase=1)
    method = UnimodalLoss(list(DIMS3))
    assert method.losses(out, base) == base
    out, base = model.step(x, y, "regression")
    assert set(method.losses(out, base)) == {"task"} | {f"unimodal_{m}" for m in DIMS3}


def test_unimodal_argument_errors():
    with pytest.raises(ModbalanceError, match="missing modality 'visual'"):
        UnimodalLoss(["audio", "visual"], weights={"audio": 1.0})
    with pytest.raises(ModbalanceError, match=r"`weights\['audio'\]` must be >= 0"):
        UnimodalLoss(["audio", "visual"], weights={"audio": -1.0, "visual": 1.0})
    with pytest.raises(ModbalanceError, match="distinct strings"):
        UnimodalLoss(["audio", "audio"])
    with pytest.raises(ModbalanceError, match="at least one modality"):
        UnimodalLoss([])
    with pytest.raises(TypeError, match="sequence of modality names"):
        UnimodalLoss("audio")
    with pytest.raises(ModbalanceError, match="at least one phase"):
        UnimodalLoss(["audio"], phases=())
    model = TinyModel(DIMS2, 1)
    out, base = model.step(*make_data(DIMS2, 4, "regression"), "regression")
    with pytest.raises(ModbalanceError, match="missing 'text'"):
        UnimodalLoss(["audio", "text"]).losses(out, base)


def test_unimodal_state_dict_round_trip():
    a = UnimodalLoss(["audio", "visual"], weights={"audio": 0.3, "visual": 0.7})
    b = UnimodalLoss(["audio", "visual"])
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b.coefficients, torch.tensor([0.3, 0.7]))


# ==========================================================================================
# MMPareto
# ==========================================================================================


class OfficialMinNormSolver:
    """``MinNormSolver`` of GeWu-Lab/MMPareto_ICML2024 ``code/min_norm_solvers.py`` (2 tasks)."""

    def __init__(self, clip_hi=0.999, clip_lo=0.001):
        self.clip_hi, self.clip_lo = clip_hi, clip_lo

    def _min_norm_element_from2(self, v1v1, v1v2, v2v2):
        if v1v2 >= v1v1:
            return self.clip_hi, v1v1
        if v1v2 >= v2v2:
            return self.clip_lo, v2v2
        gamma = -1.0 * ((v1v2 - v2v2) / (v1v1 + v2v2 - 2 * v1v2))
        return gamma, v2v2 + gamma * (v1v2 - v2v2)

    def find_min_norm_element(self, vecs):
        dps = {}
        for i, j in ((0, 0), (0, 1), (1, 1)):
            dps[(i, j)] = sum(torch.mul(a, b).sum() for a, b in zip(vecs[i], vecs[j]))
        c, d = self._min_norm_element_from2(dps[(0, 0)], dps[(0, 1)], dps[(1, 1)])
        sol = np.zeros(2)
        sol[0], sol[1] = float(c), 1 - float(c)
        return sol, d


def official_mmpareto_step(model, x, y, task, *, gamma=1.5, equal=0.5, solver=None):
    """``train_epoch`` of ``code/MMPareto.py``, one step, generalised to the model's modalities.

    The record lists are the encoders' parameters (the official code selects them by the
    substrings 'audio'/'visual' and skips 'head'); heads and fusion keep the summed gradient.
    """
    solver = solver or OfficialMinNormSolver()
    mods = model.modalities
    record = {m: list(model.encoders[m].named_parameters()) for m in mods}
    model.zero_grad()
    out, _ = model.step(x, y, task, readout=False)
    loss_mm = task_loss(out.fused, y, task)
    losses = [loss_mm] + [task_loss(out.unimodal[m], y, task) for m in mods]
    all_loss = ["both", *mods]
    grads_m = {m: {} for m in mods}
    for idx, loss_type in enumerate(all_loss):
        loss = losses[idx]
        loss.backward(retain_graph=True)
        for m in mods:
            if loss_type in ("both", m):
                grads_m[m][loss_type] = {
                    name: (torch.zeros_like(p) if p.grad is None else p.grad.data.clone())
                    for name, p in record[m]
                }
                grads_m[m][loss_type]["concat"] = torch.cat(
                    [grads_m[m][loss_type][name].flatten() for name, _ in record[m]]
                )
        model.zero_grad()
    k = {}
    for m in mods:
        cos = F.cosine_similarity(grads_m[m]["both"]["concat"], grads_m[m][m]["concat"], dim=0)
        if cos > 0:
            k[m] = [equal, equal]
        else:
            vecs = [[v for n, v in grads_m[m][t].items() if n != "concat"] for t in ("both", m)]
            k[m], _ = solver.find_min_norm_element(vecs)
    loss = sum(losses)
    loss.backward()
    for m in mods:
        for name, param in record[m]:
            three_norm = torch.norm(param.grad.data.clone())
            new_grad = 2 * k[m][0] * grads_m[m]["both"][name] + 2 * k[m][1] * grads_m[m][m][name]
            new_norm = torch.norm(new_grad)
            diff = three_norm / new_norm
            if diff > 1:
                param.grad = diff * new_grad * gamma
            else:
                param.grad = new_grad * gamma
    return grads(model), k


def ours_mmpareto_step(model, x, y, task, **kwargs):
    method = MMPareto({m: model.encoders[m] for m in model.modalities}, **kwargs)
    model.zero_grad()
    out, base = model.step(x, y, task)
    assert method.backward(out, method.losses(out, base)) is True
    return grads(model), method


@pytest.mark.parity
def test_mmpareto_parity_with_official_code_both_branches():
    seen = set()
    for seed in range(16):
        torch.manual_seed(seed)
        model = TinyModel(DIMS2, 3)
        x, y = make_data(DIMS2, 12, "classification", seed=seed)
        theirs, k = official_mmpareto_step(copy.deepcopy(model), x, y, "classification")
        ours, method = ours_mmpareto_step(copy.deepcopy(model), x, y, "classification")
        assert_grads_close(ours, theirs)
        for i, m in enumerate(model.modalities):
            torch.testing.assert_close(
                method.pareto_weights[i],
                torch.tensor([float(k[m][0]), float(k[m][1])]),
                rtol=1e-5,
                atol=1e-6,
            )
            seen.add(bool(method.conflict[i]))
    assert seen == {True, False}, "the seeds must exercise both the equal and the MGDA branch"


@pytest.mark.parity
def test_mmpareto_parity_catches_perturbed_rules():
    caught = {"gamma": False, "equal": False, "solver": False}
    for seed in range(16):
        torch.manual_seed(seed)
        model = TinyModel(DIMS2, 3)
        x, y = make_data(DIMS2, 12, "classification", seed=seed)
        ours, method = ours_mmpareto_step(copy.deepcopy(model), x, y, "classification")
        variants = {
            "gamma": {"gamma": 1.5 * 1.001},
            "equal": {"equal": 0.5 * 1.01},
            "solver": {"solver": OfficialMinNormSolver(clip_hi=0.99, clip_lo=0.01)},
        }
        if bool(method.conflict.any()):  # the solver perturbation: mirror the MGDA weight
            variants["solver"] = {"solver": _MirroredSolver()}
        for name, kw in variants.items():
            theirs, _ = official_mmpareto_step(copy.deepcopy(model), x, y, "classification", **kw)
            if grads_differ(ours, theirs):
                caught[name] = True
    assert all(caught.values()), caught


class _MirroredSolver(OfficialMinNormSolver):
    def find_min_norm_element(self, vecs):
        sol, d = super().find_min_norm_element(vecs)
        return sol[::-1].copy(), d


@pytest.mark.parity
def test_mmpareto_three_modalities_regression_follow_the_per_encoder_rule():
    # documented generalisation: the per-encoder rule, each encoder with its own unimodal loss
    torch.manual_seed(3)
    model = TinyModel(DIMS3, 1)
    x, y = make_data(DIMS3, 10, "regression", seed=3)
    theirs, _ = official_mmpareto_step(copy.deepcopy(model), x, y, "regression")
    ours, _ = ours_mmpareto_step(copy.deepcopy(model), x, y, "regression")
    assert_grads_close(ours, theirs)


def test_min_norm_2_matches_the_solver_and_its_clipping():
    solver = OfficialMinNormSolver()
    rng = np.random.default_rng(0)
    for _ in range(50):
        a, b = rng.normal(size=5), rng.normal(size=5)
        v11, v12, v22 = a @ a, a @ b, b @ b
        want, _ = solver._min_norm_element_from2(v11, v12, v22)
        got = min_norm_2(*(torch.tensor(v, dtype=torch.float64) for v in (v11, v12, v22)))
        assert float(got) == pytest.approx(want, rel=1e-12)
    # both ends of the segment
    hi = min_norm_2(torch.tensor(1.0), torch.tensor(2.0), torch.tensor(5.0))
    lo = min_norm_2(torch.tensor(5.0), torch.tensor(2.0), torch.tensor(1.0))
    assert float(hi) == pytest.approx(0.999) and float(lo) == pytest.approx(0.001)


def test_mmpareto_other_terms_and_accumulated_gradients_are_added():
    torch.manual_seed(0)
    model = TinyModel(DIMS2, 3)
    x, y = make_data(DIMS2, 8, "classification")
    plain, _ = ours_mmpareto_step(copy.deepcopy(model), x, y, "classification")

    m2 = copy.deepcopy(model)
    method = MMPareto({m: m2.encoders[m] for m in m2.modalities})
    m2.zero_grad()
    out, base = m2.step(x, y, "classification")
    losses = method.losses(out, base)
    losses["extra"] = 0.1 * out.features["audio"].pow(2).mean()
    for p in m2.parameters():
        p.grad = torch.ones_like(p)  # accumulated before this step
    method.backward(out, losses)
    got = grads(m2)

    m3 = copy.deepcopy(model)
    m3.zero_grad()
    out3, _ = m3.step(x, y, "classification")
    (0.1 * out3.features["audio"].pow(2).mean()).backward()
    extra = grads(m3)
    for k in got:
        torch.testing.assert_close(got[k], plain[k] + extra[k] + 1.0, rtol=1e-5, atol=1e-6)


def test_mmpareto_zero_pareto_direction_gives_zero_not_nan():
    # the text encoder's own losses do not depend on it, but the audio head reads its features:
    # n_p = 0 with s_p != 0 (the original computes inf * 0 = NaN)
    torch.manual_seed(0)
    enc = {"text": nn.Linear(3, 2), "audio": nn.Linear(2, 2)}
    head_a, fusion = nn.Linear(4, 1), nn.Linear(2, 1)
    x = {"text": torch.randn(6, 3), "audio": torch.randn(6, 2)}
    feats = {m: enc[m](x[m]) for m in enc}
    uni = {
        "text": (0.0 * feats["text"]).sum(1),
        "audio": head_a(torch.cat([feats["audio"], feats["text"]], 1))[:, 0],
    }
    out = StepOutput(feats, uni, fusion(feats["audio"])[:, 0], {}, torch.randn(6), "regression")
    method = MMPareto(enc)
    losses = method.losses(out, {"task": task_loss(out.fused, out.target, out.task)})
    method.backward(out, losses)
    assert torch.equal(enc["text"].weight.grad, torch.zeros(2, 3))
    assert torch.isfinite(enc["audio"].weight.grad).all()


def test_mmpareto_every_term_reaches_trainable_parameters():
    torch.manual_seed(0)
    model = TinyModel(DIMS2, 3)
    x, y = make_data(DIMS2, 8, "classification")
    got, _ = ours_mmpareto_step(model, x, y, "classification")
    for k, g in got.items():
        assert g.abs().sum() > 0, k


def test_mmpareto_phase_one_and_errors():
    torch.manual_seed(0)
    model = TinyModel(DIMS2, 3)
    method = MMPareto({m: model.encoders[m] for m in model.modalities})
    x, y = make_data(DIMS2, 8, "classification")
    out, base = model.step(x, y, "classification", phase=1)
    assert method.losses(out, base) == base
    assert method.backward(out, base) is False
    out, base = model.step(x, y, "classification")
    with pytest.raises(ModbalanceError, match="the loss term 'task'"):
        method.backward(out, {"readout": base["readout"]})
    with pytest.raises(ModbalanceError, match="at least 2 modalities"):
        MMPareto({"audio": model.encoders["audio"]})
    with pytest.raises(ModbalanceError, match="overlap"):
        MMPareto({"audio": model.encoders["audio"], "visual": model.encoders["audio"]})
    with pytest.raises(ModbalanceError, match="`gamma` must be > 0"):
        MMPareto({m: model.encoders[m] for m in model.modalities}, gamma=0.0)


def test_mmpareto_backward_without_losses_hook_computes_the_unimodal_terms():
    torch.manual_seed(0)
    model = TinyModel(DIMS2, 3)
    x, y = make_data(DIMS2, 8, "classification")
    want, _ = ours_mmpareto_step(copy.deepcopy(model), x, y, "classification")
    m2 = copy.deepcopy(model)
    method = MMPareto({m: m2.encoders[m] for m in m2.modalities})
    m2.zero_grad()
    out, _ = m2.step(x, y, "classification", readout=False)
    method.backward(out, {"task": task_loss(out.fused, y, "classification")})
    assert_grads_close(grads(m2), want)


def test_mmpareto_averages_the_per_loss_gradients_over_ranks(monkeypatch):
    # documented DDP behaviour: every per-loss gradient goes through all_reduce_mean before the
    # integration (simulated: the "other ranks" double every gradient)
    import modbalance.methods.mmpareto as mod

    torch.manual_seed(0)
    model = TinyModel(DIMS2, 3)
    x, y = make_data(DIMS2, 8, "classification")
    single, _ = ours_mmpareto_step(copy.deepcopy(model), x, y, "classification")
    calls = []
    monkeypatch.setattr(mod, "is_distributed", lambda: True)
    monkeypatch.setattr(mod, "all_reduce_mean", lambda t: calls.append(1) or 2.0 * t)
    multi, _ = ours_mmpareto_step(copy.deepcopy(model), x, y, "classification")
    assert len(calls) == 3  # fused loss + one unimodal loss per modality
    for k in single:
        scale = 2.0 if k.startswith("encoders.") else 1.0  # heads: the plain (DDP) gradient
        torch.testing.assert_close(multi[k], scale * single[k])


def test_mmpareto_state_dict_round_trip():
    torch.manual_seed(0)
    model = TinyModel(DIMS2, 3)
    _, a = ours_mmpareto_step(model, *make_data(DIMS2, 8, "classification"), "classification")
    b = MMPareto({m: model.encoders[m] for m in model.modalities})
    b.load_state_dict(a.state_dict())
    for name in ("cosine", "pareto_weights", "conflict"):
        assert torch.equal(getattr(a, name), getattr(b, name))


# ==========================================================================================
# G-Blending
# ==========================================================================================


def official_gblend(ltN, lvN, ltNn, lvNn, delta, clamp=0.0001, power=2):
    """The tail of MultiBench's ``train_unimodal``/``train_multimodal`` and ``gb_estimate``."""
    weights = []
    for k in range(len(ltN)):
        oNn = lvNn[k] - ltNn[k]
        oN = lvN[k] - ltN[k]
        if delta:
            oi = oNn - oN
            g = lvNn[k] - lvN[k]
        else:
            oi = oNn
            if oi < 0:
                oi = clamp
            g = lvNn[k]
        weights.append(abs(g / (abs(oi) ** power if power != 2 else oi * oi)))
    z = sum(weights)
    return [w / z for w in weights]


def _measure(heads, train, holdout):
    return {"train": dict(zip(heads, train)), "holdout": dict(zip(heads, holdout))}


@pytest.mark.parity
@pytest.mark.parametrize("mode", ["delta", "final"])
def test_gblending_parity_with_multibench(mode):
    rng = np.random.default_rng(1)
    gb = GBlending(["text", "audio", "visual"], mode=mode)
    heads = gb.heads
    prev_t, prev_h = rng.uniform(0.5, 1.5, 4), rng.uniform(0.8, 2.0, 4)
    gb.observe(_measure(heads, prev_t, prev_h))
    for _ in range(4):
        t = prev_t * rng.uniform(0.5, 0.95, 4)
        h = prev_h * rng.uniform(0.7, 1.1, 4)
        if mode == "final":
            h[1] = t[1] - 0.05  # a negative gap: MultiBench's 1e-4 floor
        got = gb.observe(_measure(heads, t, h))
        want = official_gblend(prev_t, prev_h, t, h, delta=mode == "delta")
        np.testing.assert_allclose(gb.blend.numpy(), want, rtol=1e-12)
        assert torch.equal(got, gb.blend)  # modalities, then fused (gb.heads)
        # a perturbed rule is caught: squared gap -> |gap|^2.01, floor 1e-4 -> 1e-3
        bad = official_gblend(prev_t, prev_h, t, h, delta=mode == "delta", power=2.01)
        assert not np.allclose(gb.blend.numpy(), bad, rtol=1e-6, atol=0)
        if mode == "final":
            bad = official_gblend(prev_t, prev_h, t, h, delta=False, clamp=0.001)
            assert not np.allclose(gb.blend.numpy(), bad, rtol=1e-6, atol=0)
        prev_t, prev_h = t, h


def test_gblend_weights_function_matches_multibench_final_form():
    t, h = torch.tensor([0.5, 0.2, 0.9]), torch.tensor([0.7, 0.1, 1.0])
    want = official_gblend(t.tolist(), h.tolist(), t.tolist(), h.tolist(), delta=False)
    torch.testing.assert_close(gblend_weights(t, h), torch.tensor(want))


def test_gblending_losses_weight_task_and_unimodal_terms():
    torch.manual_seed(0)
    model = TinyModel(DIMS2, 3)
    x, y = make_data(DIMS2, 8, "classification")
    gb = GBlending(["audio", "visual"], mode="final")
    gb.observe(_measure(gb.heads, [0.5, 0.9, 0.2], [0.7, 1.0, 0.8]))
    out, base = model.step(x, y, "classification")
    new = gb.losses(out, base)
    assert set(new) == {"task", "unimodal_audio", "unimodal_visual"}
    w = gb.blend.float()
    torch.testing.assert_close(new["task"], w[2] * base["task"])
    for i, m in enumerate(("audio", "visual")):
        torch.testing.assert_close(
            new[f"unimodal_{m}"], w[i] * task_loss(out.unimodal[m], y, "classification")
        )
    model.zero_grad()
    combine_losses(new).backward()
    for k, g in grads(model).items():
        assert g.abs().sum() > 0, k  # every term reaches encoders and heads


def test_gblending_epoch_end_schedule_and_delta_baseline():
    gb = GBlending(["text", "audio"], every=2)
    calls = []
    values = iter(
        [
            _measure(gb.heads, [1.0, 1.0, 1.0], [1.2, 1.3, 1.1]),
            _measure(gb.heads, [0.6, 0.9, 0.5], [1.0, 1.25, 0.9]),
        ]
    )

    def evaluate():
        calls.append(1)
        return next(values)

    gb.epoch_end(0, evaluate)
    assert not calls
    gb.epoch_end(1, evaluate)  # records the baseline only
    assert len(calls) == 1 and gb.summary() == dict.fromkeys(THIRDS, 0.3333)
    gb.epoch_end(2, evaluate)
    gb.epoch_end(3, evaluate)
    assert len(calls) == 2 and int(gb.num_estimates) == 1
    want = official_gblend(
        [1.0, 1.0, 1.0], [1.2, 1.3, 1.1], [0.6, 0.9, 0.5], [1.0, 1.25, 0.9], True
    )
    np.testing.assert_allclose(gb.blend.numpy(), want, rtol=1e-12)


def test_gblending_keeps_weights_when_nothing_changed_and_floors_delta():
    gb = GBlending(["text", "audio"])
    m = _measure(gb.heads, [1.0, 1.0, 1.0], [1.2, 1.3, 1.1])
    gb.observe(m)
    gb.observe(m)  # Delta G = 0 everywhere: 0/0, the weights stay
    assert gb.summary() == dict.fromkeys(THIRDS, 0.3333)
    # Delta O = 0 for one head: floored at eps^2 instead of dividing by zero
    gb.observe(_measure(gb.heads, [0.9, 0.8, 0.9], [1.1, 1.2, 1.05]))
    assert torch.isfinite(gb.blend).all()
    assert gb.blend[0] > 0.99


def test_gblending_regression_three_modalities_in_a_step():
    torch.manual_seed(0)
    model = TinyModel(DIMS3, 1)
    x, y = make_data(DIMS3, 8, "regression")
    gb = GBlending(list(DIMS3), mode="final")
    gb.observe(_measure(gb.heads, [0.5, 0.4, 0.6, 0.3], [0.7, 0.5, 0.9, 0.6]))
    out, base = model.step(x, y, "regression")
    new = gb.losses(out, base)
    torch.testing.assert_close(
        new["unimodal_text"], gb.blend[0].float() * (out.unimodal["text"] - y).abs().mean()
    )


def test_gblending_argument_and_measurement_errors():
    with pytest.raises(ModbalanceError, match="must not contain 'fused'"):
        GBlending(["fused", "audio"])
    with pytest.raises(ModbalanceError, match="`every` must be >= 1"):
        GBlending(["text", "audio"], every=0)
    with pytest.raises(ModbalanceError, match="`mode` must be one of"):
        GBlending(["text", "audio"], mode="offline")
    with pytest.raises(ModbalanceError, match="`eps` must be > 0"):
        GBlending(["text", "audio"], eps=0.0)
    gb = GBlending(["text", "audio"])
    with pytest.raises(ModbalanceError, match="needs `evaluate`"):
        gb.epoch_end(0)
    with pytest.raises(ModbalanceError, match="measurement must be"):
        gb.observe({"train": {}})
    with pytest.raises(ModbalanceError, match="missing modality 'fused'"):
        gb.observe({"train": {"text": 1, "audio": 1}, "holdout": {"text": 1, "audio": 1}})
    bad = _measure(gb.heads, [1.0, 1.0, 1.0], [1.0, 1.0, 1.0])
    bad["train"]["text"] = torch.ones(2)
    with pytest.raises(ModbalanceError, match="must hold one loss value"):
        gb.observe(bad)
    model = TinyModel(DIMS2, 3)
    out, _ = model.step(*make_data(DIMS2, 4, "classification"), "classification")
    with pytest.raises(ModbalanceError, match="the term 'task'"):
        GBlending(["audio", "visual"]).losses(out, {})


def test_gblending_state_dict_round_trip():
    a = GBlending(["text", "audio"], mode="final")
    a.observe(_measure(a.heads, [0.5, 0.9, 0.2], [0.7, 1.0, 0.8]))
    b = GBlending(["text", "audio"], mode="final")
    b.load_state_dict(a.state_dict())
    for name, buf in a.named_buffers():
        assert torch.equal(buf, getattr(b, name)), name
    assert b.summary() == a.summary()


# ==========================================================================================
# AGM
# ==========================================================================================


class _Identity(nn.Module):
    def forward(self, x):
        return x


class OfficialGradMod(nn.Module):
    """``GradMod`` of lihong2303/AGM ``model/CREMAD_net.py`` (and ``URFunny_net.py`` for M = 3).

    Around our TinyModel; a modality is "padded" by zeroing its *features* (our documented
    feature-space masking) instead of its input. The mono-modal outputs pass through identity
    modules with full backward hooks that scale their gradient, exactly as the original.
    """

    def __init__(self, net: TinyModel):
        super().__init__()
        self.net = net
        self.outs = nn.ModuleList([_Identity() for _ in net.modalities])
        self.scale = [1.0] * len(net.modalities)
        for i, mod in enumerate(self.outs):
            mod.register_full_backward_hook(self._hook(i))

    def _hook(self, i):
        def hook(m, ginp, gout):
            return (ginp[0].clone() * self.scale[i],)

        return hook

    def forward(self, x):
        net = self.net
        feats = {m: torch.tanh(net.encoders[m](x[m])) for m in net.modalities}

        def f(*keep):
            return net.fuse({m: feats[m] if m in keep else 0 * feats[m] for m in feats}, {})

        total_out = f(*net.modalities)
        net.eval()
        if len(net.modalities) == 2:
            a, v = net.modalities
            pad_visual_out, pad_audio_out = f(a), f(v)
            m_a = 0.5 * (total_out - pad_audio_out + pad_visual_out)
            m_v = 0.5 * (total_out - pad_visual_out + pad_audio_out)
            monos = [m_a, m_v]
        else:
            t, a, v = net.modalities
            pad_audio_out, pad_visual_out, pad_text_out = f(t, v), f(t, a), f(a, v)
            pad_visual_audio_out, pad_visual_text_out, pad_audio_text_out = f(t), f(a), f(v)
            m_t = (total_out - pad_text_out + pad_visual_audio_out) / 3 + (
                pad_visual_out - pad_audio_text_out + pad_audio_out - pad_visual_text_out
            ) / 6
            m_a = (total_out - pad_audio_out + pad_visual_text_out) / 3 + (
                pad_visual_out - pad_audio_text_out + pad_text_out - pad_visual_audio_out
            ) / 6
            m_v = (total_out - pad_visual_out + pad_audio_text_out) / 3 + (
                pad_audio_out - pad_visual_text_out + pad_text_out - pad_visual_audio_out
            ) / 6
            monos = [m_t, m_a, m_v]
        net.train()
        monos = [self.outs[i](o) for i, o in enumerate(monos)]
        return monos, sum(monos)


def official_agm_scores(monos, label):
    """The per-sample score loop of ``run/CREMAD_main.py``, with the 1e-8 clamp."""
    softmax = nn.Softmax(dim=1)
    scores = []
    for out_m in monos:
        score = 0.0
        for k in range(out_m.size(0)):
            p = softmax(out_m)[k][label[k]]
            if torch.isinf(torch.log(p)) or p < 1e-8:
                score += -torch.log(torch.tensor(1e-8, dtype=out_m.dtype))
            else:
                score += -torch.log(p)
        scores.append(score / out_m.size(0))
    return [s.item() for s in scores]


def official_agm_train(model, batches, alpha, cap, lr=0.1, cap_tweak=0.0):
    """``train`` of ``run/CREMAD_main.py`` (M = 2) / ``run/URFunny_main.py`` (M = 3), AGM path."""
    gm = OfficialGradMod(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    m = len(model.modalities)
    train_score = [0.0] * m
    history = []
    for step, (x, y) in enumerate(batches):
        iteration = step + 1
        monos, out = gm(x)
        loss = F.cross_entropy(out, y)
        scores = official_agm_scores(monos, y)
        mean_score = sum(scores) / m
        ratio = [math.exp((mean_score - s) * m / (m - 1)) for s in scores]
        optimal_mean = sum(train_score) / m
        optimal = [math.exp((optimal_mean - s) * m / (m - 1)) for s in train_score]
        coeff = [math.exp(alpha * min(o - r, cap + cap_tweak)) for o, r in zip(optimal, ratio)]
        train_score = [
            t * (iteration - 1) / iteration + s / iteration for t, s in zip(train_score, scores)
        ]
        gm.scale = coeff
        opt.zero_grad()
        loss.backward()
        history.append((coeff, grads(model)))
        opt.step()
    return history


def ours_agm_train(model, batches, alpha, cap, lr=0.1):
    agm = AGM(list(model.modalities), alpha=alpha, cap=cap)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    history = []
    for x, y in batches:
        out, base = model.step(x, y, "classification", readout=False)
        losses = agm.losses(out, base)
        assert float(losses["agm"].detach()) == 0.0
        opt.zero_grad()
        combine_losses(losses).backward()
        history.append((agm.coefficients.tolist(), grads(model)))
        opt.step()
    return history, agm


def _batches(dims, steps, n=10, classes=3):
    return [make_data(dims, n, "classification", classes, seed=100 + s) for s in range(steps)]


@pytest.mark.parity
@pytest.mark.parametrize("dims,cap", [(DIMS2, 10.0), (DIMS3, 7.0)])
def test_agm_parity_with_official_code(dims, cap):
    torch.manual_seed(0)
    model = TinyModel(dims, 3)
    batches = _batches(dims, 4)
    theirs = official_agm_train(copy.deepcopy(model), batches, alpha=1.5, cap=cap)
    ours, agm = ours_agm_train(copy.deepcopy(model), batches, alpha=1.5, cap=cap)
    modulated = False
    for (k_t, g_t), (k_o, g_o) in zip(theirs, ours):
        np.testing.assert_allclose(k_o, k_t, rtol=1e-5)
        assert_grads_close(g_o, g_t, rtol=1e-5, atol=1e-6)
        modulated |= max(abs(k - 1.0) for k in k_t) > 1e-2
    assert modulated, "the coefficients must actually move away from 1"
    assert int(agm.iteration) == 4


@pytest.mark.parity
def test_agm_parity_catches_perturbed_rules():
    torch.manual_seed(0)
    model = TinyModel(DIMS2, 3)
    batches = _batches(DIMS2, 3)
    ours, _ = ours_agm_train(copy.deepcopy(model), batches, alpha=1.5, cap=10.0)
    bad = official_agm_train(copy.deepcopy(model), batches, alpha=1.5 * 1.001, cap=10.0)
    assert any(
        not np.allclose(k_o, k_b, rtol=1e-5) for (k_o, _), (k_b, _) in zip(ours[1:], bad[1:])
    )
    # the cap is caught when it binds
    ours_c, _ = ours_agm_train(copy.deepcopy(model), batches, alpha=1.5, cap=0.01)
    bad_c = official_agm_train(copy.deepcopy(model), batches, alpha=1.5, cap=0.01, cap_tweak=0.01)
    assert any(not np.allclose(k_o, k_b, rtol=1e-5) for (k_o, _), (k_b, _) in zip(ours_c, bad_c))


def test_agm_coefficients_formula_and_mosei_without_cap():
    s, t = torch.tensor([0.3, 1.1], dtype=torch.float64), torch.tensor([0.9, 0.4])
    t = t.double()
    want = [
        math.exp(2.0 * (math.exp(t[1] - t[0]) - math.exp(s[1] - s[0]))),
        math.exp(2.0 * (math.exp(t[0] - t[1]) - math.exp(s[0] - s[1]))),
    ]
    np.testing.assert_allclose(agm_coefficients(s, t, alpha=2.0, cap=None).numpy(), want)
    assert agm_coefficients(s, t, alpha=2.0, cap=0.0).max() <= 1.0
    with pytest.raises(ModbalanceError, match="M >= 2"):
        agm_coefficients(torch.ones(1), torch.ones(1), 1.0)


def test_agm_responses_sum_to_the_fused_output_and_eval_mode_is_restored():
    torch.manual_seed(0)
    model = TinyModel(DIMS3, 3)
    model.fusion = nn.Sequential(nn.Dropout(0.5), model.fusion)
    x, y = make_data(DIMS3, 6, "classification")
    model.eval()  # deterministic fused output for the check
    out, _ = model.step(x, y, "classification")
    model.train()
    o = mono_modal_responses(
        model.fuse, out.features, {}, out.fused, model.modalities, eval_modules=[model]
    )
    assert o.shape == (6, 3, 3)
    torch.testing.assert_close(o.sum(-1), out.fused)
    assert all(mod.training for mod in model.modules())


def test_agm_alpha_zero_is_the_plain_gradient_and_regression_runs():
    torch.manual_seed(0)
    model = TinyModel(DIMS2, 1)
    x, y = make_data(DIMS2, 8, "regression")
    out, base = model.step(x, y, "regression", readout=False)
    losses = AGM(list(DIMS2), alpha=0.0).losses(out, base)
    model.zero_grad()
    combine_losses(losses).backward()
    got = grads(model)
    model.zero_grad()
    out, base = model.step(x, y, "regression", readout=False)
    base["task"].backward()
    assert_grads_close(got, grads(model))
    # regression score: the L1 loss of each mono-modal response (documented)
    agm = AGM(list(DIMS2), alpha=1.0)
    out, base = model.step(x, y, "regression", readout=False)
    agm.losses(out, base)
    o = mono_modal_responses(model.fuse, out.features, {}, out.fused, model.modalities)
    want = (o[:, 0, :] - y[:, None]).abs().mean(0)
    torch.testing.assert_close(agm.score.float(), want.detach())


def test_agm_term_reaches_encoders_and_head():
    torch.manual_seed(0)
    model = TinyModel(DIMS2, 3)
    agm = AGM(list(DIMS2), alpha=1.5)
    for x, y in _batches(DIMS2, 2):
        out, base = model.step(x, y, "classification", readout=False)
        losses = agm.losses(out, base)
    model.zero_grad()
    losses["agm"].backward()
    assert agm.coefficients.sub(1).abs().max() > 1e-3
    for name in ("encoders.audio.weight", "encoders.visual.weight", "fusion.weight"):
        assert dict(model.named_parameters())[name].grad.abs().sum() > 0, name


def test_agm_clipping_in_around_step():
    torch.manual_seed(0)
    model = TinyModel(DIMS2, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    agm = AGM(list(DIMS2), clip_norm=1.0, clip_watch=[model.fusion.weight])
    out, _ = model.step(*make_data(DIMS2, 4, "classification"), "classification")
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    with agm.around_step(out, opt):  # fusion grads inside [-1, 1]: no clipping
        pass
    assert model.fusion.weight.grad.max() == 0.5
    model.fusion.weight.grad[0, 0] = 3.0
    with agm.around_step(out, opt):
        total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert float(total) == pytest.approx(1.0, rel=1e-5)


def test_agm_argument_errors():
    with pytest.raises(ModbalanceError, match="at least 2 modalities"):
        AGM(["audio"])
    with pytest.raises(ModbalanceError, match="`alpha` must be >= 0"):
        AGM(["audio", "visual"], alpha=-1.0)
    with pytest.raises(ModbalanceError, match="`masking` must be one of"):
        AGM(["audio", "visual"], masking="mean")
    with pytest.raises(ModbalanceError, match="only acts with `clip_norm`"):
        AGM(["audio", "visual"], clip_watch=[torch.zeros(1)])
    with pytest.raises(TypeError, match="`head` must be callable"):
        AGM(["audio", "visual"], head=3)
    model = TinyModel(DIMS2, 3)
    out, base = model.step(*make_data(DIMS2, 4, "classification"), "classification")
    with pytest.raises(ModbalanceError, match="the term 'task'"):
        AGM(list(DIMS2)).losses(out, {})
    with pytest.raises(ModbalanceError, match="needs the fused prediction"):
        AGM(list(DIMS2)).losses(out._replace(fuse=None), base)
    with pytest.raises(ModbalanceError, match=r"expected the modalities \['audio', 'text'\]"):
        AGM(["audio", "text"]).losses(out, base)
    assert AGM(list(DIMS2)).losses(out._replace(phase=1), base) == base


def test_agm_uses_scores_averaged_over_ranks(monkeypatch):
    import modbalance.methods.agm as mod

    torch.manual_seed(0)
    model = TinyModel(DIMS2, 3)
    monkeypatch.setattr(mod, "all_reduce_mean", lambda t: torch.tensor([0.2, 1.4]))
    agm = AGM(list(DIMS2), alpha=1.0)
    out, base = model.step(*make_data(DIMS2, 6, "classification"), "classification")
    agm.losses(out, base)
    s = torch.tensor([0.2, 1.4], dtype=torch.float64)
    torch.testing.assert_close(agm.score, s)
    torch.testing.assert_close(agm.coefficients, agm_coefficients(s, torch.zeros(2).double(), 1.0))


def test_agm_state_dict_round_trip():
    torch.manual_seed(0)
    model = TinyModel(DIMS2, 3)
    _, a = ours_agm_train(model, _batches(DIMS2, 2), alpha=1.0, cap=10.0)
    b = AGM(list(DIMS2))
    b.load_state_dict(a.state_dict())
    for name, buf in a.named_buffers():
        assert torch.equal(buf, getattr(b, name)), name
