"""`llava convert SRC DST`: an original or hub-layout checkpoint -> a verified hub-layout folder that `llava ask` loads."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from ..interrupts import caught
from ..ui import err, fail, human_bytes, out, reported, spinner, warn


def convert(
    source: Annotated[str, typer.Argument(metavar="SRC", help="Checkpoint folder or hub id (original LLaVA, ViP-LLaVA, LLaVA-NeXT-Interleave, or hub layout).")],
    dest: Annotated[Path, typer.Argument(metavar="DST", help="Folder to write; it must not exist unless --force.")],
    vision_tower: Annotated[str | None, typer.Option("--vision-tower", metavar="ID|DIR", help="CLIP/SigLIP model for checkpoints without their tower (liuhaotian's), or the config of the tower they carry.")] = None,
    tokenizer: Annotated[str | None, typer.Option("--tokenizer", metavar="DIR|ID", help="Take the tokenizer from here instead of SRC.")] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="float16, bfloat16, float32, or auto (the source's).")] = "auto",
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="Largest safetensors shard: 5GB, 500MB, 2GiB ...")] = "5GB",
    quantize: Annotated[str | None, typer.Option("--quantize", metavar="int8|int4", help="Write the language model's linear layers quantized, as `llava ask --quantize` makes them; DST loads without the flag.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the key mapping and the files that would be written; write nothing.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing DST checkpoint.")] = False,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Skip re-reading the tensors and comparing logits with the source.")] = False,
) -> None:
    """Convert a checkpoint into the hub layout, verified against the source.

    [dim]llava convert liuhaotian/llava-v1.5-7b llava-1.5-7b --vision-tower openai/clip-vit-large-patch14-336[/]
    """
    with reported():
        from ..convert import parse_size, plan
        from ..convert_quant import check
        from ..convert_write import check_destination, shard, write

        max_bytes = parse_size(max_shard_size)
        check(quantize)
        if not dry_run:  # before a download or a long read
            check_destination(dest, Path(source) if Path(source).is_dir() else None, force)
        with spinner(f"reading {source}"):
            p = plan(source, vision_tower=vision_tower, tokenizer=tokenizer, dtype=dtype, quantize=quantize)
        if dry_run:
            _print_plan(p, dest, shard(p, max_bytes))
            try:
                check_destination(dest, p.folder, force)
            except Exception as e:  # the plan is still worth seeing
                warn(f"the conversion would stop here: {e}")
            return
        with caught(), spinner(f"converting {source}"):  # Ctrl-C or `kill`: the temporary folder is removed
            result = write(p, dest, max_bytes=max_bytes, force=force, check=not no_verify,
                           progress=lambda m: err.print(f"[dim]{escape(m)}[/]"))
        _print_report(p, result)
        if not result.ok:
            fail(f"verification failed; DST was not written, the unverified result is in {result.location}")


def _grouped(keys: list[tuple[str, str]]) -> list[str]:
    """'model.layers.*.self_attn.rotary_emb.inv_freq (x32): why' lines; a prefix with many patterns is one line."""
    patterns = Counter((re.sub(r"\.\d+\.", ".*.", key), why) for key, why in keys)
    heads = Counter((pattern.split(".")[0], why) for pattern, why in patterns)
    merged: Counter = Counter()
    for (pattern, why), n in patterns.items():
        head = pattern.split(".")[0]
        merged[(head + ".*" if heads[(head, why)] > 3 else pattern, why)] += n
    return [f"{pattern}{f' (x{n})' if n > 1 else ''}: {why}" for (pattern, why), n in merged.items()]


def _header(p) -> list[str]:
    padded = sum(e.rows is not None for e in p.entries)
    lines = [f"source: {p.source} ({p.kind}), output dtype {str(p.dtype).removeprefix('torch.')}",
             f"tensors: {len(p.layout)} written, {len(p.renamed)} renamed, {padded} with a padded vocabulary, "
             f"{len(p.dropped)} dropped, 0 missing, 0 unexpected"]
    lines += [f"  dropped {line}" for line in _grouped(p.dropped)]
    if p.quantization:
        lines.append(f"  {p.quantization.describe()}")
    return lines + [f"  {note}" for note in p.notes]


def _quantized(outputs: dict) -> str:
    """'a.b.qweight [64, 64] int8, .scales [64] float32'."""
    parts, last = [], None
    for name, (shape, dtype) in outputs.items():
        prefix, _, leaf = name.rpartition(".")
        parts.append(f"{'' if prefix == last else prefix}.{leaf} {list(shape)} {str(dtype).removeprefix('torch.')}")
        last = prefix
    return ", ".join(parts)


def _print_plan(p, dest: Path, groups) -> None:
    lines = _header(p) + ["mapping (source key -> written key, shape), by source file:"]
    current = None
    for e in p.entries:
        if (where := e.source.where[e.key]) != current:
            current = where
            lines.append(f"  {where}")
        outputs = p.outputs(e)
        if list(outputs) == [e.name]:
            lines.append(f"    {e.key} -> {e.name} {list(e.shape)}")
        else:  # quantized: the tensors written for it, a layer's prefix named once
            lines.append(f"    {e.key} -> {_quantized(outputs)}")
    lines.append(f"would write {dest}:")
    lines += [f"  {name} ({human_bytes(len(text.encode()))})" for name, text in p.files.items()]
    lines += [f"  {name} (copied from {path})" for name, path in p.copies.items()]
    for i, group in enumerate(groups, start=1):
        name = "model.safetensors" if len(groups) == 1 else f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        count = sum(len(p.outputs(e)) for e in group)
        lines.append(f"  {name} ({count} tensors, {human_bytes(sum(p.nbytes(e) for e in group))})")
    out.print("\n".join(lines), markup=False)


def _print_report(p, result) -> None:
    lines = [f"wrote {result.location}: {len(result.files)} files, {result.shards} weight shard(s), "
             f"{human_bytes(sum(result.files.values()))}"] + _header(p)
    v = result.verification
    if v is None:
        lines.append("verification: skipped (--no-verify)")
    else:
        lines.append(f"verification: {v.identical}/{v.expected} tensors identical to the source"
                     + (f" (quantized as {p.quantize})" if p.quantize else "")
                     + (f"; differ: {', '.join(v.mismatched[:5])}" if v.mismatched else ""))
        if v.skipped:
            lines.append(f"  logits probe skipped: {v.skipped}")
        elif v.max_diff is not None:
            against = f" against the source quantized as {p.quantize} at load" if p.quantize else ""
            lines.append(f"  logits on a probe prompt and image{against}: max |difference| {v.max_diff:.3g} over "
                         f"{v.positions} positions x {v.vocab} ({v.compute}; tolerance {v.tolerance:g}): "
                         + ("ok" if v.max_diff <= v.tolerance else "FAILED"))
        lines.append("sha256:")
        lines += [f"{digest}  {name}" for name, digest in v.sha256.items()]
    out.print("\n".join(lines), markup=False)
