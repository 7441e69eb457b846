r"""AUG: sustained boosting with adaptive classifier assignment (Jiang et al., NeurIPS 2025).

Each modality predicts with a *sum of learners* through one classifier shared by every learner
and every modality; the newest learner of a modality is trained boosting-style against the sum of
the earlier ones, and every few epochs the modality whose training score lags gets one learner
more. At inference the modalities' sums are combined with fixed weights (a late-fusion ensemble).
Transcribed from the authors' code (``njustkmg/NeurIPS25-AUG``: ``train_CREMAD.py``'s
``train_audio_video`` and main loop, ``model/AudioVideo.py``'s ``AVGBShareClassifier``);
:class:`AUG` lists the deviations.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modbalance._checks import (
    ModbalanceError,
    check_choice,
    check_int,
    check_modality_keys,
    check_modality_names,
    check_real,
    check_replace,
    check_target,
    check_tensor,
)
from modbalance.balancing import BalancingMethod, StepOutput, check_phases
from modbalance.distributed import all_reduce_mean, all_reduce_sum

__all__ = ["AUG", "aug_assignment", "aug_boosting_loss"]

TASKS = ("regression", "classification")


def _per_sample(pred: Tensor, target: Tensor, task: str) -> Tensor:
    """``(N,)`` L1 (regression) or cross-entropy losses, in the prediction's dtype."""
    if task == "regression":
        return (pred - target.to(pred.dtype)).abs()
    return F.cross_entropy(pred, target.long(), reduction="none")


def _masked_mean(per: Tensor, present: Tensor | None) -> Tensor:
    """Mean of ``per`` over the present samples (0 with gradient when none is present)."""
    if present is None:
        return per.mean()
    mask = present.to(device=per.device, dtype=torch.bool)
    kept = torch.where(mask, per, torch.zeros_like(per))
    return kept.sum() / mask.sum().clamp_min(1).to(per.dtype)


def _score(pred: Tensor, target: Tensor, task: str) -> Tensor:
    r"""Per-sample training score: :math:`p_i[y_i]` or :math:`e^{-|\hat y_i - y_i|}`, ``(N,)``."""
    if task == "regression":
        return torch.exp(-(pred - target.to(pred.dtype)).abs())
    return F.softmax(pred, dim=-1).gather(1, target.long().unsqueeze(1)).squeeze(1)


def _check_outputs(total: Tensor, target: Tensor, task: str, parts: Sequence[Any]) -> None:
    check_choice(task, "task", TASKS)
    check_tensor(total, "total", dtype="floating")
    want = 1 if task == "regression" else 2
    if total.ndim != want:
        shape = "(N,)" if task == "regression" else "(N, C)"
        raise ModbalanceError(
            f"for task={task!r} the predictions must have shape {shape}, got {tuple(total.shape)}."
        )
    check_target(target, task, total.shape[0], "target")
    if (parts[0] is None) != (parts[1] is None):
        raise ModbalanceError(
            "`previous` and `new` go together: pass both (two or more learners) or neither "
            "(one learner)."
        )
    for name, x in zip(("previous", "new"), parts):
        if x is not None and tuple(x.shape) != tuple(total.shape):
            raise ModbalanceError(
                f"`{name}` must have the shape of `total` {tuple(total.shape)}, got "
                f"{tuple(x.shape)}."
            )


