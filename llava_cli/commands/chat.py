"""`llava chat`: an interactive conversation about images with one loaded model."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from ..options import (DEFAULT_MODEL, Device, Dtype, MaxTokens, Model, PadSquare, Preset, Quantize, Seed, System,
                       Temperature, Template, Threads, TopK, TopP)
from ..ui import err, fail, reported, spinner


def chat(
    ctx: typer.Context,
    images: Annotated[list[str] | None, typer.Argument(metavar="IMAGE", help="Images to start with (paths or URLs).", show_default=False)] = None,
    model: Model = DEFAULT_MODEL,
    max_tokens: MaxTokens = 512,
    temperature: Temperature = 0.0,
    top_p: TopP = 1.0,
    top_k: TopK = 0,
    seed: Seed = None,
    system: System = None,
    template: Template = None,
    dtype: Dtype = "auto",
    device: Device = "auto",
    pad_square: PadSquare = False,
    quantize: Quantize = None,
    threads: Threads = None,
    preset: Preset = None,
    load: Annotated[str | None, typer.Option("--load", help="Start from a conversation saved with /save.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Print timings and cache use after each answer.")] = False,
) -> None:
    """Chat about images, turn after turn; /help lists the commands. Reads questions line by line from a pipe.

    [dim]llava chat photo.jpg[/]    [dim]printf 'What is it?\\nWhat colour?\\n' | llava chat photo.jpg[/]
    """
    with reported():
        from ..chat import ChatSession, Settings
        from ..hub import resolve
        from ..pipeline import Llava
        from ..repl import Repl
        from ..sources import load_image, reference
        from .. import presets

        opts = presets.resolve(ctx, preset, dict(
            model=model, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
            system=system, template=template, dtype=dtype, device=device, pad_square=pad_square))
        model = opts["model"]
        settings = Settings(opts["temperature"], opts["top_p"], opts["top_k"], opts["seed"], opts["max_tokens"])
        settings.sampling()  # bad values fail before the model loads
        if "-" in (images or []):
            fail("standard input carries the questions; give images as paths or URLs", 2)
        loaded = [(source, load_image(source)) for source in images or []]
        folder = resolve(model)
        with spinner(f"loading {model}"):
            llava = Llava.load(folder, dtype=opts["dtype"], device=opts["device"], template=opts["template"],
                               name=model, quantize=quantize, threads=threads)
        session = ChatSession(llava, settings, opts["system"], pad_square=opts["pad_square"])
        interactive = sys.stdin.isatty()
        repl = Repl(session, interactive=interactive, verbose=verbose,
                    retune_threads=threads is None and llava.model.device.type == "cpu")
        for source, image in loaded:
            session.add_image(reference(source), image)
        if load:
            repl.load_file(load)
        if interactive:
            err.print(f"[dim]{model} ({llava.template.name}, {str(llava.dtype).removeprefix('torch.')}): "
                      "ask about your images; /help lists the commands, Ctrl-D leaves[/]")
        try:
            code = repl.run()
        finally:
            repl.input.save_history()
        raise typer.Exit(code)
