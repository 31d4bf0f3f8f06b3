"""Every relative link in the repository's Markdown files resolves: the file exists and, for
`file.md#anchor` or `#anchor`, the target file has a heading with that anchor.

Anchors follow GitHub's rule for headings: the heading's text (inline code without its
backticks) lowercased, every character that is not a letter, digit, underscore, space or hyphen
removed, spaces turned into hyphens; a repeated heading gets `-1`, `-2`, ... appended.
"""

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP_DIRS = {".git", "runs", "build", "dist", "node_modules"}

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"`[^`]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def markdown_files():
    for base, dirs, names in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        for name in sorted(names):
            if name.endswith(".md"):
                yield os.path.join(base, name)


def prose_lines(text):
    """The lines outside fenced code blocks, as (line number, line)."""
    in_fence = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if not in_fence:
            yield number, line


def slug(heading):
    text = heading.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text):
    seen = {}
    result = set()
    for _, line in prose_lines(text):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def links(text):
    for number, line in prose_lines(text):
        for target in LINK.findall(INLINE_CODE.sub("", line)):
            yield number, target


def broken_links(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    problems = []
    for number, target in links(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
        where = f"{os.path.relpath(path, ROOT)}:{number}: {target}"
        if not os.path.exists(resolved):
            problems.append(f"{where}: no such file")
            continue
        if anchor and resolved.endswith(".md"):
            with open(resolved, encoding="utf-8") as f:
                if anchor not in anchors(f.read()):
                    problems.append(f"{where}: no heading with anchor #{anchor}")
    return problems


def test_slug_follows_github_headings():
    # Hand-derived from GitHub's rendering of these headings.
    assert slug("Fine-tuning, evaluation and inference") == "fine-tuning-evaluation-and-inference"
    assert slug("Token dispatch (`model.moe.dispatch`)") == "token-dispatch-modelmoedispatch"
    assert slug("1. Create the slice (once)") == "1-create-the-slice-once"
    assert anchors("# A\n## A\n```\n# A\n```\n## A\n") == {"a", "a-1", "a-2"}


def test_links_inside_code_are_not_links():
    text = "see `[x](missing.md)` and\n```\n[y](missing.md)\n```\n[z](here.md#top)\n"
    assert list(links(text)) == [(5, "here.md#top")]


@pytest.mark.parametrize("path", list(markdown_files()), ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_resolve(path):
    assert broken_links(path) == []
