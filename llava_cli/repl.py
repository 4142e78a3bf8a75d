"""The `llava chat` loop: read a line, run a /command or ask the question, stream the answer.

Interactive on a terminal (readline editing, history kept across sessions, tab completion of commands and paths);
line by line from a pipe, where each line is a turn and stdout carries only the answers.
"""

from __future__ import annotations

import difflib
import os
import shlex
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path

import typer
from rich.markup import escape

from . import chatfile
from .chat import ChatSession
from .devices import ThreadTuner
from .errors import LlavaError
from .lineinput import LineInput
from .sources import is_image_name, is_url, load_image, reference
from .templates import user_text
from .ui import debug, err, human_bytes, internal_error, out, visible, warn, write

COMMANDS = {
    "/help": "this list",
    "/image PATH|URL...": "add images; they go with your next question (or type a path alone on a line)",
    "/images": "the images of the conversation",
    "/system TEXT": "set the system prompt (/system alone clears it)",
    "/set NAME VALUE": "temperature, top_p, top_k, max_tokens or seed (/set alone shows them)",
    "/retry": "answer the last question again",
    "/undo": "drop the last question and its answer",
    "/clear": "start a new conversation with the same model",
    "/save FILE": "save the conversation as JSON",
    "/load FILE": "load a conversation saved with /save",
    "/show prompt|template|settings|stats": "what the model sees, its template, the settings, the last answer's cost",
    "/exit": "leave (or Ctrl-D)",
}
NAMES = [c.split()[0] for c in COMMANDS] + ["/quit", "/bye"]


