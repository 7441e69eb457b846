r"""Unimodal auxiliary losses: every encoder is also trained through its own head.

The simple baseline that the literature keeps finding strong (OGM-GE issue #36: the released
code computes the unimodal losses and never uses them; users who add them gain accuracy).
:class:`UnimodalLoss` adds one weighted, gradient-carrying task loss per modality; G-Blending and
MMPareto reuse the loss helper :func:`~modbalance.balancing.unimodal_task_loss`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import ClassVar

import torch
from torch import Tensor

from modbalance._checks import (
    check_modality_keys,
    check_modality_names,
    check_real,
    check_replace,
)
from modbalance.balancing import (
    BalancingMethod,
    StepOutput,
    check_phases,
    unimodal_task_loss,
    unimodal_terms,
)

__all__ = ["UnimodalLoss", "unimodal_task_loss"]


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
    encoder, it does not merely rescale one. The weights live in the buffer ``coefficients``
    (modality order), so ``state_dict()`` and ``.to()`` carry them.

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

    _checked_state: ClassVar[dict[str, str]] = {"coefficients": "nonnegative"}

    def __init__(
        self,
        modalities: Sequence[str],
        weights: Mapping[str, float] | None = None,
        *,
        replace: Iterable[str] = ("readout",),
        phases: Iterable[int] = (2,),
    ) -> None:
        super().__init__()
        self.modalities = check_modality_names(modalities)
        values = [1.0] * len(self.modalities)
        if weights is not None:
            check_modality_keys(weights, "weights", self.modalities)
            values = [check_real(weights[m], f"weights[{m!r}]", low=0.0) for m in self.modalities]
        self.register_buffer("coefficients", torch.tensor(values, dtype=torch.float32))
        self.replace = check_replace(replace)
        self.phases = check_phases(phases)

    def losses(self, out: StepOutput, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Drop the ``replace`` terms and add ``"unimodal_<m>"``, weighted, for every modality.

        Raises:
            ModbalanceError: If ``out.unimodal`` lacks a modality.
        """
        if out.phase not in self.phases:
            return dict(losses)
        new = {k: v for k, v in losses.items() if k not in self.replace}
        new.update(unimodal_terms(out, self.modalities, self.coefficients, "UnimodalLoss"))
        return new

    def extra_repr(self) -> str:
        """Summarise the configuration for ``repr``."""
        w = {m: round(float(v), 4) for m, v in zip(self.modalities, self.coefficients)}
        return f"weights={w}, replace={self.replace!r}, phases={self.phases!r}"
