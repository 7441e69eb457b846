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
    PAPER_SWITCHES,
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
    """The paper's model (every prototype component, the fusion head alone), small."""
    kw = PAPER_SWITCHES | kw
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
        "coefficients.png",
    ):
        assert (out / name).is_file(), name
    assert not (out / "ot_plan.png").exists()  # alignment is off by default
    history = json.loads((out / "history.json").read_text())
    assert [r["phase"] for r in history] == [1, 2, 2]
    assert {f"coefficient_{m}" for m in ("text", "audio", "vision")} <= set(history[-1]["methods"])
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
    assert set(history[-1]["methods"]) == {f"coefficient_{m}" for m in ("text", "audio", "vision")}
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

    def spy(self, dataset, **kw):
        calls.append(("test" if dataset is test else "valid", self.epoch))
        return original(self, dataset, **kw)

    monkeypatch.setattr(Trainer, "evaluate", spy)
    trainer = Trainer(_model_config(train), _train_config(epochs=2), train, valid, test)
    trainer.run()
    assert [c for c in calls if c[0] == "test"] == [("test", 2)]
    assert calls[-1] == ("test", 2) and all(c[0] == "valid" for c in calls[:-1])


def test_epoch_shares_off_skips_only_the_per_epoch_game(splits, tmp_path):
    """``epoch_shares=False``: no validation game after the epochs, the same run otherwise."""
    runs = []
    for flag in (True, False):
        train, valid, test = _fresh_test(splits)
        config = _train_config(epochs=3, methods=("sgm",), epoch_shares=flag)
        trainer = Trainer(_model_config(train), config, train, valid, test, tmp_path / str(flag))
        runs.append((trainer, trainer.run()))
    (on, final_on), (off, final_off) = runs
    assert all("shares" in r["val"] for r in on.history)
    assert not any("shares" in r["val"] or "shapley" in r["val"] for r in off.history)
    assert final_off == final_on  # the final evaluation still has them, and nothing else moved
    assert "shares" in final_off["valid"] and "shares" in final_off["test"]
    for a, b in zip(on.model.state_dict().values(), off.model.state_dict().values()):
        assert torch.equal(a, b)
    assert "shares" not in off._epoch_line(off.history[-1])
    assert "| shares " in on._epoch_line(on.history[-1])
    from examples.pase.plots import plot_history

    (tmp_path / "plots").mkdir()
    names = {p.name for p in plot_history(off.history, off.model.modalities, tmp_path / "plots")}
    assert "shapley_shares.png" not in names and "val_scores.png" in names


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
        assert torch.equal(a, b) if torch.is_tensor(a) else a == b, name