def aug_boosting_loss(
    total: Tensor,
    target: Tensor,
    task: str,
    previous: Tensor | None = None,
    new: Tensor | None = None,
    present: Tensor | None = None,
    *,
    gamma: float = 0.5,
) -> Tensor:
    r"""AUG's sustained-boosting loss of one modality.

    With :math:`K` learners :math:`h_1, \dots, h_K` (outputs through the shared classifier),
    :math:`S = \sum_{k\le K} h_k` (``total``), :math:`S' = \sum_{k<K} h_k` (``previous``) and
    :math:`h_K` (``new``), classification (the released loss, with :math:`y` one-hot):

    .. math::

        \mathcal L = \mathrm{CE}(S, y) + \mathrm{CE}(S', y) + \mathrm{CE}(h_K, y)
                   - \gamma\,\mathrm{CE}\bigl(h_K,\; y \odot \operatorname{sg}
                     \operatorname{softmax}(S')\bigr)
                   = \mathrm{CE}(S) + \mathrm{CE}(S')
                   + \bigl(1 - \gamma\,\operatorname{sg} p'_{y}\bigr)\,\mathrm{CE}(h_K, y),

    per sample, averaged over the present samples: the new learner learns less from the samples
    the earlier ones already classify (:math:`p'_y = \operatorname{softmax}(S')_y`). With one
    learner (``previous = new = None``) it is :math:`\mathrm{CE}(S, y)`. Regression (ours) boosts
    on the residual, with the score :math:`s'_i = e^{-|S'_i - y_i|}` in place of :math:`p'_y`:

    .. math::

        \mathcal L = |S - y| + |S' - y|
                   + \bigl(1 - \gamma\,\operatorname{sg} s'\bigr)\,
                     \bigl|h_K - (y - \operatorname{sg} S')\bigr|.

    No host synchronisation.

    Args:
        total: :math:`S`, ``(N, C)`` logits or ``(N,)`` regression outputs.
        target: ``(N,)`` class indices or float targets.
        task: ``"classification"`` or ``"regression"``.
        previous: :math:`S'` (same shape as ``total``), or ``None`` with one learner.
        new: :math:`h_K` (same shape), or ``None`` with one learner.
        present: Optional ``(N,)`` bool mask of the samples that have the modality.
        gamma: :math:`\gamma` in ``[0, 1]`` (the released 0.5).

    Returns:
        A scalar loss.

    Raises:
        ModbalanceError: Shapes that do not fit the task, or only one of ``previous``/``new``.

    Example:
        >>> import torch
        >>> from modbalance.methods.aug import aug_boosting_loss
        >>> y = torch.tensor([0, 1])
        >>> prev, new = torch.tensor([[9.0, 0.0], [0.0, 0.0]]), torch.zeros(2, 2)
        >>> loss = aug_boosting_loss(prev + new, y, "classification", prev, new)
        >>> round(float(loss), 4)  # the confident first sample weighs ~0.5 for the new learner
        1.1265
    """
    gamma = check_real(gamma, "gamma", low=0.0, high=1.0)
    _check_outputs(total, target, task, (previous, new))
    loss = _masked_mean(_per_sample(total, target, task), present)
    if previous is None or new is None:
        return loss
    prev = previous.detach()
    weight = 1.0 - gamma * _score(prev, target, task)
    if task == "regression":
        boost = weight * (new - (target.to(prev.dtype) - prev)).abs()
    else:
        boost = weight * _per_sample(new, target, task)
    return (
        loss
        + _masked_mean(_per_sample(previous, target, task), present)
        + _masked_mean(boost, present)
    )


def aug_assignment(
    scores: Sequence[float], lam: float = 1.0, margin: float = 0.01
) -> tuple[int | None, float]:
    r"""Which modality gets a new learner: AUG's adaptive classifier assignment (host side).

    Two modalities (the released rule, :math:`s_m` the summed training score of modality
    :math:`m`): with :math:`\rho = s_0 / s_1`, :math:`\rho > \lambda + \delta` adds a learner to
    modality 1, :math:`\rho < \lambda - \delta` to modality 0, else none. :math:`M > 2` (ours):
    the same rule on the pair of the strongest and the weakest modality, taken in modality order
    (:math:`\rho = s_p/s_q`, :math:`p < q`); with :math:`\lambda = 1` it adds to the weakest
    when the gap exceeds the margin. Modalities without a score (NaN: not seen) are left out.

    Args:
        scores: One (mean) training score per modality, NaN where none was recorded.
        lam: :math:`\lambda`, the target ratio (``--lam``, released default 1).
        margin: :math:`\delta` (released 0.01).

    Returns:
        ``(index or None, rho)``; ``rho`` is NaN with fewer than two scored modalities.

    Example:
        >>> from modbalance.methods.aug import aug_assignment
        >>> aug_assignment([0.8, 0.5]), aug_assignment([0.5, 0.8]), aug_assignment([0.5, 0.5])
        ((1, 1.6), (0, 0.625), (None, 1.0))
    """
    seen = [k for k, s in enumerate(scores) if math.isfinite(s)]
    if len(seen) < 2:
        return None, math.nan
    hi = max(seen, key=lambda k: scores[k])
    lo = min(seen, key=lambda k: scores[k])
    p, q = (seen[0], seen[-1]) if hi == lo else (min(hi, lo), max(hi, lo))
    sp, sq = float(scores[p]), float(scores[q])
    rho = sp / sq if sq > 0 else (math.inf if sp > 0 else math.nan)
    if rho > lam + margin:
        return q, rho
    if rho < lam - margin:
        return p, rho
    return None, rho


