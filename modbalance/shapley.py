r"""Shapley values of modalities: coalition tables, exact/sampled estimators, :class:`ModalityGame`.

A *game* over :math:`M` players (modalities) assigns a value :math:`v(S)` to every coalition
:math:`S \subseteq \{0, \dots, M-1\}`. This module stores the :math:`2^M` values in a *coalition
table* indexed by the bit mask of the coalition: entry ``c`` holds :math:`v(S_c)` with
:math:`S_c = \{m : \text{bit } m \text{ of } c \text{ is set}\}` (see :func:`coalition_masks`).

The Shapley value of player :math:`m` (Shapley, 1953) is

.. math::

    \phi_m = \sum_{S \subseteq N \setminus \{m\}}
        \frac{|S|!\,(M - |S| - 1)!}{M!}\,\bigl(v(S \cup \{m\}) - v(S)\bigr),

a fixed linear map of the table: :func:`shapley_from_table` applies it as one matrix product with
a cached :math:`(2^M, M)` weight matrix. For many players, :func:`shapley_values` samples
permutations instead. :class:`ModalityGame` builds the table of a multimodal model from features
computed once by the encoders and a single batched pass of the fusion head over all coalitions;
:class:`InputMaskingGame` builds it for a model without a feature-level fusion head by masking
each absent modality's inputs and running the whole model once per coalition.

References:
    L. S. Shapley, "A value for n-person games", *Contributions to the Theory of Games II*, 1953.
    J. Castro, D. Gómez, J. Tejada, "Polynomial calculation of the Shapley value based on
    sampling", *Computers & Operations Research* 36(5), 2009.
    M. Grabisch, M. Roubens, "An axiomatic approach to the concept of interaction among players in
    cooperative games", *International Journal of Game Theory* 28, 1999.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modbalance._checks import (
    ModbalanceError,
    check_choice,
    check_finite,
    check_int,
    check_modality_keys,
    check_modality_names,
    check_real,
    check_same_size,
    check_tensor,
    value_checks,
    value_checks_enabled,
)
from modbalance._modes import EvalMode, ModuleTree
from modbalance.distributed import all_reduce_sum, is_distributed

__all__ = [
    "GameResult",
    "InputMaskingGame",
    "ModalityGame",
    "ShapleyResult",
    "coalition_masks",
    "interactions_from_table",
    "shapley_from_table",
    "shapley_values",
]

_MAX_TABLE_PLAYERS = 24


class ShapleyResult(NamedTuple):
    """Output of :func:`shapley_values`: ``(shapley, stderr, num_evaluations, modalities, ...)``.

    The fields carry the names of :class:`GameResult`'s: ``shapley`` the values, ``modalities``
    the player names.

    Use :meth:`interval` for a confidence interval of a sampled estimate: with few permutations
    the naive ``shapley ± 2 * stderr`` covers the exact value far less often than 95% (about 80%
    with 8 antithetic permutations), the Student-t interval of :meth:`interval` does not.

    Example:
        >>> import torch
        >>> from modbalance.shapley import shapley_values
        >>> res = shapley_values(lambda c: c.float().sum(1), 2, modalities=["text", "audio"])
        >>> res.shapley.tolist(), res.modalities
        ([1.0, 1.0], ('text', 'audio'))
    """

    #: ``(M,)`` Shapley value of each player.
    shapley: Tensor
    #: ``(M,)`` standard error of each estimate (zeros for the exact method). It is **NaN** when
    #: fewer than two independent permutation units were drawn (``num_permutations=1`` with
    #: ``antithetic=False``, or ``num_permutations=2`` with ``antithetic=True``): one unit says
    #: nothing about the spread.
    stderr: Tensor
    #: Number of coalitions passed to the value function.
    num_evaluations: int
    #: Player names in player order (``modalities`` of :func:`shapley_values`), or ``None``.
    modalities: tuple[str, ...] | None = None
    #: Number of independent units behind ``stderr`` (permutations, or antithetic pairs); ``None``
    #: for the exact method.
    num_units: int | None = None

    def interval(self, level: float = 0.95) -> tuple[Tensor, Tensor]:
        r"""Two-sided Student-t confidence interval ``(low, high)`` of every player's value.

        .. math::

            \hat\phi_m \pm t_{(1 + \text{level})/2,\; n_\text{units} - 1}\;
            \widehat{\mathrm{se}}_m

        The t quantile (computed without scipy) widens the interval when few units were
        drawn: with 8 antithetic permutations (4 units, 3 degrees of freedom) the 95% factor is
        3.18 instead of 1.96. For the exact method both bounds equal ``values``.

        Args:
            level: Confidence level in (0, 1).

        Returns:
            ``(low, high)``, each ``(M,)`` like ``values``.

        Raises:
            ModbalanceError: If ``level`` is not in (0, 1), or the estimate has fewer than two
                independent units (``stderr`` is NaN): draw more permutations.

        Example:
            >>> import torch
            >>> from modbalance.shapley import shapley_values
            >>> res = shapley_values(lambda c: c.float().sum(1), 3, method="permutation",
            ...                      num_permutations=8, generator=torch.Generator().manual_seed(0))
            >>> low, high = res.interval(0.95)
            >>> bool((low <= res.shapley).all() and (res.shapley <= high).all())
            True
        """
        level = check_real(level, "level", low=0, high=1, low_inclusive=False, high_inclusive=False)
        if self.num_units is None:
            return self.shapley, self.shapley
        if self.num_units < 2:
            raise ModbalanceError(
                f"a confidence interval needs at least two independent permutation units, got "
                f"{self.num_units}; pass num_permutations >= 2 (antithetic=False) or >= 4 "
                "(antithetic=True) to shapley_values."
            )
        half = _t_quantile(0.5 + level / 2, self.num_units - 1) * self.stderr
        return self.shapley - half, self.shapley + half


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for k in range(1, 400):
        m2 = 2 * k
        aa = k * (b - k) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + k) * (qab + k) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function :math:`I_x(a, b)` for ``0 <= x <= 1``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def _t_cdf(t: float, df: float) -> float:
    """Cumulative distribution function of Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


@functools.lru_cache(maxsize=256)
def _t_quantile(p: float, df: int) -> float:
    """Quantile of Student's t (``0.5 <= p < 1``, ``df >= 1``) by bisection on :func:`_t_cdf`.

    Accurate to about 1e-10 (``_t_quantile(0.975, 3) == 3.1824463...``); no scipy needed.
    """
    low, high = 0.0, 1.0
    while _t_cdf(high, df) < p:
        high *= 2.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        if _t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
        if high - low < 1e-12 * max(1.0, high):
            break
    return 0.5 * (low + high)


class GameResult(NamedTuple):
    """Output of :class:`ModalityGame` and :class:`InputMaskingGame`.

    The fields are ``(table, shapley, interactions, modalities)``.
    """

    #: ``(2^M,)`` coalition values, indexed as in :func:`coalition_masks` (NaN where a sampled
    #: :class:`ModalityGame` did not evaluate the coalition).
    table: Tensor
    #: ``(M,)`` Shapley value of each modality: exact, or the unbiased estimate of a sampled
    #: :class:`ModalityGame` (:attr:`ModalityGame.exact`).
    shapley: Tensor
    #: ``(M, M)`` pairwise Shapley interaction indices (zero diagonal), see
    #: :func:`interactions_from_table`; NaN off the diagonal for a sampled game.
    interactions: Tensor
    #: Modality names, in player order.
    modalities: tuple[str, ...]


# --------------------------------------------------------------------------------------------
# coalition tables
# --------------------------------------------------------------------------------------------


def _check_num_players(num_players: int, name: str = "num_players") -> int:
    return check_int(num_players, name, low=1, high=_MAX_TABLE_PLAYERS)


def coalition_masks(num_players: int, *, device: torch.device | str | None = None) -> Tensor:
    """Return every coalition of ``num_players`` players as a boolean mask.

    Row ``c`` has player ``m`` present iff bit ``m`` of ``c`` is set, so row 0 is the empty
    coalition and the last row the grand coalition. Coalition tables in this module use the same
    order.

    Args:
        num_players: Number of players :math:`M` (1 to 24).
        device: Device of the returned tensor.

    Returns:
        ``(2^M, M)`` boolean tensor.

    Example:
        >>> from modbalance.shapley import coalition_masks
        >>> coalition_masks(2).int()
        tensor([[0, 0],
                [1, 0],
                [0, 1],
                [1, 1]], dtype=torch.int32)
    """
    m = _check_num_players(num_players)
    codes = torch.arange(2**m, device=device)
    bits = torch.arange(m, device=device)
    return ((codes.unsqueeze(1) >> bits) & 1).bool()


def _codes_to_masks(codes: Tensor, num_players: int) -> Tensor:
    bits = torch.arange(num_players, device=codes.device)
    return ((codes.unsqueeze(-1) >> bits) & 1).bool()


