"""The package cites its own docs, and every cited section exists (``docs/X.md, "Heading"``)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITATION = re.compile(r'docs/([\w/]+\.md),?\s+"([^"]+)"', re.S)


def headings(doc: Path) -> list[str]:
    return [line.lstrip("#").strip() for line in doc.read_text().splitlines() if line.startswith("#")]


def test_every_cited_docs_section_exists():
    missing = []
    for path in (ROOT / "reinforcepp").rglob("*.py"):
        text = " ".join(path.read_text().split())  # a citation may be wrapped over two lines
        for doc, heading in CITATION.findall(text):
            target = ROOT / "docs" / doc
            if not target.exists() or not any(h.startswith(heading.rstrip(".")) for h in headings(target)):
                missing.append(f"{path.relative_to(ROOT)}: docs/{doc}, \"{heading}\"")
    assert not missing, "cited sections that do not exist:\n" + "\n".join(sorted(set(missing)))


def test_nothing_cites_a_file_outside_the_repository():
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "reinforcepp").rglob("*.py")
                 if "ALGORITHM.md" in p.read_text()]
    assert not offenders, offenders
