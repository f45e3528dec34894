"""The documentation: every page's Python code runs, the README's too, and the site builds in strict mode.

Code extraction is generic: the fenced blocks opened with exactly ```python in a page are
run in order, in one namespace per page, in a temporary working folder (figures a page
saves land there).  Blocks in other languages (```bash, ```text) are not run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def python_blocks(path: Path) -> list[str]:
    """The ```python fenced blocks of a Markdown file, in order."""
    return [m.group(1) for m in _FENCE.finditer(path.read_text(encoding="utf-8"))]


def _pages() -> list[Path]:
    pages = sorted(DOCS.rglob("*.md")) + [ROOT / "README.md"]
    return [p for p in pages if python_blocks(p)]


def test_extraction_finds_the_tutorials():
    names = {p.relative_to(ROOT).as_posix() for p in _pages()}
    for page in ("docs/index.md", "docs/tutorials/flax_noise.md", "docs/tutorials/analytic_vs_mc.md",
                 "docs/tutorials/denoising.md", "README.md"):
        assert page in names, page
    assert python_blocks(ROOT / "docs" / "cli.md") == []  # bash only


@pytest.mark.parametrize("page", _pages(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_page_code_runs(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for i, block in enumerate(python_blocks(page)):
        code = compile(block, f"{page.relative_to(ROOT)} [python block {i + 1}]", "exec")
        exec(code, namespace)  # noqa: S102 - the documentation's own code


def _mkdocs_available() -> bool:
    try:
        import mkdocs  # noqa: F401
        import mkdocstrings  # noqa: F401
    except ImportError:
        return False
    return True


def _build(config: Path, site: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               NO_MKDOCS_2_WARNING="1", JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "--site-dir", str(site)],
                          capture_output=True, text=True, env=env, cwd=config.parent, timeout=600)


@pytest.fixture(scope="module")
def needs_mkdocs():
    if not _mkdocs_available():
        if os.environ.get("CI"):
            pytest.fail("mkdocs / mkdocstrings missing: install the docs extra (pip install -e '.[test,docs]')")
        pytest.skip("mkdocs not installed (pip install -e '.[docs]')")


def test_site_builds_in_strict_mode(needs_mkdocs, tmp_path):
    proc = _build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert proc.returncode == 0, proc.stderr[-3000:]
    site = tmp_path / "site"
    for page in ("index.html", "snr/index.html", "tutorials/flax_noise/index.html", "api/simulate/index.html"):
        assert (site / page).is_file(), page
    api = (site / "snr" / "index.html").read_text(encoding="utf-8")
    assert "layer_snr_db" in api and "10·log10" in api  # the docstrings made it into the reference


def test_broken_reference_fails_the_build(needs_mkdocs, tmp_path):
    """Strict mode is on: a cross-reference to nothing, or a link to a missing page, fails."""
    copy = tmp_path / "repo"
    shutil.copytree(DOCS, copy / "docs", ignore=shutil.ignore_patterns("figures"))
    shutil.copy(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
    (copy / "noisejax").symlink_to(ROOT / "noisejax")
    page = copy / "docs" / "snr.md"
    original = page.read_text(encoding="utf-8")
    page.write_text(original + "\nSee [nothing][noisejax.snr.no_such_function].\n", encoding="utf-8")
    proc = _build(copy / "mkdocs.yml", tmp_path / "site1")
    assert proc.returncode != 0 and "no_such_function" in proc.stderr
    page.write_text(original + "\nSee [a missing page](no_such_page.md).\n", encoding="utf-8")
    proc = _build(copy / "mkdocs.yml", tmp_path / "site2")
    assert proc.returncode != 0 and "no_such_page.md" in proc.stderr


def test_docstrings_are_read_as_markdown():
    """The griffe extension: reST roles become inline code, ``::`` blocks fenced code."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sphinx_roles", DOCS / "_ext" / "sphinx_roles.py")
    if importlib.util.find_spec("griffe") is None:
        pytest.skip("griffe not installed (pip install -e '.[docs]')")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    text = "See :func:`noisejax.snr.snr_db` and :class:`~x.Y`.\n\nExample::\n\n    >>> f(1)\n    2\n\nDone."
    md = mod.to_markdown(text)
    assert "`noisejax.snr.snr_db`" in md and "`x.Y`" in md and ":func:" not in md and ":class:" not in md
    assert "**Example**\n\n```python\n>>> f(1)\n2\n```\n\nDone." in md
    assert mod.to_markdown("a formula::\n\n      y = f(x)\n") == "a formula:\n\n```text\ny = f(x)\n```\n"
