"""The documentation site builds without a warning and documents every public name.

``make docs`` builds the same site into docs/_build/html. The build runs Sphinx on the
docstrings, the README and docs/**/*.md, so a broken cross-reference, a docstring that
is not valid reStructuredText or a page missing from the table of contents fails here.
"""

import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SRC = ROOT / "src"

# The command line documents itself (`bnlab COMMAND --help`); its modules are not an API.
NOT_API = ("bnlab.__main__", "bnlab.cli", "bnlab.commands")

# Public names that have no docstring yet. Shrink it; never add to it.
UNDOCUMENTED = {
    "bnlab.experiments.batch_noise.arm_name",
    "bnlab.experiments.batch_size.cell_name",
    "bnlab.experiments.batch_size.parse_cell",
    "bnlab.run_folder.atomic_write_bytes",
    "bnlab.run_folder.atomic_write_text",
    "bnlab.run_folder.write_json",
}

sys.path.insert(0, str(DOCS / "_ext"))
from bnlab_docstrings import plain_text_to_rst  # noqa: E402


def public_modules() -> list[str]:
    """Every module of the package that declares ``__all__``, found from the source tree."""
    names = []
    for path in sorted((SRC / "bnlab").rglob("*.py")):
        name = ".".join(path.with_suffix("").relative_to(SRC).parts).removesuffix(".__init__")
        if name.startswith(NOT_API):
            continue
        if re.search(r"^__all__\b", path.read_text(), re.M):
            names.append(name)
    return names


def public_names() -> list[tuple[str, str]]:
    return [(m, n) for m in public_modules() for n in importlib.import_module(m).__all__]


@pytest.fixture(scope="module")
def built_site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("docs") / "html"
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         str(DOCS), str(out)],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, (
        "the docs build failed or warned (run `make docs` to see it):\n" + proc.stderr[-6000:]
    )
    return out


@pytest.mark.slow
def test_docs_build_with_warnings_as_errors(built_site):
    for page in ("index", "tour", "results", "references", "api/index", "api/nn"):
        assert (built_site / f"{page}.html").is_file(), page


def _resolve(dotted: str):
    """The object a documented id names (``bnlab.nn.BatchNorm2d``), or None."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


@pytest.mark.slow
def test_every_public_name_is_in_the_api_reference(built_site):
    ids = set()
    for page in (built_site / "api").glob("*.html"):
        ids.update(re.findall(r'\bid="(bnlab(?:\.\w+)+)"', page.read_text()))
    by_last: dict[str, list[str]] = {}
    for dotted in ids:
        by_last.setdefault(dotted.rsplit(".", 1)[1], []).append(dotted)

    missing = []
    for module, name in public_names():
        if f"{module}.{name}" in ids:
            continue
        obj = getattr(importlib.import_module(module), name)
        # Documented once where users import it: bnlab.nn.BatchNorm2d, not bnlab.nn.batchnorm's.
        if not any(_resolve(d) is obj for d in by_last.get(name, [])):
            missing.append(f"{module}.{name}")
    assert not missing, (
        "public names missing from the API reference (docs/api/*.rst: add the module's "
        f"automodule, or the name where its module is documented): {missing}"
    )


def test_every_public_function_and_class_has_a_docstring():
    missing = []
    for module, name in public_names():
        obj = getattr(importlib.import_module(module), name)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        doc = (obj.__doc__ or "").strip()
        if not doc or doc.startswith(f"{obj.__name__}("):  # a dataclass's generated doc
            missing.append(f"{module}.{name}")
    assert sorted(set(missing) - UNDOCUMENTED) == [], "public names without a docstring"
    assert sorted(UNDOCUMENTED - set(missing)) == [], "documented now: remove from UNDOCUMENTED"


def test_plain_text_math_becomes_valid_rst():
    doc = [
        "Mean per channel of x (N, C, *), exact when |mean| >> std.",
        "",
        "    mu_B = 1/m * sum_i x_i",
        "           + 0",
        "",
        "The *paired* emphasis and ``|x| * y`` literals stay; ||G - G'||_2 does not.",
        "",
        "* a bullet",
        "",
        "Args:",
        "    x: input (N, C, *kernel).",
        "    **kwargs: passed on.",
        "",
        "Example:",
        "    >>> abs(-1) * 2",
        "    2",
    ]
    assert plain_text_to_rst(doc) == [
        r"Mean per channel of x (N, C, \*), exact when \|mean\| >> std. ::",
        "",
        "    mu_B = 1/m * sum_i x_i",
        "           + 0",
        "",
        r"The *paired* emphasis and ``|x| * y`` literals stay; \|\|G - G'\|\|_2 does not.",
        "",
        "* a bullet",
        "",
        "Args:",
        r"    x: input (N, C, \*kernel).",
        r"    \*\*kwargs: passed on.",
        "",
        "Example:",
        "    >>> abs(-1) * 2",
        "    2",
    ]


def test_user_facing_text_cites_papers_not_project_files():
    """Docstrings (which --help and the API reference show), report templates and docs
    cite the papers (docs/references.md), never files users do not have."""
    texts = [*ROOT.glob("src/bnlab/**/*.py"), *ROOT.glob("src/bnlab/**/*.j2")]
    texts += [*ROOT.glob("docs/*.md"), *ROOT.glob("docs/readme/*.md"), ROOT / "README.md"]
    pattern = re.compile(r"PAPER\.md|shared/|the review's|the issue's")
    found = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in texts
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if pattern.search(line)
    ]
    assert not found, found
