r"""G2D: gradient-guided distillation (Rakib & Bagavathi, ICCV 2025).

The fused model learns from alone-trained unimodal teachers (their logits, through the fused
prediction, and their features, per encoder), and sequential modality prioritisation (SMP)
lets only the encoder of the modality whose teacher is weakest on the batch learn at each step.
Transcribed from the released code (``rAIson-Lab/G2D``: ``student.py``'s ``train``,
``distillation_loss`` and ``feature_loss``; ``utils/utils.py``'s
``modulate_gradients_based_on_scores_from_two_modalities``; ``config.py``); :class:`G2D` lists
the deviations.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modbalance._checks import ModbalanceError, check_choice, check_int, check_modality_names
from modbalance._groups import GroupScaler, parse_groups
from modbalance.balancing import BalancingMethod, StepOutput, check_phases
from modbalance.distributed import all_reduce_sum
from modbalance.methods._common import (
    add_terms,
    check_teacher,
    masked_mean,
    per_modality,
    presence,
    settings_repr,
)
from modbalance.methods.umt import masked_feature_mse
from modbalance.teachers import TeacherOutput

__all__ = ["G2D", "g2d_logit_distance", "g2d_teacher_scores", "smp_mask"]


def _as_prediction(pred: Tensor, task: str) -> Tensor:
    """``(N, 1)`` regression outputs as ``(N,)``; computed in at least float32."""
    if task == "regression" and pred.ndim == 2 and pred.shape[1] == 1:
        pred = pred[:, 0]
    return pred.to(torch.promote_types(pred.dtype, torch.float32))


def g2d_logit_distance(
    fused: Tensor, teacher: Tensor, mask: Tensor, task: str, temperature: float = 1.0
) -> Tensor:
    r"""G2D's output distillation of the fused prediction towards one teacher's.

    Classification (the released ``distillation_loss``: ``kl_div(log_softmax(s / T),
    softmax(t / T), "batchmean") * T**2``), the teacher's distribution as the target:

    .. math::

        \mathcal K = \frac{T^2}{|P|} \sum_{i \in P} \operatorname{KL}\bigl(
            \sigma(t_i / T) \,\Vert\, \sigma(s_i / T)\bigr),

    and regression (ours; the released code is classification-only), the L1 distance
    :math:`\frac{1}{|P|}\sum_{i\in P} |s_i - t_i|` (no temperature). :math:`s` is the fused
    prediction, :math:`t` the teacher's (detached), :math:`P` the samples where ``mask`` holds.
    Absent rows give neither value nor gradient. No host synchronisation.

    Args:
        fused: ``(N, C)`` fused logits, or ``(N,)``/``(N, 1)`` regression outputs.
        teacher: The teacher's prediction of the same shape.
        mask: ``(N,)`` bool, the samples that have the teacher's modality.
        task: ``"classification"`` or ``"regression"``.
        temperature: :math:`T > 0` (classification only).

    Returns:
        A scalar.

    Example:
        >>> import torch
        >>> from modbalance.methods.g2d import g2d_logit_distance
        >>> s, t = torch.zeros(2, 2), torch.tensor([[0.0, 0.0], [5.0, 5.0]])
        >>> g2d_logit_distance(s, t, torch.tensor([True, True]), "classification")
        tensor(0.)
    """
    s, t = _as_prediction(fused, task), _as_prediction(teacher.detach(), task)
    if s.shape != t.shape:
        raise ModbalanceError(
            f"G2D distils the fused prediction towards each teacher's: the fused prediction has "
            f"shape {tuple(s.shape)}, the teacher's {tuple(t.shape)}; they must be the same."
        )
    rows = mask if s.ndim == 1 else mask[:, None]  # absent rows never reach the gradient
    s = torch.where(rows, s, torch.zeros_like(s))
    t = torch.where(rows, t.to(s.dtype), torch.zeros_like(s))
    if task == "regression":
        return masked_mean((s - t).abs(), mask)
    log_s = F.log_softmax(s / temperature, dim=-1)
    log_t = F.log_softmax(t / temperature, dim=-1)
    per = F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(-1)
    return masked_mean(per, mask) * temperature**2


@torch.no_grad()
def g2d_teacher_scores(
    teacher: TeacherOutput,
    target: Tensor,
    present: Mapping[str, Tensor],
    modalities: Sequence[str],
    task: str,
) -> Tensor:
    r"""Each teacher's score on the batch, averaged over ranks: higher is a stronger teacher.

    .. math::

        s_m = \frac{1}{|P_m|}\sum_{i \in P_m} \sigma(t_{im})_{y_i}
        \quad\text{(classification)}, \qquad
        s_m = -\frac{1}{|P_m|}\sum_{i \in P_m} |t_{im} - y_i| \quad\text{(regression, ours)},

    over the samples :math:`P_m` that have modality :math:`m`, pooled over every rank under
    ``torch.distributed`` (sums and counts all-reduced, so every rank gets the same scores). A
    modality absent from the whole batch scores :math:`+\infty`. The released code sums
    :math:`\sigma(t_{im})_{y_i}` over the batch; with every sample present that orders the
    teachers exactly as the mean does. No host synchronisation.

    Args:
        teacher: The teachers' outputs (``teacher.unimodal``).
        target: ``(N,)`` class indices or float targets.
        present: ``{m: (N,) bool}`` (a missing entry: all present).
        modalities: The modalities, in the order of the result.
        task: ``"classification"`` or ``"regression"``.

    Returns:
        ``(M,)`` float scores.
    """
    sums, counts = [], []
    for m in modalities:
        t = _as_prediction(teacher.unimodal[m].detach(), task)
        mask = present.get(m)
        mask = torch.ones(t.shape[0], dtype=torch.bool, device=t.device) if mask is None else mask
        mask = mask.to(device=t.device, dtype=torch.bool)
        if task == "classification":
            per = t.softmax(-1).gather(1, target.to(t.device).long().view(-1, 1))[:, 0]
        else:
            per = -(t - target.to(device=t.device, dtype=t.dtype)).abs()
        sums.append(torch.where(mask, per, torch.zeros_like(per)).sum())
        counts.append(mask.sum().to(per.dtype))
    pooled = all_reduce_sum(torch.stack([torch.stack(sums), torch.stack(counts)]))
    inf = torch.full_like(pooled[0], float("inf"))
    return torch.where(pooled[1] > 0, pooled[0] / pooled[1].clamp_min(1.0), inf)


#: The rules of sequential modality prioritisation for M > 2 (both are the released rule at M = 2).
SMP_RULES = ("drop_strongest", "keep_weakest")


def smp_mask(scores: Tensor, rule: str = "drop_strongest") -> Tensor:
    r"""Sequential modality prioritisation: which encoders keep this step's gradient.

    .. math::

        \texttt{drop\_strongest}:\ k_m = [\, m \ne \operatorname{arg\,max}_j s_j \,],
        \qquad
        \texttt{keep\_weakest}:\ k_m = [\, m = \operatorname{arg\,min}_j s_j \,].

    For two modalities both are the released rule (the modality whose teacher scores higher
    gets ``grad * 0``, the other ``grad * 1``); on an exact tie (the released code raises) the
    first modality keeps its gradient under both rules. For :math:`M > 2` (ours)
    ``drop_strongest`` (the default) withholds the gradient of the strongest teacher's
    modality only; ``keep_weakest`` lets only the weakest learn (at :math:`M = 6` it froze five
    encoders out of six in every step and lost 17 points on mfeat). A modality absent from the
    batch (score :math:`+\infty`) is never the one dropped nor the one kept. No host
    synchronisation.

    Args:
        scores: ``(M,)`` teacher scores (higher is stronger).
        rule: ``"drop_strongest"`` or ``"keep_weakest"``.

    Returns:
        ``(M,)`` float 0/1 mask: exactly one 0 (``drop_strongest``) or exactly one 1.

    Example:
        >>> import torch
        >>> from modbalance.methods.g2d import smp_mask
        >>> smp_mask(torch.tensor([0.7, 0.2, 0.5]))
        tensor([0., 1., 1.])
        >>> smp_mask(torch.tensor([0.7, 0.2, 0.5]), "keep_weakest")
        tensor([0., 1., 0.])
    """
    check_choice(rule, "rule", SMP_RULES)
    if rule == "keep_weakest":
        index = scores.argmin(-1, keepdim=True)
        return torch.zeros_like(scores).scatter_(-1, index, 1.0)
    finite = torch.where(torch.isposinf(scores), torch.full_like(scores, -torch.inf), scores)
    last = finite.shape[-1] - 1 - finite.flip(-1).argmax(-1, keepdim=True)  # ties: drop the last
    return torch.ones_like(scores).scatter_(-1, last, 0.0)


class G2D(BalancingMethod):
    r"""Gradient-guided distillation from alone-trained teachers, with modality prioritisation.

    **Loss.** Per step (phase 2 by default) the method *adds* two terms per modality to the
    step's terms (the fused ``"task"`` and the others stay):

    .. math::

        \mathcal L = \mathcal L_\text{task}(s, y) + \sum_m \Bigl[
            \alpha_m\, \mathcal K\bigl(s, \operatorname{sg}(t_m)\bigr)
            + \gamma_m\, \frac{1}{|P_m| D}\sum_{i\in P_m}
              \bigl\lVert z_{im} - \operatorname{sg}(z^T_{im})\bigr\rVert_2^2 \Bigr],

    ``"g2d_kd_<m>"`` (:math:`\alpha_m\mathcal K`, :func:`g2d_logit_distance`:
    :math:`T^2\operatorname{KL}(\sigma(t_m/T)\,\Vert\,\sigma(s/T))`, the teacher's tempered
    distribution as the target, averaged over the samples that have modality :math:`m`; the L1
    distance to the teacher's output for regression) and
    ``"g2d_feat_<m>"`` (:math:`\gamma_m` times the feature MSE,
    :func:`~modbalance.methods.umt.masked_feature_mse`). :math:`s` is the fused prediction
    (``out.fused``), :math:`t_m, z^T_m` the teacher's output and features (``out.teacher``),
    :math:`z_m` the student's features. ``"g2d_kd_<m>"`` reaches the fusion head and every
    encoder through :math:`s`; ``"g2d_feat_<m>"`` reaches encoder :math:`m` only; neither
    reaches a teacher. A zero weight leaves its terms out (``feature_weight=0`` is the released
    ``aT+vT`` experiment, ``logit_weight=0`` the ``aTF+vTF`` one).

    **Sequential modality prioritisation** (:meth:`around_step`, before ``optimizer.step()``):
    every step, each teacher scores the batch (:func:`g2d_teacher_scores`: the mean
    true-class probability; :math:`-\text{MAE}` for regression) and the gradients of every
    parameter of encoder group :math:`m` (the step's whole gradient, every loss term) are
    multiplied by :math:`k_m` (:func:`smp_mask`): 0 for the modality with the *strongest*
    teacher, 1 for the others. For two modalities this is the released rule (the weaker one
    learns); for :math:`M > 2` (ours) ``smp="drop_strongest"`` (default) withholds only the
    strongest teacher's modality, ``smp="keep_weakest"`` lets only the weakest learn. The
    applied mask is the buffer ``coefficients``; ``summary()`` adds the latest scores and each
    modality's share of the epoch's steps with :math:`k_m = 1` (``kept_fraction_<m>``, reset
    by :meth:`epoch_end`).

    **Adam.** A zeroed gradient does not freeze a parameter under Adam/AdamW: the moments decay
    (:math:`m \leftarrow \beta_1 m`, :math:`v \leftarrow \beta_2 v`) and the update
    :math:`\eta\,\hat m/(\sqrt{\hat v}+\epsilon)` keeps moving it along the momentum of earlier
    steps (and AdamW's weight decay still applies); SGD with momentum (the released optimizer,
    0.9) behaves alike. A 0/1 switch is not a constant scale, so Adam does not cancel it: the
    step's fresh gradient is withheld from the masked encoders.

    **Defaults** (``config.py``): :math:`T = 1`, :math:`\alpha = \gamma = 1`, SMP from the first
    step (the released window is epochs 0-150 of 300; ``smp_until`` gives one in steps).

    **Deviations from the released code.**

    * *Which parameters are masked*: the released code masks only the 4-D (convolution) weights
      of the parameters named ``audio*``/``visual*``; here every parameter of each group (pass
      only the convolution weights as the groups to reproduce it).
    * *Ties*: the released code raises on equal teacher scores; here the first modality wins.
    * *Scores*: the mean over the samples that have the modality (the released sum over the
      batch orders the teachers identically when every sample is present), pooled over ranks
      under ``torch.distributed`` (each rank must mask the same encoders).
    * *Missing modalities*: teacher :math:`m`'s terms and score use only the samples that have
      modality :math:`m` (the released code has none); ``batchmean`` becomes that mean.
    * *Regression and M > 2* (both ours), as above; per-modality weights and temperatures (the
      released ``temp_audio``/``temp_video`` and per-modality loss weights) are accepted as
      mappings.

    Args:
        modalities: Modality names (at least two, distinct).
        groups: ``{modality: encoder module or iterable of parameters}`` for every modality,
            disjoint (e.g. ``model.modality_groups()``); SMP multiplies their gradients.
        temperature: :math:`T > 0`, one value or ``{modality: value}``.
        logit_weight: :math:`\alpha \ge 0`, one value or ``{modality: value}``.
        feature_weight: :math:`\gamma \ge 0`, one value or ``{modality: value}``.
        smp_until: SMP acts while ``out.step < smp_until`` (``None``: always; ``0``: never,
            distillation only).
        smp: The rule for :math:`M > 2`, ``"drop_strongest"`` (default) or
            ``"keep_weakest"`` (:func:`smp_mask`); the same at :math:`M = 2`.
        phases: Phases of the dual-phase schedule in which the method acts.

    Reference:
        M. Rakib, A. Bagavathi, "G²D: Boosting Multimodal Learning with Gradient-Guided
        Distillation", ICCV 2025 (arXiv:2506.21514). Code: https://github.com/rAIson-Lab/G2D

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from modbalance import G2D, StepOutput, TeacherOutput, balanced_step
        >>> enc = nn.ModuleDict({"text": nn.Linear(5, 4), "audio": nn.Linear(3, 4)})
        >>> x = {"text": torch.randn(6, 5), "audio": torch.randn(6, 3)}
        >>> head = nn.Linear(8, 3)
        >>> z = {m: enc[m](x[m]) for m in enc}
        >>> fused = head(torch.cat([z["text"], z["audio"]], 1))
        >>> y = torch.tensor([0, 1, 2, 0, 1, 2])
        >>> strong = 10 * nn.functional.one_hot(y, 3).float()  # the text teacher is right
        >>> teacher = TeacherOutput({m: torch.randn(6, 4) for m in enc},
        ...                         {"text": strong, "audio": torch.zeros(6, 3)})
        >>> out = StepOutput(z, {}, fused, {}, y, "classification", teacher=teacher)
        >>> g2d = G2D(["text", "audio"], enc)
        >>> opt = torch.optim.SGD([*enc.parameters(), *head.parameters()], lr=0.1)
        >>> terms = balanced_step(out, {"task": nn.functional.cross_entropy(fused, y)}, [g2d], opt)
        >>> sorted(terms)
        ['g2d_feat_audio', 'g2d_feat_text', 'g2d_kd_audio', 'g2d_kd_text', 'task']
        >>> g2d.coefficients  # the text encoder's gradient was zeroed, the audio one kept
        tensor([0., 1.])
        >>> float(enc["text"].weight.grad.abs().sum())
        0.0
    """

    needs_teacher = True
    coefficients: Tensor
    teacher_scores: Tensor
    kept_steps: Tensor
    smp_steps: Tensor

    _checked_state: ClassVar[dict[str, str]] = {
        "coefficients": "nonnegative",
        "kept_steps": "nonnegative",
        "smp_steps": "nonnegative",
    }

    def __init__(
        self,
        modalities: Sequence[str],
        groups: Mapping[str, nn.Module | Iterable[nn.Parameter]],
        *,
        temperature: float | Mapping[str, float] = 1.0,
        logit_weight: float | Mapping[str, float] = 1.0,
        feature_weight: float | Mapping[str, float] = 1.0,
        smp_until: int | None = None,
        smp: str = "drop_strongest",
        phases: Iterable[int] = (2,),
    ) -> None:
        super().__init__()
        self.modalities = check_modality_names(modalities, minimum=2)
        names, params = parse_groups(groups)
        if set(names) != set(self.modalities):
            raise ModbalanceError(
                f"`groups` must have one group per modality {list(self.modalities)}, got "
                f"{list(names)}."
            )
        params = [params[names.index(m)] for m in self.modalities]
        self._scaler = GroupScaler(self.modalities, params, "G2D")
        self.temperature = per_modality(
            temperature, "temperature", self.modalities, low=0.0, low_inclusive=False
        )
        self.logit_weight = per_modality(logit_weight, "logit_weight", self.modalities, low=0.0)
        self.feature_weight = per_modality(
            feature_weight, "feature_weight", self.modalities, low=0.0
        )
        self.smp_until = None if smp_until is None else check_int(smp_until, "smp_until", low=0)
        self.smp = check_choice(smp, "smp", SMP_RULES)
        self.phases = check_phases(phases)
        n = len(self.modalities)
        self.register_buffer("coefficients", torch.ones(n))
        self.register_buffer("teacher_scores", torch.full((n,), float("nan")))
        self.register_buffer("kept_steps", torch.zeros(n))
        self.register_buffer("smp_steps", torch.zeros(()))

    def extra_repr(self) -> str:
        """Summarise the configuration for ``repr``."""
        names = ("temperature", "logit_weight", "feature_weight", "smp_until", "smp")
        return settings_repr(self, *names)

    def _check(self, out: StepOutput) -> TeacherOutput:
        check_choice(out.task, "out.task", ("regression", "classification"))
        teacher = check_teacher(out, self.modalities, "G2D", outputs=True)
        if out.fused is None:
            raise ModbalanceError(
                "G2D distils the fused prediction towards the teachers' outputs, and "
                "`out.fused` is None (the fusion head did not run; G2D acts after the warm-up, "
                "phases=(2,))."
            )
        return teacher

    def losses(self, out: StepOutput, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Return the step's terms with ``"g2d_kd_<m>"`` and ``"g2d_feat_<m>"`` added.

        Raises:
            ModbalanceError: Without ``out.teacher`` or ``out.fused``; a modality missing from
                the features or the teacher's outputs; shapes that differ between student and
                teacher; a term of G2D's that the step already has.
            TypeError: If ``out.teacher`` is not a :class:`~modbalance.teachers.TeacherOutput`.
        """
        if out.phase not in self.phases:
            return dict(losses)
        teacher = self._check(out)
        new = dict(losses)
        for i, m in enumerate(self.modalities):
            z = out.features[m]
            mask = presence(out, m, z.shape[0], z.device)
            terms = {}
            if self.logit_weight[i] != 0.0:
                kd = g2d_logit_distance(
                    out.fused, teacher.unimodal[m], mask, out.task, self.temperature[i]
                )
                terms[f"g2d_kd_{m}"] = self.logit_weight[i] * kd
            if self.feature_weight[i] != 0.0:
                feat = masked_feature_mse(z, teacher.features[m], mask)
                terms[f"g2d_feat_{m}"] = self.feature_weight[i] * feat
            add_terms(new, terms, "G2D")
        return new

    @contextlib.contextmanager
    def around_step(self, out: StepOutput, optimizer: torch.optim.Optimizer) -> Iterator[None]:
        """Multiply each group's gradients by its SMP coefficient (0 or 1), then step.

        Raises:
            ModbalanceError: Without ``out.teacher`` (or its predictions), or when the
                optimizer updates no parameter of a group.
        """
        active = out.phase in self.phases
        smp = active and (self.smp_until is None or out.step < self.smp_until)
        if smp:
            teacher = check_teacher(out, self.modalities, "G2D", outputs=True)
            check_choice(out.task, "out.task", ("regression", "classification"))
            self._scaler.check_optimizer(optimizer)
            with torch.no_grad():
                present = {
                    m: presence(out, m, out.features[m].shape[0], out.features[m].device)
                    for m in self.modalities
                }
                scores = g2d_teacher_scores(
                    teacher, out.target, present, self.modalities, out.task
                ).to(self.teacher_scores)
                self.teacher_scores.copy_(scores)
                self.coefficients.copy_(smp_mask(scores, self.smp))
                self.kept_steps.add_(self.coefficients)
                self.smp_steps.add_(1.0)
                self._scaler.scale_grads(self.coefficients)
        elif active:
            self.coefficients.fill_(1.0)
        yield

    def epoch_end(self, epoch: int, evaluate: Callable[..., Any] | None = None) -> None:
        """Reset the per-epoch count of the steps each modality kept its gradient."""
        self.kept_steps.zero_()
        self.smp_steps.zero_()

    def summary(self) -> dict[str, float]:
        """``coefficient_<m>`` (the latest mask), ``teacher_score_<m>``, ``kept_fraction_<m>``."""
        out = super().summary()
        steps = max(float(self.smp_steps), 1.0)
        for m, s, k in zip(self.modalities, self.teacher_scores.tolist(), self.kept_steps.tolist()):
            out[f"teacher_score_{m}"] = float(s)
            out[f"kept_fraction_{m}"] = float(k) / steps
        return out
