r"""ReconBoost: alternating modality updates with a boosting loss (Hua et al., ICML 2024).

One modality learner (encoder and head) is trained at a time, on a loss that down-weights the
samples the other modalities' ensemble already fits, then all learners are corrected together on
the loss of their sum. Transcribed from the authors' code (``huacong/ReconBoost``: ``train.py``,
``train_MSA.py``, ``models/dynamic_net.py``, ``schedule.py``) and checked against BalanceMM's
port (``GeWu-Lab/BalanceBenchmark``, ``ReconBoost_trainer.py``); :class:`ReconBoost` lists the
deviations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modbalance._checks import (
    ModbalanceError,
    check_choice,
    check_int,
    check_real,
    check_tensor,
)
from modbalance.balancing import StepOutput, check_unimodal
from modbalance.methods._common import (
    HeadEnsemble,
    check_mask,
    masked_mean,
    presence,
    settings_repr,
)

__all__ = [
    "ReconBoost",
    "reconboost_boosting_loss",
    "reconboost_consolidation",
    "reconboost_ensemble",
    "reconboost_stage",
]

#: The loss terms ReconBoost writes (every step writes all three; the inactive ones are 0).
TERMS = ("reconboost_boost", "reconboost_consolidation", "reconboost_rectify")


def _squeeze(p: Tensor) -> Tensor:
    """``(N, 1)`` regression outputs as ``(N,)``; anything else unchanged."""
    return p[:, 0] if p.ndim == 2 and p.shape[1] == 1 else p


def _compute_dtype(x: Tensor) -> torch.dtype:
    """float32 for half precision, the tensor's own dtype for float32/float64."""
    return torch.promote_types(x.dtype, torch.float32)


def reconboost_stage(
    step: int, num_modalities: int, stage_steps: int, rectify_steps: int
) -> tuple[int, int, bool]:
    r"""Where a step falls in ReconBoost's schedule: ``(stage, modality index, rectifying)``.

    Stage :math:`t` lasts ``stage_steps + rectify_steps`` steps: ``stage_steps`` boosting steps
    of modality :math:`t \bmod M` (the released ``schedule_model``'s fixed order), then
    ``rectify_steps`` global-rectification steps of all learners together.

    .. math::

        t = \Bigl\lfloor \frac{s}{S + R} \Bigr\rfloor, \qquad
        m_t = t \bmod M, \qquad
        \text{rectifying} = (s \bmod (S + R)) \ge S.

    Pure Python on Python ints: no tensor, no host synchronisation.

    Args:
        step: The global step :math:`s` (0-based, ``out.step``).
        num_modalities: :math:`M \ge 1`.
        stage_steps: :math:`S \ge 1`, boosting steps per stage.
        rectify_steps: :math:`R \ge 0`, rectification steps after each stage's boosting.

    Returns:
        ``(t, m_t, rectifying)``.

    Raises:
        TypeError: If an argument is not an int.
        ModbalanceError: If an argument is out of range.

    Example:
        >>> from modbalance.methods.reconboost import reconboost_stage
        >>> [reconboost_stage(s, 2, 2, 1) for s in (0, 2, 3, 6)]
        [(0, 0, False), (0, 0, True), (1, 1, False), (2, 0, False)]
    """
    step = check_int(step, "step", low=0)
    num_modalities = check_int(num_modalities, "num_modalities", low=1)
    stage_steps = check_int(stage_steps, "stage_steps", low=1)
    rectify_steps = check_int(rectify_steps, "rectify_steps", low=0)
    period = stage_steps + rectify_steps
    stage = step // period
    return stage, stage % num_modalities, step % period >= stage_steps


