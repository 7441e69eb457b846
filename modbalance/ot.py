r"""Entropic optimal transport in the log domain, batched, and the :class:`SinkhornAligner` module.

:func:`sinkhorn` solves a whole batch of entropic OT problems ``(..., K, L)`` in one call with
log-domain Sinkhorn iterations. It is written for *training losses* on small problems (class
prototypes of a few modalities): a fixed number of iterations by default, so the call never
synchronises the host with the device and can be captured by CUDA graphs or ``torch.compile``;
an optional tolerance checked every ``check_every`` iterations; warm starts from previous
potentials; and an envelope gradient that costs O(1) memory in the number of iterations.

:class:`SinkhornAligner` turns two sets of prototypes into a normalised cost, solves the transport
problem and adds a structure term that pulls the plan toward the class-to-class matching
``i <-> i``. Its :meth:`SinkhornAligner.pairwise` method aligns all ``M (M - 1) / 2`` pairs of
``M`` modalities in one batched solve (PaSE, AAAI 2026).

References:
    Cuturi, "Sinkhorn Distances: Lightspeed Computation of Optimal Transport", NeurIPS 2013.
    Peyré and Cuturi, "Computational Optimal Transport", Foundations and Trends in ML, 2019
    (log-domain iterations, Section 4.4; envelope theorem for the gradient, Proposition 9.2).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from modbalance._checks import (
    ModbalanceError,
    check_choice,
    check_finite,
    check_finite_sums,
    check_int,
    check_real,
    check_same_dtype_device,
    check_tensor,
    value_checks_enabled,
)
from modbalance._geometry import pairwise_distance, unit

__all__ = [
    "AlignmentResult",
    "PairwiseAlignment",
    "SinkhornAligner",
    "SinkhornResult",
    "sinkhorn",
]

_GRAD_MODES = ("envelope", "unrolled")
_DEFAULT_FLAG_TOL = 1e-5
#: Iterations between two convergence checks (with a ``tol``): the default of :func:`sinkhorn`,
#: and what :class:`SinkhornAligner` uses.
_CHECK_EVERY = 10


@dataclass(frozen=True)
class _SolverOptions:
    """How :func:`_solve` iterates, checked already (the arguments of :func:`sinkhorn`).

    Attributes:
        epsilon: Entropic regularisation, in the units of the cost.
        max_iter: Iterations (the maximum when ``tol`` is given), at least 1.
        tol: ``None`` for a fixed iteration count, or the L1 marginal error at which to stop.
        check_every: Iterations between two convergence checks when ``tol`` is given.
        grad: ``"envelope"`` or ``"unrolled"``.
        cost_bound: A bound ``B`` known without reading the data (``0 <= cost <= B``), which
            lets the graph-free iterations run in the scaling domain
            (:func:`_scaling_iterations`); ``None``: the log domain.
    """

    epsilon: float
    max_iter: int
    tol: float | None = None
    check_every: int = _CHECK_EVERY
    grad: str = "envelope"
    cost_bound: float | None = None


class SinkhornResult(NamedTuple):
    r"""Output of :func:`sinkhorn` (batch shape ``(...)`` = broadcast of cost, ``a`` and ``b``).

    Attributes:
        plan: ``(..., K, L)`` transport plan
            :math:`P_{ij} = a_i b_j \exp((f_i + g_j - C_{ij}) / \varepsilon)`.
        value: ``(...)`` regularised transport cost :math:`\mathrm{OT}_\varepsilon =
            \langle P, C\rangle + \varepsilon\,\mathrm{KL}(P\,\|\,a b^\top)`, evaluated through
            the dual objective (equal at convergence, a lower bound before).
        value_linear: ``(...)`` linear transport cost :math:`\langle P, C\rangle` of the
            returned plan.
        potentials: ``(f, g)`` dual potentials of shapes ``(..., K)`` and ``(..., L)`` in the units
            of the cost; pass them back as ``init`` to warm-start the next solve.
        marginal_error: ``(...)`` :math:`\|P 1 - a\|_1 + \|P^\top 1 - b\|_1` (detached).
        n_iter: Number of Sinkhorn iterations run (a Python ``int``, known without a host sync).
        converged: ``(...)`` bool tensor, ``marginal_error <= tol`` (``1e-5`` when ``tol=None``).
    """

    plan: Tensor
    value: Tensor
    value_linear: Tensor
    potentials: tuple[Tensor, Tensor]
    marginal_error: Tensor
    n_iter: int
    converged: Tensor


class AlignmentResult(NamedTuple):
    """Output of :meth:`SinkhornAligner.forward`.

    Attributes:
        loss: ``(...)`` alignment loss, regularised transport cost plus
            ``structure_weight`` times the structure term.
        plan: ``(..., K, L)`` transport plan between the two prototype sets.
        cost: ``(..., K, L)`` normalised cost matrix the plan was computed on.
    """

    loss: Tensor
    plan: Tensor
    cost: Tensor


class PairwiseAlignment(NamedTuple):
    """Output of :meth:`SinkhornAligner.pairwise`.

    Attributes:
        loss: Scalar, mean of ``losses`` over the modality pairs.
        losses: ``(P,)`` alignment loss of every pair, ``P = M (M - 1) / 2``.
        plans: ``(P, K, K)`` transport plan of every pair.
        pairs: The ``P`` pairs ``(name_i, name_j)`` in the order of ``losses``, with ``i < j``
            in the iteration order of the ``prototypes`` mapping.
    """

    loss: Tensor
    losses: Tensor
    plans: Tensor
    pairs: tuple[tuple[str, str], ...]


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------


def _shape(t: Tensor | torch.Size) -> str:
    shape = t.shape if isinstance(t, Tensor) else t
    return "(" + ", ".join(str(s) for s in shape) + ")"


def _broadcast_shapes(*shapes: tuple[int, ...]) -> torch.Size:
    """:func:`torch.broadcast_shapes` in plain Python (that one costs ~0.2 ms a call).

    Raises:
        RuntimeError: If the shapes do not broadcast, as :func:`torch.broadcast_shapes` does.
    """
    out: list[int] = []
    for shape in shapes:
        for i, size in enumerate(reversed(tuple(shape))):
            if i == len(out):
                out.append(size)
            elif out[i] == 1:
                out[i] = size
            elif size != 1 and size != out[i]:
                raise RuntimeError(f"shapes {[tuple(s) for s in shapes]} do not broadcast")
    return torch.Size(reversed(out))


def _marginal_tolerance(dtype: torch.dtype, n: int) -> float:
    return 1e-5 + 8.0 * n * torch.finfo(dtype).eps


def _check_weights(
    m: Tensor, name: str, size: int, device: torch.device, shape_hint: str, values: bool = True
) -> None:
    """Shape, device, finiteness and non-negativity of a weight vector ``(..., size)``.

    ``values=False``: shape and device only (the caller checks the values).
    """
    if m.ndim < 1 or m.shape[-1] != size:
        raise ModbalanceError(
            f"`{name}` must have shape (..., {size}) ({shape_hint}), got shape {_shape(m)}."
        )
    if m.device != device:
        raise ModbalanceError(
            f"`{name}` is on {m.device} but must be on {device}; move it to the same device."
        )
    if values and value_checks_enabled():
        m = m.detach()
        check_finite(m, name)
        if bool((m < 0).any()):
            raise ModbalanceError(
                f"`{name}` must be non-negative, got a minimum of {float(m.min())}."
            )


def _check_marginal(m: Tensor | None, name: str, size: int, cost: Tensor, other: str) -> None:
    if m is None:
        return
    check_tensor(m, name, dtype="floating")
    _check_weights(m, name, size, cost.device, f"to match the {other} of `cost` {_shape(cost)}")
    if value_checks_enabled():
        m = m.detach()
        dev = float((m.sum(-1) - 1).abs().max())
        if dev > _marginal_tolerance(m.dtype, size):
            raise ModbalanceError(
                f"`{name}` must sum to 1 along its last dimension (a probability vector), got sums "
                f"deviating from 1 by up to {dev:.3g}; divide it by its sum."
            )


def _log_weights(m: Tensor | None, size: int, like: Tensor) -> Tensor:
    """Log of a marginal, ``-inf`` (with zero gradient) at zero-mass entries."""
    if m is None:
        return torch.full((size,), -math.log(size), dtype=like.dtype, device=like.device)
    m = m.to(like.dtype)
    tiny = torch.finfo(like.dtype).tiny
    return torch.where(m > 0, m.clamp_min(tiny).log(), torch.full_like(m, -math.inf))


# --------------------------------------------------------------------------------------------
# the solver
# --------------------------------------------------------------------------------------------


def sinkhorn(
    cost: Tensor,
    a: Tensor | None = None,
    b: Tensor | None = None,
    *,
    epsilon: float = 0.05,
    max_iter: int = 100,
    tol: float | None = None,
    check_every: int = _CHECK_EVERY,
    grad: str = "envelope",
    init: tuple[Tensor, Tensor] | None = None,
) -> SinkhornResult:
    r"""Solve a batch of entropic optimal transport problems with log-domain Sinkhorn iterations.

    For every problem in the batch it solves

    .. math::
        \mathrm{OT}_\varepsilon(C, a, b) = \min_{P \ge 0,\ P 1 = a,\ P^\top 1 = b}
            \langle P, C\rangle + \varepsilon\,\mathrm{KL}(P \,\|\, a b^\top),

    whose solution is :math:`P_{ij} = a_i b_j \exp((f_i + g_j - C_{ij})/\varepsilon)` for the dual
    potentials :math:`f, g`. One iteration updates both potentials in the log domain,

    .. math::
        f_i \leftarrow -\varepsilon \log \sum_j b_j \, e^{(g_j - C_{ij})/\varepsilon}, \qquad
        g_j \leftarrow -\varepsilon \log \sum_i a_i \, e^{(f_i - C_{ij})/\varepsilon},

    so it stays finite for any :math:`\varepsilon > 0` (POT's non-log solvers silently return 0
    at :math:`\varepsilon \le 0.005` in float32). After the ``g`` update the column marginals
    hold exactly; ``marginal_error`` measures what is left on the rows. ``value`` is the dual
    objective :math:`\langle f, a\rangle + \langle g, b\rangle - \varepsilon(\sum_{ij} P_{ij} - 1)`,
    which equals :math:`\mathrm{OT}_\varepsilon` at convergence. The plan does not change when a
    constant is added to ``cost``; the values shift by that constant.

    Gradients (both modes let gradients flow to ``cost``, ``a`` and ``b``, hence to features):

    * ``grad="envelope"`` (default) runs all but the last iteration without building a graph and
      then one differentiable iteration. ``value`` differentiates the *optimal regularised value*
      by the envelope theorem: :math:`\partial \mathrm{OT}_\varepsilon / \partial C = P`,
      :math:`\partial / \partial a = f - \bar f` and :math:`\partial / \partial b = g - \bar g`
      (centred potentials; ``a`` and ``b`` live on the simplex). ``plan``, ``potentials`` and
      ``value_linear`` are differentiable through the last iteration only (a one-step
      approximation of their Jacobian). Memory does not grow with ``max_iter``. First-order only.
    * ``grad="unrolled"`` backpropagates through every iteration: the exact derivative of the
      computed quantities (``value_linear`` then differentiates
      :math:`\langle P(C), C\rangle` as POT's ``sinkhorn2`` does). Memory grows with ``max_iter``.

    The two differ by design: the gradient of :math:`\langle P(C), C\rangle` and that of
    :math:`\mathrm{OT}_\varepsilon` differ by about 30% on random prototype costs.

    Host synchronisation: with ``tol=None`` the loop runs exactly ``max_iter`` iterations with no
    ``.item()`` and no data-dependent branching. With a tolerance the marginal error is read on the
    host every ``check_every`` iterations and the loop stops once every problem satisfies
    ``marginal_error <= tol``. The input value checks (finite cost, valid marginals, a cost
    spread the dtype can resolve) read data too; switch them off with
    :func:`modbalance.value_checks` for a sync-free call.

    Precision: float16 and bfloat16 inputs are solved in float32 (:math:`C/\varepsilon`
    overflows float16 at small :math:`\varepsilon`) and the results cast back to the input
    dtype. The exponent of the plan carries a rounding error of about
    :math:`(\max C - \min C)/\varepsilon` times the dtype's machine epsilon, so a cost that
    spans more than :math:`1/\text{eps}` epsilons (:math:`8.4 \cdot 10^6` in float32) is refused
    with an error instead of returning an ``inf``/NaN plan: normalise the cost or raise
    :math:`\varepsilon`.

    Args:
        cost: ``(..., K, L)`` cost matrices. Any batch shape.
        a: ``(..., K)`` source marginals (non-negative, summing to 1; zeros allowed), broadcastable
            against the batch shape of ``cost``. ``None`` means uniform.
        b: ``(..., L)`` target marginals, as ``a``. ``None`` means uniform.
        epsilon: Entropic regularisation :math:`\varepsilon > 0`, in the units of ``cost``.
        max_iter: Number of iterations (the maximum when ``tol`` is given), at least 1.
        tol: ``None`` for a fixed iteration count, or the L1 marginal error at which to stop.
        check_every: Iterations between two convergence checks when ``tol`` is given.
        grad: ``"envelope"`` or ``"unrolled"``, see above.
        init: Optional warm start ``(f, g)`` of shapes ``(..., K)`` and ``(..., L)``, typically the
            ``potentials`` of a previous solve. The first update recomputes ``f`` from ``g``.

    Returns:
        A :class:`SinkhornResult`.

    Raises:
        ModbalanceError: For a cost of rank < 2, empty or non-finite, marginals of the wrong size,
            negative or not summing to one, ``epsilon <= 0``, a cost spread too wide for
            ``epsilon`` in the working precision (see above) and other invalid arguments.

    Example:
        >>> import torch
        >>> from modbalance.ot import sinkhorn
        >>> cost = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
        >>> res = sinkhorn(cost, epsilon=0.1, max_iter=50)
        >>> res.plan.sum(-1)
        tensor([0.5000, 0.5000])
        >>> round(float(res.value_linear), 4), bool(res.converged)
        (0.0, True)
        >>> batch = torch.rand(8, 3, 5, 4)  # 8 x 3 problems of size 5 x 4 in one call
        >>> sinkhorn(batch, tol=1e-5, max_iter=500).plan.shape
        torch.Size([8, 3, 5, 4])
    """
    check_tensor(cost, "cost", dtype="floating", nonempty=True)
    if cost.ndim < 2:
        raise ModbalanceError(
            f"`cost` must have shape (..., K, L) with at least 2 dimensions, got shape "
            f"{_shape(cost)}."
        )
    check_finite(cost, "cost")
    k, n = cost.shape[-2], cost.shape[-1]
    out_dtype = cost.dtype
    work = torch.float32 if cost.dtype in (torch.float16, torch.bfloat16) else cost.dtype
    _check_marginal(a, "a", k, cost, "rows K")
    _check_marginal(b, "b", n, cost, "columns L")
    eps = check_real(epsilon, "epsilon", low=0, low_inclusive=False)
    _check_resolution(cost, eps, work)
    max_iter = check_int(max_iter, "max_iter", low=1)
    if tol is not None:
        tol = check_real(tol, "tol", low=0, low_inclusive=False)
    check_every = check_int(check_every, "check_every", low=1)
    check_choice(grad, "grad", _GRAD_MODES)

    batch = _sinkhorn_batch(cost, a, b)
    g0 = _check_init(init, k, n, batch)
    opts = _SolverOptions(eps, max_iter, tol, check_every, grad)

    if work == out_dtype:
        return _solve(cost, a, b, opts, g0, batch)
    # float16 / bfloat16: C / epsilon overflows their range (65504 for float16) at small
    # epsilon, so the iterations run in float32 and the results are cast back (differentiably)
    res = _solve(
        cost.to(work),
        None if a is None else a.to(work),
        None if b is None else b.to(work),
        opts,
        None if g0 is None else g0.to(work),
        batch,
    )
    return res._replace(
        plan=res.plan.to(out_dtype),
        value=res.value.to(out_dtype),
        value_linear=res.value_linear.to(out_dtype),
        potentials=(res.potentials[0].to(out_dtype), res.potentials[1].to(out_dtype)),
        marginal_error=res.marginal_error.to(out_dtype),
    )


def _sinkhorn_batch(cost: Tensor, a: Tensor | None, b: Tensor | None) -> torch.Size:
    """Broadcast batch shape of ``cost``, ``a`` and ``b`` for :func:`sinkhorn`."""
    shapes = [cost.shape[:-2]]
    if a is not None:
        shapes.append(a.shape[:-1])
    if b is not None:
        shapes.append(b.shape[:-1])
    try:
        return _broadcast_shapes(*shapes)
    except RuntimeError as exc:
        raise ModbalanceError(
            f"the batch shapes of `cost` {_shape(cost.shape[:-2])}, `a` and `b` must broadcast; "
            f"got `a` of shape {None if a is None else _shape(a)} and `b` of shape "
            f"{None if b is None else _shape(b)}."
        ) from exc


def _check_init(
    init: tuple[Tensor, Tensor] | None, k: int, n: int, batch: torch.Size
) -> Tensor | None:
    """Check the warm start ``init`` of :func:`sinkhorn`; return its ``g`` (or ``None``)."""
    if init is None:
        return None
    if not isinstance(init, (tuple, list)) or len(init) != 2:
        raise ModbalanceError(
            f"`init` must be a pair (f, g) of potentials, got {type(init).__name__}."
        )
    f0, g0 = init
    for t, nm, size in ((f0, "init[0]", k), (g0, "init[1]", n)):
        check_tensor(t, nm, dtype="floating")
        want = (*batch, size)
        if t.ndim < 1 or t.shape[-1] != size:
            raise ModbalanceError(
                f"`{nm}` must have shape {_shape(want)} (broadcastable), got {_shape(t)}."
            )
        try:
            _broadcast_shapes(t.shape, want)
        except RuntimeError as exc:
            raise ModbalanceError(
                f"`{nm}` must have shape {_shape(want)} (broadcastable), got {_shape(t)}."
            ) from exc
    check_finite(g0, "init[1]")
    return g0


def _check_resolution(cost: Tensor, eps: float, work: torch.dtype) -> None:
    """Refuse a cost whose spread is too many ``epsilon`` wide for ``work`` to resolve.

    The plan is ``exp((f_i + g_j - C_ij) / eps)``: the potentials are as large as ``C / eps``
    and their sum cancels to O(1), so a relative rounding error ``finfo(work).eps`` in numbers of
    size ``spread / eps`` leaves an error of ``spread / eps * finfo.eps`` in the exponent. Beyond
    1 the plan is meaningless, and soon ``inf``/NaN. A value check (reads ``cost``).
    """
    if not value_checks_enabled():
        return
    with torch.no_grad():
        flat = cost.detach().flatten(-2)
        spread = float((flat.amax(-1) - flat.amin(-1)).max())
    limit = 1.0 / torch.finfo(work).eps
    if spread / eps > limit:
        raise ModbalanceError(
            f"`cost` spans {spread:.3g} within a problem, {spread / eps:.3g} times `epsilon`="
            f"{eps:g}; {work} resolves at most about {limit:.3g} epsilons, beyond which the plan "
            "overflows to inf/NaN. Put `epsilon` in the units of the cost: normalise the cost "
            "(e.g. `cost / cost.amax()`, as SinkhornAligner does) or raise `epsilon` "
            "proportionally to the cost's scale."
        )


def _scaling_safe(cost: Tensor, cost_bound: float | None, eps: float) -> bool:
    r"""Whether :func:`_scaling_iterations` stays in range for a cost within ``[0, cost_bound]``.

    With :math:`R` = ``cost_bound / eps`` the scaled potentials of the iterations started at
    ``y = 0`` satisfy :math:`|y| \le R` and :math:`-2R \le w \le R` (each half-step is
    non-expansive in the sup norm and commutes with constant shifts, and a fixed point
    oscillates by at most :math:`R`), so every number of the scaling iterations lies within
    :math:`K L e^{\pm 2R}`. Float32 and float64 only (half precision keeps the log domain).
    """
    if cost_bound is None or cost.dtype not in (torch.float32, torch.float64):
        return False
    k, n = cost.shape[-2], cost.shape[-1]
    reach = 2.0 * cost_bound / eps + math.log(k * n) + 4.0
    return reach < math.log(torch.finfo(cost.dtype).max)


def _scaling_iterations(
    cost: Tensor, log_a: Tensor, log_b: Tensor, eps: float, n_loop: int, full: tuple[int, ...]
) -> Tensor:
    r"""The graph-free iterations of :func:`_solve` in the scaling domain; returns ``y``.

    The same iterates as the log-domain loop, :math:`e^{w} = K_b\,e^{-y}` and
    :math:`e^{y} = K_a^\top e^{-w}`, with the kernels
    :math:`(K_b)_{ij} = b_j e^{-C_{ij}/\varepsilon}` and
    :math:`(K_a)_{ij} = a_i e^{-C_{ij}/\varepsilon}` (zero at zero-mass entries) formed once:
    two batched matrix-vector products and two reciprocals per iteration instead of two
    log-sum-exps, equal up to float rounding. Only called where :func:`_scaling_safe` holds.
    """
    k, n = full[-2], full[-1]
    with torch.no_grad():
        ce = cost / eps
        kb = torch.exp(log_b.unsqueeze(-2) - ce).expand(full).reshape(-1, k, n)
        ka = torch.exp(log_a.unsqueeze(-1) - ce).expand(full).transpose(-1, -2).reshape(-1, n, k)
        v = torch.ones(kb.shape[0], n, 1, dtype=cost.dtype, device=cost.device)  # e^{-y}, y = 0
        u = torch.empty(kb.shape[0], k, 1, dtype=cost.dtype, device=cost.device)
        for _ in range(n_loop):
            torch.bmm(kb, v, out=u)  # e^{w}
            u.reciprocal_()  # e^{-w}
            torch.bmm(ka, u, out=v)  # e^{y}
            v.reciprocal_()  # e^{-y}
        return v.log_().neg_().reshape(*full[:-2], n)


def _iterations(
    cost: Tensor,
    log_a: Tensor,
    log_b: Tensor,
    opts: _SolverOptions,
    g0: Tensor | None,
    full: tuple[int, ...],
) -> tuple[Tensor, int]:
    """All Sinkhorn iterations of :func:`_solve` but the last: ``(y, iterations run)``.

    ``full`` is ``(*batch, K, L)``; ``g0`` the warm-start column potentials (or ``None``).
    """
    eps, tol, check_every = opts.epsilon, opts.tol, opts.check_every
    n = full[-1]
    # Scaled negative potentials: w = -f / eps (rows), y = -g / eps (columns), so that
    #   w = LSE_j(log b_j - C_ij / eps - y_j),  y = LSE_i(log a_i - C_ij / eps - w_i).
    if g0 is None:
        y = cost.new_zeros((*full[:-2], n))
    else:
        y = (g0.detach().to(cost.dtype) / -eps).expand(*full[:-2], n)

    def kernels(c: Tensor, la: Tensor, lb: Tensor) -> tuple[Tensor, Tensor]:
        ce = c / eps
        mb = (lb.unsqueeze(-2) - ce).expand(full)
        ma_t = (la.unsqueeze(-1) - ce).expand(full).transpose(-1, -2).contiguous()
        return mb, ma_t

    n_loop = opts.max_iter - 1
    done = 0
    track = opts.grad == "unrolled" and torch.is_grad_enabled()
    fixed = not track and tol is None and g0 is None  # graph-free, fixed count, cold start
    if n_loop > 0 and fixed and _scaling_safe(cost, opts.cost_bound, eps):
        y = _scaling_iterations(cost.detach(), log_a.detach(), log_b.detach(), eps, n_loop, full)
        done = n_loop
    elif n_loop > 0:
        with torch.set_grad_enabled(track):
            if track:
                mb, ma_t = kernels(cost, log_a, log_b)
            else:
                mb, ma_t = kernels(cost.detach(), log_a.detach(), log_b.detach())
            la_check = log_a.detach()
            w = None
            for it in range(n_loop):
                w_new = torch.logsumexp(mb - y.unsqueeze(-2), dim=-1)
                if tol is not None and w is not None and it % check_every == 0:
                    # Row sums of the current plan are a_i exp(w_new_i - w_i).
                    rows = torch.exp(la_check + (w_new - w).detach())
                    err = (rows - la_check.exp()).abs().sum(-1)
                    if bool((err <= tol).all()):
                        break
                w = w_new
                y = torch.logsumexp(ma_t - w.unsqueeze(-2), dim=-1)
                done = it + 1

    return y, done


def _dual_value(
    cost: Tensor,
    a: Tensor | None,
    b: Tensor | None,
    log_a: Tensor,
    log_b: Tensor,
    a_w: Tensor | None,
    b_w: Tensor | None,
    f: Tensor,
    g: Tensor,
    plan: Tensor,
    eps: float,
    grad: str,
    batch: torch.Size,
) -> Tensor:
    """Dual objective of :func:`_solve`, with the envelope gradient unless ``grad="unrolled"``."""
    k, n = cost.shape[-2], cost.shape[-1]
    a_t = a.to(cost.dtype) if a is not None else None
    b_t = b.to(cost.dtype) if b is not None else None
    if a_t is not None:
        a_val = a_t
    else:
        a_val = a_w if a_w is not None else torch.exp(log_a).expand(*batch, k)
    if b_t is not None:
        b_val = b_t
    else:
        b_val = b_w if b_w is not None else torch.exp(log_b).expand(*batch, n)
    if grad == "unrolled":
        value = (f * a_val).sum(-1) + (g * b_val).sum(-1) - eps * (plan.sum((-2, -1)) - 1)
    else:
        fd, gd, pd = f.detach(), g.detach(), plan.detach()
        value = (fd * a_val.detach()).sum(-1) + (gd * b_val.detach()).sum(-1)
        value = value - eps * (pd.sum((-2, -1)) - 1)
        # Re-attach the envelope gradient: dV/dC = P, dV/da = f - mean f, dV/db = g - mean g.
        if cost.requires_grad:
            value = value + (pd * (cost - cost.detach())).sum((-2, -1))
        if a_t is not None and a_t.requires_grad:
            fc = fd - fd.mean(-1, keepdim=True)
            value = value + (fc * (a_t - a_t.detach())).sum(-1)
        if b_t is not None and b_t.requires_grad:
            gc = gd - gd.mean(-1, keepdim=True)
            value = value + (gc * (b_t - b_t.detach())).sum(-1)
    return value


def _solve(
    cost: Tensor,
    a: Tensor | None,
    b: Tensor | None,
    opts: _SolverOptions,
    g0: Tensor | None,
    batch: torch.Size,
    *,
    diagnostics: bool = True,
    log_weights: tuple[Tensor, Tensor] | None = None,
) -> SinkhornResult:
    # ``g0``: the warm-start column potentials (or ``None``).
    # ``diagnostics=False``: ``value_linear``, ``marginal_error`` and ``converged`` are not
    # computed (empty tensors), for callers that never read them (SinkhornAligner).
    # ``log_weights``: ``(_log_weights(a, K, cost), _log_weights(b, L, cost))`` if already known.
    k, n = cost.shape[-2], cost.shape[-1]
    if log_weights is None:
        log_a = _log_weights(a, k, cost)
        log_b = _log_weights(b, n, cost)
    else:
        log_a, log_b = log_weights
    full = (*batch, k, n)

    y, done = _iterations(cost, log_a, log_b, opts, g0, full)
    eps, tol, grad = opts.epsilon, opts.tol, opts.grad

    # Final iteration, always differentiable (the only one that is in envelope mode): the
    # kernels of the loop, broadcast instead of expanded, the column update reduced over rows.
    ce = cost / eps
    y_in = y.detach() if grad == "envelope" else y
    w = torch.logsumexp((log_b.unsqueeze(-2) - ce) - y_in.unsqueeze(-2), dim=-1)
    y = torch.logsumexp((log_a.unsqueeze(-1) - ce) - w.unsqueeze(-1), dim=-2)
    n_iter = done + 1

    f = -eps * w
    g = -eps * y
    log_plan = (
        log_a.unsqueeze(-1) + log_b.unsqueeze(-2) + (f.unsqueeze(-1) + g.unsqueeze(-2) - cost) / eps
    )
    plan = torch.exp(log_plan)

    a_w = b_w = None
    if diagnostics:
        value_linear = (plan * cost).sum((-2, -1))
        a_w = torch.exp(log_a).expand(*batch, k)
        b_w = torch.exp(log_b).expand(*batch, n)
        with torch.no_grad():
            marginal_error = (plan.sum(-1) - a_w).abs().sum(-1)
            marginal_error = marginal_error + (plan.sum(-2) - b_w).abs().sum(-1)
            converged = marginal_error <= (tol if tol is not None else _DEFAULT_FLAG_TOL)
    else:
        value_linear = marginal_error = converged = plan.new_empty(0)

    value = _dual_value(cost, a, b, log_a, log_b, a_w, b_w, f, g, plan, eps, grad, batch)

    return SinkhornResult(
        plan=plan,
        value=value,
        value_linear=value_linear,
        potentials=(f, g),
        marginal_error=marginal_error,
        n_iter=n_iter,
        converged=converged,
    )


# --------------------------------------------------------------------------------------------
# the module
# --------------------------------------------------------------------------------------------


class _EnvelopeAlignment(torch.autograd.Function):
    """Last Sinkhorn iteration, plan, envelope value and structure term as one autograd node.

    Forward: the operations of :func:`_solve` after its graph-free iterations (``grad=
    "envelope"``, weights without gradient) and of :meth:`SinkhornAligner._structure`, on the
    same values. Backward, written out, as the composite operations differentiate them (equal
    up to float rounding): with ``A`` and ``B`` the softmax weights of the two log-sum-exps of
    the last iteration (``w`` over columns, ``y`` over rows, ``y_in`` held fixed),

    * the value: ``d C += g_loss P`` (the envelope gradient);
    * the structure term, ``S = -mean_valid(2 core_i + log a_i + log b_i) / 2`` with
      ``core_i = -w_i - y_i - C_ii / eps``: ``d core_i = -lambda g_loss [i valid] / count``;
    * the plan, ``log P_ij = log a_i + log b_j - w_i - y_j - C_ij / eps``: ``d log P = g_plan P``;
    * then ``d w -= (B d y)`` rows, ``d C -= (B * d y + A * d w) / eps``.

    Outputs ``(loss, plan, f, g)``; the potentials carry no gradient (only warm starts read them).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        cost: Tensor,
        log_a: Tensor,
        log_b: Tensor,
        y_in: Tensor,
        a_val: Tensor,
        b_val: Tensor,
        eps: float,
        structure_weight: float,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        ctx.set_materialize_grads(False)
        ce = cost / eps
        w = torch.logsumexp((log_b.unsqueeze(-2) - ce) - y_in.unsqueeze(-2), dim=-1)
        y = torch.logsumexp((log_a.unsqueeze(-1) - ce) - w.unsqueeze(-1), dim=-2)
        f = -eps * w
        g = -eps * y
        log_plan = (
            log_a.unsqueeze(-1)
            + log_b.unsqueeze(-2)
            + (f.unsqueeze(-1) + g.unsqueeze(-2) - cost) / eps
        )
        plan = torch.exp(log_plan)
        loss = (f * a_val).sum(-1) + (g * b_val).sum(-1)
        loss = loss - eps * (plan.sum((-2, -1)) - 1)
        valid = count = None
        if structure_weight > 0:
            core = (f + g - torch.diagonal(cost, dim1=-2, dim2=-1)) / eps
            log_rows = core + log_b  # log(P_ii / a_i)
            log_cols = core + log_a  # log(P_ii / b_i)
            valid = ((log_a > -math.inf) & (log_b > -math.inf)).expand(core.shape)
            terms = torch.where(valid, log_rows + log_cols, 0.0)
            count = valid.sum(-1).clamp_min(1).to(core.dtype)
            loss = loss + structure_weight * (-0.5 * terms.sum(-1) / count)
        ctx.save_for_backward(ce, log_a, log_b, y_in, w, y, plan)
        ctx.structure = (valid, count, eps, structure_weight)
        ctx.mark_non_differentiable(f, g)
        return loss, plan, f, g

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, g_loss: Tensor | None, g_plan: Tensor | None, *_: Any
    ) -> tuple[Tensor | None, ...]:
        ce, log_a, log_b, y_in, w, y, plan = ctx.saved_tensors
        valid, count, eps, structure_weight = ctx.structure
        nones = (None,) * 7
        if not ctx.needs_input_grad[0] or (g_loss is None and g_plan is None):
            return (None, *nones)
        g_cost = torch.zeros_like(plan)
        g_w = torch.zeros_like(w)
        g_y = torch.zeros_like(y)
        if g_loss is not None:
            g_cost = g_cost + g_loss[..., None, None] * plan  # the envelope gradient
            if structure_weight > 0:
                # d S / d core_i = -[i valid] / count, core_i = -w_i - y_i - C_ii / eps
                g_core = torch.where(valid, (-structure_weight * g_loss / count).unsqueeze(-1), 0.0)
                g_w = g_w - g_core
                g_y = g_y - g_core
                g_cost.diagonal(dim1=-2, dim2=-1).sub_(g_core / eps)
        if g_plan is not None:
            g_log = g_plan * plan
            g_w = g_w - g_log.sum(-1)
            g_y = g_y - g_log.sum(-2)
            g_cost = g_cost - g_log / eps
        # y_j = LSE_i(log a_i - C_ij / eps - w_i): softmax weights over i
        rows = torch.exp(((log_a.unsqueeze(-1) - ce) - w.unsqueeze(-1)) - y.unsqueeze(-2))
        rows = rows * g_y.unsqueeze(-2)
        g_w = g_w - rows.sum(-1)
        # w_i = LSE_j(log b_j - C_ij / eps - y_in_j): softmax weights over j
        cols = torch.exp(((log_b.unsqueeze(-2) - ce) - y_in.unsqueeze(-2)) - w.unsqueeze(-1))
        g_cost = g_cost - (rows + cols * g_w.unsqueeze(-1)) / eps
        return (g_cost, *nones)


