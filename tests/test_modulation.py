"""Tests for modbalance.methods.modulators: ShapleyGradModulator and OGMGEModulator."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from modbalance._checks import ModbalanceError, value_checks
from modbalance.balancing import StepOutput
from modbalance.methods.modulators import (
    ModulatorHandle,
    OGMGEModulator,
    ShapleyGradModulator,
    ogmge_coefficients,
    pase_coefficients,
)
from modbalance.metrics import pase_shares
from modbalance.shapley import GameResult, ModalityGame, ShapleyResult, shapley_values

# ------------------------------------------------------------------------------------------
# a two-branch model with a shared head (the head is outside every group)
# ------------------------------------------------------------------------------------------


class TwoBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.text = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4))
        self.audio = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 4))
        self.head = nn.Linear(8, 1)

    def forward(self, xt, xa, scale=None):
        ht, ha = self.text(xt), self.audio(xa)
        if scale is not None:  # scale each branch's gradient by hand (forward unchanged)
            ht = scale[0] * ht + (1 - scale[0]) * ht.detach()
            ha = scale[1] * ha + (1 - scale[1]) * ha.detach()
        return self.head(torch.cat([ht, ha], 1))[:, 0]


def batch(device, seed):
    g = torch.Generator().manual_seed(seed)
    xt, xa, y = torch.randn(16, 5, generator=g), torch.randn(16, 3, generator=g), torch.randn(16)
    return xt.to(device), xa.to(device), y.to(device)


K = (0.3, 0.8)


def fixed_rule(contributions):
    return torch.tensor(K, device=contributions.device, dtype=contributions.dtype)


def make(device, apply, **kw):
    model = TwoBranch().to(device)
    mod = ShapleyGradModulator(
        {"text": model.text, "audio": model.audio.parameters()},
        rule=fixed_rule,
        momentum=0.0,
        apply=apply,
        **kw,
    ).to(device)
    mod.observe({"text": 1.0, "audio": 0.5})
    return model, mod


def params_of(module):
    return [p.detach().clone() for p in module.parameters()]


def deltas(before, module):
    return [p.detach() - b for p, b in zip(module.parameters(), before)]


# ------------------------------------------------------------------------------------------
# coefficient rules
# ------------------------------------------------------------------------------------------


def test_pase_rule_hand_computation():
    k = pase_coefficients(torch.tensor([0.6, 0.2, 0.2], dtype=torch.float64))
    e = math.exp(0.2 / 0.6 - 1)
    torch.testing.assert_close(k, torch.tensor([e, 1.0, 1.0], dtype=torch.float64))
    # negatives are clipped; a zero share is the weakest (k = 1), positive ones get e^-1
    k = pase_coefficients(torch.tensor([2.0, -1.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(k, torch.tensor([math.exp(-1), 1.0, math.exp(-1)]).double())
    # nothing positive: uniform shares, no modulation
    assert torch.equal(pase_coefficients(torch.tensor([-1.0, 0.0, -3.0])), torch.ones(3))
    torch.testing.assert_close(pase_shares(torch.tensor([-1.0, 0.0])), torch.tensor([0.5, 0.5]))
    # batched
    assert pase_coefficients(torch.rand(4, 3)).shape == (4, 3)


def test_pase_rule_orders_modalities():
    k = pase_coefficients(torch.tensor([0.5, 0.1, 0.3]))
    assert k[1] == 1.0 and k[0] < k[2] < 1.0 and (k > math.exp(-1)).all()


def test_observe_ema_first_observation_initialises(device):
    model = TwoBranch()
    mod = ShapleyGradModulator({"text": model.text, "audio": model.audio}, momentum=0.75).to(device)
    assert torch.equal(mod.coefficients.cpu(), torch.ones(2)) and not mod.initialized
    k1 = mod.observe({"audio": 0.2, "text": 0.6})  # key order does not matter
    expected1 = pase_coefficients(torch.tensor([0.6, 0.2]))
    torch.testing.assert_close(k1.cpu(), expected1)
    torch.testing.assert_close(mod.shares.cpu(), torch.tensor([0.75, 0.25]))
    k2 = mod.observe({"text": torch.tensor(0.1, device=device), "audio": 0.3})
    expected2 = 0.75 * expected1 + 0.25 * pase_coefficients(torch.tensor([0.1, 0.3]))
    torch.testing.assert_close(k2.cpu(), expected2)
    coefs = {m[len("coefficient_") :]: v for m, v in mod.summary().items()}
    assert set(coefs) == {"text", "audio"} and isinstance(coefs["audio"], float)
    assert coefs["audio"] == pytest.approx(float(expected2[1]))
    mod.reset()
    assert not mod.initialized and torch.equal(mod.coefficients.cpu(), torch.ones(2))


def test_min_coefficient_clamps():
    model = TwoBranch()
    mod = ShapleyGradModulator(
        {"text": model.text, "audio": model.audio}, momentum=0.0, min_coefficient=0.9
    )
    k = mod.observe({"text": 1.0, "audio": 0.01})
    torch.testing.assert_close(k, torch.tensor([0.9, 1.0]))


def test_custom_rule_is_checked():
    model = TwoBranch()
    groups = {"text": model.text, "audio": model.audio}
    with pytest.raises(ModbalanceError, match="one coefficient per modality"):
        ShapleyGradModulator(groups, rule=lambda c: torch.ones(3)).observe(
            {"text": 1.0, "audio": 2.0}
        )
    with pytest.raises(ModbalanceError, match="non-negative"):
        ShapleyGradModulator(groups, rule=lambda c: -c).observe({"text": 1.0, "audio": 2.0})
    with pytest.raises(ModbalanceError, match="rule"):
        ShapleyGradModulator(groups, rule="ogm")


# ------------------------------------------------------------------------------------------
# apply="grad" under SGD == scaling each branch's loss by hand
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attach", [False, True])
def test_grad_mode_sgd_equals_hand_scaled_branches(device, attach):
    model, mod = make(device, "grad")
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    handle = mod.attach(opt) if attach else None
    for step in range(3):
        xt, xa, y = batch(device, step)
        opt.zero_grad()
        ((model(xt, xa) - y) ** 2).mean().backward()
        if attach:
            opt.step()
        else:
            mod.step(opt)
        ref_opt.zero_grad()
        ((ref(xt, xa, scale=K) - y) ** 2).mean().backward()
        ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
    if handle is not None:
        handle.remove()


def test_grad_mode_scales_exactly_and_leaves_others_untouched(device):
    model, mod = make(device, "grad")
    xt, xa, y = batch(device, 0)
    ((model(xt, xa) - y) ** 2).mean().backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.text[0].bias.grad = None  # parameters without a gradient are skipped
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # a step that leaves parameters as they are
    mod.step(opt)
    torch.testing.assert_close(mod.coefficients.cpu(), torch.tensor(K))
    for n, p in model.named_parameters():
        if n == "text.0.bias":
            assert p.grad is None
        elif n.startswith("text"):
            torch.testing.assert_close(p.grad, K[0] * before[n])
        elif n.startswith("audio"):
            torch.testing.assert_close(p.grad, K[1] * before[n])
        else:
            assert torch.equal(p.grad, before[n])


# ------------------------------------------------------------------------------------------
# Adam: apply="update" scales the update exactly, apply="grad" does ~nothing (and warns)
# ------------------------------------------------------------------------------------------


def _one_adam_step(device, apply, weight_decay=0.0):
    model, mod = make(device, apply)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=weight_decay)
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=weight_decay)
    xt, xa, y = batch(device, 0)
    before = params_of(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with mod.attach(opt):
            ((model(xt, xa) - y) ** 2).mean().backward()
            opt.step()
    ((ref(xt, xa) - y) ** 2).mean().backward()
    ref_opt.step()
    return model, deltas(before, model), deltas(before, ref), caught


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_update_mode_under_adam_scales_update_by_k(device, weight_decay):
    model, got, want, caught = _one_adam_step(device, "update", weight_decay)
    assert not caught
    names = [n for n, _ in model.named_parameters()]
    for name, d, r in zip(names, got, want):
        k = K[0] if name.startswith("text") else K[1] if name.startswith("audio") else 1.0
        torch.testing.assert_close(d, k * r, atol=1e-7, rtol=1e-5)
        assert r.abs().max() > 1e-4  # the step is not trivially zero


def test_grad_mode_under_adam_has_no_effect_and_warns(device):
    _, got, want, caught = _one_adam_step(device, "grad")
    assert any("adaptive optimizers" in str(w.message) for w in caught)
    for d, r in zip(got, want):
        torch.testing.assert_close(d, r, atol=1e-6, rtol=1e-3)  # k = 0.3 changed nothing


def test_update_mode_under_sgd_equals_grad_mode(device):
    results = []
    for apply in ("update", "grad"):
        torch.manual_seed(0)  # same initial model
        model, mod = make(device, apply)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        xt, xa, y = batch(device, 0)
        with mod.attach(opt):
            ((model(xt, xa) - y) ** 2).mean().backward()
            opt.step()
        results.append(params_of(model))
    for p, q in zip(*results):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_update_mode_with_k_one_is_identity(device):
    model = TwoBranch().to(device)
    ref = copy.deepcopy(model)
    mod = ShapleyGradModulator({"text": model.text, "audio": model.audio}).to(device)
    opt, ref_opt = (torch.optim.Adam(m.parameters(), lr=1e-2) for m in (model, ref))
    xt, xa, y = batch(device, 0)
    with mod.attach(opt):  # never observed: k = 1
        ((model(xt, xa) - y) ** 2).mean().backward()
        opt.step()
    ((ref(xt, xa) - y) ** 2).mean().backward()
    ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


# ------------------------------------------------------------------------------------------
# hooks and misuse
# ------------------------------------------------------------------------------------------


def _hook_counts(opt):
    return len(opt._optimizer_step_pre_hooks), len(opt._optimizer_step_post_hooks)


def test_no_hooks_remain_after_remove_or_exception():
    model, mod = make("cpu", "update")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = mod.attach(opt)
    assert isinstance(handle, ModulatorHandle) and _hook_counts(opt) == (1, 1)
    with pytest.raises(ModbalanceError, match="already attached"):
        mod.attach(opt)
    handle.remove()
    handle.remove()  # idempotent
    assert _hook_counts(opt) == (0, 0)
    with pytest.raises(RuntimeError, match="inside"):
        with mod.attach(opt):
            assert _hook_counts(opt) == (1, 1)
            raise RuntimeError("inside")
    assert _hook_counts(opt) == (0, 0)
    # an exception inside optimizer.step does not leak hooks once the handle is removed
    with mod.attach(opt):
        xt, xa, y = batch("cpu", 0)
        ((model(xt, xa) - y) ** 2).mean().backward()

        def closure():
            raise RuntimeError("closure")

        with pytest.raises(RuntimeError, match="closure"):
            opt.step(closure)
    assert _hook_counts(opt) == (0, 0)
    before = params_of(model)
    opt.step()  # detached: a plain step
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_step_while_attached_raises_and_hooks_not_doubled():
    model, mod = make("cpu", "grad")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xt, xa, y = batch("cpu", 0)
    with mod.attach(opt):
        ((model(xt, xa) - y) ** 2).mean().backward()
        with pytest.raises(ModbalanceError, match="attached"):
            mod.step(opt)
        opt.step()  # the hooks modulate it
    assert _hook_counts(opt) == (0, 0)
    opt.zero_grad()
    ((model(xt, xa) - y) ** 2).mean().backward()
    mod.step(opt)  # detached again: the plain call works


@pytest.mark.parametrize("apply", ["update", "grad"])
def test_plain_step_equals_attach(device, apply):
    """``modulator.step(optimizer)`` and ``attach`` + ``optimizer.step()`` give the same run."""
    model, mod = make(device, apply)
    twin, twin_mod = copy.deepcopy(model), None
    twin_mod = ShapleyGradModulator(
        {"text": twin.text, "audio": twin.audio}, momentum=0.0, apply=apply
    ).to(device)
    twin_mod.load_state_dict(mod.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # apply="grad" under AdamW warns, as it should
        handle = twin_mod.attach(twin_opt)
        for step in range(3):
            xt, xa, y = batch(device, step)
            for m, o in ((model, opt), (twin, twin_opt)):
                o.zero_grad()
                ((m(xt, xa) - y) ** 2).mean().backward()
            mod.step(opt)
            twin_opt.step()
    handle.remove()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, atol=0, rtol=0)


def test_step_type_error():
    _, mod = make("cpu", "update")
    with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer"):
        mod.step("sgd")


def test_state_dict_round_trip(device):
    model, _ = make(device, "update")
    mod = ShapleyGradModulator({"text": model.text, "audio": model.audio}, momentum=0.5).to(device)
    mod.observe({"text": 0.9, "audio": 0.1})
    mod.observe({"text": 0.5, "audio": 0.4})
    state = mod.state_dict()
    assert set(state) == {"coefficients", "initialized", "shares", "_extra_state"}  # no groups
    fresh = ShapleyGradModulator({"text": model.text, "audio": model.audio}, momentum=0.5)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.coefficients, mod.coefficients.cpu())
    assert torch.equal(fresh.shares, mod.shares.cpu()) and bool(fresh.initialized)
    # continuing from the loaded state gives the same coefficients
    torch.testing.assert_close(
        fresh.observe({"text": 0.2, "audio": 0.2}), mod.observe({"text": 0.2, "audio": 0.2}).cpu()
    )
    assert "ShapleyGradModulator(" in repr(mod) and "apply='update'" in repr(mod)


# ------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------


def test_group_errors():
    model = TwoBranch()
    with pytest.raises(ModbalanceError, match=r"overlap.*'text' and 'both'"):
        ShapleyGradModulator({"text": model.text, "both": model.parameters()})
    with pytest.raises(ModbalanceError, match="`groups\\['audio'\\]` is empty"):
        ShapleyGradModulator({"text": model.text, "audio": []})
    with pytest.raises(ModbalanceError, match="is empty"):
        ShapleyGradModulator({"text": model.text, "audio": nn.ReLU()})
    gen = model.audio.parameters()
    list(gen)
    with pytest.raises(ModbalanceError, match="already consumed"):
        ShapleyGradModulator({"text": model.text, "audio": gen})
    with pytest.raises(ModbalanceError, match="at least 2 modalities"):
        ShapleyGradModulator({"text": model.text})
    with pytest.raises(TypeError, match="mapping"):
        ShapleyGradModulator([model.text, model.audio])
    with pytest.raises(TypeError, match=r"nn\.Module or an iterable"):
        ShapleyGradModulator({"text": model.text, "audio": 3})
    with pytest.raises(TypeError, match="must contain tensors"):
        ShapleyGradModulator({"text": model.text, "audio": ["w"]})
    with pytest.raises(ModbalanceError, match="apply"):
        ShapleyGradModulator({"text": model.text, "audio": model.audio}, apply="lr")
    with pytest.raises(ModbalanceError, match="momentum"):
        ShapleyGradModulator({"text": model.text, "audio": model.audio}, momentum=1.0)
    with pytest.raises(ModbalanceError, match="min_coefficient"):
        ShapleyGradModulator({"text": model.text, "audio": model.audio}, min_coefficient=1.5)
    # the same parameter twice inside one group is fine
    mod = ShapleyGradModulator({"text": [model.text[0].weight] * 2, "audio": model.audio})
    assert len(mod._group_params[0]) == 1


def test_observe_errors():
    model = TwoBranch()
    mod = ShapleyGradModulator({"text": model.text, "audio": model.audio})
    with pytest.raises(ModbalanceError, match="has unknown modality 'video'"):
        mod.observe({"text": 1.0, "audio": 1.0, "video": 1.0})
    with pytest.raises(ModbalanceError, match="is missing modality 'audio'"):
        mod.observe({"text": 1.0})
    with pytest.raises(ModbalanceError, match="finite"):
        mod.observe({"text": float("nan"), "audio": 1.0})
    with pytest.raises(ModbalanceError, match="finite"):
        mod.observe({"text": 1.0, "audio": float("inf")})
    with pytest.raises(TypeError, match="bare tensor is refused"):
        mod.observe(torch.ones(2))
    with pytest.raises(TypeError, match="without modality names"):
        mod.observe(ShapleyResult(torch.ones(2), torch.zeros(2), 4))
    with pytest.raises(ModbalanceError, match="one value"):
        mod.observe({"text": torch.ones(2), "audio": 1.0})
    with pytest.raises(TypeError, match="mapping"):
        mod.observe([1.0, 2.0])
    assert not mod.initialized  # nothing was recorded
    with value_checks(False):  # the finiteness check is a value check
        mod.observe({"text": 1.0, "audio": float("nan")})


def test_attach_type_error():
    _, mod = make("cpu", "update")
    with pytest.raises(TypeError, match="Optimizer"):
        mod.attach(object())


# ------------------------------------------------------------------------------------------
# OGM-GE
# ------------------------------------------------------------------------------------------


def original_ogm(score_a, score_v, alpha):
    """The released two-modality code (GeWu-Lab/OGM-GE_CVPR2022, main.py), transcribed."""
    ratio_v = score_v / score_a
    ratio_a = 1 / ratio_v
    if ratio_v > 1:
        return 1.0, 1 - math.tanh(alpha * max(ratio_v, 0.0))
    return 1 - math.tanh(alpha * max(ratio_a, 0.0)), 1.0


@pytest.mark.parametrize(("sa", "sv"), [(30.0, 10.0), (10.0, 30.0), (12.0, 11.0), (5.0, 5.0)])
@pytest.mark.parametrize("alpha", [0.1, 0.8])
def test_ogmge_matches_original_two_modality_formula(sa, sv, alpha):
    k = ogmge_coefficients(torch.tensor([sa, sv], dtype=torch.float64), alpha, continuous=False)
    expected = original_ogm(sa, sv, alpha)  # ties too: the else branch damps audio
    torch.testing.assert_close(k, torch.tensor(expected, dtype=torch.float64))
    # continuous form: rho - 1
    kc = ogmge_coefficients(torch.tensor([sa, sv], dtype=torch.float64), alpha)
    rho = torch.tensor([sa / sv, sv / sa], dtype=torch.float64)
    torch.testing.assert_close(kc, 1 - torch.tanh(alpha * torch.relu(rho - 1)))


def test_ogmge_three_modalities_hand_computation():
    s = torch.tensor([6.0, 2.0, 4.0], dtype=torch.float64)
    rho = torch.tensor([6 / 3, 2 / 5, 4 / 4], dtype=torch.float64)
    expected = torch.tensor([1 - math.tanh(0.5 * (rho[0] - 1)), 1.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(ogmge_coefficients(s, 0.5), expected)
    model = nn.ModuleDict({n: nn.Linear(2, 2) for n in "atv"})
    mod = OGMGEModulator({n: model[n] for n in "atv"}, alpha=0.5)
    torch.testing.assert_close(mod.observe(dict(zip("atv", s))).double(), expected)
    torch.testing.assert_close(mod.ratio.double(), rho)


def test_ogmge_errors():
    model = nn.ModuleDict({n: nn.Linear(2, 2) for n in "av"})
    mod = OGMGEModulator({"a": model["a"], "v": model["v"]})
    with pytest.raises(ModbalanceError, match="positive"):
        mod.observe({"a": 1.0, "v": 0.0})
    with pytest.raises(ModbalanceError, match="unknown"):
        mod.observe({"a": 1.0, "v": 1.0, "t": 1.0})
    with pytest.raises(ModbalanceError, match="at least 2"):
        ogmge_coefficients(torch.ones(1))
    with pytest.raises(ModbalanceError, match="alpha"):
        OGMGEModulator({"a": model["a"], "v": model["v"]}, alpha=-1.0)
    with pytest.raises(TypeError, match="generator"):
        OGMGEModulator({"a": model["a"], "v": model["v"]}, noise=True, generator=1)


def test_ogmge_grad_mode_with_noise(device):
    enc = nn.ModuleDict({"a": nn.Linear(200, 50), "v": nn.Linear(200, 50)}).to(device)

    def run(seed):
        mod = OGMGEModulator(
            {"a": enc["a"], "v": enc["v"]},
            alpha=1.0,
            apply="grad",
            noise=True,
            generator=torch.Generator().manual_seed(seed),
        ).to(device)
        k = mod.observe({"a": 3.0, "v": 1.0})
        for n, p in enc.named_parameters():
            p.grad = torch.linspace(-1, 1, p.numel(), device=device).view_as(p) * (1 + len(n))
        mod.step(torch.optim.SGD(enc.parameters(), lr=0.0))  # the gradients are what we check
        return k, {n: p.grad.clone() for n, p in enc.named_parameters()}

    k, g1 = run(0)
    _, g2 = run(0)
    _, g3 = run(1)
    assert all(torch.equal(g1[n], g2[n]) for n in g1)  # reproducible from the generator
    assert not torch.equal(g1["a.weight"], g3["a.weight"])
    base = torch.linspace(-1, 1, 50 * 200, device=device).view(50, 200) * (1 + len("a.weight"))
    noise = g1["a.weight"] - k[0] * base
    torch.testing.assert_close(noise.std(), base.std(), rtol=0.05, atol=0)  # std of unmodulated g
    assert abs(float(noise.mean())) < 0.05 * float(base.std())


def test_ogmge_update_mode_scales_update(device):
    model = TwoBranch().to(device)
    ref = copy.deepcopy(model)
    mod = OGMGEModulator({"text": model.text, "audio": model.audio}, alpha=1.0).to(device)
    k = mod.observe({"text": 4.0, "audio": 1.0}).cpu()
    assert k[0] < 1 and k[1] == 1
    opt, ref_opt = (torch.optim.Adam(m.parameters(), lr=1e-2) for m in (model, ref))
    xt, xa, y = batch(device, 0)
    before = params_of(model)
    with mod.attach(opt):
        ((model(xt, xa) - y) ** 2).mean().backward()
        opt.step()
    ((ref(xt, xa) - y) ** 2).mean().backward()
    ref_opt.step()
    for (name, _), d, r in zip(
        model.named_parameters(), deltas(before, model), deltas(before, ref)
    ):
        scale = float(k[0]) if name.startswith("text") else 1.0
        torch.testing.assert_close(d, scale * r, atol=1e-7, rtol=1e-5)
    assert set(mod.state_dict()) == {"coefficients", "initialized", "ratio", "_extra_state"}


# ------------------------------------------------------------------------------------------
# GPU: no host synchronisation on the training path
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("apply", ["grad", "update"])
def test_no_host_sync_on_cuda(device, apply):
    if device.type != "cuda":
        pytest.skip("needs CUDA")
    model, mod = make(device, apply)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True, capturable=True)
    xt, xa, y = batch(device, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mod.attach(opt):
            ((model(xt, xa) - y) ** 2).mean().backward()
            opt.step()  # warm-up (state init)
            opt.zero_grad()
            ((model(xt, xa) - y) ** 2).mean().backward()
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")


# ------------------------------------------------------------------------------------------
# inputs by name, never by position (issue: swapped player order)
# ------------------------------------------------------------------------------------------


def _swapped_game():
    """A game whose player order ("b", "a") differs from the groups' order ("a", "b")."""

    def head(features, present):  # b is dominant: it carries 4x the signal of a
        return 4.0 * features["b"][:, 0] * present["b"] + features["a"][:, 0] * present["a"]

    game = ModalityGame(head, ["b", "a"], masking="present", value="neg_mae")
    x = torch.linspace(-1, 1, 32).view(-1, 1)
    return game({"b": x, "a": x}, 5.0 * x[:, 0])


