"""Prototype-gated fusion: weight each modality by how well it agrees with its prototypes.

The "PGF" component of PaSE (He et al., AAAI 2026, `arXiv:2511.17585
<https://arxiv.org/abs/2511.17585>`_). The authors' gate multiplied one scalar into every expert's
router weight and was then renormalised away, so it had no effect at all. Here each modality has
its own gate parameters and the gates are normalised *across modalities*, so a modality whose
features agree less with its prototypes really is down-weighted, and an absent modality is
removed exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from modbalance._checks import (
    ModbalanceError,
    check_choice,
    check_finite_sums,
    check_int,
    check_modality_keys,
    check_real,
    check_same_dtype_device,
    check_tensor,
    value_checks_enabled,
)
from modbalance._state import ModalityState

__all__ = ["FusionOutput", "PrototypeGatedFusion"]


#: Set on repeated game rows (see ``modbalance.prototypes._TILES``): ``(base, count)``.
_TILES = "_modbalance_tiles"


class FusionOutput(NamedTuple):
    """Result of :meth:`PrototypeGatedFusion.forward`.

    Attributes:
        fused: ``(N, D)`` for ``mode="sum"``, ``(N, M * D)`` for ``mode="concat"``.
        gates: ``(N, M)`` gate of each modality (constructor order); the gates of the present
            modalities of a sample sum to 1, absent ones are exactly 0 (all zeros when none is
            present).
    """

    fused: Tensor
    gates: Tensor


class PrototypeGatedFusion(ModalityState, nn.Module):
    r"""Fuse M modality features with gates learned from each modality's prototype confidence.

    For sample :math:`i` and modality :math:`m` with feature :math:`h_{im} \in \mathbb{R}^D`,
    confidence :math:`c_{im}` (e.g. :meth:`modbalance.prototypes.PrototypeCalibrator.confidence`,
    in :math:`[0, 1]`) and presence flag :math:`\pi_{im} \in \{0, 1\}`, each modality has its own
    gate network (an affine term plus a small ``tanh`` MLP, :math:`H` = ``hidden`` units):

    .. math::

        s_{im} = a_m c_{im} + b_m + v_m^\top \tanh(w_m c_{im} + u_m),
        \qquad a_m, b_m \in \mathbb{R},\; w_m, u_m, v_m \in \mathbb{R}^H,

    .. math::

        g_{im} = \frac{\pi_{im} \exp(s_{im} / T)}{\sum_{m'} \pi_{im'} \exp(s_{im'} / T)},

    and the fused feature is :math:`\sum_m g_{im} h_{im}` (``mode="sum"``, dimension :math:`D`)
    or the concatenation :math:`[g_{i1} h_{i1}, \dots, g_{iM} h_{iM}]` in constructor order
    (``mode="concat"``, dimension :math:`MD`). :math:`a_m` starts at 1 and :math:`b_m` at 0, so an
    untrained gate already favours the more confident modality; the MLP starts small and random.
    With ``hidden=0`` the gate is the affine term alone.

    Because the parameters differ per modality and the softmax runs across modalities, the gate
    is not a constant that cancels (the defect of the authors' version): changing one modality's
    confidence changes the output, and the gate parameters receive gradients.

    Absent modalities (:math:`\pi_{im} = 0`) get a gate of exactly 0 and their features and
    confidences are replaced by zeros with :func:`torch.where` before use, so they have no
    influence at all, even when they hold NaN or inf, and receive exactly zero gradient. A sample
    with no modality present gets a zero fused vector and zero gates. This makes ``present``
    usable as a coalition mask for Shapley values.

    Args:
        modalities: Names of the :math:`M \ge 2` modalities; this order is the order of the gate
            columns and of the ``concat`` blocks.
        dim: Feature dimension :math:`D` shared by all modalities.
        mode: ``"sum"`` or ``"concat"``.
        hidden: Hidden units :math:`H \ge 0` of each modality's gate MLP (0: affine gate only).
        temperature: Softmax temperature :math:`T > 0`.

    Attributes:
        out_dim: Size of the fused vector (``dim`` or ``M * dim``).

    Raises:
        ModbalanceError: On fewer than 2 or duplicate modalities, or invalid hyperparameters.

    Example:
        >>> import torch
        >>> from modbalance.fusion import PrototypeGatedFusion
        >>> fusion = PrototypeGatedFusion(["text", "audio", "vision"], 4)
        >>> h = {m: torch.randn(2, 4) for m in ("text", "audio", "vision")}
        >>> c = {"text": torch.tensor([0.9, 0.9]), "audio": torch.tensor([0.2, 0.8]),
        ...      "vision": torch.tensor([0.5, 0.5])}
        >>> present = {"text": torch.tensor([True, True]), "audio": torch.tensor([True, False]),
        ...            "vision": torch.tensor([True, True])}
        >>> out = fusion(h, c, present)
        >>> out.fused.shape, out.gates[1, 1].item(), round(out.gates[0].sum().item(), 4)
        (torch.Size([2, 4]), 0.0, 1.0)
    """

    def __init__(
        self,
        modalities: Sequence[str],
        dim: int,
        *,
        mode: str = "sum",
        hidden: int = 16,
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        if isinstance(modalities, str) or not isinstance(modalities, Sequence):
            raise TypeError(
                "`modalities` must be a sequence of names such as ['text', 'audio'], got "
                f"{type(modalities).__name__} ({modalities!r})."
            )
        names = tuple(modalities)
        for name in names:
            if not isinstance(name, str):
                raise TypeError(
                    f"`modalities` must hold strings, got {type(name).__name__} ({name!r})."
                )
        if len(names) < 2:
            raise ModbalanceError(
                f"`modalities` must name at least 2 modalities to fuse, got {len(names)}: "
                f"{list(names)}."
            )
        if len(set(names)) != len(names):
            raise ModbalanceError(f"`modalities` must not repeat a name, got {list(names)}.")
        self.modalities: tuple[str, ...] = names
        self.dim = check_int(dim, "dim", low=1)
        self.mode = check_choice(mode, "mode", ("sum", "concat"))
        self.hidden = check_int(hidden, "hidden", low=0)
        self.temperature = check_real(temperature, "temperature", low=0.0, low_inclusive=False)
        m = len(names)
        self.out_dim = dim if mode == "sum" else m * dim
        self.scale = nn.Parameter(torch.empty(m))
        self.bias = nn.Parameter(torch.empty(m))
        if hidden > 0:
            self.mlp_in_weight = nn.Parameter(torch.empty(m, hidden))
            self.mlp_in_bias = nn.Parameter(torch.empty(m, hidden))
            self.mlp_out_weight = nn.Parameter(torch.empty(m, hidden))
        else:
            self.register_parameter("mlp_in_weight", None)
            self.register_parameter("mlp_in_bias", None)
            self.register_parameter("mlp_out_weight", None)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Affine gate at identity (:math:`a_m = 1, b_m = 0`), MLP as ``nn.Linear`` initialises."""
        self.scale.fill_(1.0)
        self.bias.zero_()
        if self.hidden > 0:
            # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)); fan_in is 1, then H.
            self.mlp_in_weight.uniform_(-1.0, 1.0)
            self.mlp_in_bias.uniform_(-1.0, 1.0)
            bound = 1.0 / math.sqrt(self.hidden)
            self.mlp_out_weight.uniform_(-bound, bound)

    def extra_repr(self) -> str:
        """Hyperparameters shown by ``repr``."""
        return (
            f"modalities={list(self.modalities)}, dim={self.dim}, mode={self.mode!r}, "
            f"hidden={self.hidden}, temperature={self.temperature}"
        )

    def _gather(self, mapping: Any, name: str) -> list[Any]:
        check_modality_keys(
            mapping, name, self.modalities, hint="Mark absent samples with `present` instead."
        )
        return [mapping[m] for m in self.modalities]

    def gate_scores(self, confidence: Tensor) -> Tensor:
        """Unnormalised gate scores :math:`s_{im}` for a ``(N, M)`` confidence matrix.

        Args:
            confidence: ``(N, M)`` confidences in constructor order.

        Returns:
            ``(N, M)`` scores (before temperature, masking and softmax).
        """
        check_tensor(confidence, "confidence", ndim=2, dtype="floating")
        if confidence.shape[1] != len(self.modalities):
            raise ModbalanceError(
                f"`confidence` must have shape (N, {len(self.modalities)}) (one column per "
                f"modality), got shape {tuple(confidence.shape)}."
            )
        return self._scores(confidence)

    def _tiled_scores(self, confs: list[Tensor], n: int) -> Tensor | None:
        """Gate scores of game rows once per sample, repeated; ``None`` if they are not game rows.

        Inside :class:`~modbalance.shapley.ModalityGame` (``masking="present"``, no grad mode)
        the confidences are ``count``-fold repeats of per-sample confidences, marked so by
        :meth:`~modbalance.prototypes.PrototypeCalibrator.confidence`; the scores of the
        present modalities are those of the per-sample confidences (absent ones are masked).
        """
        if torch.is_grad_enabled():
            return None
        tiles = [getattr(x, _TILES, None) for x in confs]
        if any(t is None for t in tiles):
            return None
        count = tiles[0][1]
        if any(t[1] != count or t[0].shape[0] * count != n for t in tiles):
            return None
        base = torch.stack([t[0].to(confs[0].device) for t in tiles], dim=1)  # (N / count, M)
        return torch.cat([self._scores(base)] * count)  # cat: cheaper than repeat on CPU

    def _scores(self, confidence: Tensor) -> Tensor:
        """:meth:`gate_scores` without its checks: ``b + a c + v^T tanh(u + w c)``."""
        c = confidence.to(self.scale.dtype)
        s = torch.addcmul(self.bias, self.scale, c)
        if self.hidden > 0:
            act = torch.tanh(torch.addcmul(self.mlp_in_bias, c.unsqueeze(-1), self.mlp_in_weight))
            s = s + (act * self.mlp_out_weight).sum(-1)
        return s

    def _check_inputs(
        self, feats: list[Tensor], confs: list[Tensor], pres: list[Tensor] | None
    ) -> Tensor:
        """Check the gathered features, confidences and flags; return the first feature tensor."""
        first = self.modalities[0]
        ref = check_tensor(feats[0], f"features[{first!r}]", ndim=2, dtype="floating")
        n = ref.shape[0]
        if n == 0:
            raise ModbalanceError(f"`features[{first!r}]` must not be an empty batch (N = 0).")
        for name, x in zip(self.modalities, feats):
            key = f"features[{name!r}]"
            check_tensor(x, key, ndim=2, dtype="floating")
            if tuple(x.shape) != (n, self.dim):
                raise ModbalanceError(
                    f"`{key}` must have shape ({n}, {self.dim}) (batch of "
                    f"`features[{first!r}]`, dim={self.dim}), got shape {tuple(x.shape)}."
                )
            check_same_dtype_device(x, key, ref, f"features[{first!r}]")
        flags = [] if pres is None else pres
        for what, values, kind in (("confidence", confs, "floating"), ("present", flags, "bool")):
            for name, x in zip(self.modalities, values):
                key = f"{what}[{name!r}]"
                check_tensor(x, key, ndim=1, dtype=kind)
                if x.shape[0] != n:
                    raise ModbalanceError(
                        f"`{key}` must have shape ({n},) to match the features, got shape "
                        f"{tuple(x.shape)}."
                    )
        return ref

    def forward(
        self,
        features: Mapping[str, Tensor],
        confidence: Mapping[str, Tensor],
        present: Mapping[str, Tensor] | None = None,
    ) -> FusionOutput:
        """Gate and fuse the modality features.

        Args:
            features: ``{modality: (N, D)}`` floating features, one entry per modality.
            confidence: ``{modality: (N,)}`` floating confidences, one entry per modality.
            present: Optional ``{modality: (N,)}`` bool flags; ``False`` removes that modality
                from that sample. ``None`` means every modality is present.

        Returns:
            :class:`FusionOutput` ``(fused, gates)``.

        Raises:
            ModbalanceError: On a missing or unknown modality, mismatched shapes, an empty batch,
                or NaN/inf in a present modality's features or confidence.
            TypeError: On non-mapping arguments or wrong dtypes (``present`` must be bool).
        """
        feats = self._gather(features, "features")
        confs = self._gather(confidence, "confidence")
        pres = None if present is None else self._gather(present, "present")

        ref = self._check_inputs(feats, confs, pres)
        n = ref.shape[0]

        device = ref.device
        h = torch.stack(feats, dim=1)  # (N, M, D)
        c = torch.stack([x.to(device) for x in confs], dim=1)  # (N, M)
        if pres is None:
            on = torch.ones(n, len(self.modalities), dtype=torch.bool, device=device)
        else:
            on = torch.stack([x.to(device) for x in pres], dim=1)
        h = torch.where(on.unsqueeze(-1), h, 0.0)
        c = torch.where(on, c, 0.0)
        if value_checks_enabled():
            # one host read when both are finite (see _check_finite_sums)
            check_finite_sums(
                (h, "features (present modalities)"), (c, "confidence (present modalities)")
            )

        scores = self._tiled_scores(confs, n)
        if scores is None:
            scores = self._scores(c)
        if self.temperature != 1.0:
            scores = scores / self.temperature
        scores = scores.masked_fill(~on, torch.finfo(scores.dtype).min)
        gates = torch.softmax(scores, dim=1)
        gates = torch.where(on, gates, 0.0).to(h.dtype)
        weighted = gates.unsqueeze(-1) * h
        fused = weighted.sum(dim=1) if self.mode == "sum" else weighted.flatten(1)
        return FusionOutput(fused, gates)
