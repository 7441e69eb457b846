"""Training loop of the PaSE reference model: dual phases, modulation, selection, checkpoints.

Model selection and the phase switch use the validation split only. The test split is wrapped in
:class:`GuardedDataset`, which raises if anything touches it before :meth:`Trainer.finish`
unlocks it for the single final evaluation of the selected checkpoint.
"""

from __future__ import annotations

import csv
import inspect
import json
import math
import os
import random
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from modbalance import distributed as mbdist
from modbalance.data import (
    MultimodalDataset,
    collate_multimodal,
    load_mmsa,
    load_mult,
    make_competition_data,
)
from modbalance.metrics import msa_regression_metrics, shapley_shares
from modbalance.modulation import OGMGEModulator, ShapleyGradModulator
from modbalance.schedule import DualPhaseSchedule
from modbalance.shapley import ModalityGame

from .model import PaSEConfig, PaSEModel


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping options of :class:`Trainer`."""

    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    switch_epoch: int | None = 8
    patience: int | None = None
    modulator: str = "sgm"  # "sgm", "ogm-ge" or "none"
    modulator_momentum: float = 0.9
    ogm_alpha: float = 0.5
    sgm_every: int = 1
    device: str = "cpu"
    amp: str | None = None  # None or "bf16"
    max_steps_per_epoch: int | None = None
    progress: bool = True


class GuardedDataset(Dataset):
    """Wrap the test split so that any access before :meth:`unlock` raises ``RuntimeError``."""

    def __init__(self, dataset: Dataset) -> None:
        self._dataset = dataset
        self.locked = True

    def unlock(self) -> None:
        self.locked = False

    def _check(self) -> None:
        if self.locked:
            raise RuntimeError(
                "the test split was accessed before the final evaluation; model selection must "
                "use the validation split only"
            )

    def __len__(self) -> int:
        self._check()
        return len(self._dataset)

    def __getitem__(self, i: int) -> Any:
        self._check()
        return self._dataset[i]


def default_cache_dir() -> Path:
    return Path(os.environ.get("MODBALANCE_CACHE", Path.home() / ".cache" / "modbalance"))


def build_datasets(
    data: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    synthetic: Mapping[str, Any] | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[MultimodalDataset, MultimodalDataset, GuardedDataset, dict[str, Any]]:
    """Load train/valid/test from an MMSA or MulT pickle, or from the cached synthetic default.

    Returns the three splits (test guarded) and an info dict (source, ground truth if synthetic).
    """
    info: dict[str, Any] = {}
    if data is None:
        kwargs = {"seed": seed, **(synthetic or {})}
        key = "_".join(f"{k}-{v}" for k, v in sorted(kwargs.items()) if not isinstance(v, dict))
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        path = cache / f"competition_{key}.pkl"
        gt_path = path.with_suffix(".json")
        if not path.exists() or not gt_path.exists():
            cache.mkdir(parents=True, exist_ok=True)
            generated = make_competition_data(**kwargs)
            tmp = path.with_suffix(".tmp")
            generated.save(tmp)
            os.replace(tmp, path)
            gt = {str(k): float(v) for k, v in generated.ground_truth.items()}
            gt_path.write_text(json.dumps(gt, indent=1))
        info["ground_truth"] = json.loads(gt_path.read_text())
        data = path
        info["source"] = "synthetic competition data"
        loader = load_mmsa
    else:
        info["source"] = str(data)
        loader = None
    splits = []
    for split in ("train", "valid", "test"):
        if loader is not None:
            splits.append(loader(data, split=split))
            continue
        try:
            splits.append(load_mmsa(data, split=split))
        except (ValueError, KeyError):
            splits.append(load_mult(data, split=split))
    return splits[0], splits[1], GuardedDataset(splits[2]), info


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    out = {}
    for k, v in batch.items():
        if isinstance(v, Tensor):
            out[k] = v.to(device, non_blocking=True)
        elif isinstance(v, Mapping):
            out[k] = {m: t.to(device, non_blocking=True) for m, t in v.items()}
        else:
            out[k] = v
    return out


def error_of(metrics: Mapping[str, float]) -> float:
    """Lower-is-better score used for selection and the phase switch: MAE or 1 - accuracy."""
    return metrics["MAE"] if "MAE" in metrics else 1.0 - metrics["WA"]


def _flatten(obj: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in obj.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "random": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["random"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """Train, select on validation, evaluate the selected checkpoint on test once.

    Args:
        model_config: Architecture and ablation switches.
        config: Optimisation options.
        train_set, valid_set, test_set: The splits (``test_set`` ideally a :class:`GuardedDataset`).
        out_dir: Where checkpoints, logs and plots go (``None``: nothing is written).
    """

    def __init__(
        self,
        model_config: PaSEConfig,
        config: TrainConfig,
        train_set: Dataset,
        valid_set: Dataset,
        test_set: Dataset,
        out_dir: str | os.PathLike | None = None,
    ) -> None:
        self.model_config = model_config
        self.config = c = config
        self.device = torch.device(c.device)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.is_main = mbdist.rank() == 0
        torch.manual_seed(c.seed)
        np.random.seed(c.seed)
        random.seed(c.seed)
        self.model = PaSEModel(model_config).to(self.device)
        self.train_model: nn.Module = self.model
        if mbdist.is_distributed():
            # Calibrator buffers are synchronised by their own all-reduce, so DDP must not
            # overwrite them from rank 0 (the keyword was renamed in PyTorch 2.13).
            ddp_params = inspect.signature(nn.parallel.DistributedDataParallel).parameters
            no_sync = (
                "forward_sync_buffers"
                if "forward_sync_buffers" in ddp_params
                else "broadcast_buffers"
            )
            self.train_model = nn.parallel.DistributedDataParallel(
                self.model,
                find_unused_parameters=True,
                **{no_sync: False},
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
            )
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=c.lr, weight_decay=c.weight_decay
        )
        self.schedule = DualPhaseSchedule(
            switch_epoch=0 if model_config.baseline else c.switch_epoch,
            patience=None if model_config.baseline else c.patience,
            mode="min",
        )
        task = model_config.task
        self.game = ModalityGame(
            self.model.fuse,
            model_config.modalities,
            masking="present",
            value="neg_mae" if task == "regression" else "neg_loss",
            task=task,
            modules=[self.model],
        )
        self.ogm_generator = torch.Generator(device=self.device).manual_seed(c.seed + 17)
        groups = self.model.modality_groups()
        if c.modulator == "sgm":
            self.modulator = ShapleyGradModulator(
                groups, momentum=c.modulator_momentum, apply="update"
            )
        elif c.modulator == "ogm-ge":
            self.modulator = OGMGEModulator(
                groups,
                alpha=c.ogm_alpha,
                momentum=c.modulator_momentum,
                apply="update",
                noise=True,
                generator=self.ogm_generator,
            )
        elif c.modulator == "none":
            self.modulator = None
        else:
            raise ValueError(f"`modulator` must be 'sgm', 'ogm-ge' or 'none'; got {c.modulator!r}")
        if self.modulator is not None:
            self.modulator.to(self.device)  # coefficients live beside the parameters they scale
        self._handle = None
        self.train_set, self.valid_set, self.test_set = train_set, valid_set, test_set
        self.epoch = 0
        self.history: list[dict[str, Any]] = []
        self.best_value = math.inf
        self.best_epoch: int | None = None

    # ----------------------------------------------------------------------------- data
    def _loader(self, dataset: Dataset, *, train: bool, epoch: int = 0) -> DataLoader:
        sampler = None
        generator = None
        if train and mbdist.is_distributed():
            sampler = torch.utils.data.distributed.DistributedSampler(
                dataset, shuffle=True, seed=self.config.seed, drop_last=True
            )
            sampler.set_epoch(epoch)
        elif train:
            generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        return DataLoader(
            dataset,
            batch_size=self.config.batch_size,
            shuffle=train and sampler is None,
            sampler=sampler,
            generator=generator,
            collate_fn=collate_multimodal,
            drop_last=train,
        )

    def _autocast(self):
        if self.config.amp == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return torch.autocast(self.device.type, enabled=False)

    # ----------------------------------------------------------------------------- modulation
    def _modulation_scores(self, game_result) -> Tensor:
        if isinstance(self.modulator, OGMGEModulator):
            # OGM-GE needs positive "higher is better" unimodal scores: the fused head's value
            # with only modality m present, relative to none, passed through exp.
            table = game_result.table
            singles = torch.stack([table[1 << i] for i in range(len(self.model.modalities))])
            return torch.exp(singles - table[0])
        return game_result.shapley

    def _set_attached(self, attached: bool) -> None:
        if self.modulator is None:
            return
        if attached and self._handle is None:
            self._handle = self.modulator.attach(self.optimizer)
        elif not attached and self._handle is not None:
            self._handle.remove()
            self._handle = None

    # ----------------------------------------------------------------------------- epochs
    def train_epoch(self) -> dict[str, Any]:
        phase = self.schedule.phase
        self.model.train()
        self._set_attached(phase == 2)
        loader = self._loader(self.train_set, train=True, epoch=self.epoch)
        sums: dict[str, float] = {}
        n_steps = 0
        iterator = loader
        if self.config.progress and self.is_main:
            from tqdm.auto import tqdm

            iterator = tqdm(
                loader,
                desc=f"epoch {self.epoch + 1}/{self.config.epochs} (phase {phase})",
                leave=False,
            )
        for step, batch in enumerate(iterator):
            if (
                self.config.max_steps_per_epoch is not None
                and step >= self.config.max_steps_per_epoch
            ):
                break
            batch = _to_device(batch, self.device)
            with self._autocast():
                out = self.train_model(batch, phase)
            self.optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            if phase == 2 and self.modulator is not None and step % self.config.sgm_every == 0:
                feats = {m: f.detach().float() for m, f in out["feats"].items()}
                result = self.game(feats, self.model.target(batch["label"]))
                self.modulator.observe(self._modulation_scores(result))
            self.optimizer.step()
            for k, v in out["losses"].items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            n_steps += 1
        return {f"train_{k}": v / max(n_steps, 1) for k, v in sums.items()} | {
            "phase": phase,
            "steps": n_steps,
        }

    @torch.no_grad()
    def evaluate(self, dataset: Dataset) -> dict[str, Any]:
        """Metrics of fused and unimodal predictions, plus Shapley values of the fused head."""
        self.model.eval()
        preds: dict[str, list[Tensor]] = {"fused": []} | {m: [] for m in self.model.modalities}
        feats: dict[str, list[Tensor]] = {m: [] for m in self.model.modalities}
        labels = []
        for batch in self._loader(dataset, train=False):
            batch = _to_device(batch, self.device)
            with self._autocast():
                out = self.model.predict(batch)
            preds["fused"].append(out["fused"].float().cpu())
            for m in self.model.modalities:
                preds[m].append(out["unimodal"][m].float().cpu())
                feats[m].append(out["feats"][m].float())
            labels.append(batch["label"].cpu())
        y = torch.cat(labels)
        result: dict[str, Any] = {}
        for name, p in preds.items():
            result[name] = self._metrics(torch.cat(p), y)
        y = self.model.target(y)
        game = self.game({m: torch.cat(f) for m, f in feats.items()}, y.to(self.device))
        result["shapley"] = {m: float(v) for m, v in zip(self.model.modalities, game.shapley.cpu())}
        shares = shapley_shares(game.shapley.cpu())
        result["shares"] = {m: float(v) for m, v in zip(self.model.modalities, shares)}
        return result

    def _metrics(self, pred: Tensor, y: Tensor) -> dict[str, float]:
        if self.model_config.task == "regression":
            return {k: float(v) for k, v in msa_regression_metrics(pred, y).items()}
        y = self.model.target(y)
        hit = (pred.argmax(-1) == y).float()
        recalls = [hit[y == k].mean() for k in range(pred.shape[-1]) if bool((y == k).any())]
        return {"WA": float(hit.mean()), "UA": float(torch.stack(recalls).mean())}

    def run(self) -> dict[str, Any]:
        """Train until ``epochs`` (resuming where a checkpoint left off), then :meth:`finish`."""
        while self.epoch < self.config.epochs:
            t0 = time.perf_counter()
            record = {"epoch": self.epoch + 1} | self.train_epoch()
            val = self.evaluate(self.valid_set)
            record["time_s"] = time.perf_counter() - t0
            record["val"] = val
            if self.modulator is not None:
                record["coefficients"] = {
                    m: float(v)
                    for m, v in zip(self.model.modalities, self.modulator.coefficient.cpu())
                }
            phase = record["phase"]
            uni_mae = sum(error_of(val[m]) for m in self.model.modalities) / len(
                self.model.modalities
            )
            self.schedule.epoch_end(uni_mae if phase == 1 else None)
            if phase == 2 and error_of(val["fused"]) < self.best_value:
                self.best_value = error_of(val["fused"])
                self.best_epoch = self.epoch + 1
                self._save("best.pt", {"model": self.model.state_dict(), "epoch": self.best_epoch})
            self.history.append(record)
            self.epoch += 1
            self._save_checkpoint()
            if self.is_main and self.config.progress:
                fused = val["fused"]
                shares = " ".join(f"{m} {val['shares'][m]:.2f}" for m in self.model.modalities)
                print(
                    f"epoch {record['epoch']:3d} phase {phase} "
                    f"| val fused error {error_of(fused):.3f} "
                    f"Non0 {fused.get('Non0_acc_2', float('nan')):.3f} | shares {shares} "
                    f"| {record['time_s']:.1f}s",
                    flush=True,
                )
        self._set_attached(False)
        return self.finish()

    def finish(self) -> dict[str, Any]:
        """Load the validation-selected checkpoint and evaluate valid and test once."""
        best = self._load("best.pt")
        if best is not None:
            self.model.load_state_dict(best["model"])
        elif self.best_epoch is not None and self._best_state is not None:
            self.model.load_state_dict(self._best_state)
        if isinstance(self.test_set, GuardedDataset):
            self.test_set.unlock()
        final = {
            "selected_epoch": self.best_epoch,
            "valid": self.evaluate(self.valid_set),
            "test": self.evaluate(self.test_set),
        }
        if self.out_dir is not None and self.is_main:
            (self.out_dir / "final_metrics.json").write_text(json.dumps(final, indent=1))
        return final

    # ----------------------------------------------------------------------------- checkpoints
    _best_state: dict[str, Tensor] | None = None

    def _save(self, name: str, obj: Any) -> None:
        if name == "best.pt":
            self._best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        if self.out_dir is None or not self.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.out_dir / (name + ".tmp")
        torch.save(obj, tmp)
        os.replace(tmp, self.out_dir / name)

    def _load(self, name: str) -> Any:
        if self.out_dir is None or not (self.out_dir / name).exists():
            return None
        return torch.load(self.out_dir / name, map_location=self.device, weights_only=False)

    def _save_checkpoint(self) -> None:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "modulator": None if self.modulator is None else self.modulator.state_dict(),
            "epoch": self.epoch,
            "history": self.history,
            "best_value": self.best_value,
            "best_epoch": self.best_epoch,
            "rng": _rng_state(),
            "ogm_generator": self.ogm_generator.get_state(),
            "model_config": self.model_config.to_dict(),
            "train_config": asdict(self.config),
        }
        self._save("last.pt", state)
        if self.out_dir is not None and self.is_main:
            self.write_logs()

    def resume(self) -> bool:
        """Restore ``last.pt`` from ``out_dir`` if present; returns whether it did."""
        state = self._load("last.pt")
        if state is None:
            return False
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if self.modulator is not None and state["modulator"] is not None:
            self.modulator.load_state_dict(state["modulator"])
        self.epoch = state["epoch"]
        self.history = state["history"]
        self.best_value = state["best_value"]
        self.best_epoch = state["best_epoch"]
        _set_rng_state(state["rng"])
        self.ogm_generator.set_state(state["ogm_generator"])
        return True

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
