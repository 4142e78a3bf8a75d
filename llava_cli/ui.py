"""Terminal output: the answer on stdout, everything else (progress, stats, errors) on stderr."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from .errors import LlavaError

class _Console(Console):
    def print(self, *args, **kwargs) -> None:
        """rich counts open prints and writes its buffer when the count is back to 0. A Ctrl-C landing as a print
        leaves (in `__exit__`, before the count goes down: ~1 in 100 interrupts during prints here) used to leave the
        count up, and every later print was held back for good: the "interrupted" line, or the rest of a chat. Such
        a print now puts the count back and writes what it had rendered before the interrupt goes on."""
        depth = self._buffer_index
        try:
            super().print(*args, **kwargs)
        except BaseException:
            if self._buffer_index > depth:
                self._buffer_index = depth
                self._check_buffer()
            raise


class _Stdout(_Console):
    def on_broken_pipe(self) -> None:
        # rich exits with status 1 here; let reported() give the shell's SIGPIPE status instead
        self.quiet = True
        raise BrokenPipeError


out = _Stdout(soft_wrap=True, highlight=False)
err = _Console(stderr=True, highlight=False, soft_wrap=True)  # one message, one line, at any width
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports a reader that closed the pipe


def debug() -> bool:
    return os.environ.get("LLAVA_DEBUG", "") not in ("", "0")


def visible(text: str) -> str:
    """Text to show in a message: markup escaped, and control characters (an ESC sequence in a prompt or a file
    name, a newline) written as escapes, so the terminal shows them instead of obeying them and a line stays one."""
    return escape(_UNPRINTABLE.sub(lambda m: m[0].encode("unicode_escape").decode(), text))


_UNPRINTABLE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\ud800-\udfff]")  # all but tab; surrogates: bytes not UTF-8


def fail(message: str, code: int = 1) -> NoReturn:
    """One line on stderr, then exit with `code`."""
    err.print(f"[bold red]error:[/] {visible(message)}")
    raise typer.Exit(code)


def warn(message: str) -> None:
    err.print(f"[yellow]warning:[/] {visible(message)}")


@contextmanager
def reported() -> Iterator[None]:
    """Turn every failure inside a command into one line and an exit code; LLAVA_DEBUG=1 shows the traceback."""
    try:
        yield
    except typer.Exit:
        raise
    except LlavaError as e:
        if debug():
            raise
        fail(str(e), e.exit_code)
    except BrokenPipeError:  # the reader went away (`| head`): what it read is all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes at exit
        raise typer.Exit(EXIT_BROKEN_PIPE) from None
    except KeyboardInterrupt:
        err.print("\n[yellow]interrupted[/]")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except Exception as e:  # a bug or an environment fault: still one line, with the way to see more
        if debug():
            raise
        fail(internal_error(e))


def internal_error(e: Exception) -> str:
    """The one line told for an exception llava did not expect: its type, its first line, how to see more."""
    first = str(e).splitlines()[0] if str(e) else ""
    return f"internal error: {type(e).__name__}: {first} (set LLAVA_DEBUG=1 to see the traceback)"


def spinner(message: str):
    """A spinner on stderr while something slow runs, only when stderr is a terminal."""
    return err.status(escape(message), spinner="dots") if err.is_terminal else nullcontext()


def write(text: str) -> None:
    """Part of the answer, to stdout, unstyled, immediately."""
    try:
        out.print(text, end="", markup=False, highlight=False)
        out.file.flush()
    except BrokenPipeError:  # reported() ends quietly
        raise
    except OSError as e:  # stdout on a full disk, say
        raise LlavaError(f"cannot write the answer to standard output: {e.strerror or e}") from None


def human_bytes(n: float) -> str:
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            break
    return f"{n:.1f} {unit}"
