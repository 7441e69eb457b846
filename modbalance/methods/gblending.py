r"""G-Blending (Wang, Tran & Feiszli, CVPR 2020): loss weights from overfitting ratios.

The weights come from overfitting-to-generalisation ratios measured on a held-out part of the
training data; the rule is transcribed from MultiBench's
``training_structures/gradient_blend.py`` (pliang279/MultiBench).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from modbalance._checks import (
    ModbalanceError,
    check_choice,
    check_int,
    check_modality_keys,
    check_modality_names,
    check_real,
    check_replace,
)
from modbalance.balancing import BalancingMethod, StepOutput, check_phases, unimodal_terms

__all__ = ["GBlending", "gblend_weights"]

#: Name of the fused prediction among G-Blending's heads.
FUSED = "fused"


def gblend_weights(
    train: Tensor,
    holdout: Tensor,
    prev_train: Tensor | None = None,
    prev_holdout: Tensor | None = None,
    *,
    eps: float = 1e-4,
) -> Tensor:
    r"""Normalised G-Blending weights from train and held-out losses of each head.

    With ``prev_*`` (the measurement ``every`` epochs earlier; MultiBench's ``delta=True``, the
    paper's :math:`\Delta` form),

    .. math::

        \Delta O_k = (L^{h}_k - L^{t}_k) - (L^{h,0}_k - L^{t,0}_k), \qquad
        \Delta G_k = L^{h}_k - L^{h,0}_k, \qquad
        \tilde w_k = \Bigl|\frac{\Delta G_k}{\max(\Delta O_k^2, \epsilon^2)}\Bigr|;

    without them (MultiBench's default ``delta=False``), :math:`O_k = L^h_k - L^t_k` replaced by
    :math:`\epsilon` when it is not positive, :math:`G_k = L^h_k` and
    :math:`\tilde w_k = |G_k / O_k^2|`. Then :math:`w_k = \tilde w_k / \sum_j \tilde w_j`.
    MultiBench uses :math:`\epsilon = 10^{-4}` in the second form; the clamp of the first form is
    ours (MultiBench divides by zero when :math:`\Delta O_k = 0`).

    Args:
        train: ``(K,)`` losses on the training part, one per head (the unimodal heads and the
            fused head).
        holdout: ``(K,)`` losses on the held-out part.
        prev_train: ``(K,)`` previous training losses, or ``None``.
        prev_holdout: ``(K,)`` previous held-out losses, or ``None``.
        eps: :math:`\epsilon > 0`.

    Returns:
        ``(K,)`` weights summing to one (NaN when every raw weight is zero).

    Example:
        >>> import torch
        >>> from modbalance.methods.gblending import gblend_weights
        >>> gblend_weights(torch.tensor([0.5, 0.2]), torch.tensor([0.7, 0.8]))
        tensor([0.8873, 0.1127])
    """
    eps = check_real(eps, "eps", low=0.0, low_inclusive=False)
    raw = _raw_weights(train, holdout, prev_train, prev_holdout, eps)
    return raw / raw.sum()


def _raw_weights(
    train: Tensor,
    holdout: Tensor,
    prev_train: Tensor | None,
    prev_holdout: Tensor | None,
    eps: float,
) -> Tensor:
    o = holdout - train
    if prev_train is None or prev_holdout is None:
        o = torch.where(o > 0, o, torch.full_like(o, eps))
        return (holdout / (o * o)).abs()
    d_o = o - (prev_holdout - prev_train)
    d_g = holdout - prev_holdout
    return (d_g / (d_o * d_o).clamp_min(eps * eps)).abs()


class GBlending(BalancingMethod):
    r"""Gradient-Blending: weight each head's loss by its generalisation per unit of overfitting.

    The weights of the fused and unimodal losses are re-measured during training.

    The objective is :math:`\sum_k w_k \mathcal L_k` over the heads
    :math:`k \in \{m_1, \dots, m_M, \text{fused}\}` (the unimodal losses carry gradient into the
    encoders, as in MultiBench's blend loss). Every ``every`` epochs :meth:`epoch_end` calls
    ``evaluate()`` for each head's loss on the training data and on a **held-out part of the
    training data** (not the validation split used for model selection) and sets

    .. math::

        \Delta O_k = (L^{h}_k - L^{t}_k) - (L^{h,0}_k - L^{t,0}_k), \qquad
        \Delta G_k = L^{h}_k - L^{h,0}_k, \qquad
        w_k = \frac{|\Delta G_k| / \Delta O_k^2}{\sum_j |\Delta G_j| / \Delta O_j^2},

    with :math:`L^{\cdot,0}` the previous measurement (``mode="delta"``, the paper's
    :math:`w \propto \Delta G / \Delta O^2`), or, with ``mode="final"`` (MultiBench's default),
    :math:`w_k \propto L^h_k / O_k^2` from the current gap :math:`O_k = L^h_k - L^t_k` alone
    (:func:`gblend_weights`). Before the first estimate the weights are uniform,
    :math:`w_k = 1/(M+1)`; in ``"delta"`` mode the first measurement only records the baseline.

    What ``evaluate`` must return::

        {"train":   {"fused": L, "<m1>": L, ..., "<mM>": L},   # floats or 1-element tensors
         "holdout": {"fused": L, "<m1>": L, ..., "<mM>": L}}

    the mean task loss (L1 for regression, cross-entropy for classification) of the fused
    prediction and of each unimodal head, on the training part and on the held-out part, computed
    without gradient from the current model (under DDP: over the whole data set, identical on
    every rank). :meth:`observe` takes the same mapping directly, e.g. once before training to
    record the baseline.

    Deviation from MultiBench (and the paper's offline variant), on purpose: MultiBench
    estimates the weights by training *copies* of each unimodal model and of the multimodal model
    for ``gb_epoch`` epochs from the current state and measuring them before and after; that is
    :math:`M + 1` extra trainings per estimate. Here the measurement is taken from the model's own
    heads across the ``every`` epochs of actual training (the online form of the rule), so the
    estimate costs one evaluation pass. The weight rule itself is MultiBench's, including the
    absolute value and the :math:`\epsilon = 10^{-4}` floor of the ``"final"`` form; in
    ``"delta"`` mode :math:`\Delta O^2` is floored at :math:`\epsilon^2` (MultiBench divides by
    zero). When every raw weight is zero or not finite the previous weights are kept. M > 2 and
    regression need no change (the rule only reads losses). Under Adam the relative weights of
    the terms on a shared encoder keep their effect (they change the gradient's direction); a
    weight on a head's own parameters is a constant scale that Adam cancels.

    State (``blend``: the weights of the unimodal losses, then the fused one; the previous
    measurement, the last raw ratios) lives in buffers; :attr:`coefficients` are the unimodal ones.

    Args:
        modalities: Modality names (at least one, distinct, none called ``"fused"``).
        every: Re-estimate the weights every ``every`` epochs (MultiBench's ``gb_epoch``).
        mode: ``"delta"`` (paper) or ``"final"`` (MultiBench's default).
        eps: Floor :math:`\epsilon` of the overfitting term.
        replace: Names of the step's loss terms that the unimodal terms replace.
        phases: Phases of the schedule in which the weighted losses are used.

    Reference:
        W. Wang, D. Tran, M. Feiszli, "What Makes Training Multi-modal Classification Networks
        Hard?", CVPR 2020; MultiBench (P. P. Liang et al., NeurIPS 2021 Datasets and
        Benchmarks), ``training_structures/gradient_blend.py``.

    Example:
        >>> import torch
        >>> from modbalance.methods.gblending import GBlending
        >>> gb = GBlending(["text", "audio"], mode="final")
        >>> gb.summary()
        {'coefficient_text': 0.3333, 'coefficient_audio': 0.3333, 'coefficient_fused': 0.3333}
        >>> def evaluate():
        ...     return {"train": {"fused": 0.2, "text": 0.5, "audio": 0.9},
        ...             "holdout": {"fused": 0.8, "text": 0.7, "audio": 1.0}}
        >>> gb.epoch_end(0, evaluate)
        >>> gb.summary()
        {'coefficient_text': 0.1462, 'coefficient_audio': 0.8353, 'coefficient_fused': 0.0186}
    """

    #: Tells a training loop to hold out part of the training data for :meth:`epoch_end`.
    needs_holdout = True

    _checked_state: ClassVar[dict[str, str]] = {"blend": "nonnegative"}

    def __init__(
        self,
        modalities: Sequence[str],
        *,
        every: int = 1,
        mode: str = "delta",
        eps: float = 1e-4,
        replace: Iterable[str] = ("readout",),
        phases: Iterable[int] = (2,),
    ) -> None:
        super().__init__()
        self.modalities = check_modality_names(modalities)
        if FUSED in self.modalities:
            raise ModbalanceError(
                f"`modalities` must not contain {FUSED!r}: G-Blending names the fused head so."
            )
        self.heads: tuple[str, ...] = (*self.modalities, FUSED)
        self.every = check_int(every, "every", low=1)
        self.mode = check_choice(mode, "mode", ("delta", "final"))
        self.eps = check_real(eps, "eps", low=0.0, low_inclusive=False)
        self.replace = check_replace(replace)
        self.phases = check_phases(phases)
        k = len(self.heads)
        self.register_buffer("blend", torch.full((k,), 1.0 / k, dtype=torch.float64))
        self.register_buffer("prev_train", torch.full((k,), math.nan, dtype=torch.float64))
        self.register_buffer("prev_holdout", torch.full((k,), math.nan, dtype=torch.float64))
        self.register_buffer("has_prev", torch.zeros((), dtype=torch.bool))
        self.register_buffer("raw", torch.full((k,), math.nan, dtype=torch.float64))
        self.register_buffer("num_estimates", torch.zeros((), dtype=torch.long))

    @property
    def coefficients(self) -> Tensor:
        """``(M,)`` current weights of the unimodal losses (the fused one is ``blend[-1]``)."""
        return self.blend[:-1]

    def summary(self) -> dict[str, float]:
        """``coefficient_<head>`` for every head (modalities, then ``fused``), 4 digits."""
        return {f"coefficient_{k}": round(w, 4) for k, w in zip(self.heads, self.blend.tolist())}

    # ---------------------------------------------------------------------------- loss
    def losses(self, out: StepOutput, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Scale ``"task"`` by the fused weight; add the weighted ``"unimodal_<m>"`` terms.

        The terms named in ``replace`` are dropped.

        Raises:
            ModbalanceError: Without a ``"task"`` term or without a modality's prediction.
        """
        if out.phase not in self.phases:
            return dict(losses)
        if "task" not in losses:
            raise ModbalanceError(
                "GBlending weights the fused task loss, the term 'task', but the step's terms "
                f"are {sorted(losses)}."
            )
        new = {k: v for k, v in losses.items() if k not in self.replace}
        w = self.blend
        task = new["task"]
        new["task"] = w[-1].to(device=task.device, dtype=task.dtype) * task
        new.update(unimodal_terms(out, self.modalities, w[:-1], "GBlending"))
        return new

    # ---------------------------------------------------------------------------- epoch
    def epoch_end(self, epoch: int, evaluate: Callable[..., Any] | None = None) -> None:
        """Every ``every`` epochs, call ``evaluate()`` and :meth:`observe` its result.

        ``epoch`` is 0-based; the estimate runs when ``epoch + 1`` is a multiple of ``every``.

        Raises:
            ModbalanceError: If ``evaluate`` is missing when it is needed.
        """
        check_int(epoch, "epoch", low=0)
        if (epoch + 1) % self.every:
            return
        if evaluate is None or not callable(evaluate):
            raise ModbalanceError(
                "GBlending.epoch_end needs `evaluate`, a callable returning {'train': {head: "
                "loss}, 'holdout': {head: loss}} for the heads "
                f"{list(self.heads)} (see the class documentation)."
            )
        self.observe(evaluate())

    def _vector(self, values: Any, name: str) -> Tensor:
        check_modality_keys(values, name, self.heads)
        items = []
        for k in self.heads:
            v = values[k]
            if isinstance(v, Tensor):
                if v.numel() != 1:
                    raise ModbalanceError(
                        f"`{name}[{k!r}]` must hold one loss value, got shape {tuple(v.shape)}."
                    )
                v = float(v.detach().reshape(()))
            v = check_real(v, f"{name}[{k!r}]")
            items.append(v)
        return torch.tensor(items, dtype=torch.float64, device=self.blend.device)

    @torch.no_grad()
    def observe(self, measurement: Mapping[str, Mapping[str, Any]]) -> Tensor:
        """Update the weights from one measurement (the return value of ``evaluate()``).

        Returns:
            ``(M + 1,)`` the weights after the update (:attr:`blend`: modalities, then fused).

        Raises:
            TypeError, ModbalanceError: If the measurement does not have the documented form.
        """
        if not isinstance(measurement, Mapping) or set(measurement) != {"train", "holdout"}:
            got = sorted(measurement) if isinstance(measurement, Mapping) else type(measurement)
            raise ModbalanceError(
                "the G-Blending measurement must be {'train': {head: loss}, 'holdout': "
                f"{{head: loss}}}} with the heads {list(self.heads)}; got {got}."
            )
        train = self._vector(measurement["train"], "evaluate()['train']")
        holdout = self._vector(measurement["holdout"], "evaluate()['holdout']")
        raw = None
        if self.mode == "final":
            raw = _raw_weights(train, holdout, None, None, self.eps)
        elif bool(self.has_prev):
            raw = _raw_weights(train, holdout, self.prev_train, self.prev_holdout, self.eps)
        if raw is not None:
            self.raw.copy_(raw)
            new = raw / raw.sum()
            if bool(torch.isfinite(new).all()):
                self.blend.copy_(new)
                self.num_estimates += 1
        self.prev_train.copy_(train)
        self.prev_holdout.copy_(holdout)
        self.has_prev.fill_(True)
        return self.blend.clone()

    def extra_repr(self) -> str:
        """Summarise the configuration for ``repr``."""
        return f"heads={self.heads!r}, every={self.every}, mode={self.mode!r}, eps={self.eps}"
