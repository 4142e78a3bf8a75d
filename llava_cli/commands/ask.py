"""`llava ask`: one question about zero or more images, the answer streamed to stdout."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Annotated

import typer

from ..options import (DEFAULT_MODEL, Compile, Device, Dtype, MaxTokens, Model, PadSquare, Preset, Quantize, Seed,
                       System, Temperature, Template, Threads, TopK, TopP)
from ..render import Format
from ..ui import err, fail, human_bytes, out, reported, spinner, visible, warn, write


VIP, BOX = "Visual prompts (ViP-LLaVA)", "X1,Y1,X2,Y2[:COLOUR]"


def ask(
    ctx: typer.Context,
    args: Annotated[list[str], typer.Argument(metavar="[IMAGE]... PROMPT", help="Images (paths, URLs, - for stdin), then the question.")],
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
    compile_decode: Compile = False,
    pad_square: PadSquare = False,
    preset: Preset = None,
    frames: Annotated[int | None, typer.Option("--frames", min=1, help="Sample N frames evenly from each animated GIF/WebP or video (ffmpeg).")] = None,
    box: Annotated[list[str] | None, typer.Option("--box", metavar=BOX, rich_help_panel=VIP, help="Draw a box, in pixels or fractions: 10,20,200,240:red.")] = None,
    ellipse: Annotated[list[str] | None, typer.Option("--ellipse", metavar=BOX, rich_help_panel=VIP, help="Draw an ellipse inside this box.")] = None,
    arrow: Annotated[list[str] | None, typer.Option("--arrow", metavar=BOX, rich_help_panel=VIP, help="Draw an arrow from x1,y1 to its tip at x2,y2.")] = None,
    point: Annotated[list[str] | None, typer.Option("--point", metavar="X,Y[:COLOUR]", rich_help_panel=VIP, help="Draw a dot.")] = None,
    save_marked: Annotated[Path | None, typer.Option("--save-marked", metavar="FILE", rich_help_panel=VIP, help="Write the marked image to FILE.")] = None,
    fmt: Annotated[Format, typer.Option("--format", help="text streams plain text; markdown renders it on a terminal; json prints one object.")] = Format.text,
    as_json: Annotated[bool, typer.Option("--json", help="Same as --format json: answer, model, timings, tokens.")] = False,
    show_prompt: Annotated[bool, typer.Option("--show-prompt", help="Print the rendered prompt and its token count; generate nothing.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Print timings and memory on stderr.")] = False,
) -> None:
    """Answer a question about zero or more images, streaming the answer to stdout.

    [dim]llava ask photo.jpg "What is in this picture?"[/]
    """
    with reported():
        from .. import marks, presets
        from ..frames import expand_markers, load_sources
        from ..generate import Sampling
        from ..hub import resolve
        from ..image import ImageProcessorConfig
        from ..pipeline import Llava, Stats
        from ..render import plain, stream_markdown
        from ..templates import Message, user_text

        s = presets.resolve(ctx, preset, dict(
            model=model, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
            system=system, template=template, dtype=dtype, device=device, pad_square=pad_square))
        model, max_tokens, temperature, top_p, top_k, seed, system, template, dtype, device, pad_square = (
            s["model"], s["max_tokens"], s["temperature"], s["top_p"], s["top_k"], s["seed"], s["system"],
            s["template"], s["dtype"], s["device"], s["pad_square"])
        if as_json and fmt is not Format.text and fmt is not Format.json:
            fail(f"--json and --format {fmt.value} disagree; give one of them", 2)
        fmt = Format.json if as_json else fmt
        if s.get("prompt") is not None and _is_source(args[-1]):
            sources, given = list(args), None  # the preset's prompt is the question
        else:
            *sources, given = args
        if given is not None:  # empty -> exit 2, NUL refused, control characters dropped (stated)
            given = user_text(given, "the question", warn)
        if system is not None:
            system = user_text(system, "--system", warn, empty_ok=True)
        question = presets.question(s.get("prompt"), given)
        if question is None:
            fail("the preset's prompt wraps a question ({question}); give one: llava ask IMAGE... QUESTION", 2)
        if not sources and _is_source(question):
            fail(f"{question!r} looks like an image, and the question is missing: llava ask IMAGE... PROMPT", 2)
        if sources.count("-") > 1:
            fail("standard input can hold only one image; give '-' once", 2)
        sampling = Sampling(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        drawn = [marks.parse(shape, spec) for shape, specs in
                 (("box", box), ("ellipse", ellipse), ("arrow", arrow), ("point", point)) for spec in specs or ()]
        images, counts = load_sources(sources, frames)  # bad inputs fail before the model loads
        question = expand_markers(question, counts)  # a marker for a video stands for each of its frames
        if (drawn or save_marked) and len(images) != 1:
            fail(f"visual prompts (--box, --ellipse, --arrow, --point, --save-marked) need exactly one image; "
                 f"{len(images)} were given", 2)
        folder = resolve(model)  # a first run downloads here, with huggingface_hub's progress bars on stderr
        if drawn or save_marked:
            anchor = ImageProcessorConfig.from_file(folder / "preprocessor_config.json").output_size[0]
            images[0] = marks.draw(images[0], drawn, anchor=anchor)  # sized for the checkpoint's vision tower
            if save_marked:
                marks.save(images[0], save_marked)
        llava = Llava.load(folder, template=template, weights=False, name=model)  # weights: once the prompt fits
        messages = ([Message("system", system)] if system is not None else []) + [
            Message("user", question, images=len(images))
        ]
        prompt = llava.prompt(messages)
        if drawn and llava.config.model_type != "vipllava":
            warn("only ViP-LLaVA checkpoints were trained to read boxes, arrows and points drawn on the image")
        if (limit := s.get("context_length")) and limit < llava.config.context_length:
            if prompt.tokens + 1 > limit:
                fail(f"the prompt is {prompt.tokens} tokens; the preset's context length is {limit}")
            max_tokens = min(max_tokens, limit - prompt.tokens)
        llava.check_fits(prompt, max_tokens)  # counts the image tokens; needs only the tokenizer
        if show_prompt:
            write(prompt.text + "\n")
            per = llava.config.image_tokens
            err.print(f"{prompt.tokens} tokens, {prompt.images * per} of them for {prompt.images} image(s) of {per} tokens")
            return
        if len(images) > 1 and not llava.template.multi_image:
            warn(f"{llava.template.name} checkpoints were trained on one image per prompt; answers about several may be poor")
        with spinner(f"loading {model}"):
            llava.load_weights(dtype=dtype, device=device, quantize=quantize, threads=threads, compile=compile_decode)
        stats = Stats(load_s=llava.load_s)
        chunks = llava.stream(prompt, images, sampling=sampling, max_tokens=max_tokens, pad_square=pad_square, stats=stats)
        with spinner("reading the image and the question" if images else "reading the question"):
            first = next(chunks, "")  # the vision tower and the prefill run before the first token
        if fmt is Format.json:
            answer = first + "".join(chunks)
            write(json.dumps(_record(answer, llava, stats, sampling), ensure_ascii=False) + "\n")
        elif fmt is Format.markdown and not plain(out):
            stream_markdown(itertools.chain([first], chunks), out)
        else:
            for chunk in itertools.chain([first], chunks):
                write(chunk)
            write("\n")
        if verbose:
            _print_stats(stats)


def _is_source(arg: str) -> bool:
    """Whether an argument names an image rather than being the question."""
    return os.path.isfile(arg) or arg == "-" or arg.startswith(("http://", "https://"))


def _record(answer: str, llava, stats, sampling) -> dict:
    return {
        "answer": answer,
        "model": llava.name,
        "template": llava.template.name,
        "dtype": str(llava.dtype).removeprefix("torch."),
        "settings": {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
                     "seed": sampling.seed},
        "tokens": {"prompt": stats.prompt_tokens, "image": stats.image_tokens, "generated": stats.generated_tokens},
        "timings": {"load_s": round(stats.load_s, 4), "vision_s": round(stats.vision_s, 4),
                    "first_token_s": round(stats.first_token_s, 4), "decode_s": round(stats.decode_s, 4),
                    "tokens_per_s": round(stats.tokens_per_s, 3)},
        "stop_reason": stats.stop_reason,
        "peak_memory_bytes": stats.peak_memory,
    }


def _print_stats(stats) -> None:
    err.print(
        f"[dim]prompt {stats.prompt_tokens} tokens ({stats.image_tokens} image) | load {stats.load_s:.2f} s | "
        f"vision {stats.vision_s:.2f} s | first token {stats.first_token_s:.2f} s | "
        f"{stats.generated_tokens} tokens at {stats.tokens_per_s:.1f} tok/s | peak memory {human_bytes(stats.peak_memory)}[/]"
    )
    from ..kernels import status  # (imports torch: only after an answer, never for --help)

    err.print(f"[dim]{visible(status())}[/]")
