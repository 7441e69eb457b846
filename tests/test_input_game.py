"""Tests for modbalance.shapley.InputMaskingGame: masking inputs and running the whole model."""

from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

# ------------------------------------------------------------------------------------------
# obviously-correct references, written out by hand
# ------------------------------------------------------------------------------------------
from _reference import brute_force_shapley
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import modbalance
from modbalance._checks import ModbalanceError
from modbalance.methods.equilibrium import ShapleyEquilibrium
from modbalance.methods.modulators import ShapleyGradModulator
from modbalance.shapley import (
    GameResult,
    InputMaskingGame,
    ModalityGame,
    coalition_masks,
    shapley_values,
)


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Batch mean per position, over the samples whose mask is set there (loops, no tricks)."""
    if mask is None:
        return x.mean(0)
    out = torch.zeros_like(x[0])
    for idx in itertools.product(*(range(s) for s in mask.shape[1:])):
        rows = [i for i in range(x.shape[0]) if bool(mask[(i, *idx)])]
        if rows:
            out[idx] = torch.stack([x[(i, *idx)] for i in rows]).mean(0)
    return out


@torch.no_grad()
def brute_force_table(
    model, names, inputs, target, *, masking, value="neg_loss", task="regression",
    baseline=None, masks=None, mask_absent=False,
):  # fmt: skip
    """Build every coalition's inputs by hand, run the model once per coalition, score it."""
    m = len(names)
    table = []
    for code in range(2**m):
        x_s, masks_s = {}, None if masks is None else {}
        for j, name in enumerate(names):
            x = inputs[name]
            present = bool((code >> j) & 1)
            if present:
                x_s[name] = x
            elif masking == "zero":
                x_s[name] = torch.zeros_like(x)
            elif masking == "mean":
                mk = None if masks is None else masks.get(name)
                x_s[name] = masked_mean(x, mk).unsqueeze(0).expand_as(x)
            else:
                x_s[name] = baseline[name].to(x.dtype).expand_as(x)
            if masks is not None and name in masks:
                masks_s[name] = masks[name] if present or not mask_absent else masks[name] * 0
        out = model(x_s) if masks is None else model(x_s, masks_s)
        if task == "regression":
            pred = out.reshape(-1).double()
            y = target.double()
            if value == "neg_loss":
                table.append(-((pred - y) ** 2).mean())
            elif value == "neg_mae":
                table.append(-(pred - y).abs().mean())
            else:
                nz = y != 0
                table.append(((pred > 0) == (y > 0))[nz].double().mean())
        elif value == "neg_loss":
            table.append(-F.cross_entropy(out.double(), target))
        else:
            table.append((out.argmax(1) == target).double().mean())
    return torch.stack(table)


# ------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------


class AdditiveModel(nn.Module):
    """pred = sum_m w_m * mean(x_m): an early-fusion model with no feature-level head."""

    def __init__(self, weights):
        super().__init__()
        self.weights = dict(weights)

    def forward(self, inputs):
        return sum(w * inputs[m].flatten(1).mean(1) for m, w in self.weights.items())


class MaskedNonlinearModel(nn.Module):
    """A small nonlinear model with masked pooling over time (MulT-like inputs, no head)."""

    def __init__(self, dims, classes=0):
        super().__init__()
        self.proj = nn.ModuleDict({m: nn.Linear(d, 4) for m, d in dims.items()})
        self.out = nn.Linear(4 * len(dims), classes or 1)
        self.classes = classes

    def forward(self, inputs, masks=None):
        pooled = []
        for m, proj in self.proj.items():
            h = torch.tanh(proj(inputs[m]))  # (B, T, 4)
            if masks is not None and m in masks:
                w = masks[m].to(h.dtype).unsqueeze(-1)
                h = (h * w).sum(1) / w.sum(1).clamp_min(1.0)
            else:
                h = h.mean(1)
            pooled.append(h)
        out = self.out(torch.cat(pooled, 1))
        return out if self.classes else out[:, 0]


def seq_inputs(n=6, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "text": torch.randn(n, 5, 3, generator=g, dtype=dtype) + 1.0,
        "audio": torch.randn(n, 4, 2, generator=g, dtype=dtype) * 2.0,
        "vision": torch.randn(n, 3, 4, generator=g, dtype=dtype) - 0.5,
    }
    masks = {
        "text": torch.arange(5).unsqueeze(0) < torch.tensor([5, 3, 1, 4, 2, 5])[:n].unsqueeze(1),
        "audio": torch.arange(4).unsqueeze(0) < torch.tensor([4, 1, 2, 4, 3, 2])[:n].unsqueeze(1),
    }
    return inputs, masks


