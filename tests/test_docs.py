"""Every code block of README.md and docs/ runs here, so that a documented example cannot break.

The rules the docs follow (checked below):
- code is fenced, with its language: ```python blocks are run, each in a fresh interpreter in an
  empty directory, and must succeed; ```sh blocks are commands: every ``python -m vrange ...`` line
  must parse with the real command line (``--list`` and ``features`` ones are run), and every file a
  command names must exist; ```text blocks are output or illustrations and are not run;
- no indented code blocks and no fences without a language (they could hide code from this test);
- every page of docs/ is in the site's nav (mkdocs.yml; `.ci/docs` builds the site), and every nav
  entry exists.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from vrange.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LANGUAGES = {"python", "sh", "text"}
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([^`\s]*)\s*$")
LIST_ITEM = re.compile(r"^\s*([-*+]|\d+[.)])\s")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    language: str
    text: str

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def fenced_blocks(path: Path) -> list[Block]:
    blocks: list[Block] = []
    lines = path.read_text().splitlines()
    index = 0
    while index < len(lines):
        match = FENCE.match(lines[index])
        if not match:
            index += 1
            continue
        indent, fence, language = match.groups()
        body: list[str] = []
        end = index + 1
        while end < len(lines) and not lines[end].strip().startswith(fence):
            body.append(lines[end][len(indent):] if lines[end].startswith(indent) else lines[end])
            end += 1
        blocks.append(Block(path, index + 1, language, "\n".join(body) + "\n"))
        index = end + 1
    return blocks


def indented_code_lines(path: Path) -> list[int]:
    """Lines that start an indented code block (CommonMark): indented by four spaces or more after
    a blank line, outside a fence and not continuing a list item."""
    found = []
    in_fence = False
    previous_text = ""  # the last non-blank line before the current blank run
    blank_before = True
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if FENCE.match(line):
            in_fence = not in_fence
            blank_before = False
            previous_text = line
            continue
        if in_fence:
            continue
        if not line.strip():
            blank_before = True
            continue
        indented = line.startswith("    ") or line.startswith("\t")
        in_list = bool(LIST_ITEM.match(previous_text)) or previous_text.startswith((" ", "\t"))
        if indented and blank_before and not in_list:
            found.append(number)
        if not (indented and not blank_before):
            previous_text = line
        blank_before = False
    return found


BLOCKS = [block for path in DOCUMENTS for block in fenced_blocks(path)]


def test_the_docs_have_code_blocks_to_check() -> None:
    assert any(block.language == "python" for block in BLOCKS)
    assert any(block.language == "sh" for block in BLOCKS)


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda path: str(path.relative_to(ROOT)))
def test_code_is_fenced_with_a_language(path: Path) -> None:
    assert indented_code_lines(path) == [], \
        f"{path.name}: indented code blocks (fence them with a language)"
    untagged = [block.line for block in fenced_blocks(path) if block.language not in LANGUAGES]
    assert untagged == [], f"{path.name}: fences without one of {sorted(LANGUAGES)}"


@pytest.mark.parametrize("block", [block for block in BLOCKS if block.language == "python"],
                         ids=lambda block: block.name)
def test_python_blocks_run(block: Block, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-c", block.text], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, f"{block.name} failed:\n{result.stdout}\n{result.stderr}"


def commands(block: Block) -> list[list[str]]:
    found = []
    for line in block.text.splitlines():
        line = line.strip().removeprefix("$ ")
        if not line or line.startswith("#"):
            continue
        for command in re.split(r"\s*&&\s*", line):
            words = shlex.split(command, comments=True)
            if words:
                found.append(words)
    return found


@pytest.mark.parametrize("block", [block for block in BLOCKS if block.language == "sh"],
                         ids=lambda block: block.name)
def test_shell_blocks_name_real_commands(block: Block) -> None:
    parser = build_parser()
    for words in commands(block):
        if words[:3] == ["python", "-m", "vrange"]:
            arguments = words[3:]
            try:
                parser.parse_args(arguments)
            except SystemExit as stop:
                pytest.fail(f"{block.name}: `{shlex.join(words)}` does not parse ({stop})")
            if "--list" in arguments or arguments[:1] == ["features"]:
                result = subprocess.run([sys.executable, "-m", "vrange", *arguments],
                                        capture_output=True, text=True, timeout=300, cwd=ROOT)
                assert result.returncode == 0, f"{block.name}: {result.stderr}"
        for word in words[1:]:
            if "/" in word and not word.startswith(("-", "'", "http")) and "*" not in word \
                    and not word.endswith("/"):
                path = word.split("::")[0]
                assert (ROOT / path).exists(), f"{block.name}: {path} does not exist"


NAV_ENTRY = re.compile(r"^\s+- (?:[^:\n]+:\s+)?([\w./-]+\.md)\s*$")


def nav_pages() -> list[str]:
    """The pages mkdocs.yml's ``nav`` lists, read without a YAML parser: the section runs from
    ``nav:`` to the next top-level key, one ``- Title: page.md`` (or ``- page.md``) a line."""
    lines = (ROOT / "mkdocs.yml").read_text().splitlines()
    start = lines.index("nav:") + 1
    end = next((index for index in range(start, len(lines))
                if lines[index] and not lines[index][0].isspace()), len(lines))
    return [match.group(1) for line in lines[start:end] if (match := NAV_ENTRY.match(line))]


def test_every_docs_page_is_in_the_site_nav_and_every_nav_entry_exists() -> None:
    listed = nav_pages()
    assert listed, "mkdocs.yml: no nav entries found"
    assert len(listed) == len(set(listed)), f"mkdocs.yml: pages listed twice in nav: {listed}"
    pages = sorted(path.name for path in (ROOT / "docs").glob("*.md"))
    assert sorted(set(pages) - set(listed)) == [], "docs pages missing from mkdocs.yml's nav"
    assert sorted(set(listed) - set(pages)) == [], "mkdocs.yml's nav names pages that do not exist"
