"""llava-cli's matrix-vector kernels (llava_cli/kernels: bfloat16, int8 and int4 weight-only) against torch, and the
fallbacks.

Tolerance: the kernels, torch.mv and torch's _weight_int8pack_mm all accumulate in float32 and round once to
bfloat16 (int4: the float32 product with the weights dequantized), so against the float32 product of the same
inputs an output is off by its rounding (at most 2^-9 of |y|;
2^-8 allowed) plus the float32 summation-order error (2^-16 of sum |w x|, far above the ~K * 2^-24 it can reach).
Greedy tokens of a model decoding through the kernels must equal those through torch's; logits within 3% of max.
"""

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from llava_cli import kernels
from llava_cli.cli import app
from llava_cli.decoder import Linear, _tensors, rope
from llava_cli.pipeline import Llava
from llava_cli.quant_layers import GROUP_SIZES, Int4Linear
from test_fast_paths import forced_logits, greedy, prompt_ids

_real = {"mv": kernels.mv, "int8_mv": kernels.int8_mv, "int4_mv": kernels.int4_mv}
AVAILABLE = kernels.load() is not None  # built into the user's cache, as the product does
needs_kernel = pytest.mark.skipif(not AVAILABLE, reason=f"kernel unavailable here: {kernels.status()}")
SHAPES = [(1, 1), (5, 33), (37, 100), (1001, 1000), (4099, 31), (3, 4096), (8192, 64)]  # odd rows, odd inputs
INT4_SHAPES = [(1, 64), (5, 128), (37, 192), (1001, 1024), (4099, 64), (3, 4096), (48, 2240), (8192, 128)]
# groups of 64 and 128 inputs, 1 to 35 of them a row (35: a vector of 16 zeros twice, then 3)


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty cache dir and a kernel not yet loaded; the loaded one comes back after the test."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setattr(kernels, "_status", kernels.NOT_LOADED)
    monkeypatch.setattr(kernels.DecodePlan, "outcome", "")
    return tmp_path / "llava-cli" / "kernels"


def within_bf16_rounding(y: torch.Tensor, w: torch.Tensor, x: torch.Tensor, scales: torch.Tensor | None = None,
                         x_step: torch.Tensor | None = None):
    """x_step: per input, the step x is rounded to first (the int8 kernel's 16-bit x); each input off by half of it."""
    s = torch.ones(w.shape[0]) if scales is None else scales.float()
    ref = (w.float() @ x.float()) * s
    tol = 2**-8 * ref.abs() + 2**-16 * (w.float().abs() @ x.float().abs()) * s
    if x_step is not None:
        tol += (w.float().abs() @ (x_step / 2)) * s
    assert y.dtype == torch.bfloat16 and y.shape == ref.shape
    assert ((y.float() - ref).abs() <= tol).all(), (y.float() - ref).abs().max()


def int8_x_step(x: torch.Tensor, block: int = 256) -> torch.Tensor:
    """The step the int8 kernel rounds each input to: per block of 256, 2^-14 of the power of 2 at or below the
    block's largest |x| (so its integers stay below 2^15); exact (no rounding) for inputs within 2^7 of that."""
    top = x.float().abs().view(-1).split(block)
    return torch.cat([torch.full((len(b),), 2.0 ** (torch.frexp(b.max())[1].item() - 1 - 14)) for b in top])


def unaligned(t: torch.Tensor) -> torch.Tensor:
    """A copy starting one element into its buffer: memory-mapped safetensors are only 2-byte aligned."""
    return torch.empty(t.numel() + 1, dtype=t.dtype)[1:].view(t.shape).copy_(t)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("rows,cols", SHAPES)