NAMES = ["text", "audio", "vision"]
DIMS = {"text": 3, "audio": 2, "vision": 4}


# ------------------------------------------------------------------------------------------
# closed form and brute force
# ------------------------------------------------------------------------------------------


def test_additive_model_closed_form_and_brute_force():
    # pred = sum_m a_m with a_m = w_m * mean(x_m); zero masking removes a_m exactly, so
    # v(S) = -E[(y - sum_{m in S} a_m)^2] is quadratic in the players and its Shapley value is
    # phi_m = E[a_m (2 y - A)], A = sum_k a_k (pairwise terms split equally).
    inputs, _ = seq_inputs(n=6)
    y = torch.randn(6, dtype=torch.float64)
    weights = {"text": 1.5, "audio": -0.7, "vision": 0.3}
    model = AdditiveModel(weights)
    res = InputMaskingGame(model, NAMES, masking="zero")(inputs, y)
    a = torch.stack([w * inputs[m].flatten(1).mean(1) for m, w in weights.items()])  # (M, N)
    closed = (a * (2 * y - a.sum(0))).mean(1)
    torch.testing.assert_close(res.shapley, closed)
    ref = brute_force_table(model, NAMES, inputs, y, masking="zero")
    torch.testing.assert_close(res.table, ref)
    torch.testing.assert_close(res.shapley, brute_force_shapley(ref))
    assert isinstance(res, GameResult) and res.modalities == tuple(NAMES)
    assert res.table.dtype == torch.float64 and res.interactions.shape == (3, 3)


@pytest.mark.parametrize("masking", ["zero", "mean", "baseline"])
@pytest.mark.parametrize("value", ["neg_loss", "neg_mae", "accuracy"])
@pytest.mark.parametrize("with_masks", [False, True])
def test_matches_brute_force_regression(masking, value, with_masks):
    inputs, masks = seq_inputs()
    masks = masks if with_masks else None
    y = torch.randn(6, dtype=torch.float64)
    model = MaskedNonlinearModel(DIMS).double()
    baseline = None
    if masking == "baseline":
        baseline = {m: torch.randn(inputs[m].shape[1:], dtype=torch.float64) for m in NAMES}
    game = InputMaskingGame(model, NAMES, masking=masking, value=value, baseline=baseline)
    res = game(inputs, y, masks)
    ref = brute_force_table(
        model, NAMES, inputs, y, masking=masking, value=value, baseline=baseline, masks=masks
    )
    torch.testing.assert_close(res.table, ref)
    torch.testing.assert_close(res.shapley, brute_force_shapley(ref))


@pytest.mark.parametrize("value", ["neg_loss", "accuracy"])
@pytest.mark.parametrize("mask_absent", [False, True])
def test_matches_brute_force_classification(value, mask_absent):
    inputs, masks = seq_inputs()
    y = torch.tensor([0, 2, 1, 1, 0, 2])
    model = MaskedNonlinearModel(DIMS, classes=3).double()
    game = InputMaskingGame(
        model, NAMES, masking="mean", value=value, task="classification", mask_absent=mask_absent
    )
    res = game(inputs, y, masks)
    ref = brute_force_table(
        model, NAMES, inputs, y, masking="mean", value=value, task="classification",
        masks=masks, mask_absent=mask_absent,
    )  # fmt: skip
    torch.testing.assert_close(res.table, ref)