@functools.lru_cache(maxsize=64)
def _shapley_weights(num_players: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(2^M, M) matrix W with phi = v @ W (computed in float64, then cast)."""
    m = num_players
    masks = coalition_masks(m).to(torch.float64)
    size = masks.sum(1)  # |c|
    fact = [math.factorial(k) for k in range(m + 1)]
    # weight of a marginal contribution that adds a player to a coalition of size s
    w = torch.tensor([fact[s] * fact[m - s - 1] / fact[m] for s in range(m)], dtype=torch.float64)
    present_w = w[(size - 1).clamp(min=0).long()].unsqueeze(1)  # player in c: +w(|c|-1)
    absent_w = -w[size.clamp(max=m - 1).long()].unsqueeze(1)  # player not in c: -w(|c|)
    weights = torch.where(masks.bool(), present_w, absent_w)
    return weights.to(dtype=dtype, device=device)


@functools.lru_cache(maxsize=32)
def _interaction_weights(num_players: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(2^M, M, M) tensor W with I = einsum('c,cij->ij', v, W)."""
    m = num_players
    masks = coalition_masks(m)
    if m < 2:
        return torch.zeros(2**m, m, m, dtype=dtype, device=device)
    fact = [math.factorial(k) for k in range(m + 1)]
    # weight of the discrete derivative at a coalition S of size s not containing i, j
    w = torch.tensor(
        [fact[s] * fact[m - s - 2] / fact[m - 1] for s in range(m - 1)], dtype=torch.float64
    )
    size = masks.sum(1).long()  # (2^M,)
    pi = masks.unsqueeze(2)  # (2^M, M, 1)
    pj = masks.unsqueeze(1)  # (2^M, 1, M)
    inside = pi.long() + pj.long()  # how many of i, j the coalition holds
    s = (size.view(-1, 1, 1) - inside).clamp(0, m - 2)
    sign = torch.where(pi == pj, 1.0, -1.0).to(torch.float64)
    weights = sign * w[s]
    eye = torch.eye(m, dtype=torch.bool)
    weights = weights.masked_fill(eye, 0.0)
    return weights.to(dtype=dtype, device=device)


def _check_table(values: Tensor, name: str = "values") -> int:
    check_tensor(values, name, dtype="floating")
    if values.ndim < 1:
        raise ModbalanceError(f"`{name}` must have at least 1 dimension (..., 2^M), got a scalar.")
    n = values.shape[-1]
    if n < 2 or n & (n - 1):
        raise ModbalanceError(
            f"the last dimension of `{name}` must be a power of two 2^M with M >= 1 (one value "
            f"per coalition), got shape {tuple(values.shape)}."
        )
    m = n.bit_length() - 1
    if m > _MAX_TABLE_PLAYERS:
        raise ModbalanceError(f"`{name}` describes {m} players; at most 24 are supported.")
    check_finite(values, name)
    return m


def shapley_from_table(values: Tensor) -> Tensor:
    r"""Exact Shapley values from a coalition table.

    .. math::

        \phi_m = \sum_{c=0}^{2^M-1} W_{cm}\, v(S_c), \qquad
        W_{cm} = \begin{cases}
            \frac{(|S_c|-1)!\,(M-|S_c|)!}{M!} & m \in S_c \\
            -\frac{|S_c|!\,(M-|S_c|-1)!}{M!} & m \notin S_c
        \end{cases}

    The weight matrix is built once per ``(M, dtype, device)`` and cached; the call is a single
    matrix product, differentiable with respect to ``values``.

    Args:
        values: ``(..., 2^M)`` floating coalition values, ordered as in :func:`coalition_masks`.

    Returns:
        ``(..., M)`` Shapley values; they sum to :math:`v(N) - v(\emptyset)` (efficiency).

    Raises:
        TypeError: If ``values`` is not a floating tensor.
        ModbalanceError: If its last dimension is not a power of two, or it holds NaN/inf (a
            value check, see :func:`modbalance.value_checks`).

    Example:
        >>> import torch
        >>> from modbalance.shapley import shapley_from_table
        >>> # v(S) = 1 if both players are present (pure synergy): each gets half
        >>> shapley_from_table(torch.tensor([0.0, 0.0, 0.0, 1.0]))
        tensor([0.5000, 0.5000])
    """
    m = _check_table(values)
    return values @ _shapley_weights(m, values.dtype, values.device)


def interactions_from_table(values: Tensor) -> Tensor:
    r"""Pairwise Shapley interaction indices from a coalition table.

    For :math:`i \ne j` this is the Shapley interaction index of Grabisch & Roubens (1999):

    .. math::

        I_{ij} = \sum_{S \subseteq N \setminus \{i, j\}}
            \frac{|S|!\,(M - |S| - 2)!}{(M - 1)!}
            \bigl(v(S \cup \{i, j\}) - v(S \cup \{i\}) - v(S \cup \{j\}) + v(S)\bigr).

    :math:`I_{ij} > 0` means that the two modalities are worth more together than the sum of
    their separate contributions (synergy), :math:`I_{ij} < 0` that they are redundant. The result
    is symmetric with a zero diagonal (the main effects are the Shapley values themselves); for a
    one-player table it is ``(..., 1, 1)`` zeros.

    Args:
        values: ``(..., 2^M)`` floating coalition values, ordered as in :func:`coalition_masks`.

    Returns:
        ``(..., M, M)`` interaction indices.

    Raises:
        TypeError: If ``values`` is not a floating tensor.
        ModbalanceError: On a table :func:`shapley_from_table` refuses (a last dimension that
            is not a power of two, NaN/inf values).

    Example:
        >>> import torch
        >>> from modbalance.shapley import interactions_from_table
        >>> interactions_from_table(torch.tensor([0.0, 0.0, 0.0, 1.0]))
        tensor([[0., 1.],
                [1., 0.]])
    """
    m = _check_table(values)
    weights = _interaction_weights(m, values.dtype, values.device)
    return torch.einsum("...c,cij->...ij", values, weights)


# --------------------------------------------------------------------------------------------
# generic estimator
# --------------------------------------------------------------------------------------------


def _call_value_fn(value_fn: Callable[[Tensor], Tensor], masks: Tensor) -> Tensor:
    out = value_fn(masks)
    check_tensor(out, "value_fn(coalitions)", dtype="floating")
    if out.shape != (masks.shape[0],):
        raise ModbalanceError(
            f"`value_fn` must return one value per coalition, shape ({masks.shape[0]},), "
            f"for a coalition batch of shape {tuple(masks.shape)}; got shape {tuple(out.shape)}."
        )
    try:
        check_finite(out, "value_fn(coalitions)")
    except ModbalanceError as exc:
        raise ModbalanceError(
            f"{exc} `value_fn` must return a finite value for every coalition (check the "
            "model's outputs and targets for NaN/inf)."
        ) from None
    return out


def _check_players(modalities: Sequence[str] | None, num_players: int) -> tuple[str, ...] | None:
    if modalities is None:
        return None
    if isinstance(modalities, str) or not isinstance(modalities, Sequence):
        raise TypeError(
            "`modalities` must be a sequence of names such as ['text', 'audio'], got "
            f"{modalities!r}."
        )
    names = tuple(modalities)
    if any(not isinstance(p, str) for p in names):
        raise TypeError(f"`modalities` must hold strings, got {names!r}.")
    if len(names) != num_players:
        raise ModbalanceError(
            f"`modalities` must name each of the num_players={num_players} players once, got "
            f"{len(names)} names {names!r}."
        )
    if len(set(names)) != len(names):
        raise ModbalanceError(f"`modalities` must be distinct, got {names!r}.")
    return names


def shapley_values(
    value_fn: Callable[[Tensor], Tensor],
    num_players: int,
    *,
    method: Literal["auto", "exact", "permutation"] = "auto",
    num_permutations: int = 64,
    antithetic: bool = True,
    generator: torch.Generator | None = None,
    max_exact_players: int = 10,
    device: torch.device | str | None = None,
    modalities: Sequence[str] | None = None,
) -> ShapleyResult:
    r"""Shapley values of a game given by a batched value function, exact or sampled.

    ``method="exact"`` evaluates all :math:`2^M` coalitions in **one** call of ``value_fn`` and
    applies :func:`shapley_from_table`. ``method="permutation"`` estimates

    .. math::

        \hat\phi_m = \frac{1}{n} \sum_{k=1}^{n}
            \bigl(v(P^{\pi_k}_m \cup \{m\}) - v(P^{\pi_k}_m)\bigr)

    over :math:`n` random permutations :math:`\pi_k`, where :math:`P^{\pi}_m` is the set of
    players preceding :math:`m` in :math:`\pi` (Castro et al., 2009). With ``antithetic=True``
    the permutations come in pairs :math:`(\pi, \text{reverse}(\pi))`, which makes the two
    estimates negatively correlated and reduces the variance; the pair averages are then the
    independent units of the standard error
    :math:`\hat\sigma / \sqrt{n_\text{units}}`. Every distinct coalition that the permutations
    visit is evaluated once, in a single batched ``value_fn`` call. The estimator is unbiased and
    satisfies efficiency exactly (each permutation's marginals sum to
    :math:`v(N) - v(\emptyset)`).

    ``method="auto"`` is exact for ``num_players <= max_exact_players`` (default 10, i.e. 1024
    coalitions) and sampled above.

    **Uncertainty.** ``stderr`` is the standard error over the :math:`n_\text{units}`
    independent units (permutations, or antithetic pairs). With one unit
    (``num_permutations=1, antithetic=False``) it is NaN: nothing measures the spread. With few
    units ``values ± 2 * stderr`` is too narrow (it covers the exact value only about 80% of the
    time with 8 antithetic permutations, 4 units); use :meth:`ShapleyResult.interval`, the
    Student-t interval with :math:`n_\text{units} - 1` degrees of freedom.

    Args:
        value_fn: Maps a boolean ``(C, M)`` coalition batch (row = players present) to ``(C,)``
            floating values.
        num_players: Number of players :math:`M` (1 to 24).
        method: ``"auto"``, ``"exact"`` or ``"permutation"``.
        num_permutations: Number of permutations :math:`n` for sampling (even when
            ``antithetic``).
        antithetic: Pair every permutation with its reverse.
        generator: Random generator (CPU) for the permutations; the global one when ``None``.
        max_exact_players: Largest :math:`M` that ``"auto"`` computes exactly.
        device: Device of the coalition masks passed to ``value_fn``.
        modalities: Optional player names (``num_players`` distinct strings, the modality
            names in player order); returned as ``result.modalities``.

    Returns:
        :class:`ShapleyResult` with ``shapley`` ``(M,)``, ``stderr`` ``(M,)`` (NaN with a single
        permutation unit), ``num_evaluations``, ``modalities`` (a tuple, or ``None``) and
        ``num_units`` (``None`` for the exact method).

    Raises:
        TypeError: If ``value_fn`` is not callable or ``modalities`` is not a sequence of
            strings.
        ModbalanceError: On invalid arguments, a ``value_fn`` output of the wrong shape, or one
            holding NaN/inf (a value check, see :func:`modbalance.value_checks`).

    Example:
        >>> import torch
        >>> from modbalance.shapley import shapley_values
        >>> w = torch.tensor([1.0, 2.0, 3.0])
        >>> additive = lambda coalitions: coalitions.float() @ w  # v(S) = sum of w over S
        >>> shapley_values(additive, 3).shapley.round(decimals=4).tolist()
        [1.0, 2.0, 3.0]
        >>> res = shapley_values(additive, 3, method="permutation", num_permutations=8,
        ...                      generator=torch.Generator().manual_seed(0))
        >>> res.shapley.round(decimals=4).tolist(), res.num_evaluations
        ([1.0, 2.0, 3.0], 8)
    """
    if not callable(value_fn):
        raise TypeError(f"`value_fn` must be callable, got {type(value_fn).__name__}.")
    m = _check_num_players(num_players)
    names = _check_players(modalities, m)
    check_choice(method, "method", ("auto", "exact", "permutation"))
    max_exact = check_int(max_exact_players, "max_exact_players", low=1, high=_MAX_TABLE_PLAYERS)
    if method == "auto":
        method = "exact" if m <= max_exact else "permutation"

    if method == "exact":
        masks = coalition_masks(m, device=device)
        table = _call_value_fn(value_fn, masks)
        values = shapley_from_table(table)
        return ShapleyResult(values, torch.zeros_like(values), masks.shape[0], names)

    n = check_int(num_permutations, "num_permutations", low=1)
    if antithetic and n % 2:
        raise ModbalanceError(
            f"`num_permutations` must be even with antithetic=True (pairs of a permutation and "
            f"its reverse), got {n}."
        )
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"`generator` must be a torch.Generator, got {type(generator).__name__}.")
    n_base = n // 2 if antithetic else n
    keys = torch.rand(n_base, m, generator=generator)
    perms = keys.argsort(dim=1)  # (n_base, M)
    if antithetic:
        perms = torch.cat([perms, perms.flip(1)], dim=0)  # rows k and k + n_base are paired
    # coalition codes of every prefix: 0, then cumulative sums of 2^player
    steps = torch.ones(1, dtype=torch.long) << perms  # (n, M)
    codes = torch.cat([torch.zeros(n, 1, dtype=torch.long), steps.cumsum(1)], dim=1)  # (n, M+1)
    unique, inverse = torch.unique(codes, return_inverse=True)
    table = _call_value_fn(value_fn, _codes_to_masks(unique, m).to(device))
    prefix_values = table[inverse.to(table.device)]  # (n, M+1)
    gains = prefix_values[:, 1:] - prefix_values[:, :-1]  # gain of the k-th player of each perm
    marginals = torch.empty_like(gains).scatter_(1, perms.to(gains.device), gains)  # by player
    if antithetic:
        units = 0.5 * (marginals[:n_base] + marginals[n_base:])
    else:
        units = marginals
    values = units.mean(0)
    if units.shape[0] > 1:
        stderr = units.std(0) / math.sqrt(units.shape[0])
    else:
        stderr = torch.full_like(values, float("nan"))
    return ShapleyResult(values, stderr, int(unique.numel()), names, int(units.shape[0]))