def test_bfloat16_kernel_matches_float32_within_bfloat16_rounding(rows, cols, threads, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)  # what the kernel is told, torch itself unchanged
    torch.manual_seed(rows * cols)
    w, x = torch.randn(rows, cols, dtype=torch.bfloat16), torch.randn(cols, dtype=torch.bfloat16)
    within_bf16_rounding(kernels.mv(w, x), w, x)
    within_bf16_rounding(torch.mv(w, x), w, x)  # the same bound holds for the path it replaces
    assert torch.equal(kernels.mv(unaligned(w), unaligned(x)), kernels.mv(w, x))


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("rows,cols", SHAPES)
def test_int8_kernel_matches_float32_within_bfloat16_rounding(rows, cols, threads, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    torch.manual_seed(rows * cols)
    q = torch.randint(-127, 128, (rows, cols), dtype=torch.int8)
    s, x = (torch.rand(rows) * 0.01 + 1e-4).bfloat16(), torch.randn(cols, dtype=torch.bfloat16)
    within_bf16_rounding(kernels.int8_mv(q, s, x), q, x, s, int8_x_step(x))
    assert torch.equal(kernels.int8_mv(unaligned(q), unaligned(s), unaligned(x)), kernels.int8_mv(q, s, x))
    if cols % 16 == 0:  # torch's kernel reads garbage or crashes on inputs that are not a multiple of 16 (2.13)
        within_bf16_rounding(torch.ops.aten._weight_int8pack_mm(x[None], q, s)[0], q, x, s)


TILED_SHAPES = [(4, 32), (8, 64), (1000, 1024), (4100, 96), (12, 4864), (8192, 64)]  # rows in 4s, inputs in 32s


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("rows,cols", TILED_SHAPES)
def test_int8_weights_in_tiles_give_the_bits_of_their_rows(rows, cols, threads, monkeypatch):
    """Tiles (kernels.int8_tiles: 4 rows' inputs in pieces of 32, the 4 pieces in turn) are only a layout: the
    kernel reads them to the same bits as the rows, with any thread split."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    torch.manual_seed(rows + cols)
    q = torch.randint(-127, 128, (rows, cols), dtype=torch.int8)
    s, x = (torch.rand(rows) * 0.01 + 1e-4).bfloat16(), torch.randn(cols, dtype=torch.bfloat16)
    tiles = kernels.int8_tiles(q.clone())
    assert tiles.shape == (rows // 4, cols // 32, 4, 32) and kernels.int8_shape(tiles) == (rows, cols)
    r, c = rows - 3, cols // 32 - 1  # row r's last piece of 32: tile r // 4, piece c, place r % 4
    assert torch.equal(tiles[r // 4, c, r % 4], q[r, 32 * c:])
    assert torch.equal(kernels.int8_plain(tiles), q) and kernels.int8_plain(q) is q
    assert torch.equal(kernels.int8_mv(tiles, s, x), kernels.int8_mv(q, s, x))


def test_int8_tiles_take_the_rows_bytes_in_place():
    """Tiles are made in the rows' own memory, a few thousand rows at a time: the matrix is never held twice."""
    q = torch.randint(-127, 128, (8200, 64), dtype=torch.int8)  # more rows than one pass takes
    rows = q.clone()
    tiles = kernels.int8_tiles(q)
    if tiles is None:
        pytest.skip("no int8 kernel here")
    assert tiles.data_ptr() == q.data_ptr() and torch.equal(kernels.int8_plain(tiles), rows)


def test_int8_weights_that_do_not_tile_stay_rows():
    for q in (torch.zeros(6, 32, dtype=torch.int8), torch.zeros(8, 48, dtype=torch.int8),  # rows, inputs
              torch.zeros(8, 64, dtype=torch.int8)[:, ::2], torch.zeros(8, 32, dtype=torch.uint8), torch.zeros(32)):
        assert kernels.int8_tiles(q) is None


def int4_layer(rows: int, cols: int, seed: int = 0) -> Int4Linear:
    """An Int4Linear of random weights, encoded and finished as at load (rows a multiple of 16: torch's packing)."""
    torch.manual_seed(seed)
    group = next(g for g in GROUP_SIZES if cols % g == 0)  # as group_for, which also needs rows in sixteens
    lin = Int4Linear(cols, rows, False, torch.bfloat16, group)
    for name, t in lin.encode(torch.randn(rows, cols, dtype=torch.bfloat16)).items():
        setattr(lin, name, t)
    if rows % 16 == 0:
        lin.finish()
    else:  # torch's layout takes rows in sixteens; the kernel reads qweight and row_scales only
        lin.row_scales = lin.scales_zeros.transpose(0, 1).contiguous()
    return lin


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("rows,cols", INT4_SHAPES)
def test_int4_kernel_matches_float32_within_bfloat16_rounding(rows, cols, threads, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    lin, x = int4_layer(rows, cols, rows * cols), torch.randn(cols, dtype=torch.bfloat16)
    w = lin.dequantize(torch.float32)  # exact: (q - 8) * scale + zero of bfloat16 scale and zero
    y = kernels.int4_mv(lin.qweight, lin.row_scales, x)
    within_bf16_rounding(y, w, x)
    assert torch.equal(kernels.int4_mv(unaligned(lin.qweight), unaligned(lin.row_scales), unaligned(x)), y)
    if rows % 16 == 0:  # the path it replaces holds to the same bound
        within_bf16_rounding(lin.kernel(x[None].repeat(2, 1), torch.Size([2]))[0], w, x)  # torch's packed kernel


@needs_kernel
def test_int4_shapes_the_kernel_cannot_take_are_declined():
    lin, x = int4_layer(32, 96), torch.randn(96, dtype=torch.bfloat16)  # groups of 32 inputs
    assert kernels.int4_mv(lin.qweight, lin.row_scales, x) is None
    lin, x = int4_layer(32, 128), torch.randn(128, dtype=torch.bfloat16)
    assert kernels.int4_mv(lin.qweight, lin.row_scales, x[:64]) is None  # x too short
    assert kernels.int4_mv(lin.qweight, lin.row_scales[:-1], x) is None  # scales of too few rows
    assert kernels.int4_mv(lin.qweight, lin.scales_zeros, x) is None  # torch's layout (groups, out, 2)
    assert kernels.int4_mv(lin.qweight, lin.row_scales.float(), x) is None
    wide = torch.zeros(16, (kernels.INT4_MAX_K + 128) // 2, dtype=torch.uint8)
    scales = torch.zeros(16, wide.shape[1] * 2 // 128, 2, dtype=torch.bfloat16)
    assert kernels.int4_mv(wide, scales, torch.zeros(wide.shape[1] * 2, dtype=torch.bfloat16)) is None
    assert kernels.int4_mv(lin.qweight, lin.row_scales, x) is not None


@needs_kernel
def test_int8_kernel_rounds_x_only_where_an_input_is_far_below_its_block_s_largest():
    """Inputs within 2^7 of their block's largest are exact in 16 bits: the result is then the float32 product's.
    An outlier 2^12 above the rest costs those 5 bits, within the stated step; NaN and infinity make NaN, as torch."""
    torch.manual_seed(0)
    q, s = torch.randint(-127, 128, (64, 1024), dtype=torch.int8), torch.full((64,), 0.01, dtype=torch.bfloat16)
    x = (torch.rand(1024) + 1).bfloat16() * torch.where(torch.rand(1024) < 0.5, -1, 1)  # |x| in [1, 2]: exact
    assert int8_x_step(x).max() <= 2**-13 and not (x.float() / int8_x_step(x)).frac().any()
    within_bf16_rounding(kernels.int8_mv(q, s, x), q, x, s)
    x[300] = 4096.0  # block 1 (256..511) now rounds its other inputs to steps of 2^-2
    step = int8_x_step(x)
    assert step[300] == 2**-2 and step[0] <= 2**-13
    y = kernels.int8_mv(q, s, x)
    within_bf16_rounding(y, q, x, s, step)
    with pytest.raises(AssertionError):  # the rounding is there: the bound without it does not hold
        within_bf16_rounding(kernels.int8_mv(q, s, x * torch.where(torch.arange(1024) == 300, 1, 2**-5).bfloat16()),
                             q, x * torch.where(torch.arange(1024) == 300, 1, 2**-5).bfloat16(), s)
    for bad in (float("nan"), float("inf")):
        x[700] = bad
        assert kernels.int8_mv(q, s, x).isnan().all()


@needs_kernel
@pytest.mark.parametrize("bias", [False, True])
def test_one_row_bfloat16_linear_runs_the_kernel_and_the_rest_do_not(bias, monkeypatch):
    torch.manual_seed(0)
    lin = Linear(100, 37, bias=bias).to(torch.bfloat16)
    x = torch.randn(1, 1, 100, dtype=torch.bfloat16)
    expect = kernels.mv(lin.weight.detach(), x[0, 0])
    expect = expect + lin.bias if bias else expect
    calls = []
    monkeypatch.setattr(kernels, "mv", lambda w, v: calls.append(tuple(w.shape)) or _real["mv"](w, v))
    with torch.inference_mode():
        assert torch.equal(lin(x)[0, 0], expect) and calls == [(37, 100)]
        lin(torch.randn(3, 100, dtype=torch.bfloat16))  # several rows (prefill, vision): F.linear
        Linear(100, 37)(x.float())  # float32: F.linear
        non_contiguous = Linear(37, 100, bias=False).to(torch.bfloat16)
        non_contiguous.weight.data = lin.weight.data.t()
        got = non_contiguous(torch.randn(1, 37, dtype=torch.bfloat16))  # kernels.mv declines, torch.mv runs
    assert len(calls) == 2 and got.shape == (1, 100)


@needs_kernel
@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_greedy_decode_through_the_kernels_equals_torch(tiny, quantize, monkeypatch):
    llava = Llava.load(tiny("qwen", dtype=torch.bfloat16).folder, dtype="bfloat16", device="cpu", threads=1,
                       quantize=quantize)
    ids = prompt_ids(llava)
    ran, declined = {name: [] for name in _real}, []

    def spy(name):
        def call(*args):
            y = _real[name](*args)
            w = args[0]  # int8 weights come in tiles (kernels.int8_tiles): their (out, in)
            (ran[name] if y is not None else declined).append(kernels.int8_shape(w) if w.dim() == 4 else tuple(w.shape))
            return y
        return call

    for name in _real:
        monkeypatch.setattr(kernels, name, spy(name))
    fast_tokens = greedy(llava.model, ids)
    fast = forced_logits(llava.model, ids, fast_tokens)
    lm = llava.model.language_model
    rows, cols = lm.model.embed_tokens.weight.shape  # tied; quantized as its own copy
    used = f"{quantize}_mv" if quantize else "mv"
    assert (rows, cols // 2 if quantize == "int4" else cols) in ran[used] and not declined  # every Linear, the head
    assert [name for name in ran if ran[name]] == [used]
    for name in _real:
        monkeypatch.setattr(kernels, name, lambda *args: None)  # as with LLAVA_NO_KERNEL=1
    plain = forced_logits(llava.model, ids, fast_tokens)
    assert len(set(fast_tokens)) > 1, "a degenerate random model proves little"
    assert fast_tokens == greedy(llava.model, ids)
    torch.testing.assert_close(fast, plain, rtol=0, atol=0.03 * plain.abs().max().item())


def _broken_cache(cache: Path) -> dict:
    cache.parent.parent.mkdir(parents=True, exist_ok=True)
    cache.parent.write_text("a file where the cache directory should be")
    return {}


@pytest.mark.parametrize("env,why", [
    ({"LLAVA_NO_KERNEL": "1"}, "LLAVA_NO_KERNEL is set"),
    ({"CC": "/nonexistent/cc"}, "no C compiler: /nonexistent/cc not found, set CC"),
    ({"CC": "cc -include /nonexistent/header.h"}, "the kernel did not build with cc: "),
    (_broken_cache, "cannot write the kernel cache"),
    ({"CC": '"cc'}, "the kernel could not be set up: ValueError"),  # an unbalanced quote in $CC
])
def test_without_the_kernel_torch_mv_runs_silently(fresh, env, why, monkeypatch, capfd):
    if not kernels._cpu_has(kernels.CPU_FLAGS) and "LLAVA_NO_KERNEL" not in env:
        pytest.skip("the CPU has no AVX512-BF16: the build is never tried")
    for k, v in (env(fresh) if callable(env) else env).items():
        monkeypatch.setenv(k, v)
    torch.manual_seed(0)
    lin = Linear(64, 48, bias=False).to(torch.bfloat16)
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(lin(x)[0], torch.mv(lin.weight, x[0]))
        assert kernels.int8_mv(torch.ones(48, 64, dtype=torch.int8), torch.ones(48, dtype=torch.bfloat16), x[0]) is None
    assert kernels.status().startswith("matrix-vector: torch (") and why in kernels.status()
    assert capfd.readouterr() == ("", "")
    assert not fresh.is_dir() or list(fresh.iterdir()) == []  # no half-built library left behind


@needs_kernel
@pytest.mark.parametrize("tamper,why", [
    (lambda so: so.parent.chmod(0o775), "is writable by other users"),
    (lambda so: so.chmod(0o666), "is writable by other users"),
    (lambda so: os.chown(so, 12345, -1), "belongs to another user"),
])
def test_a_cached_library_others_could_have_written_is_not_loaded(fresh, tamper, why):
    """Loading a library runs its code: one in a cache another user can write to is refused, and torch runs."""
    assert kernels.load() is not None, kernels.status()
    (so,) = fresh.glob("mv-*.so")
    if os.geteuid() != 0 and "another user" in why:
        pytest.skip("only root can give a file to another user")
    tamper(so)
    kernels._tried = False
    assert kernels.load() is None and why in kernels.status() and str(so) in kernels.status()
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    lin = Linear(64, 48, bias=False).to(torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(lin(x)[0], torch.mv(lin.weight, x[0]))


@needs_kernel
def test_tensors_of_the_wrong_shape_are_declined_not_read_out_of_bounds():
    w, q = torch.randn(48, 64, dtype=torch.bfloat16), torch.ones(48, 64, dtype=torch.int8)
    for x in (torch.randn(63, dtype=torch.bfloat16), torch.randn(1, 64, dtype=torch.bfloat16)):
        assert kernels.mv(w, x) is None and kernels.int8_mv(q, torch.ones(48, dtype=torch.bfloat16), x) is None
    assert kernels.int8_mv(q, torch.ones(47, dtype=torch.bfloat16), torch.randn(64, dtype=torch.bfloat16)) is None
    assert kernels.mv(w[None], torch.randn(64, dtype=torch.bfloat16)) is None


@needs_kernel
def test_two_processes_building_into_one_empty_cache_both_load_it(tmp_path):
    start = time.time() + 4  # both import torch first, then build at the same moment
    code = textwrap.dedent(f"""
        import time, torch
        from llava_cli import kernels
        time.sleep(max(0, {start} - time.time()))
        assert kernels.load() is not None, kernels.status()
        w, x = torch.ones(300, 70, dtype=torch.bfloat16), torch.ones(70, dtype=torch.bfloat16)
        assert kernels.mv(w, x).eq(70).all()
    """)
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert results == [(0, ""), (0, "")]
    assert [p.suffix for p in (tmp_path / "llava-cli" / "kernels").iterdir()] == [".so"]  # one library, no temp files


@needs_kernel
def test_the_kernel_runs_on_torch_s_openmp_threads():
    """No second OpenMP runtime or thread pool: the library links the libgomp torch has mapped."""
    def runtimes() -> set[str]:
        return {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines()
                if os.path.basename(line.split()[-1]).startswith(("libgomp", "libiomp5"))}

    w, x = torch.randn(4096, 1024, dtype=torch.bfloat16), torch.randn(1024, dtype=torch.bfloat16)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.mv(w, x)  # torch's pool is up at 2 threads
        before = len(os.listdir("/proc/self/task"))
        for _ in range(3):
            kernels.mv(w, x)
        assert len(os.listdir("/proc/self/task")) == before and len(runtimes()) == 1
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("env,line", [
    ({}, "matrix-vector: llava-cli's AVX512-BF16 kernel (" if AVAILABLE else "matrix-vector: torch ("),
    ({"LLAVA_NO_KERNEL": "1"}, "matrix-vector: torch (LLAVA_NO_KERNEL is set)"),
])
def test_ask_verbose_names_the_matrix_vector_path(tiny, runner, fresh, env, line, monkeypatch):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    folder = str(tiny("qwen", dtype=torch.bfloat16).folder)
    quiet = runner.invoke(app, ["ask", "-m", folder, "--dtype", "bfloat16", "--max-tokens", "3", "hi"])
    assert quiet.exit_code == 0 and quiet.stderr == ""
    monkeypatch.setattr(kernels, "_tried", False)
    r = runner.invoke(app, ["ask", "-m", folder, "--dtype", "bfloat16", "--max-tokens", "3", "-v", "hi"])
    assert r.exit_code == 0 and r.stderr.splitlines()[-1].startswith(line), r.stderr


# ------------------------------------------------------------------------- one-token decode: every layer in one call
# DecodePlan runs mv.c's decode_layers, which rounds to bfloat16 wherever torch's operations do; it differs from them
# in the float32 summation order (RMSNorm, attention) and in keeping attention probabilities in float32. Bounds:
# the first layer's new cache rows bit for bit (norm, q/k/v, bias and RoPE are then the same), logits within 3% of
# max |logit|, greedy tokens equal up to a near-tie (where torch's two candidates are within that tolerance: random
# tiny models have them, one bfloat16 step apart), and the kernel no further from float32 than torch's bfloat16 is.

def _plain(monkeypatch) -> None:
    monkeypatch.setattr(kernels.DecodePlan, "build", classmethod(lambda cls, *args: None))


def _one_token_runs(monkeypatch) -> list[bool]:
    runs, real = [], kernels.DecodePlan.run

    def spy(self, *args):
        runs.append(real(self, *args))
        return runs[-1]

    monkeypatch.setattr(kernels.DecodePlan, "run", spy)
    return runs


@needs_kernel
@pytest.mark.parametrize("family,quantize,threads", [("qwen", None, 2), ("llava", None, 3), ("qwen", "int8", 2),
                                                     ("llava", "int8", 1), ("qwen", "int4", 3), ("llava", "int4", 2)])
def test_one_token_kernel_decodes_every_layer_as_torch_does(tiny, family, quantize, threads, monkeypatch):
    llava = Llava.load(tiny(family, dtype=torch.bfloat16, heads=(2, 1)).folder, dtype="bfloat16", device="cpu",
                       threads=threads, quantize=quantize)
    ids = prompt_ids(llava)
    runs = _one_token_runs(monkeypatch)
    fast_tokens = greedy(llava.model, ids)
    fast = forced_logits(llava.model, ids, fast_tokens)
    first_rows = llava.model.cache.k[0, :, :, len(ids)].clone(), llava.model.cache.v[0, :, :, len(ids)].clone()
    assert runs and all(runs), "every one-token step runs the kernel"
    _plain(monkeypatch)
    runs.clear()
    plain = forced_logits(llava.model, ids, fast_tokens)
    assert not runs
    assert len(set(fast_tokens)) > 1, "a degenerate random model proves little"
    atol = 0.03 * plain.abs().max().item()
    torch.testing.assert_close(fast, plain, rtol=0, atol=atol)
    for i, (ours, theirs) in enumerate(zip(fast_tokens, greedy(llava.model, ids), strict=True)):
        if ours != theirs:  # the same tokens before i: plain[i] is torch's logits in the same context
            assert plain[i, theirs] - plain[i, ours] <= atol, f"step {i}: {ours} where torch picks {theirs}"
            break
    assert torch.equal(first_rows[0], llava.model.cache.k[0, :, :, len(ids)])
    assert torch.equal(first_rows[1], llava.model.cache.v[0, :, :, len(ids)])


@pytest.mark.parametrize("head_dim,theta", [(64, 1e6), (128, 1e4), (32, 5e5)])
def test_the_decode_rope_table_has_the_bits_of_rope_at_each_position(head_dim, theta):
    """The one-token kernel looks RoPE's values up in a table made for all of the cache's positions at once."""
    cos, sin = rope(torch.arange(20000)[None], head_dim, theta, torch.bfloat16)
    for p in [*range(0, 20000, 97), 19999]:
        one = rope(torch.tensor([[p]]), head_dim, theta, torch.bfloat16)
        assert torch.equal(one[0][0, 0, 0], cos[0, 0, p]) and torch.equal(one[1][0, 0, 0], sin[0, 0, p]), p


@needs_kernel
@pytest.mark.parametrize("vocab", [1, 15, 16, 17, 1000, 152000])
def test_argmax_kernel_gives_torch_s_indices(vocab):
    kernels._library()  # argmax uses the library only where it is loaded already
    gen = torch.Generator().manual_seed(vocab)
    x = torch.randn(8, vocab, generator=gen)
    x[1] = x[1].round()  # many equal values: the first of the maxima
    x[2, -1] = x[2, 0] = x[2].max() + 1  # equal maxima at both ends
    x[3] = float("-inf")
    x[4, vocab // 2] = float("nan")  # the first NaN, as torch
    x[4, -1] = float("nan")
    x[5, vocab // 3] = float("inf")
    x[6] = 0.0
    x[7, ::7] = x[7].max() + 2  # maxima in several lanes
    assert torch.equal(kernels.argmax(x), x.argmax(-1))
    if vocab > 1:  # rows that are not contiguous
        assert torch.equal(kernels.argmax(x[:, :-1]), x[:, :-1].argmax(-1))


def test_argmax_kernel_declines_what_it_does_not_take():
    assert kernels.argmax(torch.zeros(2, 3, 4)) is None
    assert kernels.argmax(torch.zeros(2, 5, dtype=torch.bfloat16)) is None
    assert kernels.argmax(torch.zeros(2, 0)) is None


@needs_kernel
def test_the_rope_table_is_made_once_for_a_cache_its_answers_reuse(tiny):
    llava = Llava.load(tiny("qwen", dtype=torch.bfloat16, heads=(2, 1)).folder, dtype="bfloat16", device="cpu")
    lm, ids = llava.model.language_model.model, prompt_ids(llava)
    first = greedy(llava.model, ids, n=4)
    table = lm._rope
    assert table is not None and table[0].shape[2] >= len(ids) + 4
    assert greedy(llava.model, ids, n=4) == first and lm._rope is table  # the same cache: the same table
    greedy(llava.model, ids, n=table[0].shape[2])  # a longer cache: a longer table
    assert lm._rope[0].shape[2] > table[0].shape[2]


@needs_kernel
def test_one_token_kernel_is_as_close_to_float32_as_torch_bfloat16_over_a_long_cache(tiny, monkeypatch):
    """300 cached positions (attention in blocks of 16 and a tail), 24 steps, against the float32 model."""
    t = tiny("qwen", dtype=torch.bfloat16, heads=(2, 1))
    ids = torch.randint(3, 200, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    tokens = torch.randint(3, 200, (24,), generator=torch.Generator().manual_seed(1)).tolist()
    reference = forced_logits(Llava.load(t.folder, dtype="float32", device="cpu").model, ids, tokens)[1:]
    model = Llava.load(t.folder, dtype="bfloat16", device="cpu", threads=2).model
    runs = _one_token_runs(monkeypatch)
    fast = forced_logits(model, ids, tokens)[1:]
    assert len(runs) == len(tokens) and all(runs)
    _plain(monkeypatch)
    plain = forced_logits(model, ids, tokens)[1:]

    def error(x):
        return ((x - reference).norm() / reference.norm()).item()

    assert error(fast) <= 1.25 * error(plain) + 1e-3, (error(fast), error(plain))
    torch.testing.assert_close(fast, plain, rtol=0, atol=0.03 * plain.abs().max().item())


def test_a_float32_model_never_builds_the_kernel(tiny, fresh):
    """Nothing of a float32 run can use the library: it is not compiled, and -v says torch's paths ran."""
    llava = Llava.load(tiny("qwen", heads=(2, 1)).folder, dtype="float32", device="cpu")
    greedy(llava.model, prompt_ids(llava), n=2)
    assert not kernels._tried and not fresh.exists()
    assert kernels.status().startswith("matrix-vector: torch (") and "decode layers: torch operations" in kernels.status()


@needs_kernel
def test_one_token_kernel_declines_what_it_does_not_take(tiny, monkeypatch):
    runs = _one_token_runs(monkeypatch)
    for folder, dtype, quantize, why in [
            (tiny("qwen", dtype=torch.bfloat16).folder, "bfloat16", None, "head size 16: it takes multiples of 32"),
            (tiny("qwen", heads=(2, 1)).folder, "float32", None, "a float32 model on cpu: it takes bfloat16"),
            (tiny("qwen", heads=(2, 1)).folder, "float32", "int4", "a float32 model on cpu")]:
        llava = Llava.load(folder, dtype=dtype, device="cpu", threads=2, quantize=quantize)
        greedy(llava.model, prompt_ids(llava), n=3)
        assert llava.model.language_model.model._plan[1] is None
        assert f"; decode layers: torch operations ({why}" in kernels.status()  # what `llava ask -v` prints
    assert not runs
    # shapes that do not fit each other are declined before any pointer is passed
    llava = Llava.load(tiny("qwen", dtype=torch.bfloat16, heads=(2, 1)).folder, dtype="bfloat16", device="cpu")
    lm, cache = llava.model.language_model.model, llava.model.setup_cache(1, 8)
    layers = [_tensors(layer) for layer in lm.layers]
    build = kernels.DecodePlan.build
    plan = build(layers, cache.k, cache.v, 2, 1e-6)
    assert plan is not None
    assert build(layers[:1], cache.k, cache.v, 2, 1e-6) is None  # fewer layers than the cache has
    assert build(layers, cache.k, cache.v, 4, 1e-6) is None  # a head count that does not fit the weights
    bad = [list(layer) for layer in layers]
    bad[1][6] = (bad[1][6][0][:-1], None, None)  # one gate row short
    assert build(bad, cache.k, cache.v, 2, 1e-6) is None
    assert kernels.status().endswith("(layer 1's gate_proj (bfloat16) does not fit)")
    assert build(layers, cache.k, cache.v, 2, 1e-6) is not None
    assert kernels.status().endswith("; decode layers: llava-cli's kernel, every layer in one call")
    x, rot = torch.zeros(64, dtype=torch.bfloat16), torch.zeros(32, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert not plan.run(x, rot, rot, 8)  # past the cache's end
        assert not plan.run(x[:32], rot, rot, 0)
        assert plan.run(x, rot, rot, 7)