class Repl:
    def __init__(self, session: ChatSession, interactive: bool, verbose: bool = False, retune_threads: bool = False):
        self.session, self.interactive, self.verbose = session, interactive, verbose
        # Without --threads, each answer uses the cores other programs left idle since the last one.
        self.tuner = ThreadTuner() if retune_threads else None
        self.failed = False  # a piped session exits non-zero when a line failed
        self.warned_multi = False
        self.input = LineInput(interactive, NAMES)

    def run(self) -> int:
        """Serve inputs until /exit or end of input; returns the exit code."""
        while True:
            reading = True
            try:  # the whole turn, reading included: a Ctrl-C anywhere in it comes back here, not out of the chat
                line = self.input.next_line()
                if line is None:
                    break
                reading = False
                if not self._handle(line):
                    break
            except LlavaError as e:
                self.failed = True
                err.print(f"[bold red]error:[/] {visible(str(e))}")
            except (BrokenPipeError, typer.Exit):  # stdout's reader went away; a command that ends the chat
                raise
            except Exception as e:  # a bug in one command must not end the session and lose the conversation
                if debug():
                    raise
                self.failed = True
                err.print(f"[bold red]error:[/] {visible(internal_error(e))}")
            except KeyboardInterrupt:  # an answer being written catches its own, to keep what was said
                if not self.interactive:
                    raise
                out.print()
                err.print("[dim](Ctrl-D or /exit leaves)[/]" if reading else "[yellow]stopped[/] [dim](the conversation is kept)[/]")
        return 1 if self.failed and not self.interactive else 0

    # -- commands ------------------------------------------------------------------------------------------------
    def _handle(self, line: str) -> bool:
        """Run one input; False ends the session."""
        if (path := _as_image_path(line)) is not None:  # before commands: "/home/me/cat.jpg" is a path
            self._add_images([path])
            return True
        if not line.startswith("/"):
            question = user_text(line, "the question", warn)
            self._answer(lambda: self.session.ask(question), question)
            return True
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        s = self.session
        if name in ("/exit", "/quit", "/bye"):
            return False
        handlers: dict[str, Callable[[], None]] = {
            "/help": self._help,
            "/image": lambda: self._add_images(shlex.split(arg) if arg else []),
            "/images": self._list_images,
            "/system": lambda: self._system(arg),
            "/set": lambda: self._set(arg),
            "/retry": lambda: self._answer(s.retry),
            "/undo": self._undo,
            "/clear": self._clear,
            "/save": lambda: self._save(arg),
            "/load": lambda: self.load_file(arg),
            "/show": lambda: self._show(arg),
        }
        if name not in handlers:
            close = difflib.get_close_matches(name, NAMES, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise LlavaError(f"unknown command {name}; {hint}/help lists the commands")
        handlers[name]()
        return True

    def _answer(self, start: Callable[[], Iterator[str]], question: str | None = None) -> None:
        """Stream an answer; a new question that would pass the context first drops the oldest turns, stated."""
        s = self.session
        needed = s.oldest_droppable(question) if question is not None else 0
        ctx = s.llava.config.context_length
        if needed < 0:
            raise LlavaError(f"this question and its images do not fit the model's context of {ctx} tokens")
        if needed:
            s.drop_oldest(needed)
            warn(f"the conversation passed the model's context of {ctx} tokens: dropped the oldest "
                 f"{needed} turn{'s' if needed > 1 else ''} (/clear starts afresh)")
        if self.tuner is not None:
            self.tuner.retune()
        chunks = start()
        try:
            with err.status("thinking", spinner="dots") if self.interactive and err.is_terminal else nullcontext():
                first = next(chunks, "")
            write(first)
            for chunk in chunks:
                write(chunk)
            write("\n")
        except KeyboardInterrupt:
            chunks.close()
            write("\n")
            err.print("[yellow]stopped[/] [dim](the conversation is kept; /retry asks again)[/]")
        if self.verbose:
            self._show("stats")

    def _add_images(self, sources: list[str]) -> None:
        if not sources:
            raise LlavaError("/image takes one or more paths or URLs")
        for source in sources:
            if source == "-":
                raise LlavaError("standard input carries the chat; give images as paths or URLs")
            image = load_image(source)
            self.session.add_image(reference(source), image)
            err.print(f"[dim]image {len(self.session.images)}: {escape(source)} (goes with your next question)[/]")
        if len(self.session.images) > 1 and not self.session.llava.template.multi_image and not self.warned_multi:
            self.warned_multi = True
            warn(f"{self.session.llava.template.name} checkpoints were trained on one image per conversation; "
                 "answers about several may be poor")

    def _list_images(self) -> None:
        s = self.session
        rows = [(n, im, f"turn {i}") for i, t in enumerate(s.turns, 1) for n, im in enumerate(t.images)]
        rows += [(0, im, "pending") for im in s.pending]
        if not rows:
            err.print("[dim]no images yet: /image PATH adds one[/]")
        for k, (_, im, where) in enumerate(rows, 1):
            err.print(f"{k}. {escape(im.source)}  [dim]{where}, sha256 {im.sha256[:12]}[/]")

    def _system(self, text: str) -> None:
        text = user_text(text, "the system prompt", warn, empty_ok=True)
        self.session.system = text or None
        err.print(f"[dim]system prompt {'set' if text else 'cleared'}; it applies from the next answer[/]")

    def _set(self, arg: str) -> None:
        if not arg:
            return self._show("settings")
        name, _, value = arg.partition(" ")
        self.session.settings = self.session.settings.changed(name.replace("-", "_"), value.strip())
        err.print(f"[dim]{name} = {value.strip()}[/]")

    def _undo(self) -> None:
        turn = self.session.undo()
        err.print(f"[dim]dropped: {visible(turn.text[:60])}[/]" if turn else "[dim]nothing to undo[/]")

    def _clear(self) -> None:
        self.session.clear()
        err.print("[dim]new conversation (same model, settings and system prompt)[/]")

    def _save(self, arg: str) -> None:
        if not arg:
            raise LlavaError("/save takes a file name")
        path = Path(os.path.expanduser(arg))
        chatfile.save(self.session, path)
        err.print(f"[dim]saved {len(self.session.turns)} turns to {escape(str(path))}[/]")

    def load_file(self, arg: str) -> None:
        if not arg:
            raise LlavaError("/load takes a file name")
        path = Path(os.path.expanduser(arg))
        for w in chatfile.load(self.session, path, load_image):
            warn(w)
        err.print(f"[dim]loaded {len(self.session.turns)} turns from {escape(str(path))}[/]")

    def _show(self, what: str) -> None:
        s = self.session
        if what == "prompt":
            out.print(s.prompt().text if s.turns else "(empty conversation)", markup=False)
        elif what == "template":
            t = s.llava.template
            out.print(f"{t.name}: {t.user_prefix!r} … {t.generation_prompt!r}; stops {t.stop_tokens + t.stop_strings}",
                      markup=False)
        elif what == "settings":
            out.print(", ".join(f"{k} = {v}" for k, v in vars(s.settings).items()), markup=False)
        elif what == "stats":
            st = s.stats
            err.print(f"[dim]prompt {st.prompt_tokens} tokens ({st.reused_tokens} from the cache) | vision "
                      f"{st.vision_s:.2f} s | first token {st.first_token_s:.2f} s | {st.generated_tokens} tokens at "
                      f"{st.tokens_per_s:.1f} tok/s | {st.stop_reason or 'no answer yet'} | peak memory "
                      f"{human_bytes(st.peak_memory)}[/]")
        else:
            raise LlavaError("/show takes prompt, template, settings or stats")

    def _help(self) -> None:
        for usage, what in COMMANDS.items():
            err.print(f"  [bold]{escape(usage):<40}[/] {what}")
        err.print("  [dim]a line ending in \\ continues; \"\"\" opens and closes a multi-line block[/]")


def _as_image_path(line: str) -> str | None:
    """A line that is only a path to an image file (quoted or backslash-escaped as terminals paste it), or None."""
    try:
        parts = shlex.split(line)
    except ValueError:
        return None
    if len(parts) != 1:
        return None
    candidate = os.path.expanduser(parts[0])
    if is_image_name(candidate) and (os.path.isfile(candidate) or is_url(candidate)):
        return candidate
    return None
