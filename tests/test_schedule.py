import math

import pytest

from modbalance._checks import ModbalanceError
from modbalance.schedule import DualPhaseSchedule


def test_fixed_switch_epoch():
    s = DualPhaseSchedule(switch_epoch=3)
    phases = [s.phase]
    for _ in range(5):
        phases.append(s.epoch_end())
    assert phases == [1, 1, 1, 2, 2, 2]
    assert s.switched_at == 3


def test_switch_epoch_zero_starts_in_phase_two():
    s = DualPhaseSchedule(switch_epoch=0)
    assert s.phase == 2 and s.switched_at == 0


@pytest.mark.parametrize(
    ("mode", "values", "switched"),
    [
        ("max", [0.1, 0.2, 0.2, 0.15, 0.3], 4),  # two epochs without improvement after 0.2
        ("min", [1.0, 0.9, 0.95, 0.91, 0.5], 4),
        ("max", [0.1, 0.2, 0.3, 0.4, 0.5], None),  # always improving: no plateau switch
    ],
)
def test_plateau_switch(mode, values, switched):
    s = DualPhaseSchedule(switch_epoch=None, patience=2, mode=mode)
    for v in values:
        s.epoch_end(v)
    assert s.switched_at == switched


def test_min_delta_and_min_phase1_epochs():
    s = DualPhaseSchedule(switch_epoch=None, patience=1, min_delta=0.05, min_phase1_epochs=3)
    s.epoch_end(0.5)
    s.epoch_end(0.52)  # not an improvement beyond min_delta, but min_phase1_epochs=3 holds
    assert s.phase == 1
    s.epoch_end(0.53)
    assert s.phase == 2 and s.switched_at == 3


def test_plateau_or_fixed_whichever_first():
    s = DualPhaseSchedule(switch_epoch=2, patience=5)
    s.epoch_end(0.1)
    s.epoch_end(0.2)
    assert s.switched_at == 2


def test_state_dict_round_trip():
    s = DualPhaseSchedule(switch_epoch=10, patience=2)
    for v in [0.3, 0.2]:
        s.epoch_end(v)
    t = DualPhaseSchedule(switch_epoch=10, patience=2)
    t.load_state_dict(s.state_dict())
    assert t.state_dict() == s.state_dict()
    assert s.epoch_end(0.1) == t.epoch_end(0.1) == 2


def test_errors():
    with pytest.raises(ModbalanceError, match="`switch_epoch` and `patience` are both None"):
        DualPhaseSchedule(switch_epoch=None, patience=None)
    with pytest.raises(ModbalanceError, match=r"`patience` must be >= 1, got 0"):
        DualPhaseSchedule(patience=0)
    with pytest.raises(ModbalanceError, match=r"`mode` must be one of 'max', 'min'; got 'up'"):
        DualPhaseSchedule(mode="up")
    s = DualPhaseSchedule(switch_epoch=None, patience=1)
    with pytest.raises(ModbalanceError, match="`metric` is required"):
        s.epoch_end()
    with pytest.raises(ModbalanceError, match="`metric` must be finite, got nan"):
        s.epoch_end(math.nan)
    with pytest.raises(ModbalanceError, match="missing key"):
        s.load_state_dict({"epoch": 1})


# ------------------------------------------------------------------------------------------
# the warm-up rules: what each phase trains, selection, what epoch_end is fed
# ------------------------------------------------------------------------------------------


def _step_output(phase, fused=True):
    import torch

    from modbalance import StepOutput

    torch.manual_seed(0)
    y = torch.randn(6)
    uni = {m: torch.randn(6, requires_grad=True) for m in ("text", "audio")}
    present = {"text": torch.ones(6, dtype=torch.bool), "audio": torch.arange(6) < 3}
    f = torch.randn(6, requires_grad=True) if fused else None
    return StepOutput({}, uni, f, present, y, "regression", phase=phase)