def _dims(dim: int | Mapping[str, int], names: Sequence[str]) -> tuple[int, ...]:
    if isinstance(dim, Mapping):
        check_modality_keys(dim, "dim", names)
        return tuple(check_int(dim[m], f"dim[{m!r}]", low=1) for m in names)
    return (check_int(dim, "dim", low=1),) * len(names)


def _ensemble_weights(weights: Any, names: Sequence[str]) -> Tensor:
    """``(M,)`` non-negative weights normalised to sum 1 (uniform for ``None``)."""
    if weights is None:
        values = [1.0] * len(names)
    elif isinstance(weights, Mapping):
        check_modality_keys(weights, "weights", names)
        values = [check_real(weights[m], f"weights[{m!r}]", low=0.0) for m in names]
    else:
        values = [check_real(w, "weights", low=0.0) for w in weights]
        if len(values) != len(names):
            raise ModbalanceError(
                f"`weights` must give one weight per modality ({len(names)}), got {len(values)}."
            )
    total = sum(values)
    if total <= 0:
        raise ModbalanceError("`weights` must not all be zero.")
    return torch.tensor([v / total for v in values], dtype=torch.float64)


def _refresh_counts(module: nn.Module, incompatible_keys: Any) -> None:
    """After ``load_state_dict``: read the loaded learner counts once (outside the step)."""
    module._counts = [round(v) for v in module.coefficients.tolist()]


