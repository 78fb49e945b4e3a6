"""Sphinx configuration for the wsnursery documentation.

Build (warnings are errors, nitpicky):

    .venv/bin/sphinx-build -W --keep-going -n -b html docs docs/_build/html

Cross-references into Python, Trio and wsproto need their intersphinx
inventories, which are fetched over the network. Set
``WSNURSERY_DOCS_INTERSPHINX=1`` to use them (and so to check those references
too). Without it the build stays offline, and references into those projects
are left unresolved without a warning (see ``nitpick_ignore_regex`` below).
"""

from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import wsnursery  # noqa: E402

# -- Project -----------------------------------------------------------------

project = "wsnursery"
author = "The wsnursery developers"
copyright = "the wsnursery developers"
release = wsnursery.__version__
version = ".".join(release.split(".")[:2])

# -- General -----------------------------------------------------------------

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinxcontrib_trio",
]

USE_INTERSPHINX = os.environ.get("WSNURSERY_DOCS_INTERSPHINX", "") not in ("", "0")
if USE_INTERSPHINX:
    extensions.append("sphinx.ext.intersphinx")
    intersphinx_mapping = {
        "python": ("https://docs.python.org/3", None),
        "trio": ("https://trio.readthedocs.io/en/stable/", None),
        "wsproto": ("https://python-hyper.org/projects/wsproto/en/stable/", None),
    }

exclude_patterns = ["_build"]
nitpicky = True
primary_domain = "py"
highlight_language = "python3"

# -- autodoc and napoleon ----------------------------------------------------

autodoc_member_order = "bysource"
autodoc_typehints = "signature"

napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_custom_sections = [("Cancellation", "notes_style")]

# -- Unresolvable references -------------------------------------------------

nitpick_ignore_regex: list[tuple[str, str]] = []

if not USE_INTERSPHINX:
    # Offline: references that the Python, Trio and wsproto inventories would
    # resolve are let through unchecked. (Builtins such as str or ValueError
    # never warn: Sphinx lets them through by itself.)
    nitpick_ignore_regex += [
        (r"py:.*", r"(trio|wsproto)(\..+)?"),
        (r"py:.*", r"(ssl|collections\.abc|functools|os|pathlib)(\..+)?"),
    ]

# -- Docstring workarounds ---------------------------------------------------


def _drop_async_cm_return(app, what, name, obj, options, signature, return_annotation):  # type: ignore[no-untyped-def]
    """Show ``async with f(...) as x``, not ``-> AsyncIterator[X]``.

    The return annotation of an ``@asynccontextmanager`` function describes the
    generator inside it, not what ``async with`` gives.
    """
    if inspect.isasyncgenfunction(getattr(obj, "__wrapped__", None)):
        return signature, None
    return None


def setup(app):  # type: ignore[no-untyped-def]
    app.connect("autodoc-process-signature", _drop_async_cm_return)


# -- HTML --------------------------------------------------------------------

html_theme = "alabaster"
html_static_path: list[str] = []
html_theme_options = {
    "description": "WebSockets for Trio, built on wsproto",
    "fixed_sidebar": False,
}
