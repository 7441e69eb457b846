"""The benchmarks in benchmarks/ run (``--quick``) and write what the docs and README show."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import balance  # noqa: E402
import run_all  # noqa: E402
import speed  # noqa: E402


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    """One ``run_all.py --quick`` over every benchmark (the slow part of this file)."""
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    try:
        written = run_all.main(["--quick", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    return out, written


def test_run_all_quick_writes_every_table_and_plot(quick_results):
    out, written = quick_results
    assert sorted(p.name for p in written) == sorted(f"{n}.md" for n in run_all.BENCHMARKS)
    for name in run_all.BENCHMARKS:
        text = (out / f"{name}.md").read_text()
        assert text.startswith("# ") and "|---" in text, name
        assert (out / f"{name}.png").stat().st_size > 1000, name
        assert f"({name}.png)" in text


def test_balance_quick_result_is_complete_and_sane(quick_results):
    out, _ = quick_results
    result = json.loads((out / "balance.json").read_text())
    (level,) = result["levels"]
    gt = level["ground_truth"]
    assert 0 < gt["text"] < gt["text+audio+vision"] < 1
    summary = level["summary"]
    assert set(summary["methods"]) == {"joint", "pase"}
    assert set(summary["alone"]) == {"text", "audio", "vision"}
    for row in summary["methods"].values():
        assert 0 <= row["Non0_acc_2"][0] <= 1 and row["MAE"][0] > 0
        assert row["probe_text"][0] <= 1
        shares = sum(row[f"share_{m}"][0] for m in ("text", "audio", "vision"))
        assert shares == pytest.approx(1.0, abs=1e-4)
        # R^2 / ground truth is computed from the same fused R^2
        assert row["gt_fraction"][0] == pytest.approx(row["fused_r2"][0] / gt["text+audio+vision"])
    assert set(summary["targets"]) == {"Non0_acc_2", "MAE", "probe_audio+5pts", "probe_vision+5pts"}
    text = (out / "balance.md").read_text()
    assert "| joint |" in text and "| pase |" in text and "wall time" in text


def test_speed_quick_result_is_complete_and_sane(quick_results):
    out, _ = quick_results
    result = json.loads((out / "speed.json").read_text())
    main = result["main"]
    assert main["plain_ms"] > 0 and main["pase_ms"] > 0
    assert main["ratio"] == pytest.approx(main["pase_ms"] / main["plain_ms"])
    names = [r["component"] for r in result["breakdown"]]
    for piece in (
        "encoders",
        "calibration",
        "OT alignment",
        "gated fusion",
        "Shapley game",
        "modulator",
    ):
        assert any(piece in n for n in names), piece
    assert {r["axis"] for r in result["sweep"]} == {"batch", "K", "M"}
    assert all(r["pase_ms"] > 0 and r["plain_ms"] > 0 for r in result["sweep"])


def _fake_run(fused: dict, probe: dict, shares: dict, r2: float) -> dict:
    return {"fused": fused, "probe": probe, "shares": shares, "fused_r2": r2, "time_s": 1.0}


def test_summarize_means_stds_recovery_and_targets():
    mods = ("text", "audio", "vision")
    fused = {k: 0.5 for k in balance.METRICS}
    runs = {
        f"alone:{m}": [_fake_run(fused, {m: v}, {m: 1.0}, 0.0) for v in (0.4, 0.6)] for m in mods
    }
    share = dict.fromkeys(mods, 1 / 3)
    runs["joint"] = [
        _fake_run(fused | {"MAE": 0.8, "Non0_acc_2": 0.7}, dict.fromkeys(mods, 0.1), share, 0.4),
        _fake_run(fused | {"MAE": 0.6, "Non0_acc_2": 0.7}, dict.fromkeys(mods, 0.1), share, 0.6),
    ]
    runs["pase"] = [
        _fake_run(
            fused | {"MAE": 0.5, "Non0_acc_2": 0.8},
            {"text": 0.2, "audio": 0.16, "vision": 0.12},
            share,
            0.8,
        )
    ] * 2
    s = balance.summarize(runs, {"text+audio+vision": 0.8}, ("joint", "pase"))
    joint, pase = s["methods"]["joint"], s["methods"]["pase"]
    assert joint["MAE"][0] == pytest.approx(0.7)
    assert joint["MAE"][1] == pytest.approx(math.sqrt(0.02))  # sample std of 0.8, 0.6
    assert joint["gt_fraction"][0] == pytest.approx(0.625)  # mean of 0.4/0.8 and 0.6/0.8
    assert s["alone"]["audio"][0] == pytest.approx(0.5)
    assert pase["recovered_audio"][0] == pytest.approx(0.16 / 0.5)
    # audio gains 6 points (>= 5: met), vision 2 points (missed)
    assert s["targets"] == {
        "Non0_acc_2": True,
        "MAE": True,
        "probe_audio+5pts": True,
        "probe_vision+5pts": False,
    }


def test_speed_steps_train_and_only_pase_modulates():
    dims = {"text": 6, "audio": 3}
    batch = speed.make_batch(8, 5, dims, "regression", 7, "cpu")
    assert batch["mask"]["text"].any(1).all() and batch["label"].abs().max() <= 3
    for pase in (False, True):
        trainer = speed.build(pase, dims, "cpu", dim=8)
        step = speed.make_step(trainer, batch, None)
        before = [p.detach().clone() for p in trainer.model.parameters()]
        if pase:
            step(phase=1)
            trainer._set_attached(True)
        step()
        changed = any(not torch.equal(a, p) for a, p in zip(before, trainer.model.parameters()))
        assert changed
        if pase:
            assert trainer.modulator is not None and bool(trainer.modulator.initialized)
            trainer._set_attached(False)
        else:
            assert trainer.modulator is None and trainer.model.fusion is None


def test_summarize_reports_no_recovery_ratio_when_alone_probe_is_not_positive():
    mods = ("text", "audio", "vision")
    fused = {k: 0.5 for k in balance.METRICS}
    share = dict.fromkeys(mods, 1 / 3)
    runs = {
        f"alone:{m}": [_fake_run(fused, {m: v}, {m: 1.0}, 0.0) for v in (-0.01, 0.005)]
        for m in mods
    }
    runs["joint"] = [_fake_run(fused, dict.fromkeys(mods, 0.1), share, 0.5)] * 3
    s = balance.summarize(runs, {"text+audio+vision": 0.8}, ("joint",))
    row = s["methods"]["joint"]
    assert math.isnan(row["recovered_vision"][0]) and row["probe_vision"][0] == pytest.approx(0.1)
    assert row["MAE"] == (0.5, 0.0)
    text = balance.to_markdown(
        {
            "levels": [
                {
                    "text_strength": 0.8,
                    "summary": s,
                    "ground_truth": dict.fromkeys(
                        ("text", "audio", "vision", "text+audio+vision"), 0.5
                    ),
                }
            ]
        }
    )
    assert "(n/a)" in text and "Targets" not in text  # no PaSE row, no targets line


def test_balance_run_cache_resumes_without_retraining(tmp_path, monkeypatch):
    calls = []
    original = balance.train_one

    def counting(*args, **kwargs):
        calls.append(args[1])
        return original(*args, **kwargs)

    monkeypatch.setattr(balance, "train_one", counting)
    kw = {"quick": True, "methods": ("joint",), "cache_dir": tmp_path, "log": lambda _: None}
    first = balance.run(**kw)
    assert len(calls) == 4  # three modalities alone + joint
    second = balance.run(**kw)
    assert len(calls) == 4  # everything came from the cache
    same = [json.dumps(r["levels"][0]["summary"], sort_keys=True) for r in (first, second)]
    assert same[0] == same[1]  # (NaN-aware: the quick probes trained alone can be <= 0)
    assert len(list(tmp_path.glob(f"{balance.fingerprint(balance.QUICK, 'cpu')}_*.json"))) == 4
