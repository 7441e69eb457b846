"""The thin training loop of the PaSE example: epochs, evaluation, selection, checkpoints, logs.

The step itself is :func:`~pase.step.train_step`; the parts come from :func:`~pase.step.build`.
Model selection and the phase switch use the validation split only; the test split is evaluated
once, on the selected checkpoint (:meth:`Trainer.finish`).
"""

from __future__ import annotations

import copy
import csv
import itertools
import json
import math
import os
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from modbalance import distributed as mbdist
from modbalance.balancing import BalancingMethod, task_loss
from modbalance.metrics import _wa_ua, msa_regression_metrics, shapley_shares

from .data import GuardedDataset, make_loader, to_device
from .model import PaSEConfig
from .step import TrainConfig, autocast, build, train_step


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed, with the file's name and what to do."""


#: TrainConfig options that a resume cannot honour, with their command-line flags: the
#: checkpoint restores the optimiser (its learning rate and weight decay), the phase schedule
#: (switch epoch, patience) and the random state (the seed), so a new value would be silently
#: ignored. The other options (epochs, batch size, game cadence, device, amp, step cap,
#: progress) apply from the resumed epoch on and are recorded in :attr:`Trainer.resumed`.
RESUME_FIXED = {
    "lr": "--lr",
    "weight_decay": "--weight-decay",
    "seed": "--seed",
    "switch_epoch": "--switch-epoch",
    "patience": "--patience",
}


def error_of(metrics: Mapping[str, float]) -> float:
    """Lower-is-better score used for selection and the phase switch: MAE or 1 - accuracy."""
    return metrics["MAE"] if "MAE" in metrics else 1.0 - metrics["WA"]


def metrics_of(pred: Tensor, target: Tensor, task: str) -> dict[str, float]:
    """MMSA regression metrics, or accuracy (WA) and mean per-class recall (UA)."""
    if task == "regression":
        return {k: float(v) for k, v in msa_regression_metrics(pred, target).items()}
    wa, ua = _wa_ua(target, pred.argmax(-1))
    return {"WA": wa, "UA": ua}


def _flatten(obj: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in obj.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _as_flag(option: str, value: Any) -> str:
    """``--lr 0.001`` for a :data:`RESUME_FIXED` option's value; ``no --patience`` for None."""
    flag = RESUME_FIXED[option]
    return f"no {flag}" if value is None else f"{flag} {value}"  # str(float): round-trips


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}
    state["random"] = random.getstate()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["random"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def split_holdout(dataset: Dataset, seed: int, fraction: float = 0.1) -> tuple[Subset, Subset]:
    """A seeded split of the training data into (train, holdout); never the validation split."""
    n = len(dataset)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7_919))
    k = max(1, round(fraction * n))
    return Subset(dataset, perm[k:].tolist()), Subset(dataset, perm[:k].tolist())


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


