"""ShapleyEquilibrium (PaSE's redesigned equilibrium) and the separability-safe calibration."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from modbalance._checks import ModbalanceError
from modbalance.balancing import StepOutput
from modbalance.methods.equilibrium import ShapleyEquilibrium
from modbalance.prototypes import PrototypeCalibrator
from modbalance.shapley import GameResult, shapley_from_table

MODS = ("text", "audio", "vision")


def named(eq, values):
    """``{modality: value}`` from an ``(M,)`` tensor in the order of ``eq.modalities``."""
    return dict(zip(eq.modalities, values.tolist()))


def _game(shapley, names=MODS):
    m = len(names)
    return GameResult(torch.zeros(2**m), torch.tensor(shapley), torch.zeros(m, m), tuple(names))


def _out(encoders, x, y, game=None, phase=2, task="regression"):
    feats = {m: encoders[m](x[m]) for m in encoders}
    uni = {m: feats[m].sum(1) for m in encoders}
    present = {m: torch.ones(y.shape[0], dtype=torch.bool) for m in encoders}
    return StepOutput(feats, uni, None, present, y, task, phase=phase, game=game)


@pytest.fixture
def setup():
    torch.manual_seed(0)
    enc = {m: nn.Linear(3, 2) for m in MODS}
    x = {m: torch.randn(8, 3) for m in MODS}
    return enc, x, torch.randn(8)


def test_default_rule_adds_unimodal_losses_that_reach_every_encoder(setup):
    enc, x, y = setup
    eq = ShapleyEquilibrium(MODS, beta=0.0, replace=("readout",), learnable_margin=None)
    assert not eq.needs_game  # beta = 0: equal weights, no game needed
    assert ShapleyEquilibrium(MODS).needs_game  # the default tilts the weights by the shares
    terms = eq.losses(_out(enc, x, y), {"task": torch.tensor(0.0), "readout": torch.tensor(1.0)})
    assert set(terms) == {"task", "unimodal_text", "unimodal_audio", "unimodal_vision"}
    for m in MODS:
        grads = torch.autograd.grad(terms[f"unimodal_{m}"], list(enc[m].parameters()))
        assert sum(float(g.abs().sum()) for g in grads) > 0, m
        expected = (enc[m](x[m]).sum(1) - y).abs().mean()
        torch.testing.assert_close(terms[f"unimodal_{m}"], expected)


def test_shares_tilt_the_weights_by_name_not_position(setup):
    enc, x, y = setup
    eq = ShapleyEquilibrium(MODS, beta=1.0, momentum=0.0, learnable_margin=None)
    assert eq.needs_game
    # the game lists the players in another order than the method
    game = _game([0.1, 0.0, 0.9], names=("audio", "vision", "text"))
    eq.losses(_out(enc, x, y, game), {"task": torch.tensor(0.0)})
    w = named(eq, eq.coefficients)
    # shares text 0.9, audio 0.1, vision 0: w = 1 + (1 - 3 psi), clamped at 0
    assert w["text"] == pytest.approx(0.0)
    assert w["audio"] == pytest.approx(1.7)
    assert w["vision"] == pytest.approx(2.0)


def test_shares_are_smoothed(setup):
    eq = ShapleyEquilibrium(MODS, beta=1.0, momentum=0.5, learnable_margin=None)
    eq.observe(_game([1.0, 1.0, 1.0]))
    torch.testing.assert_close(eq.shares, torch.full((3,), 1 / 3))
    eq.observe(_game([1.0, 0.0, 0.0]))
    torch.testing.assert_close(eq.shares, torch.tensor([2 / 3, 1 / 6, 1 / 6]))
    state = eq.state_dict()
    fresh = ShapleyEquilibrium(MODS, beta=1.0, momentum=0.5, learnable_margin=None)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.shares, eq.shares) and bool(fresh.initialized)


def test_phase_one_and_paper_rule_leave_losses_alone(setup):
    enc, x, y = setup
    base = {"unimodal": torch.tensor(1.0)}
    assert ShapleyEquilibrium(MODS).losses(_out(enc, x, y, phase=1), base) == base
    paper = ShapleyEquilibrium(MODS, rule="pase", groups=enc, momentum=0.0)
    assert paper.needs_game and paper.losses(_out(enc, x, y), base) == base


def test_paper_rule_scales_the_dominant_update(setup):
    enc, x, y = setup
    paper = ShapleyEquilibrium(MODS, rule="pase", groups=enc, momentum=0.0)
    table = torch.tensor([0.0, 0.9, 0.1, 1.0, 0.05, 0.95, 0.15, 1.05])
    game = GameResult(table, shapley_from_table(table), torch.zeros(3, 3), MODS)
    opt = torch.optim.SGD([p for e in enc.values() for p in e.parameters()], lr=0.1)
    out = _out(enc, x, y, game)
    sum(o.sum() for o in out.unimodal.values()).backward()
    before = {m: enc[m].weight.detach().clone() for m in MODS}
    grads = {m: enc[m].weight.grad.clone() for m in MODS}
    with paper.around_step(out, opt):
        opt.step()
    k = named(paper.modulator, paper.modulator.coefficients)
    assert k["text"] < k["vision"] <= 1.0
    for m in MODS:
        torch.testing.assert_close(enc[m].weight - before[m], -0.1 * k[m] * grads[m])


def test_errors():
    with pytest.raises(ModbalanceError, match="at least 2 modalities"):
        ShapleyEquilibrium(["text"])
    with pytest.raises(ModbalanceError, match="rule"):
        ShapleyEquilibrium(MODS, rule="boost")
    with pytest.raises(ModbalanceError, match="pass `groups`"):
        ShapleyEquilibrium(MODS, rule="pase")
    with pytest.raises(ModbalanceError, match="beta"):
        ShapleyEquilibrium(MODS, beta=-1.0)
    eq = ShapleyEquilibrium(MODS, beta=1.0, learnable_margin=None)
    with pytest.raises(ModbalanceError, match="GameResult over the modalities"):
        eq.observe(_game([1.0, 2.0], names=("text", "audio")))
    enc = {m: nn.Linear(3, 2) for m in MODS}
    x = {m: torch.randn(4, 3) for m in MODS}
    # a step without a game keeps the last shares (uniform before the first game)
    eq.losses(_out(enc, x, torch.randn(4)), {"task": torch.tensor(0.0)})
    assert not eq.initialized
    assert named(eq, eq.coefficients) == pytest.approx(dict.fromkeys(MODS, 1.0))


# ------------------------------------------------------------------------------------------
# calibration that cannot collapse an encoder that does not separate the classes
# ------------------------------------------------------------------------------------------


def test_adaptive_calibration_is_off_for_a_modality_that_cannot_separate_classes():
    torch.manual_seed(0)
    calib = PrototypeCalibrator(4, 8, adaptive=True)
    for _ in range(30):  # fresh batches of features that carry no class information
        y, noise = torch.randint(0, 4, (256,)), torch.randn(256, 8)
        out = calib(noise, y)
    assert float(calib.separability) < 0.1
    assert float(out.loss) < 0.1 * float(PrototypeCalibrator(4, 8)(noise, y).loss)


def test_adaptive_calibration_turns_on_for_separable_features_and_reaches_them():
    torch.manual_seed(0)
    y = torch.randint(0, 4, (256,))
    centers = torch.randn(4, 8) * 3
    enc = nn.Linear(8, 8)
    with torch.no_grad():
        enc.weight.copy_(torch.eye(8))
        enc.bias.zero_()
    x = centers[y] + 0.3 * torch.randn(256, 8)
    calib = PrototypeCalibrator(4, 8, adaptive=True)
    for _ in range(30):
        out = calib(enc(x), y)
    assert float(calib.separability) > 0.9
    out.loss.backward()
    assert enc.weight.grad.abs().sum() > 0  # the scaled loss still trains the encoder
    state = calib.state_dict()
    assert "separability" in state
    fresh = PrototypeCalibrator(4, 8, adaptive=True)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.separability, calib.separability)
    calib.reset()
    assert float(calib.separability) == 0.0


def test_adaptive_must_be_a_bool():
    with pytest.raises(TypeError, match="`adaptive` must be a bool"):
        PrototypeCalibrator(4, 8, adaptive="yes")


@settings(max_examples=60, deadline=None)
@given(
    shapley=st.lists(st.floats(-1.0, 5.0), min_size=2, max_size=6),
    beta=st.floats(0.0, 3.0),
    weight=st.floats(0.0, 2.0),
)
def test_weights_are_non_negative_and_average_to_lambda_without_clamping(shapley, beta, weight):
    names = tuple(f"m{i}" for i in range(len(shapley)))
    eq = ShapleyEquilibrium(names, beta=beta, weight=weight, momentum=0.0, learnable_margin=None)
    shares = eq.observe(_game(shapley, names))
    w = eq.coefficients
    assert bool((w >= 0).all())
    m = len(names)
    if beta == 0 or float(shares.max()) <= (1 + beta) / (beta * m):  # no weight clamped at 0
        assert float(w.mean()) == pytest.approx(weight, abs=1e-5)
    # a smaller share never gets a smaller weight
    order = torch.argsort(shares)
    assert bool((w[order][1:] <= w[order][:-1] + 1e-6).all())


# ------------------------------------------------------------------------------------------
# learnability: a modality with nothing to learn is not fed unimodal signal
# ------------------------------------------------------------------------------------------


def _noise_task(seed, n=768):
    """Regression: a strong linear view, a weak view whose signal needs a product, pure noise."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 3, generator=g)
    y = 2.0 * z[:, 0] + 1.0 * z[:, 1] * z[:, 2].sign()
    x = {
        "strong": torch.cat([z[:, :1], 0.5 * torch.randn(n, 3, generator=g)], 1),
        "weak": torch.cat([z[:, 1:], 0.3 * torch.randn(n, 2, generator=g)], 1),
        "noise": torch.randn(n, 4, generator=g),
    }
    return x, y


