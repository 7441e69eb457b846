r"""AGM (Li et al., ICCV 2023): adaptive gradient modulation of Shapley mono-modal responses.

Transcribed from the authors' code (lihong2303/AGM: ``run/CREMAD_main.py``,
``run/URFunny_main.py``, ``run/MOSEI_main.py``, ``model/*_net.py``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from modbalance._checks import (
    ModbalanceError,
    check_choice,
    check_modality_keys,
    check_modality_names,
    check_real,
    check_target,
    check_tensor,
)
from modbalance._modes import EvalMode
from modbalance.balancing import BalancingMethod, StepOutput, check_phases, task_loss
from modbalance.distributed import all_reduce_mean
from modbalance.methods._common import check_modules, eval_modules_for
from modbalance.shapley import coalition_masks, shapley_from_table

__all__ = ["AGM", "agm_coefficients", "mono_modal_responses"]

_LOG_EPS = math.log(1e-8)


def agm_coefficients(
    scores: Tensor, running: Tensor, alpha: float, cap: float | None = 10.0
) -> Tensor:
    r"""AGM's modulation coefficients from the batch scores and their running averages.

    With :math:`M` modalities, batch scores :math:`s_m` (mean loss of the mono-modal response,
    lower is better) and running averages :math:`\bar s_m` over all previous iterations,

    .. math::

        r_m = \exp\!\Bigl(\tfrac{M}{M-1}\bigl(\langle s\rangle - s_m\bigr)\Bigr), \quad
        \hat r_m = \exp\!\Bigl(\tfrac{M}{M-1}\bigl(\langle \bar s\rangle - \bar s_m\bigr)\Bigr),
        \quad
        k_m = \exp\bigl(\alpha\,\min(\hat r_m - r_m,\ \text{cap})\bigr),

    where :math:`\langle\cdot\rangle` is the mean over modalities. For :math:`M = 2` this is the
    CREMA-D script's :math:`r_a = e^{s_v - s_a}`; for :math:`M = 3` the UR-Funny script's
    :math:`e^{(\langle s\rangle - s_m) \cdot 3/2}`. ``cap`` is 10 in the CREMA-D script, 7 in the
    UR-Funny one and absent (``None``) in the MOSEI one.

    Args:
        scores: ``(M,)`` batch scores.
        running: ``(M,)`` running averages (before this batch).
        alpha: Modulation strength :math:`\alpha \ge 0`.
        cap: Upper bound of :math:`\hat r_m - r_m`, or ``None``.

    Returns:
        ``(M,)`` coefficients.

    Example:
        >>> import torch
        >>> from modbalance.methods.agm import agm_coefficients
        >>> agm_coefficients(torch.tensor([0.5, 1.5]), torch.tensor([1.0, 1.0]), alpha=1.0)
        tensor([0.1794, 1.8816])
    """
    check_tensor(scores, "scores", ndim=1, dtype="floating")
    check_tensor(running, "running", ndim=1, dtype="floating")
    m = scores.shape[0]
    if m < 2 or running.shape != scores.shape:
        raise ModbalanceError(
            f"`scores` and `running` must both have shape (M,) with M >= 2, got "
            f"{tuple(scores.shape)} and {tuple(running.shape)}."
        )
    factor = m / (m - 1)
    ratio = torch.exp((scores.mean() - scores) * factor)
    reference = torch.exp((running.mean() - running) * factor)
    diff = reference - ratio
    if cap is not None:
        diff = diff.clamp_max(cap)
    return torch.exp(alpha * diff)


def mono_modal_responses(
    fuse: Callable[[Mapping[str, Tensor], Mapping[str, Tensor]], Tensor],
    features: Mapping[str, Tensor],
    present: Mapping[str, Tensor],
    fused: Tensor,
    modalities: Sequence[str],
    *,
    masking: str = "zero",
    eval_modules: Sequence[nn.Module] = (),
) -> Tensor:
    r"""AGM's Shapley mono-modal responses :math:`o_m`, with gradient.

    .. math::

        o_m = \sum_{S \subseteq N \setminus \{m\}} \frac{|S|!\,(M-|S|-1)!}{M!}
              \bigl(f(S \cup \{m\}) - f(S)\bigr), \qquad f(\emptyset) := 0,

    over the fusion head's outputs :math:`f(S)` with the modalities outside :math:`S` masked, so
    that :math:`\sum_m o_m = f(N)` (the authors' ``Modality_Audio``/``Modality_Visual`` modules
    and their three-modality versions; they never subtract :math:`f(\emptyset)`). :math:`f(N)`
    is ``fused`` (the training-mode pass); the :math:`2^M - 2` other coalitions are one batched
    call of ``fuse`` with ``eval_modules`` in eval mode (the authors evaluate the masked passes
    in eval mode), with gradient. The table is turned into responses by
    :func:`~modbalance.shapley.shapley_from_table`.

    Args:
        fuse: ``fuse(features, present) -> (B, C)`` or ``(B,)`` predictions.
        features: ``{m: (N, D_m)}`` features.
        present: ``{m: (N,) bool}`` presence (missing keys: every sample present).
        fused: ``(N, C)`` or ``(N,)``/``(N, 1)`` output of ``fuse`` on all modalities.
        modalities: Player order.
        masking: ``"zero"`` (absent features replaced by zeros) or ``"present"`` (features kept,
            only the presence flags are cleared; the head must honour them).
        eval_modules: Modules to switch to eval mode for the masked passes.

    Returns:
        ``(N, C, M)`` responses (``C = 1`` for regression).
    """
    m = len(modalities)
    n = fused.shape[0]
    z = fused if fused.ndim == 2 else fused.reshape(n, 1)
    masks = coalition_masks(m, device=z.device)[1:-1]  # every coalition but the empty and full
    c = masks.shape[0]
    mids = z.new_zeros((0, n, z.shape[1]))
    if c:
        feats: dict[str, Tensor] = {}
        flags: dict[str, Tensor] = {}
        for j, name in enumerate(modalities):
            x = features[name]
            keep = masks[:, j].view(c, 1).expand(c, n)
            base = present.get(name)
            base = torch.ones(n, dtype=torch.bool, device=x.device) if base is None else base
            flags[name] = (keep & base.to(x.device).view(1, n)).reshape(c * n)
            rep = x.unsqueeze(0).expand(c, *x.shape)
            if masking == "zero":
                rep = rep * keep.view(c, n, *([1] * (x.ndim - 1))).to(x.dtype)
            feats[name] = rep.reshape(c * n, *x.shape[1:])
        with EvalMode(eval_modules):
            res = fuse(feats, flags)
        if res.shape[0] != c * n or res.numel() != c * n * z.shape[1]:
            raise ModbalanceError(
                f"`fuse` must return {z.shape[1]} output(s) per row: for B={c * n} rows it "
                f"returned shape {tuple(res.shape)}."
            )
        mids = res.reshape(c, n, z.shape[1]).to(z.dtype)
    table = torch.cat([z.new_zeros(1, n, z.shape[1]), mids, z.unsqueeze(0)], 0)  # (2^M, N, C)
    return shapley_from_table(table.permute(1, 2, 0))


class AGM(BalancingMethod):
    r"""Adaptive Gradient Modulation: modulate the gradient through each mono-modal response.

    The coefficient of each modality pushes the mono-modal responses' losses toward balance.

    Every step the fused prediction is split into the mono-modal responses :math:`o_m`
    (:func:`mono_modal_responses`, :math:`\sum_m o_m = f(N)`), their scores

    .. math::

        s_m = \frac1N \sum_i -\log \max\bigl(\operatorname{softmax}(o_{im})_{y_i},
              10^{-8}\bigr) \quad \text{(classification)}, \qquad
        s_m = \frac1N \sum_i |o_{im} - y_i| \quad \text{(regression)},

    and the coefficients :math:`k_m` of :func:`agm_coefficients` from :math:`s` and the running
    averages :math:`\bar s` of all previous steps (``score_avg``, then updated,
    :math:`\bar s \leftarrow \bar s\,(t-1)/t + s/t` at the :math:`t`-th step). The authors then
    train on :math:`\ell(\sum_m o_m)` with a backward hook that multiplies the gradient reaching
    :math:`o_m` by :math:`k_m`. The gradient of the step is therefore

    .. math::

        \nabla_\theta = \ell'(f(N))\,\sum_m k_m\,\nabla_\theta o_m .

    How it maps onto the step: :meth:`losses` adds the term ``"agm"`` whose **value is exactly
    zero** and whose gradient is :math:`\ell'(f(N)) \sum_m (k_m - 1) \nabla_\theta o_m`, so that
    together with the step's own ``"task"`` term (:math:`\ell(f(N))`, gradient
    :math:`\ell'(f(N))\nabla_\theta f(N) = \ell'(f(N))\sum_m \nabla_\theta o_m`) the step's
    gradient is the authors' one exactly. No hook, no model wrapper, and the masked passes reach
    the encoders' features and the head as in the original. Optionally (``clip_norm``)
    :meth:`around_step` clips the gradient norm of the optimizer's parameters to ``clip_norm``
    when a gradient of ``clip_watch`` (the authors: the fusion layer's weight; default: every
    parameter) leaves :math:`[-c, c]` (the CREMA-D script uses 1, the UR-Funny one 5).

    Deviations from the official code, on purpose:

    * **Masking in feature space**: the authors zero a modality's *input* and run its encoder
      on the zeros; the step here runs each encoder once, so an absent modality's *features* are
      zero (``masking="zero"``) or only its presence flag is cleared (``"present"``).
    * **Not** :class:`~modbalance.shapley.ModalityGame`: the game's table holds batch-averaged
      coalition *values* without gradient, whereas AGM needs every sample's coalition *outputs*
      (logits) with gradient; the method builds the same coalitions and reuses
      :func:`~modbalance.shapley.coalition_masks` and
      :func:`~modbalance.shapley.shapley_from_table` (``needs_game`` stays ``False``).
    * **Regression** (no official counterpart; the MOSEI script is binary classification): the
      score is the L1 loss of :math:`o_m` against the target.
    * **M > 2**: the authors' general form :math:`\tfrac{M}{M-1}(\langle s\rangle - s_m)` (their
      three-modality script); ``cap`` as a parameter (10, 7 or none in their scripts).
    * Scores are averaged over all samples (absent modalities included: their flags are cleared
      in every coalition), and over ranks under DDP (one all-reduce), so that every rank uses the
      same coefficients. The modulation runs whenever the method is in the step (the authors'
      epoch window ``modulation_starts``/``modulation_ends`` is the caller's schedule); in the
      MOSEI script the clipping condition reads ``max > 1 and min < 1``, taken here as the
      CREMA-D one, ``max > c or min < -c``.
    * **Adam**: for a late-fusion *linear* head :math:`o_m = W_m h_m + b/M`, so AGM scales the
      gradient of encoder :math:`m` and of its slice of the head by :math:`k_m`, a per-step factor
      whose slowly varying part Adam's normalisation cancels; the authors train with SGD.

    State lives in buffers: ``score_avg`` (running :math:`\bar s`), ``iteration``, and the last
    ``score``, ``coefficients``, ``ratio`` (:math:`r`) and ``reference_ratio``
    (:math:`\hat r`).

    Args:
        modalities: Modality names, player order (at least two, distinct).
        alpha: Modulation strength :math:`\alpha \ge 0` (the authors report 1.5 on CREMA-D,
            2.5 on AV-MNIST, 4.0 on UR-Funny).
        cap: Upper bound of :math:`\hat r_m - r_m` (``None``: none).
        head: The fusion head ``head(features, present)``; ``None`` uses ``out.fuse``.
        modules: Modules to put in eval mode for the masked passes; by default the head if it
            is an ``nn.Module`` or a bound method of one.
        masking: ``"zero"`` or ``"present"``.
        clip_norm: Clip the gradient norm to this value when triggered (``None``: never).
        clip_watch: Parameters whose gradient triggers the clipping (default: all).
        phases: Phases of the schedule in which the method acts.

    Reference:
        H. Li, X. Li, P. Hu, Y. Lei, C. Li, Y. Zhou, "Boosting Multi-modal Model Performance
        with Adaptive Gradient Modulation", ICCV 2023; code: lihong2303/AGM.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from modbalance.balancing import StepOutput, task_loss
        >>> from modbalance.methods.agm import AGM
        >>> enc = {"audio": nn.Linear(3, 4), "video": nn.Linear(5, 4)}
        >>> head = nn.Linear(8, 6)
        >>> def fuse(feats, present):
        ...     return head(torch.cat([feats["audio"], feats["video"]], 1))
        >>> x = {"audio": torch.randn(8, 3), "video": torch.randn(8, 5)}
        >>> feats = {m: enc[m](x[m]) for m in enc}
        >>> out = StepOutput(features=feats, unimodal={}, fused=fuse(feats, {}), present={},
        ...     target=torch.randint(0, 6, (8,)), task="classification", fuse=fuse)
        >>> agm = AGM(["audio", "video"], alpha=1.5, modules=[head])
        >>> losses = agm.losses(out, {"task": task_loss(out.fused, out.target, out.task)})
        >>> sorted(losses), float(losses["agm"].detach())
        (['agm', 'task'], 0.0)
        >>> agm.coefficients.shape, int(agm.iteration)
        (torch.Size([2]), 1)
    """

    _checked_state: ClassVar[dict[str, str]] = {
        "coefficients": "nonnegative",
        "score_avg": "finite",
    }

    def __init__(
        self,
        modalities: Sequence[str],
        *,
        alpha: float = 1.0,
        cap: float | None = 10.0,
        head: Callable[[Mapping[str, Tensor], Mapping[str, Tensor]], Tensor] | None = None,
        modules: Iterable[nn.Module] | None = None,
        masking: str = "zero",
        clip_norm: float | None = None,
        clip_watch: Iterable[Tensor] | nn.Module | None = None,
        phases: Iterable[int] = (2,),
    ) -> None:
        super().__init__()
        self.modalities = check_modality_names(modalities)
        if len(self.modalities) < 2:
            raise ModbalanceError(
                f"AGM balances at least 2 modalities (its ratio compares each with the mean of "
                f"the others), got {list(self.modalities)}."
            )
        self.alpha = check_real(alpha, "alpha", low=0.0)
        self.cap = None if cap is None else check_real(cap, "cap")
        if head is not None and not callable(head):
            raise TypeError(f"`head` must be callable, got {type(head).__name__}.")
        self.head = head
        self._eval_modules = check_modules(modules)  # plain list: not registered (not state)
        self.masking = check_choice(masking, "masking", ("zero", "present"))
        self.clip_norm = (
            None
            if clip_norm is None
            else check_real(clip_norm, "clip_norm", low=0.0, low_inclusive=False)
        )
        if isinstance(clip_watch, nn.Module):
            watch: list[Tensor] | None = list(clip_watch.parameters())
        elif clip_watch is not None:
            watch = list(clip_watch)
            if not watch or any(not isinstance(p, Tensor) for p in watch):
                raise ModbalanceError("`clip_watch` must be a module or a non-empty tensor list.")
        else:
            watch = None
        if watch is not None and self.clip_norm is None:
            raise ModbalanceError("`clip_watch` only acts with `clip_norm`; set clip_norm=1.0.")
        self._clip_watch = watch
        self.phases = check_phases(phases)
        m = len(self.modalities)
        f64 = torch.float64
        self.register_buffer("score_avg", torch.zeros(m, dtype=f64))
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))
        self.register_buffer("score", torch.full((m,), math.nan, dtype=f64))
        self.register_buffer("coefficients", torch.ones(m, dtype=f64))
        self.register_buffer("ratio", torch.full((m,), math.nan, dtype=f64))
        self.register_buffer("reference_ratio", torch.full((m,), math.nan, dtype=f64))

    @torch.no_grad()
    def _scores(self, o: Tensor, target: Tensor, task: str) -> Tensor:
        if task == "classification":
            logp = torch.log_softmax(o.float(), dim=1)  # (N, C, M)
            idx = target.long().view(-1, 1, 1).expand(-1, 1, o.shape[2])
            picked = logp.gather(1, idx)[:, 0, :].clamp_min(_LOG_EPS)
            return -picked.mean(0)
        y = target.float().reshape(-1, 1)
        return (o[:, 0, :].float() - y).abs().mean(0)

    def losses(self, out: StepOutput, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Update the coefficients from this batch and add the zero-valued term ``"agm"``.

        Raises:
            ModbalanceError: Without ``"task"``, a fused prediction or a fusion head, when the
                features lack a modality, or when ``out.target`` is not ``(N,)``.
            TypeError: A floating ``out.target`` with ``task="classification"`` (fractional
                class labels are never truncated).
        """
        if out.phase not in self.phases:
            return dict(losses)
        check_choice(out.task, "out.task", ("regression", "classification"))
        if "task" not in losses:
            raise ModbalanceError(
                "AGM modulates the gradient of the fused task loss, the term 'task', but the "
                f"step's terms are {sorted(losses)}."
            )
        fuse = self.head if self.head is not None else out.fuse
        if fuse is None or out.fused is None:
            raise ModbalanceError(
                "AGM needs the fused prediction (`out.fused`) and the fusion head (`out.fuse` or "
                "AGM(head=...)) to evaluate the masked coalitions."
            )
        check_modality_keys(out.features, "out.features", self.modalities)
        check_target(out.target, out.task, out.fused.shape[0])  # before any state changes
        o = mono_modal_responses(
            fuse,
            out.features,
            out.present,
            out.fused,
            self.modalities,
            masking=self.masking,
            eval_modules=eval_modules_for(self._eval_modules, fuse),
        )
        with torch.no_grad():
            s = all_reduce_mean(self._scores(o, out.target, out.task)).to(self.score_avg)
            k = agm_coefficients(s, self.score_avg, self.alpha, self.cap)
            factor = len(self.modalities) / (len(self.modalities) - 1)
            self.ratio.copy_(torch.exp((s.mean() - s) * factor))
            self.reference_ratio.copy_(torch.exp((self.score_avg.mean() - self.score_avg) * factor))
            self.iteration += 1
            t = self.iteration.to(s.dtype)
            self.score_avg.mul_((t - 1) / t).add_(s / t)
            self.score.copy_(s)
            self.coefficients.copy_(k)
        z = (out.fused if out.fused.ndim == 2 else out.fused.reshape(-1, 1)).detach()
        km1 = (k - 1.0).to(device=o.device, dtype=o.dtype)
        arg = z + ((o - o.detach()) * km1).sum(-1)  # value: f(N); gradient: sum (k_m - 1) do_m
        if out.fused.ndim != 2:
            arg = arg[:, 0]
        extra = task_loss(arg, out.target, out.task)
        return {**losses, "agm": extra - extra.detach()}

    @contextlib.contextmanager
    def around_step(self, out: StepOutput, optimizer: torch.optim.Optimizer) -> Iterator[None]:
        """With ``clip_norm``: clip the gradient norm when a watched gradient leaves ``[-c, c]``."""
        if self.clip_norm is not None and out.phase in self.phases:
            params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            watch = self._clip_watch if self._clip_watch is not None else params
            grads = [p.grad for p in watch if p.grad is not None]
            if grads:
                peak = torch.stack([g.detach().abs().max() for g in grads]).max()
                if bool(peak > self.clip_norm):
                    nn.utils.clip_grad_norm_(params, max_norm=self.clip_norm)
        yield

    def extra_repr(self) -> str:
        """Summarise the configuration for ``repr``."""
        return (
            f"modalities={self.modalities!r}, alpha={self.alpha}, cap={self.cap}, "
            f"masking={self.masking!r}, clip_norm={self.clip_norm}"
        )
