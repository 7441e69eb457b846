"""PaSE model: per-modality Transformer encoders, prototype calibration, OT alignment, gated fusion.

The same class is the plain late-fusion baseline (``baseline=True``) and every ablation, so that all
runs share the backbone code and differ only in the components switched on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from modbalance.fusion import PrototypeGatedFusion
from modbalance.ot import SinkhornAligner
from modbalance.prototypes import PrototypeCalibrator, sentiment_classes


@dataclass
class PaSEConfig:
    """Architecture and loss configuration of :class:`PaSEModel`.

    ``calibration``, ``alignment`` and ``gate`` are the ablation switches of the three model-side
    components; ``baseline`` turns all of them off (plain late fusion on the same backbone).
    """

    modalities: tuple[str, ...]
    input_dims: dict[str, int]
    dim: int = 64
    layers: int = 1
    heads: int = 4
    dropout: float = 0.1
    task: str = "regression"  # or "classification"
    num_outputs: int = 1  # classes for classification
    num_classes: int = 7  # prototype classes (regression labels binned MMSA-style)
    calibration: bool = True
    alignment: bool = True
    gate: bool = True
    baseline: bool = False
    momentum: float = 0.98
    temperature: float = 0.1
    epsilon: float = 0.05
    ot_iters: int = 50
    structure_weight: float = 1.0
    lambda_cal: float = 0.1
    lambda_ot: float = 0.2
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.modalities = tuple(self.modalities)
        if self.baseline:
            self.calibration = self.alignment = self.gate = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SequenceEncoder(nn.Module):
    """Input projection + Transformer encoder + masked mean pooling: (N, T, F) -> (N, D)."""

    def __init__(self, in_dim: int, dim: int, layers: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, dim)
        layer = nn.TransformerEncoderLayer(
            dim, heads, 2 * dim, dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        # A sequence without a single valid frame would make attention produce NaN: let it attend
        # to everything and zero its pooled output afterwards (the modality is marked absent).
        any_valid = mask.any(dim=1, keepdim=True)
        attn_mask = mask | ~any_valid
        h = self.encoder(self.proj(x), src_key_padding_mask=~attn_mask)
        w = (mask & any_valid).to(h.dtype).unsqueeze(-1)
        pooled = (h * w).sum(1) / w.sum(1).clamp_min(1.0)
        return self.norm(pooled)


class PaSEModel(nn.Module):
    """The PaSE reference model (and, with ``baseline=True``, plain late fusion)."""

    def __init__(self, config: PaSEConfig) -> None:
        super().__init__()
        self.config = c = config
        self.modalities = c.modalities
        self.encoders = nn.ModuleDict(
            {
                m: SequenceEncoder(c.input_dims[m], c.dim, c.layers, c.heads, c.dropout)
                for m in c.modalities
            }
        )
        self.unimodal_heads = nn.ModuleDict(
            {m: nn.Linear(c.dim, c.num_outputs) for m in c.modalities}
        )
        uses_prototypes = c.calibration or c.alignment or c.gate
        self.calibrators = nn.ModuleDict(
            {
                m: PrototypeCalibrator(
                    c.num_classes,
                    c.dim,
                    momentum=c.momentum,
                    temperature=c.temperature,
                    label_bins=c.num_classes if c.task == "regression" else None,
                )
                for m in c.modalities
            }
            if uses_prototypes
            else {}
        )
        self.aligner = (
            SinkhornAligner(
                epsilon=c.epsilon, max_iter=c.ot_iters, structure_weight=c.structure_weight
            )
            if c.alignment
            else None
        )
        self.fusion = PrototypeGatedFusion(c.modalities, c.dim, mode="sum") if c.gate else None
        self.head = nn.Sequential(
            nn.Linear(c.dim, c.dim),
            nn.GELU(),
            nn.Dropout(c.dropout),
            nn.Linear(c.dim, c.num_outputs),
        )

    # ----------------------------------------------------------------------------- pieces
    def encode(
        self, features: Mapping[str, Tensor], masks: Mapping[str, Tensor]
    ) -> tuple[dict, dict]:
        """Encode every modality once: returns ``({m: (N, D)}, {m: (N,) bool present})``."""
        feats = {m: self.encoders[m](features[m], masks[m]) for m in self.modalities}
        present = {m: masks[m].any(dim=1) for m in self.modalities}
        return feats, present

    def _out(self, logits: Tensor) -> Tensor:
        return logits.squeeze(-1) if self.config.task == "regression" else logits

    def unimodal(self, feats: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {m: self._out(self.unimodal_heads[m](feats[m])) for m in self.modalities}

    def fuse(self, feats: Mapping[str, Tensor], present: Mapping[str, Tensor]) -> Tensor:
        """Fused prediction from per-modality features; absent modalities contribute nothing.

        This is also the head of the Shapley game: coalitions are expressed through ``present``.
        """
        if self.fusion is not None:
            conf = {m: self.calibrators[m].confidence(feats[m]) for m in self.modalities}
            fused = self.fusion(feats, conf, present).fused
        else:  # plain late fusion: mean over the present modalities
            w = torch.stack([present[m] for m in self.modalities], 1).to(
                feats[self.modalities[0]].dtype
            )
            h = torch.stack([feats[m] for m in self.modalities], 1)
            h = torch.where(w.unsqueeze(-1) > 0, h, torch.zeros_like(h))
            fused = h.sum(1) / w.sum(1, keepdim=True).clamp_min(1.0)
        return self._out(self.head(fused))

    def target(self, label: Tensor) -> Tensor:
        """Training target: the sentiment (regression) or a class index (classification).

        IEMOCAP labels from MulT pickles arrive as ``(N, 4)`` 0/1 emotion vectors; the
        classification head uses the 4-class single-label view (index of the emotion present).
        """
        if self.config.task == "regression":
            return label.float()
        return label.argmax(-1) if label.ndim == 2 else label.long()

    def class_labels(self, label: Tensor) -> Tensor:
        if self.config.task == "regression":
            return sentiment_classes(label.float(), self.config.num_classes)
        return self.target(label)

    def task_loss(self, pred: Tensor, label: Tensor) -> Tensor:
        if self.config.task == "regression":
            return nn.functional.l1_loss(pred.float(), label.float())
        return nn.functional.cross_entropy(pred.float(), self.target(label))

    # ----------------------------------------------------------------------------- forward
    def forward(self, batch: Mapping[str, Any], phase: int) -> dict[str, Any]:
        """One training forward pass; everything that needs gradient happens here (DDP-safe).

        Phase 1: unimodal heads train the encoders, calibration warms the prototypes.
        Phase 2: fused task loss + calibration + OT alignment; unimodal heads become read-outs on
        detached features (they no longer train the encoders). The baseline uses phase 2 without
        the PaSE components from the first epoch.
        """
        c = self.config
        label = batch["label"]
        feats, present = self.encode(batch["features"], batch["mask"])
        out: dict[str, Any] = {"feats": feats, "present": present}
        losses: dict[str, Tensor] = {}
        zero = feats[self.modalities[0]].new_zeros(())
        cal_outputs = {}
        if self.calibrators:
            labels_c = self.class_labels(label)
            for m in self.modalities:
                cal_outputs[m] = self.calibrators[m](feats[m], labels_c, present[m])
        if c.calibration:
            losses["calibration"] = (
                c.lambda_cal * sum(o.loss for o in cal_outputs.values()) / len(self.modalities)
            )
        if phase == 1:
            uni = self.unimodal(feats)
            losses["unimodal"] = sum(self.task_loss(uni[m], label) for m in self.modalities) / len(
                self.modalities
            )
        else:
            uni = self.unimodal({m: f.detach() for m, f in feats.items()})
            losses["readout"] = sum(self.task_loss(uni[m], label) for m in self.modalities) / len(
                self.modalities
            )
            fused = self.fuse(feats, present)
            out["fused"] = fused
            losses["task"] = self.task_loss(fused, label)
            if self.aligner is not None:
                means = {m: cal_outputs[m].class_means for m in self.modalities}
                masses = {m: cal_outputs[m].class_counts for m in self.modalities}
                align = self.aligner.pairwise(means, masses)
                losses["alignment"] = c.lambda_ot * align.loss
        out["unimodal"] = uni
        out["losses"] = losses
        out["loss"] = sum(losses.values(), zero)
        return out

    @torch.no_grad()
    def predict(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        feats, present = self.encode(batch["features"], batch["mask"])
        return {
            "fused": self.fuse(feats, present),
            "unimodal": self.unimodal(feats),
            "feats": feats,
            "present": present,
        }

    def modality_groups(self) -> dict[str, nn.Module]:
        """Parameter groups for the modulators: each modality's encoder."""
        return {m: self.encoders[m] for m in self.modalities}
