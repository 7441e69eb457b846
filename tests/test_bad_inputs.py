"""Bad inputs, enumerated per public name: each must raise a clear error that names the argument.

One table per module (``_checks``, ``shapley``, ``metrics``, ``ot``, ``prototypes``, ``data``).
Every row is ``(public name, kind, call, exception, pattern)``: ``kind`` is the class of bad input
tried (shape, nan, inf, empty, dtype, range, device, keys, type), ``call`` receives a temporary
directory (for the pickle loaders) and must raise ``exception`` with a message matching
``pattern``, which always contains the argument's name. Value checks (NaN/inf, ranges) are on, as
by default. The module runs in a few seconds.

Further sections: modality names (ordered, never a set), the third round of data, label and
metric mistakes, and state that knows its modalities (other names or order, poisoned values,
optimizers and backward passes under which a method would silently do nothing). The command
line's bad inputs (numbers, output folders, display flags and randomness, Ctrl-C) are tested in
``tests/test_example.py``, next to the CLI fixtures they need.
"""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import modbalance
from examples.pase import METHODS, PAPER_SWITCHES, PaSEConfig, build
from modbalance import (
    Decision,
    ModalityGame,
    ModbalanceError,
    MultimodalDataset,
    PrototypeCalibrator,
    PrototypeGatedFusion,
    ShapleyEquilibrium,
    ShapleyGradModulator,
    SinkhornAligner,
    UnimodalLoss,
    class_means,
    coalition_masks,
    collate_multimodal,
    iemocap_metrics,
    imbalance_index,
    interactions_from_table,
    load_mmsa,
    load_mult,
    msa_regression_metrics,
    probe_score,
    sentiment_classes,
    shapley_from_table,
    shapley_shares,
    shapley_values,
    sims_regression_metrics,
    sinkhorn,
)
from modbalance._state import _decode

NAN, INF = float("nan"), float("inf")
ME = ModbalanceError


def with_value(t: torch.Tensor, index: Any, value: float) -> torch.Tensor:
    t = t.clone()
    t[index] = value
    return t