def reconboost_ensemble(
    predictions: Mapping[str, Tensor],
    present: Mapping[str, Tensor] | None = None,
    boost_rate: Tensor | float = 1.0,
    *,
    exclude: str | None = None,
) -> Tensor:
    r"""The learners' ensemble: :math:`F_{-e} = \eta \sum_{m \ne e,\ m \in P_i} f_m(x_{im})`.

    The released ``DynamicNet.forward`` (``mask_model`` = the excluded learner, under
    ``no_grad`` there: the caller detaches here) and ``forward_grad`` (nothing excluded). A
    modality absent for a sample contributes nothing (``present``); a sample with no learner
    left gets 0 (zero logits: the uniform distribution).

    Args:
        predictions: ``{modality: (N,) or (N, 1)}`` regression outputs or ``{modality: (N, C)}``
            logits, one shape for all.
        present: Optional ``{modality: (N,) bool}``; a missing entry means all present.
        boost_rate: :math:`\eta`, a scalar (tensor or float).
        exclude: The modality left out (the learner being trained), or ``None``.

    Returns:
        ``(N,)`` or ``(N, C)``.

    Raises:
        ModbalanceError: No predictions, predictions of different shapes, an unknown
            ``exclude`` or a presence mask of the wrong shape.

    Example:
        >>> import torch
        >>> from modbalance.methods.reconboost import reconboost_ensemble
        >>> preds = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0, 4.0])}
        >>> reconboost_ensemble(preds, {"b": torch.tensor([True, False])}, 0.5)
        tensor([2., 1.])
        >>> reconboost_ensemble(preds, exclude="a")
        tensor([3., 4.])
    """
    if not isinstance(predictions, Mapping) or not predictions:
        raise ModbalanceError(
            "`predictions` must be a non-empty mapping {modality: (N,) outputs or (N, C) logits}."
        )
    if exclude is not None and exclude not in predictions:
        raise ModbalanceError(
            f"`exclude` must name one of the predictions {sorted(predictions)}, got {exclude!r}."
        )
    preds = {m: _squeeze(check_tensor(p, f"predictions[{m!r}]")) for m, p in predictions.items()}
    first = next(iter(preds.values()))
    total = torch.zeros(first.shape, dtype=_compute_dtype(first), device=first.device)
    for m, p in preds.items():
        if p.shape != first.shape:
            raise ModbalanceError(
                f"every learner's prediction must have the same shape; got {tuple(first.shape)} "
                f"and {tuple(p.shape)} ({m!r})."
            )
        if m == exclude:
            continue
        mask = check_mask((present or {}).get(m), p.shape[0], p.device, f"present[{m!r}]")
        mask = mask.view(-1, *([1] * (p.ndim - 1)))
        total = total + torch.where(mask, p.to(total.dtype), torch.zeros_like(total))
    if isinstance(boost_rate, Tensor):
        boost_rate = boost_rate.to(device=total.device, dtype=total.dtype)
    return boost_rate * total


def _check_pair(pred: Tensor, other: Tensor, task: str, what: str) -> None:
    """``pred`` and ``other`` of one shape that fits ``task``."""
    check_choice(task, "task", ("regression", "classification"))
    if pred.shape != other.shape:
        raise ModbalanceError(
            f"`pred` and `{what}` must have the same shape, got {tuple(pred.shape)} and "
            f"{tuple(other.shape)}."
        )
    if task == "classification" and pred.ndim != 2:
        raise ModbalanceError(
            f"a classification `pred` must be (N, C) logits, got shape {tuple(pred.shape)}."
        )
    if task == "regression" and pred.ndim != 1:
        raise ModbalanceError(
            f"a regression `pred` must be (N,) or (N, 1), got shape {tuple(pred.shape)}."
        )


def _check_target(pred: Tensor, target: Tensor, task: str) -> None:
    """A ``(N,)`` target; integer class indices for classification."""
    check_tensor(target, "target")
    if target.shape != pred.shape[:1]:
        raise ModbalanceError(
            f"`target` must have shape ({pred.shape[0]},), got {tuple(target.shape)}."
        )
    if task == "classification" and (target.is_floating_point() or target.is_complex()):
        raise TypeError(
            f"`target` must hold integer class indices for task='classification', got dtype "
            f"{target.dtype}."
        )


