"""Shared argument validation for every public entry point of :mod:`modbalance`.

Every validator raises :class:`ModbalanceError` (a :class:`ValueError`) or :class:`TypeError` with a
message that names the argument, shows what was received and says what was expected, so that a
user can fix the call without reading the source.

Two kinds of checks exist:

* *structural* checks (type, rank, shape, dtype, Python scalars) never look at tensor values and
  cost nothing on an accelerator;
* *value* checks (finite values, label ranges, marginals summing to one) read tensor data and
  therefore synchronise the host with the device. They can be switched off in hot loops with
  :func:`value_checks` once a pipeline is known to be clean.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterable, Iterator, KeysView, Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "ModbalanceError",
    "check_choice",
    "check_finite",
    "check_finite_sums",
    "check_has_modalities",
    "check_int",
    "check_modality_keys",
    "check_ndim",
    "check_real",
    "check_replace",
    "check_same_dtype_device",
    "check_same_size",
    "check_shape",
    "check_signal",
    "check_target",
    "check_tensor",
    "value_checks",
    "value_checks_enabled",
]


class ModbalanceError(ValueError):
    """Raised when an argument of a :mod:`modbalance` function or module is invalid.

    It subclasses :class:`ValueError`, so ``except ValueError`` keeps working.

    Example:
        >>> from modbalance import ModbalanceError
        >>> issubclass(ModbalanceError, ValueError)
        True
    """


_state = threading.local()


def value_checks_enabled() -> bool:
    """Return whether value checks (which read tensor data) are currently enabled.

    Example:
        >>> from modbalance._checks import value_checks_enabled
        >>> value_checks_enabled()
        True
    """
    return getattr(_state, "value_checks", True)


def value_checks(enabled: bool) -> contextlib.AbstractContextManager[None]:
    """Context manager that enables or disables the value checks inside its block.

    Value checks (NaN/inf detection, label ranges, marginal sums) read tensor data and so force a
    host-device synchronisation. Disable them in a hot loop on an accelerator once the data are
    known to be clean; structural checks (shapes, ranks, dtypes) always run.

    Args:
        enabled: ``False`` to skip value checks inside the block, ``True`` to enable them. Must
            be a ``bool``: a string such as ``"no"`` would be truthy and silently enable them.

    Raises:
        TypeError: If ``enabled`` is not a ``bool``.

    Example:
        >>> import modbalance
        >>> with modbalance.value_checks(False):
        ...     modbalance.value_checks_enabled()
        False
    """
    if not isinstance(enabled, bool):
        raise TypeError(
            f"`enabled` of value_checks must be a bool (True or False), got "
            f"{type(enabled).__name__} ({enabled!r}); write value_checks(False) to disable them."
        )
    return _value_checks(enabled)


@contextlib.contextmanager
def _value_checks(enabled: bool) -> Iterator[None]:
    previous = value_checks_enabled()
    _state.value_checks = enabled
    try:
        yield
    finally:
        _state.value_checks = previous


def _shape_str(shape: Iterable[Any]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def check_tensor(
    x: Any,
    name: str,
    *,
    ndim: int | Sequence[int] | None = None,
    dtype: str | None = None,
    finite: bool = False,
    nonempty: bool = False,
) -> Tensor:
    """Check that ``x`` is a tensor of the expected rank and dtype kind, and return it.

    Args:
        x: The value to check.
        name: Argument name used in error messages.
        ndim: Allowed rank or ranks; ``None`` accepts any rank.
        dtype: ``"floating"``, ``"integer"``, ``"bool"``, ``"numeric"`` (floating or integer)
            or ``None`` for any dtype.
        finite: Also require every element to be finite (a value check, see :func:`value_checks`).
        nonempty: Require at least one element.

    Returns:
        ``x`` unchanged.

    Raises:
        TypeError: If ``x`` is not a tensor or has the wrong dtype kind.
        ModbalanceError: If the rank is wrong, the tensor is empty or holds NaN/inf.

    Example:
        >>> import torch
        >>> from modbalance._checks import check_tensor
        >>> check_tensor(torch.zeros(2, 3), "features", ndim=2, dtype="floating").shape
        torch.Size([2, 3])
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}.")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.ndim not in allowed:
            want = " or ".join(str(a) for a in allowed)
            raise ModbalanceError(
                f"`{name}` must have {want} dimensions, got shape {_shape_str(x.shape)} "
                f"({x.ndim} dimensions)."
            )
    if dtype is not None:
        kinds = {
            "floating": x.is_floating_point(),
            "integer": not x.is_floating_point() and not x.is_complex() and x.dtype != torch.bool,
            "bool": x.dtype == torch.bool,
        }
        kinds["numeric"] = kinds["floating"] or kinds["integer"]
        if dtype not in kinds:
            raise ValueError(f"unknown dtype kind {dtype!r}")
        if not kinds[dtype]:
            raise TypeError(f"`{name}` must have a {dtype} dtype, got {x.dtype}.")
    if nonempty and x.numel() == 0:
        raise ModbalanceError(f"`{name}` must not be empty, got shape {_shape_str(x.shape)}.")
    if finite:
        check_finite(x, name)
    return x