def additive(coalitions: torch.Tensor) -> torch.Tensor:
    return coalitions.double() @ torch.arange(1.0, coalitions.shape[1] + 1, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------
# _checks
# ----------------------------------------------------------------------------------------------

# fmt: off
CHECKS = [
    ("value_checks", "type", lambda _: modbalance.value_checks("yes"), TypeError, "`enabled`"),
    ("value_checks", "type", lambda _: modbalance.value_checks(0), TypeError, "`enabled`"),
    ("value_checks", "type", lambda _: modbalance.value_checks(None), TypeError, "`enabled`"),
]
# fmt: on


# ----------------------------------------------------------------------------------------------
# shapley
# ----------------------------------------------------------------------------------------------

TABLE = torch.randn(8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
DIMS = {"text": 3, "audio": 2}
FEATS = {k: torch.randn(6, d, generator=torch.Generator().manual_seed(1)) for k, d in DIMS.items()}
Y_REG = torch.linspace(-1.0, 1.0, 6)
Y_CLS = torch.tensor([0, 1, 2, 0, 1, 2])


def lin_head(out_dim: int = 1):
    torch.manual_seed(0)
    proj = nn.ModuleDict({k: nn.Linear(d, out_dim) for k, d in DIMS.items()})

    def head(features, present):
        out = sum(proj[k](features[k]) for k in DIMS)
        return out[:, 0] if out_dim == 1 else out

    return head


def game(**kw):
    kw.setdefault("task", "regression")
    return ModalityGame(lin_head(3 if kw["task"] == "classification" else 1), list(DIMS), **kw)


def one_unit_result():
    return shapley_values(additive, 3, method="permutation", num_permutations=1, antithetic=False)


# fmt: off
SHAPLEY = [
    ("coalition_masks", "range", lambda _: coalition_masks(0), ME, "`num_players` must be >= 1"),
    ("coalition_masks", "range", lambda _: coalition_masks(25), ME, "`num_players` must be <= 24"),
    ("coalition_masks", "dtype", lambda _: coalition_masks(2.0), TypeError, "`num_players`"),
    ("shapley_from_table", "shape", lambda _: shapley_from_table(TABLE[:6]), ME,
     "`values`.*power of two"),
    ("shapley_from_table", "shape", lambda _: shapley_from_table(TABLE[0]), ME,
     "`values` must have at least 1 dimension"),
    ("shapley_from_table", "empty", lambda _: shapley_from_table(TABLE[:0]), ME,
     "`values`.*power of two"),
    ("shapley_from_table", "nan", lambda _: shapley_from_table(with_value(TABLE, 3, NAN)), ME,
     "`values` must contain only finite values, got 1 NaN"),
    ("shapley_from_table", "inf", lambda _: shapley_from_table(with_value(TABLE, 3, -INF)), ME,
     "`values` must contain only finite.*1 infinite"),
    ("shapley_from_table", "dtype", lambda _: shapley_from_table(torch.arange(4)), TypeError,
     "`values` must have a floating dtype"),
    ("shapley_from_table", "type", lambda _: shapley_from_table([0.0, 1.0]), TypeError,
     "`values` must be a torch.Tensor"),
    ("interactions_from_table", "nan",
     lambda _: interactions_from_table(with_value(TABLE, 0, NAN)), ME, "`values`.*NaN"),
    ("interactions_from_table", "shape", lambda _: interactions_from_table(TABLE[:5]), ME,
     "`values`.*power of two"),
    ("interactions_from_table", "dtype", lambda _: interactions_from_table(torch.ones(4).bool()),
     TypeError, "`values`"),
    ("shapley_values", "type", lambda _: shapley_values(3, 3), TypeError, "`value_fn`"),
    ("shapley_values", "range", lambda _: shapley_values(additive, 0), ME, "`num_players`"),
    ("shapley_values", "keys", lambda _: shapley_values(additive, 3, method="kernel"), ME,
     "`method` must be one of"),
    ("shapley_values", "range",
     lambda _: shapley_values(additive, 3, method="permutation", num_permutations=0), ME,
     "`num_permutations` must be >= 1"),
    ("shapley_values", "range",
     lambda _: shapley_values(additive, 3, method="permutation", num_permutations=3), ME,
     "`num_permutations` must be even"),
    ("shapley_values", "type",
     lambda _: shapley_values(additive, 3, method="permutation", generator=1), TypeError,
     "`generator`"),
    ("shapley_values", "range", lambda _: shapley_values(additive, 3, max_exact_players=0), ME,
     "`max_exact_players`"),
    ("shapley_values", "shape", lambda _: shapley_values(additive, 3, modalities=["a"]), ME,
     "`modalities` must name each of the num_players=3"),
    ("shapley_values", "type", lambda _: shapley_values(additive, 2, modalities="ab"), TypeError,
     "`modalities`"),
    ("shapley_values", "keys", lambda _: shapley_values(additive, 2, modalities=["a", "a"]), ME,
     "`modalities` must be distinct"),
    ("shapley_values", "shape", lambda _: shapley_values(lambda c: torch.zeros(3), 3), ME,
     r"`value_fn` must return one value per coalition, shape \(8,\)"),
    ("shapley_values", "nan", lambda _: shapley_values(lambda c: additive(c) * NAN, 3), ME,
     r"`value_fn\(coalitions\)` must contain only finite"),
    ("shapley_values", "inf",
     lambda _: shapley_values(lambda c: additive(c) + INF, 3, method="permutation"), ME,
     r"`value_fn\(coalitions\)` must contain only finite"),
    ("shapley_values", "dtype", lambda _: shapley_values(lambda c: c.sum(1), 3), TypeError,
     r"`value_fn\(coalitions\)` must have a floating dtype"),
    ("ShapleyResult.interval", "range", lambda _: shapley_values(additive, 2).interval(1.5), ME,
     "`level` must be < 1"),
    ("ShapleyResult.interval", "range", lambda _: one_unit_result().interval(), ME,
     "at least two independent.*num_permutations"),
    ("ModalityGame", "type", lambda _: ModalityGame(3, ["a"]), TypeError, "`head`"),
    ("ModalityGame", "type", lambda _: ModalityGame(lin_head(), "text"), TypeError,
     "`modalities`"),
    ("ModalityGame", "empty", lambda _: ModalityGame(lin_head(), []), ME, "`modalities`"),
    ("ModalityGame", "keys", lambda _: ModalityGame(lin_head(), ["a", "a"]), ME,
     "`modalities` must be distinct"),
    ("ModalityGame", "keys", lambda _: game(masking="drop"), ME, "`masking` must be one of"),
    ("ModalityGame", "keys", lambda _: game(value="r2"), ME, "`value` must be one of"),
    ("ModalityGame", "keys", lambda _: game(task="ranking"), ME, "`task` must be one of"),
    ("ModalityGame", "keys", lambda _: game(task="classification", value="neg_mae"), ME,
     "`value='neg_mae'` needs task='regression'"),
    ("ModalityGame", "range", lambda _: game(chunk_size=0), ME, "`chunk_size` must be >= 1"),
    ("ModalityGame", "keys", lambda _: game(masking="learned"), ME, "`masking='learned'` needs"),
    ("ModalityGame", "keys",
     lambda _: game(masking="learned", absent_embeddings={"text": torch.zeros(3)}), ME,
     "`absent_embeddings` must map exactly"),
    ("ModalityGame", "keys", lambda _: game(absent_embeddings={"text": torch.zeros(3)}), ME,
     "`absent_embeddings` is only used with masking='learned'"),
    ("ModalityGame", "type", lambda _: game(modules=[3]), TypeError, "`modules`"),
    ("ModalityGame.__call__", "type", lambda _: game()([FEATS], Y_REG), TypeError, "`features`"),
    ("ModalityGame.__call__", "keys", lambda _: game()({"text": FEATS["text"]}, Y_REG), ME,
     "`features` must have exactly the keys"),
    ("ModalityGame.__call__", "keys",
     lambda _: game()({**FEATS, "video": FEATS["text"]}, Y_REG), ME,
     "`features` must have exactly the keys"),
    ("ModalityGame.__call__", "shape",
     lambda _: game()({**FEATS, "text": FEATS["text"][:, 0]}, Y_REG), ME,
     r"`features\['text'\]` must have shape \(N, D, ...\)"),
    ("ModalityGame.__call__", "shape",
     lambda _: game()({**FEATS, "audio": FEATS["audio"][:4]}, Y_REG), ME,
     r"`features\['audio'\]` has size 4 in dimension 0"),
    ("ModalityGame.__call__", "dtype",
     lambda _: game()({**FEATS, "text": FEATS["text"].long()}, Y_REG), TypeError,
     r"`features\['text'\]` must have a floating dtype"),
    ("ModalityGame.__call__", "nan",
     lambda _: game()({**FEATS, "audio": with_value(FEATS["audio"], (2, 1), NAN)}, Y_REG), ME,
     r"`features\['audio'\]` must contain only finite values, got 1 NaN"),
    ("ModalityGame.__call__", "inf",
     lambda _: game()({**FEATS, "text": with_value(FEATS["text"], (0, 0), INF)}, Y_REG), ME,
     r"`features\['text'\]` must contain only finite.*1 infinite"),
    ("ModalityGame.__call__", "shape", lambda _: game()(FEATS, Y_REG.view(2, 3)), ME,
     r"`target` must have shape \(N,\)"),
    ("ModalityGame.__call__", "shape", lambda _: game()(FEATS, Y_REG[:5]), ME,
     "`target` has size 5"),
    ("ModalityGame.__call__", "empty", lambda _: game()(FEATS, Y_REG[:0]), ME,
     "`target` must not be empty"),
    ("ModalityGame.__call__", "nan", lambda _: game()(FEATS, with_value(Y_REG, 1, NAN)), ME,
     "`target` must contain only finite values, got 1 NaN"),
    ("ModalityGame.__call__", "dtype", lambda _: game()(FEATS, Y_CLS), TypeError,
     r"`target`.*task='classification' for integer class labels or a float target"),
    ("ModalityGame.__call__", "dtype", lambda _: game(task="classification")(FEATS, Y_REG),
     TypeError, r"`target` must hold integer class indices for task='classification'"),
    ("ModalityGame.__call__", "range",
     lambda _: game(task="classification")(FEATS, with_value(Y_CLS, 0, 3)), ME,
     r"`target` must hold class indices in \[0, 2\].*e\.g\. 3"),
    ("ModalityGame.__call__", "range",
     lambda _: game(task="classification", value="accuracy")(FEATS, with_value(Y_CLS, 0, -1)),
     ME, r"`target` must hold class indices in \[0, 2\].*e\.g\. -1"),
    ("ModalityGame.__call__", "nan",
     lambda _: ModalityGame(lambda f, p: f["text"][:, 0] * NAN, list(DIMS))(FEATS, Y_REG), ME,
     r"`head\(features, present\)` must contain only finite values"),
    ("ModalityGame.__call__", "shape",
     lambda _: ModalityGame(lambda f, p: f["text"], list(DIMS))(FEATS, Y_REG), ME,
     r"a regression `head` must return shape \(B,\) or \(B, 1\)"),
    ("ModalityGame.__call__", "shape",
     lambda _: game(masking="learned", absent_embeddings={"text": torch.zeros(4),
                                                          "audio": torch.zeros(2)})(FEATS, Y_REG),
     ME, r"`absent_embeddings\['text'\]` must have shape \(3,\)"),
    ("ModalityGame.coalition_values", "shape",
     lambda _: game().coalition_values(FEATS, Y_REG, torch.ones(4, 3, dtype=torch.bool)), ME,
     r"`coalitions` must have shape \(C, 2\)"),
    ("ModalityGame.coalition_values", "dtype",
     lambda _: game().coalition_values(FEATS, Y_REG, torch.ones(4, 2)), TypeError,
     "`coalitions` must have a bool dtype"),
]
# fmt: on


# ----------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------

P, T = [0.5, -1.0, 2.0], [1.0, 0.0, -2.0]
LOGITS = torch.randn(5, 4, 2, generator=torch.Generator().manual_seed(2))
LABELS4 = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [1, 0, 0, 0]])
XP = torch.randn(10, 3, generator=torch.Generator().manual_seed(3))
YP = torch.randn(10, generator=torch.Generator().manual_seed(4))

METRICS = []
for _fn in (msa_regression_metrics, sims_regression_metrics):
    _n = _fn.__name__
    METRICS += [
        (_n, "shape", lambda _, f=_fn: f(P, T[:2]), ME, "`pred` has 3 element.*`target` has 2"),
        (_n, "nan", lambda _, f=_fn: f([0.5, NAN, 2.0], T), ME, "`pred`.*1 NaN"),
        (_n, "inf", lambda _, f=_fn: f(P, [1.0, INF, 0.0]), ME, "`target`.*1 infinite"),
        (_n, "empty", lambda _, f=_fn: f([], []), ME, "`pred` must not be empty"),
        (_n, "type", lambda _, f=_fn: f("abc", T), TypeError, "`pred`"),
        (_n, "dtype", lambda _, f=_fn: f(np.array(["a", "b", "c"]), T), TypeError, "`pred`"),
    ]
