"""Sphinx configuration for modbalance (build: sphinx-build -W -b html docs docs/_build/html)."""

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

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
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

intersphinx_mapping = {
    "python": ("https://docs.python.org/3", None),
    "torch": ("https://pytorch.org/docs/stable/", None),
    "numpy": ("https://numpy.org/doc/stable/", None),
}
# The build must pass offline: intersphinx inventories that cannot be fetched are not an error.
intersphinx_timeout = 5
suppress_warnings = ["intersphinx.external", "config.cache"]

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


if os.environ.get("MODBALANCE_DOCS_OFFLINE"):
    intersphinx_mapping = {}
