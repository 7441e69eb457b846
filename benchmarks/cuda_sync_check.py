"""Check that a PaSE phase-2 training step never synchronises the host with the GPU.

Runs the reference model (examples/pase) on MOSI shapes (batch 64, length 50, text 768 / audio 5 /
vision 20) and executes each piece of a phase-2 step under
``torch.cuda.set_sync_debug_mode("error")`` with modbalance's value checks disabled: any
operation that waits for the device (``.item()``, ``bool(tensor)``, a data-dependent shape)
raises. Prints one line per piece; exits non-zero if any piece synchronised.

Usage::

    python benchmarks/cuda_sync_check.py --device cuda [--amp bf16]
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from pase.model import PaSEConfig, PaSEModel  # noqa: E402

import modbalance  # noqa: E402
from modbalance.modulation import ShapleyGradModulator  # noqa: E402
from modbalance.shapley import ModalityGame  # noqa: E402


def make_batch(device: torch.device, batch: int = 64, length: int = 50) -> dict:
    dims = {"text": 768, "audio": 5, "vision": 20}
    g = torch.Generator().manual_seed(0)
    feats = {m: torch.randn(batch, length, d, generator=g) for m, d in dims.items()}
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=g)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    return {
        "features": {m: f.to(device) for m, f in feats.items()},
        "mask": {m: mask.to(device) for m in dims},
        "label": (torch.rand(batch, generator=g) * 6 - 3).to(device),
    }, dims


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--amp", choices=("bf16",), default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    batch, dims = make_batch(device)
    cfg = PaSEConfig(modalities=tuple(dims), input_dims=dims, dim=64)
    model = PaSEModel(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    game = ModalityGame(
        model.fuse, cfg.modalities, masking="present", value="neg_mae", modules=[model]
    )
    modulator = ShapleyGradModulator(model.modality_groups(), apply="update")
    handle = modulator.attach(opt)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16")

    # warm-up outside the checked region: first calls may allocate, compile kernels, init state
    model.train()
    with autocast:
        model(batch, phase=1)
        out = model(batch, phase=2)
    out["loss"].backward()
    modulator.observe(
        game({m: f.detach().float() for m, f in out["feats"].items()}, batch["label"]).shapley
    )
    opt.step()
    opt.zero_grad(set_to_none=True)

    state: dict = {}

    def forward():
        with autocast:
            state["out"] = model(batch, phase=2)

    def backward():
        state["out"]["loss"].backward()

    def shapley_game():
        feats = {m: f.detach().float() for m, f in state["out"]["feats"].items()}
        state["game"] = game(feats, batch["label"])

    def observe():
        modulator.observe(state["game"].shapley)

    def optimizer_step():
        opt.step()
        opt.zero_grad(set_to_none=True)

    failures = 0
    sync_mode = device.type == "cuda"
    with modbalance.value_checks(False):
        for name, fn in [
            ("phase-2 forward (encoders, calibration, OT, gate, head)", forward),
            ("backward", backward),
            ("Shapley game (2^M coalitions, one pass)", shapley_game),
            ("modulator observe", observe),
            ("optimizer step with update modulation", optimizer_step),
        ]:
            try:
                if sync_mode:
                    torch.cuda.synchronize()
                    torch.cuda.set_sync_debug_mode("error")
                fn()
                status = "no host sync" if sync_mode else "ran (sync check needs CUDA)"
            except RuntimeError as exc:
                failures += 1
                status = f"SYNCHRONISED: {str(exc).splitlines()[0]}"
                traceback.print_exc(limit=6)
            finally:
                if sync_mode:
                    torch.cuda.set_sync_debug_mode("default")
            print(f"{name:<58} {status}", flush=True)
    handle.remove()
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