# fmt: off
METRICS += [
    ("iemocap_metrics", "shape", lambda _: iemocap_metrics(LOGITS[:, :3], LABELS4), ME,
     r"`logits` must have shape \(N, 4, 2\) or \(N, 8\)"),
    ("iemocap_metrics", "shape", lambda _: iemocap_metrics(LOGITS, LABELS4[:, :3]), ME,
     r"`labels` must have shape \(N, 4\) or \(N, 4, 2\)"),
    ("iemocap_metrics", "shape", lambda _: iemocap_metrics(LOGITS[:4], LABELS4), ME,
     "`logits` has 4 samples and `labels` has 5"),
    ("iemocap_metrics", "range", lambda _: iemocap_metrics(LOGITS, LABELS4 * 2), ME,
     r"`labels` of shape \(N, 4\) must hold only 0 and 1"),
    ("iemocap_metrics", "nan", lambda _: iemocap_metrics(with_value(LOGITS, (0, 0, 0), NAN),
                                                         LABELS4), ME, "`logits`.*NaN"),
    ("shapley_shares", "nan", lambda _: shapley_shares(torch.tensor([1.0, NAN])), ME,
     "`values` must contain only finite"),
    ("shapley_shares", "inf", lambda _: shapley_shares(torch.tensor([1.0, INF])), ME,
     "`values` must contain only finite"),
    ("shapley_shares", "empty", lambda _: shapley_shares(torch.zeros(0)), ME,
     "`values` must not be empty"),
    ("shapley_shares", "shape", lambda _: shapley_shares(torch.tensor(1.0)), ME,
     r"`values` must have shape \(\.\.\., M\)"),
    ("shapley_shares", "type", lambda _: shapley_shares("ab"), TypeError, "`values`"),
    ("imbalance_index", "shape", lambda _: imbalance_index([1.0]), ME, "`shares`.*M >= 2"),
    ("imbalance_index", "range", lambda _: imbalance_index([1.5, -0.5]), ME,
     "`shares` must be non-negative"),
    ("imbalance_index", "range", lambda _: imbalance_index([0.5, 0.6]), ME,
     "every row of `shares` must sum to 1"),
    ("imbalance_index", "nan", lambda _: imbalance_index([NAN, 1.0]), ME, "`shares`.*finite"),
    ("probe_score", "keys", lambda _: probe_score(XP, YP, XP, YP, task="rank"), ME,
     "`task` must be one of"),
    ("probe_score", "range", lambda _: probe_score(XP, YP, XP, YP, alpha=0.0), ME,
     "`alpha` must be a real number > 0"),
    ("probe_score", "shape", lambda _: probe_score(XP[:, 0], YP, XP, YP), ME,
     r"`train_x` must have shape \(N, D\)"),
    ("probe_score", "shape", lambda _: probe_score(XP, YP, XP[:, :2], YP), ME,
     "`train_x` has 3 features and `test_x` has 2"),
    ("probe_score", "shape", lambda _: probe_score(XP, YP[:9], XP, YP), ME,
     "`train_y` has 9 element"),
    ("probe_score", "nan", lambda _: probe_score(with_value(XP, (0, 0), NAN), YP, XP, YP), ME,
     "`train_x` must contain only finite"),
    ("probe_score", "empty", lambda _: probe_score(XP[:1], YP[:1], XP, YP), ME,
     "`train_x` needs at least 2 samples"),
    ("probe_score", "dtype", lambda _: probe_score(XP, YP, XP, YP, task="classification"), ME,
     "classification probe labels must be integers"),
]
# fmt: on


# ----------------------------------------------------------------------------------------------
# ot
# ----------------------------------------------------------------------------------------------

C = torch.rand(3, 4, generator=torch.Generator().manual_seed(5))
A3, B4 = torch.full((3,), 1 / 3), torch.full((4,), 1 / 4)
PX = torch.randn(4, 8, generator=torch.Generator().manual_seed(6))
PY = torch.randn(4, 8, generator=torch.Generator().manual_seed(7))

# fmt: off
OT = [
    ("sinkhorn", "shape", lambda _: sinkhorn(torch.rand(4)), ME,
     r"`cost` must have shape \(\.\.\., K, L\)"),
    ("sinkhorn", "type", lambda _: sinkhorn([[0.0, 1.0]]), TypeError, "`cost` must be a torch"),
    ("sinkhorn", "empty", lambda _: sinkhorn(torch.rand(0, 3)), ME, "`cost` must not be empty"),
    ("sinkhorn", "dtype", lambda _: sinkhorn(torch.ones(3, 4, dtype=torch.long)), TypeError,
     "`cost` must have a floating dtype"),
    ("sinkhorn", "nan", lambda _: sinkhorn(with_value(C, (0, 1), NAN)), ME,
     "`cost` must contain only finite values, got 1 NaN"),
    ("sinkhorn", "inf", lambda _: sinkhorn(with_value(C, (0, 1), INF)), ME,
     "`cost` must contain only finite.*1 infinite"),
    ("sinkhorn", "range", lambda _: sinkhorn(C * 1e30), ME,
     "`cost` spans .* times `epsilon`"),
    ("sinkhorn", "range", lambda _: sinkhorn(C.half(), epsilon=1e-9), ME,
     "`cost` spans .* times `epsilon`"),
    ("sinkhorn", "shape", lambda _: sinkhorn(C, B4, B4), ME, r"`a` must have shape \(\.\.\., 3\)"),
    ("sinkhorn", "range", lambda _: sinkhorn(C, torch.tensor([1.5, -0.5, 0.0]), B4), ME,
     "`a` must be non-negative"),
    ("sinkhorn", "range", lambda _: sinkhorn(C, A3, torch.ones(4)), ME, "`b` must sum to 1"),
    ("sinkhorn", "nan", lambda _: sinkhorn(C, A3, with_value(B4, 0, NAN)), ME, "`b`"),
    ("sinkhorn", "dtype", lambda _: sinkhorn(C, torch.tensor([1, 0, 0]), B4), TypeError,
     "`a` must have a floating dtype"),
    ("sinkhorn", "range", lambda _: sinkhorn(C, epsilon=0.0), ME, "`epsilon` must be > 0"),
    ("sinkhorn", "nan", lambda _: sinkhorn(C, epsilon=NAN), ME, "`epsilon` must be finite"),
    ("sinkhorn", "range", lambda _: sinkhorn(C, max_iter=0), ME, "`max_iter` must be >= 1"),
    ("sinkhorn", "range", lambda _: sinkhorn(C, tol=0.0), ME, "`tol` must be > 0"),
    ("sinkhorn", "keys", lambda _: sinkhorn(C, grad="implicit"), ME, "`grad` must be one of"),
    ("sinkhorn", "shape", lambda _: sinkhorn(C, init=(torch.zeros(3), torch.zeros(5))), ME,
     r"`init\[1\]` must have shape \(4\)"),
    ("sinkhorn", "nan", lambda _: sinkhorn(C, init=(torch.zeros(3), torch.full((4,), NAN))), ME,
     r"`init\[1\]` must contain only finite"),
    ("sinkhorn", "device", lambda _: sinkhorn(C, A3.to("meta"), B4), ME, "`a`.*device"),
    ("SinkhornAligner", "keys", lambda _: SinkhornAligner(metric="l1"), ME,
     "`metric` must be one of"),
    ("SinkhornAligner", "range", lambda _: SinkhornAligner(epsilon=-1.0), ME,
     "`epsilon` must be > 0"),
    ("SinkhornAligner", "range", lambda _: SinkhornAligner(max_iter=0), ME, "`max_iter`"),
    ("SinkhornAligner", "range", lambda _: SinkhornAligner(structure_weight=-1.0), ME,
     "`structure_weight` must be >= 0"),
    ("SinkhornAligner", "type", lambda _: SinkhornAligner(warm_start="yes"), TypeError,
     "`warm_start` must be a bool"),
    ("SinkhornAligner", "keys", lambda _: SinkhornAligner(gradient_side="z"), ME,
     "`gradient_side` must be one of"),
    ("SinkhornAligner.forward", "shape", lambda _: SinkhornAligner()(PX[0], PY), ME,
     r"`x` must have shape \(\.\.\., K, D\)"),
    ("SinkhornAligner.forward", "shape", lambda _: SinkhornAligner()(PX, PY[:, :5]), ME,
     "`x` and `y` must have the same feature size D"),
    ("SinkhornAligner.forward", "shape", lambda _: SinkhornAligner()(PX, PY[:3]), ME, "K"),
    ("SinkhornAligner.forward", "empty", lambda _: SinkhornAligner()(PX[:0], PY), ME,
     "`x` must not be empty"),
    ("SinkhornAligner.forward", "dtype", lambda _: SinkhornAligner()(PX.long(), PY), TypeError,
     "`x` must have a floating dtype"),
    ("SinkhornAligner.forward", "dtype", lambda _: SinkhornAligner()(PX, PY.double()), ME,
     "`x` and `y` must share dtype and device"),
    ("SinkhornAligner.forward", "device", lambda _: SinkhornAligner()(PX, PY.to("meta")), ME,
     "`x` and `y` must share dtype and device"),
    ("SinkhornAligner.forward", "nan",
     lambda _: SinkhornAligner()(with_value(PX, (1, 1), NAN), PY), ME, "`x`.*finite"),
    ("SinkhornAligner.forward", "range",
     lambda _: SinkhornAligner()(PX, PY, a=torch.tensor([1.0, -1.0, 1.0, 1.0])), ME, "`a`"),
    ("SinkhornAligner.forward", "range", lambda _: SinkhornAligner()(PX, PY, b=torch.zeros(4)),
     ME, "`b` must have positive total weight"),
    ("SinkhornAligner.forward", "shape", lambda _: SinkhornAligner()(PX, PY, a=torch.ones(3)),
     ME, "`a`"),
    ("SinkhornAligner.pairwise", "type", lambda _: SinkhornAligner().pairwise([PX, PY]),
     TypeError, "`prototypes` must be a mapping"),
    ("SinkhornAligner.pairwise", "keys", lambda _: SinkhornAligner().pairwise({"a": PX}), ME,
     "`prototypes` must hold at least 2 modalities"),
    ("SinkhornAligner.pairwise", "shape",
     lambda _: SinkhornAligner().pairwise({"a": PX, "b": PY[:3]}), ME,
     r"same shape \(K, D\)"),
]
# fmt: on


