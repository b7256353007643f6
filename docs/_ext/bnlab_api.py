"""``.. bnlab-automodule:: NAME``: ``automodule``, plus the constants in ``__all__``.

autodoc lists a module-level constant only when a ``#:`` comment documents it; bnlab's
constants (``PRESETS``, ``FILES``, ``CIFAR10_MEAN`` ...) have none, yet they are public
names. This directive is ``automodule`` with the same options, followed by an
``autodata`` for each constant of ``__all__`` that ``:exclude-members:`` does not
exclude, showing its value (unless the value is too long to read in a signature).
"""

from __future__ import annotations

import importlib
import inspect

from docutils import nodes
from docutils.parsers.rst import directives
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective

LONGEST_VALUE = 300  # characters of repr shown; longer values are left to the source


def _is_constant(obj) -> bool:
    return not (inspect.isclass(obj) or inspect.isroutine(obj) or inspect.ismodule(obj))


class BnlabAutomodule(SphinxDirective):
    required_arguments = 1
    option_spec = {"exclude-members": directives.unchanged, "no-members": directives.flag}

    def run(self):
        name = self.arguments[0]
        module = importlib.import_module(name)
        excluded = {m.strip() for m in self.options.get("exclude-members", "").split(",")}
        lines = [f".. automodule:: {name}"]
        if "no-members" in self.options:
            lines.append("   :no-members:")
        elif excluded - {""}:
            lines.append(f"   :exclude-members: {', '.join(sorted(excluded - {''}))}")
        if "no-members" not in self.options:
            for member in getattr(module, "__all__", []):
                value = getattr(module, member)
                if member in excluded or not _is_constant(value):
                    continue
                lines += ["", f".. autodata:: {name}.{member}"]
                if len(repr(value)) > LONGEST_VALUE:
                    lines.append("   :no-value:")
        holder = nodes.Element()
        source = self.get_source_info()[0]
        self.state.nested_parse(StringList(lines, source=source), self.content_offset, holder)
        return holder.children


def _drop_type_docstring(app, what, name, obj, options, lines: list[str]) -> None:
    """A constant has no docstring; autodoc would show its type's (``dict()`` ...)."""
    if what in ("data", "attribute") and lines:
        type_doc = inspect.cleandoc(type(obj).__doc__ or "")
        if "\n".join(lines).strip() == type_doc.strip():
            lines[:] = []


def setup(app):
    app.add_directive("bnlab-automodule", BnlabAutomodule)
    # Before bnlab_docstrings (400) rewrites the text.
    app.connect("autodoc-process-docstring", _drop_type_docstring, priority=300)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
