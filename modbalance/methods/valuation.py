r"""Sample-level modality valuation and re-sampling (Wei, Feng, Wang & Hu, CVPR 2024).

Each modality's contribution to each sample is its Shapley value in the game whose value is the
correctness of the fused prediction with the other modalities masked; the modalities that
contribute little are then trained more, by feeding the fusion model the sample again with only
that modality. Transcribed from the authors' code (``GeWu-Lab/Valuate-and-Enhance-Multimodal-
Cooperation``: ``code/sample_level.py``, ``code/modality_level.py``,
``code/datasets/dataloader.py``, ``code/models/models.py``); :class:`ModalityValuation` lists
the deviations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from modbalance._checks import (
    ModbalanceError,
    check_choice,
    check_int,
    check_modality_names,
    check_real,
    check_target,
)
from modbalance._modes import EvalMode
from modbalance.balancing import BalancingMethod, StepOutput, check_phases, task_loss
from modbalance.distributed import all_reduce_sum
from modbalance.methods._common import check_fuse, check_modules, eval_modules_for, presence
from modbalance.shapley import coalition_masks, shapley_from_table

__all__ = [
    "ModalityValuation",
    "coalition_outputs",
    "modality_rates",
    "sample_contributions",
    "valuation_copies",
]

Fuse = Callable[[Mapping[str, Tensor], Mapping[str, Tensor]], Tensor]

#: The released sample-level rule: ``(low, high, copies)``, strict bounds, first match wins.
_BINS = ((0.4, 1.0, 1), (-0.1, 0.4, 2), (-math.inf, -0.1, 3))


def coalition_outputs(
    fuse: Fuse,
    features: Mapping[str, Tensor],
    present: Mapping[str, Tensor],
    modalities: Sequence[str],
    coalitions: Tensor,
    *,
    masking: str = "zero",
) -> Tensor:
    r"""The fusion head's outputs on every sample for every coalition, in one batched call.

    Modality :math:`m` is kept in coalition :math:`S` for sample :math:`i` when
    :math:`m \in S` and the sample has it (``present``). A modality that is not kept has its
    presence flag cleared and, with ``masking="zero"``, its features replaced by zeros (the
    released code's ``exec_drop`` and ``drop``); with ``"present"`` only the flag is cleared.
    Gradient flows as through ``fuse`` itself (wrap the call in :func:`torch.no_grad` to value).

    Args:
        fuse: ``fuse(features, present) -> (B,)``, ``(B, 1)`` or ``(B, C)`` predictions.
        features: ``{m: (N, D_m)}`` features.
        present: ``{m: (N,) bool}``; a missing key means every sample has the modality.
        modalities: Player order (the columns of ``coalitions``).
        coalitions: ``(S, M)`` boolean coalition masks.
        masking: ``"zero"`` or ``"present"``.

    Returns:
        ``(S, N, K)`` outputs (``K = 1`` for a regression head).

    Raises:
        ModbalanceError: If ``fuse`` does not return one prediction row per input row.

    Example:
        >>> import torch
        >>> from modbalance.methods.valuation import coalition_outputs
        >>> fuse = lambda z, p: z["a"].sum(1) + 10 * z["b"].sum(1)
        >>> z = {"a": torch.ones(2, 3), "b": torch.ones(2, 1)}
        >>> masks = torch.tensor([[True, False], [False, True], [True, True]])
        >>> coalition_outputs(fuse, z, {}, ["a", "b"], masks)[:, :, 0]
        tensor([[ 3.,  3.],
                [10., 10.],
                [13., 13.]])
    """
    s = coalitions.shape[0]
    first = features[modalities[0]]
    n = first.shape[0]
    feats: dict[str, Tensor] = {}
    flags: dict[str, Tensor] = {}
    for j, name in enumerate(modalities):
        x = features[name]
        base = present.get(name)
        base = torch.ones(n, dtype=torch.bool, device=x.device) if base is None else base
        keep = coalitions[:, j].to(x.device).view(s, 1) & base.to(x.device).view(1, n)
        flags[name] = keep.reshape(s * n)
        rep = x.unsqueeze(0).expand(s, *x.shape)
        if masking == "zero":
            rep = rep * keep.view(s, n, *([1] * (x.ndim - 1))).to(x.dtype)
        feats[name] = rep.reshape(s * n, *x.shape[1:])
    res = fuse(feats, flags)
    if not isinstance(res, Tensor) or res.shape[0] != s * n or res.ndim > 2:
        got = tuple(res.shape) if isinstance(res, Tensor) else type(res).__name__
        raise ModbalanceError(
            f"`fuse` must return one prediction row per input row: for B={s * n} rows it "
            f"returned {got}."
        )
    return res.reshape(s, n, -1)


def _coalition_values(
    outputs: Tensor, size: Tensor, target: Tensor, task: str, tolerance: float
) -> Tensor:
    r"""``(S, N)`` values :math:`|S_i|\,c_i(S)` of the ``(S, N, K)`` outputs, float64.

    ``size`` is the ``(S, N)`` number of modalities each sample keeps in each coalition.
    """
    if task == "classification":
        correct = outputs.argmax(-1) == target.to(outputs.device).view(1, -1)
        score = correct.to(torch.float64)
    else:
        err = (outputs[..., 0].double() - target.to(outputs.device).double().view(1, -1)).abs()
        score = 1.0 - err / tolerance
    return size * score


def sample_contributions(
    fuse: Fuse,
    features: Mapping[str, Tensor],
    present: Mapping[str, Tensor],
    target: Tensor,
    task: str,
    modalities: Sequence[str],
    *,
    masking: str = "zero",
    tolerance: float = 1.0,
    eval_modules: Sequence[nn.Module] = (),
) -> Tensor:
    r"""Every sample's exact Shapley value of every modality (no gradient).

    With :math:`\hat y_i(S)` the fused prediction of sample :math:`i` with the modalities outside
    :math:`S` masked (:func:`coalition_outputs`), the value of a coalition is

    .. math::

        v_i(S) = |S \cap P_i|\; c_i(S), \qquad
        c_i(S) = \begin{cases}
            [\arg\max_k \hat y_{ik}(S) = y_i] & \text{classification} \\
            1 - |\hat y_i(S) - y_i| / \tau & \text{regression (ours)}
        \end{cases}, \qquad v_i(\emptyset) = 0,

    and the contribution of modality :math:`m` is its Shapley value

    .. math::

        \phi_{im} = \sum_{S \subseteq N \setminus \{m\}} \frac{|S|!\,(M-|S|-1)!}{M!}
            \bigl(v_i(S \cup \{m\}) - v_i(S)\bigr).

    For two modalities this is the released ``execute_modulation``: ``value_all = 2.0`` when the
    fused prediction is right, ``value_a``/``value_v = 1.0`` when a modality alone is right,
    ``contrib_a = (value_a + value_all - value_v) / 2``. With every coalition right each modality
    contributes 1 (the released modality-level rule's gap is :math:`1 - \phi`). :math:`P_i` is
    the set of modalities sample :math:`i` has (``present``): a modality the sample lacks is
    never kept and not counted, so its contribution there is 0 (a null player).

    One batched ``fuse`` call over the :math:`(2^M - 1) N` rows of the non-empty coalitions,
    under :func:`torch.no_grad` on detached features with ``eval_modules`` in eval mode (the
    released code values with ``model.eval()``); the table becomes Shapley values through
    :func:`~modbalance.shapley.shapley_from_table`.

    Args:
        fuse: The fusion head ``fuse(features, present)``.
        features: ``{m: (N, D_m)}`` features.
        present: ``{m: (N,) bool}`` presence (missing keys: every sample has the modality).
        target: ``(N,)`` class indices or regression targets.
        task: ``"classification"`` or ``"regression"``.
        modalities: Player order.
        masking: ``"zero"`` or ``"present"`` (see :func:`coalition_outputs`).
        tolerance: :math:`\tau > 0`, the regression error that counts as "wrong" (0 correctness).
        eval_modules: Modules to switch to eval mode for the pass.

    Returns:
        ``(N, M)`` float64 contributions; each row sums to :math:`v_i(N)`.

    Example:
        >>> import torch
        >>> from modbalance.methods.valuation import sample_contributions
        >>> fuse = lambda z, p: z["a"] + z["b"]  # 2-class logits, a sum of the modalities
        >>> z = {"a": torch.tensor([[2.0, 0.0], [0.0, 1.0]]),
        ...      "b": torch.tensor([[0.0, 1.0], [0.0, 2.0]])}
        >>> sample_contributions(fuse, z, {}, torch.tensor([0, 0]), "classification", ["a", "b"])
        tensor([[1.5000, 0.5000],
                [0.0000, 0.0000]], dtype=torch.float64)
    """
    m = len(modalities)
    ref = features[modalities[0]]
    masks = coalition_masks(m, device=ref.device)[1:]
    detached = {k: features[k].detach() for k in modalities}
    n = ref.shape[0]
    have = torch.stack(
        [
            torch.ones(n, dtype=torch.bool, device=ref.device)
            if present.get(k) is None
            else present[k].to(ref.device)
            for k in modalities
        ],
        1,
    ).to(torch.float64)
    with torch.no_grad(), EvalMode(eval_modules):
        outs = coalition_outputs(fuse, detached, present, modalities, masks, masking=masking)
        size = masks.to(torch.float64) @ have.t()  # (2^M - 1, N): modalities kept
        values = _coalition_values(outs, size, target, task, tolerance)
        table = torch.cat([values.new_zeros(1, values.shape[1]), values], 0)
        return shapley_from_table(table.t())


def valuation_copies(contributions: Tensor) -> Tensor:
    r"""How many extra times the released sample-level rule feeds a sample with one modality.

    The released ``AV_KS_Dataset_sample_level`` appends, for each sample and modality, copies in
    which every other modality is dropped:

    .. math::

        n_{im} = \begin{cases}
            1 & 0.4 < \phi_{im} < 1 \\
            2 & -0.1 < \phi_{im} < 0.4 \\
            3 & \phi_{im} < -0.1 \\
            0 & \text{otherwise } (\phi_{im} \ge 1,\ \phi_{im} \in \{0.4, -0.1\})
        \end{cases}

    (strict bounds as in the code). Contributions are rounded to 9 decimals first, so that an
    exact rational value on a bound (possible from :math:`M = 5` on) is not moved across it by
    floating-point error.

    Args:
        contributions: ``(..., M)`` contributions :math:`\phi`.

    Returns:
        Copies :math:`n`, same shape and dtype.

    Example:
        >>> import torch
        >>> from modbalance.methods.valuation import valuation_copies
        >>> valuation_copies(torch.tensor([-0.5, 0.0, 0.4, 0.5, 1.0, 1.5]))
        tensor([3., 2., 0., 1., 0., 0.])
    """
    phi = torch.round(contributions * 1e9) / 1e9
    copies = torch.zeros_like(contributions)
    for low, high, count in _BINS:
        copies = torch.where((phi > low) & (phi < high), float(count), copies)
    return copies


def modality_rates(
    contribution: Tensor,
    alpha: float = 1.0,
    func: str = "linear",
    valid: Tensor | None = None,
) -> Tensor:
    r"""Extra single-modality passes per sample of the released modality-level rule.

    With the mean contributions :math:`\bar\phi_m` (of a random part of the training set), gaps
    :math:`g_m = 1 - \bar\phi_m` and :math:`d_m = \frac{1}{M-1}\sum_{m' \ne m}
    \max(g_m - g_{m'}, 0)`,

    .. math::

        r_m = \alpha\,\tfrac23 d_m \ \ (\text{linear}), \qquad
        \tanh\bigl(\alpha\,\tfrac23 d_m\bigr) \ \ (\text{tanh}), \qquad
        \alpha\,\bigl(\tfrac23 d_m\bigr)^{1.5} \ \ (\text{square}).

    For :math:`M = 2` this is the released ``AV_KS_Dataset_modality_level``: ``difference =
    |gap_a - gap_v| / 3 * 2 * alpha`` copies per sample (``int(difference * length)`` samples
    drawn with replacement) of the modality with the larger gap, alone; the other gets none.
    The sum over the other modalities is ours (M > 2).

    Args:
        contribution: ``(M,)`` mean contributions.
        alpha: :math:`\alpha \ge 0`.
        func: ``"linear"`` (the released default), ``"tanh"`` or ``"square"``.
        valid: ``(M,)`` bool, modalities with a measured contribution (others get rate 0 and
            are left out of the others' :math:`d`); ``None``: all.

    Returns:
        ``(M,)`` rates :math:`r \ge 0`.

    Example:
        >>> import torch
        >>> from modbalance.methods.valuation import modality_rates
        >>> modality_rates(torch.tensor([1.1, 0.5]), alpha=1.0)
        tensor([0.0000, 0.4000])
    """
    m = contribution.shape[0]
    ok = torch.ones(m, dtype=torch.bool, device=contribution.device) if valid is None else valid
    gap = torch.where(ok, 1.0 - contribution, torch.zeros_like(contribution))
    pair = (gap.view(m, 1) - gap.view(1, m)).clamp_min(0.0) * ok.view(1, m).to(gap.dtype)
    others = (ok.sum() - 1).clamp_min(1).to(gap.dtype)
    base = pair.sum(1) / others * (2.0 / 3.0)
    if func == "linear":
        rate = alpha * base
    elif func == "tanh":
        rate = torch.tanh(alpha * base)
    else:
        rate = alpha * base.pow(1.5)
    return torch.where(ok, rate, torch.zeros_like(rate))


class ModalityValuation(BalancingMethod):
    r"""Sample-level modality valuation: re-train each sample's low-contributing modalities.

    Every ``every`` steps (phase 2 by default) the method values the batch: the contribution
    :math:`\phi_{im}` of modality :math:`m` to sample :math:`i` is its exact Shapley value in
    the game :math:`v_i(S) = |S \cap P_i|\,c_i(S)` (:math:`P_i` the modalities the sample has),
    :math:`c_i(S)` the correctness of the fused prediction with the modalities outside :math:`S`
    masked (:func:`sample_contributions`,
    :math:`2^M - 1` coalitions in one batched no-grad pass of ``out.fuse``). The released code
    then *re-samples*: it adds to the next epoch's training set copies of samples in which every
    modality but the weak one is zeroed, and trains the whole model on them with the fused
    loss. Here the copies become one loss term per modality,

    .. math::

        \mathcal L^{\text{val}}_m = \frac1N \sum_{i=1}^{N} w_{im}\;
            \ell\bigl(f(z_i \text{ with only } m),\, y_i\bigr),

    ``"valuation_<m>"``, with :math:`f` the fusion head (``out.fuse``, training mode, with
    gradient into encoder :math:`m` and the head; with ``masking="zero"`` none into the masked
    encoders) and the weights

    * ``level="sample"`` (``sample_level.py``): :math:`w_{im} = n_{im}`, the copies of the
      released rule (:func:`valuation_copies`: 1, 2 or 3 copies for
      :math:`\phi \in (0.4, 1)`, :math:`(-0.1, 0.4)`, :math:`(-\infty, -0.1)`) of this batch's
      valuation; on steps without a valuation there is no re-feeding (zero terms).
    * ``level="modality"`` (``modality_level.py``): :math:`w_{im} = r_m` for every sample, the
      rate of :func:`modality_rates` from the mean contributions of a random ``part_ratio`` of
      the samples valued during the *previous* epoch (accumulated in ``losses``, turned into
      rates in :meth:`epoch_end`, all-reduced under DDP): the weak modality is re-fed in
      proportion to its gap behind the others.

    **Why a weighted term is the re-sampling.** The released epoch runs over the
    :math:`N_{\text{data}}(1 + \bar n)` items of the augmented set, each weighted :math:`1/B` in
    its batch's mean loss; the sum of its gradients is
    :math:`\frac1B\sum_i \bigl(\nabla\ell_i^{\text{fused}} + \sum_m n_{im}\nabla\ell_{im}\bigr)`.
    One epoch here (batches of :math:`B` original samples, ``"task"`` plus the terms above) has
    the same gradient sum at the same parameters (tested exactly on an augmented list), in
    :math:`1 + \bar n` times fewer, larger steps. For the modality level the released copies
    are :math:`\lfloor r N \rfloor` draws with replacement, i.e. :math:`r` per sample in
    expectation, which is the weight used.

    ``coefficients`` holds the mean weight :math:`\frac1N\sum_i w_{im}` of the last step (extra
    single-modality passes per sample), ``contribution`` the mean contribution of each modality
    over the samples that have it (the released ``cona``/``conv``) of the last valuation.

    **Deviations from the released code.**

    * *When it values*: on the current batch, just before the update, with the step's
      (training-mode) features and the head in eval mode (``modules``), instead of a separate
      eval-mode pass over the whole training set after each epoch; the sample level therefore
      uses fresh values, the modality level values of the epoch that just ended.
    * *Masking in feature space*: the authors zero a modality's encoder output (``drop``), as
      ``masking="zero"`` does; the presence flags are cleared as well (``"present"`` clears only
      them, for heads that honour flags).
    * *Copies in the same step*: the released copies are shuffled into other batches; here they
      join their original's step (same epoch total, see above). Under SGD the two agree to
      first order in the learning rate; Adam normalises each step, so one larger step is not
      the same as several smaller ones (the added signal is).
    * *Modality level*: the expected number of copies per sample instead of a random draw; the
      mean contribution over a ``part_ratio`` subset (drawn with replacement, as the code's
      ``np.random.choice``) of each valued batch instead of the whole training set; no
      re-feeding until the first :meth:`epoch_end` after the method became active.
    * *Ours*: M > 2 (the value :math:`|S|\,c(S)`, the code's ``2.0``/``1.0`` for two
      modalities; the rates of :func:`modality_rates`); regression (:math:`c = 1 - |e|/\tau`,
      L1 loss); missing modalities (never kept, contribution 0, never re-fed).
    * *BalanceMM's port* (``Sample_trainer.py``) differs from the released code and is not
      followed: its value is :math:`c(S)` without :math:`|S|` (so the bins select other
      samples), its per-sample cache keeps the first batch's results for every batch, and its
      modality level counts each pair twice and adds full multimodal copies.

    Args:
        modalities: Modality names (at least two, distinct), player order.
        level: ``"sample"`` (default) or ``"modality"``.
        alpha: Modality level: :math:`\alpha \ge 0` (released default 1).
        func: Modality level: ``"linear"`` (released default), ``"tanh"`` or ``"square"``.
        part_ratio: Modality level: fraction of each valued batch drawn (with replacement) for
            the mean contributions, in (0, 1] (released default 0.2).
        every: Value the batch every this many steps (``out.step % every == 0``).
        masking: ``"zero"`` or ``"present"``.
        tolerance: Regression: the absolute error :math:`\tau > 0` that counts as wrong.
        modules: Modules in eval mode for the valuation pass; default: ``out.fuse``'s module.
        seed: Seed of the CPU generator of the ``part_ratio`` draws (in ``state_dict``).
        phases: Phases of the dual-phase schedule in which the method acts.

    Reference:
        Y. Wei, R. Feng, Z. Wang, D. Hu, "Enhancing Multimodal Cooperation via Sample-level
        Modality Valuation", CVPR 2024 (arXiv:2309.06255). Code:
        https://github.com/GeWu-Lab/Valuate-and-Enhance-Multimodal-Cooperation

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from modbalance import ModalityValuation, StepOutput, combine_losses, task_loss
        >>> enc = nn.ModuleDict({"audio": nn.Linear(3, 4), "visual": nn.Linear(5, 4)})
        >>> head = nn.Linear(8, 3)
        >>> def fuse(z, present):  # concatenation; the method zeroes masked modalities
        ...     return head(torch.cat([z["audio"], z["visual"]], 1))
        >>> x = {"audio": torch.randn(6, 3), "visual": torch.randn(6, 5)}
        >>> z = {m: enc[m](x[m]) for m in enc}
        >>> full = {m: torch.ones(6, dtype=torch.bool) for m in enc}
        >>> y = torch.tensor([0, 1, 2, 0, 1, 2])
        >>> out = StepOutput(z, {}, fuse(z, full), full, y, "classification", fuse=fuse)
        >>> method = ModalityValuation(["audio", "visual"], modules=[head])
        >>> terms = method.losses(out, {"task": task_loss(out.fused, y, out.task)})
        >>> sorted(terms)
        ['task', 'valuation_audio', 'valuation_visual']
        >>> combine_losses(terms).backward()
        >>> method.coefficients.shape, sorted(method.summary())[:2]
        (torch.Size([2]), ['coefficient_audio', 'coefficient_visual'])
    """

    coefficients: Tensor
    contribution: Tensor
    contribution_sum: Tensor
    contribution_count: Tensor

    _checked_state: ClassVar[dict[str, str]] = {
        "coefficients": "nonnegative",
        "contribution_sum": "finite",
        "contribution_count": "nonnegative",
    }

    def __init__(
        self,
        modalities: Sequence[str],
        *,
        level: str = "sample",
        alpha: float | None = None,
        func: str | None = None,
        part_ratio: float | None = None,
        every: int = 1,
        masking: str = "zero",
        tolerance: float = 1.0,
        modules: Iterable[nn.Module] | None = None,
        seed: int = 0,
        phases: Iterable[int] = (2,),
    ) -> None:
        super().__init__()
        self.modalities = check_modality_names(modalities, minimum=2)
        self.level = check_choice(level, "level", ("sample", "modality"))
        options = {"alpha": alpha, "func": func, "part_ratio": part_ratio}
        given = [k for k, v in options.items() if v is not None]
        if self.level == "sample" and given:
            raise ModbalanceError(
                f"`{given[0]}` belongs to the modality-level rule; pass level='modality' or "
                "leave it out (the sample-level rule re-feeds by each sample's own value)."
            )
        self.alpha = check_real(1.0 if alpha is None else alpha, "alpha", low=0.0)
        self.func = check_choice("linear" if func is None else func, "func", _FUNCS)
        ratio = 0.2 if part_ratio is None else part_ratio
        self.part_ratio = check_real(ratio, "part_ratio", low=0.0, high=1.0, low_inclusive=False)
        self.every = check_int(every, "every", low=1)
        self.masking = check_choice(masking, "masking", ("zero", "present"))
        self.tolerance = check_real(tolerance, "tolerance", low=0.0, low_inclusive=False)
        self._eval_modules = check_modules(modules)
        self._generator = torch.Generator().manual_seed(check_int(seed, "seed", low=0))
        self.phases = check_phases(phases)
        m = len(self.modalities)
        f64 = torch.float64
        self.register_buffer("coefficients", torch.zeros(m))
        self.register_buffer("contribution", torch.full((m,), math.nan, dtype=f64))
        self.register_buffer("contribution_sum", torch.zeros(m, dtype=f64))
        self.register_buffer("contribution_count", torch.zeros(m, dtype=f64))

    def extra_repr(self) -> str:
        """Summarise the configuration for ``repr``."""
        text = f"modalities={self.modalities!r}, level={self.level!r}, every={self.every}"
        if self.level == "modality":
            text += f", alpha={self.alpha}, func={self.func!r}, part_ratio={self.part_ratio}"
        return text + f", masking={self.masking!r}"

    def _check(self, out: StepOutput) -> dict[str, Tensor]:
        """Structural checks; the ``(N,)`` presence mask of every modality."""
        does = "values and re-feeds modalities through the fusion head"
        check_fuse(out, self.modalities, "ModalityValuation", does)
        n = out.features[self.modalities[0]].shape[0]
        check_target(out.target, out.task, n)
        return {m: presence(out, m, n, out.features[m].device) for m in self.modalities}

    def _value(
        self, out: StepOutput, present: Mapping[str, Tensor], index: Tensor | None
    ) -> Tensor:
        """``(N', M)`` contributions of the batch (or of the rows ``index``)."""
        feats = {m: out.features[m] for m in self.modalities}
        target = out.target
        if index is not None:
            feats = {m: z.index_select(0, index) for m, z in feats.items()}
            present = {m: p.index_select(0, index) for m, p in present.items()}
            target = target.index_select(0, index.to(target.device))
        return sample_contributions(
            out.fuse,  # type: ignore[arg-type]
            feats,
            present,
            target,
            out.task,
            self.modalities,
            masking=self.masking,
            tolerance=self.tolerance,
            eval_modules=eval_modules_for(self._eval_modules, out.fuse),
        )

    @torch.no_grad()
    def _record(self, phi: Tensor, have: Tensor) -> None:
        """Store the mean contribution of each modality over the samples that have it."""
        total = (phi * have).sum(0)
        count = have.sum(0)
        mean = total / count.clamp_min(1.0)
        self.contribution.copy_(torch.where(count > 0, mean, self.contribution))
        if self.level == "modality":
            self.contribution_sum.add_(total)
            self.contribution_count.add_(count)

    def _weights(self, out: StepOutput, present: Mapping[str, Tensor]) -> Tensor | None:
        """``(N, M)`` re-feed weights of this step, or ``None`` (no re-feeding this step)."""
        ref = out.features[self.modalities[0]]
        n = ref.shape[0]
        have = torch.stack([present[m] for m in self.modalities], 1).to(torch.float64)
        valued = out.step % self.every == 0
        if self.level == "sample":
            if not valued:
                return None
            phi = self._value(out, present, None)
            self._record(phi, have)
            return valuation_copies(phi) * have
        if valued:
            k = max(1, int(n * self.part_ratio))
            index = torch.randint(n, (k,), generator=self._generator)
            index = index.to(ref.device, non_blocking=True)  # CPU draws: no host sync
            phi = self._value(out, present, index)
            self._record(phi, have.index_select(0, index))
        rate = self.coefficients.to(device=ref.device, dtype=torch.float64)
        return rate.view(1, -1) * have

    def _refeed_terms(
        self, out: StepOutput, present: Mapping[str, Tensor], weights: Tensor
    ) -> dict[str, Tensor]:
        """``{"valuation_<m>": mean_i w_im * loss(f(z_i with only m), y_i)}``, with gradient."""
        m = len(self.modalities)
        ref = out.features[self.modalities[0]]
        n = ref.shape[0]
        alone = torch.eye(m, dtype=torch.bool, device=ref.device)
        feats = {k: out.features[k] for k in self.modalities}
        outs = coalition_outputs(
            out.fuse,  # type: ignore[arg-type]
            feats,
            present,
            self.modalities,
            alone,
            masking=self.masking,
        )
        pred = outs.reshape(m * n, -1)
        if out.task == "regression":
            pred = pred[:, 0]
        target = out.target.repeat(m)
        per = task_loss(pred, target, out.task, reduction="none").view(m, n)
        w = weights.t().to(device=per.device, dtype=per.dtype)
        return {
            f"valuation_{name}": (w[j] * per[j]).sum() / n for j, name in enumerate(self.modalities)
        }

    def losses(self, out: StepOutput, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Value the batch (every ``every`` steps) and add the re-feed terms ``"valuation_<m>"``.

        Raises:
            ModbalanceError: Without ``out.fuse``, a modality's features, or a ``(N,)`` target
                and presence masks; when ``fuse`` returns the wrong number of rows; when a term
                ``"valuation_<m>"`` is already in ``losses``.
            TypeError: A floating ``out.target`` with ``task="classification"``.
        """
        if out.phase not in self.phases:
            return dict(losses)
        present = self._check(out)
        names = [f"valuation_{m}" for m in self.modalities]
        taken = [k for k in names if k in losses]
        if taken:
            raise ModbalanceError(
                f"the loss term {taken[0]!r} is already in the step's terms; ModalityValuation "
                "writes it (use one ModalityValuation per step)."
            )
        weights = self._weights(out, present)
        ref = out.features[self.modalities[0]]
        if weights is None:
            self.coefficients.zero_()
            zero = ref.new_zeros((), dtype=torch.float32)
            return {**losses, **dict.fromkeys(names, zero)}
        if self.level == "sample":
            self.coefficients.copy_(weights.mean(0).to(self.coefficients))
        return {**losses, **self._refeed_terms(out, present, weights)}

    def epoch_end(self, epoch: int, evaluate: Callable[..., Any] | None = None) -> None:
        """Modality level: turn the epoch's mean contributions into the re-feed rates.

        The sums are all-reduced under DDP (every rank gets the same rates); modalities without
        a valued sample this epoch keep their rate. The accumulators are reset. Nothing happens
        at the sample level.
        """
        if self.level != "modality":
            return None
        with torch.no_grad():
            packed = all_reduce_sum(torch.cat([self.contribution_sum, self.contribution_count]))
            m = len(self.modalities)
            total, count = packed[:m], packed[m:]
            valid = count > 0
            mean = total / count.clamp_min(1.0)
            rate = modality_rates(mean, self.alpha, self.func, valid)
            keep = self.coefficients.to(rate.dtype)
            self.coefficients.copy_(torch.where(valid, rate, keep).to(self.coefficients))
            self.contribution_sum.zero_()
            self.contribution_count.zero_()
        return None

    def summary(self) -> dict[str, float]:
        """``coefficient_<m>`` (extra passes per sample) and ``contribution_<m>`` (mean value)."""
        out = super().summary()
        for m, v in zip(self.modalities, self.contribution.tolist()):
            out[f"contribution_{m}"] = float(v)
        return out


_FUNCS = ("linear", "tanh", "square")