# --------------------------------------------------------------------------------------------
# modality game
# --------------------------------------------------------------------------------------------

Head = Callable[[dict[str, Tensor], dict[str, Tensor]], Tensor]


_VALUES = ("neg_loss", "accuracy", "neg_mae")
_TASKS = ("regression", "classification")


def _check_value_task(value: str, task: str) -> tuple[str, str]:
    """Validate the ``value``/``task`` pair shared by the games."""
    value = check_choice(value, "value", _VALUES)
    task = check_choice(task, "task", _TASKS)
    if task == "classification" and value == "neg_mae":
        raise ModbalanceError(
            "`value='neg_mae'` needs task='regression'; for classification use 'neg_loss' "
            "or 'accuracy'."
        )
    return value, task


def _game_modules(fn: object, modules: Iterable[nn.Module] | None) -> list[nn.Module]:
    """Modules to put in eval mode: ``fn`` itself (or its bound module) and ``modules``."""
    mods: list[nn.Module] = []
    if isinstance(fn, nn.Module):
        mods.append(fn)
    elif isinstance(getattr(fn, "__self__", None), nn.Module):
        mods.append(fn.__self__)  # type: ignore[attr-defined]
    for extra in modules or ():
        if not isinstance(extra, nn.Module):
            raise TypeError(f"`modules` must hold nn.Module objects, got {type(extra).__name__}.")
        mods.append(extra)
    return mods


def _batch_tensor(
    values: Mapping[str, Tensor], name: str, first: str, what: str, dtype: str, ndim: int, need: str
) -> Tensor:
    """``values[name]``: a ``dtype`` tensor of ``ndim`` or more dimensions, batch of ``first``'s."""
    key = f"{what}[{name!r}]"
    x = check_tensor(values[name], key, dtype=dtype)
    if x.ndim < ndim:
        raise ModbalanceError(f"`{key}` must have {need}, got shape {tuple(x.shape)}.")
    check_same_size(x, key, 0, values[first], f"{what}[{first!r}]", 0)
    return x


def _check_target(target: Tensor, task: str, ref: Tensor, ref_name: str) -> Tensor:
    """Check a ``(N,)``/``(N, 1)`` target against ``task`` and ``ref``'s batch size; return (N,)."""
    check_tensor(target, "target", nonempty=True)
    if target.ndim == 2 and target.shape[1] == 1:
        target = target[:, 0]
    if target.ndim != 1:
        raise ModbalanceError(f"`target` must have shape (N,), got shape {tuple(target.shape)}.")
    check_same_size(target, "target", 0, ref, ref_name, 0)
    if task == "classification":
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise TypeError(
                f"`target` must hold integer class indices for task='classification', got "
                f"dtype {target.dtype}; pass task='regression' for continuous targets or "
                "`target.long()` for class indices."
            )
    else:
        if not target.is_floating_point():
            raise TypeError(
                f"`target` must be a floating tensor for task='regression', got dtype "
                f"{target.dtype}; pass task='classification' for integer class labels or a "
                "float target (`target.float()`) for regression."
            )
        check_finite(target, "target")
    return target


def _value_sums(
    out: Tensor, target: Tensor, n: int, c: int, *, task: str, value: str, source: str
) -> tuple[Tensor, Tensor]:
    """``(c N, ...)`` predictions of ``c`` coalitions -> ``(c,)`` value sums and ``(c,)`` counts.

    ``source`` names the callable that produced ``out`` in error messages (``"head"``).
    """
    rows = c * n
    if task == "regression":
        if out.shape == (rows, 1):
            out = out[:, 0]
        if out.shape != (rows,):
            raise ModbalanceError(
                f"a regression `{source}` must return shape (B,) or (B, 1); for B={rows} it "
                f"returned shape {tuple(out.shape)}."
            )
        pred = out.view(c, n)
        if not pred.is_floating_point():
            raise ModbalanceError(f"`{source}` must return a floating tensor, got {pred.dtype}.")
        pred = pred.float() if pred.dtype in (torch.float16, torch.bfloat16) else pred
        y = target.to(pred.dtype).unsqueeze(0)
        if value == "neg_loss":
            sums = -(pred - y).square().sum(1)
            counts = torch.full_like(sums, float(n))
        elif value == "neg_mae":
            sums = -(pred - y).abs().sum(1)
            counts = torch.full_like(sums, float(n))
        else:
            nonzero = (y != 0).to(pred.dtype)
            agree = ((pred > 0) == (y > 0)).to(pred.dtype) * nonzero
            sums = agree.sum(1)
            counts = nonzero.sum(1).expand(c).clone()
        return sums, counts
    if out.ndim != 2 or out.shape[0] != rows:
        raise ModbalanceError(
            f"a classification `{source}` must return logits of shape (B, C); for B={rows} it "
            f"returned shape {tuple(out.shape)}."
        )
    logits = out.float() if out.dtype in (torch.float16, torch.bfloat16) else out
    num_classes = logits.shape[1]
    if value_checks_enabled():
        bad = (target < 0) | (target >= num_classes)
        if bool(bad.any()):
            raise ModbalanceError(
                f"`target` must hold class indices in [0, {num_classes - 1}] (the {source} "
                f"returns {num_classes} logits per sample), got {int(bad.sum())} value(s) "
                f"outside, e.g. {int(target[bad][0])}; check the labels or the {source}'s "
                "number of classes."
            )
    y = torch.cat([target] * c)  # as target.repeat(c), cheaper on CPU
    if value == "neg_loss":
        per = -F.cross_entropy(logits, y, reduction="none")
    else:
        per = (logits.argmax(1) == y).to(logits.dtype)
    sums = per.view(c, n).sum(1)
    return sums, torch.full_like(sums, float(n))


