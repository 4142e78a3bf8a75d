"""llava-cli's quantizing and dequantizing kernels (kernels/codec.c) against quant_layers' torch operations, which
they replace where they run: quantizing at load (encode), int8 tiles, and dequantizing for a quantized layer's
product of many rows (a prefill) before oneDNN's bfloat16 matmul. The same bits, for int8 rows and tiles and int4
groups of 32, 64 and 128, weights read from bfloat16, float16 and float32, with any thread split: tolerance 0
throughout (NaN where torch gives NaN)."""

import pytest
import torch

from llava_cli import kernels, quant_layers
from llava_cli.quant_layers import KERNEL_ROWS, Int4Linear, Int8Linear

needs_kernel = pytest.mark.skipif(kernels.load() is None, reason=f"kernel unavailable here: {kernels.status()}")


def weights(rows: int, cols: int, seed: int, finite: bool = False) -> torch.Tensor:
    """Rows of scales from 1e-6 to 10, a zero row, a row of one value, one below the scales' floor (1e-8) and, unless
    finite, an infinity: every rounding case."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.logspace(-6, 1, rows)[:, None]
    w[0] = 0
    if rows > 3:
        w[1] = 0.3
        w[2] *= 1e-6
        if not finite:
            w[3, -1] = float("inf")
    return w


def layer(cls, rows: int, cols: int, group: int | None = None, seed: int = 0):
    m = cls(cols, rows, False, torch.bfloat16, *((group,) if group else ()))
    for k, v in m.encode(weights(rows, cols, seed)).items():
        setattr(m, k, v)
    m.finish()
    return m


def torch_encode(m, w: torch.Tensor, monkeypatch) -> dict[str, torch.Tensor]:
    """m.encode(w) through torch's operations, as where the kernel cannot run."""
    with monkeypatch.context() as patch:
        patch.setattr(kernels, "int8_quantize", lambda *a: None)
        patch.setattr(kernels, "int4_quantize", lambda *a: None)
        return m.encode(w)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("rows,cols", [(1, 1), (5, 33), (37, 100), (130, 4096), (4099, 31), (1000, 1024)])