# ------------------------------------------------------------------------------------------
# axioms (hypothesis)
# ------------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(1, 7),
    masking=st.sampled_from(["zero", "mean", "baseline"]),
    value=st.sampled_from(["neg_loss", "neg_mae", "accuracy"]),
)
def test_efficiency(seed, n, masking, value):
    torch.manual_seed(seed)
    inputs = {m: torch.randn(n, 3, d, dtype=torch.float64) for m, d in DIMS.items()}
    y = torch.randn(n, dtype=torch.float64)
    model = MaskedNonlinearModel(DIMS).double()
    baseline = {m: torch.randn(3, d, dtype=torch.float64) for m, d in DIMS.items()}
    game = InputMaskingGame(
        model, NAMES, masking=masking, value=value,
        baseline=baseline if masking == "baseline" else None,
    )  # fmt: skip
    res = game(inputs, y)
    # v(full) and v(empty) computed directly from the model
    ref = brute_force_table(model, NAMES, inputs, y, masking=masking, value=value,
                            baseline=baseline)  # fmt: skip
    full, empty = ref[-1], ref[0]
    torch.testing.assert_close(res.shapley.sum(), full - empty)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(1, 7),
    w=st.floats(-3.0, 3.0, allow_nan=False),
    masking=st.sampled_from(["zero", "mean", "baseline"]),
    value=st.sampled_from(["neg_loss", "neg_mae"]),
)
def test_symmetry_and_null_player(seed, n, w, masking, value):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 2, generator=g, dtype=torch.float64)
    inputs = {
        "a": x,
        "b": x.clone(),  # identical to "a"
        "c": torch.randn(n, 3, generator=g, dtype=torch.float64),  # ignored by the model
    }
    y = torch.randn(n, generator=g, dtype=torch.float64)

    def model(inp):
        s = inp["a"].mean((1, 2)) + inp["b"].mean((1, 2))  # symmetric in a and b
        return torch.tanh(w * s) + 0.1 * s**2

    base = torch.randn(4, 2, generator=g, dtype=torch.float64)
    baseline = {"a": base, "b": base.clone(), "c": torch.randn(3, dtype=torch.float64)}
    game = InputMaskingGame(
        model, ["a", "b", "c"], masking=masking, value=value,
        baseline=baseline if masking == "baseline" else None,
    )  # fmt: skip
    res = game(inputs, y)
    torch.testing.assert_close(res.shapley[0], res.shapley[1])
    assert abs(float(res.shapley[2])) < 1e-12
    # the null player interacts with nobody
    assert float(res.interactions[2].abs().max()) < 1e-12


# ------------------------------------------------------------------------------------------
# agreement with ModalityGame
# ------------------------------------------------------------------------------------------


class LateFusion(nn.Module):
    """Bias-free linear encoders + a fusion head: zeroing (or averaging) an input zeroes (or
    averages) its features, so input masking and feature masking coincide."""

    def __init__(self, classes=0):
        super().__init__()
        self.enc = nn.ModuleDict(
            {"text": nn.Linear(6, 4, bias=False), "audio": nn.Linear(5, 4, bias=False)}
        )
        self.head = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, classes or 1))
        self.classes = classes

    def features(self, inputs):
        return {m: enc(inputs[m]) for m, enc in self.enc.items()}

    def fuse(self, features, present):
        out = self.head(torch.cat([features["text"], features["audio"]], 1))
        return out if self.classes else out[:, 0]

    def forward(self, inputs):
        return self.fuse(self.features(inputs), None)


@pytest.mark.parametrize("masking", ["zero", "mean"])
@pytest.mark.parametrize(
    ("task", "value"),
    [("regression", "neg_loss"), ("regression", "accuracy"), ("classification", "neg_loss")],
)
def test_agrees_with_modality_game(masking, task, value):
    classes = 3 if task == "classification" else 0
    model = LateFusion(classes).double()
    inputs = {"text": torch.randn(16, 6).double(), "audio": torch.randn(16, 5).double() + 1}
    y = torch.randint(0, 3, (16,)) if classes else torch.randn(16).double()
    by_input = InputMaskingGame(model, ["text", "audio"], masking=masking, value=value, task=task)
    res_in = by_input(inputs, y)
    with torch.no_grad():
        feats = model.features(inputs)
    by_feature = ModalityGame(model.fuse, ["text", "audio"], masking=masking, value=value,
                              task=task)  # fmt: skip
    res_feat = by_feature(feats, y)
    torch.testing.assert_close(res_in.table, res_feat.table)
    torch.testing.assert_close(res_in.shapley, res_feat.shapley)
    torch.testing.assert_close(res_in.interactions, res_feat.interactions)


# ------------------------------------------------------------------------------------------
# modes, gradients, masks, calling conventions, chunks
# ------------------------------------------------------------------------------------------


