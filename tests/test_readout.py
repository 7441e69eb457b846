"""RidgeReadout: the closed form against a plain least-squares solve, the choice of alpha on
held-out data, absent modalities, classification, state round trips and every error path."""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modbalance import ModbalanceError, RidgeReadout

MODS = ("text", "audio")


def _data(n=120, seed=0, noise=0.3, dims=(4, 3)):
    g = torch.Generator().manual_seed(seed)
    feats = {m: torch.randn(n, d, generator=g, dtype=torch.float64) * (1 + i) + i
             for i, (m, d) in enumerate(zip(MODS, dims))}  # fmt: skip
    y = (
        feats["text"][:, 0]
        - 0.5 * feats["audio"][:, 1]
        + noise * torch.randn(n, generator=g, dtype=torch.float64)
    )
    return feats, y


def _split(feats, y, k):
    return ({m: f[:k] for m, f in feats.items()}, y[:k]), (
        {m: f[k:] for m, f in feats.items()},
        y[k:],
    )


def _reference(feats, y, alpha, test):
    """Ridge by an augmented least-squares solve on standardised features (population SD)."""
    x = torch.cat([feats[m] for m in MODS], 1)
    mu, sd = x.mean(0), x.std(0, unbiased=False)
    sd = torch.where(sd > 0, sd, torch.ones_like(sd))
    z = (x - mu) / sd
    d = z.shape[1]
    a = torch.cat([z, alpha**0.5 * torch.eye(d, dtype=z.dtype)])
    b = torch.cat([(y - y.mean())[:, None], torch.zeros(d, 1, dtype=z.dtype)])
    w = torch.linalg.lstsq(a, b).solution
    zt = (torch.cat([test[m] for m in MODS], 1) - mu) / sd
    return (zt @ w).squeeze(1) + y.mean()


@pytest.mark.parametrize("alpha", [0.1, 3.0, 500.0])
def test_fit_equals_the_augmented_least_squares_solve(alpha):
    feats, y = _data()
    readout = RidgeReadout(MODS, alphas=(alpha,)).fit(feats, y)
    test, _ = _data(seed=1)
    torch.testing.assert_close(
        readout(test), _reference(feats, y, alpha, test), rtol=1e-9, atol=1e-9
    )
    assert readout.alpha == alpha and readout.fitted


def test_alpha_is_the_validation_best_and_ties_go_to_the_stronger_ridge():
    feats, y = _data(n=200, noise=1.0)
    train, valid = _split(feats, y, 120)
    alphas = (0.01, 1.0, 100.0, 10000.0)
    readout = RidgeReadout(MODS, alphas=alphas).fit(*train, valid=valid)
    errors = {a: RidgeReadout(MODS, alphas=(a,)).fit(*train).error(*valid) for a in alphas}
    assert readout.alpha == min(errors, key=errors.get)
    assert readout.valid_error == pytest.approx(errors[readout.alpha])
    # constant features: every alpha predicts the training mean, so all tie -> the strongest
    const = {m: torch.ones_like(f) for m, f in train[0].items()}
    vconst = {m: torch.ones_like(f) for m, f in valid[0].items()}
    tied = RidgeReadout(MODS, alphas=alphas).fit(const, train[1], valid=(vconst, valid[1]))
    assert tied.alpha == max(alphas)
    torch.testing.assert_close(tied(vconst), train[1].mean().expand(80))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), junk=st.floats(-1e6, 1e6, allow_nan=False))
def test_an_absent_modality_never_changes_a_prediction(seed, junk):
    feats, y = _data(seed=seed % 7)
    g = torch.Generator().manual_seed(seed)
    present = {
        "text": torch.ones(120, dtype=torch.bool),
        "audio": torch.rand(120, generator=g) > 0.3,
    }
    readout = RidgeReadout(MODS, alphas=(1.0,)).fit(feats, y, present)
    noisy = dict(feats, audio=torch.where(present["audio"][:, None], feats["audio"], junk))
    torch.testing.assert_close(readout(noisy, present), readout(feats, present))
    # an absent modality enters with its training mean: the same as a row equal to that mean
    mean = feats["audio"][present["audio"]].mean(0)
    at_mean = dict(feats, audio=mean.expand(120, -1).clone())
    all_on = {m: torch.ones(120, dtype=torch.bool) for m in MODS}
    off = ~present["audio"]
    torch.testing.assert_close(readout(feats, present)[off], readout(at_mean, all_on)[off])


def test_absent_rows_may_hold_nan_when_fitting_and_predicting():
    feats, y = _data()
    present = {"text": torch.ones(120, dtype=torch.bool), "audio": torch.arange(120) % 4 != 0}
    bad = dict(feats, audio=torch.where(present["audio"][:, None], feats["audio"], torch.nan))
    readout = RidgeReadout(MODS, alphas=(1.0,)).fit(bad, y, present)
    assert torch.isfinite(readout(bad, present)).all()


