"""The weight-only quantized linear layers (int8, int4) on the CPU: their formats, their encoding and the
kernels they run. quant.py decides which layers become these and loads or saves them.

  int8  per output channel, symmetric: w = q * scale, q in [-127, 127]. Tensors `qweight` int8 (out, in),
        `scales` (out,). Loaded where llava-cli's int8 kernel runs, qweight is held in its tiles instead
        (kernels.int8_tiles; state_dict() and save() give the rows).
  int4  per group of 128 inputs (64 or 32 where 128 does not divide them), asymmetric: w = (q - 8) * scale + zero,
        q in [0, 15]. Tensors `qweight` uint8 (out, in / 2) holding q[2j] in the low and q[2j+1] in the high nibble,
        `scales_zeros` (in / group, out, 2).

Decode (a handful of rows) runs the packed kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`; one bfloat16
row: llava-cli's own kernels where they can be built, kernels/, which read `qweight` as stored); longer
inputs (a prefill) dequantize the weight and run the model dtype's matmul, which is several times faster there.
Encoding at load and that dequantizing run in one pass of kernels/codec.c where it runs, with the bits of the torch
operations below (which run elsewhere). On disk the formats above are portable; torch's int4 layout depends on the
CPU and is built when first needed.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .decoder import onednn_linear

GROUP_SIZES = (128, 64, 32)  # int4: the first that divides a layer's inputs; the kernel takes these
KERNEL_ROWS = 16  # up to this many input rows the packed kernel wins; beyond it, dequantize and matmul
_scratch = threading.local()  # .buf: where product() dequantizes, kept across calls (see _buffer)


def _buffer(shape: tuple[int, int]) -> torch.Tensor:
    """A bfloat16 tensor of `shape` in memory this thread reuses: the largest weight dequantized so far (90 MB for a
    7B model's MLP). A new tensor of that size each time would come as fresh pages from the system (glibc maps
    anything over 32 MB anew), and faulting them in cost more than dequantizing into them."""
    n = shape[0] * shape[1]
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < n:
        _scratch.buf = buf = None  # the smaller one freed before the larger one is made
        buf = _scratch.buf = torch.empty(n, dtype=torch.bfloat16)
    return buf[:n].view(shape)


class Quantized(nn.Module):
    """A weight-only quantized linear layer; `encode` turns a float weight into this module's tensors."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features).contiguous()  # (N, in); the packed kernels need contiguous rows
        y = self.kernel(x, lead) if x.shape[0] <= KERNEL_ROWS else self.product(x)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*lead, self.out_features)

    def finish(self) -> None:
        """After the state is assigned: the layouts llava-cli's kernels read (Int8Linear, Int4Linear)."""

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, in) times the weight dequantized, for many rows: in bfloat16 through llava-cli's dequantizing
        kernel into this thread's reused buffer, then oneDNN's matmul (F.linear's bits); elsewhere torch's
        dequantize() and F.linear."""
        if (x.dtype is torch.bfloat16 and kernels.codec_runs()
                and self.dequantize_into(w := _buffer((self.out_features, self.in_features)))):
            y = onednn_linear(x, w, None)
            return F.linear(x, w) if y is None else y
        return F.linear(x, self.dequantize(x.dtype))

    def dequantize_into(self, out: torch.Tensor) -> bool:
        """out = the weight in bfloat16, the bits of dequantize(torch.bfloat16), through llava-cli's kernel; False
        where it does not run."""
        return False

    @staticmethod
    def by_rows(x: torch.Tensor, mv) -> torch.Tensor | None:
        """mv(row) for each row of x (llava-cli's one-row kernel), stacked; None as soon as it declines one."""
        if len(x) == 1:  # one-row decode, every step: a view, not torch.stack's copy
            return None if (y := mv(x[0])) is None else y[None]
        rows = []
        for row in x:
            if (y := mv(row)) is None:
                return None
            rows.append(y)
        return torch.stack(rows)


class Int8Linear(Quantized):
    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype):
        super().__init__(in_features, out_features, bias, dtype)
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype))

    def encode(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.scales.dtype is torch.bfloat16 and (made := kernels.int8_quantize(w)) is not None:
            return made  # codec.c: these operations' bits in one pass, 20-40x faster
        q, s = [], []
        for rows in w.split(8192):  # float32 copies of a few rows at a time, not of a 600 MB head
            # Round with the scale as stored (bfloat16), so each weight is off by at most half a stored step.
            f = rows.float()
            scale = (f.abs().amax(1).clamp(min=1e-8) / 127).to(self.scales.dtype)
            q.append((f / scale.float()[:, None]).round_().clamp_(-127, 127).to(torch.int8))  # f may be `w` itself
            s.append(scale)
        return {"qweight": torch.cat(q), "scales": torch.cat(s)}

    def finish(self) -> None:
        """After the state is assigned: qweight in tiles of 4 rows (kernels.int8_tiles, in the rows' own memory) where
        llava-cli's int8 kernel reads them, in place of the rows, so the 4 rows it reads at once are one stream (a
        decode step 4-11% faster on Zen 4). state_dict() still gives the rows; torch's kernel turns them back into rows
        (plain_qweight)."""
        if self.scales.dtype is torch.bfloat16 and (tiles := kernels.int8_tiles(self.qweight)) is not None:
            self.qweight = tiles  # (the kernel takes bfloat16 models only)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "qweight"] = kernels.int8_plain(destination[prefix + "qweight"])  # as on disk

    def plain_qweight(self) -> torch.Tensor:
        """qweight as (out, in) rows, for torch's kernel, which a batch's decode steps (2-16 rows) run and one-row
        decode (`ask`, `chat`) never does: tiles become rows for good on first use, so the weights are never held
        twice; llava-cli's kernel reads rows too (without the tiles' gain)."""
        if self.qweight.dim() == 4:
            self.qweight = kernels.int8_plain(self.qweight)
        return self.qweight

    def kernel(self, x: torch.Tensor, lead: torch.Size) -> torch.Tensor:
        scales = self.scales.to(x.dtype)
        # One row in bfloat16 (decode): llava-cli's kernel reads the int8 weights ~1.7x faster where it can be built,
        # and so are the few positions of one sequence (lead (1, T): a short chat turn) while the weights are in
        # tiles, a row at a time.
        if ((x.shape[0] == 1 or (self.qweight.dim() == 4 and len(lead) > 1 and lead[-1] == x.shape[0]))
                and (y := self.by_rows(x, lambda row: kernels.int8_mv(self.qweight, scales, row))) is not None):
            return y
        return torch.ops.aten._weight_int8pack_mm(x, self.plain_qweight(), scales)

    def matrix(self) -> tuple:
        """(weight, scales, bias) as kernels.DecodePlan takes them."""
        return self.qweight, self.scales, self.bias

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        q = kernels.int8_plain(self.qweight)  # tiled: a copy, as transient as the dequantized weight
        return q.to(dtype) * self.scales.to(dtype)[:, None]

    def dequantize_into(self, out: torch.Tensor) -> bool:
        return kernels.int8_dequant(self.qweight, self.scales, out)


class Int4Linear(Quantized):
    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, group_size: int):
        super().__init__(in_features, out_features, bias, dtype)
        self.group_size = group_size
        self.register_buffer("qweight", torch.empty(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales_zeros", torch.empty(in_features // group_size, out_features, 2, dtype=dtype))
        self.register_buffer("packed", None, persistent=False)  # torch's CPU kernel's layout (packed_weight)
        self.register_buffer("row_scales", None, persistent=False)  # llava-cli's: scales_zeros (out, groups, 2)

    @staticmethod
    def group_for(in_features: int, out_features: int) -> int | None:
        """The group size for this shape, or None where the kernel cannot take it (outputs not a multiple of 16)."""
        if out_features % 16:
            return None
        return next((g for g in GROUP_SIZES if in_features % g == 0), None)

    def encode(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        dt = self.scales_zeros.dtype
        if dt is torch.bfloat16 and (made := kernels.int4_quantize(w, self.group_size)) is not None:
            return made  # codec.c: these operations' bits in one pass, 20-40x faster
        q, sz = [], []
        for rows in w.split(8192):
            g = rows.float().view(rows.shape[0], -1, self.group_size)  # (rows, groups, group)
            lo, hi = torch.aminmax(g, dim=-1, keepdim=True)
            # As stored (model dtype), so rounding them costs no more than half a step per weight.
            scale = ((hi - lo) / 15).clamp(min=1e-8).to(dt).float()
            zero = (lo + 8 * scale).to(dt).float()  # w = (q - 8) * scale + zero: zero folds in the -8 offset
            qi = (g - zero).div_(scale).add_(8).round_().clamp_(0, 15).to(torch.uint8).view(rows.shape[0], -1)
            q.append(qi[:, 0::2] | (qi[:, 1::2] << 4))
            sz.append(torch.cat([scale, zero], -1).to(dt))  # (rows, groups, 2)
        sz = torch.cat(sz).transpose(0, 1).contiguous()
        return {"qweight": torch.cat(q), "scales_zeros": sz}

    def finish(self) -> None:
        """After the state is assigned: llava-cli's kernel reads a row's scales and zeros together (row_scales).
        torch's packed copy of qweight is built on first use (packed_weight), unless that kernel cannot run here."""
        self.row_scales = self.scales_zeros.transpose(0, 1).contiguous()  # a row's groups together: read in order
        if not kernels.int4_runs(self.qweight, self.row_scales):  # then torch's kernel runs every decode step
            self.packed_weight()

    def packed_weight(self) -> torch.Tensor:
        """qweight in torch's CPU kernel's layout, as many bytes again, built on first use: `ask` and `chat` read
        qweight through llava-cli's kernel and never need it; a batch's decode steps (2-16 rows) do."""
        if self.packed is None:
            # The kernel wants int32 nibbles (4 bytes a weight): convert 4096 rows at a time (a multiple of its 64-row
            # blocks, so the packed chunks concatenate to the whole), not a 600 MB int32 copy of a 152000-row head.
            parts = []
            for rows in self.qweight.split(4096):
                nibbles = torch.stack([rows & 15, rows >> 4], -1).view(rows.shape[0], -1).to(torch.int32)
                parts.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(nibbles, 1))
            self.packed = torch.cat(parts)
        return self.packed

    @staticmethod
    def scale_copies(groups: int) -> int:
        """Copies of a layer's scales and zeros a loaded model holds: scales_zeros, and finish()'s row_scales, which
        is the same tensor where a row is one group (memory estimates count them)."""
        return 2 if groups > 1 else 1

    def kernel(self, x: torch.Tensor, lead: torch.Size) -> torch.Tensor:
        # One row in bfloat16 (decode): llava-cli's kernel, where it can be built: on the 152000-row head ~1.3x
        # torch's packed kernel, and the one kernels.DecodePlan runs inside the decoder layers. So are the few
        # positions of one sequence (lead (1, T): a short chat turn's prefill) while torch's copy is not built, a row
        # at a time: 0.15 s for 10 tokens of the 0.5B model, against 1.2 s to build the copy (+0.23 GB), 0.11 s after.
        if ((x.shape[0] == 1 or (self.packed is None and len(lead) > 1 and lead[-1] == x.shape[0]))
                and (y := self.by_rows(x, lambda r: kernels.int4_mv(self.qweight, self.row_scales, r))) is not None):
            return y
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed_weight(), self.group_size,
                                                          self.scales_zeros.to(x.dtype))

    def matrix(self) -> tuple:
        """(weight, scales, bias) as kernels.DecodePlan takes them."""
        return self.qweight, self.row_scales, self.bias

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        q = torch.stack([self.qweight & 15, self.qweight >> 4], -1).view(self.out_features, -1, self.group_size)
        scale, zero = self.scales_zeros.to(dtype).transpose(0, 1).unbind(-1)  # (out, groups) each
        return ((q.to(dtype) - 8) * scale[..., None] + zero[..., None]).view(self.out_features, self.in_features)

    def dequantize_into(self, out: torch.Tensor) -> bool:
        return self.row_scales is not None and kernels.int4_dequant(self.qweight, self.row_scales, out)
