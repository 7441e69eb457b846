r"""DGL: disentangled gradient learning (Wei, Luo & Luo, ICCV 2025).

The encoders learn from the unimodal losses only; the fusion head learns from the fused loss
only, on detached features. Transcribed from the authors' code (``shicaiwei123/ICCV2025-GDL``:
``main_dgl.py``'s ``train_epoch`` and ``models/fusion_modules.py``'s ``*Fusion_DGL`` heads);
:class:`DGL` lists the deviations.
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
    check_replace,
)
from modbalance.balancing import (
    BalancingMethod,
    StepOutput,
    check_phases,
    task_loss,
    unimodal_task_loss,
    unimodal_terms,
)
from modbalance.methods._common import check_fuse

__all__ = ["DGL", "encoder_only"]

#: What DGL does with the fusion head (for the error without one).
_DOES = "trains the fusion head on detached features"


def encoder_only(loss: Tensor, features: Sequence[Tensor]) -> Tensor:
    r"""``loss`` with its value kept and its gradient let through ``features`` only.

    With :math:`g_k = \partial\mathcal L / \partial z_k` (one backward pass through the head that
    produced ``loss``, parameters not accumulated), it returns

    .. math::

        \tilde{\mathcal L} = \operatorname{sg}(\mathcal L)
            + \sum_k \langle z_k, \operatorname{sg}(g_k)\rangle
            - \operatorname{sg}\Bigl(\sum_k \langle z_k, g_k\rangle\Bigr),

    whose value is :math:`\mathcal L` and whose gradient with respect to anything that produced
    :math:`z_k` (the encoders) is exactly :math:`\partial\mathcal L/\partial\theta`, while the
    parameters between :math:`z` and :math:`\mathcal L` (the fusion head) get none. This is the
    released DGL code's "compute the unimodal gradient, then set the fusion module's gradient to
    ``None``", written so that it needs neither the head's parameters nor a backward pass of
    its own. No host synchronisation.

    Args:
        loss: A scalar that depends on ``features`` through some head.
        features: The ``(N, D)`` tensors the gradient may reach (those that require gradient).

    Returns:
        A scalar equal to ``loss`` whose gradient reaches what produced ``features`` and no
        parameter between ``features`` and ``loss``.

    Raises:
        ModbalanceError: If ``loss`` or every feature carries no gradient.

    Example:
        >>> import torch
        >>> from modbalance.methods.dgl import encoder_only
        >>> w = torch.tensor(3.0, requires_grad=True)      # an "encoder"
        >>> v = torch.tensor(2.0, requires_grad=True)      # a "head"
        >>> z = w * torch.ones(1)
        >>> loss = encoder_only((v * z).sum() ** 2, [z])
        >>> loss.backward()
        >>> float(loss.detach()), float(w.grad), v.grad is None
        (36.0, 24.0, True)
    """
    inputs = [z for z in features if z.requires_grad]
    if not loss.requires_grad or not inputs:
        raise ModbalanceError(
            "DGL sends the unimodal losses' gradient to the encoders, but the loss or the "
            "features carry no gradient: run the step with gradient enabled and features that "
            "come from trainable encoders."
        )
    grads = torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
    link = torch.zeros((), dtype=torch.float32, device=loss.device)
    for z, g in zip(inputs, grads):
        if g is not None:
            link = link + (z.float() * g.float()).sum()
    return loss.detach() + (link - link.detach()).to(loss.dtype)


class DGL(BalancingMethod):
    r"""Disentangled gradient learning: unimodal gradients to the encoders, fused to the head.

    Per step (phase 2 by default) the method *rewrites* the step's terms into

    .. math::

        \mathcal L = \underbrace{\sum_m \alpha_m\,\mathcal L_m\bigl(\hat y_m(z_m)\bigr)}
                     _{\text{reaches the encoders only}}
                   + \underbrace{\ell\bigl(f(\operatorname{sg}(z_1), \dots,
                     \operatorname{sg}(z_M)),\, y\bigr)}_{\text{reaches the fusion head only}},

    with :math:`z_m` the features of encoder :math:`m` (``out.features``), :math:`f` the fusion
    head (``out.fuse``), :math:`\operatorname{sg}` stop-gradient, :math:`\ell` the task loss (L1
    for regression, cross-entropy for classification) and :math:`\mathcal L_m` the unimodal task
    loss over the samples that have modality :math:`m` (``out.present``). So the fused loss's
    gradient never reaches an encoder, and the unimodal losses' gradient never reaches the fusion
    head. The terms are ``"unimodal_<m>"`` (:math:`\alpha_m\mathcal L_m`) and ``"task"`` (the
    fused loss on detached features, replacing the step's ``"task"``); of the step's other terms
    only those named in ``keep`` stay (a term that reaches an encoder would break the rule).

    The unimodal prediction :math:`\hat y_m` is, as in the released code,

    * ``unimodal="fusion"`` (default): **the fusion head itself on modality** :math:`m` **alone**,
      :math:`\hat y_m = f(z)` with every other modality marked absent (``out.fuse`` with the
      coalition :math:`\{m\}`). The released heads do exactly this: ``ConcatFusion_DGL`` computes
      ``fc_out(cat(x, 0))`` and ``fc_out(cat(0, y))``, ``SumFusion_DGL`` ``fc_x(x)`` and
      ``fc_y(y)``. The fusion head's share of this gradient is removed
      (:func:`encoder_only`), as the released loop sets the fusion module's gradients to
      ``None`` after the unimodal backward pass. The step's ``"readout"`` term (unimodal heads
      on detached features) is kept by default, so the model's own unimodal heads stay
      calibrated read-outs.
    * ``unimodal="heads"``: the model's own unimodal heads (``out.unimodal``), trained together
      with the encoders (the heads are not part of the fusion head, so the rule above holds);
      ``"readout"`` is dropped by default. This is the released ``ConcatFusion_DGL_unimodal``
      variant with its auxiliary head trained instead of left at its random initialisation.

    :math:`\alpha_m` is the buffer ``coefficients`` (``alpha``; the released default is 4, one
    value for all modalities). M > 2 (the released code has two modalities: the sum of the
    unimodal losses runs over all of them) and regression (L1 losses) need no other change.

    **Deviations from the released code.**

    * *How the head's unimodal gradient is removed*: the code runs one backward pass for the
      unimodal losses, sets ``grad = None`` on every parameter whose name contains ``fusion``, then
      runs the fused backward pass. We build the same gradients in one backward pass with
      :func:`encoder_only`, which needs no parameter names.
    * *The single-modality head*: the code's heads zero-fill the other modality; we mark it absent
      (``out.fuse(features, coalition)``), which for a concatenation or sum head is the same and
      for any head is what the model defines as "modality missing". The FiLM and gated
      ``*_DGL`` heads pair a modality with itself (``x ⊗ x``); we do not reproduce those.
    * *Not in the method*: the loop's ``clip_grad_norm_(max_norm=40)`` and its SGD schedule are
      the training loop's choices, not the rule.

    **Adam.** The encoders receive :math:`\alpha\nabla\mathcal L_{\text{uni}}` only, so under
    Adam a common :math:`\alpha` cancels; what survives is *which* loss trains *which* part.
    Per-modality :math:`\alpha_m` differ only where a parameter is shared across modalities.

    Args:
        modalities: Modality names (at least two, distinct).
        alpha: :math:`\alpha`, one non-negative value or ``{modality: value}`` for every modality.
        unimodal: ``"fusion"`` (the fusion head on one modality) or ``"heads"`` (``out.unimodal``).
        keep: Names of the step's terms to keep next to DGL's; default ``("readout",)`` with
            ``unimodal="fusion"`` and ``()`` with ``"heads"``. ``"task"`` cannot be kept.
        phases: Phases of the dual-phase schedule in which the method acts.

    Reference:
        S. Wei, C. Luo, Y. Luo, "Boosting Multimodal Learning via Disentangled Gradient
        Learning", ICCV 2025 (arXiv:2507.10213). Code: https://github.com/shicaiwei123/ICCV2025-GDL

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from modbalance.balancing import StepOutput, combine_losses
        >>> from modbalance.methods.dgl import DGL
        >>> enc = nn.ModuleDict({"text": nn.Linear(5, 4), "audio": nn.Linear(3, 4)})
        >>> head = nn.Linear(8, 3)
        >>> def fuse(z, present):  # concatenation, an absent modality zero-filled
        ...     return head(torch.cat([z[m] * present[m][:, None] for m in enc], 1))
        >>> x = {"text": torch.randn(6, 5), "audio": torch.randn(6, 3)}
        >>> z = {m: enc[m](x[m]) for m in enc}
        >>> full = {m: torch.ones(6, dtype=torch.bool) for m in enc}
        >>> out = StepOutput(z, {}, fuse(z, full), full, torch.tensor([0, 1, 2, 0, 1, 2]),
        ...                  "classification", fuse=fuse)
        >>> dgl = DGL(["text", "audio"])
        >>> terms = dgl.losses(out, {"task": nn.functional.cross_entropy(out.fused, out.target)})
        >>> sorted(terms)
        ['task', 'unimodal_audio', 'unimodal_text']
        >>> combine_losses(terms).backward()
        >>> enc["text"].weight.grad is not None and head.weight.grad is not None
        True
    """

    coefficients: Tensor

    _checked_state: ClassVar[dict[str, str]] = {"coefficients": "nonnegative"}

    def __init__(
        self,
        modalities: Sequence[str],
        *,
        alpha: float | Mapping[str, float] = 4.0,
        unimodal: str = "fusion",
        keep: Iterable[str] | None = None,
        phases: Iterable[int] = (2,),
    ) -> None:
        super().__init__()
        self.modalities = check_modality_names(modalities, minimum=2)
        if isinstance(alpha, Mapping):
            check_modality_keys(alpha, "alpha", self.modalities)
            values = [check_real(alpha[m], f"alpha[{m!r}]", low=0.0) for m in self.modalities]
        else:
            values = [check_real(alpha, "alpha", low=0.0)] * len(self.modalities)
        self.register_buffer("coefficients", torch.tensor(values, dtype=torch.float32))
        self.unimodal = check_choice(unimodal, "unimodal", ("fusion", "heads"))
        if keep is None:
            keep = ("readout",) if self.unimodal == "fusion" else ()
        self.keep = check_replace(keep)
        if "task" in self.keep:
            raise ModbalanceError(
                "`keep` must not contain 'task': DGL replaces the fused loss by its detached form "
                "(the fused gradient must not reach the encoders)."
            )
        self.phases = check_phases(phases)

    def extra_repr(self) -> str:
        """Summarise the configuration for ``repr``."""
        alpha = {m: round(float(v), 4) for m, v in zip(self.modalities, self.coefficients)}
        return f"alpha={alpha}, unimodal={self.unimodal!r}, keep={self.keep!r}"

    def _mask(self, out: StepOutput, m: str) -> Tensor:
        z = out.features[m]
        mask = out.present.get(m) if out.present is not None else None
        if mask is None:
            return torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
        return mask.to(device=z.device, dtype=torch.bool)

    def _fusion_terms(self, out: StepOutput) -> dict[str, Tensor]:
        """``alpha_m * L_m`` of the fusion head on modality ``m`` alone, encoders-only gradient."""
        feats = out.features
        masks = {m: self._mask(out, m) for m in feats}
        inputs = list(feats.values())
        terms: dict[str, Tensor] = {}
        for i, m in enumerate(self.modalities):
            alone = {k: masks[m] if k == m else torch.zeros_like(masks[m]) for k in feats}
            pred = out.fuse(feats, alone)
            loss = unimodal_task_loss(pred, out.target, out.task, masks[m])
            loss = self.coefficients[i].to(device=loss.device, dtype=loss.dtype) * loss
            terms[f"unimodal_{m}"] = encoder_only(loss, inputs)
        return terms

    def losses(self, out: StepOutput, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Return the ``keep`` terms, ``"unimodal_<m>"`` and the detached fused ``"task"``.

        Raises:
            ModbalanceError: Without ``out.fuse``, a modality's features, or (``"heads"``) a
                modality's unimodal prediction; or when the features carry no gradient.
        """
        if out.phase not in self.phases:
            return dict(losses)
        check_fuse(out, self.modalities, "DGL", _DOES)
        new = {k: v for k, v in losses.items() if k in self.keep}
        if self.unimodal == "heads":
            new.update(unimodal_terms(out, self.modalities, self.coefficients, "DGL"))
        else:
            new.update(self._fusion_terms(out))
        detached = {m: z.detach() for m, z in out.features.items()}
        present = {m: self._mask(out, m) for m in out.features}
        new["task"] = task_loss(out.fuse(detached, present), out.target, out.task)
        return new