def _finish_values(sums: list[Tensor], counts: list[Tensor], ref: Tensor) -> Tensor:
    """Concatenate per-chunk sums/counts, all-reduce them under DDP, return the mean values."""
    empty = ref.new_zeros(0, dtype=ref.dtype if ref.is_floating_point() else torch.float32)
    total = torch.cat(sums) if sums else empty
    count = torch.cat(counts) if counts else empty
    if is_distributed():
        packed = all_reduce_sum(torch.stack([total, count]))
        total, count = packed[0], packed[1]
    return total / count.clamp_min(1.0)


def _game_means(sums: list[Tensor], counts: list[Tensor]) -> Tensor:
    """Per-chunk value sums and counts -> mean values (all-reduced under DDP).

    As :func:`_finish_values`, without a concatenation for a single chunk.
    """
    total = sums[0] if len(sums) == 1 else torch.cat(sums)
    count = counts[0] if len(counts) == 1 else torch.cat(counts)
    if is_distributed():
        packed = all_reduce_sum(torch.stack([total, count]))
        total, count = packed[0], packed[1]
    return total / count.clamp_min(1.0)


# --------------------------------------------------------------------------------------------
# sampled game: random cyclic orders of the players
# --------------------------------------------------------------------------------------------

_ESTIMATORS = ("auto", "exact", "sampled")


def _strata_masks(num_players: int) -> Tensor:
    """``(2M + 2, M)``: the empty coalition, every single player, every player but one, all."""
    eye = torch.eye(num_players, dtype=torch.bool)
    none = torch.zeros(1, num_players, dtype=torch.bool)
    return torch.cat([none, eye, ~eye, ~none])


@functools.lru_cache(maxsize=32)
def _cycle_design(num_players: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The estimator of one cyclic order, written for the identity order (position t = player t).

    Rows: the ``2M + 2`` strata of :func:`_strata_masks` (empty, ``{t}``, all but ``t``, all),
    then the ``M (M - 3)`` *interior* arcs, start ``k`` and length ``s`` in ``2 .. M - 2`` at row
    ``k (M - 3) + s - 2``. Returns the strata masks, the strata weights ``(2M + 2, M)``, the
    interior masks ``(R, M)`` and the interior weights ``(R, M)`` (float64);
    ``v_strata @ W_strata + v_interior @ W_interior`` averages the marginal contributions of the
    ``2M`` permutations of the cycle (its ``M`` rotations, read clockwise and counter-clockwise).
    """
    m = num_players
    inner = max(m - 3, 0)
    ns = 2 * m + 2
    position = torch.arange(m)
    start = torch.arange(m).repeat_interleave(inner)
    length = torch.arange(2, m - 1).repeat(m)
    interior = ((position.unsqueeze(0) - start.unsqueeze(1)) % m) < length.unsqueeze(1)

    def row(k: int, s: int) -> int:  # the arc of length s that starts at position k
        k %= m
        if s == 0:
            return 0
        if s == m:
            return ns - 1
        if s == 1:
            return 1 + k
        if s == m - 1:  # every position but the one before k
            return 1 + m + (k - 1) % m
        return ns + k * inner + s - 2

    weights = torch.zeros(ns + m * inner, m, dtype=torch.float64)
    half = 1.0 / (2 * m)
    for j in range(m):  # the player at position j ...
        for s in range(m):  # ... joins the s positions before it (clockwise) or after it
            weights[row(j - s, s + 1), j] += half
            weights[row(j - s, s), j] -= half
            weights[row(j, s + 1), j] += half
            weights[row(j + 1, s), j] -= half
    return _strata_masks(m), weights[:ns], interior, weights[ns:]


def _sample_cycles(
    num_players: int, num_cycles: int, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Coalitions and estimator weights of ``num_cycles`` random cyclic orders, on the CPU.

    Returns ``(masks (K, M) bool, weights (K, M) float64, codes (K,), first (K,))`` with
    ``K = 2M + 2 + num_cycles M (M - 3)``: the shared strata, then each cycle's interior arcs;
    ``codes`` are the coalitions' table indices and ``first[r]`` the first row that holds the
    same coalition as row ``r``. Static shapes, no data-dependent op.
    """
    m = num_players
    strata, w_strata, interior, w_interior = _cycle_design(m)
    order = torch.rand(num_cycles, m, generator=generator).argsort(1)  # position -> player
    where = order.argsort(1)  # player -> position
    # a strata row of player p is the positional row of p's position
    top = torch.zeros(num_cycles, 1, dtype=torch.long)
    rows = torch.cat([top, 1 + where, 1 + m + where, top + 2 * m + 1], 1)  # (C, 2M + 2)
    w_s = w_strata[rows]  # (C, 2M + 2, M), columns still by position
    w_s = torch.gather(w_s, 2, where.unsqueeze(1).expand_as(w_s)).sum(0) / num_cycles
    r = interior.shape[0]
    index = where.unsqueeze(1).expand(num_cycles, r, m)
    masks_i = torch.gather(interior.expand(num_cycles, r, m), 2, index).reshape(-1, m)
    w_i = torch.gather(w_interior.expand(num_cycles, r, m), 2, index).reshape(-1, m)
    masks = torch.cat([strata, masks_i])
    weights = torch.cat([w_s, w_i / num_cycles])
    codes = (masks.long() << torch.arange(m)).sum(1)
    first = (codes.unsqueeze(1) == codes.unsqueeze(0)).long().argmax(1)
    return masks, weights, codes, first


def _num_sampled_coalitions(num_players: int, num_cycles: int) -> int:
    return 2 * num_players + 2 + num_cycles * num_players * max(num_players - 3, 0)


def _check_coalition_masks(coalitions: Tensor, num_players: int) -> None:
    """``(C, M)`` boolean coalition masks in the game's player order."""
    check_tensor(coalitions, "coalitions", ndim=2, dtype="bool")
    if coalitions.shape[1] != num_players:
        raise ModbalanceError(
            f"`coalitions` must have shape (C, {num_players}), got {tuple(coalitions.shape)}."
        )


def _check_absent_embeddings(
    absent_embeddings: Mapping[str, Tensor] | None, masking: str, names: tuple[str, ...]
) -> Mapping[str, Tensor] | None:
    """The learned absent embeddings: required with ``masking="learned"``, refused otherwise."""
    if masking != "learned":
        if absent_embeddings is not None:
            raise ModbalanceError(
                f"`absent_embeddings` is only used with masking='learned', got masking={masking!r}."
            )
        return None
    if absent_embeddings is None:
        raise ModbalanceError(
            "`masking='learned'` needs `absent_embeddings`, one tensor per modality."
        )
    if not isinstance(absent_embeddings, Mapping) or set(absent_embeddings) != set(names):
        got = sorted(absent_embeddings) if isinstance(absent_embeddings, Mapping) else None
        raise ModbalanceError(
            f"`absent_embeddings` must map exactly the modalities {list(names)} to tensors, got "
            f"keys {got}."
        )
    for key, emb in absent_embeddings.items():
        check_tensor(emb, f"absent_embeddings[{key!r}]", dtype="floating")
    return absent_embeddings


def _game_generator(seed: int, generator: torch.Generator | None) -> torch.Generator:
    """The sampled game's CPU generator: the user's, or a new one seeded with ``seed``."""
    seed = check_int(seed, "seed", low=0, high=2**64 - 1)
    if generator is None:
        return torch.Generator().manual_seed(seed)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"`generator` must be a torch.Generator, got {type(generator).__name__}.")
    if generator.device.type != "cpu":
        raise ModbalanceError(
            f"`generator` must be a CPU torch.Generator (the cycles are drawn on the host, so "
            f"that no draw waits for the device), got one on {generator.device}."
        )
    if seed != 0:
        raise ModbalanceError("pass `seed` or `generator`, not both.")
    return generator


class _Game:
    """What both games share: their modalities (the players) and a ``repr`` of their settings."""

    modalities: tuple[str, ...]
    #: The attributes ``repr`` shows after ``modalities``, separated by spaces.
    _repr_fields = ""

    def __repr__(self) -> str:
        names = ("modalities", *self._repr_fields.split())
        return f"{type(self).__name__}({', '.join(f'{k}={getattr(self, k)!r}' for k in names)})"

    @property
    def num_players(self) -> int:
        """Number of modalities :math:`M`."""
        return len(self.modalities)

    def _set_players(
        self,
        fn: object,
        fn_name: str,
        modalities: Sequence[str],
        masking: str,
        maskings: tuple[str, ...],
        value: str,
        task: str,
    ) -> tuple[str, ...]:
        """Check and set ``modalities``, ``masking``, ``value`` and ``task``; the names."""
        if not callable(fn):
            raise TypeError(f"`{fn_name}` must be callable, got {type(fn).__name__}.")
        names = check_modality_names(modalities)
        _check_num_players(len(names), "len(modalities)")
        self.modalities = names
        self.masking = check_choice(masking, "masking", maskings)
        self.value, self.task = _check_value_task(value, task)
        return names


