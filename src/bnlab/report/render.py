"""Rendering every experiment's report shares: figures, Markdown tables, report.md/.html.

A report's words live in a Jinja2 template, ``templates/<report>.md.j2``, shipped as
package data; ``render_template`` fills it with what the report module computed
(numbers, and strings formatted by ``report.stats``). The shared pieces of prose
(the smoke-test banner, the environment line) are macros of ``templates/_common.md.j2``.

matplotlib is imported inside ``subplots`` and ``save_figure``, not at the top:
``import matplotlib.pyplot`` costs about 0.3 s, which every ``bnlab`` command
would otherwise pay, and the Agg backend must be chosen before pyplot loads.
"""

from __future__ import annotations

import base64
import functools
import html
import io
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import jinja2
from markdown_it import MarkdownIt

from bnlab.report import ReportError, read_run
from bnlab.report.stats import (
    Verdict,
    fmt_estimate,
    fmt_num,
    fmt_pct,
    fmt_pp,
    fmt_steps,
    is_smoke,
)
from bnlab.run_folder import atomic_write_bytes, atomic_write_text, write_json

__all__ = [
    "TEMPLATES",
    "environment_line",
    "markdown_table",
    "recorded_arms",
    "render_template",
    "report_from_records",
    "save_figure",
    "smoke_banner",
    "subplots",
    "verdict_table",
    "write_documents",
]

# image types report.html can inline
_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}
_MARKDOWN = MarkdownIt("commonmark", {"html": False}).enable("table")
_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;"
    "line-height:1.45;color:#222}img{max-width:100%}table{border-collapse:collapse;"
    "margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}"
    "th{background:#f3f3f3}code{background:#f3f3f3;padding:0 3px}"
)


# the folder of the reports' Jinja2 templates (package data: pyproject.toml)
TEMPLATES = Path(__file__).with_name("templates")


@functools.cache
def _templates() -> jinja2.Environment:
    """The one Jinja2 environment of the reports, built on first use.

    Strict: a name the template uses and the context lacks raises
    ``jinja2.UndefinedError`` instead of printing nothing. Block tags take their line
    with them (``trim_blocks``, ``lstrip_blocks``), so ``{% for %}``/``{% if %}`` lines
    leave no blank lines in report.md. No autoescaping: the output is Markdown, and
    markdown-it escapes raw HTML when it renders report.html.
    """
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )
    env.filters.update(
        pct=fmt_pct,  # an estimate of fractions: 97.98% ± 0.15 (95% CI 97.61–98.35, n=3)
        pp=fmt_pp,  # an estimate of differences of fractions, in signed percentage points
        num=fmt_num,  # an estimate of a plain number
        estimate=fmt_estimate,  # an estimate in a unit: {{ d | estimate("x") }}
        steps=fmt_steps,  # per-seed steps: 1,500, never
        fmt=_format,  # Python's format spec: {{ n | fmt(",") }} -> 30,000
    )
    env.globals.update(is_smoke=is_smoke, verdict_table=verdict_table, zip=zip)
    return env


def _format(value: Any, spec: str = "") -> str:
    """``format(value, spec)``, the templates' ``fmt`` filter. An undefined value raises
    ``jinja2.UndefinedError`` naming it (``format`` would raise a bare TypeError)."""
    if isinstance(value, jinja2.Undefined):
        value._fail_with_undefined_error()
    return format(value, spec)


def render_template(name: str, **context: Any) -> str:
    """Render the report template ``name`` (``"figure1.md.j2"``) with ``context``.

    Filters every template has: ``pct``, ``pp``, ``num``, ``estimate(unit)``, ``steps``
    (``report.stats``' formatters) and ``fmt(spec)`` (``format``); globals:
    ``verdict_table``, ``is_smoke``, ``zip``. Tables are written out in the template
    as Markdown, one ``{% for %}`` line per row.

    Raises:
        jinja2.UndefinedError: the template uses a name ``context`` does not give.
        jinja2.TemplateNotFound: no such template in ``TEMPLATES``.
    """
    return _templates().get_template(name).render(**context)


def _common(macro: str, *args: Any) -> str:
    """Call a macro of ``_common.md.j2``: the prose every report shares."""
    return str(getattr(_templates().get_template("_common.md.j2").module, macro)(*args))


def recorded_arms(records: Iterable[dict], order: Iterable[str] = ()) -> list[str]:
    """The arms that have evaluation records, those in ``order`` first and in its
    order, any others after them, sorted: reports take their arms from the records,
    not from a copy of the experiment's list."""
    found = {r["arm"] for r in records if r.get("kind") == "eval" and "arm" in r}
    known = [a for a in dict.fromkeys(order) if a in found]
    return known + sorted(found - set(known))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, the same pixels everywhere
    import matplotlib.pyplot as plt

    return plt


