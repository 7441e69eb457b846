"""Sphinx configuration for modbalance.

Build (offline, no environment variable): ``sphinx-build -W docs docs/_build/html``. Set
``MODBALANCE_DOCS_ONLINE=1`` to also link to the Python, PyTorch and NumPy docs (intersphinx
fetches their inventories over the network).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import modbalance  # noqa: E402

project = "modbalance"
author = "The modbalance developers"
copyright = "2026, The modbalance developers"
release = modbalance.__version__
version = release

# Math renders offline: sphinx-mathjax-offline (the `docs` extra) copies MathJax 3 into
# _static/mathjax and points sphinx.ext.mathjax at it instead of a CDN.
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",
    "sphinx.ext.doctest",
    "sphinx.ext.viewcode",
]

autosummary_generate = True
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": False}
autoclass_content = "class"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True  # NamedTuple "Attributes:" sections must not duplicate autodoc members

# The documented command (sphinx-build -W docs docs/_build/html) must pass offline, so links into
# the Python/PyTorch/NumPy docs are opt-in: MODBALANCE_DOCS_ONLINE=1 fetches their inventories.
DOCS_ONLINE = os.environ.get("MODBALANCE_DOCS_ONLINE", "") == "1"
if DOCS_ONLINE:
    extensions.append("sphinx.ext.intersphinx")
    intersphinx_mapping = {
        "python": ("https://docs.python.org/3", None),
        "torch": ("https://pytorch.org/docs/stable/", None),
        "numpy": ("https://numpy.org/doc/stable/", None),
    }
    intersphinx_timeout = 10
suppress_warnings = ["config.cache"]

html_theme = "furo"
html_title = f"modbalance {release}"
templates_path = []
exclude_patterns = ["_build", "api_generated/*.tmp"]

doctest_global_setup = """
import torch
torch.manual_seed(0)
"""


def _write_api_page() -> None:
    """Generate ``api.rst`` from ``modbalance.__all__`` so the API page never drifts."""
    names = [n for n in modbalance.__all__ if not n.startswith("_")]
    lines = [
        "API reference",
        "=============",
        "",
        "Every public name of :mod:`modbalance` (generated from ``modbalance.__all__``).",
        "",
        ".. currentmodule:: modbalance",
        "",
        ".. autosummary::",
        "   :toctree: api_generated",
        "   :nosignatures:",
        "",
    ]
    lines += [f"   {n}" for n in names]
    submodules = [m for m in getattr(modbalance, "_documented_modules", ())]
    if submodules:
        lines += [
            "",
            "Modules",
            "-------",
            "",
            ".. autosummary::",
            "   :toctree: api_generated",
            "",
        ]
        lines += [f"   {m}" for m in submodules]
    text = "\n".join(lines) + "\n"
    target = HERE / "api.rst"
    if not target.exists() or target.read_text() != text:
        target.write_text(text)


# Written at configuration time, before autosummary generates its stub pages.
_write_api_page()