# ----------------------------------------------------------------------------------------------
# prototypes
# ----------------------------------------------------------------------------------------------

H = torch.randn(6, 4, generator=torch.Generator().manual_seed(8))
LAB = torch.tensor([0, 1, 2, 0, 1, 2])

# fmt: off
PROTOTYPES = [
    ("sentiment_classes", "keys", lambda _: sentiment_classes(torch.zeros(3), 4), ME,
     "`num_classes` must be one of"),
    ("sentiment_classes", "dtype", lambda _: sentiment_classes(torch.arange(3)), TypeError,
     "`y` must have a floating dtype"),
    ("sentiment_classes", "nan", lambda _: sentiment_classes(torch.tensor([0.0, NAN])), ME,
     "`y` must contain only finite"),
    ("class_means", "range", lambda _: class_means(H, LAB, 0), ME, "`num_classes` must be >= 1"),
    ("class_means", "shape", lambda _: class_means(H[0], LAB, 3), ME,
     "`features` must have 2 dimensions"),
    ("class_means", "shape", lambda _: class_means(H, LAB[:5], 3), ME,
     "`features` has size 6 in dimension 0.*`labels` has size 5"),
    ("class_means", "dtype", lambda _: class_means(H, LAB.float(), 3), TypeError,
     "`labels` must have a integer dtype"),
    ("class_means", "dtype", lambda _: class_means(H.long(), LAB, 3), TypeError,
     "`features` must have a floating dtype"),
    ("class_means", "shape", lambda _: class_means(H, LAB, 3, torch.ones(5, dtype=torch.bool)),
     ME, r"`mask` must have shape \(6,\)"),
    ("class_means", "dtype", lambda _: class_means(H, LAB, 3, torch.ones(6)), TypeError,
     "`mask` must have a bool dtype"),
    ("class_means", "nan", lambda _: class_means(with_value(H, (2, 0), NAN), LAB, 3), ME,
     "`features` must contain only finite values, got 1 NaN"),
    ("class_means", "inf", lambda _: class_means(with_value(H, (2, 0), INF), LAB, 3), ME,
     "`features` must contain only finite.*1 infinite"),
    ("PrototypeCalibrator", "range", lambda _: PrototypeCalibrator(0, 4), ME, "`num_classes`"),
    ("PrototypeCalibrator", "range", lambda _: PrototypeCalibrator(3, 0), ME, "`dim`"),
    ("PrototypeCalibrator", "range", lambda _: PrototypeCalibrator(3, 4, momentum=1.5), ME,
     "`momentum` must be <= 1"),
    ("PrototypeCalibrator", "keys", lambda _: PrototypeCalibrator(3, 4, metric="l1"), ME,
     "`metric` must be one of"),
    ("PrototypeCalibrator", "range", lambda _: PrototypeCalibrator(3, 4, temperature=0.0), ME,
     "`temperature` must be > 0"),
    ("PrototypeCalibrator", "keys", lambda _: PrototypeCalibrator(7, 4, label_bins=4), ME,
     "`label_bins` must be one of"),
    ("PrototypeCalibrator.forward", "shape", lambda _: PrototypeCalibrator(3, 5)(H, LAB), ME,
     "`features`"),
    ("PrototypeCalibrator.forward", "nan",
     lambda _: PrototypeCalibrator(3, 4)(with_value(H, (0, 0), NAN), LAB), ME,
     "`features` must contain only finite"),
    ("PrototypeCalibrator.forward", "range",
     lambda _: PrototypeCalibrator(3, 4)(H, with_value(LAB, 0, 5)), ME, "`labels`"),
    ("PrototypeCalibrator.forward", "dtype",
     lambda _: PrototypeCalibrator(3, 4)(H, LAB.float()), (TypeError, ME), "`labels`"),
    ("PrototypeCalibrator.forward", "shape",
     lambda _: PrototypeCalibrator(3, 4)(H, LAB, torch.ones(5, dtype=torch.bool)), ME, "`mask`"),
]
# fmt: on


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------

SEQ = torch.ones(3, 4, 2)
VEC = torch.ones(3, 5)
YD = torch.zeros(3)


def mmsa_split(n: int = 3, t: int = 4) -> dict:
    rng = np.random.default_rng(0)
    return {
        "text": rng.uniform(0.5, 1.0, (n, t, 6)).astype(np.float32),
        "audio": rng.uniform(0.5, 1.0, (n, t, 2)).astype(np.float32),
        "vision": rng.uniform(0.5, 1.0, (n, t, 3)).astype(np.float32),
        "regression_labels": np.linspace(-1, 1, n).astype(np.float32),
        "id": np.array([f"v{i}" for i in range(n)]),
    }


def write(tmp, data, name="data.pkl"):
    path = tmp / name
    with open(path, "wb") as f:
        pickle.dump(data, f)
    return path


def mmsa_file(tmp, **change):
    split = {**mmsa_split(), **change}
    split = {k: v for k, v in split.items() if v is not None}
    return write(tmp, {"train": split, "valid": split, "test": split})


def item(x, **extra):
    return {"features": {"a": x}, "mask": {}, "label": torch.tensor(0.0), "id": "i", **extra}


def mult_file(tmp, n=3):
    d = {m: np.ones((n, 4, 2), np.float32) for m in ("text", "audio", "vision")}
    d["labels"] = np.zeros((n, 1, 1), np.float32)
    return write(tmp, {"train": d, "valid": d, "test": d})