class Recorder(nn.Module):
    def __init__(self, fail=False):
        super().__init__()
        self.lin = nn.Linear(2, 1)
        self.drop = nn.Dropout(0.5)
        self.norm = nn.BatchNorm1d(2)
        self.fail = fail
        self.seen: list[tuple[bool, bool, bool]] = []

    def forward(self, inputs):
        self.seen.append((self.training, self.drop.training, torch.is_grad_enabled()))
        if self.fail:
            raise RuntimeError("boom")
        return self.lin(self.drop(self.norm(inputs["a"] + inputs["b"])))[:, 0]


def test_eval_mode_restored_and_no_grad():
    model = Recorder()
    model.train()
    model.norm.eval()  # a mixed state must come back exactly
    inputs = {"a": torch.randn(8, 2), "b": torch.randn(8, 2)}
    res = InputMaskingGame(model, ["a", "b"])(inputs, torch.randn(8))
    assert model.seen and all(s == (False, False, False) for s in model.seen)
    assert model.training and model.drop.training and not model.norm.training
    assert not res.table.requires_grad and not res.shapley.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert torch.is_grad_enabled()


def test_eval_mode_restored_after_exception_and_plain_function_modules():
    model = Recorder(fail=True).train()
    with pytest.raises(RuntimeError, match="boom"):
        InputMaskingGame(model, ["a", "b"])({"a": torch.ones(3, 2), "b": torch.ones(3, 2)},
                                            torch.zeros(3))  # fmt: skip
    assert model.training and model.drop.training and model.norm.training
    # a plain function that calls the module: `modules=` puts it in eval mode
    inner = Recorder().train()
    game = InputMaskingGame(lambda x: inner(x), ["a", "b"], modules=[inner])
    game({"a": torch.ones(3, 2), "b": torch.ones(3, 2)}, torch.zeros(3))
    assert all(s == (False, False, False) for s in inner.seen) and inner.training


def test_mean_masking_respects_masks_and_mask_absent():
    inputs, masks = seq_inputs()
    seen = []

    def model(x, m):
        seen.append(({k: v.clone() for k, v in x.items()}, {k: v.clone() for k, v in m.items()}))
        return x["text"].sum((1, 2)) + x["audio"].sum((1, 2)) + x["vision"].sum((1, 2))

    y = torch.zeros(6, dtype=torch.float64)
    for mask_absent in (False, True):
        seen.clear()
        InputMaskingGame(model, NAMES, masking="mean", mask_absent=mask_absent)(inputs, y, masks)
        assert len(seen) == 8  # one forward per coalition
        for code, (x_s, m_s) in enumerate(seen):
            for j, name in enumerate(NAMES):
                present = bool((code >> j) & 1)
                want = inputs[name] if present else masked_mean(inputs[name], masks.get(name))
                torch.testing.assert_close(x_s[name], want.expand_as(inputs[name]))
                if name in masks:
                    blank = mask_absent and not present
                    want_mask = torch.zeros_like(masks[name]) if blank else masks[name]
                    assert torch.equal(m_s[name], want_mask)
            assert set(m_s) == set(masks)


def test_calling_convention_detection():
    inputs, masks = seq_inputs()
    y = torch.zeros(6, dtype=torch.float64)
    calls = []

    def one_arg(x):
        calls.append("one")
        return x["text"].mean((1, 2))

    def two_args(x, m):
        calls.append(("two", m is None))
        return x["text"].mean((1, 2))

    class Net(nn.Module):
        def forward(self, x, masks=None):
            calls.append(("net", masks is None))
            return x["text"].mean((1, 2))

    InputMaskingGame(one_arg, NAMES)(inputs, y, masks)  # masks only used for the mean
    InputMaskingGame(two_args, NAMES)(inputs, y, masks)
    InputMaskingGame(two_args, NAMES)(inputs, y)  # the model gets masks=None
    InputMaskingGame(Net(), NAMES)(inputs, y, masks)
    InputMaskingGame(Net(), NAMES, takes_masks=False)(inputs, y, masks)  # explicit flag wins
    assert calls == (
        ["one"] * 8 + [("two", False)] * 8 + [("two", True)] * 8 + [("net", False)] * 8
        + [("net", True)] * 8
    )  # fmt: skip