def check_ndim(x: Tensor, name: str, min_ndim: int) -> Tensor:
    """Check that ``x`` has at least ``min_ndim`` dimensions.

    Example:
        >>> import torch
        >>> from modbalance._checks import check_ndim
        >>> check_ndim(torch.zeros(4, 2, 2), "cost", 2).ndim
        3
    """
    check_tensor(x, name)
    if x.ndim < min_ndim:
        raise ModbalanceError(
            f"`{name}` must have at least {min_ndim} dimensions, got shape {_shape_str(x.shape)}."
        )
    return x


def check_shape(x: Tensor, name: str, expected: Sequence[int | str | None]) -> Tensor:
    """Check that ``x`` has the expected shape.

    Args:
        x: Tensor to check.
        name: Argument name used in error messages.
        expected: One entry per dimension: an ``int`` that must match, or ``None``/a symbol
            string (such as ``"N"``) that matches anything.

    Raises:
        ModbalanceError: If the rank or a fixed dimension differs.

    Example:
        >>> import torch
        >>> from modbalance._checks import check_shape
        >>> check_shape(torch.zeros(5, 8), "features", ("N", 8)).shape
        torch.Size([5, 8])
    """
    check_tensor(x, name)
    ok = x.ndim == len(expected) and all(
        not isinstance(e, int) or e == s for e, s in zip(expected, x.shape)
    )
    if not ok:
        want = _shape_str("?" if e is None else e for e in expected)
        raise ModbalanceError(f"`{name}` must have shape {want}, got shape {_shape_str(x.shape)}.")
    return x


def check_same_size(x: Tensor, x_name: str, dim_x: int, y: Tensor, y_name: str, dim_y: int) -> None:
    """Check that ``x.shape[dim_x] == y.shape[dim_y]``.

    Example:
        >>> import torch
        >>> from modbalance._checks import check_same_size
        >>> check_same_size(torch.zeros(3, 2), "features", 0, torch.zeros(3), "labels", 0)
    """
    if x.shape[dim_x] != y.shape[dim_y]:
        raise ModbalanceError(
            f"`{x_name}` has size {x.shape[dim_x]} in dimension {dim_x} "
            f"(shape {_shape_str(x.shape)}) but `{y_name}` has size {y.shape[dim_y]} in "
            f"dimension {dim_y} (shape {_shape_str(y.shape)}); they must match."
        )