def reconboost_boosting_loss(
    pred: Tensor,
    ensemble: Tensor,
    target: Tensor,
    task: str,
    *,
    present: Tensor | None = None,
    weight1: float = 5.0,
    weight2: float = 1.0,
    boost_rate: Tensor | float = 1.0,
    regression_loss: str = "l1",
) -> Tensor:
    r"""ReconBoost's boosting loss of the learner being trained, against the others' ensemble.

    **Classification** (the released ``boosting_loss``): with :math:`p = \operatorname{softmax}
    (f_m)` the learner's prediction and :math:`q = \operatorname{softmax}(\operatorname{sg}
    F_{-m})` the others' ensemble,

    .. math::

        \mathcal L_{\text{boost}} = \frac{1}{|P_m|} \sum_{i \in P_m} \frac{1}{C}
            \bigl(-w_1 + w_2\, q_{i y_i}\bigr) \log p_{i y_i},

    a cross-entropy whose sample weight :math:`w_1 - w_2 q_{iy_i}` shrinks where the ensemble
    already gives the true class a high probability (the :math:`1/C` is the released
    ``.mean(-1)`` over the one-hot classes).

    **Regression** (ours): the learner's share of the ensemble fits the residual the others
    leave, :math:`r_i = y_i - \operatorname{sg}(F_{-m})_i`:

    .. math::

        \mathcal L_{\text{boost}} = \frac{1}{|P_m|} \sum_{i \in P_m}
            \ell\bigl(\operatorname{sg}(\eta)\, f_{im},\; r_i\bigr),

    with :math:`\ell` the L1 (default) or squared error; the weights :math:`w_1, w_2` are not
    used. This is :math:`\ell(F, y)` with every other learner (and :math:`\eta`) frozen.

    Args:
        pred: ``(N, C)`` logits or ``(N,)``/``(N, 1)`` outputs of the learner being trained.
        ensemble: :math:`F_{-m}`, same shape (:func:`reconboost_ensemble` with ``exclude``);
            detached here.
        target: ``(N,)`` class indices or float targets.
        task: ``"classification"`` or ``"regression"``.
        present: ``(N,) bool``, the samples :math:`P_m` that have the modality (all if ``None``).
        weight1: :math:`w_1` (classification).
        weight2: :math:`w_2` (classification).
        boost_rate: :math:`\eta` (regression; detached here).
        regression_loss: ``"l1"`` or ``"l2"``.

    Returns:
        A scalar.

    Raises:
        TypeError: A floating ``target`` for classification.
        ModbalanceError: Shapes that do not fit the task or each other, an unknown ``task`` or
            ``regression_loss``.

    Example:
        >>> import torch
        >>> from modbalance.methods.reconboost import reconboost_boosting_loss
        >>> pred = torch.zeros(2, 2, requires_grad=True)   # p = 1/2 for both classes
        >>> ens = torch.tensor([[9.0, -9.0], [-9.0, 9.0]])  # the others fit sample 0 only
        >>> loss = reconboost_boosting_loss(pred, ens, torch.tensor([0, 0]), "classification")
        >>> round(float(loss.detach()), 4)  # ((5 - 1) + (5 - 0)) / 2 * log 2 / 2
        1.5597
    """
    pred, ensemble = _squeeze(pred), _squeeze(ensemble)
    _check_pair(pred, ensemble, task, "ensemble")
    _check_target(pred, target, task)
    check_choice(regression_loss, "regression_loss", ("l1", "l2"))
    dtype = _compute_dtype(pred)
    x, e = pred.to(dtype), ensemble.detach().to(dtype)
    mask = check_mask(present, x.shape[0], x.device, "present")
    if task == "classification":
        y = target.to(device=x.device, dtype=torch.long)[:, None]
        log_p = F.log_softmax(x, dim=1).gather(1, y)[:, 0]
        q = F.softmax(e, dim=1).gather(1, y)[:, 0]
        per = (-weight1 + weight2 * q) * log_p / x.shape[1]
    else:
        eta = boost_rate.detach().to(x) if isinstance(boost_rate, Tensor) else boost_rate
        residual = target.to(device=x.device, dtype=dtype) - e
        diff = eta * x - residual
        per = diff.abs() if regression_loss == "l1" else diff.square()
    return masked_mean(per, mask)


