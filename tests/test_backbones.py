"""The suite's fusion backbones (benchmarks/backbones.py) and the ``msa-pooled`` task variant."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from benchmarks import competition, tasks
from benchmarks.backbones import BACKBONES, MulTModel, make_model
from examples.pase import PaSEConfig
from modbalance.data import make_competition_data

MODS = ("text", "audio", "vision")
DIMS = {"text": 12, "audio": 5, "vision": 7}
FUSED = ("tfn", "lmf", "mult")


def _config(modalities=MODS, **kw) -> PaSEConfig:
    kw = {"dim": 16, "heads": 4, "baseline": True, "dropout": 0.1, "decision": "head"} | kw
    return PaSEConfig(modalities=modalities, input_dims={m: DIMS[m] for m in modalities}, **kw)


def _batch(modalities=MODS, n=6, t=8, vector=False):
    g = torch.Generator().manual_seed(0)
    if vector:
        x = {m: torch.randn(n, DIMS[m], generator=g) for m in modalities}
        return x, {m: torch.ones(n, dtype=torch.bool) for m in modalities}
    x = {m: torch.randn(n, t, DIMS[m], generator=g) for m in modalities}
    lengths = torch.randint(1, t + 1, (n, 1), generator=g)
    return x, {m: torch.arange(t)[None] < lengths for m in modalities}


@pytest.mark.parametrize("name", ["late", *FUSED])
@pytest.mark.parametrize("kind", ["sequence", "vector"])
@pytest.mark.parametrize(("task", "outputs"), [("regression", 1), ("classification", 3)])
def test_head_output_shapes(name, kind, task, outputs):
    config = _config(input_kind=kind, task=task, num_outputs=outputs)
    model = make_model(name, config).eval()
    x, mask = _batch(vector=kind == "vector")
    feats, present = model.encode(x, mask)
    assert model.head_output(feats, present).shape == (6, outputs)
    width = 4 * 16 if name == "mult" else 16  # mult: K = 4 summary tokens of width 16
    assert {m: f.shape for m, f in feats.items()} == dict.fromkeys(MODS, (6, width))
    assert model.config.dim == width and config.dim == 16  # the caller's config is untouched
    uni = model.unimodal(feats)
    assert all(u.shape == ((6,) if task == "regression" else (6, outputs)) for u in uni.values())


@pytest.mark.parametrize("name", ["late", *FUSED])
@pytest.mark.parametrize("absent", MODS)
def test_an_absent_modality_is_ignored_and_matters(name, absent):
    model = make_model(name, _config()).eval()
    x, mask = _batch(n=8)
    with torch.no_grad():
        feats, present = model.encode(x, mask)
        full = model.head_output(feats, present)
        # a mixed coalition: the modality is absent for half of the samples
        gone = torch.arange(8) % 2 == 0
        coalition = dict(present) | {absent: present[absent] & ~gone}
        out = model.head_output(feats, coalition)
        assert not torch.allclose(out[gone], full[gone])  # its absence changes the output
        torch.testing.assert_close(out[~gone], full[~gone], rtol=0, atol=0)
        # ...and what its features are no longer matters at all (rows where it is absent)
        other = torch.where(gone[:, None], 1e3 * torch.randn_like(feats[absent]), feats[absent])
        again = model.head_output(dict(feats) | {absent: other}, coalition)
        torch.testing.assert_close(again, out, rtol=0, atol=0)
        # the decision rule on top sees the same
        fused = model.fuse(dict(feats) | {absent: other}, coalition)
        torch.testing.assert_close(fused, model.fuse(feats, coalition), rtol=0, atol=0)


@pytest.mark.parametrize("name", FUSED)
def test_gradients_reach_every_encoder(name):
    model = make_model(name, _config(dropout=0.0))
    x, mask = _batch()
    feats, present = model.encode(x, mask)
    model.head_output(feats, present).square().sum().backward()
    for m in MODS:
        grads = [p.grad for p in model.encoders[m].parameters() if p.requires_grad]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), m


@pytest.mark.parametrize("name", FUSED)
def test_a_single_modality_model_runs(name):
    """The ``alone`` references train each backbone on one modality (nothing to fuse)."""
    model = make_model(name, _config(("audio",)))
    x, mask = _batch(("audio",))
    feats, present = model.encode(x, mask)
    out = model.head_output(feats, present)
    assert out.shape == (6, 1) and torch.isfinite(out).all()
    out.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoders.parameters())


def test_mult_has_no_nan_when_every_source_is_absent():
    model = make_model("mult", _config(dropout=0.0))
    assert isinstance(model, MulTModel)
    x, mask = _batch()
    feats, present = model.encode(x, mask)
    only_text = {m: present[m] & (m == "text") for m in MODS}
    out = model.head_output(feats, only_text)
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_unknown_backbone_is_refused():
    with pytest.raises(ValueError, match=r"unknown backbone 'nope'; choose one of late, tfn"):
        make_model("nope", _config())
    with pytest.raises(SystemExit, match="unknown backbone 'nope'"):
        competition.run_task("msa-synthetic", ("joint",), (0,), quick=True, backbone="nope")
    assert set(BACKBONES) == {"late", "tfn", "lmf", "mult"} and BACKBONES["late"] is None


def test_backbone_is_part_of_the_cache_key():
    late = competition._fingerprint("msa-synthetic", True, "cpu")
    assert competition._fingerprint("msa-synthetic", True, "cpu", "late") == late
    keys = {competition._fingerprint("msa-synthetic", True, "cpu", b) for b in FUSED}
    assert len(keys) == 3 and late not in keys


@pytest.mark.parametrize("name", FUSED)
def test_quick_suite_runs_with_a_backbone(name, tmp_path):
    out = tmp_path / "out"
    threads = torch.get_num_threads()
    try:
        competition.main(
            [
                "--task", "msa-synthetic", "--quick", "--backbone", name, "--methods", "joint",
                "--seeds", "0", "--cache", str(tmp_path / "cache"), "--out", str(out),
                "--json", str(tmp_path / "runs.json"),
            ]
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    md = (out / f"competition_msa-synthetic_{name}_quick.md").read_text()
    assert md.startswith(f"## msa-synthetic (backbone {name})")
    summary = json.loads((out / f"competition_msa-synthetic_{name}_quick.json").read_text())
    assert summary["backbone"] == name
    assert not (out / "competition_msa-synthetic_quick.md").exists()  # late's files untouched
    runs = json.loads((tmp_path / "runs.json").read_text())
    assert runs["backbone"] == name and all(r["backbone"] == name for r in runs["runs"])
    cached = list((tmp_path / "cache").iterdir())
    assert cached and all(p.name.startswith(f"msa-synthetic_{name}_") for p in cached)


# ------------------------------------------------------------------------------ msa-pooled
SMALL = {"n_train": 40, "n_valid": 12, "n_test": 20, "seq_len": 8, "seed": 5}
SMALL_DIMS = {"text": 24, "audio": 5, "vision": 20}
#: make_competition_data(**SMALL, dims=SMALL_DIMS), computed before ``pooled_share`` existed
BEFORE = {
    "train": {"text": 596.6713777221157, "audio": -98.60065234545618,
              "vision": -25.82929172641161, "regression_labels": -28.031757863238454},
    "valid": {"text": 207.6981077133678, "audio": 41.214312912896276,
              "vision": -37.81094558478799, "regression_labels": -3.1059849560260773},
    "test": {"text": -81.56084887645557, "audio": 38.85423926636577,
             "vision": -11.218270163895795, "regression_labels": 6.406913258135319},
}  # fmt: skip
BEFORE_INT_SHA = {
    "train": "f2204ee163410263",
    "valid": "94483d0e93a6554a",
    "test": "2dc97b734232b8a4",
}
BEFORE_FLOAT_SHA = {
    "train": "2f888afd047ae3ba", "valid": "de7b94ddbf415517", "test": "ef79d392ccf75ca5"
}  # fmt: skip
BEFORE_TRUTH = {
    "text": 0.8650922098955824, "audio": 0.27106049648232805, "vision": 0.2699640935340588,
    "text+audio": 0.8949492607763072, "text+vision": 0.8943772119501483,
    "audio+vision": 0.5389123143278395, "text+audio+vision": 0.9242287067502103,
}  # fmt: skip


def _sha(split: dict, keys) -> str:
    h = hashlib.sha256()
    for k in keys:
        h.update(np.ascontiguousarray(split[k]).tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("kwargs", [{}, {"pooled_share": 0.0}])
def test_default_competition_data_is_unchanged(kwargs):
    d = make_competition_data(**SMALL, dims=SMALL_DIMS, **kwargs)
    for split, sums in BEFORE.items():
        s = d.data[split]
        for key, value in sums.items():
            assert float(np.asarray(s[key], dtype=np.float64).sum()) == pytest.approx(
                value, rel=1e-6, abs=1e-4
            )
        ints = ("text_bert", "audio_lengths", "classification_labels")
        assert _sha(s, ints) == BEFORE_INT_SHA[split]
        # bit-identical floats (this platform's BLAS; the sums above hold everywhere)
        floats = ("text", "audio", "vision", "regression_labels")
        if _sha(d.data["train"], floats) == BEFORE_FLOAT_SHA["train"]:
            assert _sha(s, floats) == BEFORE_FLOAT_SHA[split]
    np.testing.assert_allclose(
        d.data["test"]["regression_labels"][:5],
        [-0.7266997, 1.3158869, 0.40200934, 2.1006138, -1.534675],
        rtol=1e-6,
    )
    assert d.ground_truth == pytest.approx(BEFORE_TRUTH, abs=1e-12)
    assert d.config["pooled_share"] == 0.0


def _pooled_r2(d, m: str) -> float:
    """Test R² of a least-squares read-out of the label from the time-mean of ``m``'s frames."""

    def mean(split):
        s = d.data[split]
        x = s[m].astype(np.float64).sum(1) / s[f"{m}_lengths"][:, None]
        return np.c_[x, np.ones(len(x))], s["regression_labels"].astype(np.float64)

    (a, y), (b, yt) = mean("train"), mean("test")
    w = np.linalg.lstsq(a, y, rcond=None)[0]
    return 1 - float(((b @ w - yt) ** 2).mean() / yt.var())


