"""Reading chat input: whole questions from a terminal (readline editing, history, Tab completion) or a pipe."""

from __future__ import annotations

import glob
import os
import sys
from pathlib import Path

from .ui import out


def history_file() -> Path:
    """Where typed lines are kept between sessions: $XDG_DATA_HOME/llava/chat_history."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "llava" / "chat_history"


class LineInput:
    """Lines as the user means them: a line ending in a backslash continues, and \"\"\" opens and closes a block."""

    def __init__(self, interactive: bool, commands: list[str]):
        self.interactive, self.commands = interactive, commands
        # Bytes that are not UTF-8 arrive as surrogates instead of stopping the chat; the question is then checked
        # (templates.user_text), which replaces them with U+FFFD and says so.
        if hasattr(sys.stdin, "reconfigure"):
            sys.stdin.reconfigure(errors="surrogateescape")
        if interactive:
            self._readline()

    def next_line(self) -> str | None:
        """The next whole input, stripped; None at the end of input. Ctrl-C while reading raises KeyboardInterrupt."""
        while True:
            try:
                line = self._read(">>> ")
                if line.strip() == '"""':
                    block = []
                    while (more := self._read("... ")).strip() != '"""':
                        block.append(more)
                    line = "\n".join(block)
                while line.endswith("\\"):
                    line = line[:-1] + "\n" + self._read("... ")
            except EOFError:
                if self.interactive:
                    out.print()
                return None
            if line.strip():
                return line.strip()

    def _read(self, prompt: str) -> str:
        if self.interactive:
            return input(prompt)
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n").rstrip("\r")

    def _readline(self) -> None:
        try:
            import readline
        except ImportError:  # Windows without pyreadline: plain input() still works
            return
        path = history_file()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.read_history_file(path)
        except OSError:
            pass
        readline.set_history_length(2000)
        self._save_history = lambda: _quietly(readline.write_history_file, path)
        readline.set_completer_delims(" \t\n")
        readline.set_completer(self._complete)
        readline.parse_and_bind("tab: complete")

    def save_history(self) -> None:
        if hasattr(self, "_save_history"):
            self._save_history()

    def _complete(self, text: str, state: int) -> str | None:
        import readline

        line = readline.get_line_buffer()
        if line.startswith("/") and " " not in line:
            options = [n + " " for n in self.commands if n.startswith(text)]
        elif line.startswith(("/image ", "/save ", "/load ")) or not line.startswith("/"):
            options = [p + ("/" if os.path.isdir(p) else " ") for p in glob.glob(os.path.expanduser(text) + "*")]
        else:
            options = []
        return options[state] if state < len(options) else None


def _quietly(fn, *args) -> None:
    try:
        fn(*args)
    except OSError:
        pass