class Trainer:
    """Train, select on validation, evaluate the selected checkpoint on test once.

    Args:
        model_config: Architecture and ablation switches.
        config: Optimisation options (``config.methods``: balancing methods by name).
        train_set, valid_set, test_set: The splits (``test_set`` ideally a :class:`GuardedDataset`).
        out_dir: Where checkpoints, logs and plots go (``None``: nothing is written).
        encoders: Optional ``{modality: nn.Module}`` encoders (default: the Transformer/MLP).
        methods: Balancing methods (names or instances); overrides ``config.methods``.
        model: A ready model (a :class:`PaSEModel` subclass) forwarded to ``build(model=...)``.
    """

    def __init__(
        self,
        model_config: PaSEConfig,
        config: TrainConfig,
        train_set: Dataset,
        valid_set: Dataset,
        test_set: Dataset,
        out_dir: str | os.PathLike | None = None,
        *,
        encoders: Mapping[str, nn.Module] | None = None,
        methods: Sequence[str | BalancingMethod] | None = None,
        model: nn.Module | None = None,
    ) -> None:
        self.model_config, self.config = model_config, config
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.is_main = mbdist.rank() == 0
        seed_everything(config.seed)
        own = {} if methods is None else {"methods": methods}
        self.parts = build(model_config, config, encoders=encoders, model=model, **own)
        self.train_set, self.valid_set, self.test_set = train_set, valid_set, test_set
        self.holdout_set: Dataset | None = None
        if any(m.needs_holdout for m in self.methods):
            self.train_set, self.holdout_set = split_holdout(train_set, config.seed)
        #: Seconds the alone-trained teachers took to train (0 when no method distils from them).
        self.teacher_seconds = 0.0
        if any(m.needs_teacher for m in self.methods) and self.parts.teachers is None:
            from .teachers import train_teachers

            self.parts.teachers, self.teacher_seconds = train_teachers(
                model_config,
                config,
                self.train_set,
                valid_set,
                model=None if model is None else self.model,  # still untrained: copied
                cache=config.teacher_cache,
            )
        self.epoch = 0
        self.history: list[dict[str, Any]] = []
        self.best_value = math.inf
        self.best_epoch: int | None = None
        self.elapsed_s = 0.0  # training wall time over all sessions (resume included)
        self._best_state: dict[str, Tensor] | None = None
        #: After :meth:`finish`: :meth:`predict`'s output on the test split for the selected
        #: checkpoint, from the one final test pass (e.g. for linear probes); ``None`` before.
        self.test_predictions: dict[str, Any] | None = None
        #: After :meth:`resume`: the checkpoint, its epoch, its training options and the
        #: options this run changed (``{name: [checkpoint's, this run's]}``).
        self.resumed: dict[str, Any] | None = None

    @property
    def model(self):
        return self.parts.model

    @property
    def methods(self) -> list[BalancingMethod]:
        return self.parts.methods

    # ----------------------------------------------------------------------------- epochs
    def train_epoch(self) -> dict[str, Any]:
        phase = self.parts.schedule.phase
        self.model.train()
        c = self.config
        loader = make_loader(
            self.train_set, c.batch_size, train=True, seed=c.seed, epoch=self.epoch
        )
        n_batches = len(loader)
        if c.max_steps_per_epoch is not None:
            n_batches = min(n_batches, c.max_steps_per_epoch)
        # The progress bar is drawn beside the loop and never wraps the loader: tqdm.auto's
        # class (tqdm.asyncio) calls iter() on what it wraps in its constructor, and every
        # iter() of a DataLoader draws a base seed from the loader's seeded generator (under
        # torchrun, from the global RNG, on rank 0 only); the batch order then depended on
        # --quiet. A display flag must never touch training randomness.
        bar = None
        if c.progress and self.is_main:
            from tqdm.auto import tqdm

            desc = f"epoch {self.epoch + 1}/{c.epochs} (phase {phase})"
            bar = tqdm(total=n_batches, desc=desc, leave=False)
        sums: dict[str, Tensor] = {}
        n_steps = 0
        try:
            for batch in itertools.islice(loader, n_batches):
                for k, v in train_step(self.parts, batch, phase).items():
                    sums[k] = sums.get(k, 0.0) + v.float()
                n_steps += 1
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        means = {f"train_{k}": float(v) / max(n_steps, 1) for k, v in sums.items()}
        for method in self.methods:
            method.epoch_end(self.epoch, self.head_losses)
        return means | {"phase": phase, "steps": n_steps}

    def head_losses(self) -> dict[str, dict[str, float]]:
        """Mean task loss of the fused and each unimodal head on (part of) train and the holdout.

        What G-Blending's ``epoch_end`` evaluates: ``{"train": {"fused": L, m: L, ...},
        "holdout": {...}}``; the training part is a fixed sample as large as the holdout.
        """
        if self.holdout_set is None:
            raise RuntimeError("head_losses needs a holdout set (a method with needs_holdout)")
        n = len(self.holdout_set)
        g = torch.Generator().manual_seed(self.config.seed + 1)
        train_part = Subset(self.train_set, torch.randperm(len(self.train_set), generator=g)[:n])
        out = {}
        for name, dataset in (("train", train_part), ("holdout", self.holdout_set)):
            p = self.predict(dataset)
            out[name] = {
                k: float(task_loss(v, p["target"], self.model_config.task))
                for k, v in p["preds"].items()
            }
        self.model.train()
        return out

    @torch.no_grad()
    def predict(self, dataset: Dataset) -> dict[str, Any]:
        """Fused and unimodal predictions, features, presence flags and targets over a split."""
        self.model.eval()
        preds: dict[str, list[Tensor]] = {"fused": []} | {m: [] for m in self.model.modalities}
        feats: dict[str, list[Tensor]] = {m: [] for m in self.model.modalities}
        present: dict[str, list[Tensor]] = {m: [] for m in self.model.modalities}
        targets = []
        for batch in make_loader(dataset, self.config.batch_size, train=False):
            batch = to_device(batch, self.parts.device)
            with autocast(self.parts):
                out = self.model.predict(batch)
            fused = self._methods_fused(out["fused"], out["features"], out["present"])
            preds["fused"].append(fused.float().cpu())
            for m in self.model.modalities:
                preds[m].append(out["unimodal"][m].float().cpu())
                feats[m].append(out["features"][m].float().cpu())
                present[m].append(out["present"][m].cpu())
            targets.append(self.model.target(batch["label"]).cpu())
        return {
            "preds": {k: torch.cat(v) for k, v in preds.items()},
            "features": {m: torch.cat(v) for m, v in feats.items()},
            "present": {m: torch.cat(v) for m, v in present.items()},
            "target": torch.cat(targets),
        }

    def evaluate(
        self,
        dataset: Dataset,
        *,
        with_predictions: bool = False,
        shares: bool = True,
        predictions: dict[str, Any] | None = None,
    ) -> Any:
        """Metrics of fused and unimodal predictions, plus Shapley values of the fused head.

        With ``with_predictions``: ``(metrics, predictions)``, the second :meth:`predict`'s
        output from the same pass. ``shares=False`` leaves out the Shapley game (no
        ``"shapley"``/``"shares"`` entries). ``predictions``: :meth:`predict`'s output on
        ``dataset`` for the model as it is now, scored instead of a new pass.
        """
        p = self.predict(dataset) if predictions is None else predictions
        task = self.model_config.task
        result: dict[str, Any] = {
            k: metrics_of(v, p["target"], task) for k, v in p["preds"].items()
        }
        if not shares:
            return (result, p) if with_predictions else result
        dev = self.parts.device
        game = self.parts.game(
            {m: f.to(dev) for m, f in p["features"].items()}, p["target"].to(dev)
        )
        mods = self.model.modalities
        result["shapley"] = {m: float(v) for m, v in zip(mods, game.shapley.cpu())}
        shares = shapley_shares(game.shapley.cpu())
        result["shares"] = {m: float(v) for m, v in zip(mods, shares)}
        return (result, p) if with_predictions else result

    def _end_epoch(self, record: dict[str, Any]) -> None:
        """Phase switch (on the unimodal validation error in phase 1) and model selection."""
        val, schedule = record["val"], self.parts.schedule
        # the library's warm-up rules: selection only in phase 2, the switch on the mean
        # unimodal validation error (the fused head is not trained during the warm-up)
        selected = schedule.select(error_of(val["fused"]))
        schedule.epoch_end({m: error_of(val[m]) for m in self.model.modalities})
        if selected:
            self.best_value = error_of(val["fused"])
            self.best_epoch = self.epoch + 1
            self._best_state = {
                k: v.detach().clone() if isinstance(v, Tensor) else copy.deepcopy(v)
                for k, v in self.model.state_dict().items()
            }
            self._save("best.pt", {"model": self._best_state, "epoch": self.best_epoch})

    def run(self) -> dict[str, Any]:
        """Train until ``epochs`` (resuming where a checkpoint left off), then :meth:`finish`."""
        self.fit()
        return self.finish()

    def fit(self) -> None:
        """Train until ``epochs`` and load the validation-selected checkpoint (no test pass)."""
        while self.epoch < self.config.epochs:
            t0 = time.perf_counter()
            record = {"epoch": self.epoch + 1} | self.train_epoch()
            valid = None
            if record["phase"] == 2 and self.model_config.readout == "ridge":
                valid = self._fit_readout()
            record["val"] = self.evaluate(
                self.valid_set, shares=self.config.epoch_shares, predictions=valid
            )
            summary = {k: v for method in self.methods for k, v in method.summary().items()}
            if summary:  # what the methods set, for the logs and plots
                record["methods"] = summary
            self._end_epoch(record)
            record["time_s"] = time.perf_counter() - t0
            self.elapsed_s += record["time_s"]
            self.history.append(record)
            self.epoch += 1
            self._save_checkpoint()
            if self.is_main and self.config.progress:
                print(self._epoch_line(record), flush=True)
        self._load_selected()

    def _fit_readout(self) -> dict[str, Any] | None:
        """Re-fit the model's :class:`~modbalance.RidgeReadout` on this epoch's features.

        Fitted on the training split, its strength chosen on validation; the validation scores
        that follow then score it, so the checkpoint is selected on the read-out's error.
        Returns the validation split's :meth:`predict` output with the re-fitted read-out's
        fused predictions (the encoders did not change, so only those are new), or ``None``
        under autocast, where the features kept in float32 are not what the read-out saw.
        """
        train, valid = self.predict(self.train_set), self.predict(self.valid_set)
        self._fit_readout_on(train, valid)
        if self.parts.amp is not None:
            return None
        valid["preds"]["fused"] = self._readout_fused(valid)
        # The pass this saves opened a DataLoader, which draws its base seed from the global
        # random generator; drawing it all the same keeps every later random number (dropout,
        # the methods' draws) and so every run as it was.
        iter(make_loader(self.valid_set, self.config.batch_size, train=False))
        return valid

    def _fit_readout_on(self, train: dict[str, Any], valid: dict[str, Any]) -> None:
        """Fit the read-out on :meth:`predict`'s outputs of the training and validation splits."""
        self.model.readout.fit(
            train["features"],
            train["target"],
            train["present"],
            valid=(valid["features"], valid["target"], valid["present"]),
        )

    @torch.no_grad()
    def _readout_fused(self, p: dict[str, Any]) -> Tensor:
        """The fused predictions :meth:`predict` would give now, from its kept features.

        Batch by batch, in the batches of :meth:`predict` (the same shapes, so the same values),
        with the methods' own inference rules applied after the read-out as there.
        """
        self.model.eval()
        size, dev, n = self.config.batch_size, self.parts.device, p["target"].shape[0]
        out = []
        for start in range(0, n, size):
            feats = {m: f[start : start + size].to(dev) for m, f in p["features"].items()}
            present = {m: x[start : start + size].to(dev) for m, x in p["present"].items()}
            fused = self._methods_fused(self.model.readout(feats, present), feats, present)
            out.append(fused.float().cpu())
        return torch.cat(out)

    def _methods_fused(
        self, fused: Tensor, feats: Mapping[str, Tensor], present: Mapping[str, Tensor]
    ) -> Tensor:
        """``fused``, or the prediction of a method with its own inference rule (MLA)."""
        for method in self.methods:
            own = method.predict(feats, present)
            if own is not None:
                fused = own.reshape(fused.shape)
        return fused

    def _epoch_line(self, record: dict[str, Any]) -> str:
        val, mods = record["val"], self.model.modalities
        uni = " ".join(f"{m} {error_of(val[m]):.3f}" for m in mods)
        if record["phase"] == 1:
            head = f"val unimodal error {uni} (fused head not trained in phase 1)"
        else:
            fused = val["fused"]
            head = f"val fused error {error_of(fused):.3f}"
            if "Non0_acc_2" in fused:
                head += f" Non0 {fused['Non0_acc_2']:.3f}"
            head += f" | unimodal {uni}"
        shares = ""
        if "shares" in val:
            shares = " | shares " + " ".join(f"{m} {val['shares'][m]:.2f}" for m in mods)
        return (
            f"epoch {record['epoch']:3d} phase {record['phase']} | {head}{shares} "
            f"| {record['time_s']:.1f}s"
        )

    def finish(self) -> dict[str, Any]:
        """Load the validation-selected checkpoint and evaluate valid and test once.

        The test pass's predictions stay in :attr:`test_predictions`.
        """
        self._load_selected()
        if isinstance(self.test_set, GuardedDataset):
            self.test_set.unlock()
        valid = self.evaluate(self.valid_set)
        test, self.test_predictions = self.evaluate(self.test_set, with_predictions=True)
        final = {"selected_epoch": self.best_epoch, "valid": valid, "test": test}
        if self.out_dir is not None and self.is_main:
            (self.out_dir / "final_metrics.json").write_text(json.dumps(final, indent=1))
        return final

    def _load_selected(self) -> None:
        best = self._load("best.pt")
        if best is not None:
            self.model.load_state_dict(best["model"])
        elif self._best_state is not None:
            self.model.load_state_dict(self._best_state)

    # ----------------------------------------------------------------------------- checkpoints
    def _save(self, name: str, obj: Any) -> None:
        if self.out_dir is None or not self.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.out_dir / (name + ".tmp")
        torch.save(obj, tmp)
        os.replace(tmp, self.out_dir / name)

    def _load(self, name: str) -> Any:
        path = None if self.out_dir is None else self.out_dir / name
        if path is None or not path.exists():
            return None
        try:
            return torch.load(path, map_location=self.parts.device, weights_only=False)
        except Exception as err:  # empty, truncated or not a torch file
            raise CheckpointError(
                f"{path} cannot be read ({type(err).__name__}: {err}); it is empty, truncated "
                "or not a checkpoint of this example. Delete it to start afresh, or pass another "
                "--out."
            ) from None

    def _save_checkpoint(self) -> None:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.parts.optimizer.state_dict(),
            "schedule": self.parts.schedule.state_dict(),
            "methods": [m.state_dict() for m in self.methods],
            "method_names": [type(m).__name__ for m in self.methods],
            "step": self.parts.step,
            "epoch": self.epoch,
            "history": self.history,
            "best_value": self.best_value,
            "best_epoch": self.best_epoch,
            "elapsed_s": self.elapsed_s,
            "rng": _rng_state(),
            "game": self.parts.game.state_dict(),
            "model_config": self.model_config.to_dict(),
            "train_config": asdict(self.config),
        }
        self._save("last.pt", state)
        if self.out_dir is not None and self.is_main:
            self.write_logs()

    def resume(self) -> bool:
        """Restore ``last.pt`` from ``out_dir``; ``False`` if there is none.

        Raises:
            CheckpointError: The file is unreadable, not a checkpoint of this example, or from a
                different model or method configuration.
        """
        state = self._load("last.pt")
        if state is None:
            return False
        path = self.out_dir / "last.pt"  # type: ignore[operator]
        self._check_compatible(state, path)
        try:
            self.model.load_state_dict(state["model"])
            self.parts.optimizer.load_state_dict(state["optimizer"])
            for method, method_state in zip(self.methods, state["methods"]):
                method.load_state_dict(method_state)
            if "game" in state:  # the sampled game's generator (M >= 7)
                self.parts.game.load_state_dict(state["game"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise CheckpointError(
                f"{path} does not fit this model ({err}); resume with the same options it was "
                "written with, or pass another --out."
            ) from None
        self.parts.schedule.load_state_dict(state["schedule"])
        self.parts.step = state["step"]
        self.epoch, self.history = state["epoch"], state["history"]
        self.best_value, self.best_epoch = state["best_value"], state["best_epoch"]
        self.elapsed_s = state.get("elapsed_s", 0.0)
        _set_rng_state(state["rng"])
        saved = dict(state.get("train_config") or {})
        now = asdict(self.config)
        self.resumed = {
            "checkpoint": str(path),
            "epoch": self.epoch,
            "train_config": saved,
            "changed": {k: [saved[k], v] for k, v in now.items() if k in saved and saved[k] != v},
        }
        return True

    def _check_compatible(self, state: Any, path: Path) -> None:
        keys = {"model", "optimizer", "model_config", "methods", "epoch"}
        if not isinstance(state, Mapping) or not keys <= set(state):
            raise CheckpointError(
                f"{path} is not a checkpoint of this example (expected keys {sorted(keys)}); "
                "delete it or pass another --out."
            )
        saved, now = state["model_config"], self.model_config.to_dict()
        diff = sorted(k for k in now if saved.get(k) != now[k])
        if diff:
            changes = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in diff)
            raise CheckpointError(
                f"{path} was written with other model options ({changes}); resume with the same "
                "options, or pass another --out."
            )
        saved_train = state.get("train_config") or {}
        now_train = asdict(self.config)
        fixed = [k for k in RESUME_FIXED if k in saved_train and saved_train[k] != now_train[k]]
        if fixed:
            changes = "; ".join(
                f"{_as_flag(k, saved_train[k])} in the checkpoint, {_as_flag(k, now_train[k])} now"
                for k in fixed
            )
            same = " ".join(_as_flag(k, saved_train[k]) for k in fixed)
            raise CheckpointError(
                f"{path} was trained with other optimisation options ({changes}). A resume "
                "restores the checkpoint's optimiser, phase schedule and random state and cannot "
                f"apply a new value: resume with {same}, or start a new run in another --out."
            )
        names = [type(m).__name__ for m in self.methods]
        if state.get("method_names") != names:
            raise CheckpointError(
                f"{path} was written with balancing methods {state.get('method_names')}, this run "
                f"uses {names}; resume with the same methods, or pass another --out."
            )

    # ----------------------------------------------------------------------------- logs
    def flat_history(self) -> list[dict[str, Any]]:
        """One flat dict per epoch, nested keys joined with dots (``val.fused.MAE``)."""
        return [_flatten(rec) for rec in self.history]

    def write_logs(self) -> None:
        if self.out_dir is None:
            return
        (self.out_dir / "history.json").write_text(json.dumps(self.history, indent=1))
        rows = self.flat_history()
        if rows:
            keys = sorted({k for r in rows for k in r})
            with open(self.out_dir / "history.csv", "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=keys)
                writer.writeheader()
                writer.writerows(rows)
