"""kernels.DecodePlan: every decoder layer of a one-token decode step in one call of mv.c's decode_layers.

The ~30 small torch operations a layer would otherwise take cost ~15 ms a step on the interleave-qwen-0.5b shape.
The plan checks every tensor against the others once per KV cache (kernels/__init__.py has the library and the
checks it shares with the matrix-vector products).
"""

from __future__ import annotations

import ctypes

import torch

from . import _dense, _int4, _library, int8_shape


class DecodePlan:
    """Every decoder layer of a one-token step in one call of mv.c's decode_layers, for one set of weights and one
    KV cache: checked and laid out once (a few ms of Python) instead of at each step.

    layers: per layer [ln1, ln2, (weight, scales | None, bias | None) for q, k, v, o, gate, up, down], bfloat16
    weights, int8 ones with bfloat16 per-row scales, or int4 ones (uint8, two weights a byte) with bfloat16 scales
    and zeros (out, groups, 2) (int4_mv); mv.c reads them as a table of 30 words a layer (0 for a missing scale or
    bias, the int4 group size, -1 for int8 in tiles (int8_tiles), or 0). k, v: the caches (layers, 1, kv heads,
    max_len, head_dim). norm: the model's final RMSNorm weight (hidden,), applied to the output, or None. build()
    checks every shape against the others, so the kernel never reads or writes out of bounds; the plan holds the
    tensors, so the pointers it passes stay valid as long as it lives.
    """

    outcome = ""  # what the last build() chose, and why: the second half of kernels.status()

    def __init__(self, lib: ctypes.CDLL, layers: list[list], k: torch.Tensor, v: torch.Tensor, heads: int, eps: float,
                 hidden: int, inter: int, norm: torch.Tensor | None = None):
        self.lib, self.tensors, self.k, self.v, self.heads, self.eps, self.norm = lib, layers, k, v, heads, eps, norm
        self.hidden, self.inter = hidden, inter
        _, _, self.kv, self.max_len, self.hd = k.shape
        words = []
        for ln1, ln2, *mats in layers:
            words += [ln1.data_ptr(), ln2.data_ptr()]
            for w, scales, bias in mats:
                group = w.shape[1] * 2 // scales.shape[1] if w.dtype is torch.uint8 else -(w.dim() == 4)  # -1: tiled
                words += [w.data_ptr(), 0 if scales is None else scales.data_ptr(),
                          0 if bias is None else bias.data_ptr(), group]
        self.desc = (ctypes.c_int64 * len(words))(*words)

    @classmethod
    def build(cls, layers: list[list], k: torch.Tensor, v: torch.Tensor, heads: int, eps: float,
              norm: torch.Tensor | None = None) -> DecodePlan | None:
        """The plan, or None where the kernel cannot take these tensors (the caller runs torch's operations); status()
        says which, and why."""
        sizes = _sizes(layers, k, v, heads, norm)  # before loading: a float32 model does not build the kernel
        lib = None if isinstance(sizes, str) else _library()
        if lib is None:
            DecodePlan.outcome = f"decode layers: torch operations ({sizes if isinstance(sizes, str) else 'no kernel'})"
            return None
        DecodePlan.outcome = "decode layers: llava-cli's kernel, every layer in one call"
        return cls(lib, layers, k, v, heads, eps, *sizes, norm)

    def run(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: int) -> bool:
        """Run every layer in place on x (hidden,) bfloat16 for the token at cache slot `pos`, with RoPE's cos and
        signed sin (head_dim,) for its position, then the final norm where the plan has it; False (nothing done): the
        caller runs torch's operations."""
        if (torch.compiler.is_compiling() or torch.is_grad_enabled() or not 0 <= pos < self.max_len
                or not all(_dense(t, torch.bfloat16, s) for t, s in ((x, (self.hidden,)), (cos, (self.hd,)),
                                                                      (sin, (self.hd,))))):
            return False
        return not self.lib.decode_layers(self.desc, len(self.tensors), x.data_ptr(), cos.data_ptr(),
                                          sin.data_ptr(), self.k.data_ptr(), self.v.data_ptr(), self.max_len, pos,
                                          self.hidden, self.heads, self.kv, self.hd, self.inter, self.eps,
                                          None if self.norm is None else self.norm.data_ptr(),
                                          torch.get_num_threads())


def _sizes(layers: list[list], k: torch.Tensor, v: torch.Tensor, heads: int,
           norm: torch.Tensor | None = None) -> tuple[int, int] | str:
    """(hidden, intermediate) size where DecodePlan can take these tensors, every shape checked against the others,
    else why not, for status()."""
    if k.dim() != 5 or not layers or k.shape[0] != len(layers):
        return "a cache that does not fit the layers"
    if k.shape[1] != 1:
        return f"{k.shape[1]} rows at once"
    _, _, kv, _, hd = k.shape
    if hd % 32 or not 0 < hd <= 256:
        return f"head size {hd}: it takes multiples of 32 up to 256"
    if heads % kv:
        return "query heads not a multiple of key-value heads"
    if not (_dense(k, torch.bfloat16, k.shape) and _dense(v, torch.bfloat16, k.shape)):
        return f"a {str(k.dtype).removeprefix('torch.')} model on {k.device.type}: it takes bfloat16 on the CPU"
    ln1, gate = layers[0][0], layers[0][6][0]  # their shapes give the hidden and intermediate sizes
    hidden = ln1.shape[0] if isinstance(ln1, torch.Tensor) and ln1.dim() == 1 else 0
    inter = int8_shape(gate)[0] if isinstance(gate, torch.Tensor) else 0  # any 2D weight, or int8 tiles
    if norm is not None and not _dense(norm, torch.bfloat16, (hidden,)):
        return "the final norm is not bfloat16 of the hidden size"
    shapes = [(heads * hd, hidden), (kv * hd, hidden), (kv * hd, hidden), (hidden, heads * hd), (inter, hidden),
              (inter, hidden), (hidden, inter)]
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for i, (ln1, ln2, *mats) in enumerate(layers):
        if not (_dense(ln1, torch.bfloat16, (hidden,)) and _dense(ln2, torch.bfloat16, (hidden,))):
            return f"layer {i}'s norms are not bfloat16 of the hidden size"
        for name, (w, scales, bias), (rows, cols) in zip(names, mats, shapes, strict=True):
            if scales is None:
                ok = _dense(w, torch.bfloat16, (rows, cols))
            elif isinstance(w, torch.Tensor) and w.dtype is torch.uint8:
                ok = _int4(w, scales) and w.shape == (rows, cols // 2) and cols % 2 == 0
            else:  # int8, (rows, cols) or in tiles of rows (int8_tiles)
                ok = (isinstance(w, torch.Tensor) and int8_shape(w) == (rows, cols) and
                      _dense(w, torch.int8, w.shape) and _dense(scales, torch.bfloat16, (rows,)))
            if not ok or (bias is not None and not _dense(bias, torch.bfloat16, (rows,))):
                what = ("int4" if w.dtype is torch.uint8 else str(w.dtype).removeprefix("torch.")
                        ) if isinstance(w, torch.Tensor) else "a module it does not know"
                return f"layer {i}'s {name} ({what}) does not fit"
    return hidden, inter
