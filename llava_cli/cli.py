"""The `llava` command. Parse, call the core, render; torch is imported only inside commands."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from . import __version__
from .commands import ask, batch, chat, convert, info
from .ui import out

app = typer.Typer(
    name="llava",
    help="Ask LLaVA-family vision-language models about images, locally.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        out.print(f"llava-cli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Ask LLaVA-family vision-language models about images, locally."""


# The commands, one module each.
app.command()(ask.ask)
app.command()(batch.batch)
app.command()(chat.chat)
app.command()(convert.convert)
app.command()(info.info)
app.command()(info.models)
app.command()(info.presets)


def main() -> None:
    """Console-script entry point."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()
