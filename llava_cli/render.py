"""How an answer is shown on stdout: streamed plain text, one JSON object, or Markdown rendered on a terminal."""

from __future__ import annotations

import os
from collections.abc import Iterable
from enum import Enum

from rich.console import Console


class Format(str, Enum):
    text = "text"
    json = "json"
    markdown = "markdown"


def plain(console: Console) -> bool:
    """Plain text when stdout is not a terminal, or NO_COLOR is set (https://no-color.org)."""
    return not console.is_terminal or bool(os.environ.get("NO_COLOR"))


def split_blocks(text: str) -> tuple[str, str]:
    """(finished Markdown blocks, the block still being written): blocks end at a blank line outside a code fence."""
    fence, end, pos = None, 0, 0
    for line in text.splitlines(keepends=True):
        pos += len(line)
        if not line.endswith("\n"):
            break  # the last line is still being written
        mark = line.lstrip()[:3]
        if mark in ("```", "~~~"):
            fence = None if fence == mark else fence or mark
        elif fence is None and not line.strip():
            end = pos
    return text[:end], text[end:]


def stream_markdown(chunks: Iterable[str], console: Console) -> str:
    """Show Markdown as it arrives: each finished block printed rendered, the one being written live; returns the text."""
    from rich.live import Live
    from rich.markdown import Markdown

    text, shown = "", 0
    with Live(console=console, transient=True, refresh_per_second=8, vertical_overflow="ellipsis") as live:
        for chunk in chunks:
            text += chunk
            done, rest = split_blocks(text[shown:])
            if done.strip():
                live.console.print(Markdown(done))
                live.console.print()  # the blank line that separated the blocks
            shown += len(done)
            live.update(Markdown(rest))
    if text[shown:].strip():
        console.print(Markdown(text[shown:]))
    return text
