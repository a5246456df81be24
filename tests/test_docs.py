"""The README and docs/ point only into the repository (issue 10 §5): no path outside it, and every
relative link names a file that exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_points_only_into_the_repository(doc: Path) -> None:
    text = doc.read_text()
    assert "../" not in text
    assert "shared/" not in text
    for target in LINK.findall(text):
        if "://" in target:
            continue
        assert (doc.parent / target).resolve().is_relative_to(REPO), target
        assert (doc.parent / target).exists(), f"{doc.name} links to a missing {target}"


def test_the_design_documents_exist_and_the_readme_links_them() -> None:
    readme = (REPO / "README.md").read_text()
    for name in ("design.md", "tree-rules.md", "cli.md"):
        assert (REPO / "docs" / name).is_file()
        assert f"docs/{name}" in readme