@pytest.mark.parametrize("chunk_size", [None, 1, 3, 8, 100])
def test_chunk_size_same_table(chunk_size):
    inputs, masks = seq_inputs()
    y = torch.randn(6, dtype=torch.float64)
    model = MaskedNonlinearModel(DIMS).double()
    calls = []
    wrapped = lambda x, m: calls.append(x["text"].shape[0]) or model(x, m)  # noqa: E731
    ref = InputMaskingGame(model, NAMES, masking="mean", mask_absent=True)(inputs, y, masks)
    game = InputMaskingGame(
        wrapped, NAMES, masking="mean", mask_absent=True, chunk_size=chunk_size, modules=[model]
    )
    res = game(inputs, y, masks)
    torch.testing.assert_close(res.table, ref.table)
    step = chunk_size or 8
    assert len(calls) == math.ceil(8 / step)
    assert calls[0] == 6 * min(step, 8)


def test_integer_token_inputs_with_zero_and_baseline():
    emb = nn.Embedding(10, 3)
    tokens = torch.randint(1, 10, (5, 4))

    def model(x):
        return emb(x["text"]).mean((1, 2)) + x["audio"].mean(1)

    inputs = {"text": tokens, "audio": torch.randn(5, 2)}
    y = torch.randn(5)
    res = InputMaskingGame(model, ["text", "audio"], masking="zero", modules=[emb])(inputs, y)
    ref = brute_force_table(model, ["text", "audio"], inputs, y, masking="zero")
    torch.testing.assert_close(res.table, ref.float())
    pad = {"text": torch.full((4,), 1), "audio": torch.zeros(2)}
    res = InputMaskingGame(model, ["text", "audio"], masking="baseline", baseline=pad)(inputs, y)
    ref = brute_force_table(model, ["text", "audio"], inputs, y, masking="baseline", baseline=pad)
    torch.testing.assert_close(res.table, ref.float())


def test_permutation_sampling_over_coalition_values_for_many_modalities():
    names = [f"m{i}" for i in range(9)]
    w = torch.linspace(-1.0, 1.0, 9, dtype=torch.float64)
    inputs = {m: torch.randn(4, 2, dtype=torch.float64) for m in names}

    def model(x):  # a weighted sum over whichever modalities the game was built for
        return sum(w[names.index(m)] * v.mean(1) for m, v in x.items())

    y = torch.randn(4, dtype=torch.float64)
    game = InputMaskingGame(model, names, masking="zero", chunk_size=None)
    with pytest.raises(ModbalanceError, match=r"M=9 modalities would take 512 passes"):
        game(inputs, y)
    value_fn = functools.partial(game.coalition_values, inputs, y)
    sampled = shapley_values(value_fn, 9, method="permutation", num_permutations=4,
                             generator=torch.Generator().manual_seed(0),
                             modalities=names)  # fmt: skip
    assert sampled.shapley.shape == (9,) and sampled.modalities == tuple(names)
    # exact through the same value function agrees with __call__ for a small game
    small = InputMaskingGame(model, names[:3], masking="zero")
    sub = {m: inputs[m] for m in names[:3]}
    exact = shapley_values(functools.partial(small.coalition_values, sub, y), 3)
    torch.testing.assert_close(exact.shapley, small(sub, y).shapley)


def test_result_follows_device(device):
    inputs, masks = seq_inputs()
    inputs = {m: v.to(device) for m, v in inputs.items()}
    masks = {m: v.to(device) for m, v in masks.items()}
    model = MaskedNonlinearModel(DIMS).double().to(device)
    y = torch.randn(6, dtype=torch.float64, device=device)
    res = InputMaskingGame(model, NAMES, mask_absent=True, chunk_size=None)(inputs, y, masks)
    assert res.table.device.type == res.shapley.device.type == torch.device(device).type
    cpu = InputMaskingGame(model.cpu(), NAMES, mask_absent=True)(
        {m: v.cpu() for m, v in inputs.items()}, y.cpu(), {m: v.cpu() for m, v in masks.items()}
    )
    torch.testing.assert_close(res.table.cpu(), cpu.table)


def test_float32_table_and_repr():
    model = AdditiveModel({"a": 1.0, "b": 2.0})
    inputs = {"a": torch.randn(4, 3), "b": torch.randn(4, 3)}
    res = InputMaskingGame(model, ["a", "b"], masking="mean")(inputs, torch.randn(4))
    assert res.table.dtype == torch.float32 and res.table.shape == (4,)
    text = repr(InputMaskingGame(model, ["a", "b"]))
    assert text.startswith("InputMaskingGame(modalities=('a', 'b'), masking='mean'")
    assert modbalance.InputMaskingGame is InputMaskingGame


