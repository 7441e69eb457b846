"""Shared fixtures: seeding, determinism and the device/dtype the suite runs on.

Run the same suite on a GPU or in float64 with::

    MODBALANCE_TEST_DEVICE=cuda MODBALANCE_TEST_DTYPE=float64 pytest
    pytest --device cuda --dtype float64
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

# One thread: the suite runs many tiny ops, for which thread hand-off costs more than it saves
# on a busy 2-core machine (measured up to 20-50x slower iteration-heavy OT tests).
torch.set_num_threads(1)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device",
        default=os.environ.get("MODBALANCE_TEST_DEVICE", "cpu"),
        help="torch device for the tests (env MODBALANCE_TEST_DEVICE), default cpu",
    )
    parser.addoption(
        "--dtype",
        default=os.environ.get("MODBALANCE_TEST_DTYPE", "float32"),
        choices=("float32", "float64", "bfloat16", "float16"),
        help="floating dtype for tests that honour it (env MODBALANCE_TEST_DTYPE)",
    )


@pytest.fixture(autouse=True)
def _seed_everything(request: pytest.FixtureRequest):
    """Seed every RNG and use deterministic algorithms on CPU for each test."""
    seed = 1234
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    device = request.config.getoption("--device")
    previous = torch.are_deterministic_algorithms_enabled()
    if str(device).startswith("cpu"):
        torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


@pytest.fixture
def device(request: pytest.FixtureRequest) -> torch.device:
    """The device selected with ``--device`` / ``MODBALANCE_TEST_DEVICE``."""
    dev = torch.device(request.config.getoption("--device"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA requested but not available")
    return dev


@pytest.fixture
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    """The floating dtype selected with ``--dtype`` / ``MODBALANCE_TEST_DTYPE``."""
    return getattr(torch, request.config.getoption("--dtype"))
