r"""UMT: the uni-modal teacher (Du et al., ICML 2023) as a balancing method.

The fused model trains on its task loss while each encoder's features are pulled towards the
features of a frozen, alone-trained unimodal model of the same modality (feature distillation).
Written from the paper and BalanceMM's port (``GeWu-Lab/BalanceBenchmark``,
``balancemm/trainer/UMT_trainer.py``); :class:`UMT` lists the deviations. Its masked feature
distance is shared with :mod:`modbalance.methods.g2d`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import ClassVar

import torch
from torch import Tensor

from modbalance._checks import check_modality_names
from modbalance.balancing import BalancingMethod, StepOutput, check_phases
from modbalance.methods._common import add_terms, check_teacher, masked_mean, per_modality, presence

__all__ = ["UMT", "masked_feature_mse"]


def masked_feature_mse(student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
    r"""Mean squared feature distance over the samples that have the modality.

    .. math::

        \mathcal D = \frac{1}{\max(1, |P|)\,D} \sum_{i \in P} \lVert z_i - \operatorname{sg}(t_i)
        \rVert_2^2,

    PyTorch's ``mse_loss`` (mean over every element) restricted to the present rows :math:`P`.
    The teacher side is detached; absent rows (which may hold anything, NaN included) give
    neither value nor gradient. Computed in at least float32. No host synchronisation.

    Args:
        student: ``(N, D)`` (or ``(N, ...)``) features with gradient.
        teacher: Features of the same shape.
        mask: ``(N,)`` bool, the samples that have the modality.

    Returns:
        A scalar.

    Example:
        >>> import torch
        >>> from modbalance.methods.umt import masked_feature_mse
        >>> z, t = torch.tensor([[1.0, 3.0], [9.0, 9.0]]), torch.zeros(2, 2)
        >>> masked_feature_mse(z, t, torch.tensor([True, False]))
        tensor(5.)
    """
    dtype = torch.promote_types(student.dtype, torch.float32)
    diff = student.to(dtype).flatten(1) - teacher.detach().to(dtype).flatten(1)
    diff = torch.where(mask[:, None], diff, torch.zeros_like(diff))
    return masked_mean(diff.pow(2).mean(-1), mask)


class UMT(BalancingMethod):
    r"""Uni-modal teacher: distil each encoder's features from a frozen alone-trained model.

    Per step (phase 2 by default) the method *adds* one term per modality to the step's terms
    (the fused ``"task"`` and the others stay):

    .. math::

        \mathcal L = \mathcal L_\text{task}
            + \sum_m \lambda_m\, \frac{1}{|P_m|\,D} \sum_{i \in P_m}
              \bigl\lVert z_{im} - \operatorname{sg}(z^{T}_{im}) \bigr\rVert_2^2,

    named ``"umt_<m>"``, with :math:`z_{im}` the student's features (``out.features[m]``),
    :math:`z^T_{im}` the frozen teacher's (``out.teacher.features[m]``, a
    :class:`~modbalance.teachers.TeacherOutput` of
    :class:`~modbalance.teachers.UnimodalTeachers`), :math:`P_m` the samples that have modality
    :math:`m` (``out.present``) and :math:`D` the feature size (:func:`masked_feature_mse`).
    The term's gradient reaches encoder :math:`m` only (not the fusion head, not the other
    encoders, never the teacher). :math:`\lambda_m` is the buffer ``coefficients``.

    **Defaults.** :math:`\lambda = 10`, BalanceMM's ``UMT.scaling`` (``configs/
    trainer_config.yaml``); the paper's own value was not found in what we could read. The
    teachers must have the student encoders' architecture (same feature size).

    **Deviations from BalanceMM's port** (``UMT_trainer.py::training_step``: ``CE(out, y) +
    scaling * sum_m MSE(teacher_feat_m, feat_m)``):

    * *Missing modalities*: the distance runs over the samples that have the modality (the port
      has no missing modalities); with every sample present it is the port's ``MSELoss``.
    * *Schedule*: the port distils while ``modulation_starts <= epoch <= modulation_ends``
      (0 to 80); here the method acts in :attr:`phases` (the dual-phase schedule), without an
      epoch window.
    * *Regression* (the port is classification-only): nothing changes, the distance is on
      features; the task term is the step's own (L1 in this library).
    * *Per-modality* :math:`\lambda_m` (one value in the port; a mapping is accepted).

    **Adam.** The distillation adds a gradient direction to each encoder (it is a loss), so an
    adaptive optimizer keeps its effect; only the scale :math:`\lambda` is partly absorbed.

    Args:
        modalities: Modality names (at least two, distinct).
        weight: :math:`\lambda`, one non-negative value or ``{modality: value}``.
        phases: Phases of the dual-phase schedule in which the method acts.

    Reference:
        C. Du, J. Teng, T. Li, Y. Liu, T. Yuan, Y. Wang, Y. Yuan, H. Zhao, "On Uni-Modal Feature
        Learning in Supervised Multi-Modal Learning", ICML 2023 (arXiv:2305.01233). Port:
        https://github.com/GeWu-Lab/BalanceBenchmark (``balancemm/trainer/UMT_trainer.py``).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from modbalance.balancing import StepOutput, combine_losses
        >>> from modbalance.methods.umt import UMT
        >>> from modbalance.teachers import UnimodalTeachers
        >>> enc = nn.ModuleDict({"text": nn.Linear(5, 4), "audio": nn.Linear(3, 4)})
        >>> heads = {m: nn.Linear(4, 3) for m in enc}
        >>> teachers = UnimodalTeachers(enc, heads)  # frozen copies (alone-trained in practice)
        >>> x = {"text": torch.randn(6, 5), "audio": torch.randn(6, 3)}
        >>> z = {m: enc[m](x[m]) for m in enc}
        >>> out = StepOutput(z, {}, None, {}, torch.tensor([0, 1, 2, 0, 1, 2]),
        ...                  "classification", teacher=teachers(x))
        >>> umt = UMT(["text", "audio"], weight=10.0)
        >>> terms = umt.losses(out, {"task": torch.tensor(1.0, requires_grad=True)})
        >>> sorted(terms)
        ['task', 'umt_audio', 'umt_text']
        >>> combine_losses(terms).backward()
        >>> enc["text"].weight.grad is not None, umt.summary()
        (True, {'coefficient_text': 10.0, 'coefficient_audio': 10.0})
    """

    needs_teacher = True
    _checked_state: ClassVar[dict[str, str]] = {"coefficients": "nonnegative"}

    coefficients: Tensor

    def __init__(
        self,
        modalities: Sequence[str],
        *,
        weight: float | Mapping[str, float] = 10.0,
        phases: Iterable[int] = (2,),
    ) -> None:
        super().__init__()
        self.modalities = check_modality_names(modalities, minimum=2)
        values = per_modality(weight, "weight", self.modalities, low=0.0)
        self.register_buffer("coefficients", torch.tensor(values, dtype=torch.float32))
        self.phases = check_phases(phases)

    def extra_repr(self) -> str:
        """Summarise the configuration for ``repr``."""
        return f"modalities={self.modalities!r}, phases={self.phases!r}"

    def losses(self, out: StepOutput, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Return the step's terms with ``"umt_<m>"`` added for every modality.

        Raises:
            ModbalanceError: Without ``out.teacher``, with a modality missing from the features
                or the teacher's, features of different shapes, a term ``"umt_<m>"`` that is
                already there, or a presence mask of the wrong shape.
            TypeError: If ``out.teacher`` is not a :class:`~modbalance.teachers.TeacherOutput`.
        """
        if out.phase not in self.phases:
            return dict(losses)
        teacher = check_teacher(out, self.modalities, "UMT")
        new = dict(losses)
        for i, m in enumerate(self.modalities):
            z = out.features[m]
            mask = presence(out, m, z.shape[0], z.device)
            dist = masked_feature_mse(z, teacher.features[m], mask)
            weight = self.coefficients[i].to(device=dist.device, dtype=dist.dtype)
            add_terms(new, {f"umt_{m}": weight * dist}, "UMT")
        return new
