"""Render bnlab's plain-text docstrings as their authors meant them.

bnlab's docstrings are written for ``help()`` first: Google style, with the math
beside the code in plain text (STYLE.md). Three habits of that plain text mean
something else to reStructuredText, so before napoleon reads a docstring this
extension

* escapes ``|`` (``|mean|``, ``||G - G'||_2``): reST would read a substitution;
* escapes a ``*`` that would open an emphasis it never closes (``(N, C, *)``,
  ``*kernel``); paired ``*emphasis*``, ``**strong**`` and bullets stay as they are;
* turns an indented block that follows a paragraph (a formula, a diagram) into a
  literal block, keeping its line breaks and alignment; reST would make it a
  block quote and run its lines together.

Inline literals (````x````), roles (``:func:`x```), literal blocks and doctest
blocks are left alone, as are docstrings outside ``bnlab``. The source keeps no
backslashes, so ``help()`` shows exactly what was written.
"""

from __future__ import annotations

import re

# Google-style section headers (napoleon's and ours): "Args:", "Returns:", "Shape:".
_SECTION = re.compile(r"^[A-Z][A-Za-z ]*:\s*$")
# Spans that reST does not parse for markup: ``literal``, :role:`target`, `interpreted`.
_VERBATIM = re.compile(r"``.+?``|:[\w:+-]+:`[^`]*`|`[^`]*`_{0,2}")
# A balanced *emphasis* or **strong** as reST recognizes it (simplified: on one line).
_EMPHASIS = re.compile(r"(?<![\w\\*])(\*\*?)(?=[^\s*])(?:.*?[^\s\\*])?\1(?![\w*])")
_BULLET = re.compile(r"^(?:[-*+]|\d+[.)])\s")


def _escape_markup(text: str) -> str:
    """Escape ``|`` and unpaired ``*`` in one line of running text."""
    out: list[str] = []
    pos = 0
    for match in _VERBATIM.finditer(text):
        out.append(_escape_plain(text[pos : match.start()]))
        out.append(match.group())
        pos = match.end()
    out.append(_escape_plain(text[pos:]))
    return "".join(out)


def _escape_plain(text: str) -> str:
    out: list[str] = []
    pos = 0
    for match in _EMPHASIS.finditer(text):
        out.append(_escape_chars(text[pos : match.start()]))
        out.append(match.group())
        pos = match.end()
    out.append(_escape_chars(text[pos:]))
    return "".join(out)


def _escape_chars(text: str) -> str:
    # A "*" before a space opens nothing (bullets, "N * m"); one before anything else would.
    return re.sub(r"(?<!\\)(\||\*(?=\S))", r"\\\1", text)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def plain_text_to_rst(lines: list[str]) -> list[str]:
    """The docstring ``lines`` (already dedented) with bnlab's plain text made valid reST."""
    out: list[str] = []
    literal_indent: int | None = None  # inside a literal block: the indent of its opener
    in_section = False  # inside a Google section (Args:, Returns:, ...)
    in_doctest = False
    previous = ""  # the last non-blank line written
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped:
            in_doctest = False
            out.append(line)
            continue
        indent = _indent(line)
        if literal_indent is not None:
            if indent > literal_indent:
                out.append(line)
                previous = line
                continue
            literal_indent = None
        if stripped.startswith(">>>") or in_doctest:
            in_doctest = True
            out.append(line)
            previous = line
            continue
        if indent == 0:
            in_section = bool(_SECTION.match(line))
        # An indented block after a blank line that follows a top-level paragraph.
        opens_block = (
            not in_section
            and i > 0
            and not lines[i - 1].strip()
            and previous
            and indent > _indent(previous)
            and _indent(previous) == 0
            and not _BULLET.match(previous.strip())
            and not stripped.startswith(">>>")
        )
        if opens_block and not previous.rstrip().endswith("::"):
            j = len(out) - 1
            while not out[j].strip():
                j -= 1
            out[j] = out[j].rstrip() + (":" if out[j].rstrip().endswith(":") else " ::")
        if opens_block or previous.rstrip().endswith("::") and indent > _indent(previous):
            literal_indent = _indent(previous)
            out.append(line)
            previous = line
            continue
        out.append(_escape_markup(line))
        previous = line
    return out


def _process_docstring(app, what, name, obj, options, lines: list[str]) -> None:
    if name == "bnlab" or name.startswith("bnlab."):
        lines[:] = plain_text_to_rst(lines)


def setup(app):
    # Before napoleon (priority 500), which turns the Google sections into reST.
    app.connect("autodoc-process-docstring", _process_docstring, priority=400)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
