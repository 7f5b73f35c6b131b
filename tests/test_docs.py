"""The user documentation stays true to the code: the configuration table is generated from Pulumi.yaml, and every
relative link between README.md, docs/ and bench/ points at a file and heading that exist."""

import re
from pathlib import Path

import pytest
import yaml

from docs.config_reference import DOC_FILE, PROJECT_FILE, updated_document

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "bench").glob("*.md"))]
LINK = re.compile(r"\]\((?!https?://|mailto:)([^)\s]*)\)")


def test_configuration_table_is_generated_from_pulumi_yaml() -> None:
    project = yaml.safe_load(PROJECT_FILE.read_text(encoding="utf-8"))
    document = DOC_FILE.read_text(encoding="utf-8")
    assert document == updated_document(document, project), "run `python docs/config_reference.py`"


def github_anchor(heading: str) -> str:
    """The id GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    return {github_anchor(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        path_part, _, anchor = target.partition("#")
        linked = (page.parent / path_part).resolve() if path_part else page
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(target)
    assert not broken, f"{page.name}: broken links {broken}"