def _train_recipe(seed, names, learnable_margin=0.02, epochs=12, switch=4):
    from modbalance import DualPhaseSchedule, ModalityGame, balanced_step

    x, y = _noise_task(seed)
    xv, yv = _noise_task(seed + 1000, n=256)
    torch.manual_seed(seed)
    enc = nn.ModuleDict(
        {m: nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 8)) for m in names}
    )
    heads = nn.ModuleDict({m: nn.Linear(8, 1) for m in names})
    head = nn.Sequential(nn.Linear(8 * len(names), 32), nn.ReLU(), nn.Linear(32, 1))

    def fuse(feats, present):  # concatenation; an absent modality's features are zeroed
        h = [feats[m] * present[m].unsqueeze(1).to(feats[m].dtype) for m in names]
        return head(torch.cat(h, 1)).squeeze(-1)

    params = [*enc.parameters(), *heads.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=3e-3)
    schedule = DualPhaseSchedule(switch_epoch=switch, mode="min")
    eq = ShapleyEquilibrium(names, learnable_margin=learnable_margin, patience=30)
    game = ModalityGame(fuse, names, masking="present", value="neg_mae", task="regression")
    step = 0
    for _ in range(epochs):
        phase = schedule.phase
        perm = torch.randperm(y.shape[0], generator=torch.Generator().manual_seed(step))
        for idx in perm.split(64):
            feats = {m: enc[m](x[m][idx]) for m in names}
            uni = {m: heads[m](feats[m]).squeeze(-1) for m in names}
            present = {m: torch.ones(len(idx), dtype=torch.bool) for m in names}
            fused = fuse(feats, present) if schedule.runs_fusion else None
            out = StepOutput(feats, uni, fused, present, y[idx], "regression", phase, step=step)
            balanced_step(out, schedule.base_losses(out), [eq], opt, game=game)
            step += 1
        with torch.no_grad():
            feats = {m: enc[m](xv[m]) for m in names}
            ones = {m: torch.ones(yv.shape[0], dtype=torch.bool) for m in names}
            mae = float((fuse(feats, ones) - yv).abs().mean())
            uni_err = {m: float((heads[m](feats[m]).squeeze(-1) - yv).abs().mean()) for m in names}
        schedule.select(mae)
        schedule.epoch_end(uni_err)
    return eq, schedule.best_selected


