"""Will the model fit? Estimated before loading, so a model too big fails in one line instead of swapping or being
killed by the kernel's OOM killer halfway through a load.

Needed: the weights in the chosen dtype and quantization (shapes from the safetensors headers), the KV cache for the
whole context at batch 1 (what a long chat reaches), and a margin for activations, the vision tower's work and the
allocator. Available: MemAvailable from /proc/meminfo on Linux, or less where a memory cgroup (a container) caps the
process below it; the free memory of the GPU on CUDA; elsewhere it is unknown and nothing is checked.
LLAVA_NO_MEMORY_CHECK=1 skips the check (with swap, or when the estimate is too careful).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from .config import LlavaConfig
from .errors import LlavaError
from .quant_layers import Int4Linear

MARGIN_FRACTION, MARGIN_BYTES = 0.10, 256 * 2**20
ENV = "LLAVA_NO_MEMORY_CHECK"

# (our parameter name, shape, stored dtype) of every tensor the model will hold
Entry = tuple[str, Sequence[int], torch.dtype]


def available(device: torch.device) -> int | None:
    """Bytes a model can still take on `device`, or None where that is unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    free = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return min((n for n in (free, cgroup_free()) if n is not None), default=None)


CGROUP = Path("/sys/fs/cgroup")
NO_LIMIT = 2**60  # cgroup v1 writes "no limit" as a huge number (9223372036854771712)