# fmt: off
DATA = [
    ("MultimodalDataset", "empty", lambda _: MultimodalDataset({}, YD), ME,
     "`features` must be a non-empty dict"),
    ("MultimodalDataset", "type", lambda _: MultimodalDataset({"a": SEQ}, [0.0, 1.0, 2.0]),
     TypeError, "`labels` must be a torch.Tensor"),
    ("MultimodalDataset", "type", lambda _: MultimodalDataset({"a": SEQ.numpy()}, YD),
     TypeError, r"`features\['a'\]` must be a torch.Tensor"),
    ("MultimodalDataset", "shape", lambda _: MultimodalDataset({"a": SEQ}, torch.zeros(3, 2)),
     ME, "`labels` must be"),
    ("MultimodalDataset", "dtype",
     lambda _: MultimodalDataset({"a": SEQ}, torch.zeros(3, dtype=torch.bool)), ME,
     "`labels` must be"),
    ("MultimodalDataset", "shape", lambda _: MultimodalDataset({"a": SEQ[..., None]}, YD), ME,
     r"`features\['a'\]` must have shape \(N, T, D\).*or \(N, F\)"),
    ("MultimodalDataset", "shape", lambda _: MultimodalDataset({"a": VEC[:2]}, YD), ME,
     r"`features\['a'\]` has 2 samples but `labels` has 3"),
    ("MultimodalDataset", "nan",
     lambda _: MultimodalDataset({"a": with_value(SEQ, (0, 1, 1), NAN)}, YD), ME,
     r"`features\['a'\]` must contain only finite values, got 1 NaN"),
    ("MultimodalDataset", "inf",
     lambda _: MultimodalDataset({"v": with_value(VEC, (2, 0), -INF)}, YD), ME,
     r"`features\['v'\]` must contain only finite.*1 infinite"),
    ("MultimodalDataset", "nan",
     lambda _: MultimodalDataset({"a": SEQ}, with_value(YD, 1, NAN)), ME,
     "`labels` must contain only finite values, got 1 NaN"),
    ("MultimodalDataset", "range",
     lambda _: MultimodalDataset({"a": SEQ}, torch.tensor([0, -2, 1])), ME,
     "`labels` holds integer class indices, which must be >= 0"),
    ("MultimodalDataset", "shape", lambda _: MultimodalDataset({"a": SEQ}, YD, ids=["x"]), ME,
     "`ids` has 1 entries but `labels` has 3"),
    ("MultimodalDataset", "range",
     lambda _: MultimodalDataset({"a": SEQ}, YD, lengths={"a": [5, 1, 1]}), ME,
     r"`lengths\['a'\]` must hold 3 integers in \[0, 4\]"),
    ("MultimodalDataset", "keys",
     lambda _: MultimodalDataset({"a": SEQ}, YD, lengths={"b": [1, 1, 1]}), ME,
     "`lengths` has modalities \\['b'\\] that are not in `features`"),
    ("MultimodalDataset", "keys",
     lambda _: MultimodalDataset({"v": VEC}, YD, lengths={"v": [1, 1, 1]}), ME,
     r"`lengths\['v'\]` was given but `features\['v'\]` is a vector modality"),
    ("MultimodalDataset", "nan",
     lambda _: MultimodalDataset({"a": SEQ}, YD, unimodal_labels={"a": [0.0, NAN, 0.0]}), ME,
     r"`unimodal_labels\['a'\]` must contain only finite"),
    ("MultimodalDataset.__getitem__", "range",
     lambda _: MultimodalDataset({"a": SEQ}, YD)[3], IndexError, "index 3 is out of range"),
    ("collate_multimodal", "empty", lambda _: collate_multimodal([]), ME,
     "`batch` must contain at least one item"),
    ("collate_multimodal", "type", lambda _: collate_multimodal("items"), ME,
     "`batch` must be a list"),
    ("collate_multimodal", "type", lambda _: collate_multimodal([item(SEQ[0]), 3]), ME,
     "item 1 of `batch` must be a dict"),
    ("collate_multimodal", "keys",
     lambda _: collate_multimodal([item(SEQ[0]), {"label": torch.tensor(0.0), "id": "x"}]), ME,
     "item 1 of `batch` has no key 'features'"),
    ("collate_multimodal", "keys",
     lambda _: collate_multimodal([item(SEQ[0]), {"features": {"a": SEQ[1]}, "id": "x"}]), ME,
     "item 1 of `batch` has no key 'label'"),
    ("collate_multimodal", "keys",
     lambda _: collate_multimodal([item(SEQ[0]), {**item(SEQ[1]), "features": {"b": SEQ[1]}}]),
     ME, "item 1 of `batch` has no modality 'a'"),
    ("collate_multimodal", "shape",
     lambda _: collate_multimodal([item(SEQ[0]), item(torch.ones(2, 3))]), ME,
     r"item 1 of `batch`: features\['a'\] has shape \(2, 3\).*\(L, 2\)"),
    ("collate_multimodal", "shape",
     lambda _: collate_multimodal([item(VEC[0]), item(VEC[0, :4])]), ME,
     r"item 1 of `batch`: features\['a'\] has shape \(4,\).*\(5,\)"),
    ("collate_multimodal", "shape",
     lambda _: collate_multimodal([item(SEQ[0]), {**item(SEQ[1]), "label": torch.zeros(2)}]),
     ME, r"'label' of item 1 has shape \(2,\)"),
    ("load_mmsa", "keys", lambda tmp: load_mmsa(tmp / "missing.pkl"), FileNotFoundError,
     "no such file.*missing.pkl"),
    ("load_mmsa", "type", lambda tmp: load_mmsa(tmp), ME, "is a directory"),
    ("load_mmsa", "type",
     lambda tmp: load_mmsa((tmp / "x.pkl").write_bytes(b"not a pickle") and tmp / "x.pkl"), ME,
     "is not a readable pickle file"),
    ("load_mmsa", "keys", lambda tmp: load_mmsa(mmsa_file(tmp), split="dev"), ME,
     "`split` must be one of"),
    ("load_mmsa", "keys", lambda tmp: load_mmsa(write(tmp, {"train": mmsa_split()}),
                                                split="test"), ME, "has no split 'test'"),
    ("load_mmsa", "keys", lambda tmp: load_mmsa(mmsa_file(tmp, audio=None)), ME,
     "split 'train' has no key 'audio'"),
    ("load_mmsa", "keys", lambda tmp: load_mmsa(mmsa_file(tmp), text_key="bert"), ME,
     "`text_key` must be one of"),
    ("load_mmsa", "empty",
     lambda tmp: load_mmsa(mmsa_file(tmp, **{k: v[:0] for k, v in mmsa_split().items()})), ME,
     "split 'train' is empty"),
    ("load_mmsa", "shape", lambda tmp: load_mmsa(mmsa_file(tmp, vision=np.ones((2, 4, 3)))), ME,
     "inconsistent lengths in split 'train': key 'vision' has 2 samples"),
    ("load_mmsa", "shape", lambda tmp: load_mmsa(mmsa_file(tmp, audio=np.ones((3, 4)))), ME,
     "key 'audio' of split 'train' must have 3 dimensions"),
    ("load_mmsa", "nan",
     lambda tmp: load_mmsa(mmsa_file(tmp, regression_labels=np.array([0.0, NAN, 1.0]))), ME,
     "key 'regression_labels' of split 'train' holds 1 non-finite"),
    ("load_mmsa", "dtype",
     lambda tmp: load_mmsa(mmsa_file(tmp, audio=np.full((3, 4, 2), "x"))), ME,
     "key 'audio' of split 'train' must be numeric"),
    ("load_mmsa", "range",
     lambda tmp: load_mmsa(mmsa_file(tmp, audio_lengths=np.array([1, 9, 2]))), ME,
     r"key 'audio_lengths' of split 'train' must lie in \[0, 4\]"),
    ("load_mult", "keys", lambda tmp: load_mult(tmp / "missing.pkl"), FileNotFoundError,
     "no such file"),
    ("load_mult", "empty", lambda tmp: load_mult(mult_file(tmp, n=0)), ME,
     "split 'train' is empty"),
    ("load_mult", "keys",
     lambda tmp: load_mult(write(tmp, {"train": {"text": np.ones((3, 4, 2))}})), ME,
     "split 'train' has no key"),
]
# fmt: on


CASES = CHECKS + SHAPLEY + METRICS + OT + PROTOTYPES + DATA


def _id(case) -> str:
    return f"{case[0]}-{case[1]}"


@pytest.mark.parametrize(("name", "kind", "call", "exc", "match"), CASES, ids=map(_id, CASES))
def test_bad_input_raises_a_clear_error(tmp_path, name, kind, call, exc, match):
    with pytest.raises(exc, match=match):
        call(tmp_path)


def test_every_public_name_of_the_owned_modules_is_covered():
    owned = {
        "value_checks", "coalition_masks", "shapley_from_table", "interactions_from_table",
        "shapley_values", "ModalityGame", "msa_regression_metrics", "sims_regression_metrics",
        "iemocap_metrics", "shapley_shares", "imbalance_index", "probe_score", "sinkhorn",
        "SinkhornAligner", "sentiment_classes", "class_means", "PrototypeCalibrator",
        "MultimodalDataset", "collate_multimodal", "load_mmsa", "load_mult",
    }  # fmt: skip
    assert owned <= set(modbalance.__all__)
    covered = {case[0].split(".")[0] for case in CASES}
    assert owned <= covered, sorted(owned - covered)
    kinds = {case[1] for case in CASES}
    assert {"shape", "nan", "inf", "empty", "dtype", "range", "device", "keys"} <= kinds