def _align_batch(cost: Tensor, a: Tensor | None, b: Tensor | None) -> torch.Size:
    """Broadcast batch shape of the cost and the weights in :meth:`SinkhornAligner._align`."""
    shapes = [cost.shape[:-2]]
    shapes += [m.shape[:-1] for m in (a, b) if m is not None]
    try:
        return _broadcast_shapes(*shapes)
    except RuntimeError as exc:
        raise ModbalanceError(
            f"the batch shapes of the prototypes {_shape(cost.shape[:-2])} and of the weights "
            f"`a`/`b` must broadcast."
        ) from exc


def _check_prototypes(prototypes: Mapping[str, Tensor]) -> list[str]:
    """Check the prototypes of :meth:`SinkhornAligner.pairwise`; return the modality names."""
    if not isinstance(prototypes, Mapping):
        raise TypeError(
            f"`prototypes` must be a mapping {{modality: tensor}}, got {type(prototypes).__name__}."
        )
    names = list(prototypes)
    if len(names) < 2:
        raise ModbalanceError(
            f"`prototypes` must hold at least 2 modalities to align, got {len(names)}: {names}."
        )
    first = prototypes[names[0]]
    for nm in names:
        t = check_tensor(prototypes[nm], f"prototypes[{nm!r}]", ndim=2, dtype="floating")
        if t.shape != first.shape:
            raise ModbalanceError(
                f"every prototype set must have the same shape (K, D); "
                f"`prototypes[{names[0]!r}]` has {_shape(first)} but `prototypes[{nm!r}]` has "
                f"{_shape(t)}."
            )
    return names


