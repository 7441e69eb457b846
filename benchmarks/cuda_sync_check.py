"""Check that whole PaSE training steps never synchronise the host with the GPU.

Builds the reference model with ``examples.pase.build`` on MOSI shapes (batch 64, length 50,
text 768 / audio 5 / vision 20) and runs the example's one ``train_step`` — phase 1 and phase 2,
with the balancing methods the main job uses — under ``torch.cuda.set_sync_debug_mode("error")``
with modbalance's value checks disabled: any operation that waits for the device (``.item()``,
``bool(tensor)``, a data-dependent shape) raises. Prints one line per checked step; exits non-zero
if any step synchronised. On a CPU the steps run but nothing can be checked.

Usage (from the repository root)::

    python -m benchmarks.cuda_sync_check --device cuda [--amp bf16] [--methods sgm,unimodal]
"""

from __future__ import annotations

import argparse
import traceback

import torch

import modbalance
from examples.pase import PaSEConfig, build, train_step
from examples.pase_mosi import PASE_METHODS

DIMS = {"text": 768, "audio": 5, "vision": 20}


def make_batch(device: torch.device, batch: int = 64, length: int = 50) -> dict:
    g = torch.Generator().manual_seed(0)
    feats = {m: torch.randn(batch, length, d, generator=g) for m, d in DIMS.items()}
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=g)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    return {
        "features": {m: f.to(device) for m, f in feats.items()},
        "mask": {m: mask.to(device) for m in DIMS},
        "label": (torch.rand(batch, generator=g) * 6 - 3).to(device),
    }


def check(name: str, fn, sync_mode: bool) -> bool:
    """Run ``fn`` under the sync debug mode; print and return whether it stayed sync-free."""
    ok = True
    try:
        if sync_mode:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        fn()
        status = "no host sync" if sync_mode else "ran (sync check needs CUDA)"
    except RuntimeError as exc:
        ok = False
        status = f"SYNCHRONISED: {str(exc).splitlines()[0]}"
        traceback.print_exc(limit=8)
    finally:
        if sync_mode:
            torch.cuda.set_sync_debug_mode("default")
    print(f"{name:<60} {status}", flush=True)
    return ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--amp", choices=("bf16",), default=None)
    p.add_argument("--methods", default=",".join(PASE_METHODS), help="comma-separated methods")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    methods = tuple(m for m in args.methods.split(",") if m)
    batch = make_batch(device)
    cfg = PaSEConfig(modalities=tuple(DIMS), input_dims=DIMS, dim=64)
    parts = build(cfg, methods=methods, device=device, amp=args.amp)
    parts.model.train()
    # warm-up outside the checked region: first calls allocate, pick kernels, initialise state
    for phase in (1, 2, 2):
        train_step(parts, batch, phase)
    sync_mode = device.type == "cuda"
    ok = True
    with modbalance.value_checks(False):
        ok &= check(
            "phase-1 train_step (unimodal warm-up)", lambda: train_step(parts, batch, 1), sync_mode
        )
        for i in range(3):
            ok &= check(
                f"phase-2 train_step #{i + 1} (methods: {', '.join(methods)})",
                lambda: train_step(parts, batch, 2),
                sync_mode,
            )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
