"""End-to-end tests of the PaSE reference model in examples/ (tiny sizes, CPU)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from examples import pase_mosi
from examples.pase import (
    CheckpointError,
    DataError,
    GuardedDataset,
    PaSEConfig,
    PaSEModel,
    SequenceEncoder,
    TrainConfig,
    Trainer,
    build,
    build_datasets,
    train_step,
)
from modbalance.data import MultimodalDataset, collate_multimodal, make_competition_data

ROOT = Path(__file__).resolve().parents[1]

SMALL = {
    "n_train": 64,
    "n_valid": 24,
    "n_test": 24,
    "dims": {"text": 12, "audio": 5, "vision": 6},
    "seq_len": 8,
}


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    return build_datasets(None, seed=0, synthetic=SMALL)


def _model_config(train, **kw) -> PaSEConfig:
    return PaSEConfig(modalities=train.modalities, input_dims=dict(train.dims), dim=16, **kw)


def _train_config(**kw) -> TrainConfig:
    base = {"epochs": 3, "batch_size": 16, "switch_epoch": 1, "progress": False}
    return TrainConfig(**(base | kw))


def _cli_args(data: Path, out: Path, *, epochs: int) -> list[str]:
    """Tiny-run CLI arguments: phase 1 for one epoch, then phase 2."""
    return [
        *("--data", str(data), "--epochs", str(epochs), "--switch-epoch", "1"),
        *("--batch-size", "16", "--dim", "16", "--out", str(out), "--quiet"),
    ]


def _fresh_test(splits):
    train, valid, test, _ = splits
    return train, valid, GuardedDataset(test._dataset)


def test_cli_runs_on_an_mmsa_file_and_writes_outputs(tmp_path):
    data = tmp_path / "aligned_tiny.pkl"
    make_competition_data(**SMALL, seed=3).save(data)
    out = tmp_path / "run"
    final = pase_mosi.main(_cli_args(data, out, epochs=3))
    assert final["selected_epoch"] in (2, 3)  # selected among phase-2 epochs, on validation
    for name in (
        "last.pt",
        "best.pt",
        "history.json",
        "history.csv",
        "final_metrics.json",
        "summary.json",
        "shapley_shares.png",
        "val_scores.png",
        "unimodal_weights.png",
    ):
        assert (out / name).is_file(), name
    assert not (out / "ot_plan.png").exists()  # alignment is off by default
    history = json.loads((out / "history.json").read_text())
    assert [r["phase"] for r in history] == [1, 2, 2]
    assert set(history[-1]["unimodal_weights"]) == {"text", "audio", "vision"}
    # the paper's configuration: every component, the paper's update modulation
    paper = tmp_path / "paper"
    pase_mosi.main(
        [
            *_cli_args(data, paper, epochs=3),
            "--calibration",
            "--alignment",
            "--gate",
            "--equilibrium",
            "pase",
            "--decision",
            "head",
        ]
    )
    for name in ("coefficients.png", "ot_plan.png"):
        assert (paper / name).is_file(), name
    history = json.loads((paper / "history.json").read_text())
    assert set(history[-1]["coefficients"]) == {"text", "audio", "vision"}
    for split in ("valid", "test"):
        for row in ("fused", "text", "audio", "vision"):
            assert 0.0 <= final[split][row]["Non0_acc_2"] <= 1.0
        assert sum(final[split]["shares"].values()) == pytest.approx(1.0, abs=1e-5)


def test_tiny_run_on_synthetic_data_goes_through_both_phases(splits, tmp_path):
    train, valid, test = _fresh_test(splits)
    config = _train_config(methods=("sgm",))
    trainer = Trainer(_model_config(train), config, train, valid, test, out_dir=tmp_path)
    final = trainer.run()
    assert [r["phase"] for r in trainer.history] == [1, 2, 2]
    assert "train_unimodal" in trainer.history[0] and "train_task" in trainer.history[1]
    assert "train_alignment" in trainer.history[1] and "train_calibration" in trainer.history[1]
    assert torch.isfinite(torch.tensor(final["test"]["fused"]["MAE"]))
    # the modulator moved away from its initial coefficients of 1
    (modulator,) = trainer.methods
    coeffs = modulator.coefficients
    assert bool((coeffs < 1).any()) and bool((coeffs <= 1 + 1e-6).all())


def _grad_norms(model: PaSEModel, loss: torch.Tensor) -> dict[str, float]:
    params = {m: [p for p in model.encoders[m].parameters()] for m in model.modalities}
    flat = [p for ps in params.values() for p in ps]
    grads = torch.autograd.grad(loss, flat, retain_graph=True, allow_unused=True)
    out, i = {}, 0
    for m, ps in params.items():
        g = grads[i : i + len(ps)]
        out[m] = sum(float(x.abs().sum()) for x in g if x is not None)
        i += len(ps)
    return out


def test_every_phase2_loss_term_sends_gradient_to_every_encoder(splits):
    train = splits[0]
    model = PaSEModel(_model_config(train))
    batch = collate_multimodal([train[i] for i in range(32)])
    model.train()
    model(batch, phase=1)  # warm the prototypes
    out, losses = model(batch, phase=2)
    assert set(losses) == {"calibration", "readout", "task", "alignment"}
    for term in ("calibration", "task", "alignment"):
        norms = _grad_norms(model, losses[term])
        assert all(v > 0 for v in norms.values()), (term, norms)
    # the read-out heads train on detached features: no gradient to the encoders in phase 2
    assert all(v == 0 for v in _grad_norms(model, losses["readout"]).values())
    assert all(v > 0 for v in _grad_norms(model, model(batch, phase=1)[1]["unimodal"]).values())
    # the step's unimodal predictions reach the encoders (methods build losses from them)
    for m in model.modalities:
        assert _grad_norms(model, out.unimodal[m].abs().mean())[m] > 0


def test_test_split_is_only_touched_by_the_final_evaluation(splits, monkeypatch):
    train, valid, test = _fresh_test(splits)
    with pytest.raises(RuntimeError, match="accessed before the final evaluation"):
        len(test)
    calls = []
    original = Trainer.evaluate

    def spy(self, dataset):
        calls.append(("test" if dataset is test else "valid", self.epoch))
        return original(self, dataset)

    monkeypatch.setattr(Trainer, "evaluate", spy)
    trainer = Trainer(_model_config(train), _train_config(epochs=2), train, valid, test)
    trainer.run()
    assert [c for c in calls if c[0] == "test"] == [("test", 2)]
    assert calls[-1] == ("test", 2) and all(c[0] == "valid" for c in calls[:-1])


def test_resume_continues_bit_exactly(splits, tmp_path):
    train, valid, test = _fresh_test(splits)
    full = Trainer(
        _model_config(train), _train_config(epochs=3), train, valid, test, tmp_path / "a"
    )
    full.run()
    train, valid, test = _fresh_test(splits)
    part = Trainer(
        _model_config(train), _train_config(epochs=2), train, valid, test, tmp_path / "b"
    )
    part.run()
    train, valid, test = _fresh_test(splits)
    resumed = Trainer(
        _model_config(train), _train_config(epochs=3), train, valid, test, tmp_path / "b"
    )
    assert resumed.resume() and resumed.epoch == 2
    resumed.run()
    keys = [k for k in full.history[-1] if k.startswith("train_")]
    assert keys
    for k in keys:
        assert resumed.history[-1][k] == full.history[-1][k], k
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    ("flags", "absent_losses"),
    [
        ({"calibration": False}, {"calibration"}),
        ({"alignment": False}, {"alignment"}),
        ({"gate": False}, set()),
        ({"baseline": True}, {"calibration", "alignment"}),
    ],
)
def test_ablation_switches_remove_their_component(splits, flags, absent_losses):
    train = splits[0]
    model = PaSEModel(_model_config(train, **flags))
    batch = collate_multimodal([train[i] for i in range(16)])
    losses = set(model(batch, phase=2)[1])
    assert not (losses & absent_losses)
    assert {"task", "readout"} <= losses
    if flags.get("alignment") is False or flags.get("baseline"):
        assert model.aligner is None
    if flags.get("gate") is False or flags.get("baseline"):
        assert model.fusion is None
        assert not any("fusion" in n for n, _ in model.named_parameters())
    if flags.get("baseline"):
        assert len(model.calibrators) == 0
    # every variant shares the same backbone class and head
    assert all(isinstance(e, SequenceEncoder) for e in model.encoders.values())


def test_method_switches(splits):
    train, valid, test = _fresh_test(splits)
    t = Trainer(_model_config(train), _train_config(methods=()), train, valid, test)
    assert t.methods == []
    t = Trainer(
        _model_config(train, baseline=True), _train_config(methods=("ogm-ge",)), train, valid, test
    )
    assert [type(m).__name__ for m in t.methods] == ["OGMGEModulator"]
    assert t.parts.schedule.phase == 2
    with pytest.raises(ValueError, match="unknown balancing method 'nope'"):
        Trainer(_model_config(train), _train_config(methods=("nope",)), train, valid, test)
    methods = pase_mosi.methods_from
    assert methods(pase_mosi.parse_args([])) == pase_mosi.PASE_METHODS == ("sge",)
    assert methods(pase_mosi.parse_args(["--no-sgm"])) == ()
    assert methods(pase_mosi.parse_args(["--equilibrium", "none"])) == ()
    assert methods(pase_mosi.parse_args(["--equilibrium", "pase"])) == ("sgm",)
    assert methods(pase_mosi.parse_args(["--baseline"])) == ()
    assert methods(pase_mosi.parse_args(["--modulator", "ogm-ge"])) == ("sge", "ogm-ge")


def test_baseline_and_pase_share_backbone_parameters(splits):
    train = splits[0]
    pase, base = PaSEModel(_model_config(train)), PaSEModel(_model_config(train, baseline=True))

    def enc(m):
        return {n: p.shape for n, p in m.named_parameters() if n.startswith(("encoders", "head."))}

    assert enc(pase) == enc(base)


@pytest.mark.distributed
def test_two_rank_torchrun_run_completes(tmp_path):
    import os
    import socket
    import subprocess

    data = tmp_path / "tiny.pkl"
    make_competition_data(**SMALL, seed=5).save(data)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={port}",
        "--master_addr=127.0.0.1",
        str(ROOT / "examples" / "pase_mosi.py"),
        *_cli_args(data, out, epochs=2),
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("selected epoch (validation)") == 1  # rank 0 reports alone
    history = json.loads((out / "history.json").read_text())
    assert [r["phase"] for r in history] == [1, 2]


def test_cli_trains_on_a_mult_iemocap_pickle(tmp_path):
    import pickle

    import numpy as np

    rng = np.random.default_rng(0)

    def split(n):
        emotion = rng.integers(0, 4, n)
        present = np.eye(4, dtype=np.float32)[emotion]
        feats = {
            m: rng.normal(size=(n, 6, d)).astype(np.float32)
            for m, d in (("text", 7), ("audio", 3), ("vision", 2))
        }
        feats["text"][:, :1] = 0  # MulT files are pre-padded
        return feats | {"labels": np.stack([1 - present, present], -1)}  # (N, 4, 2)

    path = tmp_path / "iemocap_tiny.pkl"
    with open(path, "wb") as fh:
        pickle.dump({"train": split(48), "valid": split(16), "test": split(16)}, fh)
    out = tmp_path / "iemocap"
    final = pase_mosi.main([*_cli_args(path, out, epochs=2), "--alignment"])
    for split_name in ("valid", "test"):
        assert 0.0 <= final[split_name]["fused"]["WA"] <= 1.0
        assert 0.0 <= final[split_name]["fused"]["UA"] <= 1.0
    assert (out / "ot_plan.png").is_file()


# ------------------------------------------------------------------------------------------
# one train_step for every model: the default Transformer on MMSA data, your own MLP encoders
# ------------------------------------------------------------------------------------------


def test_train_step_with_default_transformer_encoders_on_mmsa_data(splits):
    train = splits[0]
    parts = build(_model_config(train), methods=("sgm",), switch_epoch=1)
    batch = collate_multimodal([train[i] for i in range(16)])
    before = {n: p.detach().clone() for n, p in parts.model.named_parameters()}
    for phase in (1, 2):
        losses = train_step(parts, batch, phase)
        assert all(torch.isfinite(v) for v in losses.values())
    assert set(losses) == {"calibration", "readout", "task", "alignment"}
    assert parts.step == 2 and bool(parts.methods[0].initialized)
    moved = [n for n, p in parts.model.named_parameters() if not torch.equal(p, before[n])]
    assert any(n.startswith("encoders.audio") for n in moved)


class _MLP(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, 32), nn.ReLU(), nn.Linear(32, d_out))

    def forward(self, x):
        return self.net(x)


def _vector_classification_set(n=80, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    a = torch.randn(n, 7, generator=g) + torch.nn.functional.one_hot(y, classes)[:, :7].float()
    b = torch.randn(n, 5, generator=g)
    return MultimodalDataset({"a": a, "b": b}, y)


def test_train_step_with_user_mlp_encoders_on_vectors_and_ten_classes():
    ds = _vector_classification_set()
    assert ds.task == "classification"
    config = PaSEConfig(
        modalities=("a", "b"),
        input_dims={"a": 7, "b": 5},
        dim=16,
        task="classification",
        num_outputs=10,
        num_classes=10,
    )
    encoders = {"a": _MLP(7, 16), "b": _MLP(5, 16)}
    parts = build(config, methods=("sgm", "ogm-ge"), encoders=encoders, switch_epoch=1)
    assert parts.model.encoders["a"] is encoders["a"]
    batch = collate_multimodal([ds[i] for i in range(32)])
    assert batch["features"]["a"].shape == (32, 7) and batch["label"].dtype == torch.int64
    before = [p.detach().clone() for p in encoders["b"].parameters()]
    for phase in (1, 2, 2):
        losses = train_step(parts, batch, phase)
    assert {"task", "readout"} <= set(losses) and torch.isfinite(losses["task"])
    assert any(not torch.equal(p, q) for p, q in zip(encoders["b"].parameters(), before))
    out, _ = parts.model(batch, phase=2)
    assert out.fused.shape == (32, 10) and out.target.dtype == torch.int64


def test_user_encoders_must_cover_every_modality():
    config = PaSEConfig(modalities=("a", "b"), input_dims={"a": 7, "b": 5}, dim=16)
    with pytest.raises(ValueError, match="must map exactly the modalities"):
        PaSEModel(config, {"a": _MLP(7, 16)})
    with pytest.raises(TypeError, match=r"must be an nn\.Module"):
        PaSEModel(config, {"a": _MLP(7, 16), "b": lambda x: x})


# ------------------------------------------------------------------------------------------
# bad files and bad checkpoints: say which file, what is wrong, what to do
# ------------------------------------------------------------------------------------------


def test_missing_data_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        pase_mosi.main(["--data", str(tmp_path / "nope.pkl"), "--out", str(tmp_path / "o")])


def test_broken_mmsa_file_reports_the_loaders_own_error(tmp_path):
    import pickle

    data = make_competition_data(**SMALL, seed=3).data
    data["train"]["regression_labels"] = data["train"]["regression_labels"][:-5]
    path = tmp_path / "broken.pkl"
    with open(path, "wb") as fh:
        pickle.dump(data, fh)
    with pytest.raises(DataError, match=r"mmsa layout.*inconsistent lengths"):
        build_datasets(path)


def test_labels_outside_the_sentiment_range_are_refused(tmp_path):
    import pickle

    data = make_competition_data(**SMALL, seed=3).data
    for split in data.values():
        split["regression_labels"] = split["regression_labels"] * 100
    path = tmp_path / "x100.pkl"
    with open(path, "wb") as fh:
        pickle.dump(data, fh)
    with pytest.raises(DataError, match=r"outside MMSA's sentiment range \[-3, 3\]"):
        build_datasets(path)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    data = tmp_path_factory.mktemp("d") / "tiny.pkl"
    make_competition_data(**SMALL, seed=3).save(data)
    out = tmp_path_factory.mktemp("run")
    pase_mosi.main(_cli_args(data, out, epochs=2))
    return data, out


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "cannot be read"),
        (b"PK\x03\x04 truncated", "cannot be read"),
        ("foreign", "not a checkpoint of this example"),
    ],
)
def test_resume_from_a_bad_checkpoint_names_the_file(finished_run, tmp_path, content, match):
    data, _ = finished_run
    out = tmp_path / "bad"
    out.mkdir()
    if content == "foreign":
        torch.save({"weights": torch.ones(2)}, out / "last.pt")
    else:
        (out / "last.pt").write_bytes(content)
    with pytest.raises(CheckpointError, match=match) as info:
        pase_mosi.main([*_cli_args(data, out, epochs=2), "--resume"])
    assert "last.pt" in str(info.value)


def test_resume_with_other_options_or_without_checkpoint(finished_run, tmp_path):
    data, out = finished_run
    args = _cli_args(data, out, epochs=2)
    dim = args.index("--dim") + 1
    with pytest.raises(CheckpointError, match="dim: 16 -> 32"):
        pase_mosi.main([*args[:dim], "32", *args[dim + 1 :], "--resume"])
    with pytest.raises(CheckpointError, match="does not exist; drop --resume"):
        pase_mosi.main([*_cli_args(data, tmp_path / "empty", epochs=2), "--resume"])


def test_resume_of_a_finished_run_keeps_its_training_time(finished_run):
    data, out = finished_run
    before = json.loads((out / "summary.json").read_text())["wall_time_s"]
    pase_mosi.main([*_cli_args(data, out, epochs=2), "--resume"])
    after = json.loads((out / "summary.json").read_text())["wall_time_s"]
    assert after == pytest.approx(before)  # nothing more was trained


def test_help_documents_every_flag_with_defaults(capsys):
    with pytest.raises(SystemExit):
        pase_mosi.parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in ("--device", "--epochs", "--lr", "--calibration", "--no-sgm", "--resume"):
        line = next(ln for ln in text.splitlines() if ln.strip().startswith(flag))
        assert len(line.split(flag, 1)[1].strip()) > 0 or flag in text
    assert "(default: 14)" in text and "(default: 0.001)" in text


# ------------------------------------------------------------------------------------------
# decision fusion, the G-Blending holdout
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("decision", ["ensemble", "residual", "stack"])
def test_decision_fusion_averages_the_unimodal_outputs(splits, decision):
    train = splits[0]
    model = PaSEModel(_model_config(train, baseline=True, decision=decision))
    model.eval()
    batch = collate_multimodal([train[i] for i in range(8)])
    with torch.no_grad():
        feats, present = model.encode(batch["features"], batch["mask"])
        head_only = model.head(torch.stack([feats[m] for m in model.modalities]).mean(0))[:, 0]
        uni = model.unimodal(feats)
        expected = (head_only + sum(uni.values())) / (1 + len(uni))
        torch.testing.assert_close(model.fuse(feats, present), expected)
        # an absent modality's unimodal output leaves the average
        gone = dict(present, audio=torch.zeros_like(present["audio"]))
        fused = model.fuse(feats, gone)
        head2 = model.head((feats["text"] + feats["vision"]) / 2)[:, 0]
        torch.testing.assert_close(fused, (head2 + uni["text"] + uni["vision"]) / 3)
    model.train()
    _, losses = model(batch, phase=2)
    grads = torch.autograd.grad(
        losses["task"], list(model.unimodal_heads["audio"].parameters()), allow_unused=True
    )
    reached = any(g is not None and g.abs().sum() > 0 for g in grads)
    # "residual"/"stack": the fused loss cannot pull the unimodal heads; "ensemble": it trains them
    assert reached == (decision == "ensemble")
    if decision == "stack":  # the convex weights (uniform at the start) are learned
        (g,) = torch.autograd.grad(losses["task"], [model.decision_logits])
        assert g.abs().sum() > 0


def test_gblending_trains_with_a_holdout_of_the_training_split(splits):
    train, valid, test = _fresh_test(splits)
    t = Trainer(
        _model_config(train, baseline=True),
        _train_config(methods=("gblending",), epochs=5),
        train,
        valid,
        test,
    )
    assert len(t.train_set) + len(t.holdout_set) == len(train)
    ids_train = {t.train_set[i]["id"] for i in range(len(t.train_set))}
    ids_hold = {t.holdout_set[i]["id"] for i in range(len(t.holdout_set))}
    assert not ids_train & ids_hold
    t.run()
    (gb,) = t.methods
    assert int(gb.num_estimates) >= 1 and sum(gb.weights.values()) == pytest.approx(1.0, abs=1e-3)
