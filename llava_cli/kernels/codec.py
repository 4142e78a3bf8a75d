"""kernels.int8_quantize and int4_quantize (a weight into quant_layers' formats, at load), int8_dequant and int4_dequant
(back to bfloat16 rows for the products of many rows, a prefill, into a buffer the caller gives): each one pass of
codec.c with the bits of quant_layers' torch operations for finite weights. None or False where the kernel cannot
take the tensors, and the caller runs torch's operations."""

from __future__ import annotations

import ctypes

import torch

from . import _dense, _library, int8_shape

WEIGHT_TYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # codec.c's load16: read exactly as float32


def declare(lib: ctypes.CDLL) -> None:
    """The signatures of codec.c's functions in the library just loaded (kernels._build)."""
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.int8_quantize.argtypes, lib.int8_quantize.restype = [p, i32, i64, i64, p, p, i32], None
    lib.int4_quantize.argtypes, lib.int4_quantize.restype = [p, i32, i64, i64, i64, p, p, i32], None
    lib.int8_tile.argtypes, lib.int8_tile.restype = [p, i64, i64, i32], i32
    lib.int8_dequant.argtypes, lib.int8_dequant.restype = [p, p, p, i64, i64, i32, i32], None
    lib.int4_dequant.argtypes, lib.int4_dequant.restype = [p, p, p, i64, i64, i64, i32], None


def int8_quantize(w: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """Int8Linear's tensors of a float weight (out, in): qweight int8 (out, in), scales bfloat16 (out,)."""
    if (lib := _readable(w)) is None:
        return None
    q, s = torch.empty(w.shape, dtype=torch.int8), torch.empty(w.shape[0], dtype=torch.bfloat16)
    lib.int8_quantize(w.data_ptr(), WEIGHT_TYPES[w.dtype], *w.shape, q.data_ptr(), s.data_ptr(),
                      torch.get_num_threads())
    return {"qweight": q, "scales": s}


def int4_quantize(w: torch.Tensor, group: int) -> dict[str, torch.Tensor] | None:
    """Int4Linear's tensors of a float weight (out, in) in groups of `group` inputs (a multiple of 32): qweight uint8
    (out, in / 2), scales_zeros bfloat16 (in / group, out, 2)."""
    if (lib := _readable(w)) is None or group % 32 or w.shape[1] % group:
        return None
    rows, cols = w.shape
    q, sz = torch.empty(rows, cols // 2, dtype=torch.uint8), torch.empty(rows, cols // group, 2, dtype=torch.bfloat16)
    lib.int4_quantize(w.data_ptr(), WEIGHT_TYPES[w.dtype], rows, cols, group, q.data_ptr(), sz.data_ptr(),
                      torch.get_num_threads())
    return {"qweight": q, "scales_zeros": sz.transpose(0, 1).contiguous()}


def codec_runs() -> bool:
    """Whether codec.c runs here (the library built on first use): where it does not, no buffer is made for it."""
    return _library() is not None


def int8_dequant(qweight: torch.Tensor, scales: torch.Tensor, out: torch.Tensor) -> bool:
    """out = qweight * scales[:, None] in bfloat16, for int8 qweight (out, in) or in tiles (int8_tiles) and bfloat16
    scales (out,); False, with out untouched, where the kernel cannot take them and the caller uses torch's."""
    tiled, shape = qweight.dim() == 4, int8_shape(qweight)
    if (not _dense(qweight, torch.int8, qweight.shape) or not _dense(scales, torch.bfloat16, shape[:1])
            or not _writable(out, shape) or (lib := _library()) is None):
        return False
    lib.int8_dequant(qweight.data_ptr(), scales.data_ptr(), out.data_ptr(), *shape, int(tiled), torch.get_num_threads())
    return True


def int4_dequant(qweight: torch.Tensor, row_scales: torch.Tensor, out: torch.Tensor) -> bool:
    """out = (q - 8) * scale + zero in bfloat16 for quant_layers.Int4Linear's qweight (out, in / 2) and row_scales
    (out, groups, 2), groups of a multiple of 32 inputs; False, with out untouched, where the kernel cannot take them
    and the caller uses torch's."""
    if qweight.dim() != 2 or row_scales.dim() != 3:
        return False
    (rows, half), groups = qweight.shape, row_scales.shape[1]
    cols = 2 * half
    if (groups == 0 or cols % groups or (cols // groups) % 32 or not _dense(qweight, torch.uint8, (rows, half))
            or not _dense(row_scales, torch.bfloat16, (rows, groups, 2)) or not _writable(out, (rows, cols))
            or (lib := _library()) is None):
        return False
    lib.int4_dequant(qweight.data_ptr(), row_scales.data_ptr(), out.data_ptr(), rows, cols, cols // groups,
                     torch.get_num_threads())
    return True


def _writable(out: torch.Tensor, shape: tuple) -> bool:
    return (_dense(out, torch.bfloat16, shape) and not torch.compiler.is_compiling()
            and not (out.requires_grad and torch.is_grad_enabled()))


def _readable(w: torch.Tensor):
    """The library, where it can read w: a contiguous 2D CPU weight of a type it reads."""
    if (not isinstance(w, torch.Tensor) or w.dtype not in WEIGHT_TYPES or w.dim() != 2 or w.device.type != "cpu"
            or not w.is_contiguous() or torch.compiler.is_compiling()):
        return None
    return _library()