def test_swapped_player_order_slows_the_dominant_modality():
    res = _swapped_game()
    assert res.modalities == ("b", "a") and res.shapley[0] > res.shapley[1]
    mod = ShapleyGradModulator({"a": nn.Linear(1, 1), "b": nn.Linear(1, 1)}, momentum=0.0)
    k = mod.observe(res)
    coef = dict(zip(mod.modalities, mod.coefficients.tolist()))
    assert coef["a"] == pytest.approx(1.0) and coef["b"] < 1.0  # the dominant one is slowed
    expected = pase_coefficients(torch.stack([res.shapley[1], res.shapley[0]]))
    torch.testing.assert_close(k, expected)
    # the same through a ShapleyResult with player names, and through a mapping
    table = res.table
    sv = shapley_values(
        lambda masks: table[(masks.long() * torch.tensor([1, 2])).sum(1)], 2, modalities=("b", "a")
    )
    torch.testing.assert_close(mod.observe(sv), expected)
    torch.testing.assert_close(mod.observe(dict(zip(res.modalities, res.shapley))), expected)
    with pytest.raises(TypeError, match="bare tensor"):
        mod.observe(res.shapley)


def test_ogm_observe_game_result_by_name():
    res = _swapped_game()
    ogm = OGMGEModulator({"a": nn.Linear(1, 1), "b": nn.Linear(1, 1)}, alpha=0.5)
    ogm.observe(res)
    coef = dict(zip(ogm.modalities, ogm.coefficients.tolist()))
    assert coef["a"] == pytest.approx(1.0) and coef["b"] < 1.0
    scores = OGMGEModulator.game_scores(res)
    assert set(scores) == {"a", "b"}
    torch.testing.assert_close(scores["b"], torch.exp(res.table[1] - res.table[0]))