@pytest.mark.slow
def test_a_pure_noise_modality_gets_no_more_weight_than_an_informative_weak_one():
    names = ("strong", "weak", "noise")
    eq, _ = _train_recipe(0, names)
    gain, weights = named(eq, eq.gain), named(eq, eq.coefficients)
    assert gain["weak"] > 0.02 and gain["noise"] < 0.02, gain
    assert weights["noise"] <= weights["weak"], weights
    learnability = named(eq, eq.learnability)
    assert learnability["noise"] == 0.0 and learnability["weak"] == 1.0
    # without the learnability factor the noise modality got the largest weight (share ~0)
    old, _ = _train_recipe(0, names, learnable_margin=None)
    old_weights = named(old, old.coefficients)
    assert old_weights["noise"] >= old_weights["weak"], old_weights


@pytest.mark.slow
def test_a_pure_noise_modality_does_not_cost_more_than_the_seed_spread():
    with_noise = [_train_recipe(s, ("strong", "weak", "noise"))[1] for s in range(3)]
    without = [_train_recipe(s, ("strong", "weak"))[1] for s in range(3)]
    spread = max(torch.tensor(without).std().item(), torch.tensor(with_noise).std().item())
    diff = sum(with_noise) / 3 - sum(without) / 3
    assert diff <= spread, (with_noise, without)