# ----------------------------------------------------------------------------------------------
# modality names: an ordered collection, never a set or a bare string
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "names", [{"text", "audio"}, frozenset({"text", "audio"})], ids=["set", "frozenset"]
)
def test_modality_names_refuse_an_unordered_set(names):
    from modbalance import ShapleyEquilibrium
    from modbalance._checks import check_modality_names

    pattern = (
        r"`modalities` must be an ordered collection of modality names \(a list or tuple\), got "
        r"a (frozen)?set .*order matters because per-modality state is stored by position.*"
        r"Pass a list or tuple"
    )
    with pytest.raises(TypeError, match=pattern):
        check_modality_names(names)
    # the public components that take modality names refuse it the same way
    with pytest.raises(TypeError, match="order matters"):
        ModalityGame(lin_head(), names)
    with pytest.raises(TypeError, match="order matters"):
        ShapleyEquilibrium(names)


def test_modality_names_refuse_a_bare_string():
    from modbalance._checks import check_modality_names

    with pytest.raises(
        TypeError,
        match=r"single string 'text'; a string would be split into its letters.*\['text'\]",
    ):
        check_modality_names("text")
    with pytest.raises(TypeError, match="split into its letters"):
        ModalityGame(lin_head(), "text")


def test_modality_names_accept_ordered_collections():
    from modbalance._checks import check_modality_names

    assert check_modality_names(["text", "audio"]) == ("text", "audio")
    assert check_modality_names(("audio", "text")) == ("audio", "text")
    assert check_modality_names({"text": 1, "audio": 2}) == ("text", "audio")
    assert check_modality_names({"text": 1, "audio": 2}.keys()) == ("text", "audio")
    assert check_modality_names(m for m in ("vision", "text")) == ("vision", "text")


# ----------------------------------------------------------------------------------------------
# round three: data, labels and metrics
# ----------------------------------------------------------------------------------------------

N3 = 4
LOGITS3 = torch.randn(N3, 3, generator=torch.Generator().manual_seed(3))
FRACTIONAL = torch.tensor([0.0, 1.5, 2.0, 0.7])


def step_out(target: torch.Tensor, task: str = "regression") -> Any:
    """A StepOutput over modalities 'text' and 'audio' (regression heads or 3 logits)."""
    from modbalance.balancing import StepOutput

    g = torch.Generator().manual_seed(0)
    width = 3 if task == "classification" else None
    shape = (N3, width) if width else (N3,)
    return StepOutput(
        features={m: torch.randn(N3, 2, generator=g) for m in ("text", "audio")},
        unimodal={m: torch.randn(*shape, generator=g) for m in ("text", "audio")},
        fused=torch.randn(*shape, generator=g),
        present={m: torch.ones(N3, dtype=torch.bool) for m in ("text", "audio")},
        target=target,
        task=task,
    )


# 1. fractional float class labels are refused, never truncated by `.long()`


def test_task_loss_refuses_a_float_class_target_instead_of_truncating_it():
    from modbalance.balancing import task_loss

    with pytest.raises(
        TypeError,
        match=r"`target` must hold integer class indices for task='classification', got dtype "
        r"torch\.float32: task_loss does not truncate.*`target\.long\(\)` after checking",
    ):
        task_loss(LOGITS3, FRACTIONAL, "classification")
    # whole-valued floats too: the dtype check never reads the values (no host sync)
    with pytest.raises(TypeError, match="integer class indices"):
        task_loss(LOGITS3, torch.tensor([0.0, 1.0, 2.0, 0.0]), "classification")
    ints = torch.tensor([0, 1, 2, 0])
    want = nn.functional.cross_entropy(LOGITS3, ints)
    torch.testing.assert_close(task_loss(LOGITS3, ints, "classification"), want)
    torch.testing.assert_close(task_loss(LOGITS3, ints.int(), "classification"), want)


def test_methods_refuse_a_float_class_target():
    from modbalance.methods import UnimodalLoss
    from modbalance.methods.agm import AGM
    from modbalance.methods.cggm import unimodal_accuracy
    from modbalance.methods.inforeg import InfoReg

    out = step_out(FRACTIONAL, "classification")
    with pytest.raises(TypeError, match="`target` must hold integer class indices"):
        UnimodalLoss(["text", "audio"]).losses(out, {})
    with pytest.raises(TypeError, match="`target` must hold integer class indices"):
        modbalance.ShapleyEquilibrium(["text", "audio"]).losses(out, {})
    head = nn.Linear(4, 3)
    agm = AGM(["text", "audio"], head=lambda f, p: head(torch.cat([f["text"], f["audio"]], 1)))
    with pytest.raises(TypeError, match=r"`out\.target` must hold integer class indices.*never "
                       r"truncated"):  # fmt: skip
        agm.losses(out, {"task": torch.tensor(0.0)})
    assert int(agm.iteration) == 0  # refused before any state changed
    with pytest.raises(TypeError, match="`target` must hold integer class indices"):
        unimodal_accuracy(LOGITS3, FRACTIONAL, "classification")
    reg = InfoReg({"text": nn.Linear(2, 2), "audio": nn.Linear(2, 2)})
    with pytest.raises(TypeError, match=r"`out\.target` must hold integer class indices"):
        reg.losses(out, {})


def test_probe_score_refuses_fractional_class_labels_naming_the_argument():
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 0, 1, 0, 1])
    with pytest.raises(
        ME, match=r"`test_y`: classification probe labels must be integers .*1 fractional "
        r"value\(s\), e\.g\. 0\.5; pass integer class indices, or task='regression'"
    ):  # fmt: skip
        probe_score(x, y, x[:3], torch.tensor([0.5, 1.0, 0.0]), task="classification")


# 2. undefined metrics stay NaN, with one warning that says which and why


def test_msa_metrics_warn_once_when_every_label_is_zero():
    with pytest.warns(UserWarning) as record:
        m = msa_regression_metrics([0.5, 1.0, -1.0], [0.0, 0.0, 0.0])
    assert len(record) == 1
    assert str(record[0].message) == (
        "msa_regression_metrics: Non0_acc_2, Non0_F1_score, Corr undefined, returned as NaN: "
        "every label is 0 (the Non0 metrics drop zero labels, so no sample is left); Corr needs "
        "variance in both inputs, but the labels are constant."
    )
    assert all(np.isnan(m[k]) for k in ("Non0_acc_2", "Non0_F1_score", "Corr"))
    assert m["Has0_acc_2"] == round(2 / 3, 4)


def test_msa_and_sims_metrics_warn_about_constant_predictions():
    with pytest.warns(UserWarning, match=r"msa_regression_metrics: Corr undefined.*predictions "
                      r"are constant"):  # fmt: skip
        m = msa_regression_metrics([1.0, 1.0, 1.0], [0.5, -1.0, 2.0])
    assert np.isnan(m["Corr"]) and m["Non0_acc_2"] == round(2 / 3, 4)
    clipped = r"sims_regression_metrics: Corr undefined, returned as NaN: .*the predictions are "
    with pytest.warns(UserWarning, match=clipped + r"constant after clipping to \[-1, 1\]"):
        m = sims_regression_metrics([1.5, 2.0, 3.0], [0.5, -1.0, 0.2])
    assert np.isnan(m["Corr"])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a defined result warns about nothing
        msa_regression_metrics([0.5, -1.0, 2.0], [0.4, -0.9, 1.0])
        sims_regression_metrics([0.5, -1.0, 0.2], [0.4, -0.9, 0.0])


def test_example_metrics_survive_an_all_zero_validation_split():
    from examples.pase.loop import error_of, metrics_of

    with pytest.warns(UserWarning, match="every label is 0"):
        m = metrics_of(torch.tensor([0.2, -0.1, 0.4]), torch.zeros(3), "regression")
    assert np.isnan(m["Non0_acc_2"]) and error_of(m) == pytest.approx(0.2333, abs=1e-4)


# 3. shape mistakes name the target / labels argument, not the presence mask


