r"""CGGM: classifier-guided gradient modulation (Guo et al., NeurIPS 2024) as a method.

Auxiliary unimodal classifiers, trained on *detached* features (so they never train the
encoders), measure how much each modality improved since the previous step. Their accuracy changes
set a per-modality coefficient that rescales each encoder's gradient (magnitude) and weights a
cosine loss that aligns the fused loss's gradient with the unimodal ones (direction). The rule is
transcribed from the authors' code (``zrguo/CGGM``, ``src/msatrain.py``, ``models/msamodel.py``
and ``src/eval_metrics.py``); :class:`CGGM` lists the deviations.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modbalance._checks import ModbalanceError, check_choice, check_real, check_target, check_tensor
from modbalance._groups import ADAPTIVE_OPTIMIZERS, GroupScaler, parse_groups, warn_adaptive
from modbalance.balancing import BalancingMethod, StepOutput, task_loss
from modbalance.distributed import all_reduce_mean

__all__ = ["CGGM", "cggm_coefficients", "cggm_direction_loss", "unimodal_accuracy"]


def cggm_coefficients(accuracy: Tensor, previous: Tensor, eps: float = 1e-8) -> Tensor:
    r"""CGGM's magnitude coefficients from the change of each unimodal classifier's accuracy.

    .. math::

        \Delta_m = a_m^{t} - a_m^{t-1}, \qquad
        B_m = \frac{\sum_j \Delta_j + \epsilon - \Delta_m}{\sum_j \Delta_j + \epsilon},

    so a modality that improved more than the others gets a smaller (possibly negative)
    coefficient. As in the released code there is no clipping: when the improvements nearly
    cancel, :math:`|B_m|` becomes very large (the code relies on its gradient-norm clipping).

    Args:
        accuracy: ``(M,)`` accuracies :math:`a^t` of this step.
        previous: ``(M,)`` accuracies :math:`a^{t-1}` of the previous step (zeros at the start).
        eps: :math:`\epsilon` (released code: 1e-8).

    Returns:
        ``(M,)`` coefficients :math:`B`.

    Example:
        >>> import torch
        >>> from modbalance.methods.cggm import cggm_coefficients
        >>> cggm_coefficients(torch.tensor([0.6, 0.5, 0.5]), torch.tensor([0.4, 0.45, 0.5]))
        tensor([0.2000, 0.8000, 1.0000])
    """
    check_tensor(accuracy, "accuracy", ndim=1, dtype="floating")
    check_tensor(previous, "previous", ndim=1, dtype="floating")
    if accuracy.shape != previous.shape:
        raise ModbalanceError(
            f"`accuracy` and `previous` must have the same shape, got {tuple(accuracy.shape)} "
            f"and {tuple(previous.shape)}."
        )
    # float64: the released code computes in Python floats, where eps = 1e-8 is representable
    diff = accuracy.double() - previous.to(device=accuracy.device, dtype=torch.float64)
    total = diff.sum() + eps
    return ((total - diff) / total).to(accuracy.dtype)


def cggm_direction_loss(coefficients: Tensor, cosines: Tensor) -> Tensor:
    r"""CGGM's direction loss from the coefficients and the gradient cosines.

    .. math::

        \mathcal{L}_{\text{gm}} = \frac{1}{M}\Bigl(\sum_m |B_m| - \sum_m B_m
            \cos\bigl(g_m, g_f^{m}\bigr)\Bigr).

    Args:
        coefficients: ``(M,)`` coefficients :math:`B` (treated as constants).
        cosines: ``(M,)`` cosines (differentiable).

    Returns:
        The scalar loss.

    Example:
        >>> import torch
        >>> from modbalance.methods.cggm import cggm_direction_loss
        >>> cggm_direction_loss(torch.tensor([0.5, -1.0]), torch.tensor([1.0, 0.0]))
        tensor(0.5000)
    """
    b = coefficients.detach().to(cosines)
    return (b.abs().sum() - (b * cosines).sum()) / b.shape[0]


def unimodal_accuracy(
    pred: Tensor, target: Tensor, task: str, mask: Tensor | None = None
) -> Tensor:
    r"""Training accuracy of a unimodal classifier, as CGGM measures it.

    Classification: :math:`\operatorname{mean}[\arg\max_c z_{ic} = y_i]`. Regression (the
    released MOSI code's ``train_eval_senti``): sign accuracy
    :math:`\operatorname{mean}[(z_i > 0) = (y_i > 0)]` (zero counts as negative).

    Args:
        pred: ``(N, C)`` logits or ``(N,)`` / ``(N, 1)`` regression outputs.
        target: ``(N,)`` class indices or float targets.
        task: ``"classification"`` or ``"regression"``.
        mask: Optional ``(N,)`` bool; only ``True`` rows count.

    Returns:
        A 0-dim ``float64`` tensor (0 when no row counts): exact ratios ``hits / n``, as the
        released code's Python floats, so that CGGM's :math:`\epsilon = 10^{-8}` is not lost.

    Raises:
        TypeError: A floating ``target`` with ``task="classification"`` (never truncated).
        ModbalanceError: A ``target`` that is not ``(N,)`` (e.g. ``(N, 1)``).

    Example:
        >>> import torch
        >>> from modbalance.methods.cggm import unimodal_accuracy
        >>> unimodal_accuracy(torch.tensor([0.5, -1.0, 2.0]), torch.tensor([1.0, 0.0, -1.0]),
        ...                   "regression")
        tensor(0.6667, dtype=torch.float64)
    """
    check_target(target, task, pred.shape[0], "target")
    with torch.no_grad():
        if task == "regression":
            p = pred.reshape(pred.shape[0], -1)[:, 0] if pred.ndim == 2 else pred
            hit = (p > 0) == (target > 0)
        else:
            hit = pred.argmax(-1) == target.long()
        hit = hit.double()
        if mask is None:
            return hit.mean() if hit.numel() else hit.new_zeros(())
        m = mask.to(hit.device).double()
        return (hit * m).sum() / m.sum().clamp_min(1)


def _param_dtype(module: nn.Module, default: torch.dtype) -> torch.dtype:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return default


class CGGM(BalancingMethod):
    r"""Classifier-guided gradient modulation: magnitude and direction from unimodal classifiers.

    The method owns one classifier per modality (``heads``; put ``cggm.parameters()`` in an
    optimizer, e.g. a parameter group with the released code's ``cls_lr``). Each head sees the
    **detached** features :math:`\tilde h_m = \operatorname{sg}(h_m)`, is trained by the term
    ``"cggm_classifier"`` :math:`= \sum_m \ell(\text{head}_m(\tilde h_m), y)` and never trains
    the encoder. Every step, from the heads' training accuracies :math:`a^t_m`
    (:func:`unimodal_accuracy`; sign accuracy for regression, as the MOSI code),

    .. math::

        B_m = \frac{\sum_j \Delta_j + \epsilon - \Delta_m}{\sum_j \Delta_j + \epsilon},
        \qquad \Delta_m = a_m^t - a_m^{t-1}

    (:func:`cggm_coefficients`). **Magnitude**: between ``backward()`` and ``optimizer.step()``
    every gradient of encoder group :math:`m` is multiplied by :math:`\rho B_m` (or, with
    ``apply="update"``, its parameter update is). **Direction**: the term ``"cggm_direction"``
    :math:`= \lambda \mathcal{L}_{\text{gm}}` (:func:`cggm_direction_loss`) with

    .. math::

        g_m = \frac{\partial\, \ell(\text{head}_m(\tilde h_m), y)}{\partial \tilde h_m}, \qquad
        g_f^m = \frac{\partial\, \ell(\hat y_{\text{fused}}, y)}{\partial h_m}, \qquad
        \cos_m = \frac{\langle g_m, g_f^m\rangle}{\lVert g_m\rVert\,\lVert g_f^m\rVert},

    flattened over the batch; :math:`g_m` is a constant guide and :math:`g_f^m` is computed
    with ``create_graph=True``, so minimising :math:`-B_m\cos_m` turns the fused loss's gradient
    on each modality's features toward that modality's unimodal gradient (a second-order term
    that reaches the encoders and the fusion head).

    **Deviations from the released code, on purpose.**

    * *Cosine of gradients, not of weights (a bug in the original).* ``cal_cos`` in
      ``src/eval_metrics.py`` is given the ``out_layer.weight`` **parameters** of the fusion
      model and of the classifiers (``fusion_grad = para``, ``cls_grad.append(para)``), so the
      released "direction" loss aligns weight vectors, not gradients as the paper describes. We
      use gradients. Because the classifiers' and the fusion head's output layers differ across
      models, we take both gradients with respect to each modality's features (same shape for
      both), the one quantity every late-fusion model has.
    * *No one-step lag.* The code adds the :math:`\mathcal{L}_{\text{gm}}` computed at the
      previous step (after its backward pass); here the loss of the current step uses the current
      coefficients and gradients.
    * *M modalities*: the code hard-codes three terms in :math:`\mathcal{L}_{\text{gm}}`; here
      the sums run over all :math:`M \ge 2`.
    * *Presence masks*: accuracies, unimodal losses and gradients use present samples only.
    * *DDP*: accuracies are averaged over ranks so every rank applies the same :math:`B`.
    * ``max_abs_coefficient`` optionally clips :math:`B` to :math:`[-c, c]`; off (``None``) by
      default, as the released code, which relies on ``clip_grad_norm_`` after the scaling.

    **Adam.** :math:`B_m` changes every step, so the magnitude modulation is not a constant
    gradient scale, but Adam's normalisation still removes most of a slowly varying factor;
    ``apply="update"`` scales the update itself (sign flips included). The direction loss changes
    the gradient's direction and keeps its effect under any optimiser.

    Args:
        groups: ``{modality: encoder module or parameters}``, at least two, disjoint.
        heads: ``{modality: classifier}`` for the same modalities, mapping ``(N, D_m)`` detached
            features to ``(N, C)`` logits or ``(N,)``/``(N, 1)`` regression outputs.
        lam: Weight :math:`\lambda \ge 0` of the direction loss (MOSI code: 0.2; 0 disables it).
        rho: Magnitude scale :math:`\rho > 0` (MOSI code's ``rou``: 1.3).
        apply: ``"grad"`` (the released code) or ``"update"``.
        magnitude: Apply the magnitude modulation.
        max_abs_coefficient: Optional bound :math:`c > 0` on :math:`|B_m|`.
        eps: :math:`\epsilon` in the coefficients.

    Reference:
        Z. Guo, T. Jin, J. Chen, Z. Zhao, "Classifier-guided Gradient Modulation for Enhanced
        Multimodal Learning", NeurIPS 2024. Code: https://github.com/zrguo/CGGM

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from modbalance.balancing import StepOutput, combine_losses, task_loss
        >>> from modbalance.methods.cggm import CGGM
        >>> enc = nn.ModuleDict({"text": nn.Linear(5, 4), "audio": nn.Linear(3, 4)})
        >>> fusion = nn.Linear(8, 3)
        >>> cggm = CGGM(enc, {"text": nn.Linear(4, 3), "audio": nn.Linear(4, 3)})
        >>> opt = torch.optim.SGD([*enc.parameters(), *fusion.parameters(),
        ...                        *cggm.parameters()], lr=0.1)
        >>> x = {"text": torch.randn(6, 5), "audio": torch.randn(6, 3)}
        >>> y = torch.tensor([0, 1, 2, 0, 1, 2])
        >>> h = {m: enc[m](x[m]) for m in enc}
        >>> fused = fusion(torch.cat([h["text"], h["audio"]], 1))
        >>> out = StepOutput(h, {}, fused, {m: torch.ones(6, dtype=torch.bool) for m in h},
        ...                  y, "classification")
        >>> losses = cggm.losses(out, {"task": task_loss(fused, y, "classification")})
        >>> sorted(losses)
        ['cggm_classifier', 'cggm_direction', 'task']
        >>> combine_losses(losses).backward()
        >>> with cggm.around_step(out, opt):  # encoder gradients scaled by rho * B_m
        ...     opt.step()
    """

    coefficients: Tensor
    accuracy: Tensor
    previous_accuracy: Tensor
    cosine: Tensor

    _checked_state: ClassVar[dict[str, str]] = {
        "coefficients": "finite",
        "accuracy": "nonnegative",
        "previous_accuracy": "nonnegative",
    }

    def __init__(
        self,
        groups: Mapping[str, nn.Module | Iterable[nn.Parameter]],
        heads: Mapping[str, nn.Module],
        *,
        lam: float = 0.2,
        rho: float = 1.3,
        apply: str = "grad",
        magnitude: bool = True,
        max_abs_coefficient: float | None = None,
        eps: float = 1e-8,
    ) -> None:
        super().__init__()
        names, params = parse_groups(groups)
        self.modalities: tuple[str, ...] = names
        self._group_params: list[list[nn.Parameter]] = params
        self._scaler = GroupScaler(names, params, "CGGM")
        if not isinstance(heads, Mapping):
            raise TypeError(
                f"`heads` must be a mapping {{modality: nn.Module}}, got {type(heads).__name__}."
            )
        if set(heads) != set(names):
            raise ModbalanceError(
                f"`heads` must have one classifier per modality of `groups` {list(names)}, got "
                f"keys {list(heads)}."
            )
        for n in names:
            if not isinstance(heads[n], nn.Module):
                raise TypeError(
                    f"`heads[{n!r}]` must be an nn.Module, got {type(heads[n]).__name__}."
                )
            if "." in n or not n:
                raise ModbalanceError(
                    f"modality names must not be empty or contain '.', got {n!r}."
                )
        self.heads = nn.ModuleDict({n: heads[n] for n in names})
        own = {id(p) for ps in params for p in ps}
        if any(id(p) in own for p in self.heads.parameters()):
            raise ModbalanceError(
                "`heads` share parameters with the encoder `groups`; CGGM's classifiers must be "
                "separate modules (they are trained on detached features)."
            )
        self.lam = check_real(lam, "lam", low=0.0)
        self.rho = check_real(rho, "rho", low=0.0, low_inclusive=False)
        self.apply_mode = check_choice(apply, "apply", ("grad", "update"))
        self.magnitude = bool(magnitude)
        self.max_abs_coefficient = (
            None
            if max_abs_coefficient is None
            else check_real(
                max_abs_coefficient, "max_abs_coefficient", low=0.0, low_inclusive=False
            )
        )
        self.eps = check_real(eps, "eps", low=0.0)
        m = len(names)
        # float64 state: accuracy differences near zero must keep eps = 1e-8 meaningful.
        self.register_buffer("coefficients", torch.ones(m, dtype=torch.float64))
        self.register_buffer("accuracy", torch.zeros(m, dtype=torch.float64))
        self.register_buffer("previous_accuracy", torch.zeros(m, dtype=torch.float64))
        self.register_buffer("cosine", torch.full((m,), float("nan")))
        self._warned = False

    def extra_repr(self) -> str:
        """Hyperparameters shown by ``repr``."""
        return (
            f"modalities={self.modalities!r}, lam={self.lam}, rho={self.rho}, "
            f"apply={self.apply_mode!r}, magnitude={self.magnitude}, "
            f"max_abs_coefficient={self.max_abs_coefficient}"
        )

    def losses(self, out: StepOutput, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Train the classifiers, update :math:`B` and add the direction loss.

        Adds ``"cggm_classifier"`` (always) and ``"cggm_direction"`` (when ``lam > 0`` and
        ``out.fused`` is available). In training mode, updates the buffers ``accuracy``,
        ``previous_accuracy`` and ``coefficients``.
        """
        missing = [n for n in self.modalities if n not in out.features]
        if missing:
            raise ModbalanceError(
                f"`out.features` lacks modalities {missing} of CGGM {list(self.modalities)}."
            )
        target = out.target
        leaves, head_losses, accs, masks = [], [], [], []
        for n in self.modalities:
            h = check_tensor(out.features[n], f"out.features[{n!r}]", ndim=2, dtype="floating")
            mask = out.present.get(n) if out.present is not None else None
            if mask is None:
                mask = torch.ones(h.shape[0], dtype=torch.bool, device=h.device)
            mask = mask.to(h.device)
            # absent rows may hold anything (even NaN): zero them for the classifiers
            # (and match the classifier's dtype: features may come from an autocast region)
            leaf = torch.where(mask.unsqueeze(1), h.detach(), 0.0)
            leaf = leaf.to(_param_dtype(self.heads[n], leaf.dtype)).requires_grad_(True)
            pred = self.heads[n](leaf)
            per = task_loss(pred, target, out.task, reduction="none")
            mf = mask.to(per.dtype)
            head_losses.append((per * mf).sum() / mf.sum().clamp_min(1))
            accs.append(unimodal_accuracy(pred, target, out.task, mask))
            leaves.append(leaf)
            masks.append(mask)
        result = dict(losses)
        cls_total = head_losses[0]
        for t in head_losses[1:]:
            cls_total = cls_total + t
        result["cggm_classifier"] = cls_total

        if self.training:
            with torch.no_grad():
                acc = all_reduce_mean(torch.stack(accs).to(self.accuracy.device, torch.float64))
                coef = cggm_coefficients(acc, self.accuracy, self.eps)
                if self.max_abs_coefficient is not None:
                    c = self.max_abs_coefficient
                    coef = coef.clamp(-c, c)
                self.previous_accuracy.copy_(self.accuracy)
                self.accuracy.copy_(acc)
                self.coefficients.copy_(coef)

        if self.lam > 0 and out.fused is not None:
            cos = self._cosines(out, head_losses, leaves, masks)
            result["cggm_direction"] = self.lam * cggm_direction_loss(self.coefficients, cos)
        return result

    def _cosines(
        self, out: StepOutput, head_losses: list[Tensor], leaves: list[Tensor], masks: list[Tensor]
    ) -> Tensor:
        """``(M,)`` cosines between each encoder's fused and unimodal gradients (buffer too)."""
        fused_loss = task_loss(out.fused, out.target, out.task)
        feats = [out.features[n] for n in self.modalities]
        if not all(f.requires_grad for f in feats):
            raise ModbalanceError(
                "CGGM's direction loss needs `out.features` that require grad (the encoders' "
                "outputs, not detached copies); set lam=0 to use the magnitude part only."
            )
        g_fused = torch.autograd.grad(fused_loss, feats, create_graph=True, allow_unused=True)
        g_uni = torch.autograd.grad(head_losses, leaves, retain_graph=True, allow_unused=True)
        cosines = []
        for j, _n in enumerate(self.modalities):
            gf = g_fused[j]
            gu = g_uni[j]
            if gf is None or gu is None:
                cosines.append(feats[j].sum() * 0.0)
                continue
            # a common dtype of at least float32 (bf16 features under autocast)
            dt = torch.promote_types(torch.promote_types(gu.dtype, gf.dtype), torch.float32)
            mf = masks[j].unsqueeze(1).to(dt)
            gu_m = (gu.detach().to(dt) * mf).reshape(-1)
            gf_m = (gf.to(dt) * mf).reshape(-1)
            cosines.append(F.cosine_similarity(gu_m, gf_m, dim=0))
        cos = torch.stack(cosines)
        with torch.no_grad():
            self.cosine.copy_(cos.detach().to(self.cosine))
        return cos

    @contextlib.contextmanager
    def around_step(self, out: StepOutput, optimizer: torch.optim.Optimizer) -> Iterator[None]:
        r"""Scale each encoder group's gradients (or update) by :math:`\rho B_m`."""
        if not self.magnitude:
            yield
            return
        self._scaler.check_optimizer(optimizer)
        k = self.rho * self.coefficients
        if self.apply_mode == "grad":
            if isinstance(optimizer, ADAPTIVE_OPTIMIZERS) and not self._warned:
                self._warned = True
                warn_adaptive(
                    optimizer,
                    "CGGM",
                    "the magnitude modulation rho * B_m mostly cancels (its sign and its "
                    "step-to-step changes remain; the direction loss is unaffected). This is the "
                    "released code's setting.",
                )
            self._scaler.scale_grads(k)
            yield
            return
        snaps = self._scaler.snapshot()
        yield
        self._scaler.rescale_updates(snaps, k)
