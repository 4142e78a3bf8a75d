"""`llava convert`: a checkpoint in any supported layout -> a verified hub-layout folder that `llava ask` loads.

plan() reads the source's config, tokenizer and tensor index (no tensor data) and decides every output file and
tensor; write() streams the tensors into safetensors shards in a temporary folder next to DST, verifies it, and only
then renames it into place, so an interrupted or failed conversion never leaves a half-written DST. With --quantize,
the language model's linear layers are written as quant.py's loader makes them (convert_quant.py).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from .config import LlavaConfig
from .convert_files import CHAT_TEMPLATES, generation_config, preprocessor_config, processor_config
from .convert_keys import (KNOWN_TOWERS, Entry, check_entries, is_original, map_keys, original_config, original_name,
                           padded_vocab, tower_layers, tower_name)
from .convert_quant import Quantization, check, refuse_quantized
from .convert_source import BIN_INDEX, Weights, checkpoint_files, fetch
from .convert_tokenizer import IMAGE, PAD, ConvertedTokenizer, load_tokenizer
from .devices import DTYPES
from .errors import LlavaError
from .files import read_json
from .templates import template_for
from .weights import INDEX, canonical

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
          "TIB": 2**40}
_COPIED = re.compile(r"^(.*\.json|.*\.jinja|tokenizer\.model|merges\.txt)$")


@dataclass
class Plan:
    """Everything a conversion will write, decided before any tensor is read."""

    source: str
    kind: str  # "hub layout" | "original llava-1.5" | ...
    folder: Path
    config: dict[str, Any]
    cfg: LlavaConfig
    dtype: torch.dtype
    entries: list[Entry]
    dropped: list[tuple[str, str]]
    files: dict[str, str]  # small files written as text
    copies: dict[str, Path] = field(default_factory=dict)  # files copied as they are
    notes: list[str] = field(default_factory=list)
    quantize: str | None = None  # int8 | int4: the language model's linear layers are written quantized

    @property
    def renamed(self) -> list[Entry]:
        return [e for e in self.entries if e.name != e.key]

    @cached_property
    def quantization(self) -> Quantization | None:
        return Quantization(self.cfg, self.quantize, self.dtype, {e.name for e in self.entries}) \
            if self.quantize else None

    def _targets(self, e: Entry) -> tuple[bool, list[str]]:
        return self.quantization.targets(e.name) if self.quantization else (True, [])

    def outputs(self, e: Entry) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of every tensor written for `e`: floats in the output dtype, others as stored."""
        raw, layers = self._targets(e)
        stored = e.source.meta[e.key][1]
        out = {e.name: (e.shape, self.dtype if stored.is_floating_point else stored)} if raw else {}
        for prefix in layers:
            out |= self.quantization.shapes(prefix)
        return out

    @cached_property
    def layout(self) -> dict[str, Entry]:
        """Every tensor the output holds -> the source entry it is made from."""
        return {name: e for e in self.entries for name in self.outputs(e)}

    def nbytes(self, e: Entry) -> int:
        """Bytes written for `e`."""
        return sum(math.prod(shape) * dt.itemsize for shape, dt in self.outputs(e).values())

    @property
    def total_bytes(self) -> int:
        return sum(self.nbytes(e) for e in self.entries)

    def written(self, e: Entry) -> dict[str, torch.Tensor]:
        """The tensors written for `e`: its own, and/or those of the quantized layer(s) it is encoded into."""
        raw, layers = self._targets(e)
        t = self.tensor(e)
        out = {e.name: t} if raw else {}
        for prefix in layers:
            out |= self.quantization.encode(prefix, t)
        return out

    def tensor(self, e: Entry) -> torch.Tensor:
        """The output tensor of `e`: new vocabulary rows are the mean of the old ones (the converters sampled around
        that mean; the mean makes the conversion reproducible), floats cast to the output dtype, always a copy."""
        t = e.source.get(e.key)
        t = t.to(self.dtype, copy=True) if t.is_floating_point() else t.clone()  # never a view of the source file
        if e.rows is not None:
            mean = t.float().mean(0, keepdim=True).to(t.dtype)
            t = torch.cat([t, mean.expand(e.rows - t.shape[0], *t.shape[1:])])
        return t.contiguous()


