"""State knows its modalities: names stored with the state, mismatches and poisoned values refused.

Every registered method (and the model's per-modality modules) is built twice, with the same
modalities in two orders and with other names. Input dimensions are equal so that every tensor
has the same shape in both builds: without the stored names the state would load silently and
swap the per-modality values.
"""

from __future__ import annotations

import math

import pytest
import torch

from examples.pase import METHODS, PAPER_SWITCHES, PaSEConfig, build
from modbalance import (
    Decision,
    ModalityGame,
    ModbalanceError,
    PrototypeGatedFusion,
    ShapleyEquilibrium,
    ShapleyGradModulator,
    UnimodalLoss,
)
from modbalance._state import _decode

ORDER = ("text", "audio", "vision")
SWAPPED = ("audio", "text", "vision")
OTHER = ("text", "audio", "pose")


def _parts(names, method, **switches):
    cfg = PaSEConfig(
        modalities=names, input_dims=dict.fromkeys(names, 6), dim=8, heads=2, **switches
    )
    torch.manual_seed(0)
    return build(cfg, methods=[method])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_state_refuses_other_order_and_other_names(method):
    saved = _parts(ORDER, method)
    state = saved.methods[0].state_dict()
    assert _decode(state["_extra_state"], "", "")["modalities"] == list(ORDER)
    for names, word in ((SWAPPED, "swap them"), (OTHER, "give them to other names")):
        target = _parts(names, method).methods[0]
        before = {k: v.clone() for k, v in target.state_dict().items() if torch.is_tensor(v)}
        with pytest.raises(ModbalanceError, match=rf"saved with modalities .*{word}"):
            target.load_state_dict(state)
        after = target.state_dict()
        for k, v in before.items():  # refused before anything was copied
            torch.testing.assert_close(after[k], v, rtol=0, atol=0, equal_nan=True, msg=k)
    same = _parts(ORDER, method).methods[0]
    same.load_state_dict(state)
    for k, v in state.items():
        if torch.is_tensor(v):
            torch.testing.assert_close(same.state_dict()[k], v, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("switches", [{}, PAPER_SWITCHES], ids=["default", "paper"])
def test_model_state_refuses_swapped_modalities(switches):
    saved = _parts(ORDER, "sge", **switches).model.state_dict()
    assert any(k.endswith("_extra_state") for k in saved)
    target = _parts(SWAPPED, "sge", **switches).model
    with pytest.raises(ModbalanceError, match=r"saved with modalities \['text', 'audio'"):
        target.load_state_dict(saved)
    _parts(ORDER, "sge", **switches).model.load_state_dict(saved)  # same names and order


def test_state_saved_without_names_still_loads():
    eq = ShapleyEquilibrium(ORDER)
    with torch.no_grad():
        eq.shares.copy_(torch.tensor([0.5, 0.3, 0.2]))
    state = eq.state_dict()
    del state["_extra_state"]
    fresh = ShapleyEquilibrium(ORDER)
    fresh.load_state_dict(state)  # strict: the missing names are not an error
    assert torch.equal(fresh.shares, torch.tensor([0.5, 0.3, 0.2]))


def _modulator(names=ORDER):
    groups = {m: [torch.nn.Parameter(torch.zeros(2))] for m in names}
    return ShapleyGradModulator(groups)


@pytest.mark.parametrize(
    ("make", "buffer", "value", "pattern"),
    [
        (_modulator, "coefficients", math.nan, "`coefficients` holds NaN"),
        (_modulator, "coefficients", -0.5, r"`coefficients` must be >= 0"),
        (lambda: ShapleyEquilibrium(ORDER), "shares", math.inf, "`shares` holds NaN or inf"),
        (lambda: ShapleyEquilibrium(ORDER), "unimodal_loss", -1.0, "`unimodal_loss` must be"),
        (lambda: UnimodalLoss(ORDER), "coefficients", -1.0, "`coefficients` must be >= 0"),
        (
            lambda: Decision(ORDER, "regression", rule="precision"),
            "sq_error",
            0.0,
            r"`sq_error` must be > 0",
        ),
        (
            lambda: Decision(ORDER, "classification", rule="stack", num_outputs=3),
            "logits",
            math.nan,
            "`logits` holds NaN",
        ),
    ],
)
def test_poisoned_state_is_refused_before_loading(make, buffer, value, pattern):
    module = make()
    state = module.state_dict()
    state[buffer] = state[buffer].clone()
    state[buffer][0] = value
    before = module.state_dict()[buffer].clone()
    with pytest.raises(ModbalanceError, match=pattern):
        module.load_state_dict(state)
    assert torch.equal(module.state_dict()[buffer], before)


def test_fusion_state_refuses_other_names():
    fusion = PrototypeGatedFusion(ORDER, dim=4)
    other = PrototypeGatedFusion(OTHER, dim=4)
    with pytest.raises(ModbalanceError, match="modalities=\\['text', 'audio', 'vision'\\]"):
        other.load_state_dict(fusion.state_dict())


def test_extra_state_of_another_kind_is_refused():
    eq = ShapleyEquilibrium(ORDER)
    state = eq.state_dict()
    for bad in (
        ["text", "audio", "vision"],
        torch.tensor([1.0, 2.0]),
        torch.tensor([91], dtype=torch.uint8),
    ):
        state["_extra_state"] = bad
        with pytest.raises(ModbalanceError, match="`_extra_state` is not what this module saved"):
            eq.load_state_dict(state)


def test_every_entry_of_a_state_dict_stays_a_tensor():
    """The common snapshot idiom keeps working, and ``weights_only`` loading reads the names."""
    import io

    model = _parts(ORDER, "ogm-ge").model
    snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
    buffer = io.BytesIO()
    torch.save(snapshot, buffer)
    buffer.seek(0)
    _parts(ORDER, "ogm-ge").model.load_state_dict(torch.load(buffer, weights_only=True))


def test_game_state_knows_its_modalities():
    head = torch.nn.Linear(4, 1)
    game = ModalityGame(head, ORDER)
    state = game.state_dict()
    assert state["modalities"] == list(ORDER)
    with pytest.raises(ModbalanceError, match="saved with modalities"):
        ModalityGame(head, SWAPPED).load_state_dict(state)
    old = {"generator": state["generator"]}  # saved before the names were stored
    ModalityGame(head, SWAPPED).load_state_dict(old)


def test_generator_state_travels_with_the_method():
    """OGM-GE's noise generator is part of its state: a resumed run draws the same noise."""
    from modbalance import OGMGEModulator

    def make():
        groups = {m: [torch.nn.Parameter(torch.zeros(2))] for m in ORDER}
        return OGMGEModulator(groups, generator=torch.Generator().manual_seed(3))

    a = make()
    a._generator.manual_seed(11)
    state = a.state_dict()
    expected = torch.randn(4, generator=a._generator)
    b = make()
    b.load_state_dict(state)
    assert torch.equal(torch.randn(4, generator=b._generator), expected)


# ----------------------------------------------------------------------------------------------
# silent no-ops: an optimizer that does not hold the groups, MMPareto under a plain backward
# ----------------------------------------------------------------------------------------------


def _encoders():
    torch.manual_seed(0)
    return torch.nn.ModuleDict({m: torch.nn.Linear(3, 2) for m in ("text", "audio")})


def _step_output(enc, phase=2):
    from modbalance import StepOutput

    x, y = torch.randn(6, 3), torch.tensor([0, 1, 0, 1, 1, 0])
    feats = {m: enc[m](x) for m in enc}
    return StepOutput(
        features=feats,
        unimodal=feats,
        fused=sum(feats.values()),
        present={m: torch.ones(6, dtype=torch.bool) for m in enc},
        target=y,
        task="classification",
        phase=phase,
    )


@pytest.mark.parametrize("apply", ["update", "grad"])
def test_modulator_refuses_an_optimizer_without_its_groups(apply):
    enc = _encoders()
    mod = ShapleyGradModulator(dict(enc), apply=apply)
    elsewhere = torch.optim.SGD(enc["text"].parameters(), lr=0.1)  # no 'audio' parameter
    _step_output(enc).fused.sum().backward()
    with pytest.raises(ModbalanceError, match="optimizer updates no parameter of the 'audio'"):
        mod.step(elsewhere)
    with pytest.raises(ModbalanceError, match="optimizer updates no parameter of the 'audio'"):
        mod.attach(elsewhere)
    assert mod._handle is None  # nothing was registered
    mod.step(torch.optim.SGD(enc.parameters(), lr=0.1))  # the right optimizer works


def test_cggm_and_inforeg_refuse_an_optimizer_without_their_groups():
    from modbalance import CGGM, InfoReg

    enc = _encoders()
    elsewhere = torch.optim.SGD(enc["audio"].parameters(), lr=0.1)
    cggm = CGGM(dict(enc), {m: torch.nn.Linear(2, 2) for m in enc}, lam=0.0)
    out = _step_output(enc)
    cggm.losses(out, {})
    with pytest.raises(
        ModbalanceError, match="CGGM: the optimizer updates no parameter of the 'text'"
    ):
        with cggm.around_step(out, elsewhere):
            pass
    reg = InfoReg(dict(enc))
    out = _step_output(enc)
    reg.losses(out, {})
    out.fused.sum().backward()
    with pytest.raises(ModbalanceError, match="InfoReg: the optimizer updates no parameter"):
        with reg.around_step(out, elsewhere):
            pass


def test_a_frozen_group_is_not_an_error():
    enc = _encoders()
    for p in enc["audio"].parameters():
        p.requires_grad_(False)
    mod = ShapleyGradModulator(dict(enc))
    _step_output(enc).fused.sum().backward()
    mod.step(torch.optim.SGD(enc["text"].parameters(), lr=0.1))  # audio is frozen: nothing lost


def test_mmpareto_refuses_a_plain_backward():
    from modbalance import MMPareto, balanced_step, combine_losses

    enc = _encoders()
    method = MMPareto(dict(enc))
    opt = torch.optim.SGD(enc.parameters(), lr=0.1)
    out = _step_output(enc)
    losses = method.losses(out, {"task": torch.nn.functional.cross_entropy(out.fused, out.target)})
    combine_losses(losses).backward()  # the plain backward: MMPareto never sees the gradients
    with pytest.raises(ModbalanceError, match=r"MMPareto.backward\(\) did not run .*balanced_step"):
        with method.around_step(out, opt):
            opt.step()
    out = _step_output(enc)
    task = torch.nn.functional.cross_entropy(out.fused, out.target)
    terms = balanced_step(out, {"task": task}, [method], opt)  # the method's own backward: fine
    assert "unimodal_audio" in terms
    out = _step_output(enc, phase=1)  # outside its phases MMPareto does nothing, by design
    with method.around_step(out, opt):
        pass