def reconboost_consolidation(
    pred: Tensor,
    previous: Tensor,
    task: str,
    *,
    present: Tensor | None = None,
    grad: bool = True,
) -> Tensor:
    r"""The memory-consolidation term: how far the learner moved from the previous stage's.

    .. math::

        \mathcal L_{\text{cons}} = \frac{1}{|P| \, C} \sum_{i \in P} \bigl\lVert
            \sigma(f_{im}) - \operatorname{sg}\,\sigma(f_{im'}) \bigr\rVert^2,

    with :math:`m'` the learner of the previous stage, :math:`P` the samples that have both,
    :math:`\sigma` the softmax for classification (the released ``ga_loss``: ``MSELoss`` of the
    two softmax outputs, the squared difference of their cross-entropy gradients
    :math:`\sigma(f) - e_y`) and the identity for regression (ours: the gradients of the squared
    error :math:`f - y` differ by :math:`f_m - f_{m'}`, :math:`C = 1`).

    Args:
        pred: ``(N, C)`` logits or ``(N,)``/``(N, 1)`` outputs of the learner being trained.
        previous: The previous stage's learner on the same batch, same shape (detached here).
        task: ``"classification"`` or ``"regression"``.
        present: ``(N,) bool`` samples that have both modalities (all when ``None``).
        grad: ``True`` (default): the gradient reaches ``pred``. ``False``: the released code's
            term, both sides detached (a logged value without gradient).

    Returns:
        A scalar.

    Raises:
        ModbalanceError: Shapes that do not fit the task or each other, or an unknown ``task``.

    Example:
        >>> import torch
        >>> from modbalance.methods.reconboost import reconboost_consolidation
        >>> a, b = torch.tensor([1.0, 3.0]), torch.tensor([0.0, 0.0])
        >>> reconboost_consolidation(a, b, "regression")
        tensor(5.)
    """
    pred, previous = _squeeze(pred), _squeeze(previous)
    _check_pair(pred, previous, task, "previous")
    dtype = _compute_dtype(pred)
    x, prev = pred.to(dtype), previous.detach().to(dtype)
    if not grad:
        x = x.detach()
    if task == "classification":
        x, prev = F.softmax(x, dim=1), F.softmax(prev, dim=1)
    per = (x - prev).square()
    per = per.mean(1) if per.ndim == 2 else per
    return masked_mean(per, check_mask(present, x.shape[0], x.device, "present"))