class AUG(BalancingMethod):
    r"""Sustained boosting and adaptive classifier assignment, with a weighted-ensemble predict.

    **Learners.** The method owns, for modality :math:`m`, ``max_learners`` learners
    :math:`g_{mk}(z) = \mathrm{ReLU}(W_{mk} z + b_{mk})` (``learners[i][k]``, ``Linear(dim_m,
    hidden)``) and one ``classifier`` :math:`c` (``Linear(hidden, num_outputs)``) shared by every
    learner of every modality, as the released ``fc_out``. Only the first :math:`K_m` learners
    are active (:math:`K_m` = ``coefficients[i]``, 1 at the start); modality :math:`m`
    predicts :math:`S_m = \sum_{k<K_m} c(g_{mk}(z_m))`. Inactive learners are never run, so they
    contribute nothing and get no gradient (``grad`` stays ``None``, so the optimizer, weight
    decay included, leaves them at their initialisation until they are switched on; this needs
    ``zero_grad(set_to_none=True)``, PyTorch's default). Put
    ``aug.parameters()`` in the optimizer when you build it.

    **Loss** (:meth:`losses`). The step's terms are *replaced* by ``"aug_<m>"`` =
    :func:`aug_boosting_loss` of :math:`S_m`, :math:`S'_m` (the sum without the newest learner)
    and the newest learner, over the samples that have modality :math:`m`; the fused ``"task"``
    and every other term are dropped except those in ``keep`` (default ``("readout",)``, the
    example's read-out of the model's own unimodal heads on detached features, which reaches no
    encoder). In AUG the fused model *is* the ensemble, so the model's fusion head is not
    trained (keep ``"task"`` to train it jointly, which is no longer AUG). It acts in both
    phases of the dual-phase schedule by default: AUG is the whole training.

    **Assignment** (:meth:`epoch_end`). Each step adds the scores :math:`p_i[y_i]`
    (regression: :math:`e^{-|S_i - y_i|}`, ours) of :math:`S_m` over present samples to running
    sums (buffers, no host synchronisation). At the end of epoch 0 and of every epoch with
    :math:`(e+1) \bmod` ``every`` :math:`= 0` (the released ``check``), the epoch's mean scores
    go through :func:`aug_assignment` and the chosen modality gets one learner more (none beyond
    ``max_learners``). The sums restart every epoch, as in the released loop.

    **Inference** (:meth:`predict`): :math:`\hat y_i = \sum_{m\in P_i} w_m S_{im} /
    \sum_{m \in P_i} w_m` over the modalities :math:`P_i` sample :math:`i` has, :math:`w` =
    ``weights`` normalised to sum 1 (uniform by default; ``weights=(0.4, 0.6)`` is the released
    ``merge_alpha = 0.4``: :math:`0.4 S_a + 0.6 S_v`).

    **Deviations from the released code.**

    * *One optimizer step per batch.* The code makes two per batch, audio then video, so the
      shared ``fc_out`` is updated by the audio loss before the video loss is computed. We sum
      the modalities' losses into one step: every parameter of a modality gets exactly the
      released gradient of its own loss at the step's parameters, the shared classifier the sum
      of both (tested: with SGD the audio side matches the released two-step update exactly; the
      video side and ``fc_out`` differ by the second-order effect of the earlier audio update).
      We do not alternate modalities by step: that would halve every modality's updates.
    * *Added learners are trained.* ``add_layer`` appends a new ``Linear`` after the optimizer
      was built over ``model.parameters()``, so in the released code every added learner stays
      at its random initialisation (only ``fc_out`` and the encoders learn through it). We train
      them (the paper's method); ``train_added=False`` reproduces the released behaviour (their
      ``requires_grad`` is off; gradient still flows through them to the encoder).
    * *At most* ``max_learners`` *per modality* (the released code has no cap); learners are
      preallocated and initialised once at construction (Xavier-normal weights, zero biases, as
      ``weight_init`` and ``add_layer``), from the method's own ``seed``.
    * *Mean scores, not sums*, enter the ratio, so that missing modalities (not in the code) do
      not bias it; with every modality present the ratio is the released one.
    * *Ensemble weights* default to uniform (the released ``merge_alpha`` default is 0.4, audio
      first), are normalised over the present modalities, and generalise to :math:`M`.
    * *Regression and* :math:`M > 2` are ours (see :func:`aug_boosting_loss` and
      :func:`aug_assignment`); ``lam`` other than 1 is defined for two modalities only.
    * *DDP*: the score sums are summed over ranks before a decision, and the method's own
      gradients are averaged over ranks in :meth:`around_step` (the method is not inside DDP).

    **Adam.** AUG decides which parameters exist and which loss trains them, and reweights
    samples inside one loss; none of that is a per-group gradient scale, so it survives Adam.
    Inactive learners have no gradient and are skipped by the optimizer.

    The per-modality factor is the number of active learners, ``coefficients`` (``(M,)`` float,
    in ``summary()`` as ``coefficient_<m>``). Change it only through :meth:`epoch_end` or
    ``load_state_dict`` (a host-side copy avoids reading it in the step).

    Args:
        modalities: Modality names (at least two, distinct).
        dim: Feature dimension, one int or ``{modality: dim}``.
        num_outputs: Classes :math:`C` (1 for regression).
        hidden: Width of the learners (``None``: ``dim``, or the largest of the dims; the
            released model maps 512-dim features to 256).
        max_learners: Learners preallocated per modality (at least 1).
        gamma: :math:`\gamma` of :func:`aug_boosting_loss` (released 0.5).
        lam: :math:`\lambda` of :func:`aug_assignment` (released ``--lam`` 1.0).
        margin: :math:`\delta` of :func:`aug_assignment` (released 0.01).
        every: Check every this many epochs (released: ``epochs // 10`` for more than 10
            epochs, else 1), and after epoch 0.
        weights: Ensemble weights, ``{modality: w}`` or a sequence in modality order.
        train_added: Train the added learners (``False``: the released frozen learners).
        keep: Names of the step's terms to keep next to AUG's.
        phases: Phases of the dual-phase schedule in which the method acts.
        seed: Seed of the learners' initialisation.

    Reference:
        Q. Jiang, L. Huang, Y. Yang, "Rethinking Multimodal Learning from the Perspective of
        Mitigating Classification Ability Disproportion", NeurIPS 2025 (arXiv:2502.20120).
        Code: https://github.com/njustkmg/NeurIPS25-AUG

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from modbalance.balancing import StepOutput, combine_losses
        >>> from modbalance.methods.aug import AUG
        >>> _ = torch.manual_seed(0)
        >>> enc = nn.ModuleDict({"text": nn.Linear(5, 4), "audio": nn.Linear(3, 4)})
        >>> aug = AUG(["text", "audio"], dim=4, num_outputs=3, max_learners=3)
        >>> opt = torch.optim.SGD([*enc.parameters(), *aug.parameters()], lr=0.1)
        >>> x = {"text": torch.randn(6, 5), "audio": torch.randn(6, 3)}
        >>> y = torch.tensor([0, 1, 2, 0, 1, 2])
        >>> z = {m: enc[m](x[m]) for m in enc}
        >>> full = {m: torch.ones(6, dtype=torch.bool) for m in enc}
        >>> out = StepOutput(z, {}, None, full, y, "classification")
        >>> terms = aug.losses(out, {"task": torch.tensor(1.0, requires_grad=True)})
        >>> sorted(terms)
        ['aug_audio', 'aug_text']
        >>> combine_losses(terms).backward()
        >>> aug.score_count.tolist()
        [6.0, 6.0]
        >>> aug.epoch_end(0)  # the weaker modality gets a second learner
        >>> sorted(aug.summary())[:2], float(aug.coefficients.sum())
        (['coefficient_audio', 'coefficient_text'], 3.0)
        >>> aug.predict(z, full).shape
        torch.Size([6, 3])
    """

    coefficients: Tensor
    ensemble_weights: Tensor
    score_sum: Tensor
    score_count: Tensor
    last_score: Tensor
    last_ratio: Tensor

    phases: tuple[int, ...] = (1, 2)
    _checked_state: ClassVar[dict[str, str]] = {
        "coefficients": "positive",
        "ensemble_weights": "nonnegative",
        "score_sum": "nonnegative",
        "score_count": "nonnegative",
    }

    def __init__(
        self,
        modalities: Sequence[str],
        dim: int | Mapping[str, int],
        num_outputs: int,
        *,
        hidden: int | None = None,
        max_learners: int = 4,
        gamma: float = 0.5,
        lam: float = 1.0,
        margin: float = 0.01,
        every: int = 1,
        weights: Mapping[str, float] | Sequence[float] | None = None,
        train_added: bool = True,
        keep: Iterable[str] = ("readout",),
        phases: Iterable[int] = (1, 2),
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.modalities = check_modality_names(modalities, minimum=2)
        self.dims = _dims(dim, self.modalities)
        self.num_outputs = check_int(num_outputs, "num_outputs", low=1)
        self.hidden = max(self.dims) if hidden is None else check_int(hidden, "hidden", low=1)
        self.max_learners = check_int(max_learners, "max_learners", low=1)
        self.gamma = check_real(gamma, "gamma", low=0.0, high=1.0)
        self.lam = check_real(lam, "lam", low=0.0, low_inclusive=False)
        if self.lam != 1.0 and len(self.modalities) != 2:
            raise ModbalanceError(
                f"`lam` other than 1 is the released target ratio s_0 / s_1 of two modalities; "
                f"with {len(self.modalities)} modalities use lam=1 (got {self.lam})."
            )
        self.margin = check_real(margin, "margin", low=0.0)
        self.every = check_int(every, "every", low=1)
        self.train_added = bool(train_added)
        self.keep = check_replace(keep)
        self.phases = check_phases(phases)
        self._build(check_int(seed, "seed"))
        m = len(self.modalities)
        self.register_buffer("coefficients", torch.ones(m))
        self.register_buffer("ensemble_weights", _ensemble_weights(weights, self.modalities))
        f64 = torch.float64  # sums over an epoch; the ratio's margin is 1 %
        self.register_buffer("score_sum", torch.zeros(m, dtype=f64))
        self.register_buffer("score_count", torch.zeros(m, dtype=f64))
        self.register_buffer("last_score", torch.full((m,), math.nan, dtype=f64))
        self.register_buffer("last_ratio", torch.tensor(math.nan, dtype=f64))
        self._counts = [1] * m
        self.register_load_state_dict_post_hook(_refresh_counts)

    def _build(self, seed: int) -> None:
        """The learners and the shared classifier, Xavier-normal weights and zero biases."""
        g = torch.Generator().manual_seed(seed)
        self.learners = nn.ModuleList(
            nn.ModuleList(nn.Linear(d, self.hidden) for _ in range(self.max_learners))
            for d in self.dims
        )
        self.classifier = nn.Linear(self.hidden, self.num_outputs)
        layers = [*(lin for group in self.learners for lin in group), self.classifier]
        with torch.no_grad():
            for lin in layers:
                nn.init.xavier_normal_(lin.weight, generator=g)
                nn.init.zeros_(lin.bias)
        if not self.train_added:
            for group in self.learners:
                for lin in list(group)[1:]:
                    lin.requires_grad_(False)

    def extra_repr(self) -> str:
        """Hyperparameters shown by ``repr``."""
        return (
            f"modalities={self.modalities!r}, dims={self.dims}, hidden={self.hidden}, "
            f"num_outputs={self.num_outputs}, max_learners={self.max_learners}, "
            f"gamma={self.gamma}, lam={self.lam}, margin={self.margin}, every={self.every}, "
            f"train_added={self.train_added}, keep={self.keep!r}"
        )

    def _features(self, features: Mapping[str, Tensor], i: int, mask: Tensor | None) -> Tensor:
        """``(N, D_m)`` features of modality ``i`` in the learners' dtype, absent rows zeroed."""
        name = self.modalities[i]
        if name not in features:
            raise ModbalanceError(
                f"AUG needs the features of every modality: `features` is missing {name!r} "
                f"(has {sorted(features)})."
            )
        z = check_tensor(features[name], f"features[{name!r}]", ndim=2, dtype="floating")
        if z.shape[1] != self.dims[i]:
            raise ModbalanceError(
                f"`features[{name!r}]` must have shape (N, {self.dims[i]}), got {tuple(z.shape)}."
            )
        z = z.to(self.classifier.weight.dtype)
        if mask is None:
            return z
        if not isinstance(mask, Tensor) or mask.shape != z.shape[:1]:
            shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
            raise ModbalanceError(
                f"the presence mask of {name!r} must be a ({z.shape[0]},) tensor, got {shape}."
            )
        return torch.where(mask.to(z.device, torch.bool).unsqueeze(1), z, torch.zeros_like(z))

    def outputs(self, i: int, z: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        r"""``(S, S', h_K)`` of modality ``i`` (index) on ``(N, D_i)`` features ``z``.

        :math:`S` sums the active learners, :math:`S'` all but the newest, :math:`h_K` is the
        newest; ``S'`` and ``h_K`` are ``None`` with one active learner. Each is ``(N, C)``, or
        ``(N,)`` with ``num_outputs=1``.
        """
        heads = [self.classifier(F.relu(self.learners[i][k](z))) for k in range(self._counts[i])]
        if self.num_outputs == 1:
            heads = [h[:, 0] for h in heads]
        total = heads[0]
        for h in heads[1:-1]:
            total = total + h
        if len(heads) == 1:
            return total, None, None
        return total + heads[-1], total, heads[-1]

    def _mask(self, out: StepOutput, name: str) -> Tensor | None:
        mask = out.present.get(name) if out.present is not None else None
        if mask is not None and mask.shape != out.target.shape:
            raise ModbalanceError(
                f"`out.present[{name!r}]` must have shape {tuple(out.target.shape)}, got "
                f"{tuple(mask.shape)}."
            )
        return mask

    def _check(self, out: StepOutput) -> None:
        check_choice(out.task, "out.task", TASKS)
        if out.task == "regression" and self.num_outputs != 1:
            raise ModbalanceError(
                f"regression needs num_outputs=1 (one output per sample), got "
                f"num_outputs={self.num_outputs}."
            )
        first = out.features.get(self.modalities[0]) if out.features is not None else None
        if isinstance(first, Tensor) and first.ndim >= 1:
            check_target(out.target, out.task, first.shape[0])

    def losses(self, out: StepOutput, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Return the ``keep`` terms and ``"aug_<m>"`` for every modality, nothing else.

        Also adds the batch's training scores to the running sums (no host synchronisation).

        Raises:
            ModbalanceError: A modality's features missing or of the wrong width, a regression
                task with ``num_outputs != 1``, or targets/masks of the wrong shape.
        """
        if out.phase not in self.phases:
            return dict(losses)
        self._check(out)
        new = {k: v for k, v in losses.items() if k in self.keep}
        sums, counts = [], []
        for i, name in enumerate(self.modalities):
            mask = self._mask(out, name)
            total, prev, last = self.outputs(i, self._features(out.features, i, mask))
            new[f"aug_{name}"] = aug_boosting_loss(
                total, out.target, out.task, prev, last, mask, gamma=self.gamma
            )
            with torch.no_grad():
                score = _score(total.detach(), out.target, out.task)
                keep = torch.ones_like(score, dtype=torch.bool) if mask is None else mask
                keep = keep.to(score.device, torch.bool)
                sums.append(torch.where(keep, score, torch.zeros_like(score)).sum())
                counts.append(keep.sum())
        with torch.no_grad():
            self.score_sum.add_(torch.stack(sums).to(self.score_sum))
            self.score_count.add_(torch.stack(counts).to(self.score_count))
        return new

    @contextlib.contextmanager
    def around_step(self, out: StepOutput, optimizer: torch.optim.Optimizer) -> Iterator[None]:
        """Average the method's own gradients over DDP ranks (nothing in one process)."""
        for p in self.parameters():
            if p.grad is not None:
                all_reduce_mean(p.grad)
        yield

    def checks_at(self, epoch: int) -> bool:
        """Whether the assignment runs at the end of ``epoch`` (0-based; the released rule)."""
        return epoch == 0 or (epoch + 1) % self.every == 0

    def epoch_end(self, epoch: int, evaluate: Any = None) -> None:
        """Record the epoch's mean scores and, on a check epoch, assign one learner.

        One host synchronisation (the score sums); the sums restart.
        """
        check_int(epoch, "epoch", low=0)
        with torch.no_grad():
            both = all_reduce_sum(torch.cat([self.score_sum, self.score_count]))
            self.score_sum.zero_()
            self.score_count.zero_()
        values = both.tolist()
        m = len(self.modalities)
        scores = [s / c if c > 0 else math.nan for s, c in zip(values[:m], values[m:])]
        choice, ratio = aug_assignment(scores, self.lam, self.margin)
        with torch.no_grad():
            self.last_score.copy_(torch.tensor(scores, dtype=torch.float64))
            self.last_ratio.fill_(ratio)
        if not self.checks_at(epoch) or choice is None:
            return
        if self._counts[choice] < self.max_learners:
            self._counts[choice] += 1
            with torch.no_grad():
                self.coefficients.copy_(torch.tensor(self._counts, dtype=torch.float32))

    def predict(
        self, features: Mapping[str, Tensor], present: Mapping[str, Tensor] | None = None
    ) -> Tensor:
        """The weighted ensemble of the modalities' learner sums.

        Args:
            features: ``{modality: (N, D_m)}`` for every modality.
            present: Optional ``{modality: (N,) bool}`` masks (all present when ``None``).

        Returns:
            ``(N, C)`` logits, or ``(N,)`` with ``num_outputs=1``. A sample without any
            modality (of non-zero weight) gets zeros.

        Raises:
            ModbalanceError: A modality's features missing or of the wrong width, or a mask of
                the wrong shape.
        """
        preds, rows = [], []
        for i, name in enumerate(self.modalities):
            mask = None if present is None else present.get(name)
            z = self._features(features, i, mask)
            if mask is None:
                mask = torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
            preds.append(self.outputs(i, z)[0])
            w = self.ensemble_weights[i].to(z.dtype)
            rows.append(torch.where(mask.to(z.device, torch.bool), w, torch.zeros_like(w)))
        x, w = torch.stack(preds), torch.stack(rows)  # (M, N[, C]), (M, N)
        den = w.sum(0)
        if x.ndim == 3:
            w, den = w.unsqueeze(-1), den.unsqueeze(-1)
        num = (x * w).sum(0)
        return torch.where(den > 0, num / den.clamp_min(torch.finfo(x.dtype).tiny), 0.0)

    def summary(self) -> dict[str, float]:
        """``coefficient_<m>`` (active learners), ``score_<m>`` and ``ratio`` of the last epoch."""
        counts = self.coefficients.tolist()
        result = {f"coefficient_{m}": float(k) for m, k in zip(self.modalities, counts)}
        for m, s in zip(self.modalities, self.last_score.tolist()):
            result[f"score_{m}"] = float(s)
        result["ratio"] = float(self.last_ratio)
        return result

    def _check_loaded_values(self, state_dict: dict[str, Any], prefix: str, where: str) -> None:
        value = state_dict.get(prefix + "coefficients")
        if isinstance(value, Tensor) and value.shape == (len(self.modalities),):
            v = value.detach().double()
            if bool(((v != v.round()) | (v < 1) | (v > self.max_learners)).any()):
                raise ModbalanceError(
                    f"AUG: the loaded `coefficients` count active learners and must be whole "
                    f"numbers in [1, {self.max_learners}] (max_learners), got {v.tolist()}."
                )
        super()._check_loaded_values(state_dict, prefix, where)
