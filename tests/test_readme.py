"""The Python examples of the README and of every page under docs/ run as written."""

import contextlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [
    p
    for p in sorted((ROOT / "docs").rglob("*.md"))
    if not {"_build", "_generated"} & set(p.relative_to(ROOT / "docs").parts)
    and "```python" in p.read_text()
]


def _run_python_blocks(path: Path) -> tuple[int, str]:
    blocks = re.findall(r"```python\n(.*?)```", path.read_text(), re.S)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for block in blocks:
            exec(compile(block, str(path), "exec"), {})
    return len(blocks), out.getvalue()


def test_readme_python_blocks_run():
    n, _ = _run_python_blocks(README)
    assert n >= 2


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT / "docs")))
def test_docs_python_blocks_run(doc):
    n, _ = _run_python_blocks(doc)
    assert n >= 1


def test_algorithm2_examples_print_what_their_comments_say():
    n, out = _run_python_blocks(ROOT / "docs" / "readme" / "algorithm2.md")
    assert n >= 4
    lines = out.splitlines()
    assert "50 1 1600 []" in lines
    assert "True" in lines  # folded == unfolded
    assert "False True" in lines and lines[-1] == "True"  # frozen, then unfrozen


def test_readme_opens_with_the_two_commands():
    head = README.read_text()[:600]
    assert "make demo" in head and "make test" in head
