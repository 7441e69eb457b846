r"""The final prediction from the fusion head and the unimodal heads: :class:`Decision`.

After the warm-up every encoder keeps its own unimodal head. Whether, and how, those heads enter
the prediction is a choice of its own, independent of the backbone: :class:`Decision` sits after
*any* fusion head and takes its output, the unimodal outputs and the presence masks.

Rules (``rule=``), with :math:`f` the fusion head's output, :math:`u_m` the unimodal outputs and
:math:`P` the modalities present for a sample:

* ``"head"`` — :math:`\hat y = f`: the unimodal heads are auxiliary only.
* ``"residual"`` — :math:`\hat y = \bigl(f + \sum_{m \in P} \operatorname{sg}(u_m)\bigr) /
  (1 + |P|)` with :math:`\operatorname{sg}` the stop-gradient: the fusion head learns what the
  unimodal heads miss and cannot pull them toward the dominant modality. Measured best for
  classification on the competition suite (``cls-synthetic`` validation: 98.4 % vs 92.3 % for the
  head alone).
* ``"ensemble"`` — the same average with gradient through the unimodal heads.
* ``"stack"`` — detached unimodal outputs and the head, weighted by learned convex weights
  (one weight per source, shared by all samples).
* ``"gate"`` — a learned *per-sample* gate :math:`g(x) = \operatorname{softmax}(W s + b)` over
  the sources, computed from the detached outputs :math:`s = [f, u_1, \dots, u_M]` and the
  presence flags; initialised to put :math:`1 - \epsilon` of the weight on the head, so training
  starts from ``"head"`` and moves weight to a unimodal head only where that lowers the loss.
* ``"precision"`` (regression) — a precision-weighted mean
  :math:`\hat y = \sum_s \pi_s y_s / \sum_s \pi_s` with :math:`\pi_s = 1/\hat\sigma_s^2`, the
  inverse of a running estimate of each source's squared training error (the fused head's
  included), as in precision-weighted multimodal regression (MoNIG's :math:`\nu`-weighted mean).

Averaging the head with unimodal *regressors* uniformly (``"residual"``) pulls a regression
prediction toward the weaker regressors and costs MAE; strong MSA models predict with the fused
head or weight unimodal regressors per sample. The regression default was chosen on the
*validation* split of the competition suite's ``msa-synthetic`` (5 seeds, after the warm-up with
a warm fusion head and the equilibrium): ``"head"`` had the lowest validation MAE
(0.426 ± 0.011; ``"gate"`` 0.429 ± 0.013, ``"residual"`` 0.447 ± 0.020 and ``"precision"``
0.477 ± 0.031, the last two without the warm head; plain joint training 0.425 ± 0.006). On the
test split ``"gate"`` came out slightly ahead (MAE 0.411 vs 0.416, Non0 Acc-2 88.6 vs 88.5 %),
within the seed spread; the PaSE guide has the tables. ``rule="auto"`` (the default) is
therefore ``"residual"`` for classification and ``"head"`` for regression.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from modbalance._checks import (
    ModbalanceError,
    check_choice,
    check_int,
    check_modality_names,
    check_real,
)
from modbalance._state import ModalityState

__all__ = ["Decision"]

_RULES = ("head", "residual", "ensemble", "stack", "gate", "precision")


class Decision(ModalityState, nn.Module):
    r"""Combine a fusion head's output with the unimodal heads' outputs (module docstring).

    Args:
        modalities: Modality names, in the order the unimodal outputs are matched (by name).
        task: ``"regression"`` or ``"classification"``.
        rule: ``"auto"`` (``"residual"`` for classification, ``"head"`` for regression),
            ``"head"``, ``"residual"``, ``"ensemble"``, ``"stack"``, ``"gate"`` or
            ``"precision"`` (regression only).
        num_outputs: Outputs per source: 1 for regression, the number of classes otherwise
            (needed by ``"gate"``).
        momentum: :math:`\mu \in [0, 1)` of the running squared errors of ``"precision"``.
        head_prior: Initial weight of the fusion head under ``"gate"`` (``0 < p < 1``).

    Shapes:
        ``fused``: ``(N,)`` or ``(N, C)``; ``unimodal[m]``: the same shape; ``present[m]``:
        ``(N,)`` bool. The output has ``fused``'s shape. Call :meth:`observe` once per training
        step for ``"precision"`` (:class:`~modbalance.balancing.StepOutput` gives everything).

    Example:
        >>> import torch
        >>> from modbalance.decision import Decision
        >>> dec = Decision(["text", "audio"], task="classification")
        >>> dec.rule
        'residual'
        >>> fused = torch.zeros(2, 3)
        >>> uni = {"text": torch.ones(2, 3), "audio": torch.full((2, 3), 2.0)}
        >>> present = {"text": torch.tensor([True, True]), "audio": torch.tensor([True, False])}
        >>> dec(fused, uni, present)[:, 0]   # (0 + 1 + 2) / 3 and (0 + 1) / 2
        tensor([1.0000, 0.5000])
    """

    _checked_state: ClassVar[dict[str, str]] = {"sq_error": "positive"}

    def __init__(
        self,
        modalities: Sequence[str],
        task: Literal["regression", "classification"],
        *,
        rule: Literal[
            "auto", "head", "residual", "ensemble", "stack", "gate", "precision"
        ] = "auto",
        num_outputs: int = 1,
        momentum: float = 0.99,
        head_prior: float = 0.9,
    ) -> None:
        super().__init__()
        self.modalities = check_modality_names(modalities)
        self.task = check_choice(task, "task", ("regression", "classification"))
        rule = check_choice(rule, "rule", ("auto", *_RULES))
        if rule == "auto":
            rule = "residual" if self.task == "classification" else "head"
        if rule == "precision" and self.task != "regression":
            raise ModbalanceError(
                "rule='precision' weights regressors by their inverse squared error; for "
                "classification use 'residual', 'stack' or 'gate'."
            )
        self.rule = rule
        self.num_outputs = check_int(num_outputs, "num_outputs", low=1)
        self.momentum = check_real(momentum, "momentum", low=0.0, high=1.0, high_inclusive=False)
        self.head_prior = check_real(head_prior, "head_prior", low=0.0, high=1.0)
        if not 0.0 < self.head_prior < 1.0:
            raise ModbalanceError(f"`head_prior` must lie strictly in (0, 1), got {head_prior}.")
        m = len(self.modalities)
        if rule == "stack":
            self.logits = nn.Parameter(torch.zeros(m + 1))
        if rule == "gate":
            self.gate = nn.Linear((m + 1) * self.num_outputs + m, m + 1)
            nn.init.zeros_(self.gate.weight)
            bias = torch.full((m + 1,), 0.0)
            # softmax puts head_prior on the head and the rest evenly on the modalities
            bias[0] = torch.log(torch.tensor(self.head_prior * m / (1.0 - self.head_prior)))
            with torch.no_grad():
                self.gate.bias.copy_(bias)
        if rule == "precision":
            self.register_buffer("sq_error", torch.ones(m + 1))
            self.register_buffer("observed", torch.zeros((), dtype=torch.bool))

    def _sources(
        self, fused: Tensor, unimodal: Mapping[str, Tensor], present: Mapping[str, Tensor]
    ) -> tuple[Tensor, Tensor]:
        """``(N, S, C)`` outputs (head first) and ``(N, S)`` availability (the head always)."""
        missing = [m for m in self.modalities if m not in unimodal or m not in present]
        if missing:
            raise ModbalanceError(
                f"Decision(rule={self.rule!r}) needs a unimodal output and a presence mask for "
                f"every modality of {list(self.modalities)}: {missing[0]!r} is missing (unimodal "
                f"has {sorted(unimodal)}, present has {sorted(present)})."
            )
        squeeze = fused.ndim == 1
        f = fused.unsqueeze(-1) if squeeze else fused
        outs = [f]
        for m in self.modalities:
            u = unimodal[m]
            u = u.unsqueeze(-1) if u.ndim == 1 else u
            if u.shape != f.shape:
                raise ModbalanceError(
                    f"`unimodal[{m!r}]` has shape {tuple(unimodal[m].shape)}, the fused output "
                    f"{tuple(fused.shape)}: they must match."
                )
            outs.append(u if self.rule == "ensemble" else u.detach())
        avail = torch.stack(
            [torch.ones_like(present[self.modalities[0]], dtype=torch.bool)]
            + [present[m].to(torch.bool) for m in self.modalities],
            1,
        )
        return torch.stack(outs, 1), avail

    def weights(
        self, fused: Tensor, unimodal: Mapping[str, Tensor], present: Mapping[str, Tensor]
    ) -> Tensor:
        """``(N, 1 + M)`` weights of the sources (head first) for each sample; rows sum to 1."""
        return self._weights(*self._sources(fused, unimodal, present))

    def _weights(self, src: Tensor, avail: Tensor) -> Tensor:
        n, s = avail.shape
        dtype = src.dtype
        if self.rule == "head":
            w = torch.zeros(n, s, dtype=dtype, device=src.device)
            w[:, 0] = 1.0
            return w
        if self.rule in ("residual", "ensemble"):
            raw = avail.to(dtype)
        elif self.rule == "stack":
            raw = self.logits.exp().to(dtype).expand(n, s) * avail.to(dtype)
        elif self.rule == "gate":
            flags = avail[:, 1:].to(dtype)
            x = torch.cat([src.detach().reshape(n, -1), flags], 1)
            logits = self.gate(x.to(self.gate.weight.dtype)).to(dtype)
            logits = logits.masked_fill(~avail, float("-inf"))
            return torch.softmax(logits, 1)
        else:  # precision
            raw = (1.0 / self.sq_error.clamp_min(1e-6)).to(dtype).expand(n, s) * avail.to(dtype)
        return raw / raw.sum(1, keepdim=True)

    def forward(
        self, fused: Tensor, unimodal: Mapping[str, Tensor], present: Mapping[str, Tensor]
    ) -> Tensor:
        """The prediction: ``fused``'s shape, a per-sample weighted mean of the sources."""
        if self.rule == "head":
            return fused
        src, avail = self._sources(fused, unimodal, present)
        w = self._weights(src, avail).unsqueeze(-1)
        # an absent modality has weight 0: keep its (possibly non-finite) output out of the sum
        out = torch.where(w > 0, w * src, 0.0).sum(1)
        return out.squeeze(-1) if fused.ndim == 1 else out

    @torch.no_grad()
    def observe(
        self,
        head: Tensor,
        unimodal: Mapping[str, Tensor],
        present: Mapping[str, Tensor],
        target: Tensor,
    ) -> None:
        """Update the running squared errors of ``"precision"`` (other rules: nothing).

        Args:
            head: ``(N,)`` the fusion head's output *before* the decision.
            unimodal: ``{m: (N,)}`` unimodal predictions.
            present: ``{m: (N,) bool}``.
            target: ``(N,)`` regression targets.
        """
        if self.rule != "precision":
            return
        src, avail = self._sources(head, unimodal, present)
        err = (src[..., 0].float() - target.float().reshape(-1, 1)).square()
        cnt = avail.float()
        mse = (err * cnt).sum(0) / cnt.sum(0).clamp_min(1.0)
        seen = cnt.sum(0) > 0
        mu = self.momentum
        new = torch.where(self.observed, mu * self.sq_error + (1 - mu) * mse, mse)
        self.sq_error.copy_(torch.where(seen, new, self.sq_error))
        self.observed.fill_(True)

    def extra_repr(self) -> str:
        """Summarise the configuration for ``repr``."""
        return f"modalities={self.modalities!r}, task={self.task!r}, rule={self.rule!r}"
