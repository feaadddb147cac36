"""Project hygiene: license, one version, design.md citations and doc links that resolve.

Every check reads the files as they are, so renaming a file, dropping a design.md section or
bumping the version in one place only fails here instead of leaving stale docs behind.
"""

from __future__ import annotations

import ast
import fnmatch
import importlib.metadata
import os
import re
import subprocess
import warnings

import pytest

import pni_fast

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml on Python 3.10 needs tomli")

from repo import ROOT

DESIGN = os.path.join(ROOT, "docs", "design.md")
TEXT_SUFFIXES = (".py", ".md", ".h", ".cuh", ".cpp", ".cu", ".sh", ".toml", ".txt", ".in")
# Files the guides tell a contributor to create; they do not exist in the repository.
GUIDE_EXAMPLE_PATHS = {"pni_fast/ops_numpy.py", "csrc/xpu"}


def _read(*parts: str) -> str:
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
        return f.read()


def _pyproject() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _repo_text_files() -> list[str]:
    """Tracked and untracked-but-not-ignored text files (git), else a walk that skips build outputs."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
        files = [f for f in out.splitlines() if f]
    except (OSError, subprocess.SubprocessError):
        files = []
        for d, dirs, names in os.walk(ROOT):
            dirs[:] = [x for x in dirs if not x.startswith(".") and x not in ("build", "dist", "__pycache__")]
            files += [os.path.relpath(os.path.join(d, n), ROOT) for n in names]
    return sorted(f for f in files if f.endswith(TEXT_SUFFIXES) and os.path.isfile(os.path.join(ROOT, f)))


# ---------------------------------------------------------------------------
# License and version
# ---------------------------------------------------------------------------


def test_license_is_mit_and_named_in_the_metadata():
    text = _read("LICENSE")
    assert text.startswith("MIT License")
    assert "Copyright (c) 2026 pni_fast contributors" in text
    assert "WITHOUT WARRANTY OF ANY KIND" in text
    project = _pyproject()["project"]
    license_ = project["license"]
    assert (license_ if isinstance(license_, str) else license_.get("text")) == "MIT"


def _static_version() -> str:
    """``__version__`` as setuptools' ``attr:`` reads it: the literal assigned in pni_fast/__init__.py."""
    tree = ast.parse(_read("pni_fast", "__init__.py"))
    values = [
        node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets)
        and isinstance(node.value, ast.Constant)
    ]
    assert len(values) == 1, "pni_fast/__init__.py must assign __version__ exactly once, to a string literal"
    return values[0]