def test_base_losses_train_each_encoder_in_phase_1_and_the_fusion_in_phase_2():
    schedule = DualPhaseSchedule(switch_epoch=1)
    assert schedule.phase == 1 and not schedule.runs_fusion
    out = _step_output(1, fused=False)
    terms = schedule.base_losses(out)
    text = (out.unimodal["text"] - out.target).abs().mean()
    audio = (out.unimodal["audio"] - out.target).abs()[:3].mean()  # only the samples present
    assert set(terms) == {"unimodal"}
    assert abs(float(terms["unimodal"].detach()) - float((text + audio).detach() / 2)) < 1e-6
    schedule.epoch_end(0.5)
    assert schedule.phase == 2 and schedule.runs_fusion
    out = _step_output(2)
    terms = schedule.base_losses(out)
    assert set(terms) == {"task"}
    assert (
        abs(float(terms["task"].detach()) - float((out.fused - out.target).abs().mean().detach()))
        < 1e-6
    )
    with pytest.raises(ModbalanceError, match=r"`out\.fused` is None"):
        schedule.base_losses(_step_output(2, fused=False))
    with pytest.raises(ModbalanceError, match=r"`out\.unimodal` is empty"):
        schedule.base_losses(_step_output(1)._replace(unimodal={}))


def test_selection_starts_in_phase_2_only():
    schedule = DualPhaseSchedule(switch_epoch=2, mode="min")
    assert not schedule.select(0.1)  # warm-up: never selected, however good
    schedule.epoch_end({"text": 0.4, "audio": 0.8})
    assert not schedule.select(0.1)
    schedule.epoch_end({"text": 0.4, "audio": 0.8})
    assert schedule.select(0.9) and not schedule.select(0.95) and schedule.select(0.5)
    state = schedule.state_dict()
    fresh = DualPhaseSchedule(switch_epoch=2, mode="min")
    fresh.load_state_dict(state)
    assert not fresh.select(0.6) and fresh.select(0.4)


def test_epoch_end_averages_a_mapping_of_unimodal_errors():
    schedule = DualPhaseSchedule(switch_epoch=None, patience=1, mode="min")
    schedule.epoch_end({"text": 0.2, "audio": 1.0})  # mean 0.6
    assert schedule.best == pytest.approx(0.6)
    with pytest.raises(ModbalanceError, match="empty mapping"):
        schedule.epoch_end({})
    with pytest.raises(ModbalanceError, match=r"metric\['audio'\]"):
        schedule.epoch_end({"text": 0.2, "audio": float("nan")})


def test_warm_head_trains_the_fusion_head_on_detached_features_during_the_warm_up():
    import torch

    schedule = DualPhaseSchedule(switch_epoch=1, warm_head=True)
    assert schedule.phase == 1 and schedule.runs_fusion
    enc = torch.nn.Linear(3, 2)
    head = torch.nn.Linear(2, 1)
    feats = {"text": enc(torch.randn(6, 3))}
    fused = head(schedule.fusion_inputs(feats)["text"]).squeeze(-1)
    out = _step_output(1)._replace(fused=fused)
    terms = schedule.base_losses(out)
    assert set(terms) == {"unimodal", "task"}
    grads = torch.autograd.grad(terms["task"], [*head.parameters(), enc.weight], allow_unused=True)
    assert grads[0] is not None and grads[0].abs().sum() > 0  # the head learns
    assert grads[-1] is None  # the encoder does not, through the fused loss
    with pytest.raises(ModbalanceError, match="warm_head=True trains the fusion head"):
        schedule.base_losses(_step_output(1, fused=False))
    schedule.epoch_end(0.3)
    assert schedule.fusion_inputs(feats)["text"].requires_grad  # phase 2: not detached
    with pytest.raises(TypeError, match="warm_head"):
        DualPhaseSchedule(warm_head="yes")
    assert not DualPhaseSchedule().runs_fusion  # off by default: phase 1 has no fusion