def check_finite(x: Tensor, name: str) -> Tensor:
    """Check that every element of ``x`` is finite (skipped when value checks are disabled).

    Raises:
        ModbalanceError: If ``x`` holds NaN or infinite values; the message counts them.

    Example:
        >>> import torch
        >>> from modbalance._checks import check_finite
        >>> check_finite(torch.tensor([1.0, float("nan")]), "cost")
        Traceback (most recent call last):
            ...
        modbalance._checks.ModbalanceError: `cost` must contain only finite values, got 1 NaN ...
    """
    if not value_checks_enabled() or not x.is_floating_point():
        return x
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(bad.sum()) - n_nan
        raise ModbalanceError(
            f"`{name}` must contain only finite values, got {n_nan} NaN and {n_inf} "
            f"infinite value(s) in a tensor of shape {_shape_str(x.shape)}."
        )
    return x


def check_real(
    value: Any,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> float:
    """Check a real-valued Python scalar hyperparameter and return it as ``float``.

    Args:
        value: The value to check (bool is rejected).
        name: Argument name used in error messages.
        low: Lower bound, or ``None`` for none.
        high: Upper bound, or ``None`` for none.
        low_inclusive: Whether ``low`` itself is allowed.
        high_inclusive: Whether ``high`` itself is allowed.

    Raises:
        TypeError: If ``value`` is not a real number.
        ModbalanceError: If it is NaN/inf or out of range.

    Example:
        >>> from modbalance._checks import check_real
        >>> check_real(0.98, "momentum", low=0, high=1, high_inclusive=False)
        0.98
        >>> check_real(0.0, "epsilon", low=0, low_inclusive=False)
        Traceback (most recent call last):
            ...
        modbalance._checks.ModbalanceError: `epsilon` must be > 0, got 0.0.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, Tensor) and value.numel() == 1 and not value.requires_grad:
            value = value.item()
        else:
            raise TypeError(f"`{name}` must be a real number, got {type(value).__name__}.")
    value = float(value)
    if not math.isfinite(value):
        raise ModbalanceError(f"`{name}` must be finite, got {value}.")
    if low is not None and (value < low or (not low_inclusive and value == low)):
        op = ">=" if low_inclusive else ">"
        raise ModbalanceError(f"`{name}` must be {op} {low}, got {value}.")
    if high is not None and (value > high or (not high_inclusive and value == high)):
        op = "<=" if high_inclusive else "<"
        raise ModbalanceError(f"`{name}` must be {op} {high}, got {value}.")
    return value


def check_int(value: Any, name: str, *, low: int | None = None, high: int | None = None) -> int:
    """Check an integer hyperparameter and return it.

    Example:
        >>> from modbalance._checks import check_int
        >>> check_int(7, "num_classes", low=1)
        7
        >>> check_int(0, "num_classes", low=1)
        Traceback (most recent call last):
            ...
        modbalance._checks.ModbalanceError: `num_classes` must be >= 1, got 0.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__} ({value!r}).")
    if low is not None and value < low:
        raise ModbalanceError(f"`{name}` must be >= {low}, got {value}.")
    if high is not None and value > high:
        raise ModbalanceError(f"`{name}` must be <= {high}, got {value}.")
    return value


def check_choice(value: Any, name: str, choices: Iterable[Any]) -> Any:
    """Check that ``value`` is one of ``choices`` and return it.

    Example:
        >>> from modbalance._checks import check_choice
        >>> check_choice("cosine", "metric", ("cosine", "sqeuclidean"))
        'cosine'
        >>> check_choice("l1", "metric", ("cosine", "sqeuclidean"))
        Traceback (most recent call last):
            ...
        modbalance._checks.ModbalanceError: `metric` must be one of 'cosine', ...; got 'l1'.
    """
    choices = tuple(choices)
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ModbalanceError(f"`{name}` must be one of {allowed}; got {value!r}.")
    return value