def _step_output(task, target, unimodal, game=None, step=0):
    feats = {m: torch.zeros(target.shape[0], 2) for m in unimodal}
    present = {m: torch.ones(target.shape[0], dtype=torch.bool) for m in unimodal}
    return StepOutput(feats, unimodal, None, present, target, task, game=game, step=step)


def test_ogm_signal_from_unimodal_predictions():
    mod = OGMGEModulator({"audio": nn.Linear(1, 1), "video": nn.Linear(1, 1)}, alpha=0.5)
    y = torch.tensor([0, 1, 1])
    logits = {
        "audio": torch.tensor([[3.0, 0.0], [0.0, 3.0], [0.0, 3.0]]),
        "video": torch.zeros(3, 2),
    }
    s = mod.signal(_step_output("classification", y, logits))
    p = torch.softmax(torch.tensor([3.0, 0.0]), 0)[0]
    torch.testing.assert_close(s["audio"], 3 * p)  # summed true-class probability
    torch.testing.assert_close(s["video"], torch.tensor(1.5))
    yr = torch.tensor([1.0, -1.0])
    preds = {"audio": torch.tensor([1.0, -1.0]), "video": torch.tensor([0.0, 0.0])}
    s = mod.signal(_step_output("regression", yr, preds))
    torch.testing.assert_close(s["audio"], torch.tensor(1.0))
    torch.testing.assert_close(s["video"], torch.exp(torch.tensor(-1.0)))
    with pytest.raises(ModbalanceError, match=r"needs StepOutput\.game"):
        OGMGEModulator({"a": nn.Linear(1, 1), "b": nn.Linear(1, 1)}, source="game").signal(
            _step_output("regression", yr, {"a": yr, "b": yr})
        )