def parse_size(text: str) -> int:
    """'5GB' (decimal, as transformers), '2GiB', '500MB', '1000000' -> bytes."""
    m = _SIZE.match(text)
    if not m or float(m.group(1)) <= 0:
        raise LlavaError(f"invalid size {text!r}; use e.g. 5GB, 500MB or 2GiB")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()])


def _json(obj: Any) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def plan(source: str, *, vision_tower: str | None = None, tokenizer: str | None = None, dtype: str = "auto",
         quantize: str | None = None) -> Plan:
    """Read a source checkpoint (folder or hub id) and decide the whole conversion; reads no tensor data."""
    check(quantize)
    folder = fetch(source, "source")
    raw = read_json(folder / "config.json")
    files = checkpoint_files(folder)
    refuse_quantized(source, files)
    weights = Weights(files)
    tok_folder = fetch(tokenizer, "tokenizer", ["*.json", "tokenizer.model", "merges.txt"], pickles=False) \
        if tokenizer else folder
    out_dtype = _dtype(dtype, raw, weights)
    if is_original(raw):
        p = _plan_original(source, folder, raw, weights, tok_folder, vision_tower, out_dtype)
    else:
        if vision_tower:
            raise LlavaError("--vision-tower is for original checkpoints; this one is in the hub layout already")
        p = _plan_hub(source, folder, raw, weights, tok_folder, out_dtype)
    check_entries(p.cfg, p.entries)
    p.quantize = quantize  # before anything asks for p.quantization (a cached property)
    return p


def _dtype(name: str, raw: dict[str, Any], weights: Weights) -> torch.dtype:
    """--dtype, else the dtype the source's config declares, else that of its first floating-point tensor."""
    if name != "auto":
        if name not in DTYPES:
            raise LlavaError(f"unknown dtype {name!r} (use auto, float16, bfloat16 or float32)")
        return DTYPES[name]
    declared = raw.get("torch_dtype") or raw.get("dtype") or (raw.get("text_config") or {}).get("torch_dtype")
    if declared in DTYPES:
        return DTYPES[declared]
    return next((dt for _, dt in weights.meta.values() if dt.is_floating_point), torch.float32)


def _tokenizer_files(tok: ConvertedTokenizer, tok_folder: Path, p: Plan) -> None:
    p.files |= tok.files()
    if (tok_folder / "tokenizer.model").is_file():
        p.copies["tokenizer.model"] = tok_folder / "tokenizer.model"
    if tok.image_id is None:
        raise LlavaError(f"the tokenizer has no {IMAGE} token")
    if p.cfg.image_token_id != tok.image_id:
        raise LlavaError(f"the tokenizer's {IMAGE} is id {tok.image_id}, "
                         f"the config's image token is {p.cfg.image_token_id}")
    if len(tok) > p.cfg.text.vocab_size:
        raise LlavaError(f"the tokenizer has {len(tok)} tokens, more than the model's {p.cfg.text.vocab_size} rows")


def _plan_hub(source, folder, raw, weights, tok_folder, dtype) -> Plan:
    m = map_keys(weights, canonical)
    config = raw | {"torch_dtype": str(dtype).removeprefix("torch.")}
    if "dtype" in config:
        config["dtype"] = config["torch_dtype"]
    cfg = LlavaConfig.from_dict(config)
    p = Plan(source, "hub layout", folder, config, cfg, dtype, m.entries, m.dropped, {"config.json": _json(config)})
    skip = {"config.json", INDEX, BIN_INDEX}
    if tok_folder != folder:  # --tokenizer: none of the source's tokenizer files
        skip |= {"tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json"}
    p.copies = {f.name: f for f in sorted(folder.iterdir())
                if f.is_file() and _COPIED.match(f.name) and f.name not in skip}
    tok = load_tokenizer(tok_folder, add_llava_tokens=False)
    _tokenizer_files(tok, tok_folder, p)
    for name in p.files:
        p.copies.pop(name, None)
    return p


