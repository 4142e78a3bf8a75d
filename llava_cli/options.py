"""Typer option types shared by the commands that run a model (Annotated aliases, as huggingface_hub's CLI does)."""

from __future__ import annotations

from typing import Annotated

import typer

from .completions import complete_models, complete_presets

DEFAULT_MODEL = "llava-hf/llava-interleave-qwen-0.5b-hf"

Model = Annotated[str, typer.Option("--model", "-m", envvar="LLAVA_MODEL", autocompletion=complete_models,
                                    help="Hub model id or local checkpoint folder.")]
MaxTokens = Annotated[int, typer.Option("--max-tokens", "-n", min=1, help="Most new tokens to generate.")]
Temperature = Annotated[float, typer.Option("--temperature", "-t", min=0.0, help="0 is greedy (deterministic).")]
TopP = Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling mass (with --temperature).")]
TopK = Annotated[int, typer.Option("--top-k", min=0, help="Sample from the k likeliest tokens; 0 = all.")]
Seed = Annotated[int | None, typer.Option("--seed", help="Seed for reproducible sampling.")]
System = Annotated[str | None, typer.Option("--system", "-s", help="System prompt.")]
Template = Annotated[
    str | None, typer.Option("--template", help="Prompt template: llava-1.5, vip-llava or interleave-qwen.")
]
Dtype = Annotated[str, typer.Option("--dtype", help="auto, float32, bfloat16 or float16.")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")]
Quantize = Annotated[str | None, typer.Option(
    "--quantize", help="Weight-only quantization of the language model: int8 or int4 on the CPU, nf4 or int8 on CUDA.")]
Threads = Annotated[int | None, typer.Option("--threads", min=1, help="CPU threads; default: the cores idle at load.")]
Compile = Annotated[bool, typer.Option(
    "--compile", help="torch.compile the decode step (a minute or more to start). For CUDA; slower on CPUs measured.")]
PadSquare = Annotated[
    bool, typer.Option("--pad-square", help="Pad images to a square with the mean colour first (original LLaVA-1.5).")
]
Preset = Annotated[
    list[str] | None,
    typer.Option("--preset", autocompletion=complete_presets,
                 help="A preset name or YAML file (llava presets lists them); repeat to combine, later ones win."),
]
