"""Tests for modbalance.metrics: MMSA-exact sentiment metrics, IEMOCAP metrics, diagnostics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.linear_model import Ridge
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, r2_score
from sklearn.preprocessing import StandardScaler

from modbalance._checks import ModbalanceError
from modbalance.metrics import (
    iemocap_metrics,
    imbalance_index,
    msa_regression_metrics,
    probe_score,
    shapley_shares,
    sims_regression_metrics,
)

MSA_KEYS = {
    "Has0_acc_2", "Has0_F1_score", "Non0_acc_2", "Non0_F1_score", "Mult_acc_5", "Mult_acc_7",
    "MAE", "Corr",
}  # fmt: skip


# ----------------------------------------------------------------------------------------------
# MOSI / MOSEI
# ----------------------------------------------------------------------------------------------

# A worked example with zeros, halves (np.round: half to even) and a prediction beyond +3.
PRED = [3.7, -0.5, 0.5, 1.5, 2.5, -2.6, 0.2, -1.0]
TRUE = [3.0, 0.0, 0.0, 2.0, 2.0, -3.0, -0.4, 1.0]


def test_msa_worked_example_by_hand(device):
    m = msa_regression_metrics(torch.tensor(PRED, device=device), torch.tensor(TRUE, device=device))
    assert set(m) == MSA_KEYS
    # Acc-7: clip to [-3,3], round half to even: pred -> [3,-0,0,2,2,-3,0,-1],
    # truth -> [3,0,0,2,2,-3,-0,1]: only the last differs (round-half-up would give 5/8).
    assert m["Mult_acc_7"] == 0.875
    # Acc-5: clip to [-2,2]: pred -> [2,-0,0,2,2,-2,0,-1], truth -> [2,0,0,2,2,-2,-0,1].
    assert m["Mult_acc_5"] == 0.875
    # MAE on unclipped values: (0.7+0.5+0.5+0.5+0.5+0.4+0.6+2.0)/8
    assert m["MAE"] == pytest.approx(5.7 / 8, abs=1e-4)
    # Has0: truth>=0 = [T,T,T,T,T,F,F,T], pred>=0 = [T,F,T,T,T,F,T,F] -> 5/8
    assert m["Has0_acc_2"] == 0.625
    # class T: tp 4, fp 1, fn 2 -> F1 8/11 (support 6); class F: tp 1, fp 2, fn 1 -> 2/5 (support 2)
    assert m["Has0_F1_score"] == round((6 * 8 / 11 + 2 * 0.4) / 8, 4)
    # Non0 drops the two zero labels: truth>0 [T,T,T,F,F,T], pred>0 [T,T,T,F,T,F] -> 4/6
    assert m["Non0_acc_2"] == round(4 / 6, 4)
    # class T: tp 3, fp 1, fn 1 -> 0.75 (support 4); class F: tp 1, fp 1, fn 1 -> 0.5 (support 2)
    assert m["Non0_F1_score"] == round((4 * 0.75 + 2 * 0.5) / 6, 4)
    assert m["Corr"] == round(float(np.corrcoef(PRED, TRUE)[0, 1]), 4)


def test_msa_accepts_numpy_and_column_shapes_and_full_precision():
    a = msa_regression_metrics(np.array(PRED)[:, None], np.array(TRUE)[:, None, None])
    b = msa_regression_metrics(torch.tensor(PRED), torch.tensor(TRUE))
    assert a == b
    full = msa_regression_metrics(PRED, TRUE, decimals=None)
    assert full["Non0_acc_2"] == 4 / 6


def _mmsa_reference(p: np.ndarray, t: np.ndarray) -> dict[str, float]:
    """Straight transcription of the MMSA conventions with sklearn (the obviously-correct path)."""
    nz = t != 0

    def acc_round(c):
        return np.mean(np.round(np.clip(p, -c, c)) == np.round(np.clip(t, -c, c)))

    return {
        "Has0_acc_2": accuracy_score(t >= 0, p >= 0),
        "Has0_F1_score": f1_score(t >= 0, p >= 0, average="weighted"),
        "Non0_acc_2": accuracy_score(t[nz] > 0, p[nz] > 0),
        "Non0_F1_score": f1_score(t[nz] > 0, p[nz] > 0, average="weighted"),
        "Mult_acc_5": acc_round(2.0),
        "Mult_acc_7": acc_round(3.0),
        "MAE": np.mean(np.abs(p - t)),
        "Corr": np.corrcoef(p, t)[0, 1],
    }


# labels on MOSI's 1/3 grid plus halves and zeros; predictions anywhere, including beyond +-3
_label = st.sampled_from([x / 6 for x in range(-18, 19)] + [0.0, 0.0, 0.5, -0.5, 1.5, -2.5])
_pred = st.one_of(_label, st.floats(-4.5, 4.5, allow_nan=False, width=32))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(_pred, _label), min_size=3, max_size=40))
def test_msa_matches_sklearn_reference(pairs):
    p = np.array([a for a, _ in pairs], dtype=np.float64)
    t = np.array([b for _, b in pairs], dtype=np.float64)
    if (t != 0).sum() == 0 or p.std() == 0 or t.std() == 0:
        return
    ours = msa_regression_metrics(p, t, decimals=None)
    ref = _mmsa_reference(p, t)
    for k, v in ref.items():
        assert ours[k] == pytest.approx(float(v), abs=1e-12), k


def test_msa_degenerate_cases_give_nan_not_errors():
    with pytest.warns(UserWarning, match="Non0_acc_2, Non0_F1_score, Corr undefined") as rec:
        m = msa_regression_metrics([0.5, 1.0, -1.0], [0.0, 0.0, 0.0])
    assert len(rec) == 1  # one warning per call
    assert math.isnan(m["Non0_acc_2"]) and math.isnan(m["Non0_F1_score"])
    assert math.isnan(m["Corr"])  # constant target
    assert m["Has0_acc_2"] == round(2 / 3, 4)


@pytest.mark.filterwarnings("ignore:.*undefined, returned as NaN:UserWarning")  # zero labels
@pytest.mark.parametrize("fn", [msa_regression_metrics, sims_regression_metrics])
@pytest.mark.parametrize("mae", [0.00125, 0.00025, 0.00035, 0.00005, 0.00115, 0.00185])
def test_rounding_matches_mmsa_on_decimal_ties(fn, mae):
    # MMSA: round(np.mean(np.absolute(pred - truth)), 4) on a numpy float, i.e. np.round
    pred = np.array([2 * mae, 0.0])
    target = np.zeros(2)
    mmsa_mae = round(np.mean(np.absolute(pred - target)), 4)  # numpy's __round__
    assert mmsa_mae == np.round(mae, 4) != round(float(mae), 4)  # a real decimal tie
    assert fn(pred, target)["MAE"] == float(mmsa_mae)


def test_rounding_is_numpy_rounding_everywhere():
    # Has0 accuracy 0.00125 would need 800 samples; check the helper on the tie values directly
    from modbalance.metrics import _round

    for x in [0.00125, 0.00015, 2.675, -0.00125, 0.5, 1.5]:
        assert _round(x, 4) == float(np.round(np.float64(x), 4))
        assert _round(x, 0) == float(np.round(np.float64(x)))
    assert _round(0.00125, None) == 0.00125 and math.isnan(_round(float("nan"), 4))


@pytest.mark.parametrize(
    ("pred", "target", "exc", "match"),
    [
        ([1.0, 2.0], [1.0], ModbalanceError, "must match"),
        ([1.0, float("nan")], [1.0, 2.0], ModbalanceError, "`pred`.*1 NaN"),
        ([1.0, 2.0], [1.0, float("inf")], ModbalanceError, "`target`.*1 infinite"),
        ([], [], ModbalanceError, "must not be empty"),
        ("ab", [1.0], TypeError, "`pred`"),
        (np.array(["a", "b"]), [1.0, 2.0], TypeError, "real numbers"),
    ],
)
def test_msa_errors(pred, target, exc, match):
    with pytest.raises(exc, match=match):
        msa_regression_metrics(pred, target)


# ----------------------------------------------------------------------------------------------
# CH-SIMS
# ----------------------------------------------------------------------------------------------


def test_sims_worked_example_by_hand():
    p = [1.3, 0.0, 0.1, -0.1, -0.75, 0.69, 0.3]
    t = [0.8, 0.0, 0.1, -0.2, -1.4, 0.71, -0.05]
    m = sims_regression_metrics(p, t)
    # clipped p = [1, 0, .1, -.1, -.75, .69, .3], t = [.8, 0, .1, -.2, -1, .71, -.05]
    # 2 classes (zero negative): p [1,0,1,0,0,1,1], t [1,0,1,0,0,1,0] -> 6/7
    assert m["Mult_acc_2"] == round(6 / 7, 4)
    # 3 classes: p [2,1,1,0,0,2,2], t [2,1,1,0,0,2,1] -> 6/7
    assert m["Mult_acc_3"] == round(6 / 7, 4)
    # 5 classes: p [4,2,2,1,0,3,3], t [4,2,2,1,0,4,2] -> 5/7
    assert m["Mult_acc_5"] == round(5 / 7, 4)
    # MAE after clipping: (.2+0+0+.1+.25+.02+.35)/7
    assert m["MAE"] == round(0.92 / 7, 4)
    # weighted F1, class 1: tp 3 fp 1 fn 0 -> 6/7 (support 3); class 0: tp 3 fp 0 fn 1 -> 6/7 (4)
    assert m["F1_score"] == round(6 / 7, 4)
    pc, tc = np.clip(p, -1, 1), np.clip(t, -1, 1)
    assert m["Corr"] == round(float(np.corrcoef(pc, tc)[0, 1]), 4)


def test_sims_float32_bins_like_mmsa():
    # float32(0.1) sits on the (float32) edge -> class (-0.1, 0.1], like MMSA's numpy code
    p = torch.tensor([0.1, -0.7], dtype=torch.float32)
    t = torch.tensor([0.05, -0.69], dtype=torch.float32)
    m = sims_regression_metrics(p, t)
    assert m["Mult_acc_3"] == 1.0
    assert m["Mult_acc_5"] == 0.5  # -0.7 is in [-1, -0.7], -0.69 in (-0.7, -0.1]


@pytest.mark.filterwarnings("ignore:.*Corr undefined, returned as NaN:UserWarning")
@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(-1.5, 1.5, width=32), st.sampled_from([x / 5 for x in range(-5, 6)])),
        min_size=2,
        max_size=30,
    )
)
def test_sims_f1_and_acc2_match_sklearn(pairs):
    p = np.array([a for a, _ in pairs])
    t = np.array([b for _, b in pairs])
    m = sims_regression_metrics(p, t, decimals=None)
    pb, tb = np.clip(p, -1, 1) > 0, np.clip(t, -1, 1) > 0
    assert m["Mult_acc_2"] == pytest.approx(accuracy_score(tb, pb))
    assert m["F1_score"] == pytest.approx(f1_score(tb, pb, average="weighted"))
    assert m["MAE"] == pytest.approx(np.mean(np.abs(np.clip(p, -1, 1) - np.clip(t, -1, 1))))


# ----------------------------------------------------------------------------------------------
# IEMOCAP
# ----------------------------------------------------------------------------------------------


def _iemocap_case(n: int = 60, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.zeros((n, 4), dtype=np.int64)
    labels[np.arange(n), rng.integers(0, 4, n)] = 1
    labels[:5] = 0  # no emotion
    labels[5:8, :2] = 1  # two emotions
    logits = rng.normal(size=(n, 4, 2)) + 1.2 * np.stack([1 - labels, labels], -1)
    return logits, labels


def test_iemocap_matches_sklearn():
    logits, labels = _iemocap_case()
    m = iemocap_metrics(torch.from_numpy(logits), torch.from_numpy(labels), decimals=None)
    for e, name in enumerate(("Neutral", "Happy", "Sad", "Angry")):
        pred = logits[:, e].argmax(-1)
        assert m[f"{name}_acc"] == pytest.approx(accuracy_score(labels[:, e], pred))
        assert m[f"{name}_F1"] == pytest.approx(f1_score(labels[:, e], pred, average="weighted"))
    single = labels.sum(1) == 1
    true_c = labels[single].argmax(1)
    pred_c = (logits[single, :, 1] - logits[single, :, 0]).argmax(1)
    assert m["n_4class"] == single.sum() == 52
    assert m["WA"] == pytest.approx(accuracy_score(true_c, pred_c))
    assert m["UA"] == pytest.approx(balanced_accuracy_score(true_c, pred_c))
    # MulT one-hot labels (N, 4, 2) and flat (N, 8) logits give the same result
    onehot = np.stack([1 - labels, labels], -1)
    assert iemocap_metrics(logits.reshape(-1, 8), onehot, decimals=None) == m


def test_iemocap_hand_example():
    labels = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]])
    logits = np.zeros((4, 4, 2))
    logits[:, :, 0] = 1.0  # predict "absent" everywhere ...
    logits[0, 0] = [0.0, 2.0]  # ... except neutral for sample 0 (correct)
    logits[1, 2] = [0.0, 2.0]  # and sad for sample 1 (wrong: happy)
    m = iemocap_metrics(logits, labels)
    assert m["Neutral_acc"] == 1.0
    assert m["Happy_acc"] == 0.5  # samples 1 and 2 missed
    assert m["Sad_acc"] == 0.75
    # 4-class on the 3 single-label samples: pred [neutral, sad, (tie -> neutral)] vs
    # [neutral, happy, happy] -> WA 1/3; recall neutral 1, happy 0 -> UA 0.5
    assert m["n_4class"] == 3.0
    assert m["WA"] == round(1 / 3, 4)
    assert m["UA"] == 0.5


@pytest.mark.parametrize(
    ("logits", "labels", "match"),
    [
        (np.zeros((3, 4, 3)), np.zeros((3, 4)), "logits"),
        (np.zeros((3, 4, 2)), np.zeros((3, 5)), "labels"),
        (np.zeros((3, 4, 2)), np.full((3, 4), 2), "only 0 and 1"),
        (np.zeros((3, 4, 2)), np.ones((3, 4, 2)), "one-hot"),
        (np.zeros((3, 4, 2)), np.zeros((2, 4)), "must match"),
    ],
)
def test_iemocap_errors(logits, labels, match):
    with pytest.raises(ModbalanceError, match=match):
        iemocap_metrics(logits, labels)


# ----------------------------------------------------------------------------------------------
# imbalance diagnostics
# ----------------------------------------------------------------------------------------------


def test_shapley_shares(device):
    v = torch.tensor([[0.6, 0.2, -0.1], [-1.0, -2.0, 0.0], [1.0, 1.0, 2.0]], device=device)
    s = shapley_shares(v)
    expected = torch.tensor([[0.75, 0.25, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.25, 0.25, 0.5]])
    torch.testing.assert_close(s.cpu(), expected)
    assert s.device == v.device
    out = shapley_shares(np.array([2.0, 2.0]))
    assert out.dtype == torch.float64 and out.tolist() == [0.5, 0.5]
    with pytest.raises(ModbalanceError, match="finite"):
        shapley_shares(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ModbalanceError, match="0-dimensional"):
        shapley_shares(torch.tensor(1.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([3e38, 3e38], [0.5, 0.5]),  # the float32 sum overflows to inf
        ([3e38, 1e38, -3e38], [0.75, 0.25, 0.0]),
        ([1e-45, 0.0], [1.0, 0.0]),  # subnormal: still a positive contribution
        ([1e-45, 1e-45], [0.5, 0.5]),
    ],
)
def test_shapley_shares_extreme_magnitudes(values, expected, dtype):
    s = shapley_shares(torch.tensor(values, dtype=dtype))
    assert s.dtype == dtype
    torch.testing.assert_close(s, torch.tensor(expected, dtype=dtype))
    assert bool(torch.isfinite(s).all())


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0.0, 10.0), min_size=2, max_size=6).filter(lambda v: sum(v) > 1e-3))
def test_imbalance_index_matches_entropy_formula(raw):
    p = np.array(raw) / np.sum(raw)
    nz = p[p > 0]
    expected = 1 + float(np.sum(nz * np.log(nz))) / math.log(len(p))
    assert imbalance_index(p) == pytest.approx(expected, abs=1e-9)
    assert 0.0 <= imbalance_index(p) <= 1.0
    # invariant under permutation of the modalities
    assert imbalance_index(p[::-1].copy()) == pytest.approx(imbalance_index(p), abs=1e-12)


def test_imbalance_index_extremes_batch_and_errors():
    assert imbalance_index([0.25] * 4) == pytest.approx(0.0, abs=1e-12)
    assert imbalance_index([0.0, 1.0]) == 1.0
    batch = imbalance_index(torch.tensor([[0.5, 0.5], [1.0, 0.0]]))
    torch.testing.assert_close(batch, torch.tensor([0.0, 1.0]))
    with pytest.raises(ModbalanceError, match="M >= 2"):
        imbalance_index([1.0])
    with pytest.raises(ModbalanceError, match="non-negative"):
        imbalance_index([1.5, -0.5])
    with pytest.raises(ModbalanceError, match="sum to 1"):
        imbalance_index([0.5, 0.6])


def test_probe_score_matches_sklearn_ridge():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 6)) * np.array([1, 10, 0.1, 1, 1, 3]) + 2.0
    y = x[:, 0] - 0.2 * x[:, 1] + 5 * x[:, 2] + rng.normal(size=300)
    xtr, xte, ytr, yte = x[:200], x[200:], y[:200], y[200:]
    scaler = StandardScaler().fit(xtr)
    ref = Ridge(alpha=3.0).fit(scaler.transform(xtr), ytr)
    expected = r2_score(yte, ref.predict(scaler.transform(xte)))
    ours = probe_score(torch.from_numpy(xtr), torch.from_numpy(ytr), xte, yte, alpha=3.0)
    assert ours == pytest.approx(expected, abs=1e-9)


def test_probe_score_classification():
    rng = np.random.default_rng(1)
    centers = np.array([[4.0, 0.0], [0.0, 4.0], [-4.0, -4.0]])
    cls = rng.integers(0, 3, 300)
    x = centers[cls] + rng.normal(size=(300, 2)) * 0.5
    acc = probe_score(x[:200], cls[:200], x[200:], cls[200:], task="classification")
    assert acc == 1.0
    noise = probe_score(rng.normal(size=(200, 2)), cls[:200], rng.normal(size=(100, 2)), cls[200:],
                        task="classification")  # fmt: skip
    assert noise < 0.6


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((np.zeros((5, 2)), np.zeros(5), np.zeros((3, 3)), np.zeros(3)), {}, "must match"),
        ((np.zeros((5, 2)), np.zeros(4), np.zeros((3, 2)), np.zeros(3)), {}, "train_y"),
        ((np.zeros(5), np.zeros(5), np.zeros((3, 2)), np.zeros(3)), {}, r"\(N, D\)"),
        ((np.zeros((1, 2)), np.zeros(1), np.zeros((3, 2)), np.zeros(3)), {}, "at least 2"),
        ((np.zeros((5, 2)), np.zeros(5), np.zeros((3, 2)), np.zeros(3)), {"task": "x"}, "task"),
        ((np.zeros((5, 2)), np.zeros(5), np.zeros((3, 2)), np.zeros(3)), {"alpha": 0}, "alpha"),
        (
            (np.zeros((5, 2)), np.full(5, 0.5), np.zeros((3, 2)), np.zeros(3)),
            {"task": "classification"},
            "integers",
        ),
        ((np.full((5, 2), np.nan), np.zeros(5), np.zeros((3, 2)), np.zeros(3)), {}, "finite"),
    ],
)
def test_probe_score_errors(args, kwargs, match):
    with pytest.raises(ModbalanceError, match=match):
        probe_score(*args, **kwargs)


# ----------------------------------------------------------------------------------------------
# one implementation each: WA/UA, the ridge probe, the shares
# ----------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_wa_ua_is_accuracy_and_balanced_accuracy():
    from modbalance.metrics import _wa_ua

    rng = np.random.default_rng(3)
    for n, c in ((50, 3), (200, 8), (7, 5)):
        true, pred = rng.integers(0, c, n), rng.integers(0, c, n)
        wa, ua = _wa_ua(torch.from_numpy(true), torch.from_numpy(pred))
        assert wa == pytest.approx(accuracy_score(true, pred), abs=1e-15)
        assert ua == pytest.approx(balanced_accuracy_score(true, pred), abs=1e-15)
        # the example's former float32 loop (classes in range(C) present in the target)
        t, p = torch.from_numpy(true), torch.from_numpy(pred)
        hit = (p == t).float()
        recalls = [hit[t == k].mean() for k in range(c) if bool((t == k).any())]
        assert wa == pytest.approx(float(hit.mean()), abs=1e-6)
        assert ua == pytest.approx(float(torch.stack(recalls).mean()), abs=1e-6)
    assert all(math.isnan(v) for v in _wa_ua(np.zeros(0), np.zeros(0)))


def test_example_metrics_of_uses_the_library_wa_ua():
    from examples.pase.loop import metrics_of
    from modbalance.metrics import _wa_ua

    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(40, 4, generator=g), torch.randint(0, 4, (40,), generator=g)
    wa, ua = _wa_ua(target, logits.argmax(-1))
    assert metrics_of(logits, target, "classification") == {"WA": wa, "UA": ua}


def _legacy_suite_ridge(x_tr, y_tr, x_te, classes, alpha=1.0):
    """The competition suite's former private ridge (unbiased std), for comparison."""
    x_tr, x_te = x_tr.double(), x_te.double()
    mu, sd = x_tr.mean(0), x_tr.std(0).clamp_min(1e-8)
    a, b = (x_tr - mu) / sd, (x_te - mu) / sd
    y = torch.nn.functional.one_hot(y_tr.long(), classes).double() if classes else y_tr.double()
    y_mean = y.mean(0)
    w = torch.linalg.solve(
        a.T @ a + alpha * torch.eye(a.shape[1], dtype=a.dtype), a.T @ (y - y_mean)
    )
    return b @ w + y_mean


