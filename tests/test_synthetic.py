"""Tests for the synthetic competition dataset (modbalance.data.synthetic)."""

from __future__ import annotations

import itertools
import pickle

import numpy as np
import pytest
import torch

from modbalance._checks import ModbalanceError
from modbalance.data import CompetitionData, load_mmsa, make_competition_data
from modbalance.data.synthetic import _clip_moments
from modbalance.metrics import probe_score

SMALL = {"text": 16, "audio": 5, "vision": 20}
MMSA_KEYS = {
    "raw_text", "id", "text", "text_bert", "audio", "vision", "audio_lengths", "vision_lengths",
    "annotations", "classification_labels", "regression_labels",
}  # fmt: skip


@pytest.fixture(scope="module")
def small() -> CompetitionData:
    return make_competition_data(n_train=40, n_valid=12, n_test=20, seq_len=8, seed=5)


def test_layout_shapes_and_dtypes(small):
    assert set(small.data) == {"train", "valid", "test"}
    for split, n in (("train", 40), ("valid", 12), ("test", 20)):
        s = small.data[split]
        assert set(s) == MMSA_KEYS
        assert s["text"].shape == (n, 8, 768) and s["text"].dtype == np.float32
        assert s["audio"].shape == (n, 8, 5) and s["audio"].dtype == np.float32
        assert s["vision"].shape == (n, 8, 20) and s["vision"].dtype == np.float32
        assert s["text_bert"].shape == (n, 3, 8) and s["text_bert"].dtype == np.int64
        assert s["regression_labels"].shape == (n,) and s["regression_labels"].dtype == np.float32
        y = s["regression_labels"]
        assert y.min() >= -3 and y.max() <= 3
        assert len(set(s["id"])) == n and all("$_$" in i for i in s["id"])
        # classification labels / annotations agree with the sign of the label
        np.testing.assert_array_equal(s["classification_labels"], np.sign(y).astype(int) + 1)
        assert set(s["annotations"]) <= {"Negative", "Neutral", "Positive"}
        # lengths: frames before L are non-zero, frames from L on are zero (post-padding)
        lengths = s["audio_lengths"]
        np.testing.assert_array_equal(lengths, s["vision_lengths"])
        assert lengths.min() >= 4 and lengths.max() <= 8
        t = np.arange(8)[None, :]
        for m in ("text", "audio", "vision"):
            nonzero = (s[m] != 0).any(-1)
            np.testing.assert_array_equal(nonzero, t < lengths[:, None])
        np.testing.assert_array_equal(s["text_bert"][:, 1], (t < lengths[:, None]).astype(int))
        assert (s["text_bert"][:, 0, 0] == 101).all()
    ids = [i for s in small.data.values() for i in s["id"]]
    assert len(set(ids)) == len(ids)


def test_deterministic_under_seed():
    kw = {"n_train": 10, "n_valid": 3, "n_test": 4, "seq_len": 6, "dims": SMALL}
    a, b = make_competition_data(seed=7, **kw), make_competition_data(seed=7, **kw)
    c = make_competition_data(seed=8, **kw)
    for split in a.data:
        for key, value in a.data[split].items():
            np.testing.assert_array_equal(value, b.data[split][key])
    assert a.ground_truth == b.ground_truth
    assert not np.array_equal(a.data["train"]["audio"], c.data["train"]["audio"])
    assert not np.array_equal(
        a.data["train"]["regression_labels"], c.data["train"]["regression_labels"]
    )


def test_save_roundtrip_matches_dataset(small, tmp_path):
    path = tmp_path / "synthetic.pkl"
    small.save(path)
    with open(path, "rb") as f:
        raw = pickle.load(f)
    assert set(raw) == {"train", "valid", "test"}
    for split in ("train", "test"):
        loaded = load_mmsa(path, split=split)
        direct = small.dataset(split)
        assert loaded.modalities == direct.modalities == ("text", "audio", "vision")
        assert loaded.dims == {"text": 768, "audio": 5, "vision": 20}
        torch.testing.assert_close(loaded.labels, direct.labels, rtol=0, atol=0)
        lengths = torch.from_numpy(small.data[split]["audio_lengths"])
        for m in loaded.modalities:
            torch.testing.assert_close(loaded.lengths(m), lengths)
        for i in (0, len(direct) - 1):
            a, b = loaded[i], direct[i]
            assert a["id"] == b["id"] == small.data[split]["id"][i]
            for m in loaded.modalities:
                L = int(lengths[i])
                expected = torch.from_numpy(small.data[split][m][i, :L])
                torch.testing.assert_close(a["features"][m], expected, rtol=0, atol=0)
                torch.testing.assert_close(b["features"][m], expected, rtol=0, atol=0)


def test_dataset_does_not_copy_or_mutate(small):
    ds = small.dataset("train")
    assert ds.padded("text").data_ptr() == torch.from_numpy(small.data["train"]["text"]).data_ptr()
    with pytest.raises(ModbalanceError, match="split"):
        small.dataset("dev")