def test_around_step_observes_every_k_steps_and_modulates():
    model = TwoBranch()
    res = _swapped_game()
    game = GameResult(res.table, res.shapley, res.interactions, ("audio", "text"))
    mod = ShapleyGradModulator(
        {"text": model.text, "audio": model.audio}, momentum=0.0, game_every=2
    )
    assert mod.needs_game
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xt, xa, y = batch("cpu", 0)
    ((model(xt, xa) - y) ** 2).mean().backward()
    before = params_of(model)
    with mod.around_step(_step_output("regression", y, {"text": y, "audio": y}, game, 1), opt):
        opt.step()
    assert not mod.initialized  # step 1 is not a multiple of game_every=2: no observation
    with mod.around_step(_step_output("regression", y, {"text": y, "audio": y}, game, 2), opt):
        opt.step()
    assert mod.initialized and mod.summary()["coefficient_audio"] < 1.0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(ModbalanceError, match="needs the batch's Shapley game"):
        mod.signal(_step_output("regression", y, {"text": y, "audio": y}))


# ------------------------------------------------------------------------------------------
# OGM-GE parity with the released two-modality rule, ties and near-ties
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.1, 0.5])
def test_ogm_discrete_matches_released_code_on_ties_and_near_ties(alpha):
    g = torch.Generator().manual_seed(0)
    base = torch.rand(200, generator=g, dtype=torch.float64) * 10 + 0.1
    pairs = [(float(b), float(b)) for b in base[:20]]  # exact ties: the first is damped
    up = torch.nextafter(base, torch.full_like(base, math.inf))
    up2 = torch.nextafter(up, torch.full_like(base, math.inf))
    for x, y1, y2 in zip(base.tolist(), up.tolist(), up2.tolist()):  # 1 and 2 ULPs apart
        pairs += [(x, y1), (y1, x), (x, y2), (y2, x)]
    scores = torch.tensor(pairs, dtype=torch.float64)
    k = ogmge_coefficients(scores, alpha, continuous=False)
    expected = torch.tensor([original_ogm(a, v, alpha) for a, v in pairs], dtype=torch.float64)
    torch.testing.assert_close(k, expected, atol=0, rtol=0)
    tie = ogmge_coefficients(torch.tensor([2.0, 2.0]), alpha, continuous=False)
    assert tie[0] < 1.0 and tie[1] == 1.0


