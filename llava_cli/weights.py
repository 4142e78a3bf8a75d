"""Weights: safetensors shards -> a model built on the meta device, through one rename table, strictly.

Every key layout the llava-hf checkpoints exist in maps onto the legacy hub names, which are our module names:
  legacy hub        language_model.model.*, language_model.lm_head.*, vision_tower.vision_model.*, multi_modal_projector.*
  transformers 4.52 model.language_model.*, lm_head.*, model.vision_tower.vision_model.*, model.multi_modal_projector.*
  transformers 5    as either of the above, with `vision_model.` dropped from the vision tower
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import mmap
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from . import memory, quant
from .config import LlavaConfig
from .errors import LlavaError
from .files import read_json
from .hub import PICKLES
from .llava import LlavaModel

RENAMES: tuple[tuple[re.Pattern, str], ...] = (
    (re.compile(r"^model\.language_model\."), "language_model.model."),
    (re.compile(r"^lm_head\."), "language_model.lm_head."),
    (re.compile(r"^model\.vision_tower\."), "vision_tower."),
    (re.compile(r"^model\.multi_modal_projector\."), "multi_modal_projector."),
    (re.compile(r"^vision_tower\.(?!vision_model\.)"), "vision_tower.vision_model."),
)
INDEX = "model.safetensors.index.json"


def canonical(key: str) -> str:
    """A checkpoint key in any supported layout -> our module's parameter name."""
    for pattern, repl in RENAMES:
        key = pattern.sub(repl, key)
    return key


def unused(cfg: LlavaConfig, name: str) -> bool:
    """Tensors a checkpoint carries that the model never reads, so they are neither loaded nor an error."""
    if name.startswith("vision_tower.vision_model.post_layernorm.") or name.endswith("rotary_emb.inv_freq"):
        return True  # LLaVA takes hidden states from before the post-layernorm; RoPE is recomputed
    m = re.match(r"vision_tower\.vision_model\.encoder\.layers\.(\d+)\.", name)
    if m and cfg.vision_layers_used <= int(m.group(1)) < cfg.vision.num_hidden_layers:
        return True  # encoder layers past the deepest feature layer
    return cfg.tie_word_embeddings and name == "language_model.lm_head.weight"


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder: the shards its index names, or model.safetensors."""
    index = folder / INDEX
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise LlavaError(f"{index}: malformed index (no weight_map object)")
        for name in weight_map.values():  # shards sit next to the index: a path elsewhere is not read
            if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                raise LlavaError(f"{index}: weight_map names {name!r}, which is not a file name in the folder")
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.exists():
                raise LlavaError(f"{folder}: missing weight shard {f.name} (named in {INDEX})")
        return files
    single = folder / "model.safetensors"
    if single.exists():
        return [single]
    if any(f.suffix in PICKLES for f in folder.iterdir()):
        raise LlavaError(
            f"{folder}: has only pickled PyTorch weights (.bin), which are not loaded for safety; "
            "turn them into safetensors with `llava convert`"
        )
    raise LlavaError(f"{folder}: no weights found (model.safetensors or {INDEX})")


ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
PAGE = mmap.PAGESIZE


def _corrupt(path: Path, why: str) -> LlavaError:
    return LlavaError(f"{path}: corrupt or truncated safetensors file ({why}); download or copy it again")


def read_header(path: Path) -> tuple[dict, dict, int]:
    """(tensor entries, __metadata__, byte offset of the data) of a safetensors file, checked against its size."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            n = int.from_bytes(f.read(8), "little") if size >= 8 else -1
            if not 0 < n <= size - 8:
                raise _corrupt(path, f"header length {n} in a file of {size} bytes")
            try:
                header = json.loads(f.read(n))
            except ValueError as e:
                raise _corrupt(path, f"header is not JSON: {e}") from None
    except OSError as e:
        raise LlavaError(f"{path}: cannot read ({e.strerror or e})") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not an object")
    meta = header.pop("__metadata__", None) or {}
    for key, e in header.items():
        try:
            begin, end = e["data_offsets"]
            numel = math.prod(e["shape"])
            item = ST_DTYPES[e["dtype"]].itemsize
        except (KeyError, TypeError, ValueError):
            raise _corrupt(path, f"bad entry for {key!r}") from None
        if not 0 <= begin <= end <= size - 8 - n or end - begin != numel * item:
            raise _corrupt(path, f"{key!r} lies outside the file or does not match its shape")
    return header, meta, 8 + n