def cgroup_free(root: Path = CGROUP, proc_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """What this process's memory cgroup (a container, a systemd slice) still allows, or None without a limit.

    MemAvailable counts the whole machine: in a container capped below it, the OOM killer strikes first. Usage
    counts the page cache too; its inactive part is reclaimed before anything is killed, so it counts as free
    (as `docker stats` does). Both cgroup v2 (memory.max) and v1 (memory/memory.limit_in_bytes) are read, in this
    process's own group where it is visible and at the mount's root (a container's own view) otherwise.
    """
    try:
        lines = proc_cgroup.read_text().splitlines()
        groups = dict(line.strip().split(":", 2)[1:] for line in lines if line.count(":") >= 2)
    except (OSError, ValueError):
        groups = {}
    layouts = [(root / groups.get("", "/").lstrip("/"), "memory.max", "memory.current", "inactive_file"),
               (root, "memory.max", "memory.current", "inactive_file"),
               (root / "memory" / groups.get("memory", "/").lstrip("/"), "memory.limit_in_bytes",
                "memory.usage_in_bytes", "total_inactive_file"),
               (root / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")]
    for folder, limit_file, usage_file, inactive_key in layouts:
        try:
            raw = (folder / limit_file).read_text().strip()
            if raw == "max" or int(raw) >= NO_LIMIT:
                continue
            usage = int((folder / usage_file).read_text())
            stat = dict(line.split() for line in (folder / "memory.stat").read_text().splitlines() if line.strip())
            inactive = int(stat.get(inactive_key, 0))
        except (OSError, ValueError):
            continue
        return max(0, int(raw) - (usage - inactive))
    return None


def _quantized(name: str, shape: Sequence[int]) -> bool:
    """Whether quant.targets() quantizes this tensor: the decoder layers' linear weights, and the head; or whether it
    is such a layer's weight saved quantized (`qweight`)."""
    if name in ("language_model.lm_head.weight", "language_model.lm_head.qweight"):
        return True  # a float head is only present untied; a tied one is counted separately
    return name.startswith("language_model.model.layers.") and name.endswith((".weight", ".qweight")) and len(shape) == 2


def _tensor_bytes(shape: Sequence[int], stored: torch.dtype, dtype: torch.dtype, mode: str | None) -> int:
    """Bytes one tensor holds once loaded: floats in `dtype`, or quantized as quant.py stores them on the CPU."""
    out, numel = shape[0] if shape else 1, 1
    for n in shape:
        numel *= n
    if not stored.is_floating_point:  # already quantized on disk
        # an int4 qweight (uint8, two weights a byte) can get torch's packed copy of the same size: counted, as a
        # batch's decode builds it on first use (quant_layers.Int4Linear.packed_weight)
        return numel * stored.itemsize * (2 if mode == "int4" and stored == torch.uint8 else 1)
    size = dtype.itemsize
    if mode == "int8":
        return numel + out * size  # int8 weights, a scale per output channel
    if mode == "int4" and len(shape) == 2 and (group := Int4Linear.group_for(shape[1], shape[0])):
        # qweight and torch's packed copy (built on first use), half a byte each; scales and zeros, and llava-cli's
        # copy of them by row
        return numel + Int4Linear.scale_copies(shape[1] // group) * (numel // group * 2 * size)
    return numel * size


def estimate(cfg: LlavaConfig, entries: Sequence[Entry], dtype: torch.dtype, device: torch.device,
             quantize: str | None) -> tuple[int, int]:
    """(weight bytes, KV cache bytes) of the loaded model. On CUDA, bitsandbytes quantizes after the model is on the
    GPU in `dtype`, so quantization does not lower what the load needs there."""
    mode = quantize if device.type == "cpu" else None
    weights = sum(_tensor_bytes(shape, stored, dtype, mode if _quantized(name, shape) else None)
                  * (Int4Linear.scale_copies(shape[0]) if mode == "int4" and name.endswith(".scales_zeros") else 1)
                  for name, shape, stored in entries)
    head_stored = any(name == "language_model.lm_head.qweight" for name, _, _ in entries)  # a saved quantized head
    if mode in ("int8", "int4") and cfg.tie_word_embeddings and not head_stored:  # quantized from the embeddings
        weights += sum(_tensor_bytes(shape, stored, dtype, mode) for name, shape, stored in entries
                       if name == "language_model.model.embed_tokens.weight")
    t = cfg.text
    kv = 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * cfg.context_length * dtype.itemsize
    return weights, kv


def needed(weights: int, kv: int) -> int:
    return int((weights + kv) * (1 + MARGIN_FRACTION)) + MARGIN_BYTES


def check(cfg: LlavaConfig, entries: Sequence[Entry], dtype: torch.dtype, device: torch.device,
          quantize: str | None, can_quantize: bool = True) -> None:
    """Refuse a load that will not fit, saying how much it needs, how much there is, and what would fit."""
    if os.environ.get(ENV, "") not in ("", "0") or (free := available(device)) is None:
        return
    weights, kv = estimate(cfg, entries, dtype, device, quantize)
    need = needed(weights, kv)
    if need <= free:
        return
    choices = []  # smaller settings, best quality first
    dtypes = [dtype] + ([torch.bfloat16] if dtype.itemsize > 2 else [])
    modes = [quantize] + (["int8", "int4"] if can_quantize and device.type == "cpu" and not quantize else [])
    for d in dtypes:
        for m in modes:
            if (d, m) != (dtype, quantize):
                flags = " ".join(([f"--dtype {str(d).removeprefix('torch.')}"] if d != dtype else [])
                                 + ([f"--quantize {m}"] if m != quantize else []))
                choices.append((needed(*estimate(cfg, entries, d, device, m)), flags))
    fits = [f"{flags} needs {gb(n)}" for n, flags in choices if n <= free][:2]
    if fits:
        advice = ", ".join(fits)
    elif choices:
        n, flags = min(choices)
        advice = f"even {flags} needs {gb(n)}"
    else:
        advice = "nothing smaller is possible here"
    setting = str(dtype).removeprefix("torch.") + (f" with --quantize {quantize}" if quantize else "")
    raise LlavaError(f"not enough memory: loading in {setting} needs about {gb(need)} (weights {gb(weights)}, "
                     f"KV cache for {cfg.context_length} tokens {gb(kv)}, margin), {gb(free)} is available on "
                     f"{device.type}; {advice} ({ENV}=1 tries anyway)")


def gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"