def test_ogm_discrete_three_modalities_tie_damps_first():
    k = ogmge_coefficients(torch.tensor([1.0, 1.0, 1.0]), 0.5, continuous=False)
    torch.testing.assert_close(k, torch.tensor([1 - math.tanh(0.5), 1.0, 1.0]))


@pytest.mark.parametrize(
    "fn", [pase_shares, pase_coefficients, lambda x: ogmge_coefficients(x, 0.1)]
)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_rules_reject_non_finite(fn, bad):
    with pytest.raises(ModbalanceError, match="finite"):
        fn(torch.tensor([1.0, bad]))


@pytest.mark.parametrize("fn", [pase_shares, pase_coefficients, ogmge_coefficients])
def test_rules_reject_0d(fn):
    with pytest.raises(ModbalanceError, match="0-d"):
        fn(torch.tensor(1.0))


@pytest.mark.parametrize("bad", [[0.0, 1.0], [-1.0, 2.0]])
def test_ogm_rejects_non_positive_scores(bad):
    with pytest.raises(ModbalanceError, match="must be positive"):
        ogmge_coefficients(torch.tensor(bad))


def test_shares_do_not_overflow():
    torch.testing.assert_close(
        pase_shares(torch.tensor([3e38, 3e38], dtype=torch.float32)), torch.tensor([0.5, 0.5])
    )