class ModalityGame(_Game):
    r"""The cooperative game of a multimodal model's modalities, evaluated in one batched pass.

    The encoders run **once**; their per-modality features are repeated for the coalitions,
    stacked along the batch dimension, and the fusion ``head`` is called once per chunk of
    coalitions (once in total by default) under :func:`torch.no_grad`, with every module
    reachable from the head in eval mode (dropout off, batch-norm running statistics) and each
    submodule's training flag restored afterwards, also when the head raises.

    A modality absent from coalition :math:`S` is *masked*:

    * ``"zero"``: its features are replaced by zeros;
    * ``"mean"``: by the batch mean of that modality (over all ranks under ``torch.distributed``);
    * ``"learned"``: by a given absent embedding (e.g. a trained ``nn.Parameter``);
    * ``"present"``: its features are left as they are and only the presence flags mark it
      absent; the head must honour the flags (e.g. a gated fusion that gives absent modalities
      zero weight).

    In every mode the head receives the presence flags. The coalition value is an average over
    the :math:`N` samples,

    .. math::

        v(S) = \frac{1}{N} \sum_{i=1}^{N} u\bigl(f(\tilde x^{S}_i), y_i\bigr),

    with :math:`u` = minus the squared error (regression) or minus the cross-entropy
    (classification) for ``value="neg_loss"``, the accuracy for ``value="accuracy"``
    (classification: argmax; regression: sign agreement :math:`[\hat y > 0] = [y > 0]` over the
    samples with a non-zero target, MMSA's "Non0 Acc-2"; zero if every target is zero), or minus
    the absolute error for ``value="neg_mae"`` (regression only). Under ``torch.distributed`` the
    per-coalition value sums and sample counts are all-reduced, so every rank obtains the values
    of the global batch exactly.

    **Exact or sampled** (``estimator``). The exact game evaluates all :math:`2^M` coalitions and
    the Shapley values and pairwise interactions follow from the table
    (:func:`shapley_from_table`, :func:`interactions_from_table`). Its cost, one head pass over
    :math:`2^M N` rows, doubles with every modality, so ``estimator="auto"`` (the default)
    samples above ``max_exact_players`` modalities (default 6, i.e. 64 coalitions). The sampled
    game draws ``num_cycles`` random *cyclic orders* of the modalities from the game's own
    generator (CPU, seeded with ``seed``). A cyclic order yields :math:`2M` permutations (its
    :math:`M` rotations, read in both directions; each modality takes every position twice,
    once in each direction, so the permutations are position-stratified antithetic pairs), and
    the estimate is the average of their marginal contributions,

    .. math::

        \hat\phi_m = \frac{1}{2M\,C} \sum_{c=1}^{C} \sum_{\pi \in \Pi_c}
            \bigl(v(P^{\pi}_m \cup \{m\}) - v(P^{\pi}_m)\bigr),

    with :math:`P^{\pi}_m` the modalities preceding :math:`m` in :math:`\pi` (Castro et al.,
    2009). The coalitions these permutations visit are the *arcs* of the cycle: the
    :math:`2M + 2` coalitions of size :math:`0, 1, M - 1, M` (shared by all cycles) and
    :math:`M (M - 3)` arcs of sizes :math:`2 \dots M - 2` per cycle, evaluated in the same single
    batched head pass: :math:`2M + 2 + C\,M(M - 3)` coalitions per call (58 instead of 256 at
    :math:`M = 8` with one cycle, 98 with two). The estimate is **unbiased** (every permutation
    of a uniformly random cycle is uniformly random), satisfies **efficiency** exactly
    (:math:`\sum_m \hat\phi_m = v(N) - v(\emptyset)`, every permutation's marginals telescope),
    is **exact** for games without interactions of order three or more (the two directions of a
    cycle cancel every pairwise term) and for :math:`M \le 3` (every coalition is then one of
    the strata; the game then enumerates the table), and puts the empty, single, all-but-one and
    grand coalitions in the table exactly (measured accuracy: the Shapley guide and
    ``benchmarks/results/speed.md``).
    The sampled :class:`GameResult` holds the evaluated coalitions in ``table`` and **NaN** in
    the coalitions not evaluated, and NaN off-diagonal ``interactions`` (not estimated). The
    draws need no host synchronisation (the CPU generator decides the coalitions, a fixed
    number per call) and are reproducible: :meth:`state_dict` holds the generator's state.
    Under ``torch.distributed`` every rank must draw the same cycles: keep the same ``seed``
    and call the game on every rank equally often (the default does).

    Memory is bounded with ``chunk_size`` (coalitions per head call).

    Args:
        head: Fusion head called as ``head(features, present)`` with ``features[name]`` of
            shape ``(B, *F_m)`` and ``present[name]`` a ``(B,)`` boolean tensor; returns ``(B,)``
            or ``(B, 1)`` predictions (regression) or ``(B, C)`` logits (classification). An
            ``nn.Module`` or a bound method of one is switched to eval mode during the pass.
        modalities: Modality names, in player order (at least one, distinct).
        masking: ``"zero"``, ``"mean"``, ``"learned"`` or ``"present"``.
        value: ``"neg_loss"``, ``"accuracy"`` or ``"neg_mae"``.
        task: ``"regression"`` or ``"classification"``.
        chunk_size: Coalitions per head call; ``None`` evaluates all of them at once.
        absent_embeddings: For ``masking="learned"``, a tensor of shape ``F_m`` per modality.
        modules: Further modules to put in eval mode during the pass (when ``head`` is a plain
            function that calls them).
        estimator: ``"auto"`` (exact up to ``max_exact_players`` modalities, sampled above),
            ``"exact"`` (always all :math:`2^M` coalitions) or ``"sampled"`` (always random
            cycles; exact anyway for :math:`M \le 3`).
        max_exact_players: Largest :math:`M` that ``"auto"`` computes exactly (1 to 24).
        num_cycles: Random cyclic orders :math:`C` per call of the sampled game (each gives
            :math:`2M` permutations); the error shrinks as :math:`1/\sqrt{C}`.
        seed: Seed of the game's generator (a non-negative int).
        generator: A CPU ``torch.Generator`` to draw the cycles from instead of one seeded with
            ``seed``.

    Example:
        >>> import torch
        >>> from modbalance.shapley import ModalityGame
        >>> def head(features, present):  # a sum of per-modality scores
        ...     return features["text"].sum(1) + 0.5 * features["audio"].sum(1)
        >>> game = ModalityGame(head, ["text", "audio"], masking="zero", value="neg_mae")
        >>> feats = {"text": torch.ones(4, 2), "audio": torch.ones(4, 2)}
        >>> res = game(feats, torch.full((4,), 2.5))
        >>> res.table
        tensor([-2.5000, -0.5000, -1.5000, -0.5000])
        >>> res.shapley, res.modalities
        (tensor([1.5000, 0.5000]), ('text', 'audio'))
        >>> names = [f"m{i}" for i in range(8)]
        >>> big = ModalityGame(lambda f, p: sum(f[k][:, 0] for k in names), names, value="neg_mae")
        >>> big.exact, big.num_coalitions  # 8 > max_exact_players: 58 of the 256 coalitions
        (False, 58)
    """

    _repr_fields = "masking value task chunk_size estimator max_exact_players num_cycles"

    def __init__(
        self,
        head: Head,
        modalities: Sequence[str],
        *,
        masking: Literal["zero", "mean", "learned", "present"] = "zero",
        value: Literal["neg_loss", "accuracy", "neg_mae"] = "neg_loss",
        task: Literal["regression", "classification"] = "regression",
        chunk_size: int | None = None,
        absent_embeddings: Mapping[str, Tensor] | None = None,
        modules: Iterable[nn.Module] | None = None,
        estimator: Literal["auto", "exact", "sampled"] = "auto",
        max_exact_players: int = 6,
        num_cycles: int = 1,
        seed: int = 0,
        generator: torch.Generator | None = None,
    ) -> None:
        maskings = ("zero", "mean", "learned", "present")
        names = self._set_players(head, "head", modalities, masking, maskings, value, task)
        self.head = head
        self.chunk_size = None if chunk_size is None else check_int(chunk_size, "chunk_size", low=1)
        self.absent_embeddings = _check_absent_embeddings(absent_embeddings, self.masking, names)
        self._modules = _game_modules(head, modules)
        self._tree = ModuleTree(self._modules)
        self.estimator = check_choice(estimator, "estimator", _ESTIMATORS)
        self.max_exact_players = check_int(
            max_exact_players, "max_exact_players", low=1, high=_MAX_TABLE_PLAYERS
        )
        self.num_cycles = check_int(num_cycles, "num_cycles", low=1)
        generator = _game_generator(seed, generator)
        #: CPU generator of the sampled game's cyclic orders.
        self.generator = generator
        self._masks: dict[torch.device, Tensor] = {}

    @property
    def exact(self) -> bool:
        """Whether a call evaluates every coalition (exact values) or samples cycles."""
        m = self.num_players
        if m <= 3 or self.estimator == "exact":
            return True
        return self.estimator == "auto" and m <= self.max_exact_players

    @property
    def num_coalitions(self) -> int:
        """Coalitions evaluated per call: ``2^M``, or ``2M + 2 + num_cycles * M (M - 3)``."""
        m = self.num_players
        return 2**m if self.exact else _num_sampled_coalitions(m, self.num_cycles)

    def state_dict(self) -> dict[str, Any]:
        """The game's modality names and its generator's state (what a sampled game draws next)."""
        return {"modalities": list(self.modalities), "generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`: the next sampled calls draw the same cycles again.

        Raises:
            ModbalanceError: If ``state`` is not such a mapping, or was saved by a game with other
                modality names or another order (a state without names loads as before).
        """
        keys = set(state) if isinstance(state, Mapping) else None
        if keys not in ({"generator"}, {"generator", "modalities"}):
            got = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            raise ModbalanceError(
                f"`state` must be ModalityGame.state_dict(), a mapping with the keys "
                f"'modalities' and 'generator'; got {got}."
            )
        saved = state.get("modalities")
        if saved is not None and tuple(saved) != self.modalities:
            raise ModbalanceError(
                f"`state` was saved with modalities {list(saved)} but this game has "
                f"{list(self.modalities)}; build the game with the same names in the same order."
            )
        self.generator.set_state(state["generator"])

    # ----------------------------------------------------------------------------------------

    def _check_inputs(self, features: Mapping[str, Tensor], target: Tensor) -> tuple[Tensor, int]:
        """Structural checks (keys, dtypes, shapes); the value checks are :meth:`_check_values`."""
        if not isinstance(features, Mapping):
            raise TypeError(
                f"`features` must be a mapping from modality name to tensor, got "
                f"{type(features).__name__}."
            )
        if set(features) != set(self.modalities):
            raise ModbalanceError(
                f"`features` must have exactly the keys {list(self.modalities)}, got "
                f"{sorted(features)}."
            )
        first = self.modalities[0]
        for name in self.modalities:
            _batch_tensor(features, name, first, "features", "floating", 2, "shape (N, D, ...)")
        with value_checks(False):  # the target's values are checked with the rest, once
            target = _check_target(target, self.task, features[first], f"features[{first!r}]")
        if self.masking == "learned":
            assert self.absent_embeddings is not None
            for name in self.modalities:
                emb = self.absent_embeddings[name]
                want = tuple(features[name].shape[1:])
                if tuple(emb.shape) != want:
                    raise ModbalanceError(
                        f"`absent_embeddings[{name!r}]` must have shape {want} (the feature "
                        f"shape without the batch dimension), got {tuple(emb.shape)}."
                    )
        return target, features[first].shape[0]

    def _check_values(
        self,
        features: Mapping[str, Tensor],
        target: Tensor,
        outputs: Sequence[Tensor],
        values: Tensor,
    ) -> None:
        """The value checks of a call, deferred to its end (value checks enabled only).

        One reduction and one host read when everything is finite: the sums of the features,
        the target, the head's outputs and the values. Otherwise (or when a sum merely
        overflowed) the element-wise checks run in the order of the inputs, features first,
        and name the first non-finite one.
        """
        sums = [features[name].sum(dtype=torch.float32) for name in self.modalities]
        if target.is_floating_point():
            sums.append(target.sum(dtype=torch.float32))
        sums += [out.sum(dtype=torch.float32) for out in outputs if out.is_floating_point()]
        sums.append(values.sum(dtype=torch.float32))
        if bool(torch.isfinite(torch.stack(sums)).all()):
            return
        for name in self.modalities:
            check_finite(features[name], f"features[{name!r}]")
        check_finite(target, "target")
        for out in outputs:
            check_finite(out, "head(features, present)")
        check_finite(values, "values")

    def _fill_values(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Per-modality replacement for absent features, broadcastable to (N, *F_m)."""
        fill: dict[str, Tensor] = {}
        for name in self.modalities:
            x = features[name]
            if self.masking == "zero":
                fill[name] = x.new_zeros(())
            elif self.masking == "mean":
                total = x.sum(0, keepdim=True)
                if is_distributed():
                    count = torch.tensor([float(x.shape[0])], device=x.device, dtype=x.dtype)
                    packed = all_reduce_sum(torch.cat([total.flatten(), count]))
                    total = packed[:-1].view_as(total)
                    fill[name] = total / packed[-1]
                else:
                    fill[name] = total / x.shape[0]
            elif self.masking == "learned":
                assert self.absent_embeddings is not None
                emb = self.absent_embeddings[name].detach()
                fill[name] = emb.to(device=x.device, dtype=x.dtype).unsqueeze(0)
        return fill

    def _per_sample_values(
        self, out: Tensor, target: Tensor, n: int, c: int
    ) -> tuple[Tensor, Tensor]:
        """(c, N) head output -> (c,) value sums and (c,) counts."""
        return _value_sums(out, target, n, c, task=self.task, value=self.value, source="head")

    def _all_masks(self, device: torch.device) -> Tensor:
        """:func:`coalition_masks` on ``device``, built there once per game and device."""
        masks = self._masks.get(device)
        if masks is None:
            masks = self._masks[device] = coalition_masks(self.num_players, device=device)
        return masks

    def _evaluate(
        self, features: Mapping[str, Tensor], target: Tensor, n: int, coalitions: Tensor
    ) -> Tensor:
        """Values of ``coalitions`` (``(C, M)`` bool, on the features' device), value-checked.

        The head runs with modbalance's value checks off: its inputs are the checked features,
        repeated, and its outputs are checked here, so the checks of components inside the
        head would only scan the same values :math:`2^M` times.
        """
        m = self.num_players
        checks = value_checks_enabled()
        total_c = coalitions.shape[0]
        step = self.chunk_size or max(total_c, 1)
        sums, counts, outputs = [], [], []
        with torch.no_grad(), EvalMode(self._tree):
            fill = None if self.masking == "present" else self._fill_values(features)
            for start in range(0, total_c, step):
                chunk = coalitions[start : start + step]
                c = chunk.shape[0]
                # presence flags of every modality in one copy: row j is modality j's (c N,)
                flags = chunk.t().unsqueeze(2).expand(m, c, n).reshape(m, c * n)
                feats: dict[str, Tensor] = {}
                present: dict[str, Tensor] = {}
                for j, name in enumerate(self.modalities):
                    x = features[name]
                    if fill is None:  # "present": the features themselves, repeated
                        rep = torch.cat([x] * c)  # x.repeat(c, 1, ...), cheaper on CPU
                        # marked as c copies of x: row-wise parts of a head (the prototype
                        # confidence, the gate scores) may compute once per sample
                        rep._modbalance_tiles = (x, c)  # type: ignore[attr-defined]
                        feats[name] = rep
                    else:
                        keep = chunk[:, j].view(c, *([1] * x.ndim))  # (c, 1, ...)
                        rep = torch.where(keep, x.unsqueeze(0), fill[name])  # (c, N, *F)
                        feats[name] = rep.reshape(c * n, *x.shape[1:])
                    present[name] = flags[j]
                with value_checks(False):
                    out = self.head(feats, present)
                check_tensor(out, "head(features, present)")
                s, k = self._per_sample_values(out, target, n, c)
                sums.append(s)
                counts.append(k)
                if checks:
                    outputs.append(out)
        values = _game_means(sums, counts)
        if checks:
            self._check_values(features, target, outputs, values)
        return values

    def coalition_values(
        self, features: Mapping[str, Tensor], target: Tensor, coalitions: Tensor
    ) -> Tensor:
        """Values of the given coalitions, one batched head pass per chunk.

        This is a value function for :func:`shapley_values` (e.g. permutation sampling for many
        modalities): ``shapley_values(partial(game.coalition_values, feats, y), M)``.

        Args:
            features: ``name -> (N, *F_m)`` features from the encoders.
            target: ``(N,)`` regression targets (floating) or class indices (integer).
            coalitions: ``(C, M)`` boolean masks, player order = ``modalities``.

        Returns:
            ``(C,)`` coalition values (at least float32).
        """
        target, n = self._check_inputs(features, target)
        _check_coalition_masks(coalitions, self.num_players)
        ref = features[self.modalities[0]]
        if coalitions.shape[0] == 0:
            return _finish_values([], [], ref)
        return self._evaluate(features, target, n, coalitions.to(ref.device))

    def __call__(self, features: Mapping[str, Tensor], target: Tensor) -> GameResult:
        """Evaluate the coalitions and return the table, Shapley values and interactions.

        Exact (:attr:`exact`): all :math:`2^M` coalitions. Sampled: :attr:`num_coalitions`
        coalitions of ``num_cycles`` random cyclic orders; ``shapley`` is then an unbiased,
        efficient estimate, ``table`` holds NaN where a coalition was not evaluated and
        ``interactions`` is NaN off the diagonal (see the class docstring).

        Args:
            features: ``name -> (N, *F_m)`` features computed once by the encoders (detached or
                not; no gradient flows through the game).
            target: ``(N,)`` (or ``(N, 1)``) regression targets or integer class indices.

        Returns:
            :class:`GameResult` with ``table`` ``(2^M,)``, ``shapley`` ``(M,)``,
            ``interactions`` ``(M, M)`` and ``modalities``.

        Raises:
            TypeError: If a feature is not floating, or ``target``'s dtype does not fit
                ``task`` (an integer target with ``task="regression"``: pass
                ``task="classification"`` or a float target).
            ModbalanceError: On missing/unknown modalities, mismatched sample counts, a head
                output of the wrong shape, class indices outside ``[0, C - 1]``, or NaN/inf in
                the features, the target or the head's output (value checks, see
                :func:`modbalance.value_checks`).
        """
        target, n = self._check_inputs(features, target)
        m = self.num_players
        device = features[self.modalities[0]].device
        if self.exact:
            table = self._evaluate(features, target, n, self._all_masks(device))
            shapley = table @ _shapley_weights(m, table.dtype, table.device)
            weights = _interaction_weights(m, table.dtype, table.device)
            interactions = (table @ weights.view(2**m, m * m)).view(m, m)
            return GameResult(table, shapley, interactions, self.modalities)
        masks, weights, codes, first = _sample_cycles(m, self.num_cycles, self.generator)
        # host-to-device copies that do not wait for the device's queue
        values = self._evaluate(features, target, n, masks.to(device, non_blocking=True))
        weights = weights.to(values.dtype).to(device, non_blocking=True)
        shapley = values @ weights
        codes = codes.to(device, non_blocking=True)
        first = first.to(device, non_blocking=True)
        # duplicates of a coalition (several cycles) write the value of its first evaluation
        table = values.new_full((2**m,), math.nan).index_put_((codes,), values[first])
        interactions = values.new_full((m, m), math.nan).fill_diagonal_(0.0)
        return GameResult(table, shapley, interactions, self.modalities)