class ReconBoost(HeadEnsemble):
    r"""ReconBoost: one modality learner per stage on a boosting loss, then a joint correction.

    The learner of modality :math:`m` is encoder :math:`m` with its head :math:`h_m`, its output
    :math:`f_m` (``out.unimodal[m]``); the model is the learners' ensemble
    :math:`F = \eta\sum_m f_m` with a learnable boost rate :math:`\eta` (the parameter
    ``boost_rate``, owned by the method). The steps follow :func:`reconboost_stage`: stage
    :math:`t` trains learner :math:`m_t = t \bmod M` for ``stage_steps`` steps, then all
    learners together for ``rectify_steps`` steps. :meth:`losses` *replaces* the step's terms:

    * **boosting step** (the released "phase 1"):
      ``"reconboost_boost"`` :math:`= \mathcal L_{\text{boost}}(f_{m_t}, F_{-m_t})`
      (:func:`reconboost_boosting_loss`, the ensemble of the others
      :math:`F_{-m_t} = \eta \sum_{m \neq m_t} f_m` detached) and
      ``"reconboost_consolidation"`` :math:`= \alpha\,\mathcal L_{\text{cons}}(f_{m_t},
      f_{m_{t-1}})` (:func:`reconboost_consolidation`; not in stage 0, as released). The
      gradient reaches encoder and head :math:`m_t` only;
    * **rectification step** (the released "global rectification", ``correct_epoch``):
      ``"reconboost_rectify"`` :math:`= \ell(\eta \sum_m f_m, y)` over the samples with at least
      one modality (cross-entropy, or the regression loss), reaching every encoder and head and
      :math:`\eta`.

    Every step writes the three terms (the inactive ones are a constant 0), so logged means are
    comparable across steps. The step's other terms, the fused ``"task"`` among them, are
    dropped (``keep`` keeps some): ReconBoost has no fusion head. :meth:`predict` is the
    ensemble :math:`\eta\sum_{m \in P_i} h_m(z_{im})` over the modalities each sample has.
    It acts in both phases of the schedule by default: ReconBoost *is* the training.

    **Deviations from the released code.**

    * *One optimizer, one step per batch.* The code builds a new SGD optimizer for every stage
      (over the learner's parameters) and for every rectification (over all of them, with its
      own learning rate). Here the loop's one optimizer steps every parameter that received a
      gradient; parameters without one (``grad is None``: the other learners in a boosting step,
      the unused fusion head) are skipped by PyTorch's optimizers, so the same parameters move,
      but momentum and Adam state carry over between stages and one learning rate serves both
      kinds of step. Stage lengths are counted in steps (``stage_steps``, ``rectify_steps``),
      not epochs (the code: ``epochs_per_stage`` = ``correct_epoch`` = 4; BalanceMM: 1 and 1).
    * *The consolidation term has a gradient.* The released ``ga_loss`` detaches *both*
      softmax outputs (in the authors' code and in BalanceMM), so it adds to the logged loss but
      never changes an update. Here its gradient reaches the learner being trained (the paper's
      regulariser); ``consolidation_grad=False`` restores the released no-op.
    * *Every learner is in the ensemble from step 0*, as with the code's ``--use_pretrain`` and
      in BalanceMM. Without pretraining the code starts from an empty ensemble, a constant
      whose one-column softmax is 1, so stage 0 weights every sample :math:`(w_1 - w_2)/C`.
    * *Separate heads.* The code's ``common_space`` shares one head between the learners; here
      each learner uses the model's head :math:`h_m` (pass one module for every modality in
      ``heads``, and have the model use it, to share it).
    * *Ours*: missing modalities (an absent learner contributes nothing to any sum, its
      samples leave its losses; a sample without any other learner sees zero ensemble logits),
      regression (the residual form of :func:`reconboost_boosting_loss`; the consolidation on
      the raw outputs), M > 2 with the released ``train_MSA.py`` rule (the ensemble of all the
      others; the previous stage's learner for the consolidation).

    **Adam.** The schedule (which learner trains when) and the per-sample weights of the
    boosting loss survive an adaptive optimizer; a common scale (:math:`w_1`, :math:`1/C`)
    does not.

    ReconBoost has no per-modality factor, hence no ``coefficients``: the stage is a schedule
    (``out.step``), not a weight. The heads are held by reference (the model's, trained and
    saved with it); the method's state is ``boost_rate``.

    Args:
        modalities: Modality names (at least two, distinct), in the order of the stages.
        heads: ``{modality: head}`` callables from ``(N, D)`` features to the learner's output
            (``out.unimodal[m]`` must be ``heads[m]``'s output), for :meth:`predict`.
        stage_steps: Boosting steps per stage (``>= 1``).
        rectify_steps: Rectification steps after each stage's boosting (``>= 0``; ``None``:
            as many as ``stage_steps``, the released 4 + 4 epochs).
        weight1: :math:`w_1` (released default 5; ``train_MSA.py`` 1).
        weight2: :math:`w_2 \le w_1` (released default 1; ``train_MSA.py`` 0.25).
        alpha: :math:`\alpha`, the consolidation weight (released 0.5).
        boost_rate: Initial :math:`\eta > 0` (released 1.0; BalanceMM 0.01).
        learn_boost_rate: Train :math:`\eta` in the rectification steps (released: yes).
        consolidation_grad: See the deviations (``False``: the released, detached term).
        regression_loss: ``"l1"`` (default, the suite's) or ``"l2"``.
        keep: Names of the step's terms to keep next to ReconBoost's (default none).
        phases: Phases of the dual-phase schedule in which the method acts (both by default).

    Reference:
        C. Hua, Q. Xu, S. Bao, Z. Yang, Q. Huang, "ReconBoost: Boosting Can Achieve Modality
        Reconcilement", ICML 2024 (arXiv:2405.09321). Code: https://github.com/huacong/ReconBoost

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from modbalance.balancing import StepOutput, combine_losses
        >>> from modbalance.methods.reconboost import ReconBoost
        >>> enc = nn.ModuleDict({"text": nn.Linear(5, 4), "audio": nn.Linear(3, 4)})
        >>> heads = nn.ModuleDict({m: nn.Linear(4, 3) for m in enc})
        >>> x = {"text": torch.randn(6, 5), "audio": torch.randn(6, 3)}
        >>> z = {m: enc[m](x[m]) for m in enc}
        >>> rb = ReconBoost(["text", "audio"], heads, stage_steps=2, rectify_steps=1)
        >>> out = StepOutput(z, {m: heads[m](z[m]) for m in enc}, None, {},
        ...                  torch.tensor([0, 1, 2, 0, 1, 2]), "classification", step=3)
        >>> terms = rb.losses(out, {"task": torch.tensor(1.0, requires_grad=True)})
        >>> sorted(terms)  # step 3: stage 1 boosts "audio"
        ['reconboost_boost', 'reconboost_consolidation', 'reconboost_rectify']
        >>> combine_losses(terms).backward()
        >>> enc["audio"].weight.grad is not None, enc["text"].weight.grad is None
        (True, True)
        >>> tuple(rb.predict(z).shape)  # the ensemble's (N, C) logits
        (6, 3)
    """

    def __init__(
        self,
        modalities: Sequence[str],
        heads: Mapping[str, Callable[[Tensor], Tensor]],
        *,
        stage_steps: int = 20,
        rectify_steps: int | None = None,
        weight1: float = 5.0,
        weight2: float = 1.0,
        alpha: float = 0.5,
        boost_rate: float = 1.0,
        learn_boost_rate: bool = True,
        consolidation_grad: bool = True,
        regression_loss: str = "l1",
        keep: Iterable[str] = (),
        phases: Iterable[int] = (1, 2),
    ) -> None:
        super().__init__(modalities, heads, keep, phases)
        self.stage_steps = check_int(stage_steps, "stage_steps", low=1)
        rectify = self.stage_steps if rectify_steps is None else rectify_steps
        self.rectify_steps = check_int(rectify, "rectify_steps", low=0)
        self.weight1 = check_real(weight1, "weight1", low=0.0, low_inclusive=False)
        self.weight2 = check_real(weight2, "weight2", low=0.0, high=self.weight1)
        self.alpha = check_real(alpha, "alpha", low=0.0)
        eta = check_real(boost_rate, "boost_rate", low=0.0, low_inclusive=False)
        for name, flag in (
            ("learn_boost_rate", learn_boost_rate),
            ("consolidation_grad", consolidation_grad),
        ):
            if not isinstance(flag, bool):
                raise TypeError(f"`{name}` must be a bool, got {type(flag).__name__}.")
        self.boost_rate = nn.Parameter(torch.tensor(eta), requires_grad=learn_boost_rate)
        self.consolidation_grad = consolidation_grad
        self.regression_loss = check_choice(regression_loss, "regression_loss", ("l1", "l2"))
        ours = [k for k in self.keep if k in TERMS]
        if ours:
            raise ModbalanceError(f"`keep` must not name ReconBoost's own term {ours[0]!r}.")

    def extra_repr(self) -> str:
        """Summarise the configuration for ``repr``."""
        names = ("stage_steps", "rectify_steps", "weight1", "weight2", "alpha")
        return settings_repr(self, *names, "consolidation_grad", "keep")

    def stage(self, step: int) -> tuple[int, str, bool]:
        """``(stage, modality trained, rectifying)`` at global step ``step``.

        Example:
            >>> from torch import nn
            >>> from modbalance.methods.reconboost import ReconBoost
            >>> rb = ReconBoost(["a", "b"], {"a": nn.Identity(), "b": nn.Identity()},
            ...                 stage_steps=3, rectify_steps=2)
            >>> rb.stage(4), rb.stage(5)
            ((0, 'a', True), (1, 'b', False))
        """
        t, index, rectify = reconboost_stage(
            step, len(self.modalities), self.stage_steps, self.rectify_steps
        )
        return t, self.modalities[index], rectify

    def _present(self, out: StepOutput, preds: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {m: presence(out, m, p.shape[0], p.device) for m, p in preds.items()}

    def _boost_terms(
        self, out: StepOutput, preds: Mapping[str, Tensor], present: Mapping[str, Tensor], t: int
    ) -> tuple[Tensor, Tensor]:
        m = self.modalities[t % len(self.modalities)]
        with torch.no_grad():
            others = reconboost_ensemble(preds, present, self.boost_rate.detach(), exclude=m)
        boost = reconboost_boosting_loss(
            preds[m],
            others,
            out.target,
            out.task,
            present=present[m],
            weight1=self.weight1,
            weight2=self.weight2,
            boost_rate=self.boost_rate,
            regression_loss=self.regression_loss,
        )
        if t == 0 or self.alpha == 0.0:
            return boost, torch.zeros_like(boost)
        prev = self.modalities[(t - 1) % len(self.modalities)]
        both = present[m] & present[prev]
        cons = reconboost_consolidation(
            preds[m], preds[prev], out.task, present=both, grad=self.consolidation_grad
        )
        return boost, self.alpha * cons

    def _rectify_term(
        self, out: StepOutput, preds: Mapping[str, Tensor], present: Mapping[str, Tensor]
    ) -> Tensor:
        ens = reconboost_ensemble(preds, present, self.boost_rate)
        any_present = torch.stack(list(present.values())).any(0)
        if out.task == "classification":
            y = out.target.to(device=ens.device, dtype=torch.long)
            per = F.cross_entropy(ens, y, reduction="none")
        else:
            diff = ens - out.target.to(device=ens.device, dtype=ens.dtype)
            per = diff.abs() if self.regression_loss == "l1" else diff.square()
        return masked_mean(per, any_present)

    def losses(self, out: StepOutput, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Return the ``keep`` terms and ReconBoost's three terms (see the class docstring).

        Raises:
            ModbalanceError: If ``out.unimodal`` lacks a modality, ``out.step`` is negative or
                the predictions do not fit the task.
            TypeError: If ``out.step`` is not an int.
        """
        if out.phase not in self.phases:
            return dict(losses)
        check_unimodal(out, self.modalities, "ReconBoost")
        t, _, rectify = reconboost_stage(
            out.step, len(self.modalities), self.stage_steps, self.rectify_steps
        )
        preds = {m: _squeeze(out.unimodal[m]) for m in self.modalities}
        present = self._present(out, preds)
        new = self._kept(losses)
        first = preds[self.modalities[0]]
        zero = torch.zeros((), dtype=_compute_dtype(first), device=first.device)
        if rectify:
            new.update(zip(TERMS, (zero, zero, self._rectify_term(out, preds, present))))
        else:
            boost, cons = self._boost_terms(out, preds, present, t)
            new.update(zip(TERMS, (boost, cons, zero)))
        return new

    def _ensemble(self, preds: dict[str, Tensor], present: Mapping[str, Tensor] | None) -> Tensor:
        r"""The ensemble :math:`\eta\sum_{m \in P_i} h_m(z_{im})` (:func:`reconboost_ensemble`)."""
        return reconboost_ensemble(preds, present, self.boost_rate)

    def summary(self) -> dict[str, float]:
        """``{"boost_rate": eta}`` (one host read; call it once per epoch, not in a step)."""
        return {"boost_rate": float(self.boost_rate.detach())}
