"""Weight-only quantization of the language model: int8 and int4 with torch's packed CPU kernels; nf4 and int8 with
bitsandbytes on CUDA.

What is quantized: every linear layer of the decoder layers, and the output head. A head tied to the embeddings is
quantized as a separate copy, since the embedding table has to stay in the model dtype for lookups: the copy costs
a quarter (int4) or half (int8) of the table's bytes in memory and saves more than that in every decode step, where
the head is the largest single read (152000 x 1024 for interleave-qwen-0.5b: 6.1 ms a token in bfloat16 through
llava-cli's kernel on 2 Zen 4 cores, 3.6 ms in int8). The vision tower and projector stay in the model dtype: they are compute-bound,
and bfloat16 matmuls are fastest there.

The layers and their formats (int8, int4; nf4 is bitsandbytes' 4-bit NormalFloat, CUDA only, not saved) are
in quant_layers.py.

API, for `Llava.load(..., quantize=...)` and `llava convert --quantize`:
  prepare(model, mode, device, dtype)  before loading, on the meta model: swap the target Linear modules for
      quantized ones; returns {module name: module}. `weights.load_model(..., quantize=mode)` calls it, then
      quantizes each float weight as it streams from the file (Quantized.encode) or loads pre-quantized tensors.
  spec_of(metadata) -> mode | None   a safetensors file's __metadata__ says a checkpoint is quantized.
  save(model, path)  write one safetensors file of the loaded, quantized model (int8 / int4) with that metadata.
      `llava convert --quantize` does not use it: it streams each layer through prepare()'s modules and their
      `encode` shard by shard (convert_quant.py). Either way, Llava.load() reads the folder with no --quantize flag.
bitsandbytes (nf4, int8 on CUDA) is imported only when asked for and is not tested here (no GPU on the CI machines).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .errors import LlavaError
from .inventory import QUANT_KEY
from .quant_layers import Int4Linear, Int8Linear, Quantized

MODES = ("int8", "int4", "nf4")
METADATA_KEY = QUANT_KEY  # in the safetensors metadata of a checkpoint saved quantized


def targets(model: nn.Module, mode: str) -> dict[str, nn.Linear]:
    """The Linear modules `mode` quantizes: the decoder layers' and the output head (a tied one as its own copy)."""
    lm = model.language_model
    found = {f"language_model.model.{n}": m for n, m in lm.model.layers.named_modules(prefix="layers")
             if isinstance(m, nn.Linear)}
    found["language_model.lm_head"] = lm.lm_head
    return found


def prepare(model: nn.Module, mode: str, device: torch.device, dtype: torch.dtype) -> dict[str, Quantized]:
    """Swap the target Linear modules of a meta-device model for quantized ones; return them by name."""
    check(mode, device)
    swapped = {}
    for name, lin in targets(model, mode).items():
        i, o, bias = lin.in_features, lin.out_features, lin.bias is not None
        if mode == "int8":
            new = Int8Linear(i, o, bias, dtype)
        elif group := Int4Linear.group_for(i, o):
            new = Int4Linear(i, o, bias, dtype, group)
        else:
            continue  # a shape the int4 kernel cannot take stays in the model dtype
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, new)
        swapped[name] = new
    return swapped


def int4_layers(model: nn.Module) -> list[Int4Linear]:
    return [m for m in model.modules() if isinstance(m, Int4Linear)]


def finish(model: nn.Module) -> None:
    """After the state is assigned: the kernels' layouts of the quantized layers (their finish())."""
    for m in model.modules():
        if isinstance(m, Quantized):
            m.finish()


def check(mode: str, device: torch.device) -> None:
    if mode not in MODES:
        raise LlavaError(f"unknown quantization {mode!r} (use {', '.join(MODES)})")
    if device.type == "cpu" and mode == "nf4":
        raise LlavaError("nf4 quantization needs CUDA and bitsandbytes; on the CPU use int8 or int4")
    if device.type == "cuda" and mode == "int4":
        raise LlavaError("int4 runs on the CPU; on CUDA use nf4 (bitsandbytes)")
    if device.type not in ("cpu", "cuda"):
        raise LlavaError(f"quantization runs on the CPU or CUDA, not {device.type}")


def spec_of(metadata: dict) -> str | None:
    """The mode, when a safetensors file's metadata says it holds a quantized model."""
    return metadata.get(METADATA_KEY)


def save(model: nn.Module, path: Path) -> None:
    """Write the loaded, CPU-quantized `model` to one safetensors file that Llava.load() reads as it is."""
    from safetensors.torch import save_file

    modes = {"int8" if isinstance(m, Int8Linear) else "int4" for m in model.modules() if isinstance(m, Quantized)}
    if len(modes) != 1:
        raise LlavaError("save() needs a model quantized with int8 or int4 on the CPU")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.language_model.tie and not isinstance(model.language_model.lm_head, Quantized):
        state.pop("language_model.lm_head.weight")
    save_file(state, str(path), metadata={"format": "pt", METADATA_KEY: modes.pop()})


def bitsandbytes(model: nn.Module, mode: str) -> None:
    """Replace the target layers of a model loaded on CUDA with bitsandbytes' nf4 or int8 layers (untested here)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise LlavaError(f"{mode} on CUDA needs bitsandbytes: pip install 'llava-cli[cuda]'") from None
    for name, lin in targets(model, "nf4").items():
        w, device = lin.weight.data, lin.weight.device
        if mode == "nf4":
            new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, lin.bias is not None, compute_dtype=w.dtype,
                                    quant_type="nf4")
            new.weight = bnb.nn.Params4bit(w.cpu(), requires_grad=False, quant_type="nf4")
        else:
            new = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, lin.bias is not None,
                                      has_fp16_weights=False, threshold=6.0)
            new.weight = bnb.nn.Int8Params(w.cpu(), requires_grad=False, has_fp16_weights=False)
        if lin.bias is not None:
            new.bias = nn.Parameter(lin.bias.data, requires_grad=False)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, new.to(device))  # quantizes on the move to the GPU
