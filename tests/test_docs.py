"""The README is the front page and docs/ the reference: every page is linked from the front page, every relative
link and anchor resolves, and every `lmmr1-lite` command the pages show parses with the CLI's own parser (its
`--set` keys are config fields), so a renamed flag or field cannot leave a stale command behind."""
from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

import pytest

from lmmr1_lite.cli import build_parser
from lmmr1_lite.config import TrainConfig

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))
LINK = re.compile(r"\]\(([^)\s]+)\)")
COMMAND = re.compile(r"(?:^|`)(lmmr1-lite [^`\n]*)", re.M)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", page.read_text(), re.M)}


def commands(page: Path) -> list[str]:
    text = re.sub(r"\\\n\s*", " ", page.read_text())  # a shell line continued with a backslash is one command
    return [m.group(1) for m in COMMAND.finditer(text)]


def test_the_front_page_opens_with_the_two_commands_and_links_every_docs_page():
    readme = (REPO / "README.md").read_text()
    first_block = readme.split("```")[1]
    assert [line.split("#")[0].strip() for line in first_block.splitlines()[1:] if line.strip()] == \
        ["make demo", "make test"]
    linked = {Path(target.split("#")[0]).name for target in LINK.findall(readme) if target.startswith("docs/")}
    assert {p.name for p in PAGES[1:]} <= linked
    assert len(readme.splitlines()) < 200, "the reference belongs in docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_and_anchor_resolves(page):
    for target in LINK.findall(page.read_text()):
        if re.match(r"^[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path) if path else page
        assert resolved.exists(), f"{page.name}: {target}"
        if anchor and resolved.suffix == ".md":
            assert anchor in anchors(resolved), f"{page.name}: {target}"


def test_every_command_in_the_pages_parses():
    parser = build_parser()
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    seen = 0
    for page in PAGES:
        for command in commands(page):
            words = shlex.split(command.replace("[", " ").replace("]", " "), comments=True)[1:]
            try:
                args = parser.parse_args(words)
            except SystemExit as stop:  # --help exits 0; anything else is a command that no longer parses
                assert stop.code == 0, f"{page.name}: {command}"
                continue
            for assignment in getattr(args, "sets", None) or []:
                assert assignment.split("=")[0] in fields, f"{page.name}: {command}"
            seen += 1
    assert seen >= 30  # the pages show about forty commands: a broken extraction cannot pass