# ------------------------------------------------------------------------------------------
# consumers of the result
# ------------------------------------------------------------------------------------------


def test_result_feeds_equilibrium_and_modulator():
    model = AdditiveModel({"a": 2.0, "b": 0.5})
    inputs = {"a": torch.randn(16, 3), "b": torch.randn(16, 3)}
    y = 2.0 * inputs["a"].mean(1) + 0.5 * inputs["b"].mean(1)
    res = InputMaskingGame(model, ["a", "b"], masking="zero")(inputs, y)
    eq = ShapleyEquilibrium(["a", "b"], momentum=0.0)
    shares = eq.observe(res)
    assert shares.shape == (2,) and torch.isfinite(shares).all()
    assert float(shares[0]) > float(shares[1])  # "a" carries most of the target
    modulator = ShapleyGradModulator({"a": nn.Linear(2, 2), "b": nn.Linear(2, 2)}, momentum=0.0)
    coef = modulator.observe(res)
    assert coef.shape == (2,) and float(coef[0]) < float(coef[1])


# ------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------


def _model(x, m=None):
    return x["a"].mean(1)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"masking": "learned"}, ModbalanceError, r"`masking` must be one of 'zero', 'mean'"),
        ({"masking": "present"}, ModbalanceError, r"`masking` must be one of"),
        ({"value": "r2"}, ModbalanceError, r"`value` must be one of"),
        ({"task": "ranking"}, ModbalanceError, r"`task` must be one of"),
        ({"task": "classification", "value": "neg_mae"}, ModbalanceError, "needs task='regr"),
        ({"masking": "baseline"}, ModbalanceError, r"masking='baseline'` needs `baseline`"),
        ({"masking": "baseline", "baseline": {"a": torch.zeros(2)}}, ModbalanceError,
         r"`baseline` is missing modality 'b'"),
        ({"masking": "baseline", "baseline": {"a": torch.zeros(2), "b": torch.tensor(
            [0.0, float("nan")])}}, ModbalanceError, r"`baseline\['b'\]` must contain only fin"),
        ({"masking": "mean", "baseline": {"a": torch.zeros(2), "b": torch.zeros(2)}},
         ModbalanceError, r"`baseline` is only used with masking='baseline'"),
        ({"chunk_size": 0}, ModbalanceError, r"`chunk_size` must be >= 1"),
        ({"mask_absent": 1}, TypeError, r"`mask_absent` must be a bool"),
        ({"takes_masks": "yes"}, TypeError, r"`takes_masks` must be True, False or None"),
        ({"modules": [object()]}, TypeError, r"`modules` must hold nn.Module"),
    ],
)  # fmt: skip
def test_constructor_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        InputMaskingGame(_model, ["a", "b"], **kwargs)


def test_constructor_errors_names_and_callable():
    with pytest.raises(TypeError, match="callable"):
        InputMaskingGame("model", ["a", "b"])
    with pytest.raises(ModbalanceError, match="distinct"):
        InputMaskingGame(_model, ["a", "a"])
    with pytest.raises(ModbalanceError, match="at least one"):
        InputMaskingGame(_model, [])


def test_more_than_eight_modalities_refused_with_cost_and_alternative():
    names = [f"m{i}" for i in range(9)]
    game = InputMaskingGame(lambda x: x["m0"].mean(1), names)
    inputs = {m: torch.zeros(2, 1) for m in names}
    with pytest.raises(
        ModbalanceError, match=r"(?s)512 passes.*M <= 8.*ModalityGame.*method='permutation'"
    ):
        game(inputs, torch.zeros(2))


def _inputs():
    return {"a": torch.randn(4, 2), "b": torch.randn(4, 2)}, torch.randn(4)