def test_missing_unimodal_prediction_and_bad_options_are_clear_errors(setup):
    enc, x, y = setup
    eq = ShapleyEquilibrium(MODS, beta=0.0)
    out = _out(enc, x, y)
    out = out._replace(unimodal={m: out.unimodal[m] for m in ("text", "audio")})
    with pytest.raises(ModbalanceError, match=r"`out\.unimodal` is missing 'vision'"):
        eq.losses(out, {"task": torch.tensor(0.0)})
    with pytest.raises(ModbalanceError, match="learnable_margin"):
        ShapleyEquilibrium(MODS, learnable_margin=0.0)
    with pytest.raises(ModbalanceError, match="patience"):
        ShapleyEquilibrium(MODS, patience=0)
    with pytest.raises(TypeError, match="loss-term names"):
        ShapleyEquilibrium(MODS, replace=[1])
    assert ShapleyEquilibrium(MODS, replace="readout").replace == ("readout",)


def test_learnability_state_round_trips(setup):
    enc, x, y = setup
    eq = ShapleyEquilibrium(MODS, beta=0.0, patience=2)
    for _ in range(5):
        eq.losses(_out(enc, x, y), {"task": torch.tensor(0.0)})
    fresh = ShapleyEquilibrium(MODS, beta=0.0, patience=2)
    fresh.load_state_dict(eq.state_dict())
    assert torch.equal(fresh.learnability, eq.learnability)
    torch.testing.assert_close(fresh.gain, eq.gain)
    assert fresh.summary() == eq.summary()
    assert set(eq.summary()) == {
        f"{kind}_{m}" for kind in ("coefficient", "share", "gain", "learnability") for m in MODS
    }
    assert set(eq.state_dict()) >= {"unimodal_loss", "constant_loss", "stalled_steps"}
