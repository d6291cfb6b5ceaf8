"""Sphinx configuration of the tgd-jax documentation (``make docs``)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent / "_ext"))

project = "tgd-jax"
author = "the tgd-jax authors"
copyright = "2026, the tgd-jax authors"  # noqa: A001 - Sphinx's name for it
release = "0.1.0"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",  # the Google-style "Args:" / "Returns:" sections of the docstrings
    "myst_parser",  # the pages are Markdown, as the rest of the repository
    "config_reference",  # commands.md's table of every config field, from configs' comments
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "_ext", "study/figures/*.md"]
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3

# Every name in a module's __all__, with or without a docstring (check_api.py verifies).
autodoc_default_options = {"members": True, "undoc-members": True, "show-inheritance": False}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # "Attributes:" as fields, not a second description of each
# The signatures name jax/flax/optax types that have no documentation here.
nitpicky = False
suppress_warnings = ["myst.header"]

html_theme = "sphinx_book_theme"
html_title = "tgd-jax"
html_theme_options = {"show_toc_level": 2}