# --------------------------------------------------------------------------------------------
# input-masking game (whole models without a feature-level fusion head)
# --------------------------------------------------------------------------------------------

_MAX_INPUT_GAME_PLAYERS = 8

ModelFn = Callable[..., Tensor]


def _accepts_masks(fn: object) -> bool | None:
    """Whether ``fn`` accepts ``fn(inputs, masks)``; ``None`` if its signature is unreadable."""
    target = fn.forward if isinstance(fn, nn.Module) else fn
    try:
        sig = inspect.signature(target)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    try:
        sig.bind(object(), object())
    except TypeError:
        return False
    return True


class InputMaskingGame(_Game):
    r"""The game of a model's modalities played by masking its **inputs** and running it whole.

    Published multimodal sentiment models (early fusion, tensor fusion, cross-modal attention
    such as MulT) go from raw inputs to the prediction in one ``forward`` and expose no
    feature-level fusion head ``fuse(features, present)`` for :class:`ModalityGame`. This game
    replaces an absent modality's *inputs* and runs the user's whole model once per coalition
    (under :func:`torch.no_grad`, with the model's modules in eval mode and each submodule's
    training flag restored afterwards, also when the model raises).

    For a coalition :math:`S` sample :math:`i` enters the model as :math:`\tilde x^S_i` with

    .. math::

        \tilde x^S_{i,m} = \begin{cases} x_{i,m} & m \in S \\ b_m & m \notin S \end{cases},
        \qquad
        v(S) = \frac{1}{N} \sum_{i=1}^{N} u\bigl(f(\tilde x^S_i), y_i\bigr),

    where :math:`f` is the model, :math:`u` the per-sample utility of ``value`` (exactly as in
    :class:`ModalityGame`: minus the squared error or cross-entropy for ``"neg_loss"``, minus the
    absolute error for ``"neg_mae"``, the accuracy, MMSA's "Non0 Acc-2" for regression, for
    ``"accuracy"``), and :math:`b_m` the replacement of ``masking``:

    * ``"zero"``: :math:`b_m = 0`. Right when the inputs are standardised (0 is the mean) or the
      model was trained with modality dropout that zeroes inputs; for integer inputs (token
      ids) 0 is usually the padding id.
    * ``"mean"`` (default): the batch mean of the modality per feature and time step,
      :math:`b_{m,t} = \sum_i \mu_{i,t}\,x_{i,m,t} / \sum_i \mu_{i,t}`, over the valid positions
      :math:`\mu_{i,t} = 1` of the modality's mask when ``masks`` holds one (positions no sample
      fills become 0). The safest choice for unnormalised inputs: it keeps every feature on its
      own scale. Floating inputs only. Under ``torch.distributed`` it is each rank's own batch
      mean (padded lengths often differ between ranks); the value sums are all-reduced as in
      :class:`ModalityGame`.
    * ``"baseline"``: a reference you pass per modality (``baseline[name]``, e.g. the
      training-set mean, or a ``[PAD]`` token sequence), broadcast to the batch.

    The Shapley values and pairwise interactions then follow from the :math:`2^M` table,

    .. math::

        \phi_m = \sum_{S \subseteq N \setminus \{m\}}
            \frac{|S|!\,(M - |S| - 1)!}{M!}\,\bigl(v(S \cup \{m\}) - v(S)\bigr),
        \qquad \sum_m \phi_m = v(N) - v(\emptyset),

    (:func:`shapley_from_table`, :func:`interactions_from_table`), in the same
    :class:`GameResult` as :class:`ModalityGame`, so
    :meth:`~modbalance.methods.modulators.ShapleyGradModulator.observe` and
    :meth:`~modbalance.methods.equilibrium.ShapleyEquilibrium.observe` take it as it is.

    **Caveat.** A model never trained with missing modalities sees off-distribution inputs in
    every coalition but the full one, so the values measure how it reacts to the replacement as
    much as what the modality contributes: read them as *relative* shares (compare modalities,
    follow them over training), not as absolute worth. When the model has a feature-level fusion
    head, prefer :class:`ModalityGame` (``masking="present"`` through a head that honours the
    presence flags, or its cheaper single batched head pass).

    **Cost.** :math:`2^M` forward passes of the whole model per call (``chunk_size=1``), which is
    fine for :math:`M \le 4` (16 passes). :meth:`__call__` refuses :math:`M > 8` (more than 256
    passes); sample instead with :func:`shapley_values` (``method="permutation"``) over
    :meth:`coalition_values`. ``chunk_size > 1`` concatenates that many coalitions along the
    batch dimension per forward (fewer, larger passes); it needs a model whose outputs do not
    depend on the other samples of the batch in eval mode, and inputs other than the modalities
    (lengths, speaker ids) cannot be closed over in ``model_fn`` then, since the batch grows.

    **Masks.** ``masks[name]`` (optional, any subset of the modalities) marks valid positions
    with ``True``/1, shape a prefix of the input's, e.g. ``(N, T)`` for ``(N, T, D)`` inputs
    (convert a padding mask, ``True`` = pad, in ``model_fn``). They are passed to the model
    unchanged, except that ``mask_absent=True`` sets an absent modality's mask to all-``False``
    (many models cannot handle an all-padding sequence, hence the default ``False``).

    Args:
        model_fn: The whole model, called as ``model_fn(inputs, masks)`` or ``model_fn(inputs)``
            with ``inputs[name]`` of shape ``(B, *X_m)`` (``B = N`` with ``chunk_size=1``);
            returns ``(B,)`` or ``(B, 1)`` predictions (regression) or ``(B, C)`` logits
            (classification). Wrap a model that returns a tuple (``lambda x, m: net(x, m)[0]``).
            An ``nn.Module`` or a bound method of one is put in eval mode during the game.
        modalities: Modality names, in player order (at least one, distinct).
        masking: ``"zero"``, ``"mean"`` or ``"baseline"``.
        value: ``"neg_loss"``, ``"accuracy"`` or ``"neg_mae"`` (regression only).
        task: ``"regression"`` or ``"classification"``.
        baseline: For ``masking="baseline"``, one tensor per modality that broadcasts to the
            modality's input shape ``(N, *X_m)`` (typically shape ``X_m``).
        mask_absent: Set an absent modality's mask to all-``False`` (only where ``masks`` has
            one).
        takes_masks: Whether to call ``model_fn(inputs, masks)`` (``True``) or
            ``model_fn(inputs)`` (``False``). ``None`` detects it from the signature (of
            ``forward`` for a module): two positional arguments accepted means ``True``; with an
            unreadable signature, ``masks`` are passed when given.
        chunk_size: Coalitions per forward pass; ``1`` (default) runs one pass per coalition,
            ``None`` all :math:`2^M` in one pass.
        modules: Further modules to put in eval mode (when ``model_fn`` is a plain function
            that calls them).

    Raises:
        TypeError: If ``model_fn`` is not callable or ``modules`` holds a non-module.
        ModbalanceError: On an unknown ``masking``, ``value`` or ``task``, ``neg_mae`` with
            classification, ``baseline`` missing (or given without ``masking="baseline"``), or
            non-finite baseline values.

    Example:
        >>> import torch
        >>> from modbalance.shapley import InputMaskingGame
        >>> def model(inputs):  # early fusion: no feature-level head to mask
        ...     return inputs["text"].mean((1, 2)) + 0.5 * inputs["audio"].mean((1, 2))
        >>> game = InputMaskingGame(model, ["text", "audio"], masking="zero", value="neg_mae")
        >>> x = {"text": torch.ones(4, 5, 3), "audio": torch.ones(4, 7, 2)}
        >>> res = game(x, torch.full((4,), 2.5))  # 4 forward passes
        >>> res.table
        tensor([-2.5000, -1.5000, -2.0000, -1.0000])
        >>> res.shapley, res.modalities
        (tensor([1.0000, 0.5000]), ('text', 'audio'))
    """

    _repr_fields = "masking value task mask_absent chunk_size"

    def __init__(
        self,
        model_fn: ModelFn,
        modalities: Sequence[str],
        *,
        masking: Literal["zero", "mean", "baseline"] = "mean",
        value: Literal["neg_loss", "accuracy", "neg_mae"] = "neg_loss",
        task: Literal["regression", "classification"] = "regression",
        baseline: Mapping[str, Tensor] | None = None,
        mask_absent: bool = False,
        takes_masks: bool | None = None,
        chunk_size: int | None = 1,
        modules: Iterable[nn.Module] | None = None,
    ) -> None:
        maskings = ("zero", "mean", "baseline")
        names = self._set_players(model_fn, "model_fn", modalities, masking, maskings, value, task)
        self.model_fn = model_fn
        if not isinstance(mask_absent, bool):
            raise TypeError(f"`mask_absent` must be a bool, got {type(mask_absent).__name__}.")
        self.mask_absent = mask_absent
        if takes_masks is not None and not isinstance(takes_masks, bool):
            raise TypeError(
                f"`takes_masks` must be True, False or None, got {type(takes_masks).__name__}."
            )
        self.takes_masks = takes_masks
        self._signature_masks = _accepts_masks(model_fn)
        self.chunk_size = None if chunk_size is None else check_int(chunk_size, "chunk_size", low=1)
        if self.masking == "baseline":
            if baseline is None:
                raise ModbalanceError(
                    "`masking='baseline'` needs `baseline`, one reference tensor per modality "
                    "(e.g. the training-set mean of each input); or use masking='mean'."
                )
            check_modality_keys(baseline, "baseline", names)
            for key in names:
                ref = check_tensor(baseline[key], f"baseline[{key!r}]", dtype="numeric")
                check_finite(ref, f"baseline[{key!r}]")
            self.baseline: dict[str, Tensor] | None = {k: baseline[k] for k in names}
        elif baseline is not None:
            raise ModbalanceError(
                f"`baseline` is only used with masking='baseline', got masking={self.masking!r}."
            )
        else:
            self.baseline = None
        self._modules = _game_modules(model_fn, modules)

    # ----------------------------------------------------------------------------------------

    def _check_inputs(
        self,
        inputs: Mapping[str, Tensor],
        target: Tensor,
        masks: Mapping[str, Tensor] | None,
    ) -> tuple[Tensor, int]:
        check_modality_keys(inputs, "inputs", self.modalities)
        first = self.modalities[0]
        for name in self.modalities:
            need = "a batch dimension, shape (N, ...)"
            x = _batch_tensor(inputs, name, first, "inputs", "numeric", 1, need)
            if self.masking == "mean" and not x.is_floating_point():
                raise ModbalanceError(
                    f"masking='mean' needs floating inputs, but `inputs[{name!r}]` has dtype "
                    f"{x.dtype} (token ids?); use masking='baseline' with a reference such as "
                    "the padding id, or masking='zero'."
                )
            check_finite(x, f"inputs[{name!r}]")
            if self.baseline is not None:
                ref = self.baseline[name]
                try:
                    ok = torch.broadcast_shapes(ref.shape, x.shape) == x.shape
                except RuntimeError:
                    ok = False
                if not ok:
                    raise ModbalanceError(
                        f"`baseline[{name!r}]` must broadcast to the input shape "
                        f"{tuple(x.shape)} (typically shape {tuple(x.shape[1:])}), got shape "
                        f"{tuple(ref.shape)}."
                    )
        self._check_masks(inputs, masks)
        target = _check_target(target, self.task, inputs[first], f"inputs[{first!r}]")
        return target, inputs[first].shape[0]

    def _check_masks(
        self, inputs: Mapping[str, Tensor], masks: Mapping[str, Tensor] | None
    ) -> None:
        """Masks for a subset of the modalities, each a prefix of its input's shape."""
        if masks is not None:
            if not isinstance(masks, Mapping):
                raise TypeError(
                    "`masks` must be a mapping from modality name to mask, got "
                    f"{type(masks).__name__}."
                )
            unknown = [k for k in masks if k not in self.modalities]
            if unknown:
                raise ModbalanceError(
                    f"`masks` has unknown modality {unknown[0]!r}; expected a subset of the "
                    f"modalities {list(self.modalities)}."
                )
            for name, mask in masks.items():
                check_tensor(mask, f"masks[{name!r}]")
                x = inputs[name]
                if mask.ndim < 1 or tuple(mask.shape) != tuple(x.shape[: mask.ndim]):
                    raise ModbalanceError(
                        f"`masks[{name!r}]` must have a prefix of the input shape "
                        f"{tuple(x.shape)} such as {tuple(x.shape[:2])} (True/1 = valid), got "
                        f"shape {tuple(mask.shape)}."
                    )
        elif self.mask_absent:
            raise ModbalanceError(
                "`mask_absent=True` sets an absent modality's mask to all-False, but no `masks` "
                "were given; pass masks to the call or mask_absent=False."
            )

    def _fill_values(
        self, inputs: Mapping[str, Tensor], masks: Mapping[str, Tensor] | None
    ) -> dict[str, Tensor]:
        """Per-modality replacement for absent inputs, broadcastable to (N, *X_m)."""
        fill: dict[str, Tensor] = {}
        for name in self.modalities:
            x = inputs[name]
            if self.masking == "zero":
                fill[name] = x.new_zeros(())
            elif self.masking == "mean":
                mask = None if masks is None else masks.get(name)
                if mask is None:
                    fill[name] = x.mean(0)
                else:
                    w = (mask != 0).to(x.dtype)
                    w = w.view(*w.shape, *([1] * (x.ndim - w.ndim)))
                    fill[name] = (x * w).sum(0) / w.sum(0).clamp_min(1.0)
            else:
                assert self.baseline is not None
                fill[name] = self.baseline[name].detach().to(device=x.device, dtype=x.dtype)
        return fill

    def _forward(self, inputs: dict[str, Tensor], masks: dict[str, Tensor] | None) -> Tensor:
        takes = self.takes_masks
        if takes is None:  # from the signature; unreadable: pass masks when given
            takes = masks is not None if self._signature_masks is None else self._signature_masks
        out = self.model_fn(inputs, masks) if takes else self.model_fn(inputs)
        call = "model_fn(inputs, masks)" if takes else "model_fn(inputs)"
        if not isinstance(out, Tensor):
            raise TypeError(
                f"`{call}` must return the prediction tensor, got {type(out).__name__}; wrap a "
                "model that returns several outputs, e.g. `lambda x, m: net(x, m)[0]`."
            )
        check_finite(out, call)
        return out

    def coalition_values(
        self,
        inputs: Mapping[str, Tensor],
        target: Tensor,
        coalitions: Tensor,
        masks: Mapping[str, Tensor] | None = None,
    ) -> Tensor:
        """Values of the given coalitions, one forward pass of the model per chunk.

        A value function for :func:`shapley_values` (any :math:`M`; e.g. permutation sampling
        for many modalities): ``shapley_values(partial(game.coalition_values, x, y), M)``.

        Args:
            inputs: ``name -> (N, *X_m)`` model inputs.
            target: ``(N,)`` (or ``(N, 1)``) regression targets (floating) or class indices
                (integer).
            coalitions: ``(C, M)`` boolean masks, player order = ``modalities``.
            masks: Optional ``name -> (N, ...)`` validity masks (a prefix of the input shape).

        Returns:
            ``(C,)`` coalition values (at least float32).
        """
        target, n = self._check_inputs(inputs, target, masks)
        _check_coalition_masks(coalitions, self.num_players)
        ref = inputs[self.modalities[0]]
        coalitions = coalitions.to(ref.device)
        total_c = coalitions.shape[0]
        step = self.chunk_size or max(total_c, 1)
        index = {name: j for j, name in enumerate(self.modalities)}
        sums, counts = [], []
        with torch.no_grad(), EvalMode(self._modules):
            fill = self._fill_values(inputs, masks)
            for start in range(0, total_c, step):
                chunk = coalitions[start : start + step]
                c = chunk.shape[0]
                batch: dict[str, Tensor] = {}
                for j, name in enumerate(self.modalities):
                    x = inputs[name]
                    keep = chunk[:, j].view(c, *([1] * x.ndim))  # (c, 1, ...)
                    rep = torch.where(keep, x.unsqueeze(0), fill[name])  # (c, N, *X)
                    batch[name] = rep.reshape(c * n, *x.shape[1:])
                batch_masks: dict[str, Tensor] | None = None
                if masks is not None:
                    batch_masks = {}
                    for name, mask in masks.items():
                        rep = mask.unsqueeze(0).expand(c, *mask.shape)
                        if self.mask_absent:
                            keep = chunk[:, index[name]].view(c, *([1] * mask.ndim))
                            rep = torch.where(keep, rep, torch.zeros_like(mask))
                        batch_masks[name] = rep.reshape(c * n, *mask.shape[1:])
                out = self._forward(batch, batch_masks)
                s, k = _value_sums(
                    out, target, n, c, task=self.task, value=self.value, source="model_fn"
                )
                sums.append(s)
                counts.append(k)
            return _finish_values(sums, counts, ref)

    def __call__(
        self,
        inputs: Mapping[str, Tensor],
        target: Tensor,
        masks: Mapping[str, Tensor] | None = None,
    ) -> GameResult:
        """Run the model on every coalition and return the table, Shapley values, interactions.

        Args:
            inputs: ``name -> (N, *X_m)`` inputs of the model, one entry per modality (floating,
                or integer token ids with ``masking="zero"``/``"baseline"``).
            target: ``(N,)`` (or ``(N, 1)``) regression targets or integer class indices.
            masks: Optional ``name -> (N, ...)`` validity masks (``True``/1 = valid, shape a
                prefix of the input's, any subset of the modalities); passed to the model and
                used by ``masking="mean"``.

        Returns:
            :class:`GameResult` with ``table`` ``(2^M,)``, ``shapley`` ``(M,)``,
            ``interactions`` ``(M, M)`` and ``modalities``.

        Raises:
            TypeError: If an input or mask is not a tensor, ``target``'s dtype does not fit
                ``task``, or the model returns no tensor.
            ModbalanceError: For :math:`M > 8` (:math:`2^M` whole-model passes), on
                missing/unknown modalities, mismatched sample counts or mask shapes, a baseline
                that does not broadcast, ``masking="mean"`` on integer inputs,
                ``mask_absent=True`` without masks, a model output of the wrong shape, class
                indices outside ``[0, C - 1]``, or NaN/inf in the inputs, the target or the
                model's output (value checks, see :func:`modbalance.value_checks`).
        """
        m = self.num_players
        if m > _MAX_INPUT_GAME_PLAYERS:
            raise ModbalanceError(
                f"InputMaskingGame enumerates all 2^M coalitions, each a forward pass of the "
                f"whole model: M={m} modalities would take {2**m} passes per call, so exact "
                f"enumeration is limited to M <= {_MAX_INPUT_GAME_PLAYERS}. Use ModalityGame if "
                "the model has a feature-level fusion head (one batched head pass), or sample: "
                "shapley_values(functools.partial(game.coalition_values, inputs, target), "
                f"{m}, method='permutation', modalities=game.modalities)."
            )
        table = self.coalition_values(inputs, target, coalition_masks(m), masks)
        return GameResult(
            table,
            shapley_from_table(table),
            interactions_from_table(table),
            self.modalities,
        )
