import math

import pytest
import torch

import modbalance
from modbalance._checks import (
    ModbalanceError,
    check_choice,
    check_finite,
    check_int,
    check_ndim,
    check_real,
    check_same_size,
    check_shape,
    check_tensor,
)
from modbalance.distributed import all_reduce_mean, all_reduce_sum, is_distributed, rank, world_size


def test_error_is_value_error():
    assert issubclass(ModbalanceError, ValueError)
    assert modbalance.ModbalanceError is ModbalanceError


def test_check_tensor_names_argument_and_shape():
    with pytest.raises(
        ModbalanceError, match=r"`features` must have 2 dimensions, got shape \(4, 3, 2\)"
    ):
        check_tensor(torch.zeros(4, 3, 2), "features", ndim=2)
    with pytest.raises(
        ModbalanceError, match=r"`cost` must have 2 or 3 dimensions, got shape \(5\)"
    ):
        check_tensor(torch.zeros(5), "cost", ndim=(2, 3))


def test_check_tensor_type_and_dtype():
    with pytest.raises(TypeError, match=r"`labels` must be a torch.Tensor, got list"):
        check_tensor([1, 2], "labels")
    with pytest.raises(TypeError, match=r"`labels` must have a integer dtype, got torch.float32"):
        check_tensor(torch.zeros(3), "labels", dtype="integer")
    with pytest.raises(TypeError, match=r"`x` must have a floating dtype, got torch.int64"):
        check_tensor(torch.zeros(3, dtype=torch.long), "x", dtype="floating")
    with pytest.raises(TypeError, match=r"`m` must have a bool dtype"):
        check_tensor(torch.zeros(3), "m", dtype="bool")
    assert check_tensor(torch.zeros(3, dtype=torch.long), "x", dtype="numeric") is not None
    with pytest.raises(ModbalanceError, match=r"`batch` must not be empty, got shape \(0, 4\)"):
        check_tensor(torch.zeros(0, 4), "batch", nonempty=True)


def test_check_shape_names_expected_and_received():
    with pytest.raises(
        ModbalanceError, match=r"`features` must have shape \(N, 8\), got shape \(5, 7\)"
    ):
        check_shape(torch.zeros(5, 7), "features", ("N", 8))
    with pytest.raises(ModbalanceError, match=r"must have shape \(\?, 3\), got shape \(3\)"):
        check_shape(torch.zeros(3), "x", (None, 3))
    assert check_shape(torch.zeros(2, 3), "x", (None, 3)).shape == (2, 3)
    with pytest.raises(
        ModbalanceError, match=r"`x` must have at least 2 dimensions, got shape \(3\)"
    ):
        check_ndim(torch.zeros(3), "x", 2)


def test_check_same_size_message():
    with pytest.raises(ModbalanceError, match=r"`features` has size 3 .* but `labels` has size 4"):
        check_same_size(torch.zeros(3, 2), "features", 0, torch.zeros(4), "labels", 0)


def test_check_finite_counts_bad_values():
    x = torch.tensor([1.0, float("nan"), float("inf"), -float("inf")])
    with pytest.raises(
        ModbalanceError, match=r"`cost` must contain only finite values, got 1 NaN and 2 infinite"
    ):
        check_finite(x, "cost")
    with pytest.raises(ModbalanceError, match="`f` must contain only finite"):
        check_tensor(x, "f", finite=True)
    # integer tensors are always finite
    assert check_finite(torch.arange(3), "i") is not None


def test_value_checks_can_be_disabled_and_restored():
    x = torch.tensor([float("nan")])
    with modbalance.value_checks(False):
        assert not modbalance.value_checks_enabled()
        check_finite(x, "x")  # skipped
        with pytest.raises(ModbalanceError, match=r"got shape \(1\)"):
            check_shape(x, "x", (2,))  # structural checks still run
    assert modbalance.value_checks_enabled()
    with pytest.raises(RuntimeError, match="boom"), modbalance.value_checks(False):
        raise RuntimeError("boom")
    assert modbalance.value_checks_enabled()


@pytest.mark.parametrize("bad", ["yes", "no", 0, 1, None, torch.tensor(False)])
def test_value_checks_needs_a_bool(bad):
    with pytest.raises(TypeError, match=r"`enabled` of value_checks must be a bool.*got"):
        modbalance.value_checks(bad)  # refused at the call, before `with`
    assert modbalance.value_checks_enabled()
    with modbalance.value_checks(True):  # nesting True inside False re-enables
        with modbalance.value_checks(False), modbalance.value_checks(True):
            assert modbalance.value_checks_enabled()


@pytest.mark.parametrize(
    ("kwargs", "value", "pattern"),
    [
        ({"low": 0, "low_inclusive": False}, 0.0, r"`v` must be > 0, got 0.0"),
        ({"low": 0}, -1, r"`v` must be >= 0, got -1.0"),
        ({"high": 1, "high_inclusive": False}, 1.0, r"`v` must be < 1, got 1.0"),
        ({"high": 1}, 2.5, r"`v` must be <= 1, got 2.5"),
        ({}, math.nan, r"`v` must be finite, got nan"),
    ],
)
def test_check_real_ranges(kwargs, value, pattern):
    with pytest.raises(ModbalanceError, match=pattern):
        check_real(value, "v", **kwargs)


def test_check_real_types():
    assert check_real(torch.tensor(0.5), "v") == 0.5
    with pytest.raises(TypeError, match=r"`v` must be a real number, got str"):
        check_real("0.5", "v")
    with pytest.raises(TypeError, match=r"`v` must be a real number, got bool"):
        check_real(True, "v")


def test_check_int_and_choice():
    with pytest.raises(TypeError, match=r"`k` must be an int, got float \(2.0\)"):
        check_int(2.0, "k")
    with pytest.raises(ModbalanceError, match=r"`k` must be <= 3, got 4"):
        check_int(4, "k", high=3)
    with pytest.raises(ModbalanceError, match=r"`mode` must be one of 'sum', 'concat'; got 'max'"):
        check_choice("max", "mode", ("sum", "concat"))


def test_distributed_helpers_are_noops_without_process_group():
    assert not is_distributed()
    assert world_size() == 1 and rank() == 0
    t = torch.tensor([1.0, 2.0])
    assert all_reduce_sum(t) is t and torch.equal(t, torch.tensor([1.0, 2.0]))
    assert all_reduce_mean(t) is t and torch.equal(t, torch.tensor([1.0, 2.0]))


def test_public_api_sorted_and_importable():
    names = modbalance.__all__
    # isort-style, as ruff's RUF022 keeps it: constants (AGM, PMR), then classes, then the rest
    assert list(names) == sorted(names, key=lambda n: (not n.isupper(), n))
    for name in names:
        assert hasattr(modbalance, name), name


def test_check_modality_keys_names_argument_and_key():
    from modbalance._checks import check_modality_keys

    check_modality_keys({"text": 0, "audio": 1}, "features", ("text", "audio"))
    with pytest.raises(TypeError, match=r"`features` must be a mapping .* got list"):
        check_modality_keys([1, 2], "features", ("text", "audio"))
    with pytest.raises(ModbalanceError, match=r"`scores` has unknown modality 'depth'"):
        check_modality_keys({"text": 0, "audio": 1, "depth": 2}, "scores", ("text", "audio"))
    with pytest.raises(ModbalanceError, match=r"`scores` is missing modality 'audio'.*Use present"):
        check_modality_keys({"text": 0}, "scores", ("text", "audio"), hint="Use present.")
