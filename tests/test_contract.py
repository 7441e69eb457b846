"""One vocabulary for every balancing method: the contract a training loop relies on.

Every method is a :class:`~modbalance.balancing.BalancingMethod`; what it may offer is declared
there (``needs_game``, ``takes_backward``, ``needs_holdout``, ``phases``, ``predict``,
``summary``), so a loop calls it without probing attributes. The per-modality factor a method
applies has one name everywhere: ``coefficients``, an ``(M,)`` tensor in the order of
``modalities``.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch

import modbalance
import modbalance.methods
from examples.pase import METHODS, PaSEConfig, build
from modbalance.balancing import BalancingMethod

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("text", "audio", "vision")
#: Methods without a per-modality factor: MLA alternates modalities through one shared head, UME
#: trains the unimodal models apart (both predict with a rule of their own); EMC measures
#: energies (its ``energies`` buffer) but applies no factor.
NO_FACTOR = {"EMC", "MLA", "ReconBoost", "UME"}
#: Methods with a per-modality factor *and* an inference rule of their own: AUG's factor is the
#: number of learners per modality, and it predicts with their weighted ensemble.
OWN_PREDICT = {"AUG"}
#: Names the per-modality factor used to have; none may come back as a public attribute.
OLD_NAMES = ("coefficient", "coefficient_dict", "weights", "beta")


def _method_classes():
    found = {
        obj
        for module in (modbalance, modbalance.methods)
        for obj in vars(module).values()
        if inspect.isclass(obj) and issubclass(obj, BalancingMethod) and obj is not BalancingMethod
    }
    return sorted(found, key=lambda c: c.__name__)


def test_every_method_class_is_found():
    names = {c.__name__ for c in _method_classes()}
    assert {"AGM", "CGGM", "GBlending", "InfoReg", "MLA", "MMPareto", "PMR"} <= names
    assert {"UnimodalLoss", "ShapleyEquilibrium", "ShapleyGradModulator", "OGMGEModulator"} <= names


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_names_its_factor_coefficients(name):
    cfg = PaSEConfig(modalities=NAMES, input_dims=dict.fromkeys(NAMES, 6), dim=8, heads=2)
    (method,) = build(cfg, methods=[name]).methods
    cls = type(method).__name__
    for old in OLD_NAMES:  # a scalar hyperparameter (the equilibrium's beta) is not the factor
        value = getattr(method, old, None)
        assert value is None or isinstance(value, float), f"{cls}.{old}: call it `coefficients`"
    summary = method.summary()
    assert all(isinstance(k, str) and isinstance(v, float) for k, v in summary.items())
    if cls in NO_FACTOR:
        assert not hasattr(method, "coefficients")
        return
    coefficients = method.coefficients
    assert isinstance(coefficients, torch.Tensor) and coefficients.shape == (len(NAMES),), cls
    assert {f"coefficient_{m}" for m in NAMES} <= set(summary), cls
    assert isinstance(method.needs_holdout, bool)
    if cls not in OWN_PREDICT:
        assert method.predict({}, None) is None  # no inference rule of its own


def test_the_loop_does_not_probe_methods():
    loop = (ROOT / "examples" / "pase" / "loop.py").read_text()
    assert not re.search(r"\b(getattr|hasattr)\(", loop)
    assert "_generator" not in loop and "_pending" not in loop
    methods_dir = ROOT / "modbalance" / "methods"
    for path in [*methods_dir.glob("*.py"), ROOT / "modbalance" / "modulation.py"]:
        assert "_pending" not in path.read_text(), path.name


def _code_lines(source: list[str], node) -> int:
    """Lines of a function that hold code: docstrings, comments and blank lines not counted."""
    import ast

    lines = set(range(node.lineno, node.end_lineno + 1))
    for sub in ast.walk(node):
        body = getattr(sub, "body", None)
        if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and body:
            first = body[0]
            if isinstance(first, ast.Expr) and isinstance(
                getattr(first, "value", None), ast.Constant
            ):
                if isinstance(first.value.value, str):
                    lines -= set(range(first.lineno, first.end_lineno + 1))
    return sum(
        1 for i in lines if source[i - 1].strip() and not source[i - 1].lstrip().startswith("#")
    )


def test_no_function_is_longer_than_sixty_lines_of_code():
    import ast

    too_long = []
    for folder in ("modbalance", "examples", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            text = path.read_text()
            source = text.splitlines()
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = _code_lines(source, node)
                    if n > 60:
                        too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n})")
    assert not too_long, too_long


def test_the_earlier_module_paths_still_import():
    """Every method lives in modbalance.methods; the earlier paths re-export the same objects."""
    import modbalance.equilibrium
    import modbalance.modulation
    from modbalance.methods import equilibrium, modulators

    assert modbalance.modulation.ShapleyGradModulator is modulators.ShapleyGradModulator
    assert modbalance.modulation.OGMGEModulator is modbalance.OGMGEModulator
    assert modbalance.modulation.pase_shares is modbalance.metrics.pase_shares
    assert modbalance.equilibrium.ShapleyEquilibrium is equilibrium.ShapleyEquilibrium
    for cls in _method_classes():
        assert cls.__module__.startswith("modbalance.methods."), cls
