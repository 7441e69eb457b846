r"""InfoReg: adaptive information regulation in the prime learning window (CVPR 2025).

While a modality is still in its *prime learning window* (its information, tracked by the trace
of the Fisher information of its encoder, keeps growing fast) and it is ahead of the others, its
encoder is held back by a proximal term that pulls it toward where it was at the start of the
epoch. Transcribed from the authors' code (``GeWu-Lab/InfoReg_CVPR2025``, ``main.py``,
``train_epoch``); :class:`InfoReg` lists the deviations.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from modbalance._checks import ModbalanceError, check_int, check_real, check_target, check_tensor
from modbalance._groups import GroupScaler, by_device_dtype, parse_groups
from modbalance.balancing import BalancingMethod, StepOutput
from modbalance.distributed import all_reduce_sum

__all__ = ["InfoReg", "inforeg_beta", "inforeg_window_k"]


def _forget_anchored_host(module: nn.Module, incompatible_keys: Any) -> None:
    """After ``load_state_dict``: the loaded ``anchored`` flag is decided on the device again."""
    module._anchored_host = False


def inforeg_window_k(traces: Tensor, count: Tensor | int, window: int = 10) -> Tensor:
    r"""InfoReg's relative growth of the Fisher trace over the last ``window`` epochs.

    With the per-epoch traces :math:`T_1, \dots, T_E` (oldest first) and :math:`w` =
    ``window``, as the released code computes it (sums divided by :math:`w` even when fewer
    epochs exist):

    .. math::

        \bar T_1 = \frac{1}{w}\sum_{e=E-w+1}^{E} T_e, \qquad
        \bar T_2 = \frac{1}{w}\sum_{e=E-w}^{E-1} T_e, \qquad
        k = \frac{\bar T_1 - \bar T_2}{\bar T_1},

    and :math:`k = 1` before the first epoch has ended.

    Args:
        traces: ``(..., L)`` the last :math:`L \ge w + 1` traces, oldest first, with the unused
            leading slots (when fewer than :math:`L` epochs exist) holding anything.
        count: Number of epochs recorded so far, :math:`E`.
        window: :math:`w \ge 1` (released code: 10).

    Returns:
        ``(...)`` the growth :math:`k`.

    Example:
        >>> import torch
        >>> from modbalance.methods.inforeg import inforeg_window_k
        >>> t = torch.zeros(11)
        >>> t[-2:] = torch.tensor([2.0, 3.0])  # two epochs so far
        >>> inforeg_window_k(t, 2)
        tensor(0.6000)
    """
    window = check_int(window, "window", low=1)
    check_tensor(traces, "traces", dtype="floating")
    if traces.shape[-1] < window + 1:
        raise ModbalanceError(
            f"`traces` must hold at least window + 1 = {window + 1} slots, got shape "
            f"{tuple(traces.shape)}."
        )
    e = int(count)
    if e == 0:
        return torch.ones(traces.shape[:-1], dtype=traces.dtype, device=traces.device)
    length = traces.shape[-1]
    idx = torch.arange(length, device=traces.device)
    valid = idx >= length - e
    t = torch.where(valid, traces, torch.zeros_like(traces))
    tr1 = t[..., length - window :].sum(-1) / window
    tr2 = t[..., length - window - 1 : length - 1].sum(-1) / window
    return (tr1 - tr2) / tr1


def inforeg_beta(scores: Tensor, k: Tensor, *, scale: float = 0.95, threshold: float = 0.04):
    r"""InfoReg's regulation strength per modality.

    .. math::

        \delta_m = s_m - \frac{1}{M-1}\sum_{j\ne m} s_j, \qquad
        \beta_m = \begin{cases} c\, \exp\bigl(\tanh \delta_m\bigr) &
            \delta_m > 0 \text{ and } k_m > \kappa \\ 0 & \text{otherwise,}\end{cases}

    with :math:`c` = ``scale`` and :math:`\kappa` = ``threshold``. For two modalities and
    :math:`m` = audio this is the released code's first branch exactly
    (``score_a > score_v and k > 0.04``: ``beta = 0.95 * exp(tanh(score_a - score_v))``).

    Args:
        scores: ``(M,)`` scores :math:`s_m` (the code: summed true-class probabilities).
        k: ``(M,)`` window growth :math:`k_m` (:func:`inforeg_window_k`).
        scale: :math:`c > 0`.
        threshold: :math:`\kappa`.

    Returns:
        ``(M,)`` :math:`\beta`.

    Example:
        >>> import torch
        >>> from modbalance.methods.inforeg import inforeg_beta
        >>> inforeg_beta(torch.tensor([40.0, 30.0]), torch.tensor([0.5, 0.5])).round(decimals=4)
        tensor([2.5824, 0.0000])
    """
    check_tensor(scores, "scores", ndim=1, dtype="floating")
    m = scores.shape[0]
    if m < 2:
        raise ModbalanceError(f"`scores` must hold at least 2 modalities, got shape ({m},).")
    scale = check_real(scale, "scale", low=0.0, low_inclusive=False)
    threshold = check_real(threshold, "threshold")
    gap = scores - (scores.sum() - scores) / (m - 1)
    beta = scale * torch.exp(torch.tanh(gap))
    on = (gap > 0) & (k.to(scores) > threshold)
    return torch.where(on, beta, torch.zeros_like(beta))


class InfoReg(BalancingMethod):
    r"""Regulate the dominant modality during its prime learning window (proximal pull).

    Per epoch, the trace of each encoder's empirical Fisher information is accumulated from the
    gradients the optimizer receives,

    .. math::

        T_m = \sum_{t \in \text{epoch}} \sum_{W \in \mathcal{W}_m}
              \operatorname{mean}\bigl(g_{t,W}^{\,2}\bigr),

    over the weight tensors :math:`\mathcal{W}_m` (parameters with two or more dimensions: the
    released code's ``Conv2d``/``Linear`` weights) of group :math:`m`. At each epoch end the
    window growth :math:`k_m` is computed (:func:`inforeg_window_k`). Every step, from the
    unimodal predictions' scores :math:`s_m = \sum_i p_m(y_i \mid x_i)` (summed true-class
    probability, over the present samples) the strengths :math:`\beta_m` follow
    (:func:`inforeg_beta`), and between ``backward()`` and ``optimizer.step()`` every
    parameter of group :math:`m` gets

    .. math::

        g_\theta \leftarrow g_\theta + \beta_m\,(\theta - \theta^{(e)}),

    where :math:`\theta^{(e)}` are the parameters at the start of the current epoch. The
    Fisher trace is accumulated *after* this addition, as in the code.

    **Deviations from the released code, on purpose.**

    * *Any modality can be regulated.* The code hard-codes audio: its second branch repeats the
      first branch's condition (``elif score_v < score_a``), so the visual encoder is never
      regulated, and :math:`k` is computed from the audio trace for both branches. Here each
      modality has its own trace, its own :math:`k_m` and its own :math:`\beta_m`, with one
      ``scale`` (the code's dead branch would use 0.1).
    * *M > 2*: each modality is compared with the mean score of the others; for two modalities
      this is the code's ``score_a - score_v``.
    * *Regression*: the code is classification only; for ``out.task == "regression"`` the score
      is :math:`s_m = \sum_i \exp(-|\hat y_{im} - y_i|)` (a positive, higher-is-better stand-in
      for the true-class probability).
    * *DDP*: score sums are summed over ranks (the global batch's sum); gradients are already
      averaged, so every rank computes the same traces, :math:`k` and :math:`\beta`.
    * The scores are **sums** over the batch, as in the code, so :math:`\tanh` saturates for
      large batches (:math:`\beta \approx c\,e` as soon as the gap exceeds ~2).

    **Adam.** The added term changes the gradient's direction (a pull toward
    :math:`\theta^{(e)}`), so it keeps an effect under adaptive optimisers, though its size
    relative to the loss gradient is then normalised away.

    Args:
        groups: ``{modality: encoder module or parameters}``, at least two, disjoint.
        scale: :math:`c` in :math:`\beta` (released code: 0.95).
        threshold: :math:`\kappa`, the prime-window threshold on :math:`k` (released code: 0.04).
        window: Epochs in the trace average (released code: 10).

    Reference:
        C. Huang, Y. Wei, Z. Yang, D. Hu, "Adaptive Unimodal Regulation for Balanced Multimodal
        Information Acquisition", CVPR 2025. Code: https://github.com/GeWu-Lab/InfoReg_CVPR2025

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from modbalance.balancing import StepOutput
        >>> from modbalance.methods.inforeg import InfoReg
        >>> enc = {"audio": nn.Linear(4, 3), "video": nn.Linear(4, 3)}
        >>> reg = InfoReg(enc)
        >>> opt = torch.optim.SGD([p for e in enc.values() for p in e.parameters()], lr=0.1)
        >>> x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
        >>> uni = {m: e(x) for m, e in enc.items()}
        >>> out = StepOutput({m: u for m, u in uni.items()}, uni, None,
        ...                  {m: torch.ones(6, dtype=torch.bool) for m in enc}, y,
        ...                  "classification")
        >>> _ = reg.losses(out, {})
        >>> sum(torch.nn.functional.cross_entropy(u, y) for u in uni.values()).backward()
        >>> with reg.around_step(out, opt):
        ...     opt.step()
        >>> reg.epoch_end(0)
        >>> reg.k.shape
        torch.Size([2])
    """

    traces: Tensor
    trace_count: Tensor
    epoch_trace: Tensor
    k: Tensor
    coefficients: Tensor
    scores: Tensor
    anchored: Tensor

    _checked_state: ClassVar[dict[str, str]] = {
        "k": "finite",
        "coefficients": "nonnegative",
        "traces": "finite",
        "epoch_trace": "finite",
    }

    def __init__(
        self,
        groups: Mapping[str, nn.Module | Iterable[nn.Parameter]],
        *,
        scale: float = 0.95,
        threshold: float = 0.04,
        window: int = 10,
    ) -> None:
        super().__init__()
        names, params = parse_groups(groups)
        self.modalities: tuple[str, ...] = names
        self._group_params: list[list[nn.Parameter]] = params
        self._scaler = GroupScaler(names, params, "InfoReg")
        self.scale = check_real(scale, "scale", low=0.0, low_inclusive=False)
        self.threshold = check_real(threshold, "threshold")
        self.window = check_int(window, "window", low=1)
        m = len(names)
        self.register_buffer("traces", torch.zeros(m, self.window + 1, dtype=torch.float64))
        self.register_buffer("trace_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("epoch_trace", torch.zeros(m, dtype=torch.float64))
        self.register_buffer("k", torch.ones(m, dtype=torch.float64))
        self.register_buffer("coefficients", torch.zeros(m))  # beta_m, the pull strengths
        self.register_buffer("scores", torch.full((m,), float("nan")))
        self.register_buffer("anchored", torch.zeros((), dtype=torch.bool))
        for i, ps in enumerate(params):
            for j, p in enumerate(ps):
                self.register_buffer(f"anchor_{i}_{j}", p.detach().clone())
        # Host-side "``anchored`` is known to be True" (it never goes back to False during a
        # run), so that around_step need not read the buffer; reset by ``load_state_dict``.
        self._anchored_host = False
        self.register_load_state_dict_post_hook(_forget_anchored_host)

    def extra_repr(self) -> str:
        """Hyperparameters shown by ``repr``."""
        return (
            f"modalities={self.modalities!r}, scale={self.scale}, threshold={self.threshold}, "
            f"window={self.window}"
        )

    def _anchors(self, i: int) -> list[Tensor]:
        return [getattr(self, f"anchor_{i}_{j}") for j in range(len(self._group_params[i]))]

    @torch.no_grad()
    def anchor(self) -> None:
        r"""Store the current parameters as :math:`\theta^{(e)}` (done at each epoch end)."""
        for i, ps in enumerate(self._group_params):
            for a, p in zip(self._anchors(i), ps):
                a.copy_(p.detach())
        self.anchored.fill_(True)
        self._anchored_host = True

    @torch.no_grad()
    def _anchor_if_unanchored(self) -> None:
        """:meth:`anchor` unless ``anchored`` is set, decided on the device (no host sync)."""
        for i, ps in enumerate(self._group_params):
            for a, p in zip(self._anchors(i), ps):
                a.copy_(torch.where(self.anchored, a, p.detach().to(a)))
        self.anchored.fill_(True)
        self._anchored_host = True

    def _check_out(self, out: StepOutput) -> None:
        """Every modality's unimodal prediction and an ``(N,)`` target of the task's kind.

        Raises:
            ModbalanceError: When ``out.unimodal`` lacks a modality or ``out.target`` is not
                ``(N,)`` (e.g. ``(N, 1)``).
            TypeError: A floating ``out.target`` with ``task="classification"`` (fractional
                class labels are never truncated).
        """
        missing = [n for n in self.modalities if n not in out.unimodal]
        if missing:
            raise ModbalanceError(
                f"InfoReg needs the unimodal predictions `out.unimodal` of {missing} (it "
                "compares the modalities' scores)."
            )
        check_target(out.target, out.task, out.unimodal[self.modalities[0]].shape[0])

    @torch.no_grad()
    def _scores(self, out: StepOutput) -> Tensor:
        """``(M,)`` this step's summed unimodal scores (true-class probability or exp(-|error|))."""
        self._check_out(out)
        sums = []
        for n in self.modalities:
            z = out.unimodal[n].detach()
            mask = out.present.get(n) if out.present is not None else None
            if mask is None:
                mask = torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
            mask = mask.to(z.device)
            if out.task == "regression":
                pred = z.reshape(z.shape[0], -1)[:, 0]
                s = torch.exp(-(pred.float() - out.target.float()).abs())
            else:
                check_tensor(z, f"out.unimodal[{n!r}]", ndim=2, dtype="floating")
                p = torch.softmax(z.float(), dim=-1)
                s = p.gather(1, out.target.long().clamp_min(0).unsqueeze(1)).squeeze(1)
            sums.append(torch.where(mask, s, 0.0).sum())
        return torch.stack(sums)

    def losses(self, out: StepOutput, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Check the step's unimodal predictions; the losses are returned unchanged.

        InfoReg adds no loss term: :meth:`around_step` scores the modalities from ``out``.

        Raises:
            ModbalanceError, TypeError: As :meth:`around_step`, before the backward pass.
        """
        self._check_out(out)
        return dict(losses)

    @contextlib.contextmanager
    def around_step(self, out: StepOutput, optimizer: torch.optim.Optimizer) -> Iterator[None]:
        r"""Add :math:`\beta_m(\theta - \theta^{(e)})` to the gradients, accumulate the traces."""
        scores = self._scores(out)
        self._scaler.check_optimizer(optimizer)
        with torch.no_grad():
            if not self._anchored_host:
                self._anchor_if_unanchored()  # the first epoch starts here
            scores = scores.to(self.scores)
            all_reduce_sum(scores)
            beta = inforeg_beta(scores, self.k, scale=self.scale, threshold=self.threshold)
            self.scores.copy_(scores)
            self.coefficients.copy_(beta)
            for i, ps in enumerate(self._group_params):
                live = [(p, a) for p, a in zip(ps, self._anchors(i)) if p.grad is not None]
                if not live:
                    continue
                for (device, dtype), idx in by_device_dtype([p for p, _ in live]).items():
                    grads = [live[t][0].grad for t in idx]
                    diffs = torch._foreach_sub(
                        [live[t][0].detach() for t in idx], [live[t][1].to(dtype) for t in idx]
                    )
                    b = beta[i].to(device=device, dtype=dtype)
                    torch._foreach_mul_(diffs, b)
                    torch._foreach_add_(grads, diffs)  # type: ignore[arg-type]
                weights = [p.grad for p, _ in live if p.ndim >= 2]
                if weights:
                    total = sum(g.double().pow(2).mean() for g in weights)  # type: ignore[union-attr]
                    self.epoch_trace[i] += total.to(self.epoch_trace.device)
        yield

    def epoch_end(self, epoch: int, evaluate: Any = None) -> None:
        """Record the epoch's Fisher traces, update :math:`k` and re-anchor the parameters."""
        check_int(epoch, "epoch", low=0)
        with torch.no_grad():
            self.traces.copy_(torch.cat([self.traces[:, 1:], self.epoch_trace[:, None]], dim=1))
            self.trace_count.add_(1)
            self.epoch_trace.zero_()
            self.k.copy_(inforeg_window_k(self.traces, self.trace_count, self.window))
            self.anchor()
