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
