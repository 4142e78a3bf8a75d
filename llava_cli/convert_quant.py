"""`llava convert --quantize int8|int4`: the tensors a source tensor becomes, exactly as quant.py makes them at load.

The linear layers quant.prepare() swaps (the decoder layers' and the output head) are written as those layers hold
them: `qweight` int8 + `scales` (int8) or `qweight` uint8 + `scales_zeros` (int4), encoded from the weight in the
output dtype, their biases as they are. A tied head is written as a quantized copy of the embedding, which itself
stays as it is. Every shard's metadata says `llava_quantize: MODE`, so the loader
assigns the tensors as they are and quantizes nothing.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import quant
from .config import LlavaConfig
from .errors import LlavaError
from .llava import LlavaModel
from .weights import read_header

MODES = ("int8", "int4")  # the modes a checkpoint can be saved in; nf4 exists only inside bitsandbytes on CUDA
EMBED, HEAD = "language_model.model.embed_tokens.weight", "language_model.lm_head"


def check(mode: str | None) -> None:
    """A one-line error for a --quantize convert cannot write."""
    if mode == "nf4":
        raise LlavaError("--quantize nf4 cannot be saved: bitsandbytes makes it on CUDA at load "
                         "(llava ask --quantize nf4); convert with int8 or int4")
    if mode is not None and mode not in MODES:
        raise LlavaError(f"unknown quantization {mode!r} (use int8 or int4)")


def refuse_quantized(source: str, files: list[Path]) -> None:
    """Convert reads float weights: a checkpoint saved quantized is an error, not a pile of unexpected tensors."""
    for f in files:
        if f.suffix == ".safetensors" and (saved := quant.spec_of(read_header(f)[1])):
            raise LlavaError(f"{source} is already quantized ({saved}); convert reads unquantized checkpoints")


class Quantization:
    """The layers of `cfg` that `mode` quantizes, built on the meta device: their buffers give the written shapes
    and dtypes, and their `encode` the written tensors."""

    def __init__(self, cfg: LlavaConfig, mode: str, dtype: torch.dtype, names: set[str]):
        self.mode = mode
        with torch.device("meta"):
            self.layers = quant.prepare(LlavaModel(cfg), mode, torch.device("cpu"), dtype)
        # a tied head is quantized too: the loader encodes the embedding for it, so the file holds that copy
        self.head_copy = HEAD in self.layers and f"{HEAD}.weight" not in names

    def targets(self, name: str) -> tuple[bool, list[str]]:
        """Whether the tensor `name` is written as it is, and the quantized layers it is encoded into."""
        prefix, _, leaf = name.rpartition(".")
        if leaf == "weight" and prefix in self.layers:
            return False, [prefix]
        return True, [HEAD] if name == EMBED and self.head_copy else []

    def shapes(self, prefix: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of the tensors written for the layer `prefix` (its bias is an entry of its own)."""
        return {f"{prefix}.{k}": (tuple(t.shape), t.dtype)
                for k, t in self.layers[prefix].state_dict().items() if k != "bias"}

    def encode(self, prefix: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        return {f"{prefix}.{k}": t.contiguous() for k, t in self.layers[prefix].encode(weight).items()}

    def describe(self) -> str:
        """One line for the plan and the report."""
        kinds = {"int8": "qweight int8 + scales per output channel",
                 "int4": "qweight uint8, two weights a byte, + scales_zeros per group of inputs"}
        head = (f"; the tied output head as an {self.mode} copy of the embedding" if self.head_copy else
                "; the output head stays the embedding" if HEAD not in self.layers else "")
        return f"quantized: {self.mode}, {len(self.layers)} linear layers of the language model ({kinds[self.mode]})" \
               + head