@pytest.mark.parametrize(
    ("case", "exc", "match"),
    [
        ("missing", ModbalanceError, r"`inputs` is missing modality 'b'"),
        ("unknown", ModbalanceError, r"`inputs` has unknown modality 'c'"),
        ("not_mapping", TypeError, r"`inputs` must be a mapping"),
        ("not_tensor", TypeError, r"`inputs\['b'\]` must be a torch.Tensor"),
        ("scalar", ModbalanceError, r"`inputs\['b'\]` must have a batch dimension"),
        ("batch", ModbalanceError, r"`inputs\['b'\]` has size 3 in dimension 0"),
        ("nan", ModbalanceError, r"`inputs\['b'\]` must contain only finite values, got 1 NaN"),
        ("inf_target", ModbalanceError, r"`target` must contain only finite values"),
        ("target_shape", ModbalanceError, r"`target` must have shape \(N,\)"),
        ("target_int", TypeError, r"`target` must be a floating tensor for task='regression'"),
        ("mask_unknown", ModbalanceError, r"`masks` has unknown modality 'c'"),
        ("mask_shape", ModbalanceError, r"`masks\['a'\]` must have a prefix of the input shape"),
        ("mask_type", TypeError, r"`masks` must be a mapping"),
        ("mask_absent", ModbalanceError, r"`mask_absent=True`.*no `masks`"),
        ("mean_int", ModbalanceError, r"masking='mean' needs floating inputs.*'baseline'"),
        ("baseline_shape", ModbalanceError, r"`baseline\['a'\]` must broadcast to the input"),
        ("out_shape", ModbalanceError, r"a regression `model_fn` must return shape \(B,\)"),
        ("out_tuple", TypeError, r"must return the prediction tensor, got tuple.*\[0\]"),
        ("out_nan", ModbalanceError, r"`model_fn\(inputs\)` must contain only finite values"),
        ("cls_range", ModbalanceError, r"`target` must hold class indices in \[0, 1\]"),
        ("cls_logits", ModbalanceError, r"classification `model_fn` must return logits"),
    ],
)
def test_call_errors(case, exc, match):
    inputs, y = _inputs()
    masks = None
    model = _model
    kwargs: dict = {}
    if case == "missing":
        del inputs["b"]
    elif case == "unknown":
        inputs["c"] = torch.zeros(4, 2)
    elif case == "not_mapping":
        inputs = [inputs["a"], inputs["b"]]
    elif case == "not_tensor":
        inputs["b"] = [[0.0, 1.0]] * 4
    elif case == "scalar":
        inputs["b"] = torch.tensor(1.0)
    elif case == "batch":
        inputs["b"] = torch.zeros(3, 2)
    elif case == "nan":
        inputs["b"][1, 0] = float("nan")
    elif case == "inf_target":
        y[0] = float("inf")
    elif case == "target_shape":
        y = torch.zeros(4, 2)
    elif case == "target_int":
        y = torch.zeros(4, dtype=torch.long)
    elif case == "mask_unknown":
        masks = {"c": torch.ones(4, dtype=torch.bool)}
    elif case == "mask_shape":
        masks = {"a": torch.ones(4, 3, dtype=torch.bool)}
    elif case == "mask_type":
        masks = [torch.ones(4, dtype=torch.bool)]
    elif case == "mask_absent":
        kwargs["mask_absent"] = True
    elif case == "mean_int":
        inputs["b"] = torch.zeros(4, 2, dtype=torch.long)
    elif case == "baseline_shape":
        kwargs = {"masking": "baseline", "baseline": {"a": torch.zeros(3), "b": torch.zeros(2)}}
    elif case == "out_shape":
        model = lambda x: x["a"]  # noqa: E731
    elif case == "out_tuple":
        model = lambda x: (x["a"].mean(1), x["b"])  # noqa: E731
    elif case == "out_nan":
        model = lambda x: x["a"].mean(1) * float("nan")  # noqa: E731
    elif case == "cls_range":
        model = lambda x: x["a"]  # noqa: E731  (2 logits)
        y = torch.tensor([0, 1, 2, 1])
        kwargs["task"] = "classification"
    elif case == "cls_logits":
        y = torch.tensor([0, 1, 1, 1])
        kwargs["task"] = "classification"
    with pytest.raises(exc, match=match):
        InputMaskingGame(model, ["a", "b"], **kwargs)(inputs, y, masks)


def test_coalitions_argument_checked():
    inputs, y = _inputs()
    game = InputMaskingGame(_model, ["a", "b"])
    with pytest.raises(ModbalanceError, match=r"`coalitions` must have shape \(C, 2\)"):
        game.coalition_values(inputs, y, coalition_masks(3))
    with pytest.raises(TypeError, match=r"`coalitions` must have a bool dtype"):
        game.coalition_values(inputs, y, coalition_masks(2).long())