def test_n_by_1_regression_target_is_blamed_on_the_target():
    from modbalance.balancing import task_loss
    from modbalance.methods import UnimodalLoss

    col = torch.zeros(N3, 1)
    pattern = (
        r"a regression `target` must have shape \(N,\) = \(4,\), got \(4, 1\): pass "
        r"`target\.view\(-1\)`"
    )
    with pytest.raises(ME, match=pattern):
        task_loss(torch.zeros(N3), col, "regression")
    with pytest.raises(ME, match=pattern):  # was: "the presence mask must have shape (4, 4)"
        UnimodalLoss(["text", "audio"]).losses(step_out(col), {})
    with pytest.raises(ME, match=pattern):
        modbalance.ShapleyEquilibrium(["text", "audio"]).losses(step_out(col), {})
    # (N, 1) *predictions* stay accepted, as documented
    assert float(task_loss(torch.ones(N3, 1), torch.zeros(N3), "regression")) == 1.0
    # ModalityGame documents and accepts an (N, 1) target: the same game as with (N,)
    a = game()(FEATS, Y_REG[:, None]).shapley
    torch.testing.assert_close(a, game()(FEATS, Y_REG).shapley)


@pytest.mark.parametrize(
    ("pred", "target", "task", "match"),
    [
        (torch.zeros(5), torch.zeros(4), "regression",
         r"a regression `target` must have shape \(N,\) with one value per prediction, got "
         r"`target` of shape \(4,\) for `pred` of shape \(5,\)"),
        (LOGITS3, torch.zeros(N3), "regression",
         r"a regression `pred` must have shape \(N,\) or \(N, 1\), got \(4, 3\); for 3-class "
         r"logits pass task='classification'"),
        (torch.zeros(N3), torch.zeros(N3, dtype=torch.long), "classification",
         r"a classification `pred` must be \(N, C\) logits, got shape \(4,\); .*"
         r"task='regression'"),
        (LOGITS3, torch.zeros(3, dtype=torch.long), "classification",
         r"a classification `target` must have shape \(N,\) with one class index per row of "
         r"`pred`, got `target` of shape \(3,\)"),
        (LOGITS3, torch.eye(3, dtype=torch.long)[[0, 1, 2, 0]], "classification",
         r"a classification `target` must have shape \(N,\) = \(4,\) of class indices, got "
         r"\(4, 3\); for one-hot labels pass `target\.argmax\(-1\)`"),
        (LOGITS3, torch.zeros(N3, 1, dtype=torch.long), "classification",
         r"got \(4, 1\); pass `target\.view\(-1\)`"),
    ],
    ids=["reg-length", "reg-logits", "cls-1d-pred", "cls-length", "cls-one-hot", "cls-column"],
)  # fmt: skip
def test_task_loss_shape_mistakes_are_clear_errors(pred, target, task, match):
    from modbalance.balancing import task_loss

    with pytest.raises(ME, match=match):
        task_loss(pred, target, task)


def test_metric_and_data_shape_mistakes_name_the_argument():
    with pytest.raises(ME, match=r"`pred` must hold one regression value per sample, shape "
                       r"\(N,\) \(or \(N, 1\)\), got shape \(4, 3\) beside 4 values"):  # fmt: skip
        msa_regression_metrics(LOGITS3, torch.zeros(N3))
    # every shape with N elements stays accepted, as documented (a (1, N) row, (N, 1, 1))
    assert msa_regression_metrics(Y_REG[None], Y_REG[:, None, None])["MAE"] == 0.0
    with pytest.raises(ME, match=r"`target` must hold one regression value per sample"):
        sims_regression_metrics(torch.zeros(N3), LOGITS3)
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    onehot = torch.eye(2)[[0, 1, 0, 1, 0, 1]]
    with pytest.raises(ME, match=r"`train_y` must have shape \(N,\) \(or \(N, 1\)\), one target "
                       r"per sample, got shape \(6, 2\); for one-hot labels pass "
                       r"`train_y\.argmax\(-1\)`"):  # fmt: skip
        probe_score(x, onehot, x, onehot, task="classification")
    with pytest.raises(ME, match=r"`labels` must be .*got shape \(3, 1\).*; for one label per "
                       r"sample pass `labels\.view\(-1\)`"):  # fmt: skip
        MultimodalDataset({"a": SEQ}, torch.zeros(3, 1))


# 4. the example's --data reader on a directory


def test_example_detect_format_on_a_directory_is_one_clear_line(tmp_path):
    from examples.pase.data import DataError, detect_format

    with pytest.raises(DataError, match=r"is a directory, expected a \.pkl file") as info:
        detect_format(tmp_path)
    assert "\n" not in str(info.value) and str(tmp_path) in str(info.value)


# 5. options that would be silently ignored, or would train nothing


def test_example_refuses_synthetic_options_with_a_file_and_a_zero_step_cap(tmp_path, capsys):
    import re

    from examples import pase_mosi
    from examples.pase import TrainConfig, build_datasets
    from examples.pase.data import DataError

    data = tmp_path / "aligned_50.pkl"
    data.write_bytes(b"")
    for argv, match in [
        (["--data", str(data), "--n-train", "100"],
         r"argument --n-train: --n-train 100 only shapes the synthetic data, but --data .* is "
         r"given; drop --n-train"),
        (["--max-steps-per-epoch", "0"], r"argument --max-steps-per-epoch: must be an integer "
         r">= 1 .*got 0"),
    ]:  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            pase_mosi.parse_args(argv)  # checked before any data is read or model built
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert re.search(match, err.strip().splitlines()[-1]), err  # the message is one line
        assert "Traceback" not in err
    # the same mistakes made through the example's Python API
    with pytest.raises(DataError, match=r"synthetic-data options \['n_train'\] only shape the "
                       r"synthetic data .*drop them"):  # fmt: skip
        build_datasets(data, synthetic={"n_train": 100})
    with pytest.raises(ValueError, match=r"`max_steps_per_epoch` must be None \(whole epochs\) "
                       r"or an integer >= 1, got 0: a cap of 0 would train nothing"):  # fmt: skip
        TrainConfig(max_steps_per_epoch=0)


# ----------------------------------------------------------------------------------------------
# state that knows its modalities; silent no-ops refused
# ----------------------------------------------------------------------------------------------
# State knows its modalities: names stored with the state, mismatches and poisoned values refused.
#
# Every registered method (and the model's per-modality modules) is built twice, with the same
# modalities in two orders and with other names. Input dimensions are equal so that every tensor
# has the same shape in both builds: without the stored names the state would load silently and
# swap the per-modality values.


ORDER = ("text", "audio", "vision")
SWAPPED = ("audio", "text", "vision")
OTHER = ("text", "audio", "pose")


