r"""Unimodal auxiliary losses: every encoder is also trained through its own head.

The simple baseline that the literature keeps finding strong (OGM-GE issue #36: the released
code computes the unimodal losses and never uses them; users who add them gain accuracy).
:class:`UnimodalLoss` adds one weighted, gradient-carrying task loss per modality; G-Blending and
MMPareto reuse its loss helper :func:`unimodal_task_loss`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import ClassVar

import torch
from torch import Tensor

from modbalance._checks import (
    ModbalanceError,
    check_choice,
    check_modality_keys,
    check_modality_names,
    check_real,
)
from modbalance.balancing import BalancingMethod, StepOutput, check_phases, task_loss

__all__ = ["UnimodalLoss", "unimodal_task_loss"]


def unimodal_task_loss(
    pred: Tensor, target: Tensor, task: str, present: Tensor | None = None
) -> Tensor:
    r"""Task loss of one modality's prediction, averaged over the samples that have the modality.

    .. math::

        \mathcal L_m = \frac{\sum_i [\text{present}_{im}]\;\ell(\hat y_{im}, y_i)}
                            {\max\bigl(1, \sum_i [\text{present}_{im}]\bigr)},

    with :math:`\ell` the L1 loss (regression) or the cross-entropy (classification) of
    :func:`~modbalance.balancing.task_loss`. A batch without the modality gives a zero that still
    belongs to the autograd graph (its gradient is zero), so callers never need a special case.

    Args:
        pred: ``(N,)``/``(N, 1)`` predictions or ``(N, C)`` logits of the unimodal head.
        target: ``(N,)`` targets.
        task: ``"regression"`` or ``"classification"``.
        present: ``(N,)`` boolean presence mask, or ``None`` (every sample present).

    Returns:
        A scalar loss.

    Raises:
        TypeError: A floating ``target`` with ``task="classification"`` (see
            :func:`~modbalance.balancing.task_loss`).
        ModbalanceError: A ``target`` that is not ``(N,)`` (e.g. ``(N, 1)``), shapes of ``pred``
            and ``target`` that do not fit the task, or a presence mask that is not ``(N,)``.

    Example:
        >>> import torch
        >>> from modbalance.methods.unimodal import unimodal_task_loss
        >>> pred, y = torch.tensor([0.0, 3.0]), torch.tensor([1.0, 1.0])
        >>> unimodal_task_loss(pred, y, "regression", torch.tensor([True, False]))
        tensor(1.)
    """
    per = task_loss(pred, target, task, reduction="none")
    if present is None:
        return per.mean()
    if present.shape != per.shape:
        raise ModbalanceError(
            f"the presence mask must have shape {tuple(per.shape)} (one flag per sample), got "
            f"shape {tuple(present.shape)}."
        )
    mask = present.to(device=per.device, dtype=per.dtype)
    return (per * mask).sum() / mask.sum().clamp_min(1.0)


def _check_target(target: Tensor, task: str, n: int, name: str = "out.target") -> Tensor:
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


def _check_names(modalities: Sequence[str], name: str = "modalities") -> tuple[str, ...]:
    return check_modality_names(modalities, name)


def _check_phases(phases: Iterable[int]) -> tuple[int, ...]:
    return check_phases(phases)


def _check_replace(replace: Iterable[str]) -> tuple[str, ...]:
    if isinstance(replace, str):
        replace = (replace,)
    out = tuple(replace)
    if any(not isinstance(k, str) for k in out):
        raise TypeError(f"`replace` must be loss-term names (str), got {out!r}.")
    return out


def _check_unimodal(out: StepOutput, modalities: Sequence[str], method: str) -> None:
    check_choice(out.task, "out.task", ("regression", "classification"))
    missing = [m for m in modalities if m not in out.unimodal]
    if missing:
        raise ModbalanceError(
            f"{method} needs a unimodal prediction for every modality: `out.unimodal` is missing "
            f"{missing[0]!r} (has {sorted(out.unimodal)}); give the model one head per modality."
        )


def _unimodal_terms(
    out: StepOutput, modalities: Sequence[str], weights: Tensor | None, method: str
) -> dict[str, Tensor]:
    """``{"unimodal_<m>": w_m * L_m}`` for every modality (gradient-carrying)."""
    _check_unimodal(out, modalities, method)
    terms: dict[str, Tensor] = {}
    for i, m in enumerate(modalities):
        loss = unimodal_task_loss(out.unimodal[m], out.target, out.task, out.present.get(m))
        if weights is not None:
            loss = weights[i].to(device=loss.device, dtype=loss.dtype) * loss
        terms[f"unimodal_{m}"] = loss
    return terms


class UnimodalLoss(BalancingMethod):
    r"""Unimodal auxiliary losses: each encoder also learns through its own unimodal head.

    For every modality :math:`m` the method adds

    .. math::

        \mathcal L \;\leftarrow\; \mathcal L + \sum_m w_m\,\mathcal L_m, \qquad
        \mathcal L_m = \frac{1}{|P_m|}\sum_{i \in P_m} \ell\bigl(h_m(z_{im}), y_i\bigr),

    where :math:`h_m(z_{im})` is ``out.unimodal[m]`` (computed from the encoder's features *with*
    gradient, so :math:`\mathcal L_m` trains encoder and head), :math:`P_m` the samples that have
    modality :math:`m` (``out.present``), :math:`\ell` the step's task loss (L1 for regression,
    cross-entropy for classification) and :math:`w_m \ge 0` the weights (1 by default). The terms
    are named ``"unimodal_<m>"``.

    The step's phase-2 base losses contain a ``"readout"`` term: the unimodal heads trained on
    *detached* features, so that the heads stay calibrated read-outs without training the
    encoders. This method *replaces* it (the keys in ``replace`` are dropped): its own terms
    train the same heads, and the encoders too. In phase 1 the step already trains the heads with
    gradient, so by default the method acts in phase 2 only (``phases``).

    Works for any number of modalities (one or more), for classification and for regression.
    Under Adam it keeps its effect: it adds a gradient *direction* (the unimodal one) to every
    encoder, it does not merely rescale one. The weights live in the buffer ``weight`` (modality
    order), so ``state_dict()`` and ``.to()`` carry them.

    Args:
        modalities: Modality names (at least one, distinct).
        weights: ``None`` (every :math:`w_m = 1`) or ``{modality: weight}`` for every modality,
            finite and non-negative.
        replace: Names of the step's loss terms that this method's terms replace.
        phases: Phases of the dual-phase schedule in which the method acts.

    Reference:
        The auxiliary unimodal-loss baseline of the modality-imbalance literature; G-Blending
        (:class:`~modbalance.methods.gblending.GBlending`) is the same objective with learned
        weights. See also GeWu-Lab/OGM-GE_CVPR2022 issue #36 (unimodal losses computed but never
        used; adding them helps).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from modbalance.balancing import StepOutput
        >>> from modbalance.methods.unimodal import UnimodalLoss
        >>> enc, head = nn.Linear(3, 2), nn.Linear(2, 1)
        >>> z = enc(torch.randn(4, 3))
        >>> out = StepOutput(features={"text": z, "audio": z}, unimodal={"text": head(z),
        ...     "audio": head(z)}, fused=head(z), present={}, target=torch.zeros(4),
        ...     task="regression")
        >>> method = UnimodalLoss(["text", "audio"], weights={"text": 1.0, "audio": 0.5})
        >>> terms = method.losses(out, {"task": torch.tensor(1.0), "readout": torch.tensor(0.3)})
        >>> sorted(terms)
        ['task', 'unimodal_audio', 'unimodal_text']
    """

    _checked_state: ClassVar[dict[str, str]] = {"weight": "nonnegative"}

    def __init__(
        self,
        modalities: Sequence[str],
        weights: Mapping[str, float] | None = None,
        *,
        replace: Iterable[str] = ("readout",),
        phases: Iterable[int] = (2,),
    ) -> None:
        super().__init__()
        self.modalities = _check_names(modalities)
        values = [1.0] * len(self.modalities)
        if weights is not None:
            check_modality_keys(weights, "weights", self.modalities)
            values = [check_real(weights[m], f"weights[{m!r}]", low=0.0) for m in self.modalities]
        self.register_buffer("weight", torch.tensor(values, dtype=torch.float32))
        self.replace = _check_replace(replace)
        self.phases = _check_phases(phases)

    def losses(self, out: StepOutput, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Drop the ``replace`` terms and add ``"unimodal_<m>"``, weighted, for every modality.

        Raises:
            ModbalanceError: If ``out.unimodal`` lacks a modality.
        """
        if out.phase not in self.phases:
            return dict(losses)
        new = {k: v for k, v in losses.items() if k not in self.replace}
        new.update(_unimodal_terms(out, self.modalities, self.weight, "UnimodalLoss"))
        return new

    def extra_repr(self) -> str:
        """Summarise the configuration for ``repr``."""
        w = {m: round(float(v), 4) for m, v in zip(self.modalities, self.weight)}
        return f"weights={w}, replace={self.replace!r}, phases={self.phases!r}"
