"""Obviously correct references shared by the tests.

* Shapley values by enumeration, written out by hand;
* the entropic OT iterations of POT (``ot.solve_batch``), for the parity of
  :class:`~modbalance.ot.SinkhornAligner` (POT is a test dependency, imported on first use:
  POT 0.9.7 initialises CUDA on import).
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

import modbalance.ot as mot


def code_of(players) -> int:
    return sum(1 << p for p in players)


def brute_force_permutation_mean(table: torch.Tensor, perms) -> torch.Tensor:
    """Average marginal contribution over the given orderings of the players."""
    m = table.numel().bit_length() - 1
    phi = torch.zeros(m, dtype=torch.float64)
    for perm in perms:
        prefix: list[int] = []
        for player in perm:
            before = table[code_of(prefix)]
            prefix.append(player)
            phi[player] += table[code_of(prefix)] - before
    return phi / len(perms)


def brute_force_shapley(table: torch.Tensor) -> torch.Tensor:
    """Average marginal contribution over all M! orderings."""
    m = table.numel().bit_length() - 1
    return brute_force_permutation_mean(table, list(itertools.permutations(range(m))))


def pot_sinkhorn(
    cost: Tensor, a: Tensor, b: Tensor, eps: float, max_iter: int, tol: float | None, grad: str
) -> mot.SinkhornResult:
    """POT's ``ot.solve_batch`` iterations, then modbalance's last, differentiable one."""
    import ot  # lazy: POT 0.9.7 initialises CUDA on import

    k, n = cost.shape[-2], cost.shape[-1]
    batch = cost.shape[:-2]
    c = cost.detach().reshape(-1, k, n)
    aa = a.detach().expand(*batch, k).reshape(-1, k)
    bb = b.detach().expand(*batch, n).reshape(-1, n)
    res = ot.solve_batch(
        c,
        reg=eps,
        a=aa,
        b=bb,
        max_iter=max(max_iter - 1, 1),
        tol=0.0 if tol is None else tol,
        method="log_sinkhorn",
        reg_type="kl",
        grad="detach",
    )
    v_pot = res.potentials[1]
    # POT: log P = -C/eps + u + v; here: log P = log a + log b + (f + g - C)/eps.
    g = torch.where(bb > 0, eps * (v_pot - bb.clamp_min(torch.finfo(c.dtype).tiny).log()), 0.0)
    g = g.reshape(*batch, n)
    last = mot._SolverOptions(eps, 1, None, 1, grad)  # one differentiable iteration from g
    out = mot._solve(cost, a, b, last, g, batch)
    return out._replace(n_iter=int(res.log["n_iter"]) + 2)


def _pot_solve(cost, a, b, opts, g0, batch, **_) -> mot.SinkhornResult:
    """:func:`pot_sinkhorn` in the place of ``modbalance.ot._solve`` (uniform ``None`` weights)."""
    k, n = cost.shape[-2], cost.shape[-1]
    like = {"dtype": cost.dtype, "device": cost.device}
    a = a if a is not None else torch.full((k,), 1.0 / k, **like)
    b = b if b is not None else torch.full((n,), 1.0 / n, **like)
    full = cost.expand(*batch, k, n)
    return pot_sinkhorn(full, a, b, opts.epsilon, opts.max_iter, opts.tol, opts.grad)


class PotAligner(mot.SinkhornAligner):
    """:class:`~modbalance.ot.SinkhornAligner` with its iterations run by POT (no warm start)."""

    _sinkhorn = staticmethod(_pot_solve)

    def _one_node(self, *args) -> bool:
        return False


# ------------------------------------------------------------ gradients of a module's parameters
def grads(module: torch.nn.Module) -> dict[str, Tensor]:
    """``{name: gradient}`` of every parameter (zeros where there is none), cloned."""
    return {
        k: torch.zeros_like(p) if p.grad is None else p.grad.clone()
        for k, p in module.named_parameters()
    }


def assert_grads_close(a, b, rtol: float = 1e-5, atol: float = 1e-7) -> None:
    """The same parameters, and every gradient close (named in the failure)."""
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=k)


def grads_differ(a, b, rtol: float = 1e-5, atol: float = 1e-7) -> bool:
    """Whether some gradient differs beyond the tolerance (a perturbed rule must be seen)."""
    return any(not torch.allclose(a[k], b[k], rtol=rtol, atol=atol) for k in a)


def make_data(dims, n: int, task: str, seed: int = 0, classes: int = 3):
    """Seeded float64 inputs ``{m: (n, d)}`` and a target: ``(n,)`` values or class indices."""
    g = torch.Generator().manual_seed(seed)
    x = {m: torch.randn(n, d, generator=g, dtype=torch.float64) for m, d in dims.items()}
    if task == "regression":
        return x, torch.randn(n, generator=g, dtype=torch.float64)
    return x, torch.randint(0, classes, (n,), generator=g)