def test_version_has_one_source():
    data = _pyproject()
    assert "version" not in data["project"], "pyproject.toml must not repeat the version (it is dynamic)"
    assert "version" in data["project"].get("dynamic", [])
    assert data["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "pni_fast.__version__"}
    assert _static_version() == pni_fast.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+(?:(?:a|b|rc)\d+)?(?:\.dev\d+)?", pni_fast.__version__)
    setup_py = ast.parse(_read("setup.py"))
    for node in ast.walk(setup_py):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup":
            assert "version" not in {k.arg for k in node.keywords}, "setup.py must not set its own version"


def test_setuptools_reads_the_same_version():
    pyprojecttoml = pytest.importorskip("setuptools.config.pyprojecttoml", reason="setuptools not installed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. setuptools' notes on the license table form
        config = pyprojecttoml.read_configuration(os.path.join(ROOT, "pyproject.toml"), expand=True)
    assert config["project"]["version"] == pni_fast.__version__


def test_installed_metadata_matches_the_package():
    try:
        dist = importlib.metadata.distribution("pni_fast")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("pni_fast is imported from a checkout without installed metadata")
    assert dist.version == pni_fast.__version__, (
        f"installed metadata says {dist.version}, pni_fast.__version__ is {pni_fast.__version__}: "
        "reinstall with `pip install --no-build-isolation -e .`"
    )


def test_pytest_markers_are_registered_in_pyproject():
    options = _pyproject()["tool"]["pytest"]["ini_options"]
    assert options["testpaths"] == ["tests"]
    names = {m.split(":", 1)[0].strip() for m in options["markers"]}
    used = set()
    for name in os.listdir(os.path.join(ROOT, "tests")):
        if name.endswith(".py"):
            used |= set(re.findall(r"pytest\.mark\.([A-Za-z_]\w*)", _read("tests", name)))
    builtin = {"parametrize", "skipif", "skip", "xfail", "usefixtures", "filterwarnings"}
    assert used - builtin <= names, f"markers used but not registered: {sorted(used - builtin - names)}"


# ---------------------------------------------------------------------------
# design.md citations
# ---------------------------------------------------------------------------

_GAP = r"(?:[\s*#/`\"(]|//)*"  # spaces, line breaks and comment markers between the words
_CITE = re.compile(
    rf"design\.md`?{_GAP},?{_GAP}(?:section|§){_GAP}(\d+(?:\.\d+)?)"
    rf"|(?:section|§){_GAP}(\d+(?:\.\d+)?){_GAP}of{_GAP}(?:docs/)?design\.md",
    re.IGNORECASE,
)


def citations(text: str) -> list[str]:
    """Section numbers a text cites as 'design.md section N', 'design.md §N' or 'section N of design.md'."""
    return [a or b for a, b in _CITE.findall(text)]


def design_sections(text: str) -> set[str]:
    """Numbers of the '## N.' and '### N.M' headings of design.md."""
    return set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.?\s", text, re.MULTILINE))


def test_citation_scanner_finds_the_forms_the_code_uses():
    text = (
        "see design.md section 3\n"
        "// Shared core (design.md §10).\n"
        "headers (design.md\n  section 9) and\n"
        "# never fast-math (design.md\n# section 11)\n"
        "section 3.3 of design.md; docs/design.md section 7"
    )
    assert citations(text) == ["3", "10", "9", "11", "3.3", "7"]
    assert citations("design.md describes it; section 2 of ops.md") == []


def test_design_sections_are_numbered_in_order():
    top = [int(n) for n in re.findall(r"^## (\d+)\. ", _read("docs", "design.md"), re.MULTILINE)]
    assert top == list(range(1, len(top) + 1)), f"design.md top-level sections out of order: {top}"


def test_every_design_md_citation_points_at_an_existing_section():
    sections = design_sections(_read("docs", "design.md"))
    assert "3" in sections and "3.1" in sections  # the parser reads both heading levels
    cited: dict[str, list[str]] = {}
    for path in _repo_text_files():
        for number in citations(_read(path)):
            cited.setdefault(number, []).append(path)
    assert cited, "no design.md citation found: the scanner is broken"
    missing = {n: paths for n, paths in cited.items() if n not in sections}
    assert not missing, f"design.md has no section for these citations: {missing}"


# ---------------------------------------------------------------------------
# Documentation links
# ---------------------------------------------------------------------------

_TOP_DIRS = ("docs", "scripts", "tests", "pni_fast", "benchmarks", "csrc")
_PATH = re.compile(rf"`((?:{'|'.join(_TOP_DIRS)})/[\w./-]*)`")
_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _doc_files() -> list[str]:
    return ["README.md"] + sorted(
        os.path.join("docs", n) for n in os.listdir(os.path.join(ROOT, "docs")) if n.endswith(".md")
    )


def referenced_paths(doc: str, text: str) -> set[str]:
    """Repository paths a Markdown file names: relative links and backticked paths under a top-level dir."""
    found = set()
    for target in _LINK.findall(text):
        if not re.match(r"[a-z]+:", target):  # not http:, https:, mailto:
            found.add(os.path.normpath(os.path.join(os.path.dirname(doc), target)))
    for path in _PATH.findall(text):
        if "<" not in path and "*" not in path:  # placeholders and globs are not paths
            found.add(os.path.normpath(path.rstrip("/")))
    return found


def test_path_scanner_reads_links_and_backticked_paths():
    text = "[ops](ops.md) and [web](https://x.org) and `pni_fast/rng.py`, `tests/test_<name>.py`, `csrc/cuda/*.cu`"
    assert referenced_paths("docs/a.md", text) == {"docs/ops.md", "pni_fast/rng.py"}


def test_docs_referenced_from_readme_exist():
    readme = _read("README.md")
    docs = {p for p in referenced_paths("README.md", readme) if p.startswith("docs" + os.sep)}
    docs |= {os.path.normpath(p) for p in re.findall(r"docs/[\w.-]+\.md", readme)}
    missing = sorted(p for p in docs if not os.path.isfile(os.path.join(ROOT, p)))
    assert not missing, f"README.md names docs that do not exist: {missing}"


def is_build_output(path: str) -> bool:
    """A path .gitignore names (pni_fast/_C.cpython-311-x86_64-linux-gnu.so, pni_fast/_C_build.json):
    what a build writes, so a checkout without an in-place build (or another Python's) lacks it."""
    gitignore = os.path.join(ROOT, ".gitignore")
    if not os.path.isfile(gitignore):
        return False
    posix = path.replace(os.sep, "/")
    parts = posix.split("/")
    for pattern in _read(".gitignore").splitlines():
        pattern = pattern.strip()
        if not pattern or pattern.startswith(("#", "!")):
            continue
        if pattern.endswith("/"):  # a folder, at any depth
            hit = any(fnmatch.fnmatchcase(p, pattern.rstrip("/")) for p in parts[:-1])
        elif "/" in pattern:  # anchored at the root
            hit = fnmatch.fnmatchcase(posix, pattern.lstrip("/"))
        else:  # a name, at any depth
            hit = any(fnmatch.fnmatchcase(p, pattern) for p in parts)
        if hit:
            return True
    return False


def test_build_outputs_are_recognised():
    assert is_build_output(os.path.normpath("pni_fast/_C.cpython-312-x86_64-linux-gnu.so"))
    assert is_build_output(os.path.normpath("pni_fast/_C_build.json"))
    assert is_build_output(os.path.normpath("build/lib/x.py"))
    assert not is_build_output(os.path.normpath("pni_fast/_build_config.py"))
    assert not is_build_output(os.path.normpath("docs/install.md"))


@pytest.mark.parametrize("doc", _doc_files())
def test_paths_named_in_the_docs_exist(doc):
    """Every path a doc names exists; a build output (which a fresh checkout lacks) needs only its folder."""
    paths = referenced_paths(doc, _read(doc)) - GUIDE_EXAMPLE_PATHS
    missing = sorted(
        p
        for p in paths
        if not os.path.exists(os.path.join(ROOT, p))
        and not (is_build_output(p) and os.path.isdir(os.path.join(ROOT, os.path.dirname(p))))
    )
    assert not missing, f"{doc} names paths that do not exist: {missing}"