def read_tensors(files: list[Path]) -> Iterator[tuple[str, Path, torch.Tensor]]:
    """(key, file, tensor) for every tensor, one at a time, each a zero-copy view of the memory-mapped file.

    A view the caller keeps (same dtype and device) costs no memory until read, and then only the page cache's.
    When the caller converts a tensor instead, its source pages are dropped from this process as soon as the caller
    asks for the next one (madvise DONTNEED on a private mapping: untouched, they are simply read again if a kept
    view needs them), so loading bfloat16 weights as float32 does not hold both copies at once.
    """
    for path in files:
        header, _, start = read_header(path)
        try:
            with open(path, "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private: views are writable, file is not
        except (OSError, ValueError) as e:
            raise LlavaError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
        if len(mm) < start + max((e["data_offsets"][1] for e in header.values()), default=0):
            raise _corrupt(path, "it shrank since its header was read")  # a view past the end would be a SIGBUS
        for key, e in header.items():
            dtype, shape, (begin, end) = ST_DTYPES[e["dtype"]], e["shape"], e["data_offsets"]
            if begin == end:
                yield key, path, torch.empty(shape, dtype=dtype)
                continue
            view = torch.frombuffer(mm, dtype=dtype, count=math.prod(shape), offset=start + begin).view(shape)
            yield key, path, view
            lo, hi = -(-(start + begin) // PAGE) * PAGE, (start + end) // PAGE * PAGE  # whole pages inside it
            if hasattr(mm, "madvise") and hi > lo:
                mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


NOT_THIS_MODEL = "the weights are incomplete or not those of this config.json"


TRIM_EVERY = 64 * 2**20  # weights quantized between two trim_heap() calls at load


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc's; musl and macOS have none
    except (OSError, AttributeError, TypeError):
        return None


def trim_heap() -> None:
    """Give the C heap's free pages back to the system. Quantizing at load frees a float32 copy of every weight
    between the int8 / int4 tensors it keeps; glibc keeps those holes (0.25-0.4 GB for the 0.5B model) unless told."""
    if trim := _malloc_trim():
        trim(0)


def _mismatch(path: Path, key: str, shape, expected) -> LlavaError:
    return LlavaError(f"{path.name}: tensor {key!r} has shape {tuple(shape)}, the config implies {tuple(expected)}; "
                      f"{NOT_THIS_MODEL}")


def _names(keys: set[str], limit: int = 5) -> str:
    shown = sorted(keys)[:limit]
    return ", ".join(shown) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def entries(cfg: LlavaConfig, headers: list[tuple[dict, dict, int]]) -> list[memory.Entry]:
    """(parameter name, shape, stored dtype) of every tensor in read_header()s that the model will hold."""
    named = ((canonical(key), e) for header, _, _ in headers for key, e in header.items())
    return [(name, e["shape"], ST_DTYPES[e["dtype"]]) for name, e in named if not unused(cfg, name)]


def load_model(folder: Path, cfg: LlavaConfig, dtype: torch.dtype, device: torch.device,
               quantize: str | None = None) -> LlavaModel:
    """Build the model on the meta device and assign every checkpoint tensor, cast to `dtype` on `device`.

    `quantize` (int8, int4, nf4) quantizes the decoder's linear layers as the weights stream in (see quant.py); a
    checkpoint saved quantized by quant.save() loads as it was saved, and asking it for another mode is an error.
    """
    files = weight_files(folder)
    headers = [read_header(f) for f in files]  # every file checked against its size before any is mapped
    saved = quant.spec_of(headers[0][1])
    if saved and quantize and quantize != saved:
        raise LlavaError(f"{folder}: the checkpoint is already quantized as {saved}; it cannot be loaded as {quantize}")
    if quantize:
        quant.check(quantize, device)  # an impossible mode is told as such, not as a memory estimate
    memory.check(cfg, entries(cfg, headers), dtype, device, saved or quantize, can_quantize=not saved)
    has_head = any(canonical(key).startswith("language_model.lm_head.") for header, _, _ in headers for key in header)
    return assemble(cfg, read_tensors(files), dtype, device, folder, quantize=saved or quantize,
                    head_in_files=has_head)


def assemble(cfg: LlavaConfig, tensors: Iterable[tuple[str, Path, torch.Tensor]], dtype: torch.dtype,
             device: torch.device, origin: Path | str, quantize: str | None = None,
             head_in_files: bool = True) -> LlavaModel:
    """The model from (key, file, tensor) triples in any supported key layout, strictly (`llava convert` builds its
    source this way, in memory); quantized as the triples stream in when asked. head_in_files=False (the triples
    hold no output head) lets a tied head be quantized as soon as the embedding arrives, rather than at the end."""
    with torch.device("meta"):
        model = LlavaModel(cfg)
    swapped: dict[str, quant.Quantized] = {}
    if quantize:
        quant.check(quantize, device)
        if device.type == "cpu":
            swapped = quant.prepare(model, quantize, device, dtype)
    head = "language_model.lm_head"
    tied_head = cfg.tie_word_embeddings and head not in swapped
    head_from_embed = cfg.tie_word_embeddings and head in swapped  # a tied head quantized as its own copy
    expected = {name: p.shape for name, p in model.state_dict().items()}
    if tied_head:
        expected.pop(f"{head}.weight")
    state: dict[str, torch.Tensor] = {}
    embed = "language_model.model.embed_tokens.weight"
    encoded = 0  # weights quantized since the heap was last trimmed

    def encode(prefix: str, key: str, path: Path, tensor: torch.Tensor) -> None:
        """A float weight of a quantized layer -> that layer's quantized tensors."""
        nonlocal encoded
        module = swapped[prefix]
        if tuple(tensor.shape) != (module.out_features, module.in_features):
            raise _mismatch(path, key, tensor.shape, (module.out_features, module.in_features))
        if f"{prefix}.qweight" in state:
            raise LlavaError(f"{path.name}: tensor {key!r} appears twice")
        state.update({f"{prefix}.{k}": v for k, v in module.encode(tensor.to(device)).items()})
        encoded += tensor.numel()
        if encoded >= TRIM_EVERY:  # not after every layer: that made the load 1-2 s slower
            trim_heap()
            encoded = 0

    for key, path, tensor in tensors:
        name = canonical(key)
        prefix, _, leaf = name.rpartition(".")
        if leaf == "weight" and prefix in swapped:
            encode(prefix, key, path, tensor)
            continue
        if unused(cfg, name):
            continue
        if name not in expected:
            raise LlavaError(f"{path.name}: unexpected tensor {key!r} for this config (model_type {cfg.model_type}); "
                             f"{NOT_THIS_MODEL}")
        if tensor.shape != expected[name]:
            raise _mismatch(path, key, tensor.shape, expected[name])
        if name in state:
            raise LlavaError(f"{path.name}: tensor {key!r} appears twice")
        # Quantized integer tensors keep their dtype; a same-dtype CPU tensor stays a view of the mapped file.
        state[name] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
        if name == embed and head_from_embed and not head_in_files:
            # A tied head quantized from the embedding table now, while its pages are in anyway: read_tensors drops
            # them from this process when the next tensor is asked for (at the end, they would stay: 0.3 GB here).
            encode(head, key, path, state[name])
    if head_from_embed and f"{head}.qweight" not in state and embed in state:
        encode(head, embed, Path(str(origin)), state[embed])  # a tied head quantized from the embedding table
    missing = expected.keys() - state.keys()
    if missing:
        raise LlavaError(f"{origin}: checkpoint is missing {len(missing)} tensors: {_names(missing)}; {NOT_THIS_MODEL}")
    if tied_head:
        state[f"{head}.weight"] = state["language_model.model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.language_model.tie_weights()
    quant.finish(model)
    if swapped:
        trim_heap()  # int4's finish() frees its int32 copies too
    if quantize and device.type == "cuda":
        quant.bitsandbytes(model, quantize)
    return model.eval().requires_grad_(False)
