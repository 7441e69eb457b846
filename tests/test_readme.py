"""The README's adoption snippet is executed here, so it cannot rot."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _snippet() -> str:
    text = README.read_text()
    match = re.search(r"<!-- snippet: adopt -->\s*```python\n(.*?)```", text, re.S)
    assert match is not None, "README adoption snippet not found"
    return match.group(1)


def test_readme_snippet_runs_and_calibration_trains_the_encoder():
    code = _snippet()
    assert len(code.strip().splitlines()) <= 14
    ns: dict = {}
    exec(compile(code, str(README), "exec"), ns)
    calibrator, encoder = ns["calibrator"], ns["encoder"]
    assert bool(calibrator.initialized.any())
    # the calibration term alone sends a non-zero gradient to the encoder
    encoder.zero_grad()
    h = encoder(ns["x"])
    calibrator(h, ns["y"]).loss.backward()
    grads = [p.grad for p in encoder.parameters()]
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert all(b.grad is None for b in calibrator.buffers())
    assert isinstance(ns["loss"], torch.Tensor) and torch.isfinite(ns["loss"])


def test_readme_names_the_setup_commands_and_main_job():
    text = README.read_text()
    assert 'pip install -e ".[dev]"' in text
    assert re.search(r"^pytest\b", text, re.M)
    assert "python examples/pase_mosi.py" in text
