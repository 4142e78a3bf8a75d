"""`llava info`, `llava models`, `llava presets`: what a checkpoint is, what the hub cache holds, what presets exist."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ..completions import complete_models, complete_presets
from ..inventory import cached_models, folder_size, parameters, quantization, stored_dtype, weights_present
from ..options import DEFAULT_MODEL
from ..ui import err, human_bytes, out, reported

AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
METADATA = ["*.json", "*.jinja"]  # what `llava info` needs of a hub repo: no weights


def info(
    model: Annotated[str, typer.Argument(envvar="LLAVA_MODEL", autocompletion=complete_models,
                                         help="Hub model id or local checkpoint folder.")] = DEFAULT_MODEL,
    as_json: AsJson = False,
) -> None:
    """Describe a checkpoint: family, template, vision tower, image tokens, context, dtype, parameters, size.

    A hub id not yet in the cache fetches only its small JSON files, never the weights.
    """
    with reported():
        from ..config import LlavaConfig
        from ..devices import resolve_device, resolve_dtype
        from ..pipeline import resolve_template
        from ..templates import template_for

        folder = _metadata_folder(model)
        cfg = LlavaConfig.from_file(folder / "config.json")
        params, exact = parameters(folder)
        v = cfg.vision
        record = {
            "model": model,
            "folder": str(folder),
            "family": template_for(cfg.model_type, cfg.text.model_type, v.model_type).name,
            "architecture": f"{cfg.model_type} + {cfg.text.model_type}",
            "template": resolve_template(folder, cfg, None).name,
            "vision_tower": {"type": v.model_type, "image_size": v.image_size, "patch_size": v.patch_size,
                             "layers": v.num_hidden_layers, "hidden_size": v.hidden_size,
                             "feature_layers": list(cfg.feature_layers)},
            "image_tokens": cfg.image_tokens,
            "context_length": cfg.context_length,
            "text_model": {"layers": cfg.text.num_hidden_layers, "hidden_size": cfg.text.hidden_size,
                           "heads": cfg.text.num_attention_heads, "kv_heads": cfg.text.num_key_value_heads,
                           "vocab_size": cfg.text.vocab_size},
            "dtype": stored_dtype(folder),
            "quantized": quantization(folder) if weights_present(folder) else None,
            "dtype_auto": str(resolve_dtype("auto", resolve_device("auto"))).removeprefix("torch."),
            "parameters": params,
            "parameters_exact": exact,
            "size_on_disk": folder_size(folder),
            "weights_present": weights_present(folder),
        }
        if as_json:
            out.print(json.dumps(record, ensure_ascii=False), markup=False)
            return
        vt = record["vision_tower"]
        count = "unknown" if params is None else f"{'' if exact else '~'}{_short(params)} ({params:,})"
        rows = [
            ("model", model), ("folder", str(folder)),
            ("family", f"{record['family']} ({record['architecture']})"), ("template", record["template"]),
            ("vision tower", f"{vt['type']}, {vt['image_size']} px, patch {vt['patch_size']}, {vt['layers']} layers, "
                             f"features from layer(s) {', '.join(map(str, vt['feature_layers']))}"),
            ("image tokens", f"{cfg.image_tokens} per image"), ("context length", f"{cfg.context_length} tokens"),
            ("dtype", f"{record['dtype'] or 'not stated'} (stored); --dtype auto runs {record['dtype_auto']} here"),
            ("parameters", count),
            *([("quantized", f"{record['quantized']}, weight-only (llava convert --quantize; llava reads it, "
                                         "transformers does not)")] if record["quantized"] else []),
            ("size on disk", human_bytes(record["size_on_disk"])
             + ("" if record["weights_present"] else " (weights not downloaded)")),
        ]
        width = max(len(k) for k, _ in rows)
        for key, value in rows:
            out.print(f"{key:<{width}}  {value}", markup=False)


def models(
    everything: Annotated[bool, typer.Option("--all", help="List every model repo in the cache, not only LLaVA-family ones.")] = False,
    as_json: AsJson = False,
) -> None:
    """List the checkpoints in the local Hugging Face cache (HF_HUB_CACHE) with their size on disk."""
    with reported():
        found = [m for m in cached_models() if everything or m.family]
        if as_json:
            out.print(json.dumps([m.record() for m in found], ensure_ascii=False), markup=False)
            return
        if not found:
            err.print(f"no {'' if everything else 'LLaVA-family '}checkpoints in the hub cache ({_cache_dir()})")
            return
        width = max(len(m.repo_id) for m in found)
        for m in found:
            state = "" if m.complete else "  (incomplete: run llava info or ask to finish it)"
            out.print(f"{m.repo_id:<{width}}  {human_bytes(m.size):>10}  {m.family or '-':<16}{state}".rstrip(), markup=False)


def presets(
    name: Annotated[str | None, typer.Argument(autocompletion=complete_presets, help="Show this preset's settings.")] = None,
    as_json: AsJson = False,
) -> None:
    """List the presets (built-in, and yours in ~/.config/llava/presets), or show one."""
    with reported():
        from .. import presets as registry

        chosen = [registry.load(name)] if name else list(registry.available().values())
        if as_json:
            records = [{"name": p.name, "kind": p.kind, "builtin": p.builtin, "path": str(p.path), "settings": p.values}
                       for p in chosen]
            out.print(json.dumps(records[0] if name else records, ensure_ascii=False), markup=False)
            return
        if name:
            p = chosen[0]
            out.print(f"# {p.name} ({'built-in' if p.builtin else 'user'}: {p.path})", markup=False)
            out.print(registry.dump(p), end="", markup=False)
            return
        width = max((len(p.name) for p in chosen), default=0)
        for p in chosen:
            origin = "built-in" if p.builtin else f"user: {p.path}"
            out.print(f"{p.name:<{width}}  {p.kind:<5}  {p.description}  [{origin}]", markup=False)
        err.print(f"[dim]your presets go in {registry.user_dir()}; `llava presets NAME` shows one[/]")


def _short(n: int) -> str:
    """7063427072 -> '7.06 B', 154304 -> '154.3 K'."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}" if unit == "B" else f"{n / size:.1f} {unit}"
    return str(n)


def _cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _metadata_folder(model: str) -> Path:
    """A local folder as is; a hub id's cached snapshot, else its JSON files fetched (never its weights)."""
    from ..hub import resolve

    return resolve(model, patterns=METADATA, complete=lambda f: (f / "config.json").is_file(),
                   hint="pass a local checkpoint folder")
