r"""MLA: multimodal learning with alternating unimodal adaptation (Zhang et al., CVPR 2024).

Training alternates between modalities: each step trains one modality's encoder through a
**shared** linear head, and the head's gradient is projected (OWM-style recursive least squares)
away from the input directions it has already fitted, so that learning one modality does not
erase what the head learned from the others. At inference the unimodal predictions are fused with
entropy-based weights (:func:`mla_fuse`). Transcribed from the authors' code
(``Cecile-hi/Multimodal-Learning-with-Alternating-Unimodal-Adaptation``: ``main.py``'s
``train_epoch`` with ``gs_flag``, ``utils/utils.py``'s ``GSPlugin``, and
``calculate_gating_weights``); :class:`MLA` lists the deviations.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modbalance._checks import (
    ModbalanceError,
    check_choice,
    check_int,
    check_modality_keys,
    check_real,
    check_tensor,
)
from modbalance.balancing import BalancingMethod, StepOutput, task_loss
from modbalance.distributed import all_reduce_sum

__all__ = ["MLA", "mla_entropy_weights", "mla_fuse"]


def mla_entropy_weights(
    logits_by_modality: Mapping[str, Tensor],
    present: Mapping[str, Tensor] | None = None,
    *,
    mode: str = "sample",
) -> dict[str, Tensor]:
    r"""MLA's entropy-based fusion weights.

    With the entropy :math:`e_m` of modality :math:`m`'s prediction,

    .. math::

        w_m = \frac{\exp(\max_j e_j - e_m)}{\sum_l \exp(\max_j e_j - e_l)}
            = \operatorname{softmax}_m(-e_m),

    so the more certain modality weighs more. ``mode="sample"`` (default) uses each sample's
    entropy over classes, :math:`e_{im} = -\sum_c p_{imc}\log p_{imc}` with
    :math:`p_{im} = \operatorname{softmax}_c(z_{im})`, giving ``(N,)`` weights; absent
    modalities (``present``) get weight 0. ``mode="batch"`` reproduces the released code
    (``calculate_entropy``): the softmax runs over the **batch** dimension (``dim=0``) and the
    entropy is summed over the whole ``(N, C)`` matrix, giving one weight per modality for the
    whole batch (so a sample's prediction depends on the rest of its batch; presence is
    ignored).

    Args:
        logits_by_modality: ``{modality: (N, C)}`` logits of each modality (same ``N``, ``C``).
        present: Optional ``{modality: (N,) bool}`` masks (``mode="sample"`` only).
        mode: ``"sample"`` or ``"batch"``.

    Returns:
        ``{modality: weights}``, ``(N,)`` tensors for ``"sample"`` or 0-dim for ``"batch"``,
        summing to one over modalities.

    Raises:
        ModbalanceError: For regression-shaped predictions (``(N,)`` or ``(N, 1)``): entropy
            weights need class logits; use ``mla_fuse(..., weights=...)`` instead.

    Example:
        >>> import torch
        >>> from modbalance.methods.mla import mla_entropy_weights
        >>> w = mla_entropy_weights({"a": torch.tensor([[4.0, 0.0]]), "b": torch.zeros(1, 2)})
        >>> {k: round(float(v[0]), 4) for k, v in w.items()}
        {'a': 0.6464, 'b': 0.3536}
    """
    check_choice(mode, "mode", ("sample", "batch"))
    if not isinstance(logits_by_modality, Mapping) or not logits_by_modality:
        raise ModbalanceError(
            "`logits_by_modality` must be a non-empty mapping {modality: (N, C) logits}."
        )
    names = list(logits_by_modality)
    zs = []
    for n in names:
        z = check_tensor(logits_by_modality[n], f"logits_by_modality[{n!r}]", dtype="floating")
        if z.ndim != 2 or z.shape[1] < 2:
            raise ModbalanceError(
                f"`logits_by_modality[{n!r}]` must be (N, C) class logits with C >= 2 for "
                f"entropy weights, got shape {tuple(z.shape)}; for regression outputs pass fixed "
                "`weights=` to mla_fuse instead."
            )
        if zs and z.shape != zs[0].shape:
            raise ModbalanceError(
                f"every modality's logits must have the same shape; {names[0]!r} has "
                f"{tuple(zs[0].shape)}, {n!r} has {tuple(z.shape)}."
            )
        zs.append(z)
    z = torch.stack(zs)  # (M, N, C)
    if mode == "batch":
        logp = F.log_softmax(z, dim=1)
        ent = -(logp.exp() * logp).sum(dim=(1, 2))  # (M,)
        w = torch.softmax(-ent, dim=0)
        return {n: w[i] for i, n in enumerate(names)}
    logp = F.log_softmax(z, dim=-1)
    ent = -(logp.exp() * logp).sum(-1)  # (M, N)
    score = -ent
    if present is not None:
        check_modality_keys(present, "present", names)
        mask = torch.stack([present[n].to(z.device) for n in names])
        score = score.masked_fill(~mask, float("-inf"))
        none = ~mask.any(0, keepdim=True)
        score = torch.where(none, torch.zeros_like(score), score)
    w = torch.softmax(score, dim=0)
    return {n: w[i] for i, n in enumerate(names)}


def mla_fuse(
    logits_by_modality: Mapping[str, Tensor],
    present: Mapping[str, Tensor] | None = None,
    *,
    mode: str = "sample",
    weights: Mapping[str, float] | None = None,
) -> Tensor:
    r"""Fuse unimodal predictions with MLA's entropy weights (or fixed weights).

    .. math::

        \hat z_i = \sum_m w_{im}\, z_{im},

    with :math:`w` from :func:`mla_entropy_weights` (the released code's ``--dynamic`` fusion)
    or, with ``weights``, the fixed weights of its default fusion (``av_alpha``, ``a_alpha``
    ...), normalised over the present modalities. Fixed weights also fuse regression outputs.

    Args:
        logits_by_modality: ``{modality: (N, C)}`` logits, or ``(N,)`` outputs with ``weights``.
        present: Optional ``{modality: (N,) bool}`` masks.
        mode: ``"sample"`` or ``"batch"`` (see :func:`mla_entropy_weights`).
        weights: Optional fixed ``{modality: weight >= 0}``.

    Returns:
        The fused prediction, shaped like each input.

    Example:
        >>> import torch
        >>> from modbalance.methods.mla import mla_fuse
        >>> mla_fuse({"a": torch.tensor([[4.0, 0.0]]), "b": torch.zeros(1, 2)})
        tensor([[2.5854, 0.0000]])
        >>> mla_fuse({"a": torch.tensor([1.0]), "b": torch.tensor([3.0])},
        ...          weights={"a": 0.25, "b": 0.75})
        tensor([2.5000])
    """
    if weights is None:
        w = mla_entropy_weights(logits_by_modality, present, mode=mode)
    else:
        if not isinstance(weights, Mapping):
            raise TypeError(f"`weights` must be a mapping, got {type(weights).__name__}.")
        check_modality_keys(weights, "weights", list(logits_by_modality))
        names = list(logits_by_modality)
        ref = logits_by_modality[names[0]]
        rows = []
        for n in names:
            v = check_real(weights[n], f"weights[{n!r}]", low=0.0)
            col = torch.full((ref.shape[0],), v, dtype=ref.dtype, device=ref.device)
            if present is not None:
                col = col * present[n].to(ref.device).to(ref.dtype)
            rows.append(col)
        stack = torch.stack(rows)
        stack = stack / stack.sum(0, keepdim=True).clamp_min(torch.finfo(ref.dtype).tiny)
        w = {n: stack[i] for i, n in enumerate(names)}
    total = None
    for n, z in logits_by_modality.items():
        wn = w[n].to(z.dtype)
        if wn.ndim == 1 and z.ndim == 2:
            wn = wn.unsqueeze(1)
        term = z * wn
        total = term if total is None else total + term
    assert total is not None
    return total


class MLA(BalancingMethod):
    r"""Alternating unimodal adaptation through a shared head, with gradient projection.

    The method owns the shared head, a linear layer :math:`W \in \mathbb{R}^{C\times D}`
    (``head``; or pass your own ``nn.Linear``), applied to every modality's features (all
    modalities need the same feature dimension :math:`D`; add ``mla.parameters()`` to the
    optimizer). Step :math:`t` (``out.step``, the training loop's global step counter) trains
    modality :math:`m = \text{modalities}[t \bmod M]` only:
    :meth:`losses` **replaces** the step's terms by

    .. math::

        \mathcal{L}_t = \ell\bigl(W h^m + b,\; y\bigr)

    (cross-entropy, or L1 for regression, over the samples where :math:`m` is present), so the
    other encoders receive no gradient. Before ``optimizer.step()``, :meth:`around_step`
    updates the shared projector :math:`P \in \mathbb{R}^{D\times D}` (identity at the start)
    with the batch-mean feature :math:`r = \bar h^m \in \mathbb{R}^{1\times D}` and projects
    the head's weight gradient (the bias is not projected):

    .. math::

        k = P r^\top, \qquad
        P \leftarrow P - \frac{k k^\top}{\alpha_t + r k}, \qquad
        P \leftarrow \frac{P}{\lVert P\rVert_F}, \qquad
        \nabla_W \leftarrow \nabla_W P^\top,

    (the orthogonal-weight-modification / recursive-least-squares step; :math:`r k = r P r^\top`
    is a scalar)

    with :math:`\alpha_t = 0.1^{\,1 + b/S}` (:math:`b` the step's index within the epoch,
    :math:`S` = ``steps_per_epoch``; :math:`\alpha = 0.1` if :math:`S` is not given). The very
    first update of the run is not projected. At inference, :meth:`predict` fuses
    :math:`W h^m + b` of all modalities with :func:`mla_fuse` (entropy weights).

    **Deviations from the released code, on purpose.**

    * *One modality per step.* The code runs, for every batch, one backward and one
      ``optimizer.step()`` per modality in turn. Our step interface has one optimizer step per
      batch, so modalities alternate across steps (modality ``step % M``); over :math:`M` steps
      every modality is trained once, on different batches.
    * *The projection is applied.* The released ``GSPlugin.before_update`` receives
      ``fusion_module.fc_out`` (an ``nn.Linear``, whose parameters are named ``weight`` and
      ``bias``) and only projects a parameter named ``"module.weight"``, so as released the
      projection never runs. We apply it as written (the paper's method); ``project=False``
      gives the released behaviour.
    * *The OWM denominator.* The released line is
      ``torch.mm(k, k.t()) / (alpha + torch.mm(k, r))``: ``torch.mm(k, r)`` is the
      :math:`D\times D` outer product :math:`k r`, so the code divides elementwise by
      :math:`\alpha + k_i r_j` (entries that can be near zero or negative) instead of by the
      scalar :math:`\alpha + r k` of OWM. We use the scalar by default
      (``denominator="scalar"``); ``denominator="outer"`` reproduces the released line exactly
      (the parity test uses it).
    * *No graph through* :math:`P`: the code updates :math:`P` from features that carry
      gradient (its graph grows step after step); we use detached features.
    * *DDP*: the mean feature :math:`r` is averaged over ranks before the projector update, so
      every rank holds the same :math:`P` and applies the same projection.
    * *Entropy weights per sample* by default (see :func:`mla_entropy_weights`; the code's
      batch-level weights are ``fuse_mode="batch"``).
    * *Regression*: the shared head has one output and the L1 loss; the projection is the same;
      :meth:`predict` fuses with fixed weights (uniform over present modalities, or
      ``weights``), since entropy weights need class probabilities.

    **Adam.** The alternation and the projection change *which* parameters move and in which
    direction, and survive Adam; the Frobenius normalisation of :math:`P` shrinks the head's
    gradient by a roughly constant factor, which matters under SGD only.

    Args:
        modalities: Modality names, in alternation order (at least two).
        dim: Common feature dimension :math:`D`.
        out_dim: Number of classes :math:`C` (1 for regression).
        head: Optional shared ``nn.Linear(dim, out_dim)`` to use instead of a new one.
        project: Apply the gradient projection.
        steps_per_epoch: :math:`S` for the :math:`\alpha_t` schedule (``None``: constant 0.1).
        keep: Names of incoming loss terms to keep next to MLA's (default: none).
        fuse_mode: ``"sample"`` or ``"batch"`` for :meth:`predict`.
        denominator: ``"scalar"`` (OWM, default) or ``"outer"`` (the released line).

    Reference:
        X. Zhang, J. Yoon, M. Bansal, H. Yao, "Multimodal Representation Learning by Alternating
        Unimodal Adaptation", CVPR 2024. Code:
        https://github.com/Cecile-hi/Multimodal-Learning-with-Alternating-Unimodal-Adaptation

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from modbalance.balancing import StepOutput, combine_losses
        >>> from modbalance.methods.mla import MLA
        >>> enc = nn.ModuleDict({"text": nn.Linear(5, 4), "audio": nn.Linear(3, 4)})
        >>> mla = MLA(["text", "audio"], dim=4, out_dim=3)
        >>> opt = torch.optim.SGD([*enc.parameters(), *mla.parameters()], lr=0.1)
        >>> x = {"text": torch.randn(6, 5), "audio": torch.randn(6, 3)}
        >>> y = torch.tensor([0, 1, 2, 0, 1, 2])
        >>> for step in range(2):
        ...     opt.zero_grad()
        ...     h = {m: enc[m](x[m]) for m in enc}
        ...     out = StepOutput(h, {}, None, {m: torch.ones(6, dtype=torch.bool) for m in h},
        ...                      y, "classification", step=step)
        ...     losses = mla.losses(out, {})
        ...     combine_losses(losses).backward()
        ...     with mla.around_step(out, opt):
        ...         opt.step()
        >>> list(losses), enc["text"].weight.grad is None
        (['mla_audio'], True)
        >>> mla.predict(h).shape
        torch.Size([6, 3])
    """

    projector: Tensor
    updates: Tensor
    batch_in_epoch: Tensor

    _checked_state: ClassVar[dict[str, str]] = {"projector": "finite"}

    def __init__(
        self,
        modalities: Iterable[str],
        dim: int,
        out_dim: int,
        *,
        head: nn.Linear | None = None,
        project: bool = True,
        steps_per_epoch: int | None = None,
        keep: Iterable[str] = (),
        fuse_mode: str = "sample",
        denominator: str = "scalar",
    ) -> None:
        super().__init__()
        if isinstance(modalities, str):
            raise TypeError("`modalities` must be an iterable of names, not a single string.")
        names = tuple(modalities)
        if len(names) < 2:
            raise ModbalanceError(
                f"MLA alternates between at least 2 modalities, got {len(names)} ({list(names)})."
            )
        if len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
            raise ModbalanceError(f"`modalities` must be distinct non-empty names, got {names}.")
        self.modalities: tuple[str, ...] = names
        self.dim = check_int(dim, "dim", low=1)
        self.out_dim = check_int(out_dim, "out_dim", low=1)
        if head is None:
            head = nn.Linear(self.dim, self.out_dim)
        if not isinstance(head, nn.Linear):
            raise TypeError(f"`head` must be an nn.Linear, got {type(head).__name__}.")
        if head.in_features != self.dim or head.out_features != self.out_dim:
            raise ModbalanceError(
                f"`head` must be nn.Linear({self.dim}, {self.out_dim}), got "
                f"nn.Linear({head.in_features}, {head.out_features})."
            )
        self.head = head
        self.project = bool(project)
        self.steps_per_epoch = (
            None
            if steps_per_epoch is None
            else check_int(steps_per_epoch, "steps_per_epoch", low=1)
        )
        if isinstance(keep, str):
            keep = (keep,)
        self.keep = tuple(keep)
        self.fuse_mode = check_choice(fuse_mode, "fuse_mode", ("sample", "batch"))
        self.denominator = check_choice(denominator, "denominator", ("scalar", "outer"))
        w = self.head.weight
        self.register_buffer("projector", torch.eye(self.dim, dtype=w.dtype, device=w.device))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("batch_in_epoch", torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        """Hyperparameters shown by ``repr``."""
        return (
            f"modalities={self.modalities!r}, dim={self.dim}, out_dim={self.out_dim}, "
            f"project={self.project}, steps_per_epoch={self.steps_per_epoch}, "
            f"denominator={self.denominator!r}"
        )

    def current(self, step: int) -> str:
        """The modality trained at ``step`` (``modalities[step % M]``)."""
        return self.modalities[int(step) % len(self.modalities)]

    def _features(self, features: Mapping[str, Tensor], name: str) -> Tensor:
        if name not in features:
            raise ModbalanceError(
                f"`features` lacks modality {name!r}; MLA alternates over {list(self.modalities)}."
            )
        h = check_tensor(features[name], f"features[{name!r}]", ndim=2, dtype="floating")
        if h.shape[1] != self.dim:
            raise ModbalanceError(
                f"`features[{name!r}]` must have shape (N, {self.dim}): MLA's shared head needs "
                f"the same feature dimension for every modality, got shape {tuple(h.shape)}."
            )
        return h

    def _present_features(self, out: StepOutput, name: str) -> tuple[Tensor, Tensor]:
        """``(N, D)`` features of ``name`` with absent rows zeroed, and the ``(N,)`` mask."""
        h = self._features(out.features, name)
        mask = out.present.get(name) if out.present is not None else None
        if mask is None:
            mask = torch.ones(h.shape[0], dtype=torch.bool, device=h.device)
        mask = mask.to(h.device)
        return torch.where(mask.unsqueeze(1), h, 0.0), mask  # absent rows may hold NaN

    def losses(self, out: StepOutput, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Return ``{"mla_<modality>": loss}`` for this step's modality (and the ``keep`` terms)."""
        name = self.current(out.step)
        h, mask = self._present_features(out, name)
        pred = self.head(h.to(self.head.weight.dtype))  # features may come from autocast
        if out.task == "regression" and self.out_dim != 1:
            raise ModbalanceError(
                f"regression needs a shared head with out_dim=1, got out_dim={self.out_dim}."
            )
        per = task_loss(pred, out.target, out.task, reduction="none")
        mf = mask.to(per.dtype)
        loss = (per * mf).sum() / mf.sum().clamp_min(1)
        kept = {k: v for k, v in losses.items() if k in self.keep}
        return {**kept, f"mla_{name}": loss}

    def _alpha(self) -> float | Tensor:
        r"""OWM's :math:`\alpha_t`: a 0-dim float64 tensor with ``steps_per_epoch`` (no sync)."""
        if self.steps_per_epoch is None:
            return 0.1
        b = torch.remainder(self.batch_in_epoch, self.steps_per_epoch)
        return 1.0 * torch.pow(0.1, b.double() / self.steps_per_epoch + 1)

    @torch.no_grad()
    def project_gradient(self, r: Tensor) -> None:
        """Update the projector with the mean feature ``r`` ``(1, D)`` and project ``head``'s grad.

        This is :meth:`around_step`'s rule as a plain call. The first update of the run only
        counts (it is not projected), as in the released code.
        """
        check_tensor(r, "r", ndim=2, dtype="floating")
        if r.shape != (1, self.dim):
            raise ModbalanceError(f"`r` must have shape (1, {self.dim}), got {tuple(r.shape)}.")
        if self.project:
            alpha = self._alpha()
            p = self.projector
            r = r.to(p)
            k = p @ r.t()
            denom = r @ k if self.denominator == "scalar" else k @ r  # (1, 1) or (D, D)
            if isinstance(alpha, Tensor):
                alpha = alpha.to(p.dtype)
            p = p - (k @ k.t()) / (alpha + denom)
            p = p / torch.linalg.matrix_norm(p, ord="fro")
            # The first update only counts: selected on the device, never `if updates != 0`.
            first = self.updates == 0
            self.projector.copy_(torch.where(first, self.projector, p))
            g = self.head.weight.grad
            if g is not None:
                g.copy_(torch.where(first, g, g @ p.t().to(g)))
        self.updates.add_(1)
        self.batch_in_epoch.add_(1)

    @contextlib.contextmanager
    def around_step(self, out: StepOutput, optimizer: torch.optim.Optimizer) -> Iterator[None]:
        """Project the shared head's gradient before ``optimizer.step()``."""
        with torch.no_grad():
            h, mask = self._present_features(out, self.current(out.step))
            hp = h.detach().to(self.projector.dtype)
            mf = mask.to(hp.dtype)
            # (sum of present features, their count); every rank must build the same projector,
            # so the mean feature is taken over all ranks
            pending = torch.cat(
                [(hp * mf.unsqueeze(1)).sum(0, keepdim=True), mf.sum().reshape(1, 1)], 1
            )
        all_reduce_sum(pending)
        r = pending[:, :-1] / pending[:, -1:].clamp_min(1)
        self.project_gradient(r)
        yield

    def epoch_end(self, epoch: int, evaluate: Any = None) -> None:
        r"""Reset the in-epoch step counter of the :math:`\alpha_t` schedule."""
        with torch.no_grad():
            self.batch_in_epoch.zero_()

    def predict(
        self,
        features: Mapping[str, Tensor],
        present: Mapping[str, Tensor] | None = None,
        *,
        weights: Mapping[str, float] | None = None,
    ) -> Tensor:
        """Inference: the shared head on every modality, fused with :func:`mla_fuse`.

        Args:
            features: ``{modality: (N, D)}`` for every modality.
            present: Optional presence masks.
            weights: Optional fixed fusion weights (required-free for regression: uniform).

        Returns:
            ``(N, C)`` fused logits, or ``(N,)`` for a regression head.
        """
        w = self.head.weight
        preds = {n: self.head(self._features(features, n).to(w.dtype)) for n in self.modalities}
        if self.out_dim == 1:
            preds = {n: z[:, 0] for n, z in preds.items()}
            if weights is None:
                weights = {n: 1.0 for n in self.modalities}
        return mla_fuse(preds, present, mode=self.fuse_mode, weights=weights)
