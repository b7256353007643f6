"""Rendering every experiment's report shares: figures, Markdown tables, report.md/.html.

matplotlib is imported inside ``subplots`` and ``save_figure``, not at the top:
``import matplotlib.pyplot`` costs about 0.3 s, which every ``bnlab`` command
would otherwise pay, and the Agg backend must be chosen before pyplot loads.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from markdown_it import MarkdownIt

from bnlab.report import ReportError, read_run
from bnlab.report.stats import Verdict, is_smoke
from bnlab.run_folder import atomic_write_bytes, atomic_write_text, write_json

__all__ = [
    "environment_line",
    "markdown_table",
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
    if not is_smoke(config.get("preset")):
        return []
    return [
        "**Smoke test: this run used the `quick` preset** (a few hundred steps on a small "
        "subset). It checks that the experiment runs end to end; its verdicts do not test "
        "the paper. For a real test run the experiment again with `--preset cpu` (or "
        "`--preset gpu` on a GPU).",
        "",
    ]


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
    return (
        f"- **Environment:** bnlab {env.get('bnlab')}, torch {env.get('torch')}, "
        f"{env.get('platform')}; training took {env.get('train_seconds_last_session', 'n/a')}"
        " s in the last session."
    )


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
