"""kernels.int8_dequant and int4_dequant: quantized weights back to bfloat16 rows for the products of many rows (a
prefill), in one pass of dequant.c into a buffer the caller gives, the same bits as torch's operations."""

from __future__ import annotations

import torch

from . import _dense, _library, int8_shape


def int8_dequant(qweight: torch.Tensor, scales: torch.Tensor, out: torch.Tensor) -> bool:
    """out = qweight * scales[:, None] in bfloat16, for int8 qweight (out, in) or in tiles (int8_tiles) and bfloat16
    scales (out,); False, with out untouched, where the kernel cannot take them and the caller uses torch's."""
    tiled, shape = qweight.dim() == 4, int8_shape(qweight)
    if (not _dense(qweight, torch.int8, qweight.shape) or not _dense(scales, torch.bfloat16, shape[:1])
            or not _writable(out, shape) or _library() is None):
        return False
    _library().int8_dequant(qweight.data_ptr(), scales.data_ptr(), out.data_ptr(), *shape, int(tiled),
                            torch.get_num_threads())
    return True


def int4_dequant(qweight: torch.Tensor, row_scales: torch.Tensor, out: torch.Tensor) -> bool:
    """out = (q - 8) * scale + zero in bfloat16 for quant_layers.Int4Linear's qweight (out, in / 2) and row_scales
    (out, groups, 2), groups of a multiple of 32 inputs; False, with out untouched, where the kernel cannot take them and the caller uses torch's."""
    if qweight.dim() != 2 or row_scales.dim() != 3:
        return False
    (rows, half), groups = qweight.shape, row_scales.shape[1]
    cols = 2 * half
    if (groups == 0 or cols % groups or (cols // groups) % 32 or not _dense(qweight, torch.uint8, (rows, half))
            or not _dense(row_scales, torch.bfloat16, (rows, groups, 2)) or not _writable(out, (rows, cols))
            or _library() is None):
        return False
    _library().int4_dequant(qweight.data_ptr(), row_scales.data_ptr(), out.data_ptr(), rows, cols, cols // groups,
                            torch.get_num_threads())
    return True


def _writable(out: torch.Tensor, shape: tuple) -> bool:
    return (_dense(out, torch.bfloat16, shape) and not torch.compiler.is_compiling()
            and not (out.requires_grad and torch.is_grad_enabled()))