def test_ridge_probe_is_probe_score_and_the_suites_former_ridge():
    from modbalance.metrics import _ridge_probe

    g = torch.Generator().manual_seed(0)
    n, d = 64, 96  # more features than samples: the ridge strength matters
    x = torch.relu(torch.randn(n + 32, d, generator=g))
    x[:, :3] = 0.0  # dead units: centred, never divided by 0
    y = x[:, 3:8].sum(1) + 0.3 * torch.randn(n + 32, generator=g)
    pred, yte = _ridge_probe(x[:n], y[:n], x[n:], y[n:])
    r2 = 1 - float(((yte - pred) ** 2).sum() / ((yte - yte.mean()) ** 2).sum())
    assert probe_score(x[:n], y[:n], x[n:], y[n:]) == r2
    # the suite standardised with the unbiased std: the same ridge with alpha * N / (N - 1)
    legacy = _legacy_suite_ridge(x[:n], y[:n], x[n:], None)
    same, _ = _ridge_probe(x[:n], y[:n], x[n:], y[n:], alpha=n / (n - 1))
    torch.testing.assert_close(same, legacy, rtol=0, atol=1e-10)
    # classification: predicted labels, the arg-max of the one-hot ridge (all classes in train)
    cls = (x[:, 3] > x[:, 4]).long() + 2 * (x[:, 5] > 1.0).long()
    labels, _ = _ridge_probe(x[:n], cls[:n], x[n:], cls[n:], task="classification")
    scores = _legacy_suite_ridge(x[:n], cls[:n], x[n:], 4, alpha=(n - 1) / n)
    assert torch.equal(labels.long(), scores.argmax(-1))
    acc = probe_score(x[:n], cls[:n], x[n:], cls[n:], task="classification")
    assert acc == float((labels == cls[n:]).double().mean())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_shapley_shares_is_pase_shares(dtype):
    from modbalance.metrics import pase_shares

    g = torch.Generator().manual_seed(0)
    for scale in (1e-30, 1e-3, 1.0, 1e30):
        v = (torch.randn(64, 4, generator=g) * scale).to(dtype)
        v[::5] = -v[::5].abs()  # rows without a positive contribution: uniform
        v[::7, 0] = 0.0
        v = v[torch.isfinite(v).all(-1)]
        assert torch.equal(shapley_shares(v), pase_shares(v))
    big = torch.tensor([torch.finfo(dtype).max, torch.finfo(dtype).max / 2, -1.0], dtype=dtype)
    assert torch.equal(shapley_shares(big), pase_shares(big))
    assert bool(torch.isfinite(pase_shares(big)).all())


def test_pase_shares_without_value_checks_gives_uniform_rows_for_non_finite_input():
    from modbalance import value_checks
    from modbalance.metrics import pase_shares

    x = torch.tensor([[1.0, float("nan"), 2.0], [float("inf"), 1.0, 0.0], [3.0, 1.0, 0.0]])
    with value_checks(False):
        out = pase_shares(x)
    torch.testing.assert_close(out[:2], torch.full((2, 3), 1 / 3))
    torch.testing.assert_close(out[2], torch.tensor([0.75, 0.25, 0.0]))