def test_classification_scores_and_accuracy():
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 3, (300,), generator=g)
    centres = torch.tensor([[3.0, 0.0], [0.0, 3.0], [-3.0, -3.0]])
    feats = {"text": centres[labels] + 0.5 * torch.randn(300, 2, generator=g),
             "audio": torch.randn(300, 5, generator=g)}  # fmt: skip
    train, valid = _split(feats, labels, 200)
    readout = RidgeReadout(MODS, "classification", num_outputs=3).fit(*train, valid=valid)
    scores = readout(valid[0])
    assert scores.shape == (100, 3) and scores.dtype == torch.float32
    assert readout.error(*valid) < 0.05
    assert readout.error(*valid) == pytest.approx(
        1 - (scores.argmax(1) == valid[1]).float().mean().item()
    )


def test_state_dict_round_trip_into_a_fresh_readout():
    feats, y = _data()
    train, valid = _split(feats, y, 80)
    readout = RidgeReadout(MODS).fit(*train, valid=valid)
    buf = io.BytesIO()
    torch.save(readout.state_dict(), buf)
    buf.seek(0)
    fresh = RidgeReadout(MODS)
    assert not fresh.fitted
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    torch.testing.assert_close(fresh(valid[0]), readout(valid[0]))
    assert (fresh.alpha, fresh.valid_error) == (readout.alpha, readout.valid_error)
    # an unfitted state loads as unfitted
    fresh.load_state_dict(RidgeReadout(MODS).state_dict())
    assert not fresh.fitted
    with pytest.raises(ModbalanceError, match="loaded read-out has 1 output"):
        RidgeReadout(MODS, "classification", num_outputs=3).load_state_dict(readout.state_dict())
    # every entry is a tensor (the snapshot idiom {k: v.clone()} and weights_only loading work)
    assert all(isinstance(v, torch.Tensor) for v in readout.state_dict().values())
    snapshot = {k: v.detach().clone() for k, v in readout.state_dict().items()}
    RidgeReadout(MODS).load_state_dict(snapshot)


def test_predicts_in_the_features_dtype_without_gradient_or_parameters():
    feats, y = _data()
    readout = RidgeReadout(MODS, alphas=(1.0,)).fit(feats, y)
    assert list(readout.parameters()) == []
    x = {m: f.float().requires_grad_() for m, f in feats.items()}
    out = readout(x)
    assert out.dtype == torch.float32
    out.sum().backward()  # differentiable in the features, though nothing in it trains
    assert x["text"].grad is not None


def test_errors():
    feats, y = _data()
    with pytest.raises(ModbalanceError, match="not fitted"):
        RidgeReadout(MODS)(feats)
    with pytest.raises(ModbalanceError, match="choose the ridge strength on held-out data"):
        RidgeReadout(MODS).fit(feats, y)
    with pytest.raises(ModbalanceError, match="positive finite numbers"):
        RidgeReadout(MODS, alphas=(1.0, 0.0))
    with pytest.raises(ModbalanceError, match="positive finite numbers"):
        RidgeReadout(MODS, alphas=())
    with pytest.raises(ModbalanceError, match="regression has one output"):
        RidgeReadout(MODS, num_outputs=2)
    with pytest.raises(ModbalanceError, match="classification needs num_outputs >= 2 classes"):
        RidgeReadout(MODS, "classification")
    one = RidgeReadout(MODS, alphas=(1.0,))
    with pytest.raises(ModbalanceError, match=r"has no features for \['audio'\]"):
        one.fit({"text": feats["text"]}, y)
    with pytest.raises(ModbalanceError, match="has 119 rows"):
        one.fit(dict(feats, audio=feats["audio"][:-1]), y)
    with pytest.raises(ModbalanceError, match="`target` has 119 entries for 120 samples"):
        one.fit(feats, y[:-1])
    with pytest.raises(ModbalanceError, match="must be finite where the modality is present"):
        one.fit(dict(feats, text=feats["text"].clone().fill_(torch.nan)), y)
    with pytest.raises(ModbalanceError, match="`target` must be finite"):
        one.fit(feats, y.clone().fill_(torch.inf))
    with pytest.raises(ModbalanceError, match="at least 2 samples"):
        one.fit({m: f[:1] for m, f in feats.items()}, y[:1])
    with pytest.raises(TypeError, match="must map each modality"):
        one.fit(torch.zeros(3, 2), y)
    with pytest.raises(ModbalanceError, match=r"`present\['audio'\]` has 3 entries"):
        one.fit(feats, y, {"audio": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ModbalanceError, match=r"`valid` must be \(features, target\)"):
        RidgeReadout(MODS).fit(feats, y, valid=[feats, y])
    with pytest.raises(ModbalanceError, match="`valid` features must have the training features"):
        RidgeReadout(MODS).fit(feats, y, valid=(dict(feats, audio=feats["audio"][:, :2]), y))
    with pytest.raises(ModbalanceError, match=r"`valid\[1\]` has 119 entries for 120 samples"):
        RidgeReadout(MODS).fit(feats, y, valid=(feats, y[:-1]))
    one.fit(feats, y)
    with pytest.raises(ModbalanceError, match=r"fitted on feature widths \[4, 3\]"):
        one(dict(feats, audio=feats["audio"][:, :2]))
    cls = RidgeReadout(MODS, "classification", num_outputs=3, alphas=(1.0,))
    with pytest.raises(ModbalanceError, match=r"class indices in \[0, 3\), got values from 0 to 5"):
        cls.fit(feats, torch.arange(120) % 6)
    with pytest.raises(ModbalanceError, match="non-integer"):
        cls.fit(feats, torch.full((120,), 0.5))