def _pooled(d: CompetitionData, split: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    s = d.data[split]
    length = s["audio_lengths"].astype(np.float64)[:, None]
    pooled = {m: s[m].astype(np.float64).sum(1) / length for m in ("text", "audio", "vision")}
    return pooled, s["regression_labels"].astype(np.float64)


def _fit(x: np.ndarray, y: np.ndarray, *xs: np.ndarray) -> list[np.ndarray]:
    w = np.linalg.lstsq(np.c_[np.ones(len(x)), x], y, rcond=None)[0]
    return [np.c_[np.ones(len(z)), z] @ w for z in xs]


def _r2(y: np.ndarray, pred: np.ndarray) -> float:
    return 1.0 - float(((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum())


def test_ground_truth_matches_a_fitted_model_on_a_large_sample():
    """Fit the sufficient statistics with a cubic model on a large sample; R^2 must match."""
    d = make_competition_data(
        n_train=30000, n_valid=1, n_test=20000, dims=SMALL, seq_len=16, frame_noise=2.0, seed=3
    )
    ptr, ytr = _pooled(d, "train")
    pte, yte = _pooled(d, "test")
    # scalar statistic per modality: linear read-out for text, top principal direction for the
    # weak modalities (their signal is the only direction with extra variance)
    s_tr, s_te = {}, {}
    s_tr["text"], s_te["text"] = _fit(ptr["text"], ytr, ptr["text"], pte["text"])
    for m in ("audio", "vision"):
        u = np.linalg.eigh(np.cov(ptr[m].T))[1][:, -1]
        s_tr[m], s_te[m] = ptr[m] @ u, pte[m] @ u

    def basis(stats, subset):
        base = [stats[m] for m in subset] + (
            [np.abs(stats["vision"])] if "vision" in subset else []
        )
        base = np.stack(base, 1)
        cols = [
            np.prod(base[:, list(idx)], 1)
            for deg in (1, 2, 3)
            for idx in itertools.combinations_with_replacement(range(base.shape[1]), deg)
        ]
        return np.stack(cols, 1)

    assert len(d.ground_truth) == 7
    for key, truth in d.ground_truth.items():
        subset = key.split("+")
        (pred,) = _fit(basis(s_tr, subset), ytr, basis(s_te, subset))
        assert _r2(yte, pred) == pytest.approx(truth, abs=0.012), key


def test_ground_truth_total_variance_matches_sample():
    d = make_competition_data(n_train=40000, n_valid=1, n_test=1, dims={"text": 2, "audio": 1,
                              "vision": 1}, seq_len=2, seed=1)  # fmt: skip
    y = d.data["train"]["regression_labels"].astype(np.float64)
    assert y.var() == pytest.approx(d.label_variance, rel=0.03)


def test_clip_moments_against_monte_carlo():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400000, generator=g, dtype=torch.float64)
    for mu, sd in ((0.0, 1.0), (2.5, 0.7), (-3.2, 0.4), (1.0, 3.0)):
        c = (mu + sd * x).clamp(-3, 3)
        m1, m2 = _clip_moments(torch.tensor(mu, dtype=torch.float64), torch.tensor(sd**2))
        assert float(m1) == pytest.approx(float(c.mean()), abs=0.01)
        assert float(m2) == pytest.approx(float((c * c).mean()), abs=0.02)


def test_competition_properties():
    d = make_competition_data(n_train=8, n_valid=2, n_test=2, dims=SMALL)  # MOSI's seq_len 50
    gt = d.ground_truth
    assert gt["text"] > gt["audio"] > 0.05 and gt["text"] > gt["vision"] > 0.05
    assert gt["text+audio+vision"] > gt["text"] + 0.25
    assert gt["audio+vision"] > gt["audio"] + gt["vision"]  # the interaction needs both
    for a, b in itertools.combinations(gt, 2):  # more modalities never explain less
        if set(a.split("+")) < set(b.split("+")):
            assert gt[a] <= gt[b] + 1e-9
    dominant = make_competition_data(n_train=8, n_valid=2, n_test=2, dims=SMALL, text_strength=0.8)
    assert dominant.ground_truth["text"] > gt["text"] + 0.2
    assert dominant.ground_truth["audio"] < gt["audio"]
    assert (
        dominant.ground_truth_for(["vision", "text", "audio"])
        == dominant.ground_truth["text+audio+vision"]
    )


def test_text_is_easy_and_vision_is_nonlinear():
    """A linear probe on ONE text frame reaches the text ground truth; on pooled vision ~0."""
    d = make_competition_data(n_train=3000, n_valid=1, n_test=2000, dims=SMALL, seq_len=10, seed=2)
    tr, te = d.data["train"], d.data["test"]
    r2_text = probe_score(tr["text"][:, 0], tr["regression_labels"], te["text"][:, 0],
                          te["regression_labels"])  # fmt: skip
    assert 0.85 * d.ground_truth["text"] < r2_text < d.ground_truth["text"] + 0.03
    ptr, ytr = _pooled(d, "train")
    pte, yte = _pooled(d, "test")
    r2_vision = probe_score(ptr["vision"], ytr, pte["vision"], yte)
    assert r2_vision < 0.02 < d.ground_truth["vision"]
    # a single audio frame is far weaker than the pooled audio
    r2_frame = probe_score(tr["audio"][:, 0], ytr, te["audio"][:, 0], yte)
    r2_pool = probe_score(ptr["audio"], ytr, pte["audio"], yte)
    assert r2_frame < r2_pool - 0.03


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_train": 0}, "n_train"),
        ({"seq_len": 1}, "seq_len"),
        ({"text_strength": 1.0}, "text_strength"),
        ({"text_strength": 0.0}, "text_strength"),
        ({"noise": -0.1}, "noise"),
        ({"frame_noise": float("nan")}, "frame_noise"),
        ({"dims": {"text": 4, "audio": 2}}, "dims"),
        ({"dims": {"text": 4, "audio": 0, "vision": 3}}, "audio"),
    ],
)
def test_argument_errors(kwargs, match):
    with pytest.raises(ModbalanceError, match=match):
        make_competition_data(**kwargs)


def test_ground_truth_for_errors(small):
    with pytest.raises(ModbalanceError, match="subset"):
        small.ground_truth_for(["smell"])
    with pytest.raises(ModbalanceError, match="subset"):
        small.ground_truth_for([])
