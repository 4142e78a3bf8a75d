"""ask --format text|json|markdown: plain text off a terminal or with NO_COLOR, Markdown rendered on a terminal."""

import io
import json
import os
import pty
import subprocess
import sys

import pytest
from rich.console import Console
from typer.testing import CliRunner

from checkpoints import DATA
from llava_cli.cli import app
from llava_cli.render import plain, split_blocks, stream_markdown

PHOTO = str(DATA / "chelsea.png")


@pytest.mark.parametrize("text,done,rest", [
    ("# Title\n\nA para", "# Title\n\n", "A para"),
    ("one\ntwo", "", "one\ntwo"),
    ("a\n\n```\ncode\n\nmore\n```\n\nb", "a\n\n```\ncode\n\nmore\n```\n\n", "b"),
    ("a\n\n```\ncode\n\nstill open", "a\n\n", "```\ncode\n\nstill open"),
    ("- x\n- y\n\n", "- x\n- y\n\n", ""),
])
def test_blocks_end_at_blank_lines_outside_code_fences(text, done, rest):
    assert split_blocks(text) == (done, rest)


def test_markdown_is_rendered_on_a_terminal():
    console = Console(file=io.StringIO(), force_terminal=True, width=60, color_system="standard")
    chunks = ["# Ti", "tle\n\nSome **bo", "ld** words\n\n- one\n- two\n\n", "`code` end"]
    assert stream_markdown(chunks, console) == "".join(chunks)
    shown = console.file.getvalue()
    assert "\x1b[1m" in shown and "**" not in shown and "# Title" not in shown and "•" in shown
    assert shown.count("Some") == 1 and "Title" in shown  # each block printed once


def test_plain_off_a_terminal_or_with_no_color(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert plain(Console(file=io.StringIO()))
    assert not plain(Console(file=io.StringIO(), force_terminal=True))
    monkeypatch.setenv("NO_COLOR", "1")
    assert plain(Console(file=io.StringIO(), force_terminal=True))


def test_formats_off_a_terminal(qwen):
    args = ["ask", PHOTO, "What is this?", "-m", qwen, "-n", "6", "--dtype", "float32"]
    runner = CliRunner()
    text = runner.invoke(app, args).stdout
    assert runner.invoke(app, [*args, "--format", "text"]).stdout == text
    assert runner.invoke(app, [*args, "--format", "markdown"]).stdout == text  # not a terminal: the plain text
    as_json = json.loads(runner.invoke(app, [*args, "--format", "json"]).stdout)
    alias = json.loads(runner.invoke(app, [*args, "--json"]).stdout)
    assert as_json["answer"] == alias["answer"] == text.removesuffix("\n")
    r = runner.invoke(app, [*args, "--json", "--format", "markdown"])
    assert r.exit_code == 2 and "--json and --format markdown disagree" in r.stderr
    assert runner.invoke(app, [*args, "--format", "html"]).exit_code == 2


def _on_a_terminal(args, **env) -> bytes:
    """stdout of `llava ARGS` written to a pseudo-terminal."""
    leader, follower = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "llava_cli", *args], stdout=follower, stderr=subprocess.DEVNULL,
                         env={**os.environ, "COLUMNS": "100", **env})
    os.close(follower)
    data = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the writer closed the terminal
            break
        if not chunk:
            break
        data += chunk
    assert p.wait(timeout=120) == 0
    os.close(leader)
    return data


def test_markdown_on_a_real_terminal_and_no_color(qwen):
    args = ["ask", PHOTO, "What is this?", "-m", qwen, "-n", "6", "--dtype", "float32"]
    text = CliRunner().invoke(app, args).stdout
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    shown = _on_a_terminal([*args, "--format", "markdown"], **{**env, "NO_COLOR": ""})
    assert b"\x1b[" in shown  # drawn by rich on the terminal
    plain_text = _on_a_terminal([*args, "--format", "markdown"], NO_COLOR="1")
    assert plain_text.replace(b"\r\n", b"\n").decode() == text  # NO_COLOR: exactly the plain answer
