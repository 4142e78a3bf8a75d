"""Proving a conversion: every written tensor equals the source's, and the result answers as the source does.

The source is built in memory through our model core from the source files (mapped, cast, vocabulary padded, and
with --quantize quantized as the loader quantizes at load); the result is loaded from the written folder exactly as
`llava ask` loads it (config.json, tokenizer, template, preprocessor, pre-quantized tensors). Both run one probe
prompt with one image; their logits are compared at every position.
"""

from __future__ import annotations

import gc
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import interrupts
from .quant_layers import Int4Linear
from .ui import human_bytes
from .weights import read_tensors, weight_files

if TYPE_CHECKING:
    from .convert import Plan

PROBE = "Describe this image in detail."
_HEADROOM = 1.3  # activations, logits and the allocator on top of the weights


@dataclass
class Verification:
    sha256: dict[str, str]
    expected: int = 0  # tensors the plan writes
    tensors: int = 0  # tensors read back
    identical: int = 0  # ... equal to the source's, bit for bit
    mismatched: list[str] = field(default_factory=list)  # written tensors that differ from the source (or are absent)
    max_diff: float | None = None  # max |logit difference|; None when the probe was skipped
    positions: int = 0
    vocab: int = 0
    compute: str = ""
    tolerance: float = 0.0
    skipped: str | None = None  # why the logits probe did not run

    @property
    def ok(self) -> bool:
        return not self.mismatched and (self.max_diff is None or self.max_diff <= self.tolerance)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def verify(plan: Plan, folder: Path, progress: Callable[[str], None] = lambda _: None) -> Verification:
    """Compare `folder` (just written) with the source `plan` was made from."""
    progress("verifying: sha256 and every tensor against the source")
    v = Verification({f.name: sha256(f) for f in sorted(folder.iterdir()) if f.is_file()}, expected=len(plan.layout))
    seen = set()
    pending: dict[str, torch.Tensor] = {}  # made from a source tensor, not read back yet (a layer's qweight, scales)
    for key, _, tensor in read_tensors(weight_files(folder)):
        interrupts.check()  # one that reading or comparing swallowed
        v.tensors += 1
        seen.add(key)
        if key not in pending and key in plan.layout:
            pending |= plan.written(plan.layout[key])
        expected = pending.pop(key, None)
        if expected is not None and torch.equal(tensor, expected):
            v.identical += 1
        else:
            v.mismatched.append(key)
    v.mismatched += sorted(plan.layout.keys() - seen)
    _compare_logits(plan, folder, v, progress)
    return v


def probe_image():
    """A deterministic 96x72 picture with structure in every channel."""
    from PIL import Image

    r = Image.linear_gradient("L").resize((96, 72))
    g = Image.radial_gradient("L").resize((96, 72))
    return Image.merge("RGB", (r, g, r.transpose(Image.Transpose.FLIP_LEFT_RIGHT)))


def available_memory() -> int | None:
    """MemAvailable in bytes (Linux), else None (unknown: assume enough)."""
    try:
        with open("/proc/meminfo") as f:
            line = next(line for line in f if line.startswith("MemAvailable:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def _logits(model, ids: list[int], pixels: torch.Tensor) -> torch.Tensor:
    from .decoder import Step

    with torch.inference_mode():
        feats = model.encode_images(pixels)
        model.setup_cache(1, len(ids))
        step = Step(0, torch.arange(len(ids))[None], None)
        return model(model.embed(torch.tensor([ids]), feats), step, last_only=False)[0]  # (T, vocab) float32


def _model_bytes(plan: Plan, compute: torch.dtype) -> int:
    """The model's memory when it computes in `compute`: floats in that dtype, quantized weights as stored (int4's
    twice: torch's packed copy is made at load; their scales and zeros too where a row has several groups: llava-cli's
    copy by row)."""
    total = 0
    for e in plan.entries:
        for name, (shape, dtype) in plan.outputs(e).items():
            copies = 1
            if plan.quantize == "int4" and dtype == torch.uint8:
                copies = 2
            elif plan.quantize == "int4" and name.endswith(".scales_zeros"):
                copies = Int4Linear.scale_copies(shape[0])
            total += math.prod(shape) * copies * (compute.itemsize if dtype.is_floating_point else dtype.itemsize)
    return total


def _compare_logits(plan: Plan, folder: Path, v: Verification, progress: Callable[[str], None]) -> None:
    from .image import preprocess
    from .pipeline import Llava
    from .templates import Message
    from .weights import assemble, load_model

    free = available_memory()
    compute = torch.float32 if free is None or _model_bytes(plan, torch.float32) * _HEADROOM < free else plan.dtype
    if free is not None and (need := _model_bytes(plan, compute) * _HEADROOM) > free:
        v.skipped = f"the probe needs about {human_bytes(need)} of memory, {human_bytes(free)} is available"
        return
    result = Llava(folder, str(folder))  # config, tokenizer, template and preprocessing as `llava ask` reads them
    prompt = result.prompt([Message("user", PROBE, images=1)])
    pixels = preprocess([probe_image()], result.image_config)
    cpu = torch.device("cpu")
    progress(f"verifying: the source's logits on a probe prompt ({prompt.tokens} tokens, {str(compute)[6:]})")
    tensors = ((e.name, e.source.where[e.key], plan.tensor(e)) for e in plan.entries)
    # Built in the output dtype, as DST holds it, and quantized at load as `llava ask --quantize` does (scales in
    # the output dtype, as written); then cast to the compute dtype, which is exact, as loading DST in it is.
    source = assemble(plan.cfg, tensors, plan.dtype, cpu, plan.source, quantize=plan.quantize).to(compute)
    expected = _logits(source, prompt.ids, pixels)
    del source, tensors
    gc.collect()
    progress("verifying: the result's logits, loaded as `llava ask` loads it")
    model = load_model(folder, result.config, compute, cpu)
    got = _logits(model, prompt.ids, pixels)
    del model
    gc.collect()
    v.max_diff = (expected - got).abs().max().item()
    v.positions, v.vocab = got.shape
    v.compute = str(compute).removeprefix("torch.")
    v.tolerance = 1e-4 if compute == torch.float32 else 1e-2
