"""Reading what `llava convert` converts: a folder or hub id, and its tensors from safetensors or pickled .bin files.

Pickles run code when unpickled, so .bin files are read only with torch.load(weights_only=True), which unpickles
tensors and plain containers and refuses anything else; a file that holds more than a flat dict of tensors is
refused as well. Every other pickle-based format (.pt, .pth, .ckpt, .pkl) is refused without being opened.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import LlavaError
from .files import read_json
from .hub import resolve
from .weights import INDEX, weight_files

BIN_INDEX = "pytorch_model.bin.index.json"
REFUSED = (".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".bin", ".h5", ".msgpack", ".gguf")
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}
PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "merges.txt"]


def fetch(name: str, what: str, patterns: list[str] = PATTERNS, pickles: bool = True) -> Path:
    """A local folder as is, else a hub repo downloaded (or found) in the huggingface_hub cache.

    Pickled .bin weights are downloaded only when the repo has no safetensors weights.
    """
    folder = _download(name, what, patterns)
    if pickles and not list(folder.glob("*.safetensors")):
        folder = _download(name, what, patterns + ["pytorch_model*.bin", "pytorch_model.bin.index.json"])
    return folder


def _download(name: str, what: str, patterns: list[str]) -> Path:
    return resolve(name, what=what, patterns=patterns, hint="give a folder",
                   complete=lambda f: (f / "config.json").is_file() and any(f.glob("*.safetensors"))
                   or any(f.glob("pytorch_model*.bin")))


def checkpoint_files(folder: Path) -> list[Path]:
    """The weight files of a folder: safetensors (preferred, with or without an index) or pytorch_model*.bin."""
    if (folder / INDEX).exists() or (folder / "model.safetensors").exists():
        return weight_files(folder)
    if (folder / BIN_INDEX).exists():
        weight_map = read_json(folder / BIN_INDEX).get("weight_map")
        if not isinstance(weight_map, dict):
            raise LlavaError(f"{folder / BIN_INDEX}: malformed index (no weight_map object)")
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        if missing := [f.name for f in files if not f.exists()]:
            raise LlavaError(f"{folder}: missing weight shard {missing[0]} (named in {BIN_INDEX})")
        return files
    if (folder / "pytorch_model.bin").exists():
        return [folder / "pytorch_model.bin"]
    shards = sorted(folder.glob("*.safetensors"))
    if shards:
        return shards
    if others := sorted(p.name for p in folder.iterdir() if p.suffix in REFUSED):
        raise LlavaError(f"{folder}: unsupported weight files ({', '.join(others[:3])}); llava convert reads "
                         "safetensors and pytorch_model*.bin (with weights_only) only")
    raise LlavaError(f"{folder}: no weights found (safetensors or pytorch_model*.bin)")


class Weights:
    """The tensors of a checkpoint's files by key, read one at a time when asked for."""

    def __init__(self, files: list[Path]):
        self.where: dict[str, Path] = {}
        self.meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._pickled: dict[Path, dict[str, torch.Tensor]] = {}
        for path in files:
            if path.suffix == ".safetensors":
                self._index_safetensors(path)
            else:
                state = load_pickle(path)
                self._pickled[path] = state
                for key, t in state.items():
                    self._add(key, path, tuple(t.shape), t.dtype)

    def _add(self, key: str, path: Path, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        if key in self.where:
            raise LlavaError(f"{path.name}: tensor {key!r} appears twice (also in {self.where[key].name})")
        self.where[key], self.meta[key] = path, (shape, dtype)

    def _index_safetensors(self, path: Path) -> None:
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    info = f.get_slice(key)
                    dtype = _SAFETENSORS_DTYPES.get(info.get_dtype(), torch.uint8)
                    self._add(key, path, tuple(info.get_shape()), dtype)
        except SafetensorError as e:
            raise LlavaError(f"{path}: corrupt or truncated safetensors file ({e})") from None
        except OSError as e:
            raise LlavaError(f"{path}: cannot read ({e.strerror or e})") from None

    def keys(self) -> list[str]:
        return list(self.where)

    def get(self, key: str) -> torch.Tensor:
        path = self.where[key]
        if path in self._pickled:
            return self._pickled[path][key]
        try:
            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise LlavaError(f"{path}: cannot read tensor {key!r} ({e})") from None


def load_pickle(path: Path) -> dict[str, torch.Tensor]:
    """A pickled state dict, unpickled with weights_only (tensors and plain containers only), memory-mapped."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # pickles from before torch 1.6 are not zip files and cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = next((line for line in str(e).splitlines() if "unsupported" in line.lower()), "")
        raise LlavaError(f"{path.name}: refused: the pickle holds more than tensors, which is not unpickled for safety"
                         f"{' (' + detail.strip() + ')' if detail else ''}") from None
    except (EOFError, zipfile.BadZipFile, RuntimeError, ValueError) as e:
        detail = str(e).splitlines()[0] if str(e) else repr(e)
        raise LlavaError(f"{path.name}: corrupt or truncated pickle ({detail})") from None
    except OSError as e:
        raise LlavaError(f"{path.name}: cannot read ({e.strerror or e})") from None
    expected = "expected a flat dict of tensors (a state dict), found"
    if not isinstance(state, dict):
        raise LlavaError(f"{path.name}: refused: {expected} a {type(state).__name__}")
    odd = [f"{k!r}: {type(v).__name__}" for k, v in state.items()
           if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if odd:
        raise LlavaError(f"{path.name}: refused: {expected} {', '.join(odd[:3])}")
    return state