def _check_masses(masses: Mapping[str, Tensor], names: list[str], k: int) -> None:
    """Check the keys and shapes of the masses of :meth:`SinkhornAligner.pairwise`."""
    if not isinstance(masses, Mapping) or set(masses) != set(names):
        got = list(masses) if isinstance(masses, Mapping) else type(masses).__name__
        raise ModbalanceError(
            f"`masses` must be a mapping with the same keys as `prototypes` ({names}), got {got}."
        )
    for nm in names:
        m = check_tensor(masses[nm], f"masses[{nm!r}]", ndim=1, dtype="numeric")
        if m.shape[0] != k:
            raise ModbalanceError(
                f"`masses[{nm!r}]` must have shape ({k}) (one weight per class), got {_shape(m)}."
            )


class SinkhornAligner(nn.Module):
    r"""Align two sets of class prototypes with entropic optimal transport (PaSE alignment loss).

    The cost between prototype :math:`x_i` and :math:`y_j` is normalised so that
    :math:`\varepsilon` means the same at any feature scale:

    * ``"cosine"``: :math:`C_{ij} = (1 - \cos(x_i, y_j)) / 2 \in [0, 1]`;
    * ``"sqeuclidean"``: :math:`C_{ij} = \|x_i - y_j\|^2 / s` with :math:`s` the *detached*
      maximum of :math:`\|x_i - y_j\|^2` over the entries whose classes carry mass on both sides,
      so :math:`C \in [0, 1]` and the scale itself receives no gradient.

    With the plan :math:`P` of :func:`sinkhorn` the loss of one problem is

    .. math::
        \mathcal{L} = \mathrm{OT}_\varepsilon(C, a, b) + \lambda\, S(P), \qquad
        S(P) = -\frac{1}{2|V|} \sum_{i \in V}
            \Big( \log \frac{P_{ii}}{a_i} + \log \frac{P_{ii}}{b_i} \Big),

    where :math:`\lambda` is ``structure_weight`` and :math:`V` the classes with mass on both sides.
    :math:`S` is the cross-entropy between the row- (and column-) normalised plan and the identity
    matching ``i <-> i``: zero when class :math:`i` of one modality is transported only to class
    :math:`i` of the other, :math:`\log K` for a uniform plan. It is computed from the log-domain
    potentials (never ``log 0``) and ignores classes absent on either side. The transport term
    uses the envelope gradient of :func:`sinkhorn` (exactly :math:`P` w.r.t. :math:`C`); the
    structure term differentiates through the last Sinkhorn iteration (``grad="envelope"``) or all
    of them (``grad="unrolled"``).

    By default both prototype sets receive gradient, so both modalities move toward each other;
    ``gradient_side="x"`` or ``"y"`` detaches the other side (e.g. to align toward a fixed anchor).

    Cost per call: the graph-free iterations (all but the last) run in the scaling domain, two
    batched matrix-vector products per iteration, where the normalised cost (in :math:`[0, 1]`)
    keeps them in range (float32/float64 and :math:`\varepsilon` above about 0.025; otherwise
    the log domain); with the envelope gradient, the last iteration, the value and the
    structure term form one autograd node. Both give the log-domain results up to float
    rounding.

    Args:
        metric: ``"cosine"`` or ``"sqeuclidean"``.
        epsilon: Entropic regularisation on the normalised cost.
        max_iter: Sinkhorn iterations (fixed when ``tol`` is ``None``, so no host sync).
        tol: Optional L1 marginal tolerance checked every 10 iterations (synchronises).
        structure_weight: :math:`\lambda \ge 0`; ``0`` disables the structure term (and allows
            ``K != L``).
        grad: ``"envelope"`` or ``"unrolled"``, as in :func:`sinkhorn`.
        warm_start: Reuse the potentials of the previous call (kept in non-persistent buffers)
            when the problem shapes match.
        gradient_side: ``"both"``, ``"x"`` or ``"y"``: which inputs receive gradient.

    Attributes:
        warm_f: ``(..., K)`` potentials ``f`` of the last call (non-persistent buffer, ``None``
            until a call with ``warm_start=True``).
        warm_g: ``(..., L)`` potentials ``g`` of the last call, used to warm-start the next one.
        last_n_iter: Sinkhorn iterations run by the last call (for monitoring).

    Raises:
        ModbalanceError: For invalid hyperparameters.

    Example:
        >>> import torch
        >>> from modbalance.ot import SinkhornAligner
        >>> aligner = SinkhornAligner(epsilon=0.05, max_iter=50)
        >>> text = torch.randn(7, 16, requires_grad=True)
        >>> audio = torch.randn(7, 16, requires_grad=True)
        >>> out = aligner(text, audio)
        >>> out.plan.shape, out.loss.shape
        (torch.Size([7, 7]), torch.Size([]))
        >>> out.loss.backward()
        >>> text.grad is not None and audio.grad is not None
        True
    """

    #: The Sinkhorn solve of the composite path, :func:`_solve` (the parity test's subclass runs
    #: POT's iterations here).
    _sinkhorn = staticmethod(_solve)

    def __init__(
        self,
        *,
        metric: str = "cosine",
        epsilon: float = 0.05,
        max_iter: int = 50,
        tol: float | None = None,
        structure_weight: float = 1.0,
        grad: str = "envelope",
        warm_start: bool = False,
        gradient_side: str = "both",
    ) -> None:
        super().__init__()
        self.metric = check_choice(metric, "metric", ("cosine", "sqeuclidean"))
        self.epsilon = check_real(epsilon, "epsilon", low=0, low_inclusive=False)
        self.max_iter = check_int(max_iter, "max_iter", low=1)
        self.tol = None if tol is None else check_real(tol, "tol", low=0, low_inclusive=False)
        self.structure_weight = check_real(structure_weight, "structure_weight", low=0)
        self.grad = check_choice(grad, "grad", _GRAD_MODES)
        if not isinstance(warm_start, bool):
            raise TypeError(f"`warm_start` must be a bool, got {type(warm_start).__name__}.")
        self.warm_start = warm_start
        self.gradient_side = check_choice(gradient_side, "gradient_side", ("both", "x", "y"))
        self.register_buffer("warm_f", None, persistent=False)
        self.register_buffer("warm_g", None, persistent=False)
        self.last_n_iter: int | None = None

    def extra_repr(self) -> str:
        """Hyperparameters shown by ``repr(module)``."""
        return (
            f"metric={self.metric!r}, epsilon={self.epsilon}, max_iter={self.max_iter}, "
            f"tol={self.tol}, structure_weight={self.structure_weight}, grad={self.grad!r}, "
            f"warm_start={self.warm_start}"
        )

    def reset_warm_start(self) -> None:
        """Forget the potentials kept for warm starts."""
        self.warm_f = None
        self.warm_g = None

    @staticmethod
    def _weights(m: Tensor | None, name: str, size: int, like: Tensor) -> Tensor | None:
        if m is None:
            return None
        check_tensor(m, name, dtype="numeric")
        hint = "one weight per prototype"
        _check_weights(m, name, size, like.device, hint, values=False)
        given = m
        m = m.to(like.dtype)
        total = m.sum(-1, keepdim=True)
        if value_checks_enabled():
            td = total.detach()
            # One host read when all is well (finite, non-negative, a positive total in every
            # problem); otherwise the element-wise checks, in order, with their messages.
            stats = torch.stack([td.sum(), m.detach().amin(), td.amin()]).tolist()
            if not (math.isfinite(stats[0]) and stats[1] >= 0 and stats[2] > 0):
                _check_weights(given, name, size, like.device, hint)
                if bool((td <= 0).any()):
                    raise ModbalanceError(
                        f"`{name}` must have positive total weight in every problem, got an "
                        f"all-zero weight vector."
                    )
        return m / total.clamp_min(torch.finfo(like.dtype).tiny)

    def _cost(
        self,
        x: Tensor,
        y: Tensor,
        weights: tuple[Tensor | None, Tensor | None],
        units: tuple[Tensor, Tensor] | None,
    ) -> Tensor:
        """The normalised ``(..., K, L)`` cost of :meth:`_align` (see the class docstring).

        ``weights``: ``(a, b)``; a zero weight leaves its row or column out of the
        ``"sqeuclidean"`` scale. ``units``: as in :meth:`_align`.
        """
        if self.metric == "cosine":
            xn, yn = (unit(x), unit(y)) if units is None else units
            return (pairwise_distance(xn, yn, "cosine", normalized=True) * 0.5).clamp(0.0, 1.0)
        sq = pairwise_distance(x, y, "sqeuclidean")
        a, b = weights
        with torch.no_grad():
            masked = sq
            if a is not None or b is not None:
                keep = torch.ones_like(sq, dtype=torch.bool)
                if a is not None:
                    keep = keep & (a > 0).unsqueeze(-1)
                if b is not None:
                    keep = keep & (b > 0).unsqueeze(-2)
                masked = torch.where(keep, sq, torch.zeros_like(sq))
            scale = masked.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
        return sq / scale

    def forward(
        self, x: Tensor, y: Tensor, a: Tensor | None = None, b: Tensor | None = None
    ) -> AlignmentResult:
        """Align prototypes ``x`` with prototypes ``y``.

        Args:
            x: ``(..., K, D)`` prototypes (e.g. class means) of the first modality.
            y: ``(..., L, D)`` prototypes of the second modality (``L == K`` when
                ``structure_weight > 0``).
            a: Optional ``(..., K)`` non-negative class weights of ``x`` (e.g. class counts; zero
                marks an absent class), normalised internally. ``None`` means uniform.
            b: Optional ``(..., L)`` weights of ``y``, as ``a``.

        Returns:
            :class:`AlignmentResult` with ``loss`` of shape ``(...)``.

        Raises:
            ModbalanceError: For wrong ranks or sizes, ``K != L`` with a structure term, negative
                or all-zero weights, or non-finite prototypes.
        """
        check_tensor(x, "x", dtype="floating", nonempty=True)
        check_tensor(y, "y", dtype="floating", nonempty=True)
        for t, nm, sym in ((x, "x", "K"), (y, "y", "L")):
            if t.ndim < 2:
                raise ModbalanceError(
                    f"`{nm}` must have shape (..., {sym}, D) with at least 2 dimensions, got "
                    f"shape {_shape(t)}."
                )
        if x.shape[-1] != y.shape[-1]:
            raise ModbalanceError(
                f"`x` and `y` must have the same feature size D, got shapes {_shape(x)} and "
                f"{_shape(y)}."
            )
        check_same_dtype_device(x, "x", y, "y")
        k, n = x.shape[-2], y.shape[-2]
        if self.structure_weight > 0 and k != n:
            raise ModbalanceError(
                f"the structure term matches class i with class i and needs as many prototypes in "
                f"`x` as in `y`, got K={k} (x shape {_shape(x)}) and L={n} (y shape "
                f"{_shape(y)}); set structure_weight=0 to align sets of different sizes."
            )
        check_finite_sums((x, "x"), (y, "y"))
        a = self._weights(a, "a", k, x)
        b = self._weights(b, "b", n, x)
        return self._align(x, y, a, b)

    def _align(
        self,
        x: Tensor,
        y: Tensor,
        a: Tensor | None,
        b: Tensor | None,
        units: tuple[Tensor, Tensor] | None = None,
    ) -> AlignmentResult:
        """:meth:`forward` after its checks: ``a`` and ``b`` normalised (or ``None``).

        ``units``: ``(normalize(x), normalize(y))`` if already known (cosine metric only).
        """
        k, n = x.shape[-2], y.shape[-2]
        if self.gradient_side == "x":
            y = y.detach()
            units = None if units is None else (units[0], units[1].detach())
        elif self.gradient_side == "y":
            x = x.detach()
            units = None if units is None else (units[0].detach(), units[1])

        cost = self._cost(x, y, (a, b), units)
        batch = _align_batch(cost, a, b)

        log_a = _log_weights(a, k, cost)
        log_b = _log_weights(b, n, cost)
        g0 = self._warm_g0(cost, batch)
        # The normalised cost lies in [0, 1]: cosine by its clamp, "sqeuclidean" when no entry
        # is left out of its scale (no weights); the bound selects the fast iterations.
        bound = 1.0 if self.metric == "cosine" or (a is None and b is None) else None
        opts = _SolverOptions(
            self.epsilon, self.max_iter, self.tol, _CHECK_EVERY, self.grad, cost_bound=bound
        )
        if self._one_node(cost, a, b, batch):
            y_in, done = _iterations(cost, log_a, log_b, opts, g0, (*batch, k, n))
            a_val = a if a is not None else torch.exp(log_a).expand(*batch, k)
            b_val = b if b is not None else torch.exp(log_b).expand(*batch, n)
            loss, plan, f, g = _EnvelopeAlignment.apply(
                cost, log_a, log_b, y_in.detach(), a_val, b_val, self.epsilon,
                self.structure_weight,
            )  # fmt: skip
            self.last_n_iter = done + 1
            if self.warm_start:
                self.warm_f, self.warm_g = f, g
            return AlignmentResult(loss=loss, plan=plan, cost=cost)
        res = self._sinkhorn(
            cost, a, b, opts, g0, batch, diagnostics=False, log_weights=(log_a, log_b)
        )
        self.last_n_iter = res.n_iter
        if self.warm_start:
            self.warm_f = res.potentials[0].detach()
            self.warm_g = res.potentials[1].detach()

        loss = res.value
        if self.structure_weight > 0:
            loss = loss + self.structure_weight * self._structure(cost, res, log_a, log_b)
        return AlignmentResult(loss=loss, plan=res.plan, cost=cost)

    def _warm_g0(self, cost: Tensor, batch: torch.Size) -> Tensor | None:
        """The stored column potentials if they fit this solve and warm starts are on."""
        n = cost.shape[-1]
        g0 = None
        warm = self.warm_g
        if (
            self.warm_start
            and warm is not None
            and warm.shape == (*batch, n)
            and warm.dtype == cost.dtype
            and warm.device == cost.device
        ):
            g0 = warm
        return g0

    def _one_node(
        self, cost: Tensor, a: Tensor | None, b: Tensor | None, batch: torch.Size
    ) -> bool:
        """Whether :class:`_EnvelopeAlignment` computes the rest of :meth:`_align`.

        The envelope gradient, weights without gradient, a cost with the full batch shape, in
        float32/float64 outside autocast and torch.func transforms; otherwise the composite
        operations of :func:`_solve` and :meth:`_structure` run.
        """
        return (
            self.grad == "envelope"
            and not (a is not None and a.requires_grad)
            and not (b is not None and b.requires_grad)
            and cost.shape[:-2] == batch
            and cost.dtype in (torch.float32, torch.float64)
            and not torch.is_autocast_enabled(cost.device.type)
            and not torch._C._are_functorch_transforms_active()
        )

    def _structure(self, cost: Tensor, res: SinkhornResult, log_a: Tensor, log_b: Tensor) -> Tensor:
        f, g = res.potentials
        # log P_ii - log a_i - log b_i, finite for every class.
        core = (f + g - torch.diagonal(cost, dim1=-2, dim2=-1)) / self.epsilon
        log_rows = core + log_b  # log(P_ii / a_i)
        log_cols = core + log_a  # log(P_ii / b_i)
        # classes with mass on both sides: the log weights are finite or -inf (zero mass)
        valid = (log_a > -math.inf) & (log_b > -math.inf)
        valid = valid.expand(core.shape)
        terms = torch.where(valid, log_rows + log_cols, 0.0)
        count = valid.sum(-1).clamp_min(1).to(core.dtype)
        return -0.5 * terms.sum(-1) / count

    def pairwise(
        self,
        prototypes: Mapping[str, Tensor],
        masses: Mapping[str, Tensor] | None = None,
    ) -> PairwiseAlignment:
        """Align every pair of modalities in one batched Sinkhorn solve.

        Args:
            prototypes: ``{modality: (K, D) prototypes}`` for ``M >= 2`` modalities, e.g. the
                differentiable per-class mean features of the current batch.
            masses: Optional ``{modality: (K,) class weights}`` with the same keys, e.g. per-class
                sample counts in the batch; zero marks a class absent from that modality's batch.
                Normalised internally; absent classes get no transported mass and are ignored by
                the structure term.

        Returns:
            :class:`PairwiseAlignment` with ``P = M (M - 1) / 2`` pairs.

        Raises:
            ModbalanceError: For fewer than two modalities, prototypes of different shapes, or
                masses whose keys or shapes do not match.

        Example:
            >>> import torch
            >>> from modbalance.ot import SinkhornAligner
            >>> names = ("text", "audio", "vision")
            >>> protos = {m: torch.randn(3, 8, requires_grad=True) for m in names}
            >>> counts = {m: torch.tensor([4.0, 0.0, 2.0]) for m in protos}  # class 1 absent
            >>> out = SinkhornAligner().pairwise(protos, counts)
            >>> out.pairs
            (('text', 'audio'), ('text', 'vision'), ('audio', 'vision'))
            >>> out.plans.shape, bool(torch.isfinite(out.loss))
            (torch.Size([3, 3, 3]), True)
        """
        names = _check_prototypes(prototypes)
        first = prototypes[names[0]]
        stacked = torch.stack([prototypes[nm] for nm in names])
        pairs = tuple(itertools.combinations(range(len(names)), 2))
        # Same (row-major) order as `pairs`, built on the device without a host-to-device copy.
        idx_i, idx_j = torch.triu_indices(len(names), len(names), 1, device=stacked.device)
        wa = wb = None
        if masses is not None:
            _check_masses(masses, names, first.shape[0])
        # forward()'s checks, once per modality rather than once per pair and side
        check_finite_sums((stacked, "prototypes"))
        if masses is not None:
            w = torch.stack([masses[nm].to(stacked.dtype) for nm in names])
            w = self._weights(w, "masses", first.shape[0], stacked)  # checked and normalised
            assert w is not None
            wa, wb = w[idx_i], w[idx_j]
        units = None
        if self.metric == "cosine":  # the unit prototypes of every modality, normalised once
            units_all = unit(stacked)
            units = x, y = units_all[idx_i], units_all[idx_j]
        else:
            x, y = stacked[idx_i], stacked[idx_j]
        out = self._align(x, y, wa, wb, units)
        return PairwiseAlignment(
            loss=out.loss.mean(),
            losses=out.loss,
            plans=out.plan,
            pairs=tuple((names[i], names[j]) for i, j in pairs),
        )
