r"""UME: the uni-modal ensemble (Du et al., ICML 2023) as a balancing method.

Every encoder is trained alone, through its own head, on its own loss; nothing couples the
modalities during training. At inference the unimodal predictions are averaged
(:func:`ume_ensemble`). Written from the paper (no code was released with it);
:class:`UME` lists the choices made where the paper leaves them open.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from modbalance._checks import (
    ModbalanceError,
    check_choice,
    check_tensor,
)
from modbalance.balancing import StepOutput, unimodal_terms
from modbalance.methods._common import HeadEnsemble, check_mask

__all__ = ["UME", "ume_ensemble"]


def _outputs(predictions: Mapping[str, Tensor]) -> tuple[list[str], list[Tensor]]:
    """Names and predictions, ``(N, 1)`` squeezed to ``(N,)``, all of one shape."""
    if not isinstance(predictions, Mapping) or not predictions:
        raise ModbalanceError(
            "`predictions` must be a non-empty mapping {modality: (N,) outputs or (N, C) logits}."
        )
    names, preds = list(predictions), []
    for n in names:
        p = check_tensor(predictions[n], f"predictions[{n!r}]", dtype="floating")
        if p.ndim == 2 and p.shape[1] == 1:
            p = p[:, 0]
        if p.ndim not in (1, 2):
            raise ModbalanceError(
                f"`predictions[{n!r}]` must be (N,) or (N, 1) outputs or (N, C) logits, got shape "
                f"{tuple(p.shape)}."
            )
        if preds and p.shape != preds[0].shape:
            raise ModbalanceError(
                f"every modality's prediction must have the same shape; {names[0]!r} has "
                f"{tuple(preds[0].shape)}, {n!r} has {tuple(p.shape)}."
            )
        preds.append(p)
    return names, preds


def ume_ensemble(
    predictions: Mapping[str, Tensor],
    present: Mapping[str, Tensor] | None = None,
    *,
    combine: str = "logits",
) -> Tensor:
    r"""Average the unimodal predictions over the modalities each sample has.

    .. math::

        \hat y_i = \frac{1}{|P_i|} \sum_{m \in P_i} \hat y_{im},

    with :math:`P_i` the modalities present for sample :math:`i` (``present``; all when
    ``None``) and :math:`\hat y_{im}` modality :math:`m`'s output: the regression value, or the
    class logits (``combine="logits"``, the paper's ensemble of the unimodal models' outputs).
    ``combine="probs"`` averages the softmax probabilities instead and returns their logarithm
    (valid logits: their softmax is the mean probability); that is the suite's ``alone-ensemble``
    reference. A sample without any modality gets 0 (zero logits: the uniform distribution).

    Args:
        predictions: ``{modality: (N,) or (N, 1)}`` regression outputs or ``{modality: (N, C)}``
            logits, one shape for all.
        present: Optional ``{modality: (N,) bool}`` presence masks.
        combine: ``"logits"`` or ``"probs"`` (classification only).

    Returns:
        ``(N,)`` regression predictions or ``(N, C)`` logits.

    Raises:
        ModbalanceError: Predictions of different shapes, ``combine="probs"`` for regression
            outputs, or a presence mask missing or of the wrong shape.

    Example:
        >>> import torch
        >>> from modbalance.methods.ume import ume_ensemble
        >>> ume_ensemble({"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0, 8.0])},
        ...              {"a": torch.tensor([True, True]), "b": torch.tensor([True, False])})
        tensor([2., 2.])
    """
    check_choice(combine, "combine", ("logits", "probs"))
    names, preds = _outputs(predictions)
    x = torch.stack(preds)  # (M, N) or (M, N, C)
    if combine == "probs":
        if x.ndim != 3:
            raise ModbalanceError(
                "combine='probs' averages class probabilities and needs (N, C) logits; for "
                "regression outputs use combine='logits' (the mean)."
            )
        x = F.softmax(x.float(), dim=-1)
    n = x.shape[1]
    if present is None:
        w = torch.ones(len(names), n, dtype=x.dtype, device=x.device)
    else:
        rows = []
        for name in names:
            if name not in present:
                raise ModbalanceError(
                    f"`present` has no mask for modality {name!r} (has {sorted(present)})."
                )
            mask = check_mask(present[name], n, x.device, f"present[{name!r}]")
            rows.append(mask.to(x.dtype))
        w = torch.stack(rows)
    if x.ndim == 3:
        w = w.unsqueeze(-1)
    total = (torch.where(w > 0, x, torch.zeros_like(x)) * w).sum(0)
    mean = total / w.sum(0).clamp_min(1.0)
    if combine == "probs":
        count = w.sum(0)
        mean = torch.where(count > 0, mean.clamp_min(torch.finfo(mean.dtype).tiny).log(), 0.0)
    return mean


class UME(HeadEnsemble):
    r"""Uni-modal ensemble: train every encoder alone, predict with the mean of the heads.

    **Training.** :meth:`losses` *replaces* the step's terms by the unimodal losses

    .. math::

        \mathcal L = \sum_m \mathcal L_m, \qquad
        \mathcal L_m = \frac{1}{|P_m|}\sum_{i \in P_m} \ell\bigl(h_m(z_{im}), y_i\bigr),

    named ``"unimodal_<m>"`` (:math:`h_m(z_{im})` is ``out.unimodal[m]``, with gradient into
    encoder :math:`m` and head :math:`m`; :math:`P_m` the samples that have modality
    :math:`m`; :math:`\ell` L1 for regression, cross-entropy for classification). The fused
    ``"task"`` term and every other term of the step are dropped (``keep`` keeps some), so each
    encoder/head pair gets exactly the gradient it would get trained alone: the parameters of
    modality :math:`m` depend on :math:`\mathcal L_m` only, and the fusion head gets none (it is
    not used). It acts in both phases of the schedule by default: UME *is* the training.

    **Inference.** :meth:`predict` runs each head on its features and averages the outputs over
    the modalities each sample has (:func:`ume_ensemble`): logits for classification (default)
    or probabilities (``combine="probs"``), the mean value for regression.

    **Where the paper leaves a choice open** (no code was released with it; the choices are
    pinned by tests). The paper trains separate uni-modal models and ensembles their outputs.
    Here the "models" are the encoder/head pairs of one late-fusion model trained in one loop,
    one optimizer step per batch: with the same data order and a per-parameter optimizer (SGD,
    Adam, AdamW) this is the same as :math:`M` separate runs, step for step (tested). Checkpoint
    selection, however, picks *one* epoch for all modalities by the ensemble's validation score,
    where separate runs would select each model by its own. The ensemble is an unweighted mean
    over the *present* modalities (missing modalities are not in the paper); logits are averaged
    by default. Regression (the mean of the outputs) is ours.

    **Adam.** UME changes which loss trains which parameters, not a gradient's scale: Adam does
    not cancel it.

    The heads are held by reference, not registered: they are the model's, trained and saved
    with it (the method's ``state_dict`` holds no copy, and the optimizer sees them once). UME has
    no per-modality factor, hence no ``coefficients``.

    Args:
        modalities: Modality names (at least two, distinct).
        heads: ``{modality: head}`` for every modality, callables from ``(N, D)`` features to
            ``(N,)``/``(N, 1)`` outputs or ``(N, C)`` logits (e.g. the model's
            ``nn.ModuleDict`` of unimodal heads; ``out.unimodal[m]`` must be ``heads[m]``'s
            output).
        combine: ``"logits"`` (default) or ``"probs"``, see :func:`ume_ensemble`.
        keep: Names of the step's terms to keep next to the unimodal ones (default none).
        phases: Phases of the dual-phase schedule in which the method acts (both by default).

    Reference:
        C. Du, J. Teng, T. Li, Y. Liu, T. Yuan, Y. Wang, Y. Yuan, H. Zhao, "On Uni-Modal Feature
        Learning in Supervised Multi-Modal Learning", ICML 2023 (arXiv:2305.01233).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from modbalance.balancing import StepOutput
        >>> from modbalance.methods.ume import UME
        >>> enc = nn.ModuleDict({"text": nn.Linear(5, 4), "audio": nn.Linear(3, 4)})
        >>> heads = nn.ModuleDict({m: nn.Linear(4, 3) for m in enc})
        >>> x = {"text": torch.randn(6, 5), "audio": torch.randn(6, 3)}
        >>> z = {m: enc[m](x[m]) for m in enc}
        >>> out = StepOutput(z, {m: heads[m](z[m]) for m in enc}, None, {},
        ...                  torch.tensor([0, 1, 2, 0, 1, 2]), "classification")
        >>> ume = UME(["text", "audio"], heads)
        >>> sorted(ume.losses(out, {"task": torch.tensor(1.0, requires_grad=True)}))
        ['unimodal_audio', 'unimodal_text']
        >>> ume.predict(z).shape
        torch.Size([6, 3])
    """

    def __init__(
        self,
        modalities: Sequence[str],
        heads: Mapping[str, Callable[[Tensor], Tensor]],
        *,
        combine: str = "logits",
        keep: Iterable[str] = (),
        phases: Iterable[int] = (1, 2),
    ) -> None:
        super().__init__(modalities, heads, keep, phases)
        self.combine = check_choice(combine, "combine", ("logits", "probs"))

    def extra_repr(self) -> str:
        """Summarise the configuration for ``repr``."""
        return f"modalities={self.modalities!r}, combine={self.combine!r}, keep={self.keep!r}"

    def losses(self, out: StepOutput, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Return the ``keep`` terms and ``"unimodal_<m>"`` for every modality, nothing else.

        Raises:
            ModbalanceError: If ``out.unimodal`` lacks a modality.
        """
        if out.phase not in self.phases:
            return dict(losses)
        new = self._kept(losses)
        new.update(unimodal_terms(out, self.modalities, None, "UME"))
        return new

    def _ensemble(self, preds: dict[str, Tensor], present: Mapping[str, Tensor] | None) -> Tensor:
        """:func:`ume_ensemble` of the heads' outputs."""
        masks = (
            None if present is None else {m: present[m] for m in self.modalities if m in present}
        )
        return ume_ensemble(preds, masks, combine=self.combine)