def test_int8_quantized_by_the_kernel_has_torch_s_bits(rows, cols, threads, dtype, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    m, w = Int8Linear(cols, rows, False, torch.bfloat16), weights(rows, cols, rows, finite=True).to(dtype)
    got, want = kernels.int8_quantize(w), torch_encode(m, w, monkeypatch)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert all(torch.equal(v, want[k]) for k, v in m.encode(w).items())  # encode runs the kernel


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("rows,cols,group", [(16, 32, 32), (48, 64, 64), (32, 192, 64), (144, 4096, 128),
                                             (80, 96, 32), (1008, 1024, 128), (16, 11008, 64)])
def test_int4_quantized_by_the_kernel_has_torch_s_bits(rows, cols, group, threads, dtype, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    m = Int4Linear(cols, rows, False, torch.bfloat16, group)
    w = weights(rows, cols, rows, finite=True).to(dtype)
    got, want = kernels.int4_quantize(w, group), torch_encode(m, w, monkeypatch)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert all(torch.equal(v, want[k]) for k, v in m.encode(w).items())


def test_weights_the_quantizing_kernels_cannot_read_go_to_torch():
    w = torch.randn(16, 64)
    for bad in (w.t(), w.double(), w[None], w.to(torch.int8)):
        assert kernels.int8_quantize(bad) is None and kernels.int4_quantize(bad, 32) is None
    assert kernels.int4_quantize(w, 48) is None and kernels.int4_quantize(torch.randn(16, 96), 64) is None


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("rows,cols", [(1, 1), (5, 33), (37, 100), (130, 4096), (4099, 31), (8, 64), (1000, 1024)])
def test_int8_dequantized_by_the_kernel_has_torch_s_bits(rows, cols, threads, monkeypatch):
    """Rows and, where the kernel reads them so (rows in 4s, inputs in 32s), tiles."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    m = layer(Int8Linear, rows, cols)
    assert (m.qweight.dim() == 4) == (rows % 4 == 0 and cols % 32 == 0)
    out = torch.full((rows, cols), float("nan"), dtype=torch.bfloat16)
    assert kernels.int8_dequant(m.qweight, m.scales, out)
    torch.testing.assert_close(out, m.dequantize(torch.bfloat16), rtol=0, atol=0, equal_nan=True)
    plain = kernels.int8_plain(m.qweight)  # the same weights as rows
    if plain is not m.qweight:
        again = torch.empty_like(out)
        assert kernels.int8_dequant(plain.contiguous(), m.scales, again)
        torch.testing.assert_close(again, out, rtol=0, atol=0, equal_nan=True)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("rows,cols,group", [(16, 32, 32), (48, 64, 64), (32, 192, 64), (144, 4096, 128),
                                             (80, 96, 32), (1008, 1024, 128), (16, 11008, 64)])  # rows in 16s
def test_int4_dequantized_by_the_kernel_has_torch_s_bits(rows, cols, group, threads, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    m = layer(Int4Linear, rows, cols, group)
    out = torch.full((rows, cols), float("nan"), dtype=torch.bfloat16)
    assert kernels.int4_dequant(m.qweight, m.row_scales, out)
    torch.testing.assert_close(out, m.dequantize(torch.bfloat16), rtol=0, atol=0, equal_nan=True)


def test_what_the_dequantizing_kernels_cannot_take_is_declined_and_left_untouched():
    m8, m4 = layer(Int8Linear, 16, 64), layer(Int4Linear, 16, 64, 32)
    out = torch.zeros(16, 64, dtype=torch.bfloat16)
    for args in [(m8.qweight, m8.scales, torch.zeros(8, 64)),  # float32 out
                 (m8.qweight, m8.scales, torch.zeros(16, 32, dtype=torch.bfloat16)),  # wrong shape
                 (m8.qweight, m8.scales, torch.zeros(64, 16, dtype=torch.bfloat16).t()),  # not contiguous
                 (m8.qweight, m8.scales.float(), out),
                 (m8.qweight.float(), m8.scales, out)]:
        assert not kernels.int8_dequant(*args)
    for args in [(m4.qweight, m4.row_scales, torch.zeros(8, 64)),
                 (m4.qweight, m4.row_scales[:, :1], out),  # a group of 64 inputs for 32 scales' worth
                 (m4.qweight, m4.row_scales.float(), out),
                 (m4.qweight[:, :16], m4.row_scales, out),
                 (m4.qweight, torch.zeros(16, 3, 2, dtype=torch.bfloat16), out)]:  # 64 inputs in 3 groups
        assert not kernels.int4_dequant(*args)
    assert not out.any()


@needs_kernel
@pytest.mark.parametrize("cls,group", [(Int8Linear, None), (Int4Linear, 64)])
def test_a_prefill_s_product_is_the_matmul_of_torch_s_dequantized_weights(cls, group, monkeypatch):
    """More rows than KERNEL_ROWS go through the kernel's dequantization into the reused buffer: the bits of F.linear
    on torch's dequantize(), whichever layer (larger or smaller) used the buffer last."""
    monkeypatch.setattr(quant_layers, "_scratch", type(quant_layers._scratch)())  # this test's own buffer
    layers = [layer(cls, 256, 128, group, seed=1), layer(cls, 64, 256, group, seed=2), layer(cls, 512, 64, group, 3)]
    x = {m.in_features: torch.randn(1, KERNEL_ROWS + 5, m.in_features).bfloat16() for m in layers}
    for m in layers + layers[::-1]:
        want = torch.nn.functional.linear(x[m.in_features][0], m.dequantize(torch.bfloat16))
        torch.testing.assert_close(m(x[m.in_features])[0], want, rtol=0, atol=0, equal_nan=True)
    assert quant_layers._scratch.buf.numel() == 512 * 64  # the largest, once


def test_where_the_kernel_does_not_run_a_prefill_s_product_holds_no_buffer(monkeypatch):
    monkeypatch.setattr(quant_layers, "_scratch", type(quant_layers._scratch)())
    monkeypatch.setattr(kernels, "codec_runs", lambda: False)
    m = layer(Int8Linear, 64, 128)
    x = torch.randn(KERNEL_ROWS + 1, 128).bfloat16()
    want = torch.nn.functional.linear(x, m.dequantize(torch.bfloat16))
    torch.testing.assert_close(m(x), want, rtol=0, atol=0, equal_nan=True)
    assert getattr(quant_layers._scratch, "buf", None) is None