def test_the_readout_epoch_scores_validation_from_the_pass_it_fitted_on(splits, monkeypatch):
    """After a read-out fit the validation split is not predicted again: the kept features give
    the re-fitted read-out's predictions batch by batch, the same values as a new pass."""
    train, valid, test = _fresh_test(splits)
    mc = PaSEConfig(
        modalities=train.modalities, input_dims=dict(train.dims), dim=16, readout="ridge"
    )

    def fit_and_predict_again(self):  # the previous behaviour: validation predicted anew
        self._fit_readout_on(self.predict(self.train_set), self.predict(self.valid_set))

    def run(reuse: bool):
        if not reuse:
            monkeypatch.setattr(Trainer, "_fit_readout", fit_and_predict_again)
        trainer = Trainer(mc, _train_config(epochs=3, batch_size=7), train, valid, test)
        passes = []
        predict = trainer.predict
        trainer.predict = lambda ds: passes.append(ds is valid) or predict(ds)
        trainer.fit()
        monkeypatch.undo()
        return trainer, passes

    kept, kept_passes = run(True)
    again, again_passes = run(False)
    assert kept_passes.count(True) == again_passes.count(True) - 2  # one per phase-2 epoch
    assert len(valid) % 7 != 0  # a short last batch is predicted like the others
    for a, b in zip(kept.history, again.history):
        assert a["val"] == b["val"] and a.get("train_task") == b.get("train_task")
    assert kept.best_epoch == again.best_epoch
    for (name, x), y in zip(kept.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(x, y), name


def test_ridge_readout_is_refitted_in_phase_2_and_selects_the_checkpoint(splits, tmp_path):
    """PaSEConfig(readout="ridge"): re-fitted after every phase-2 epoch (train split, strength on
    validation), the checkpoint selected on its validation error, kept in best.pt, and the test
    predictions are the read-out's."""
    train, valid, test = _fresh_test(splits)
    mc = PaSEConfig(
        modalities=train.modalities, input_dims=dict(train.dims), dim=16, readout="ridge"
    )
    trainer = Trainer(mc, _train_config(epochs=3), train, valid, test, out_dir=tmp_path)
    fits = []
    fit = trainer.model.readout.fit
    trainer.model.readout.fit = lambda *a, **k: fits.append(trainer.epoch) or fit(*a, **k)
    final = trainer.run()
    assert fits == [1, 2]  # after the phase-2 epochs only (epoch 0 is the warm-up)
    readout = trainer.model.readout
    assert readout.fitted and readout.alpha in readout.alphas
    # selection read the read-out's validation MAE: the selected epoch's is the best of them
    vals = [r["val"]["fused"]["MAE"] for r in trainer.history if r["phase"] == 2]
    assert trainer.best_value == min(vals)
    assert final["valid"]["fused"]["MAE"] == pytest.approx(readout.valid_error, abs=1e-4)
    # the test predictions are the read-out on the test features (not the fusion head)
    out = trainer.test_predictions
    torch.testing.assert_close(out["preds"]["fused"], readout(out["features"], out["present"]))
    with torch.no_grad():
        head = trainer.model.fuse(out["features"], out["present"])
    assert not torch.allclose(head, out["preds"]["fused"])
    # the checkpoint on disk carries the selected read-out
    best = torch.load(tmp_path / "best.pt", weights_only=True)["model"]
    assert float(best["readout.chosen"][0]) == readout.alpha
    with pytest.raises(ValueError, match="readout must be 'auto', 'head' or 'ridge'"):
        PaSEConfig(modalities=("a", "b"), input_dims={"a": 2, "b": 2}, readout="lasso")


def test_readout_auto_is_ridge_for_regression_only():
    kw = {"modalities": ("a", "b"), "input_dims": {"a": 2, "b": 2}}
    assert PaSEConfig(**kw).readout == "ridge"
    assert PaSEConfig(**kw, baseline=True).readout == "head"  # the plain reference
    assert PaSEConfig(**kw, task="classification", num_outputs=3).readout == "head"
    assert PaSEConfig(**kw, **PAPER_SWITCHES).readout == "head"  # the paper predicts with its head
    assert PaSEConfig(**kw, baseline=True, readout="ridge").readout == "ridge"  # joint + read-out


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
    with pytest.raises(SystemExit):  # one flag per setting: --equilibrium none
        pase_mosi.parse_args(["--no-sgm"])
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
        **PAPER_SWITCHES,
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
    # an nn.ModuleDict is accepted like any mapping of modules
    encoders = nn.ModuleDict({"a": _MLP(7, 16), "b": _MLP(5, 16)})
    assert PaSEModel(config, encoders).encoders["b"] is encoders["b"]
    with pytest.raises(ValueError, match="must map exactly the modalities"):
        PaSEModel(config, nn.ModuleDict({"a": _MLP(7, 16)}))


def test_the_example_step_is_the_librarys():
    """`examples/pase` holds no backward pass, no method contexts and no decision logic."""
    import inspect

    from examples.pase import model as model_module
    from examples.pase import step as step_module

    step_src = inspect.getsource(step_module)
    for needle in (".backward(", "around_step", "ExitStack"):
        assert needle not in step_src, needle
    model_src = inspect.getsource(model_module)
    assert "detach()" not in model_src.split("def _decide")[1].split("def head_output")[0]


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
    for flag in ("--device", "--epochs", "--lr", "--calibration", "--equilibrium", "--resume"):
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
        (g,) = torch.autograd.grad(losses["task"], [model.decision.logits])
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
    assert int(gb.num_estimates) >= 1 and float(gb.blend.sum()) == pytest.approx(1.0, abs=1e-3)


# ------------------------------------------------------------------------------------------
# the command line: display flags, resume, --out, numbers, Ctrl-C, threads
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_steps", [None, 2])
def test_progress_bars_do_not_change_the_results(splits, capsys, max_steps):
    """--quiet is a display flag: with and without progress bars every bit is the same.

    The bar used to wrap the loader, and tqdm.auto's class iterates what it wraps in its
    constructor: that extra iter() drew from the loader's seeded generator and changed the
    batch order.
    """
    runs = []
    for progress in (True, False):
        train, valid, test = _fresh_test(splits)
        config = _train_config(progress=progress, max_steps_per_epoch=max_steps)
        trainer = Trainer(_model_config(train), config, train, valid, test)
        final = trainer.run()
        history = [{k: v for k, v in r.items() if k != "time_s"} for r in trainer.history]
        runs.append((final, history, trainer.model.state_dict(), torch.get_rng_state()))
    assert "epoch 1/3 (phase 1)" in capsys.readouterr().err  # the bars were drawn
    (final_a, hist_a, state_a, rng_a), (final_b, hist_b, state_b, rng_b) = runs
    assert final_a == final_b
    assert hist_a == hist_b
    assert [r["steps"] for r in hist_a] == [max_steps or 4] * 3
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        a, b = state_a[name], state_b[name]
        assert torch.equal(a, b) if torch.is_tensor(a) else a == b, name
    assert torch.equal(rng_a, rng_b)


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (["--lr", "0.5"], r"--lr 0\.001 in the checkpoint, --lr 0\.5 now.*resume with --lr 0\.001"),
        (["--weight-decay", "0.01"], r"--weight-decay 0\.0001 in the checkpoint, --weight-decay"),
        (["--seed", "3"], r"--seed 0 in the checkpoint, --seed 3 now.*resume with --seed 0"),
        (["--patience", "2"], r"no --patience in the checkpoint, --patience 2 now"),
        (
            ["--lr", "0.5", "--switch-epoch", "0"],
            r"--lr 0\.5 now; --switch-epoch 1 in the checkpoint, --switch-epoch 0 now.*"
            r"resume with --lr 0\.001 --switch-epoch 1",
        ),
    ],
)
def test_resume_refuses_optimisation_options_it_cannot_honour(finished_run, flags, match):
    """The checkpoint restores the optimiser, schedule and RNG: a new --lr would be ignored."""
    data, out = finished_run
    before = (out / "last.pt").read_bytes()
    with pytest.raises(CheckpointError, match=match) as info:
        pase_mosi.main([*_cli_args(data, out, epochs=2), *flags, "--resume"])
    assert str(out / "last.pt") in str(info.value) and "another --out" in str(info.value)
    assert (out / "last.pt").read_bytes() == before


