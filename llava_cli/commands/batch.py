"""`llava batch`: prompts over many images with one loaded model, one record per item, resumable."""

from __future__ import annotations

import functools
import time
from contextlib import contextmanager
from enum import Enum
from typing import Annotated

import typer
from rich.markup import escape

from ..options import (DEFAULT_MODEL, Device, Dtype, MaxTokens, Model, PadSquare, Preset, Quantize, Seed, System,
                       Temperature, Template, Threads, TopK, TopP)
from ..ui import err, reported, spinner, visible

EXIT_SOME_FAILED = 3


class Format(str, Enum):
    jsonl = "jsonl"
    csv = "csv"
    txt = "txt"


def batch(
    ctx: typer.Context,
    inputs: Annotated[list[str], typer.Argument(
        metavar="INPUT...", help="Images, folders (searched recursively), globs, - (paths or URLs on stdin), "
                                 "or .jsonl/.csv files of {image, prompt} items.")],
    prompt: Annotated[list[str] | None, typer.Option("--prompt", "-p", help="The question; repeat it to ask several.")] = None,
    prompts_file: Annotated[str | None, typer.Option("--prompts-file", help="Questions, one per line, each asked of every image.")] = None,
    output: Annotated[str | None, typer.Option("--output", "-o", help="Append records to this file; rerunning resumes it.")] = None,
    fmt: Annotated[Format, typer.Option("--format", "-f", help="Record format.")] = Format.jsonl,
    sidecar: Annotated[bool, typer.Option("--sidecar", help="Write each answer next to its image (photo.jpg -> photo.txt).")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Items decoded together.")] = 8,
    shard: Annotated[str | None, typer.Option("--shard", metavar="K/N", help="Work on the K-th of N deterministic shares of the images.")] = None,
    retry_errors: Annotated[bool, typer.Option("--retry-errors", help="Drop the error records from --output and try those items again.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar, per-item errors or summary on stderr.")] = False,
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
    quantize: Quantize = None,
    threads: Threads = None,
    pad_square: PadSquare = False,
    preset: Preset = None,
) -> None:
    """Run prompts over many images with one loaded model, writing one JSON record per item.

    [dim]find photos -name '*.jpg' | llava batch - --prompt "Describe the photo." > captions.jsonl[/]
    """
    with reported():
        from .. import presets
        from ..batch import Job, Summary, run_batch
        from ..errors import UsageError
        from ..batch_inputs import Item, by_image, expand_inputs, parse_shard, read_prompts_file
        from ..batch_inputs import shard as take_shard
        from ..batch_output import NoRecords, RecordWriter
        from ..generate import Sampling
        from ..hub import resolve
        from ..pipeline import Llava
        from ..templates import user_text

        s = presets.resolve(ctx, preset, dict(
            model=model, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
            system=system, template=template, dtype=dtype, device=device, pad_square=pad_square))
        model, max_tokens, system, template, dtype, device, pad_square = (
            s["model"], s["max_tokens"], s["system"], s["template"], s["dtype"], s["device"], s["pad_square"])
        sampling = Sampling(temperature=s["temperature"], top_p=s["top_p"], top_k=s["top_k"], seed=s["seed"])
        prompts = list(prompt or []) + (read_prompts_file(prompts_file) if prompts_file else [])
        wrap = s.get("prompt")  # a preset's prompt: the question itself, or a wrapper around {question}
        if not prompts and wrap and presets.QUESTION not in wrap:
            prompts = [wrap]
        note = (lambda message: None) if quiet else _note
        checked = functools.cache(lambda text: user_text(text, "a prompt", note))  # each distinct prompt once
        items = [Item(i.image, presets.question(wrap, checked(i.prompt))) for i in expand_inputs(inputs, prompts)]
        system = user_text(system, "--system", note, empty_ok=True) if system is not None else None
        groups = by_image(items)
        if shard:
            groups = take_shard(groups, *parse_shard(shard))
        if sidecar and any(len(texts) > 1 for _, texts in groups):
            raise UsageError("--sidecar writes one caption per image, but some images are asked several prompts")
        if sidecar and output is None and fmt is not Format.jsonl:
            raise UsageError("--format needs --output when --sidecar is given: the captions replace the records on stdout")
        with_prompt = len({t for _, texts in groups for t in texts}) > 1
        if sidecar and output is None:
            writer = NoRecords()
        else:
            writer = RecordWriter(output, fmt.value, with_prompt=with_prompt, retry_errors=retry_errors, warn=note)
        summary = Summary(total=sum(len(texts) for _, texts in groups))
        if not groups:  # an empty shard
            writer.close()
            return _summarize(summary, writer.resumable, quiet)
        try:
            folder = resolve(model)
            with spinner(f"loading {model}"):
                llava = Llava.load(folder, dtype=dtype, device=device, template=template, name=model,
                                   quantize=quantize, threads=threads)
            job = Job(model, llava.template.name, str(llava.dtype).removeprefix("torch."), max_tokens, sampling,
                      system, pad_square, quantize)
            summary = Summary(total=summary.total)  # the clock starts with the work
            with _progress(summary.total, enabled=err.is_terminal and not quiet) as tick:
                def on_record(kind: str, record: dict | None) -> None:
                    tick(record)
                    if kind == "failed" and not quiet:
                        _note(f"{record['image']}: {record['error']}")

                run_batch(llava, groups, job, writer, batch_size=batch_size, sidecar=sidecar, summary=summary,
                          on_record=on_record)
        except BaseException as e:  # a failed load or write, a closed pipe, Ctrl-C: the run stops here
            writer.discard()  # a run that wrote nothing leaves no empty output file behind
            if isinstance(e, KeyboardInterrupt):  # what is done, and that the same command resumes
                _summarize(summary, writer.resumable, quiet)
            raise  # any other stop says all in its one error line (or, for a closed pipe, nothing)
        writer.close()
        _summarize(summary, writer.resumable, quiet)
        if writer.old_errors and not quiet:
            _note(f"{output} holds {writer.old_errors} error record(s) from an earlier run; "
                  "--retry-errors tries those items again")
        if summary.failed:
            raise typer.Exit(EXIT_SOME_FAILED)


def _note(message: str) -> None:
    err.print(f"[yellow]warning:[/] {visible(message)}")


@contextmanager
def _progress(total: int, enabled: bool):
    """A progress bar on stderr (items, images/s, ETA); yields tick(record or None) to call once per item."""
    if not enabled:
        yield lambda record: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    images: set[str] = set()
    start = time.perf_counter()
    columns = (TextColumn("batch"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
               TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task("batch", total=total, rate="")

        def tick(record: dict | None) -> None:
            if record is not None:
                images.add(record["image"])
            seconds = time.perf_counter() - start
            progress.update(task, advance=1, rate=f"{len(images) / seconds:.2f} images/s" if images else "")

        yield tick


def _summarize(s, resumable: bool, quiet: bool) -> None:
    """One line on stderr: answered, failed, skipped, not reached, time and rate; with `resumable` (a rerun of the
    same command continues the output), how to finish what is left."""
    left = s.total - s.done - s.failed - s.skipped - s.duplicates
    if quiet:
        return
    rate = s.done / s.elapsed * 60 if s.elapsed else 0.0
    parts = [f"{s.done} answered", f"{s.failed} failed" if s.failed else "",
             f"{s.skipped} already done" if s.skipped else "",
             f"{s.duplicates} duplicate(s) of another item" if s.duplicates else "", f"{left} not reached" if left else ""]
    line = ", ".join(p for p in parts if p) + f" of {s.total} items in {s.elapsed:.1f} s"
    line += f" ({rate:.1f} answers/min)" if s.done else ""
    if left and resumable:
        line += "; run the same command again to resume"
    err.print(("[bold red]" if s.failed or left else "[green]") + escape(line) + "[/]")