def check_modality_names(
    modalities: Any, name: str = "modalities", *, minimum: int = 1
) -> tuple[str, ...]:
    """Check an ordered collection of distinct modality names; return them as a tuple.

    Per-modality state (coefficients, Shapley values, gates, EMA buffers) is stored by position
    in this order, so the collection must have a fixed order: a list, a tuple, a mapping or its
    keys (insertion order). A ``set``/``frozenset`` is refused (its order can change between runs
    and interpreters), and so is a bare string (``"text"`` would be split into letters).

    Raises:
        TypeError: A bare string, an unordered set or not a collection of names at all.
        ModbalanceError: Fewer than ``minimum`` names, non-strings or duplicates.

    Example:
        >>> from modbalance._checks import check_modality_names
        >>> check_modality_names(["text", "audio"])
        ('text', 'audio')
        >>> check_modality_names({"text", "audio"})
        Traceback (most recent call last):
            ...
        TypeError: `modalities` must be an ordered collection of modality names ...
    """
    if isinstance(modalities, (str, bytes)):
        raise TypeError(
            f"`{name}` must be a sequence of modality names such as ['text', 'audio'], got the "
            f"single string {modalities!r}; a string would be split into its letters. Pass "
            f"[{modalities!r}] for one modality."
        )
    if isinstance(modalities, AbstractSet) and not isinstance(modalities, KeysView):
        raise TypeError(
            f"`{name}` must be an ordered collection of modality names (a list or tuple), got a "
            f"{type(modalities).__name__} {modalities!r}: order matters because per-modality "
            f"state is stored by position, and a set's order is arbitrary. Pass a list or tuple, "
            f"e.g. {sorted(map(str, modalities))!r} in the order your model uses."
        )
    if not isinstance(modalities, Iterable):
        raise TypeError(
            f"`{name}` must be a sequence of modality names such as ['text', 'audio'], got "
            f"{modalities!r}."
        )
    names = tuple(modalities)
    if len(names) < minimum:
        what = "one modality" if minimum == 1 else f"{minimum} modalities"
        raise ModbalanceError(f"`{name}` must name at least {what}, got {names!r}.")
    if any(not isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise ModbalanceError(f"`{name}` must be distinct strings, got {names!r}.")
    return names


def check_modality_keys(
    mapping: Any, name: str, modalities: Sequence[str], *, hint: str = ""
) -> None:
    """Check that ``mapping`` is a mapping with exactly the keys ``modalities``.

    Args:
        mapping: The value to check.
        name: Argument name used in error messages.
        modalities: The expected keys (the component's modalities, in its order).
        hint: Optional sentence appended to the missing-key message.

    Raises:
        TypeError: If ``mapping`` is not a mapping.
        ModbalanceError: If a key is unknown or a modality is missing; both are named.

    Example:
        >>> from modbalance._checks import check_modality_keys
        >>> check_modality_keys({"text": 1, "audio": 2}, "features", ("text", "audio"))
        >>> check_modality_keys({"text": 1}, "features", ("text", "audio"))
        Traceback (most recent call last):
            ...
        modbalance._checks.ModbalanceError: `features` is missing modality 'audio' ...
    """
    if not isinstance(mapping, Mapping):
        raise TypeError(
            f"`{name}` must be a mapping from modality name to value, got {type(mapping).__name__}."
        )
    unknown = [k for k in mapping if k not in modalities]
    if unknown:
        raise ModbalanceError(
            f"`{name}` has unknown modality {unknown[0]!r} (all unknown: {unknown}); "
            f"expected the modalities {list(modalities)}."
        )
    missing = [m for m in modalities if m not in mapping]
    if missing:
        raise ModbalanceError(
            f"`{name}` is missing modality {missing[0]!r} (all missing: {missing}); "
            f"expected one entry for each of {list(modalities)}.{(' ' + hint) if hint else ''}"
        )


def check_has_modalities(
    mapping: Any, modalities: Sequence[str], missing: str, hint: str = ""
) -> None:
    """Check that ``mapping`` has every one of ``modalities`` (other keys are allowed).

    The error reads ``f"{missing} {first missing name!r} (has {sorted keys}){hint}."``: the
    caller words what is missing (unlike :func:`check_modality_keys`, which also refuses unknown
    keys).

    Raises:
        ModbalanceError: If a modality is missing; the first one is named.

    Example:
        >>> from modbalance._checks import check_has_modalities
        >>> check_has_modalities({"text": 1, "audio": 2, "x": 3}, ("text", "audio"), "missing")
        >>> check_has_modalities({"text": 1}, ("text", "audio"), "`features` is missing")
        Traceback (most recent call last):
            ...
        modbalance._checks.ModbalanceError: `features` is missing 'audio' (has ['text']).
    """
    absent = [m for m in modalities if m not in mapping]
    if absent:
        raise ModbalanceError(f"{missing} {absent[0]!r} (has {sorted(mapping)}){hint}.")


def check_same_dtype_device(x: Tensor, x_name: str, y: Tensor, y_name: str) -> None:
    """Check that ``x`` and ``y`` have one dtype and one device (structural, no host read).

    Raises:
        ModbalanceError: If the dtypes or the devices differ.
    """
    if x.dtype != y.dtype or x.device != y.device:
        raise ModbalanceError(
            f"`{x_name}` and `{y_name}` must share dtype and device: `{x_name}` is {x.dtype} on "
            f"{x.device}, `{y_name}` is {y.dtype} on {y.device}."
        )


def check_target(target: Tensor, task: str, n: int, name: str = "out.target") -> Tensor:
    """Structural check of a step's target (no host synchronisation); returns it unchanged.

    ``(N,)`` for both tasks (an ``(N, 1)`` target would broadcast against ``(N,)``
    predictions), integer class indices for classification (a float target is never truncated).
    """
    if not isinstance(target, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(target).__name__}.")
    if task == "classification" and (target.is_floating_point() or target.is_complex()):
        raise TypeError(
            f"`{name}` must hold integer class indices for task='classification', got dtype "
            f"{target.dtype}; fractional labels are never truncated. Pass class indices "
            "(`target.long()` after checking the values are whole), or task='regression'."
        )
    if target.shape != (n,):
        fix = "; pass `target.view(-1)`" if target.shape == (n, 1) else ""
        raise ModbalanceError(
            f"`{name}` must have shape (N,) = ({n},), one value per sample, got shape "
            f"{tuple(target.shape)}{fix}."
        )
    return target


def check_replace(replace: Iterable[str]) -> tuple[str, ...]:
    """Names of loss terms a method replaces: a single name or a collection of names."""
    if isinstance(replace, str):
        replace = (replace,)
    out = tuple(replace)
    if any(not isinstance(k, str) for k in out):
        raise TypeError(f"`replace` must be loss-term names (str), got {out!r}.")
    return out


def check_signal(x: Tensor, name: str, *, positive: bool = False) -> None:
    """A floating ``(..., M)`` tensor of finite (and, if asked, positive) values."""
    check_tensor(x, name, dtype="floating")
    if x.ndim == 0:
        raise ModbalanceError(
            f"`{name}` must have shape (..., M), one value per modality in the last dimension; "
            "got a 0-d tensor."
        )
    check_finite(x, name)
    if positive and value_checks_enabled() and bool((x <= 0).any()):
        raise ModbalanceError(
            f"`{name}` must be positive (higher is better, e.g. summed true-class probabilities "
            f"or exp(-MAE)); got {x.tolist() if x.numel() <= 16 else 'non-positive entries'}."
        )


def check_finite_sums(*named: tuple[Tensor, str]) -> None:
    """:func:`check_finite` of each ``(tensor, name)``, with one host read when all are finite.

    A finite sum of the tensors means that every element is finite; otherwise (a NaN/inf, or a
    sum that merely overflowed) the element-wise checks run in order and name the first
    non-finite tensor. Skipped when value checks are disabled.
    """
    if not value_checks_enabled():
        return
    floats = [(x, name) for x, name in named if x.is_floating_point()]
    if not floats:
        return
    total = floats[0][0].detach().sum()
    for x, _ in floats[1:]:
        total = total + x.detach().sum()
    if not math.isfinite(float(total)):
        for x, name in floats:
            check_finite(x, name)