def test_resume_records_what_ran(finished_run, tmp_path):
    import shutil

    data, finished = finished_run
    out = tmp_path / "copy"
    shutil.copytree(finished, out)
    pase_mosi.main([*_cli_args(data, out, epochs=3), "--resume", "--batch-size", "8"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["args"]["lr"] == summary["train_config"]["lr"] == 1e-3
    assert summary["optimizer"] == {"lr": 1e-3, "weight_decay": 1e-4}  # what the optimiser used
    resumed = summary["resumed"]
    assert resumed["epoch"] == 2 and resumed["checkpoint"] == str(out / "last.pt")
    assert resumed["changed"] == {"epochs": [2, 3], "batch_size": [16, 8]}


def test_out_holding_a_run_needs_resume_or_overwrite(finished_run, tmp_path, monkeypatch):
    import shutil

    data, finished = finished_run
    out = tmp_path / "pase"
    shutil.copytree(finished, out)
    (out / "coefficients.png").write_bytes(b"stale plot of the old run")
    before = (out / "last.pt").read_bytes()
    with pytest.raises(pase_mosi.OutputError) as info:
        pase_mosi.main([*_cli_args(data, out, epochs=2), "--baseline"])
    message = str(info.value)
    assert f"--out {out} already holds a run" in message
    assert "--resume to continue" in message and "--overwrite to replace" in message
    assert f"--out {out}_baseline" in message
    assert (out / "last.pt").read_bytes() == before  # nothing was touched
    pase_mosi.main([*_cli_args(data, out, epochs=2), "--baseline", "--overwrite"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["args"]["baseline"] and summary["resumed"] is None
    assert not (out / "coefficients.png").exists()  # the old run's files are gone
    with pytest.raises(SystemExit) as exit_info:
        pase_mosi.main([*_cli_args(data, out, epochs=2), "--resume", "--overwrite"])
    assert exit_info.value.code == 2


def test_out_that_cannot_be_written_is_refused_before_training(tmp_path, monkeypatch):
    import errno

    def no_data(*args, **kwargs):
        raise AssertionError("--out must be checked before the data are built")

    monkeypatch.setattr(pase_mosi, "build_datasets", no_data)
    data = tmp_path / "tiny.pkl"
    data.write_bytes(b"")  # never read
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    with pytest.raises(pase_mosi.OutputError, match=r"notes\.txt is a file, not a folder"):
        pase_mosi.main(_cli_args(data, a_file, epochs=2))
    with pytest.raises(pase_mosi.OutputError, match=r"cannot be written \(NotADirectoryError"):
        pase_mosi.main(_cli_args(data, a_file / "run", epochs=2))

    def read_only(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(kwargs.get("dir")))

    monkeypatch.setattr(pase_mosi.tempfile, "TemporaryFile", read_only)  # a read-only folder
    with pytest.raises(
        pase_mosi.OutputError, match=r"cannot be written \(PermissionError.*a folder you can write"
    ):
        pase_mosi.main(_cli_args(data, tmp_path / "ro", epochs=2))


def test_out_errors_exit_with_status_2_from_the_command_line(tmp_path):
    import subprocess

    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    cmd = [sys.executable, str(ROOT / "examples" / "pase_mosi.py"), "--out", str(a_file)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"error: --out {a_file} is a file, not a folder; pass a folder for the run's "
        f"checkpoints, logs and plots, e.g. --out {tmp_path / 'notes'}_run"
    )


_NUMBER_CASES = [
    (["--epochs", "0"], r"argument --epochs: must be an integer >= 1 .*e\.g\. --epochs 14.*got 0"),
    (["--epochs", "3"], r"--epochs 3 ends before phase 2 .*--switch-epoch 4"),
    (["--dim", "0"], r"argument --dim: must be an integer >= 1 .*got 0"),
    (["--dim", "30"], r"argument --dim: .*multiple of 4, got 30; e\.g\. --dim 28"),
    (["--batch-size", "0"], r"argument --batch-size: must be an integer >= 1 .*got 0"),
    (["--lr", "0"], r"argument --lr: must be a finite number > 0 .*e\.g\. --lr 1e-3.*got 0"),
    (["--lr", "-0.1"], r"argument --lr: must be a finite number > 0 .*got -0\.1"),
    (["--lr", "nan"], r"argument --lr: must be a finite number > 0 .*got nan"),
    (["--lr", "inf"], r"argument --lr: must be a finite number > 0 .*got inf"),
    (["--weight-decay", "-1"], r"argument --weight-decay: must be a finite number >= 0"),
    (["--layers", "0"], r"argument --layers: must be an integer >= 1 .*got 0"),
    (["--seed", "-1"], r"argument --seed: must be an integer >= 0 .*got -1"),
    (["--seed", str(2**32)], r"argument --seed: must be below 2\*\*32"),
    (["--game-every", "0"], r"argument --game-every: must be an integer >= 1 .*got 0"),
    (["--max-steps-per-epoch", "0"], r"argument --max-steps-per-epoch: .*>= 1 .*got 0"),
    (["--patience", "0"], r"argument --patience: must be an integer >= 1 .*got 0"),
    (["--switch-epoch", "-1"], r"argument --switch-epoch: must be an integer >= 0 .*got -1"),
    (["--threads", "0"], r"argument --threads: must be an integer >= 1 .*got 0"),
    (["--n-train", "0"], r"argument --n-train: must be an integer >= 1 .*got 0"),
    (["--text-strength", "1.5"], r"argument --text-strength: .*> 0 and < 1 .*got 1\.5"),
    (["--epochs", "two"], r"argument --epochs: expected an integer .*got 'two'"),
    (["--device", "gpu"], r"argument --device: 'gpu' is not a torch device .*--device cpu"),
    (["--resume", "--overwrite"], r"--resume and --overwrite contradict each other"),
]


@pytest.mark.parametrize(
    ("argv", "match"), _NUMBER_CASES, ids=[" ".join(c[0]) for c in _NUMBER_CASES]
)
def test_bad_command_line_numbers_exit_with_status_2_naming_flag_and_value(argv, match, capsys):
    import re

    with pytest.raises(SystemExit) as info:
        pase_mosi.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(match, err), err


def test_data_options_that_do_not_fit_exit_with_status_2(tmp_path, capsys):
    import re

    data = tmp_path / "aligned_50.pkl"
    data.write_bytes(b"")
    for argv, match in [
        (["--data", str(data), "--n-train", "100"], r"argument --n-train: --n-train 100 only "
         r"shapes the synthetic data, but --data .* is given; drop --n-train"),
        (["--data", str(data), "--text-strength", "0.5"], r"drop --text-strength"),
        (["--data", str(tmp_path)], rf"argument --data: {re.escape(str(tmp_path))} is a folder; "
         rf"pass the pickle file itself, e\.g\. --data {re.escape(str(data))} \(pickles there: "
         r"aligned_50\.pkl\)"),
    ]:  # fmt: skip
        with pytest.raises(SystemExit) as info:
            pase_mosi.main(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert re.search(match, err), err


def test_cuda_device_without_a_gpu_is_a_clear_error(capsys):
    device = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU, or cuda:0 without GPUs
    with pytest.raises(SystemExit) as info:
        pase_mosi.main(["--device", device])
    assert info.value.code == 2
    err = capsys.readouterr().err
    if torch.cuda.is_available():
        assert f"--device {device} asks for GPU" in err, err
    else:
        assert f"--device {device} needs a CUDA GPU" in err and "use --device cpu" in err, err


@pytest.mark.parametrize("finished_epochs", [1, 0])
def test_ctrl_c_stops_with_one_line_and_status_130(
    finished_run, tmp_path, monkeypatch, capsys, finished_epochs
):
    data, _ = finished_run
    original = Trainer.train_epoch

    def interrupted(self):
        if self.epoch == finished_epochs:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(Trainer, "train_epoch", interrupted)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        pase_mosi.main(_cli_args(data, out, epochs=3))
    assert info.value.code == 130
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "the run stopped" in lines[0], lines
    if finished_epochs:
        assert "--resume" in lines[0] and f"--out {out}" in lines[0]
        assert str(out / "last.pt") in lines[0]
        monkeypatch.undo()
        final = pase_mosi.main([*_cli_args(data, out, epochs=3), "--resume"])
        assert final["selected_epoch"] in (2, 3)
    else:
        assert "--resume" not in lines[0] and "no epoch finished" in lines[0]


def test_threads_flag_sets_torch_threads_and_is_recorded(finished_run, tmp_path, monkeypatch):
    data, _ = finished_run
    seen = []
    original = Trainer.train_epoch

    def spy(self):
        seen.append(torch.get_num_threads())
        return original(self)

    monkeypatch.setattr(Trainer, "train_epoch", spy)
    before = torch.get_num_threads()
    out = tmp_path / "run"
    pase_mosi.main([*_cli_args(data, out, epochs=2), "--threads", "1"])
    assert seen == [1, 1]
    assert json.loads((out / "summary.json").read_text())["threads"] == 1
    assert torch.get_num_threads() == before  # restored: main() may run inside another program
    assert pase_mosi.parse_args([]).threads == pase_mosi.default_threads() >= 1


def test_shapley_share_plot_draws_phase_two_only(tmp_path, monkeypatch):
    """The shares are the fused head's, which the warm-up does not train: no phase-1 points."""
    import matplotlib.axes

    from examples.pase.plots import plot_history

    calls = []
    real_plot = matplotlib.axes.Axes.plot

    def recording_plot(self, *args, **kwargs):
        calls.append((self, list(args[0]), kwargs.get("label")))
        return real_plot(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", recording_plot)
    names = ("text", "audio")
    history = [
        {
            "epoch": e,
            "phase": 1 if e <= 2 else 2,
            "val": {
                "shares": {"text": 0.7, "audio": 0.3},
                **{k: {"MAE": 0.5} for k in ("text", "audio", "fused")},
            },
        }
        for e in (1, 2, 3, 4)
    ]
    plot_history(history, names, tmp_path)
    drawn = {}
    for ax, xs, label in calls:  # titled after plotting: group by the axes' final title
        drawn.setdefault(ax.get_title(), []).append((xs, label))
    shares = next(v for k, v in drawn.items() if k.startswith("Shapley share"))
    assert [x for x, label in shares if label in names] == [[3, 4], [3, 4]]
    scores = next(v for k, v in drawn.items() if k.startswith("Validation error"))
    assert [x for x, label in scores if label in names] == [[1, 2, 3, 4], [1, 2, 3, 4]]
