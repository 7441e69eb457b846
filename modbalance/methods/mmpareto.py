r"""MMPareto (Wei & Hu, ICML 2024): Pareto integration of multimodal and unimodal gradients.

Transcribed from the authors' ``code/MMPareto.py`` (GeWu-Lab/MMPareto_ICML2024).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn

from modbalance._checks import ModbalanceError, check_real, check_replace
from modbalance._groups import parse_groups
from modbalance.balancing import (
    BalancingMethod,
    StepOutput,
    check_phases,
    combine_losses,
    unimodal_terms,
)
from modbalance.distributed import all_reduce_mean, is_distributed

__all__ = ["MMPareto", "min_norm_2"]


def min_norm_2(v11: Tensor, v12: Tensor, v22: Tensor) -> Tensor:
    r"""Weight :math:`c` of the min-norm point :math:`c\,x_1 + (1 - c)\,x_2` of two vectors.

    The analytic two-vector case of MGDA's min-norm solver (Sener & Koltun, 2018), exactly as in
    the authors' ``MinNormSolver._min_norm_element_from2``, including its clipping to
    ``0.999``/``0.001`` at the ends of the segment:

    .. math::

        c = \begin{cases}
            0.999 & \langle x_1, x_2\rangle \ge \lVert x_1\rVert^2 \\
            0.001 & \langle x_1, x_2\rangle \ge \lVert x_2\rVert^2 \\
            \dfrac{\lVert x_2\rVert^2 - \langle x_1, x_2\rangle}
                  {\lVert x_1 - x_2\rVert^2} & \text{otherwise.}
        \end{cases}

    Args:
        v11: :math:`\lVert x_1\rVert^2` (a tensor, any shape).
        v12: :math:`\langle x_1, x_2\rangle`.
        v22: :math:`\lVert x_2\rVert^2`.

    Returns:
        :math:`c`, same shape; no host synchronisation.

    Example:
        >>> import torch
        >>> from modbalance.methods.mmpareto import min_norm_2
        >>> min_norm_2(torch.tensor(1.0), torch.tensor(0.0), torch.tensor(1.0))
        tensor(0.5000)
    """
    denom = v11 + v22 - 2.0 * v12
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    mid = (v22 - v12) / safe
    return torch.where(
        v12 >= v11,
        torch.full_like(mid, 0.999),
        torch.where(v12 >= v22, torch.full_like(mid, 0.001), mid),
    )


def _dot(xs: list[Tensor], ys: list[Tensor]) -> Tensor:
    return torch.stack([(x * y).sum() for x, y in zip(xs, ys)]).sum()


def _reduce(grads: list[Tensor]) -> list[Tensor]:
    """Average a list of gradients over ranks (one collective; identity without DDP)."""
    if not is_distributed() or not grads:
        return grads
    flat = all_reduce_mean(torch.cat([g.reshape(-1) for g in grads]))
    out, start = [], 0
    for g in grads:
        out.append(flat[start : start + g.numel()].view_as(g))
        start += g.numel()
    return out


class MMPareto(BalancingMethod):
    r"""MMPareto: per encoder, Pareto-integrate its multimodal and unimodal gradients.

    When the two gradients conflict their MGDA min-norm combination is used, then the magnitude
    is rescaled.

    For the parameters :math:`\theta_m` of encoder :math:`m` let
    :math:`g^\text{mm} = \nabla_{\theta_m}\mathcal L_\text{task}` (the fused loss) and
    :math:`g^\text{uni} = \nabla_{\theta_m}\mathcal L_m` (the loss of modality :math:`m`'s own
    unimodal head), each over all of :math:`\theta_m`. Following the authors' code,

    .. math::

        (k_1, k_2) = \begin{cases}
            (\tfrac12, \tfrac12) & \cos(g^\text{mm}, g^\text{uni}) > 0 \\
            (c, 1 - c) & \text{otherwise}, \quad
                c = \arg\min_{c \in [0, 1]} \lVert c\,g^\text{mm} + (1-c)\,g^\text{uni}\rVert
        \end{cases}

    (:func:`min_norm_2`, with the solver's clipping to :math:`[0.001, 0.999]`), and then, **per
    parameter tensor** :math:`p` of the encoder,

    .. math::

        n_p = 2 k_1 g^\text{mm}_p + 2 k_2 g^\text{uni}_p, \qquad
        g_p \leftarrow \gamma\,\max\!\Bigl(1, \frac{\lVert s_p\rVert}{\lVert n_p\rVert}\Bigr)\,
        n_p,

    where :math:`s_p = g^\text{mm}_p + \sum_j g^\text{uni}_{j,p}` is the plain gradient of the
    summed objective :math:`\mathcal L_\text{task} + \sum_j \mathcal L_j` and :math:`\gamma = 1.5`.
    Parameters outside the groups (fusion head, unimodal heads, any shared layer) get the plain
    gradient of the sum of all loss terms.

    How it maps onto the step: :meth:`losses` replaces the step's ``"readout"`` term with the
    gradient-carrying unimodal terms ``"unimodal_<m>"`` (the official objective is
    :math:`\mathcal L_\text{task} + \sum_m \mathcal L_m`, averaged over the samples that have the
    modality); :meth:`backward` takes over the backward pass: :math:`M + 1` calls of
    :func:`torch.autograd.grad` restricted to the groups' parameters (plus one for any other loss
    terms), then one ordinary ``backward()`` of the sum for every other parameter, after which
    the groups' ``.grad`` are overwritten (added to any gradient accumulated before, as
    ``backward()`` would).

    Deviations from the official code, on purpose:

    * **Other loss terms** (calibration, alignment, ... from other methods) are not part of the
      official objective; their gradient on the encoders is added unchanged after the
      integration, and they do not enter :math:`s_p`.
    * :math:`n_p = 0` with :math:`s_p \ne 0` gives ``inf * 0 = NaN`` in the original; here the
      parameter's gradient is zero.
    * **M > 2 and regression**: the rule is per encoder and pairs its own unimodal loss with the
      fused one, so it extends to any number of modalities unchanged; regression uses the L1 task
      loss (the original is classification with cross-entropy).
    * **DDP**: :func:`torch.autograd.grad` does not all-reduce, so the per-loss gradients are
      averaged over ranks (one collective per loss) before they are combined; every rank then
      writes identical gradients. (The original runs ``DataParallel``.)
    * **AMP**: the losses are back-propagated unscaled, so do not combine it with an fp16
      ``GradScaler`` (bf16 autocast or fp32 are fine).
    * **Adam** keeps the Pareto *direction* (the conflict-free mixture of the two gradients),
      but the magnitude part (:math:`\gamma` and the rescaling, a constant factor per tensor)
      largely cancels; the authors run SGD.

    The diagnostics of the last step live in buffers: ``cosine`` (``(M,)``), ``pareto_weights``
    (``(M, 2)``, :math:`(k_1, k_2)` per encoder; :attr:`coefficients` is :math:`k_2`, the
    unimodal gradient's weight) and ``conflict`` (``(M,)`` bool).

    Args:
        groups: ``{modality: encoder module or its parameters}``, at least two, disjoint; the
            unimodal and fusion heads stay out.
        gamma: The final boost :math:`\gamma > 0` (1.5 in the paper's code).
        replace: Names of the step's loss terms that the unimodal terms replace.
        phases: Phases of the schedule in which the method acts (it needs the fused prediction).

    Reference:
        Y. Wei, D. Hu, "MMPareto: Boosting Multimodal Learning with Innocent Unimodal
        Assistance", ICML 2024; code: GeWu-Lab/MMPareto_ICML2024 (``code/MMPareto.py``).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from modbalance.balancing import StepOutput, task_loss
        >>> from modbalance.methods.mmpareto import MMPareto
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> enc = {"text": nn.Linear(3, 4), "audio": nn.Linear(2, 4)}
        >>> heads = {m: nn.Linear(4, 1) for m in enc}
        >>> fusion = nn.Linear(8, 1)
        >>> x = {"text": torch.randn(6, 3), "audio": torch.randn(6, 2)}
        >>> feats = {m: enc[m](x[m]) for m in enc}
        >>> out = StepOutput(features=feats, unimodal={m: heads[m](feats[m]) for m in enc},
        ...     fused=fusion(torch.cat([feats["text"], feats["audio"]], 1)), present={},
        ...     target=torch.randn(6), task="regression")
        >>> method = MMPareto(enc)
        >>> losses = method.losses(out, {"task": task_loss(out.fused, out.target, out.task)})
        >>> sorted(losses)
        ['task', 'unimodal_audio', 'unimodal_text']
        >>> method.backward(out, losses)
        True
        >>> enc["text"].weight.grad.shape, fusion.weight.grad is not None
        (torch.Size([4, 3]), True)
    """

    takes_backward = True

    def __init__(
        self,
        groups: Mapping[str, nn.Module | Iterable[nn.Parameter]],
        *,
        gamma: float = 1.5,
        replace: Iterable[str] = ("readout",),
        phases: Iterable[int] = (2,),
    ) -> None:
        super().__init__()
        names, params = parse_groups(groups)
        self.modalities: tuple[str, ...] = names
        self._group_params: list[list[nn.Parameter]] = params  # plain list: not registered
        self.gamma = check_real(gamma, "gamma", low=0.0, low_inclusive=False)
        self.replace = check_replace(replace)
        self.phases = check_phases(phases)
        m = len(names)
        self.register_buffer("cosine", torch.full((m,), float("nan")))
        self.register_buffer("pareto_weights", torch.full((m, 2), float("nan")))
        self.register_buffer("conflict", torch.zeros(m, dtype=torch.bool))
        self._backward_ran = False

    @property
    def coefficients(self) -> Tensor:
        """``(M,)`` the last step's weight :math:`k_2` of each unimodal gradient (NaN before)."""
        return self.pareto_weights[:, 1]

    # ---------------------------------------------------------------------------- loss
    def losses(self, out: StepOutput, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Drop the ``replace`` terms and add the unimodal terms ``"unimodal_<m>"``."""
        if out.phase not in self.phases:
            return dict(losses)
        new = {k: v for k, v in losses.items() if k not in self.replace}
        new.update(unimodal_terms(out, self.modalities, None, "MMPareto"))
        return new

    # ---------------------------------------------------------------------------- backward
    def backward(self, out: StepOutput, losses: Mapping[str, Tensor]) -> bool:
        """Run the backward pass with the Pareto-integrated encoder gradients.

        Returns:
            ``True`` (it ran the backward pass), or ``False`` outside ``phases``.

        Raises:
            ModbalanceError: Without a ``"task"`` term, or when a loss term does not reach the
                groups' parameters at all.
        """
        if out.phase not in self.phases:
            return False
        self._backward_ran = True
        if "task" not in losses:
            raise ModbalanceError(
                "MMPareto needs the fused task loss as the loss term 'task'; got the terms "
                f"{sorted(losses)}."
            )
        uni_keys = [f"unimodal_{m}" for m in self.modalities]
        if all(k in losses for k in uni_keys):
            uni = [losses[k] for k in uni_keys]
        else:  # losses() was not called: compute the unimodal terms from the step's outputs
            terms = unimodal_terms(out, self.modalities, None, "MMPareto")
            uni = [terms[k] for k in uni_keys]
            losses = {**losses, **terms}
        others = [v for k, v in losses.items() if k != "task" and k not in uni_keys]
        flat = [p for ps in self._group_params for p in ps if p.requires_grad]
        owner = [i for i, ps in enumerate(self._group_params) for p in ps if p.requires_grad]
        if not flat:
            raise ModbalanceError("MMPareto: no parameter of the groups requires a gradient.")

        def grads_of(loss: Tensor) -> list[Tensor]:
            if not loss.requires_grad:
                return [torch.zeros_like(p) for p in flat]
            gs = torch.autograd.grad(loss, flat, retain_graph=True, allow_unused=True)
            return _reduce([torch.zeros_like(p) if g is None else g for p, g in zip(flat, gs)])

        g_mm = grads_of(losses["task"])
        g_uni = [grads_of(u) for u in uni]
        other = [v for v in others if v.requires_grad]
        g_other = grads_of(combine_losses(dict(enumerate(other)))) if other else None
        new = self._integrate(g_mm, g_uni, owner)

        previous = [p.grad for p in flat]
        for p in flat:
            p.grad = None
        combine_losses(losses).backward()  # every other parameter: the plain gradient
        with torch.no_grad():
            for i, (p, g) in enumerate(zip(flat, new)):
                if g_other is not None:
                    g = g + g_other[i]
                if previous[i] is not None:
                    g = previous[i] + g
                p.grad = g.to(p.dtype)
        return True

    @contextlib.contextmanager
    def around_step(self, out: StepOutput, optimizer: torch.optim.Optimizer) -> Iterator[None]:
        """Refuse a step whose backward pass was not this method's (it would do nothing).

        Raises:
            ModbalanceError: In ``phases``, when :meth:`backward` did not run since the last
                step: a plain ``loss.backward()`` gives the encoders their unintegrated gradients.
        """
        ran, self._backward_ran = self._backward_ran, False
        if out.phase in self.phases and not ran:
            raise ModbalanceError(
                "MMPareto.backward() did not run for this step, so a plain loss.backward() gave "
                "the encoders their unintegrated gradients and MMPareto would do nothing. Use "
                "modbalance.balanced_step(...), or replace loss.backward() by `if not "
                "method.backward(out, losses): combine_losses(losses).backward()`."
            )
        yield

    @torch.no_grad()
    def _integrate(self, g_mm: list[Tensor], g_uni: list[list[Tensor]], owner: list[int]):
        n_params = len(g_mm)
        plain = [g_mm[i] + sum(g[i] for g in g_uni) for i in range(n_params)]
        new: list[Tensor] = [torch.empty(0)] * n_params
        for m in range(len(self.modalities)):
            idx = [i for i in range(n_params) if owner[i] == m]
            if not idx:
                continue
            a = [g_mm[i] for i in idx]
            b = [g_uni[m][i] for i in idx]
            v11, v12, v22 = _dot(a, a), _dot(a, b), _dot(b, b)
            denom = (v11.sqrt() * v22.sqrt()).clamp_min(1e-8)
            conflict = ~(v12 > 0)  # cos > 0 <=> <a, b> > 0 (zero norms: cos = 0, a conflict)
            c = min_norm_2(v11, v12, v22)
            k1 = torch.where(conflict, c, torch.full_like(c, 0.5))
            k2 = torch.where(conflict, 1.0 - c, torch.full_like(c, 0.5))
            for i, ga, gb in zip(idx, a, b):
                n = 2.0 * k1 * ga + 2.0 * k2 * gb
                n_norm = torch.linalg.vector_norm(n)
                s_norm = torch.linalg.vector_norm(plain[i])
                boost = torch.where(
                    (n_norm > 0) & (s_norm > n_norm),
                    s_norm / n_norm.clamp_min(torch.finfo(n_norm.dtype).tiny),
                    torch.ones_like(n_norm),
                )
                new[i] = n * (boost * self.gamma)
            self.cosine[m] = (v12 / denom).to(self.cosine)
            self.pareto_weights[m, 0] = k1.to(self.pareto_weights)
            self.pareto_weights[m, 1] = k2.to(self.pareto_weights)
            self.conflict[m] = conflict
        return new

    def extra_repr(self) -> str:
        """Summarise the configuration for ``repr``."""
        return f"modalities={self.modalities!r}, gamma={self.gamma}, phases={self.phases!r}"
