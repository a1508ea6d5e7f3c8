"""The documentation site (mkdocs.yml): every page in the nav, every public name in the
generated reference, and a strict build that a broken link or a renamed function fails."""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path

import pytest

from tests.helpers import ROOT, missing_program, run_py

MKDOCS = ROOT / "mkdocs.yml"


def _nav_pages() -> list[str]:
    """The pages mkdocs.yml's nav names, in order (``Title: page.md`` lines)."""
    nav = MKDOCS.read_text().split("\nnav:\n", 1)[1]
    return re.findall(r"^\s+- (?:[^:\n]+: )?([\w./-]+\.md)\s*$", nav, flags=re.MULTILINE)


def _reference_names(page: str, prefix: str) -> set[str]:
    """The names a reference page renders with ``::: prefix.name``."""
    text = (ROOT / "docs" / "reference" / page).read_text()
    return set(re.findall(rf"^::: {re.escape(prefix)}\.(\w+)\s*$", text, flags=re.MULTILINE))


def test_d26_2_every_docs_page_is_in_the_nav_and_every_nav_page_exists():
    """D26-2: each Markdown page under docs/ has a line in mkdocs.yml's nav (a page added
    without one would be built but unreachable), and each nav line names a page that exists."""
    pages = _nav_pages()
    on_disk = {str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md")}
    assert sorted(on_disk - set(pages)) == [], "pages missing from mkdocs.yml's nav"
    assert sorted(set(pages) - on_disk) == [], "nav entries without a page"
    assert len(pages) == len(set(pages)), "a page is listed twice in the nav"


def test_d26_2_the_api_reference_renders_every_public_name():
    """D26-2: the generated reference renders exactly ``devlayer.__all__`` (less
    ``__version__``) and ``devlayer.train.__all__``: a new public name without its
    reference entry, or an entry for a name that is gone, fails here, before the build."""
    import devlayer
    import devlayer.train

    assert _reference_names("devlayer.md", "devlayer") == set(devlayer.__all__) - {"__version__"}
    assert _reference_names("train.md", "devlayer.train") == set(devlayer.train.__all__)


def _build(tmp_path: Path, plant: str = "") -> tuple[int, str]:
    """``mkdocs build --strict`` of this checkout's docs, with ``plant`` appended to one
    page of a copy of docs/ (the checkout itself is never changed)."""
    if importlib.util.find_spec("mkdocs") is None:
        missing_program('mkdocs is not installed (pip install -e ".[docs]")')
    docs = tmp_path / "docs"
    shutil.copytree(ROOT / "docs", docs)
    with (docs / "collectives.md").open("a") as page:
        page.write(plant)
    config = MKDOCS.read_text().replace("docs_dir: docs", f"docs_dir: {docs}")
    config = config.replace("tools/", f"{ROOT}/tools/")
    (tmp_path / "mkdocs.yml").write_text(config)
    site = tmp_path / "site"
    proc = run_py(
        ["-m", "mkdocs", "build", "--strict", "-f", str(tmp_path / "mkdocs.yml"), "-d", str(site)],
        timeout=280,
    )
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_d26_3_the_site_builds_strictly(tmp_path):
    """D26-3: the site as it is builds with ``--strict`` (no warning), with a page per nav
    line, the generated reference and the command-line help in it."""
    code, out = _build(tmp_path)
    assert code == 0, out
    site = tmp_path / "site"
    assert "devlayer.all_reduce" in (site / "reference" / "devlayer" / "index.html").read_text()
    assert "devlayer launch [-h]" in (site / "cli" / "index.html").read_text()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_d26_3_a_broken_link_or_anchor_fails_the_build(tmp_path):
    """D26-3: a link to a missing page, a missing anchor or a missing repository file (the
    links from docs/ to examples/) each make the strict build fail, named."""
    plant = "\n[a](nope.md) [b](training.md#nope) [c](../examples/nope.py)\n"
    code, out = _build(tmp_path, plant)
    assert code != 0
    assert "contains a link 'nope.md'" in out
    assert "does not contain an anchor '#nope'" in out
    assert "links to ../examples/nope.py, which does not exist" in out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_d26_3_a_renamed_function_fails_the_build(tmp_path):
    """D26-3: a reference entry for a name devlayer no longer has fails the strict build."""
    code, out = _build(tmp_path, "\n::: devlayer.all_reduce_renamed\n")
    assert code != 0
    assert "devlayer.all_reduce_renamed could not be found" in out
