"""`llava ask`: one question about zero or more images, the answer streamed to stdout."""

from __future__ import annotations

import itertools
import json
import os
from typing import Annotated

import typer

from ..options import (DEFAULT_MODEL, Device, Dtype, MaxTokens, Model, PadSquare, Seed, System, Temperature, Template,
                       TopK, TopP)
from ..ui import err, fail, human_bytes, out, reported, spinner, warn, write


def ask(
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
    pad_square: PadSquare = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object: answer, model, timings, tokens.")] = False,
    show_prompt: Annotated[bool, typer.Option("--show-prompt", help="Print the rendered prompt and its token count; generate nothing.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Print timings and memory on stderr.")] = False,
) -> None:
    """Answer a question about zero or more images, streaming the answer to stdout.

    [dim]llava ask photo.jpg "What is in this picture?"[/]
    """
    with reported():
        from ..generate import Sampling
        from ..hub import resolve
        from ..sources import load_image
        from ..pipeline import Llava, Stats
        from ..templates import Message

        *sources, question = args
        if not sources and (os.path.isfile(question) or question == "-" or question.startswith(("http://", "https://"))):
            fail(f"{question!r} looks like an image, and the question is missing: llava ask IMAGE... PROMPT", 2)
        if sources.count("-") > 1:
            fail("standard input can hold only one image; give '-' once", 2)
        sampling = Sampling(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        images = [load_image(s) for s in sources]  # bad inputs fail before the model loads
        folder = resolve(model)  # a first run downloads here, with huggingface_hub's progress bars on stderr
        with spinner(f"loading {model}"):
            llava = Llava.load(folder, dtype=dtype, device=device, template=template, weights=not show_prompt, name=model)
        messages = ([Message("system", system)] if system is not None else []) + [
            Message("user", question, images=len(images))
        ]
        prompt = llava.prompt(messages)
        if show_prompt:
            llava.check_fits(prompt, max_tokens)  # generation checks it itself, before any compute
            out.print(prompt.text, markup=False)
            per = llava.config.image_tokens
            err.print(f"{prompt.tokens} tokens, {prompt.images * per} of them for {prompt.images} image(s) of {per} tokens")
            return
        if len(images) > 1 and not llava.template.multi_image:
            warn(f"{llava.template.name} checkpoints were trained on one image per prompt; answers about several may be poor")
        stats = Stats(load_s=llava.load_s)
        chunks = llava.stream(prompt, images, sampling=sampling, max_tokens=max_tokens, pad_square=pad_square, stats=stats)
        with spinner("reading the image and the question" if images else "reading the question"):
            first = next(chunks, "")  # the vision tower and the prefill run before the first token
        if as_json:
            answer = first + "".join(chunks)
            out.print(json.dumps(_record(answer, llava, stats, sampling), ensure_ascii=False), markup=False)
        else:
            for chunk in itertools.chain([first], chunks):
                write(chunk)
            write("\n")
        if verbose:
            _print_stats(stats)


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