def _parts(names, method, **switches):
    cfg = PaSEConfig(
        modalities=names, input_dims=dict.fromkeys(names, 6), dim=8, heads=2, **switches
    )
    torch.manual_seed(0)
    return build(cfg, methods=[method])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_state_refuses_other_order_and_other_names(method):
    saved = _parts(ORDER, method)
    state = saved.methods[0].state_dict()
    assert _decode(state["_extra_state"], "", "")["modalities"] == list(ORDER)
    for names, word in ((SWAPPED, "swap them"), (OTHER, "give them to other names")):
        target = _parts(names, method).methods[0]
        before = {k: v.clone() for k, v in target.state_dict().items() if torch.is_tensor(v)}
        with pytest.raises(ModbalanceError, match=rf"saved with modalities .*{word}"):
            target.load_state_dict(state)
        after = target.state_dict()
        for k, v in before.items():  # refused before anything was copied
            torch.testing.assert_close(after[k], v, rtol=0, atol=0, equal_nan=True, msg=k)
    same = _parts(ORDER, method).methods[0]
    same.load_state_dict(state)
    for k, v in state.items():
        if torch.is_tensor(v):
            torch.testing.assert_close(same.state_dict()[k], v, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("switches", [{}, PAPER_SWITCHES], ids=["default", "paper"])
def test_model_state_refuses_swapped_modalities(switches):
    saved = _parts(ORDER, "sge", **switches).model.state_dict()
    assert any(k.endswith("_extra_state") for k in saved)
    target = _parts(SWAPPED, "sge", **switches).model
    with pytest.raises(ModbalanceError, match=r"saved with modalities \['text', 'audio'"):
        target.load_state_dict(saved)
    _parts(ORDER, "sge", **switches).model.load_state_dict(saved)  # same names and order


def test_state_saved_without_names_still_loads():
    eq = ShapleyEquilibrium(ORDER)
    with torch.no_grad():
        eq.shares.copy_(torch.tensor([0.5, 0.3, 0.2]))
    state = eq.state_dict()
    del state["_extra_state"]
    fresh = ShapleyEquilibrium(ORDER)
    fresh.load_state_dict(state)  # strict: the missing names are not an error
    assert torch.equal(fresh.shares, torch.tensor([0.5, 0.3, 0.2]))


def _modulator(names=ORDER):
    groups = {m: [torch.nn.Parameter(torch.zeros(2))] for m in names}
    return ShapleyGradModulator(groups)


@pytest.mark.parametrize(
    ("make", "buffer", "value", "pattern"),
    [
        (_modulator, "coefficients", NAN, "`coefficients` holds NaN"),
        (_modulator, "coefficients", -0.5, r"`coefficients` must be >= 0"),
        (lambda: ShapleyEquilibrium(ORDER), "shares", INF, "`shares` holds NaN or inf"),
        (lambda: ShapleyEquilibrium(ORDER), "unimodal_loss", -1.0, "`unimodal_loss` must be"),
        (lambda: UnimodalLoss(ORDER), "coefficients", -1.0, "`coefficients` must be >= 0"),
        (
            lambda: Decision(ORDER, "regression", rule="precision"),
            "sq_error",
            0.0,
            r"`sq_error` must be > 0",
        ),
        (
            lambda: Decision(ORDER, "classification", rule="stack", num_outputs=3),
            "logits",
            NAN,
            "`logits` holds NaN",
        ),
    ],
)
def test_poisoned_state_is_refused_before_loading(make, buffer, value, pattern):
    module = make()
    state = module.state_dict()
    state[buffer] = state[buffer].clone()
    state[buffer][0] = value
    before = module.state_dict()[buffer].clone()
    with pytest.raises(ModbalanceError, match=pattern):
        module.load_state_dict(state)
    assert torch.equal(module.state_dict()[buffer], before)


def test_fusion_state_refuses_other_names():
    fusion = PrototypeGatedFusion(ORDER, dim=4)
    other = PrototypeGatedFusion(OTHER, dim=4)
    with pytest.raises(ModbalanceError, match="modalities=\\['text', 'audio', 'vision'\\]"):
        other.load_state_dict(fusion.state_dict())


def test_extra_state_of_another_kind_is_refused():
    eq = ShapleyEquilibrium(ORDER)
    state = eq.state_dict()
    for bad in (
        ["text", "audio", "vision"],
        torch.tensor([1.0, 2.0]),
        torch.tensor([91], dtype=torch.uint8),
    ):
        state["_extra_state"] = bad
        with pytest.raises(ModbalanceError, match="`_extra_state` is not what this module saved"):
            eq.load_state_dict(state)


def test_every_entry_of_a_state_dict_stays_a_tensor():
    """The common snapshot idiom keeps working, and ``weights_only`` loading reads the names."""
    import io

    model = _parts(ORDER, "ogm-ge").model
    snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
    buffer = io.BytesIO()
    torch.save(snapshot, buffer)
    buffer.seek(0)
    _parts(ORDER, "ogm-ge").model.load_state_dict(torch.load(buffer, weights_only=True))


def test_game_state_knows_its_modalities():
    head = torch.nn.Linear(4, 1)
    game = ModalityGame(head, ORDER)
    state = game.state_dict()
    assert state["modalities"] == list(ORDER)
    with pytest.raises(ModbalanceError, match="saved with modalities"):
        ModalityGame(head, SWAPPED).load_state_dict(state)
    old = {"generator": state["generator"]}  # saved before the names were stored
    ModalityGame(head, SWAPPED).load_state_dict(old)


def test_generator_state_travels_with_the_method():
    """OGM-GE's noise generator is part of its state: a resumed run draws the same noise."""
    from modbalance import OGMGEModulator

    def make():
        groups = {m: [torch.nn.Parameter(torch.zeros(2))] for m in ORDER}
        return OGMGEModulator(groups, generator=torch.Generator().manual_seed(3))

    a = make()
    a._generator.manual_seed(11)
    state = a.state_dict()
    expected = torch.randn(4, generator=a._generator)
    b = make()
    b.load_state_dict(state)
    assert torch.equal(torch.randn(4, generator=b._generator), expected)


# ----------------------------------------------------------------------------------------------
# silent no-ops: an optimizer that does not hold the groups, MMPareto under a plain backward
# ----------------------------------------------------------------------------------------------


def _encoders():
    torch.manual_seed(0)
    return torch.nn.ModuleDict({m: torch.nn.Linear(3, 2) for m in ("text", "audio")})


def _step_output(enc, phase=2):
    from modbalance import StepOutput

    x, y = torch.randn(6, 3), torch.tensor([0, 1, 0, 1, 1, 0])
    feats = {m: enc[m](x) for m in enc}
    return StepOutput(
        features=feats,
        unimodal=feats,
        fused=sum(feats.values()),
        present={m: torch.ones(6, dtype=torch.bool) for m in enc},
        target=y,
        task="classification",
        phase=phase,
    )


@pytest.mark.parametrize("apply", ["update", "grad"])
def test_modulator_refuses_an_optimizer_without_its_groups(apply):
    enc = _encoders()
    mod = ShapleyGradModulator(dict(enc), apply=apply)
    elsewhere = torch.optim.SGD(enc["text"].parameters(), lr=0.1)  # no 'audio' parameter
    _step_output(enc).fused.sum().backward()
    with pytest.raises(ModbalanceError, match="optimizer updates no parameter of the 'audio'"):
        mod.step(elsewhere)
    with pytest.raises(ModbalanceError, match="optimizer updates no parameter of the 'audio'"):
        mod.attach(elsewhere)
    assert mod._handle is None  # nothing was registered
    mod.step(torch.optim.SGD(enc.parameters(), lr=0.1))  # the right optimizer works


def test_cggm_and_inforeg_refuse_an_optimizer_without_their_groups():
    from modbalance import CGGM, InfoReg

    enc = _encoders()
    elsewhere = torch.optim.SGD(enc["audio"].parameters(), lr=0.1)
    cggm = CGGM(dict(enc), {m: torch.nn.Linear(2, 2) for m in enc}, lam=0.0)
    out = _step_output(enc)
    cggm.losses(out, {})
    with pytest.raises(
        ModbalanceError, match="CGGM: the optimizer updates no parameter of the 'text'"
    ):
        with cggm.around_step(out, elsewhere):
            pass
    reg = InfoReg(dict(enc))
    out = _step_output(enc)
    reg.losses(out, {})
    out.fused.sum().backward()
    with pytest.raises(ModbalanceError, match="InfoReg: the optimizer updates no parameter"):
        with reg.around_step(out, elsewhere):
            pass


def test_a_frozen_group_is_not_an_error():
    enc = _encoders()
    for p in enc["audio"].parameters():
        p.requires_grad_(False)
    mod = ShapleyGradModulator(dict(enc))
    _step_output(enc).fused.sum().backward()
    mod.step(torch.optim.SGD(enc["text"].parameters(), lr=0.1))  # audio is frozen: nothing lost


def test_mmpareto_refuses_a_plain_backward():
    from modbalance import MMPareto, balanced_step, combine_losses

    enc = _encoders()
    method = MMPareto(dict(enc))
    opt = torch.optim.SGD(enc.parameters(), lr=0.1)
    out = _step_output(enc)
    losses = method.losses(out, {"task": torch.nn.functional.cross_entropy(out.fused, out.target)})
    combine_losses(losses).backward()  # the plain backward: MMPareto never sees the gradients
    with pytest.raises(ModbalanceError, match=r"MMPareto.backward\(\) did not run .*balanced_step"):
        with method.around_step(out, opt):
            opt.step()
    out = _step_output(enc)
    task = torch.nn.functional.cross_entropy(out.fused, out.target)
    terms = balanced_step(out, {"task": task}, [method], opt)  # the method's own backward: fine
    assert "unimodal_audio" in terms
    out = _step_output(enc, phase=1)  # outside its phases MMPareto does nothing, by design
    with method.around_step(out, opt):
        pass
