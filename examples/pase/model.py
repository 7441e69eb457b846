"""PaSE model: per-modality encoders, prototype calibration, OT alignment, gated fusion.

The same class is the plain late-fusion baseline (``baseline=True``) and every ablation, so that all
runs share the backbone code and differ only in the components switched on. Encoders are the
default Transformer :class:`SequenceEncoder` over masked ``(N, T, F)`` sequences, or any
``nn.Module`` per modality that maps that modality's input to ``(N, dim)``: a vector modality
(``(N, F)`` input) is called as ``encoder(x)``, a sequence modality as ``encoder(x, mask)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from modbalance.balancing import StepOutput, task_loss
from modbalance.decision import Decision
from modbalance.fusion import PrototypeGatedFusion
from modbalance.ot import SinkhornAligner
from modbalance.prototypes import PrototypeCalibrator, calibrate, sentiment_classes
from modbalance.readout import RidgeReadout

#: The paper's model-side configuration (every prototype component, plain calibration, the fusion
#: head alone): ``PaSEConfig(..., **PAPER_SWITCHES)``. With ``methods=("sgm",)`` (the paper's
#: update modulation) it is ``--calibration --alignment --gate --equilibrium pase --decision head
#: --readout head`` of the example's command, apart from the separability-safe calibration the
#: command always uses.
PAPER_SWITCHES: dict[str, Any] = {
    "calibration": True,
    "alignment": True,
    "gate": True,
    "safe_calibration": False,
    "decision": "head",
    "readout": "head",
}


@dataclass
class PaSEConfig:
    """Architecture and loss configuration of :class:`PaSEModel`.

    The defaults are the measured recipe, the model that ``python examples/pase_mosi.py`` trains
    by default: no prototype component, separability-safe calibration when ``calibration`` is
    switched on, and ``decision="auto"``. ``calibration``, ``alignment`` and ``gate`` are the
    switches of the three model-side components; ``baseline`` turns all of them off (plain late
    fusion on the same backbone). :data:`PAPER_SWITCHES` gives the paper's model::

        PaSEConfig(modalities, input_dims, **PAPER_SWITCHES)
    """

    modalities: tuple[str, ...]
    input_dims: dict[str, int]
    dim: int = 32
    layers: int = 1
    heads: int = 4
    dropout: float = 0.1
    task: str = "regression"  # or "classification"
    num_outputs: int = 1  # classes for classification
    num_classes: int = 7  # prototype classes (regression labels binned MMSA-style)
    calibration: bool = False
    alignment: bool = False
    gate: bool = False
    baseline: bool = False
    # phase 1 also trains the fusion head, on detached features (DualPhaseSchedule.warm_head);
    # "auto": on for regression (it removes the MAE the warm-up costs), off for classification
    warm_head: bool | str = "auto"
    input_kind: str = "sequence"  # default encoders: "sequence" (Transformer) or "vector" (MLP)
    safe_calibration: bool = True  # calibration scaled by each modality's separability
    # the rule of modbalance.Decision: "auto" (residual for classification, head for regression),
    # "head", "residual", "ensemble", "stack", "gate" or "precision" (regression)
    decision: str = "auto"
    # the fused prediction: "head" (the fusion head and the decision), or "ridge": a
    # modbalance.RidgeReadout on the concatenated features, re-fitted after every phase-2 epoch
    # on the training split with its strength and the checkpoint chosen on validation; "auto":
    # "ridge" for regression (chosen on validation MAE over four backbones), "head" for
    # classification and for the baseline
    readout: str = "auto"
    momentum: float = 0.98
    temperature: float = 0.1
    epsilon: float = 0.05
    ot_iters: int = 50
    structure_weight: float = 1.0
    lambda_cal: float = 0.1
    lambda_ot: float = 0.2

    def __post_init__(self) -> None:
        self.modalities = tuple(self.modalities)
        if self.warm_head == "auto":
            self.warm_head = self.task == "regression"
        if self.baseline:
            self.calibration = self.alignment = self.gate = False
        if self.readout not in ("auto", "head", "ridge"):
            raise ValueError(f"readout must be 'auto', 'head' or 'ridge', got {self.readout!r}")
        if self.readout == "auto":
            self.readout = "ridge" if self.task == "regression" and not self.baseline else "head"

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


class MLPEncoder(nn.Module):
    """Two-layer MLP for vector modalities: (N, F) -> (N, D)."""

    def __init__(self, in_dim: int, dim: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or 2 * dim
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, dim), nn.ReLU()
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def default_encoder(config: PaSEConfig, modality: str) -> nn.Module:
    """The Transformer sequence encoder (``input_kind="sequence"``) or an MLP (``"vector"``)."""
    c = config
    if c.input_kind == "vector":
        return MLPEncoder(c.input_dims[modality], c.dim)
    return SequenceEncoder(c.input_dims[modality], c.dim, c.layers, c.heads, c.dropout)


class PaSEModel(nn.Module):
    """The PaSE reference model (and, with ``baseline=True``, plain late fusion).

    Args:
        config: Architecture and ablation switches.
        encoders: Optional ``{modality: nn.Module}`` mapping each modality's input to
            ``(N, config.dim)``; by default :func:`default_encoder` for every modality.
    """

    def __init__(self, config: PaSEConfig, encoders: Mapping[str, nn.Module] | None = None) -> None:
        super().__init__()
        self.config = c = config
        self.modalities = c.modalities
        if encoders is not None:
            is_mapping = isinstance(encoders, (Mapping, nn.ModuleDict))
            if not is_mapping or set(encoders.keys()) != set(c.modalities):
                got = sorted(encoders.keys()) if is_mapping else type(encoders)
                raise ValueError(
                    f"`encoders` must map exactly the modalities {list(c.modalities)} to "
                    f"nn.Module encoders, got {got}."
                )
            for m, enc in encoders.items():
                if not isinstance(enc, nn.Module):
                    raise TypeError(f"`encoders[{m!r}]` must be an nn.Module, got {type(enc)}.")
        self.encoders = nn.ModuleDict(
            {m: encoders[m] if encoders else default_encoder(c, m) for m in c.modalities}
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
                    adaptive=c.safe_calibration,
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
        self.decision = Decision(c.modalities, c.task, rule=c.decision, num_outputs=c.num_outputs)
        self.readout = (
            RidgeReadout(c.modalities, c.task, num_outputs=c.num_outputs)
            if c.readout == "ridge"
            else None
        )

    # ----------------------------------------------------------------------------- pieces
    def encode(
        self, features: Mapping[str, Tensor], masks: Mapping[str, Tensor]
    ) -> tuple[dict, dict]:
        """Encode every modality once: returns ``({m: (N, D)}, {m: (N,) bool present})``.

        A vector modality (``(N, F)`` features, ``(N,)`` mask) is encoded as ``encoder(x)``, a
        sequence modality (``(N, T, F)``, ``(N, T)`` mask) as ``encoder(x, mask)``.
        """
        feats, present = {}, {}
        for m in self.modalities:
            x, mask = features[m], masks[m]
            if x.ndim == 2:
                feats[m] = self.encoders[m](x)
                present[m] = mask if mask.ndim == 1 else mask.any(dim=1)
            else:
                feats[m] = self.encoders[m](x, mask)
                present[m] = mask.any(dim=1)
        return feats, present

    def _out(self, logits: Tensor) -> Tensor:
        return logits.squeeze(-1) if self.config.task == "regression" else logits

    def unimodal(self, feats: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {m: self._out(self.unimodal_heads[m](feats[m])) for m in self.modalities}

    def fuse(self, feats: Mapping[str, Tensor], present: Mapping[str, Tensor]) -> Tensor:
        """Fused prediction from per-modality features; absent modalities contribute nothing.

        This is also the head of the Shapley game: coalitions are expressed through ``present``.
        """
        return self._decide(self.head_output(feats, present), feats, present)

    def _decide(self, head: Tensor, feats: Mapping[str, Tensor], present) -> Tensor:
        """The library's :class:`~modbalance.decision.Decision` after the fusion head."""
        if self.decision.rule == "head":
            return self._out(head)
        raw = {m: self.unimodal_heads[m](feats[m]) for m in self.modalities}
        return self._out(self.decision(head, raw, present))

    def head_output(
        self,
        feats: Mapping[str, Tensor],
        present: Mapping[str, Tensor],
        confidence: Mapping[str, Tensor] | None = None,
    ) -> Tensor:
        """The fusion head's raw output ``(N, num_outputs)`` before the decision.

        Backbones with another fusion (tensor, low-rank, cross-modal attention) override this
        method with ``(feats, present)``; the decision and everything else stay the same.
        ``confidence``: the gate's ``{m: (N,)}`` confidences when the caller has them (the
        training forward takes them from the calibration's logits); computed by the calibrators
        otherwise. Only passed when the gate is on.
        """
        if self.fusion is not None:
            conf = confidence
            if conf is None:
                conf = {m: self.calibrators[m].confidence(feats[m]) for m in self.modalities}
            fused = self.fusion(feats, conf, present).fused
        else:  # plain late fusion: mean over the present modalities
            w = torch.stack([present[m] for m in self.modalities], 1).to(
                feats[self.modalities[0]].dtype
            )
            h = torch.stack([feats[m] for m in self.modalities], 1)
            h = torch.where(w.unsqueeze(-1) > 0, h, 0.0)
            fused = h.sum(1) / w.sum(1, keepdim=True).clamp_min(1.0)
        return self.head(fused)

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
        return task_loss(pred, self.target(label), self.config.task)

    # ----------------------------------------------------------------------------- forward
    def forward(self, batch: Mapping[str, Any], phase: int) -> tuple[StepOutput, dict[str, Tensor]]:
        """One training forward pass: the step's outputs and the model's own loss terms.

        Everything that needs gradient happens here (DDP-safe). Phase 1: the unimodal heads train
        the encoders (``"unimodal"``) and calibration warms the prototypes; the fusion head does
        not run. Phase 2: the fused task loss (``"task"``) + calibration + OT alignment, and the
        unimodal heads keep learning as read-outs on *detached* features (``"readout"``: it trains
        the heads, not the encoders). Balancing methods (``examples/pase/step.py``) add their terms
        to these, e.g. :class:`~modbalance.methods.UnimodalLoss` replaces ``"readout"`` by
        unimodal losses that reach the encoders. The baseline is phase 2 without the PaSE
        components from the first epoch.

        Returns:
            ``(StepOutput, {name: scalar loss})``. ``StepOutput.unimodal`` carries gradient to
            the encoders.
        """
        c = self.config
        label = batch["label"]
        target = self.target(label)
        feats, present = self.encode(batch["features"], batch["mask"])
        uni = self.unimodal(feats)
        losses: dict[str, Tensor] = {}
        cal_outputs = {}
        if self.calibrators:  # every modality's calibration in one batched pass
            cal_outputs = calibrate(self.calibrators, feats, self.class_labels(label), present)
        if c.calibration:
            losses["calibration"] = (
                c.lambda_cal * sum(o.loss for o in cal_outputs.values()) / len(self.modalities)
            )
        fused = None
        if phase == 1:
            losses["unimodal"] = self._mean_unimodal_loss(uni, target)
            if c.warm_head:  # the head learns while the encoders warm up, without reaching them
                detached = {m: f.detach() for m, f in feats.items()}
                head = self._decide(self.head_output(detached, present), detached, present)
                losses["warm_head"] = task_loss(head, target, c.task)
        else:
            readout = self.unimodal({m: f.detach() for m, f in feats.items()})
            losses["readout"] = self._mean_unimodal_loss(readout, target)
            if self.fusion is not None:  # the gate's confidence from the calibration's logits
                conf = {m: cal_outputs[m].confidence() for m in self.modalities}
                head = self.head_output(feats, present, confidence=conf)
            else:
                head = self.head_output(feats, present)
            fused = self._decide(head, feats, present)
            if self.decision.rule == "precision":
                self.decision.observe(self._out(head), uni, present, target)
            losses["task"] = task_loss(fused, target, c.task)
            if self.aligner is not None:
                means = {m: cal_outputs[m].class_means for m in self.modalities}
                masses = {m: cal_outputs[m].class_counts for m in self.modalities}
                losses["alignment"] = c.lambda_ot * self.aligner.pairwise(means, masses).loss
        out = StepOutput(
            features=feats,
            unimodal=uni,
            fused=fused,
            present=present,
            target=target,
            task=c.task,
            phase=phase,
            fuse=self.fuse,
        )
        return out, losses

    def _mean_unimodal_loss(self, uni: Mapping[str, Tensor], target: Tensor) -> Tensor:
        return sum(task_loss(uni[m], target, self.config.task) for m in self.modalities) / len(
            self.modalities
        )

    @torch.no_grad()
    def predict(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Inference outputs; ``fused`` comes from the fitted read-out when there is one."""
        feats, present = self.encode(batch["features"], batch["mask"])
        if self.readout is not None and self.readout.fitted:
            fused = self.readout(feats, present)
        else:
            fused = self.fuse(feats, present)
        return {
            "fused": fused,
            "unimodal": self.unimodal(feats),
            "features": feats,
            "present": present,
        }

    def modality_groups(self) -> dict[str, nn.Module]:
        """Parameter groups for the modulators: each modality's encoder."""
        return {m: self.encoders[m] for m in self.modalities}
