"""The tiled layout of int8 weights that mv.c's int8 kernel reads (quant_layers.Int8Linear holds its weights in it): each
4 rows' inputs in pieces of 32, the 4 rows' pieces in turn, so that the 4 rows the kernel reads at once are one
stream through memory. The tiles take the rows' own bytes; torch's kernels and saved checkpoints read rows."""

from __future__ import annotations

import torch

from . import _library

INT8_TILE = 4  # mv.c's I8_TILE


def int8_tiles(qweight: torch.Tensor) -> torch.Tensor | None:
    """int8 qweight (out, in) rearranged in place into tiles, returned as (out / 4, in / 32, 4, 32). Each 4 rows'
    tile takes the bytes the 4 rows took, so it goes a few thousand rows at a time through a small copy, and the
    matrix is never held twice (a view of a memory-mapped file is a private copy-on-write mapping: the file is not
    written). qweight's rows are gone after; None, with qweight untouched, where that kernel cannot take it (not a
    dense CPU int8 matrix, rows not a multiple of 4, inputs not a multiple of 32, or no kernel here)."""
    if not (isinstance(qweight, torch.Tensor) and qweight.dim() == 2 and qweight.dtype is torch.int8
            and qweight.device.type == "cpu" and qweight.is_contiguous()):
        return None
    rows, cols = qweight.shape
    if rows % INT8_TILE or cols % 32 or (lib := _library()) is None:
        return None
    tiles = qweight.view(rows // INT8_TILE, cols // 32, INT8_TILE, 32)
    if lib.int8_tile(qweight.data_ptr(), rows, cols, torch.get_num_threads()) == 0:  # in one pass: 7x faster
        return tiles
    for a in range(0, rows, 4096):  # (codec.c could not allocate its copies of 4 rows a thread)
        part = qweight[a:a + 4096]
        n = part.shape[0] // INT8_TILE
        tiles[a // INT8_TILE:a // INT8_TILE + n] = part.view(n, INT8_TILE, cols // 32, 32).transpose(1, 2).clone()
    return tiles


def int8_plain(qweight: torch.Tensor) -> torch.Tensor:
    """qweight (out, in) again: a copy of a tiled one (int8_tiles), the tensor itself otherwise."""
    if qweight.dim() != 4:
        return qweight
    return qweight.transpose(1, 2).reshape(int8_shape(qweight))


def int8_shape(qweight: torch.Tensor) -> tuple[int, int]:
    """(out, in) of int8 tiles, or the shape of any 2D weight; (0, 0) for other tensors."""
    if qweight.dim() == 4:
        return qweight.shape[0] * qweight.shape[2], qweight.shape[1] * qweight.shape[3]
    return tuple(qweight.shape) if qweight.dim() == 2 else (0, 0)
