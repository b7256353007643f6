"""Sphinx configuration for bnlab's documentation (``make docs``; built with -W in ``make test``).

Offline by design: no intersphinx and nothing fetched at build time, so the build runs
wherever the tests run.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # the working tree's bnlab, installed or not
sys.path.insert(0, str(Path(__file__).parent / "_ext"))

import bnlab  # noqa: E402
from bnlab.report.claims import CLAIMS  # noqa: E402

project = "bnlab"
author = "bnlab contributors"
copyright = "bnlab contributors"  # noqa: A001
version = release = bnlab.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "bnlab_docstrings",  # docs/_ext: plain-text math in docstrings rendered as written
    "bnlab_api",  # docs/_ext: bnlab-automodule, automodule with the constants of __all__
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "_generated"]

# -- MyST: the README and docs/readme/*.md are included, never copied ------------------
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 4
# docs/readme/*.md open at H3 because they continue the README's sections.
suppress_warnings = ["myst.header"]

# -- autodoc / napoleon: Google-style docstrings ---------------------------------------
autodoc_default_options = {
    "members": True,
    # Constants in __all__ have no docstring of their own; class members without one are
    # left out by _skip_undocumented_class_members below.
    "undoc-members": True,
    "member-order": "bysource",
    "show-inheritance": True,
}
# torch's docstrings (Module.forward, Function.setup_context) are not ours to render.
autodoc_inherit_docstrings = False
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"  # no bare, undescribed parameter lists
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
autosummary_generate = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_custom_sections = [("Shape", "notes_style")]

# -- HTML -------------------------------------------------------------------------------
# Literal blocks in docstrings are formulas and diagrams, not Python.
highlight_language = "none"

html_theme = "furo"
html_title = f"bnlab {release}"
html_static_path: list[str] = []


# -- Tables generated from the code, so the pages cannot drift from it ------------------
GENERATED = Path(__file__).parent / "_generated"


def _write_claims_table(app) -> None:
    rows = ["| id | where in the paper | claim |", "|---|---|---|"]
    rows += [
        f"| `{cid}` | {where} | {claim.replace('|', '&#124;')} |" for cid, where, claim in CLAIMS
    ]
    GENERATED.mkdir(exist_ok=True)
    text = "\n".join(rows) + "\n"
    target = GENERATED / "claims.md"
    if not target.exists() or target.read_text() != text:  # unchanged: no rebuild
        target.write_text(text)


def _skip_undocumented_class_members(app, what, name, obj, skip, options):
    """In a class, list only members with a docstring of their own.

    Module level, every name in ``__all__`` is listed (``undoc-members``). In a class,
    an undocumented method would be a bare signature, and a dataclass field would
    repeat what napoleon already renders from the class's ``Attributes:`` section
    (a duplicate object description, an error under -W).
    """
    if what not in ("class", "exception") or skip:
        return None
    documentable = inspect.isroutine(obj) or inspect.isclass(obj) or isinstance(obj, property)
    doc = obj.__doc__ if documentable else None  # its own: inspect.getdoc would inherit
    return True if not doc else None


def setup(app):
    app.connect("builder-inited", _write_claims_table)
    app.connect("autodoc-skip-member", _skip_undocumented_class_members)
