"""The documentation: generated pages fresh, design citations resolve, README a front door, the site builds."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from altgrad.docs_pages import COMMAND, PAGES

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "design.md"
#: "DESIGN §5.1", "DESIGN §4", and the older spellings "DESIGN 5.2", "DESIGN.md section 1".
CITATION = re.compile(r"DESIGN(?:\.md)?\s+(?:§\s*|section\s+)?(\d+(?:\.\d+)?)\b")


@pytest.fixture(scope="module")
def fresh_pages():
    """Every generated page as a fresh interpreter renders it, as the regeneration command does
    (in this process, other tests' registrations could change a registry)."""
    code = "import json; from altgrad.docs_pages import PAGES; print(json.dumps({k: f() for k, f in PAGES.items()}))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.parametrize("rel", sorted(PAGES))
def test_generated_page_is_fresh(rel, fresh_pages):
    path = ROOT / rel
    assert path.exists(), f"{rel} is missing; regenerate with `{COMMAND}`"
    assert path.read_text(encoding="utf-8") == fresh_pages[rel], f"{rel} is stale; regenerate with `{COMMAND}`"


def test_config_reference_is_registered():
    pytest.importorskip("altgrad.training.config_doc")
    assert "docs/reference/config.md" in PAGES


def design_sections() -> set[str]:
    sections = set()
    for line in DESIGN.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^#{2,3}\s+(\d+(?:\.\d+)?)\.?\s+\S", line)
        if match:
            sections.add(match.group(1))
    return sections


def citations() -> list[tuple[str, str]]:
    found = []
    files = [*(ROOT / "altgrad").rglob("*.py"), *(ROOT / "tests").rglob("*.py"), *(ROOT / "docs").rglob("*.md")]
    for path in files:
        for match in CITATION.finditer(path.read_text(encoding="utf-8")):
            found.append((str(path.relative_to(ROOT)), match.group(1)))
    return found


def test_design_has_the_numbered_sections():
    sections = design_sections()
    assert {"1", "2", "3", "4", "5", "5.1", "5.2"} <= sections, sorted(sections)
    text = DESIGN.read_text(encoding="utf-8")
    assert "## 4. Weight storage and the optimizer arms" in text
    assert "### 5.1 Fair tuning" in text


def test_every_design_citation_resolves():
    found = citations()
    assert len(found) > 20, "the citation pattern no longer finds the code's citations"
    sections = design_sections()
    missing = sorted({f"{path}: DESIGN §{number}" for path, number in found if number not in sections})
    assert not missing, "citations of sections docs/design.md does not have:\n" + "\n".join(missing)


def test_citation_pattern():
    assert CITATION.findall("see DESIGN §5.1, DESIGN §4 and DESIGN 5.2; DESIGN.md section 1") == \
        ["5.1", "4", "5.2", "1"]
    assert CITATION.findall("DESIGN: elements with a non-zero gradient") == []


def local_links(text: str) -> list[str]:
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    return [link.split("#")[0] for link in links if not re.match(r"^[a-z]+:", link) and not link.startswith("#")]


def test_readme_is_a_front_door():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text) <= 8000, f"README.md has {len(text)} characters; move detail into docs/"
    links = local_links(text)
    assert "docs/results/report.md" in links and "docs/design.md" in links
    missing = [link for link in links if not (ROOT / link).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()[-1]
    assert f"```bash\n{ci}\n```" in (ROOT / "README.md").read_text(encoding="utf-8")
    assert "'.[test,docs]'" in ci


def nav_pages(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [page for item in node for page in nav_pages(item)]
    if isinstance(node, dict):
        return [page for value in node.values() for page in nav_pages(value)]
    return []


def test_nav_covers_every_page():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    nav = nav_pages(config["nav"])
    docs = ROOT / "docs"
    pages = sorted(str(p.relative_to(docs)) for p in docs.rglob("*.md"))
    assert sorted(nav) == pages, f"not in the nav: {sorted(set(pages) - set(nav))}; " \
                                 f"in the nav but missing: {sorted(set(nav) - set(pages))}"


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                             "-d", str(tmp_path / "site")], cwd=ROOT, env=env, capture_output=True, text=True)
    # not -q: a quiet build does not count warnings, so --strict would pass anything
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "design" / "index.html").exists()


def test_metric_page_covers_every_registry():
    from altgrad.docs_pages import METRIC_SOURCES

    declared = set()
    for path in (ROOT / "altgrad").rglob("*.py"):
        if re.search(r"^METRICS(: [^=]+)? =", path.read_text(encoding="utf-8"), flags=re.M):
            declared.add(".".join(path.relative_to(ROOT).with_suffix("").parts))
    assert declared == {module for module, _ in METRIC_SOURCES}
