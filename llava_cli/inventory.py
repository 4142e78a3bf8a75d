"""What is on disk: a checkpoint's stored dtype, parameter count and size, and the checkpoints in the hub cache.

Read from JSON and safetensors headers only (no torch), so `llava models` and shell completion stay fast.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import LlavaError
from .files import read_json
from .hub import missing_files
from .templates import FAMILIES

LLAVA_TYPES = ("llava", "vipllava")
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
QUANT_KEY = "llava_quantize"  # quant.METADATA_KEY, repeated here so listing models imports no torch


def stored_dtype(folder: Path) -> str | None:
    """The dtype config.json says the weights were saved in (transformers 4: torch_dtype, 5: dtype)."""
    cfg = read_json(folder / "config.json")
    text = cfg.get("text_config") or {}
    value = cfg.get("dtype") or cfg.get("torch_dtype") or text.get("dtype") or text.get("torch_dtype")
    return value if isinstance(value, str) else None


def _safetensors_files(folder: Path) -> tuple[list[Path], dict[str, Any]]:
    """(weight files present, the index's JSON or {})."""
    index = read_json(folder / "model.safetensors.index.json", required=False)
    names = dict.fromkeys((index.get("weight_map") or {}).values()) if index else ["model.safetensors"]
    return [folder / n for n in names if (folder / n).is_file()], index


def weights_present(folder: Path) -> bool:
    files, index = _safetensors_files(folder)
    expected = len(set((index.get("weight_map") or {}).values())) if index else 1
    return len(files) == expected


def parameters(folder: Path) -> tuple[int | None, bool]:
    """(parameter count, exact?): summed from the safetensors headers, else estimated from the index's byte size."""
    files, index = _safetensors_files(folder)
    if files and weights_present(folder):
        return sum(_header_parameters(_header(f)) for f in files), True
    total = (index.get("metadata") or {}).get("total_size")
    per = _DTYPE_BYTES.get(stored_dtype(folder) or "")
    if isinstance(total, int) and per:
        return total // per, False
    return None, False


def quantization(folder: Path) -> str | None:
    """The weight-only quantization `llava convert --quantize` saved the checkpoint with, or None."""
    files, _ = _safetensors_files(folder)
    metadata = _header(files[0]).get("__metadata__") or {} if files else {}
    mode = metadata.get(QUANT_KEY)
    return mode if isinstance(mode, str) else None


def _header(path: Path) -> dict[str, Any]:
    """A safetensors file's JSON header, read alone."""
    try:
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 100 * 2**20:
                raise ValueError("header larger than 100 MiB")
            header = json.loads(f.read(size))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        return header
    except (OSError, ValueError, struct.error) as e:
        raise LlavaError(f"{path}: not a readable safetensors file ({e})") from None


def _header_parameters(header: dict[str, Any]) -> int:
    """Parameters of the tensors a header lists; quantized layers count their weights, not their scales."""
    int4 = (header.get("__metadata__") or {}).get(QUANT_KEY) == "int4"
    total = 0
    for key, entry in header.items():
        if key == "__metadata__" or key.endswith((".scales", ".scales_zeros")):
            continue
        n = 1
        for dim in entry["shape"]:
            n *= dim
        total += 2 * n if int4 and key.endswith(".qweight") else n  # two 4-bit weights a byte
    return total


def folder_size(folder: Path) -> int:
    """Bytes of the files a folder holds, following the hub cache's symlinks to blobs, each blob counted once."""
    seen, total = set(), 0
    for root, _, files in os.walk(folder):
        for name in files:
            real = Path(root, name).resolve()
            if real not in seen and real.is_file():
                seen.add(real)
                total += real.stat().st_size
    return total


@dataclass(frozen=True)
class CachedModel:
    repo_id: str
    size: int
    family: str | None  # the template family of a LLaVA checkpoint, None for any other model
    complete: bool  # every file `llava` needs is in the snapshot
    path: Path  # the snapshot folder

    def record(self) -> dict[str, Any]:
        return {"model": self.repo_id, "size_on_disk": self.size, "family": self.family, "complete": self.complete,
                "path": str(self.path)}


def cached_models() -> list[CachedModel]:
    """Model repos in the huggingface_hub cache, newest snapshot each (the one `main` points to when there is one)."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        cache = scan_cache_dir()
    except (CacheNotFound, OSError, ValueError):
        return []
    found = []
    for repo in sorted(cache.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model" or not repo.revisions:
            continue
        revision = max(repo.revisions, key=lambda r: ("main" in r.refs, r.last_modified))
        snapshot = Path(revision.snapshot_path)
        found.append(CachedModel(repo.repo_id, repo.size_on_disk, _family(snapshot),
                                 not missing_files(snapshot) and weights_present(snapshot), snapshot))
    return found


def _family(snapshot: Path) -> str | None:
    try:
        cfg = json.loads((snapshot / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict) or cfg.get("model_type") not in LLAVA_TYPES:
        return None
    text = (cfg.get("text_config") or {}).get("model_type", "llama")
    return FAMILIES.get((cfg["model_type"], text)) or FAMILIES.get((cfg["model_type"], None)) or cfg["model_type"]
