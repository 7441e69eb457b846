"""`Decision`: every rule against a hand computation, gradients, state, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modbalance import Decision, ModbalanceError

MODS = ("text", "audio", "vision")


def _inputs(n=5, c=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    fused = torch.randn(n, c, generator=g) if c > 1 else torch.randn(n, generator=g)
    uni = {m: torch.randn(fused.shape, generator=g) for m in MODS}
    present = {m: torch.ones(n, dtype=torch.bool) for m in MODS}
    present["audio"][0] = False
    return fused, uni, present


def test_auto_is_residual_for_classification_and_head_for_regression():
    assert Decision(MODS, "classification").rule == "residual"
    assert Decision(MODS, "regression").rule == "head"


def test_head_returns_the_fused_output_unchanged():
    fused, uni, present = _inputs()
    assert Decision(MODS, "regression", rule="head")(fused, uni, present) is fused


@pytest.mark.parametrize("rule", ["residual", "ensemble"])
def test_average_of_the_present_sources(rule):
    fused, uni, present = _inputs(c=4)
    out = Decision(MODS, "classification", rule=rule, num_outputs=4)(fused, uni, present)
    for i in range(fused.shape[0]):
        srcs = [fused[i]] + [uni[m][i] for m in MODS if present[m][i]]
        torch.testing.assert_close(out[i], torch.stack(srcs).mean(0))


def test_absent_non_finite_outputs_do_not_leak():
    fused, uni, present = _inputs()
    uni["audio"][0] = float("nan")  # sample 0 has no audio
    out = Decision(MODS, "regression", rule="residual")(fused, uni, present)
    assert torch.isfinite(out).all()


def test_gradient_reaches_unimodal_outputs_only_for_ensemble():
    for rule, reaches in (("residual", False), ("ensemble", True), ("stack", False)):
        fused, uni, present = _inputs()
        fused.requires_grad_(True)
        for u in uni.values():
            u.requires_grad_(True)
        dec = Decision(MODS, "regression", rule=rule)
        out = dec(fused, uni, present).sum()
        grads = torch.autograd.grad(out, [fused, uni["text"]], allow_unused=True)
        assert grads[0] is not None and grads[0].abs().sum() > 0
        assert (grads[1] is not None and grads[1].abs().sum() > 0) == reaches, rule


def test_stack_weights_are_learned_and_convex():
    fused, uni, present = _inputs()
    dec = Decision(MODS, "regression", rule="stack")
    w = dec.weights(fused, uni, present)
    torch.testing.assert_close(w.sum(1), torch.ones(5))
    assert w[0, 2] == 0  # absent audio
    (g,) = torch.autograd.grad(dec(fused, uni, present).square().sum(), [dec.logits])
    assert g.abs().sum() > 0


def test_gate_starts_at_the_head_prior_and_learns_per_sample():
    fused, uni, present = _inputs(n=6)
    dec = Decision(MODS, "regression", rule="gate", head_prior=0.9)
    w = dec.weights(fused, uni, present)
    torch.testing.assert_close(w[1:, 0], torch.full((5,), 0.9))  # every modality present
    assert w[0, 2] == 0 and w[0, 0] > 0.9  # absent audio: its weight goes elsewhere
    target = uni["vision"]  # the vision head is right: the gate should learn to use it
    opt = torch.optim.Adam(dec.parameters(), lr=0.1)
    for _ in range(100):
        opt.zero_grad()
        (dec(fused, uni, present) - target).abs().mean().backward()
        opt.step()
    w = dec.weights(fused, uni, present)
    assert w[:, 3].min() > 0.8
    assert (dec(fused, uni, present) - target).abs().mean() < 0.2 * (fused - target).abs().mean()


def test_precision_weights_follow_running_errors():
    fused, uni, present = _inputs(n=64)
    target = uni["text"] + 0.1 * torch.randn(64)  # text is precise, the others are noise
    dec = Decision(MODS, "regression", rule="precision", momentum=0.0)
    torch.testing.assert_close(dec.weights(fused, uni, present)[1], torch.full((4,), 0.25))
    dec.observe(fused, uni, present, target)
    mse = {"head": (fused - target).square().mean()}
    mse |= {m: (uni[m] - target)[present[m]].square().mean() for m in MODS}
    pi = torch.stack([1 / mse[k] for k in ("head", *MODS)])
    torch.testing.assert_close(dec.weights(fused, uni, present)[1], pi / pi.sum())
    assert dec.weights(fused, uni, present)[1, 1] > 0.9
    state = dec.state_dict()
    fresh = Decision(MODS, "regression", rule="precision")
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh(fused, uni, present), dec(fused, uni, present))
    # other rules ignore observe
    Decision(MODS, "regression", rule="residual").observe(fused, uni, present, target)


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(["residual", "stack", "gate", "precision"]), st.integers(0, 10_000))
def test_prediction_is_a_convex_combination_of_the_sources(rule, seed):
    fused, uni, present = _inputs(n=7, seed=seed)
    out = Decision(MODS, "regression", rule=rule)(fused, uni, present)
    srcs = torch.stack([fused, *uni.values()], 1)
    assert (out <= srcs.max(1).values + 1e-5).all() and (out >= srcs.min(1).values - 1e-5).all()


def test_errors():
    fused, uni, present = _inputs()
    with pytest.raises(ModbalanceError, match="rule"):
        Decision(MODS, "regression", rule="median")
    with pytest.raises(ModbalanceError, match="rule='precision' weights regressors"):
        Decision(MODS, "classification", rule="precision")
    with pytest.raises(ModbalanceError, match="head_prior"):
        Decision(MODS, "regression", rule="gate", head_prior=1.0)
    with pytest.raises(ModbalanceError, match="task"):
        Decision(MODS, "ranking")
    with pytest.raises(TypeError, match="sequence of modality names"):
        Decision("text", "regression")
    dec = Decision(MODS, "regression", rule="residual")
    with pytest.raises(ModbalanceError, match="'vision' is missing"):
        dec(fused, {m: uni[m] for m in ("text", "audio")}, present)
    with pytest.raises(ModbalanceError, match=r"`unimodal\['text'\]` has shape \(5, 2\)"):
        dec(fused, {**uni, "text": torch.zeros(5, 2)}, present)