def _plan_original(source, folder, raw, weights, tok_folder, vision_tower, dtype) -> Plan:
    if "model.embed_tokens.weight" not in weights.meta:
        raise LlavaError(f"{folder}: no model.embed_tokens.weight; not an original LLaVA checkpoint")
    rows = weights.meta["model.embed_tokens.weight"][0][0]
    vocab = padded_vocab(rows)
    m = map_keys(weights, original_name, rows=vocab)
    if m.unknown:
        raise LlavaError(f"{folder}: {len(m.unknown)} tensors no rule places, e.g. {m.unknown[0]!r}")
    names = {e.name for e in m.entries}
    vip = "multi_modal_projector.projector_layernorm.weight" in names
    has_tower = any(n.startswith("vision_tower.") for n in names)
    vision, tower_origin = _tower(raw, vision_tower, has_tower, m)
    tok = load_tokenizer(tok_folder, add_llava_tokens=True)
    tied = "language_model.lm_head.weight" not in names
    config = original_config(raw, vision, vip=vip, stored_layers=tower_layers(m.entries), vocab=vocab,
                             image_id=tok.image_id, pad_id=tok.added.get(PAD), tied=tied,
                             dtype=str(dtype).removeprefix("torch."))
    cfg = LlavaConfig.from_dict(config)
    template = template_for(cfg.model_type, cfg.text.model_type, cfg.vision.model_type)
    kind = f"original {template.name} checkpoint, {(raw.get('architectures') or [raw.get('model_type')])[0]}"
    p = Plan(source, kind, folder, config, cfg, dtype, m.entries, m.dropped, {"config.json": _json(config)})
    generation = read_json(folder / "generation_config.json", required=False)
    p.files |= {
        "generation_config.json": _json(generation_config(generation.get("bos_token_id", raw.get("bos_token_id")),
                                                          generation.get("eos_token_id", raw.get("eos_token_id")),
                                                          tok.added.get(PAD))),
        "preprocessor_config.json": _json(preprocessor_config(cfg)),
        "processor_config.json": _json(processor_config(cfg)),
        "chat_template.json": _json({"chat_template": CHAT_TEMPLATES[template.name]}),
        "added_tokens.json": _json({t.content: i for i, t in sorted(tok.raw.get_added_tokens_decoder().items())
                                    if i >= tok.raw.get_vocab_size(with_added_tokens=False)}),
    }
    _tokenizer_files(tok, tok_folder, p)
    added = ", ".join(f"{t}={i}" for t, i in tok.added.items())
    p.notes += [f"vision tower: {tower_origin}", f"tokenizer: {tok.origin}" + (f"; added {added}" if added else ""),
                f"vocabulary: {rows} rows -> {vocab} (new rows are the mean of the old ones)"]
    if raw.get("image_aspect_ratio") == "pad":
        p.notes.append("the original padded images to a square before resizing: `llava ask --pad-square` does too")
    return p


def _tower(raw: dict[str, Any], option: str | None, has_tower: bool, m) -> tuple[dict[str, Any], str]:
    """The vision tower's config, and its tensors added to `m` when the checkpoint does not carry them."""
    name = option or raw.get("mm_vision_tower")
    if not option and has_tower and name in KNOWN_TOWERS:
        return dict(KNOWN_TOWERS[name]), f"in the checkpoint ({name})"
    if not name:
        raise LlavaError("the config names no vision tower (mm_vision_tower); pass --vision-tower ID|DIR")
    hint = "" if option else " (named by mm_vision_tower; pass --vision-tower ID|DIR)"
    try:
        folder = fetch(name, "vision tower", ["*.json"] if has_tower else ["*.json", "*.safetensors"],
                       pickles=not has_tower)
    except LlavaError as e:
        raise LlavaError(f"{e}{hint}") from None
    d = read_json(folder / "config.json")
    if d.get("model_type") in ("clip", "siglip"):  # a full CLIP / SigLIP model: its vision half
        d = {"model_type": d["model_type"] + "_vision_model"} | (d.get("vision_config") or {})
    if d.get("model_type") not in ("clip_vision_model", "siglip_vision_model"):
        raise LlavaError(f"vision tower {name!r}: model_type {d.get('model_type')!r} is not a CLIP or SigLIP "
                         f"model{hint}")
    if has_tower:
        return d, f"in the checkpoint, config from {name}"
    tower = map_keys(Weights(checkpoint_files(folder)), tower_name, tower=True)
    m.entries += tower.entries
    m.dropped += tower.dropped
    return d, f"{len(tower.entries)} tensors from {name}"