def subplots(*args: Any, **kwargs: Any):
    """``matplotlib.pyplot.subplots`` on the Agg backend; returns ``(fig, axes)``."""
    return _pyplot().subplots(*args, **kwargs)


def save_figure(fig, path: str | Path, dpi: int = 110) -> None:
    """Write ``fig`` as a PNG atomically (readers never see half a file) and close it."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        _pyplot().close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table: a header row, the ``|---|`` rule, one line per row (no final newline)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_documents(
    run_dir: str | Path, markdown: str, title: str, name: str = "report"
) -> list[Path]:
    """Write ``report.md`` and a self-contained ``report.html`` (or ``name``.md/.html)
    into ``run_dir``.

    The HTML is CommonMark with tables, rendered by markdown-it-py, with every
    local image read from ``run_dir`` and inlined as a base64 data URI, so the page
    fetches nothing from elsewhere (links stay links).

    Args:
        run_dir: the run folder; image paths in ``markdown`` are relative to it.
        markdown: the text of report.md.
        name: the two files' name: ``name.md`` and ``name.html``.
        title: the HTML page's ``<title>``.

    Returns:
        The two paths written: report.md, report.html.

    Raises:
        ReportError: an image is missing or of a type we cannot inline.
    """
    run_dir = Path(run_dir)
    md_path, html_path = run_dir / f"{name}.md", run_dir / f"{name}.html"
    atomic_write_text(md_path, markdown)
    atomic_write_text(html_path, _html(markdown, title, run_dir))
    return [md_path, html_path]


def _html(md: str, title: str, run_dir: Path) -> str:
    """A self-contained HTML page: CommonMark with tables (markdown-it-py), every local
    image read from ``run_dir`` and embedded as a data URI; links are left as written."""
    tokens = _MARKDOWN.parse(md)
    for token in tokens:
        for child in token.children or ():
            if child.type == "image":
                src = child.attrGet("src") or ""
                if not src.startswith(("data:", "http://", "https://")):
                    child.attrSet("src", _data_uri(run_dir / src))
    body = _MARKDOWN.renderer.render(tokens, _MARKDOWN.options, {})
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
        f"</title><style>{_STYLE}</style></head><body>{body}</body></html>\n"
    )


def _data_uri(path: Path) -> str:
    mime = _MIME.get(path.suffix.lower())
    if mime is None:
        raise ReportError(f"cannot inline {path} in report.html: not one of {sorted(_MIME)}")
    if not path.is_file():
        raise ReportError(f"{path} is missing: report.html cannot embed it")
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def smoke_banner(config: dict) -> list[str]:
    """The lines that open the report of a smoke test (a run of the quick preset), else none.

    Args:
        config: the run's config (config.json's ``"config"``); a missing ``preset`` is
            unknown, not a smoke test.
    """
    return _common("smoke_banner", config).splitlines()


def verdict_table(verdicts: Sequence[Verdict | dict]) -> str:
    """The report's verdicts as a Markdown table: claim, verdict (status, marked for a
    smoke test), measured value with its interval or the seeds' values, result, why."""
    rows = []
    for v in verdicts:
        v = v if isinstance(v, Verdict) else Verdict.from_dict(v)
        rows.append(
            (
                v.title,
                f"**{v.label}**",
                v.measurement(),
                v.result.replace("|", "/"),
                v.why.replace("|", "/") or "—",
            )
        )
    return markdown_table(
        ["claim", "verdict", "measured (95% CI or seeds)", "our result", "why"], rows
    )


def environment_line(env: dict) -> str:
    """The report's "Environment" bullet, from a run's env.json."""
    return _common("environment_line", env)


def report_from_records(
    run_dir: str | Path, experiment: str, summarize, draw, markdown, figure: str, title: str
) -> dict:
    """The usual report: summary.json, the figure, report.md and report.html, built from
    ``run_dir``'s records alone.

    Args:
        experiment: the CLI name, for messages (``"lr-init"``).
        summarize: ``(records, config) -> summary``.
        draw: ``(records, summary, config, path)``: writes the figure.
        markdown: ``(summary, config, env) -> report.md's text``.
        figure: the figure's file name.

    Returns:
        The summary, as written to summary.json.
    """
    run_dir = Path(run_dir)
    config, env, records = read_run(run_dir, experiment)
    cfg = config["config"]
    summary = summarize(records, cfg)
    write_json(run_dir / "summary.json", summary)
    draw(records, summary, cfg, run_dir / figure)
    write_documents(run_dir, markdown(summary, cfg, env), title)
    return summary