def test_pooled_variant_survives_time_averaging():
    kw = {"n_train": 1000, "n_valid": 4, "n_test": 500, "dims": SMALL_DIMS, "seq_len": 50}
    plain = make_competition_data(**kw)
    pooled = make_competition_data(**kw, pooled_share=0.3)
    for m in ("audio", "vision"):
        assert _pooled_r2(plain, m) < 0.02  # the parity: nothing survives the mean
        # part of it does now, far from all that the modality knows
        assert 0.03 < _pooled_r2(pooled, m) < 0.5 * pooled.ground_truth[m]
    gt = pooled.ground_truth
    assert gt["text"] > 0.8 and 0.3 < gt["audio"] < gt["text"] and 0.3 < gt["vision"] < gt["text"]
    assert gt["text+audio+vision"] > gt["text"] + 0.05
    task = tasks.get_task("msa-pooled", quick=True)
    assert task.name == "msa-pooled" and task.weak == ("audio", "vision")
    assert task.info["config"]["pooled_share"] == tasks.POOLED_SHARE
    assert competition.SETTINGS["msa-pooled"] == competition.SETTINGS["msa-synthetic"]


def test_pooled_share_is_validated():
    from modbalance import ModbalanceError

    with pytest.raises(ModbalanceError, match="pooled_share"):
        make_competition_data(**SMALL, dims=SMALL_DIMS, pooled_share=1.0)
