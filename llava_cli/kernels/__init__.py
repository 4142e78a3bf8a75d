"""llava-cli's own CPU kernels, compiled on first use with the system C compiler and called through ctypes.

mv.c holds the matrix-vector products of one-token decode on AVX512-BF16 (and VNNI) CPUs: bfloat16 (decoder.Linear,
the lm_head included), ~1.25x faster than torch.mv, int8 weight-only (quant_layers.Int8Linear, read in tiles of 4 rows:
tiles.py), ~2x faster than torch's _weight_int8pack_mm, and int4 weight-only (quant_layers.Int4Linear, group-wise scales
and zeros). DecodePlan (plan.py) runs every decoder layer of a one-token step (norms, q/k/v, RoPE, the cache write,
attention, MLP, residuals) in one call and one parallel region, with those matrix-vector products inside; argmax()
(argmax.py) takes greedy decoding's token from the logits. attn.c holds attention over a whole sequence (attention():
the vision tower, a prompt's prefill), 4-7x faster than torch's flash attention where vdpbf16ps runs at an FMA's rate;
codec.c quantizes weights at load and turns them back into bfloat16 for a prefill's matmuls (codec.py), in one pass.
mv(), int8_mv() and int4_mv() return None, DecodePlan.build() None and run() False, wherever the kernel cannot run (no
AVX512-BF16, no C compiler, a failed build, an unwritable cache, LLAVA_NO_KERNEL=1, a tensor it does not take) and the
caller uses torch's operations; nothing is printed, status() says which path is in use and why (`llava ask -v`).

The library is cached as $XDG_CACHE_HOME/llava-cli/kernels/mv-<hash>.so (default ~/.cache), the hash covering the
source, the compiler command and version, and the flags. It is built into a temporary file and renamed into place, so
processes building at once each end with a whole library, and a home directory shared by different machines is safe:
the flags name the instruction sets (no -march=native), and the library checks the CPU before it is used.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCES = [Path(__file__).with_name(name) for name in ("mv.c", "attn.c", "codec.c")]  # and simd.h, which all include
HEADER = Path(__file__).with_name("simd.h")
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vnni", "-fopenmp", "-shared",
         "-fPIC"]
LIBS = ["-lm"]  # after the sources: expf and sqrtf of decode_layers
CPU_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni"}  # as /proc/cpuinfo spells them
INT4_MAX_K = 32768  # mv.c's int4 kernel: inputs at most this long (a stack copy), groups a multiple of 64

_lib: ctypes.CDLL | None = None
_tried = False
NOT_LOADED = "matrix-vector: torch (no one-token bfloat16 step has run on the CPU)"
_status = NOT_LOADED
ATTENTION_MAX_D = 128  # attn.c: head sizes up to this, even
attention_outcome = ""  # how the last attention() call ran, for status()


def mv(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
    """weight @ x for bfloat16 weight (out, in) and x (in,) on the CPU; None: use torch.mv instead."""
    if weight.dtype is not torch.bfloat16 or not _takes(weight, x):
        return None
    x, y = x.contiguous(), torch.empty(weight.shape[0], dtype=torch.bfloat16)
    _lib.bf16mv(weight.data_ptr(), x.data_ptr(), y.data_ptr(), *weight.shape, torch.get_num_threads())
    return y


def int8_mv(qweight: torch.Tensor, scales: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
    """(qweight @ x) * scales for int8 qweight (out, in) or in tiles (int8_tiles), bfloat16 scales (out,) and x (in,);
    None: use torch's."""
    tiled = qweight.dim() == 4
    rows, cols = int8_shape(qweight)
    if (qweight.dtype is not torch.int8 or scales.dtype is not torch.bfloat16 or scales.shape != (rows,)
            or scales.device.type != "cpu" or (tiled and not qweight.is_contiguous())
            or not _takes(qweight.view(rows, cols) if tiled else qweight, x)):
        return None
    x, y = x.contiguous(), torch.empty(rows, dtype=torch.bfloat16)
    scales = scales.contiguous()
    if _lib.int8mv(qweight.data_ptr(), x.data_ptr(), scales.data_ptr(), y.data_ptr(), rows, cols, int(tiled),
                   torch.get_num_threads()):
        return None  # out of memory for a float32 copy of x
    return y


def int4_mv(qweight: torch.Tensor, row_scales: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
    """The int4 product for uint8 qweight (out, in / 2) (two weights a byte, low nibble first), bfloat16 row_scales
    (out, groups, 2) (each group's scale and zero, w = (q - 8) * scale + zero) and x (in,); None: use torch's."""
    if not _int4(qweight, row_scales) or not _takes(qweight, x, inputs=2 * qweight.shape[1]):
        return None
    (out, half), groups = qweight.shape, row_scales.shape[1]
    x, y = x.contiguous(), torch.empty(out, dtype=torch.bfloat16)
    _lib.int4mv(qweight.data_ptr(), x.data_ptr(), row_scales.data_ptr(), y.data_ptr(), out, 2 * half,
                2 * half // groups, torch.get_num_threads())
    return y


def int4_runs(qweight: torch.Tensor, row_scales: torch.Tensor | None) -> bool:
    """Whether int4_mv takes this weight (given a bfloat16 input of its length), building the library if need be."""
    return _int4(qweight, row_scales) and _library() is not None  # _int4: dense CPU tensors of its shapes


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor | None:
    """F.scaled_dot_product_attention(q, k, v) for bfloat16 q (B, H, Tq, D) and k, v (B, Hkv, Tk, D) on the CPU,
    heads sharing key-value heads in groups of H / Hkv (causal: query i sees keys 0 .. i + Tk - Tq), returned as
    (B, Tq, H * D), the layout the output projection reads; None: run SDPA instead (the reason goes to status())."""
    global attention_outcome
    why = _attention_declines(q, k, v, causal)
    if why is None and (why := _amx()) is None and _library() is None:
        why = "no kernel"
    if why:
        attention_outcome = f"attention: torch's ({why})"
        return None
    b, h, tq, d = q.shape
    out = torch.empty(b, tq, h * d, dtype=torch.bfloat16)
    strides = [torch.tensor(t.stride()[:3], dtype=torch.int64) for t in (q, k, v)]
    if _lib.attn_bf16(q.data_ptr(), strides[0].data_ptr(), k.data_ptr(), strides[1].data_ptr(), v.data_ptr(),
                      strides[2].data_ptr(), out.data_ptr(), b, h, k.shape[1], tq, k.shape[2], d, int(causal),
                      d**-0.5, torch.get_num_threads()):
        attention_outcome = "attention: torch's (out of memory for the kernel's copies)"
        return None
    attention_outcome = "attention: llava-cli's kernel"
    return out


def _attention_declines(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> str | None:
    """Why attn.c cannot take these tensors, or None."""
    if (dtype := next((t.dtype for t in (q, k, v) if t.dtype is not torch.bfloat16), None)) is not None:
        return f"{str(dtype).removeprefix('torch.')}: it takes bfloat16"
    if (device := next((t.device for t in (q, k, v) if t.device.type != "cpu"), None)) is not None:
        return f"on {device}: it runs on the CPU"
    if any(t.dim() != 4 or t.stride(-1) != 1 for t in (q, k, v)):
        return "not 4D tensors with contiguous rows"
    (b, h, tq, d), (bk, hkv, tk, dk) = q.shape, k.shape
    if k.shape != v.shape or b != bk or d != dk or h % hkv or not tq or not tk or (causal and tq > tk):
        return "shapes SDPA would reject or that it handles with an empty result"
    if d % 2 or d > ATTENTION_MAX_D:
        return f"head size {d}: it takes even sizes up to {ATTENTION_MAX_D}"
    if k.stride(2) >= 2**27:  # attn.c gathers 16 keys with 32-bit offsets of up to 15 rows
        return "key rows too far apart"
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))):
        return "a compiled or differentiated graph"
    return None


def _amx() -> str | None:
    """On CPUs with AMX, oneDNN's AMX tiles make torch's flash attention the faster one: their vdpbf16ps runs at a
    quarter of an FMA's rate (measured on the AMX machines these benchmarks also run on), so attn.c declines there."""
    return "the CPU has AMX, where torch's is faster" if _cpu_has({"amx_bf16"}) else None


def _int4(qweight: torch.Tensor, row_scales: torch.Tensor | None) -> bool:
    """qweight and row_scales are what mv.c's int4 kernel reads (see INT4_MAX_K)."""
    if qweight.dtype is not torch.uint8 or qweight.dim() != 2 or not isinstance(row_scales, torch.Tensor):
        return False
    out, half = qweight.shape
    groups = row_scales.shape[1] if row_scales.dim() == 3 else 0
    return (groups > 0 and (2 * half) % groups == 0 and (2 * half // groups) % 64 == 0 and 2 * half <= INT4_MAX_K
            and _dense(row_scales, torch.bfloat16, (out, groups, 2)) and _dense(qweight, torch.uint8, (out, half)))


def _dense(t: torch.Tensor | None, dtype: torch.dtype, shape: tuple) -> bool:
    """t is a contiguous CPU tensor of this dtype and shape (None is not)."""
    return (isinstance(t, torch.Tensor) and t.dtype is dtype and t.device.type == "cpu"
            and tuple(t.shape) == tuple(shape) and t.is_contiguous())


def _takes(weight: torch.Tensor, x: torch.Tensor, inputs: int | None = None) -> bool:
    """Whether the kernel can take these tensors, loading it on first use; `inputs`: the length of x the weight
    takes, where it is not the weight's number of columns (int4: two a byte).

    The caller holds weight and x until the call returns, and the kernel keeps no pointers: no lifetime to manage.
    Its OpenMP threads are torch's own pool (see _openmp_runtime), told torch's thread count at each call.
    """
    if (x.dtype is not torch.bfloat16 or weight.device.type != "cpu" or not weight.is_contiguous()
            or torch.compiler.is_compiling()):  # a compiled graph traces torch's kernel, not a ctypes call
        return False
    if weight.dim() != 2 or x.dim() != 1 or x.shape[0] != (inputs or weight.shape[1]) or x.device.type != "cpu":
        return False  # torch's kernel then says what is wrong, where the C kernel would read out of bounds
    if weight.requires_grad and torch.is_grad_enabled():
        return False
    return _library() is not None


def _library() -> ctypes.CDLL | None:
    """The library, built and loaded on first use; None where it cannot run."""
    return _lib if _tried else load()


def _loaded() -> ctypes.CDLL | None:
    """The library where something has loaded it already, else None (never builds it)."""
    return _lib if _tried else None


def status() -> str:
    """One line: which matrix-vector path decode uses and why, how the last attention over a whole sequence (the
    vision tower, the prefill) ran, and how the last one-token step ran its layers."""
    return "; ".join(part for part in (_status, attention_outcome, DecodePlan.outcome) if part)


def load() -> ctypes.CDLL | None:
    """Build (once per cache) and load the kernel; None, with the reason in status(), where it cannot run."""
    global _lib, _tried, _status
    try:
        _lib, why = _build()
    except Exception as e:  # whatever goes wrong here (a bad $CC, mv.c missing from an install), torch's kernel runs
        _lib, why = None, f"the kernel could not be set up: {type(e).__name__}: {e}"
    _tried = True
    _status = f"matrix-vector: llava-cli's AVX512-BF16 kernel ({why})" if _lib else f"matrix-vector: torch ({why})"
    return _lib


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llava-cli" / "kernels"


def _build() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("LLAVA_NO_KERNEL", "") not in ("", "0"):
        return None, "LLAVA_NO_KERNEL is set"
    if not _cpu_has(CPU_FLAGS):
        return None, "the CPU has no AVX512-BF16 (or no AVX512-VNNI)"
    cc = shlex.split(os.environ.get("CC", "")) or [shutil.which("cc") or shutil.which("gcc") or "cc"]
    try:
        version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None, f"no C compiler: {cc[0]} not found, set CC"
    gomp = _openmp_runtime()
    link = [gomp, f"-Wl,-rpath,{os.path.dirname(gomp)}", "-Wl,--as-needed"] if gomp else []
    sources = [p.read_text() for p in (*SOURCES, HEADER)]
    key = hashlib.sha256("\0".join([*sources, *cc, version.stdout, *FLAGS, *link, *LIBS]).encode())
    key = key.hexdigest()
    so = cache_dir() / f"mv-{key[:16]}.so"
    if not so.exists():
        tmp = None
        try:
            so.parent.mkdir(mode=0o755, parents=True, exist_ok=True)  # 0o755 even under umask 002
            fd, tmp = tempfile.mkstemp(prefix=".mv-", suffix=".so", dir=so.parent)
            os.close(fd)
            r = subprocess.run([*cc, *FLAGS, *map(str, SOURCES), "-o", tmp, *link, *LIBS], capture_output=True, text=True,
                               timeout=300)
            if r.returncode:
                first = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[0]
                return None, f"the kernel did not build with {cc[0]}: {first}"
            os.replace(tmp, so)  # atomic: a racing process replaces one whole library with another
            tmp = None
        except subprocess.SubprocessError as e:
            return None, f"the kernel did not build with {cc[0]}: {e}"
        except OSError as e:
            return None, f"cannot write the kernel cache {so.parent}: {e.strerror or e}"
        finally:
            if tmp:
                Path(tmp).unlink(missing_ok=True)
    if unsafe := _not_private(so):
        return None, f"not loading {so}: {unsafe}"
    try:
        lib = ctypes.CDLL(str(so))
    except OSError as e:
        return None, f"cannot load {so}: {e}"
    if not lib.mv_cpu_ok():
        return None, "the CPU has no AVX512-BF16 (or no AVX512-VNNI)"
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.bf16mv.argtypes, lib.bf16mv.restype = [p, p, p, i64, i64, i32], None
    lib.int8mv.argtypes, lib.int8mv.restype = [p, p, p, p, i64, i64, i32, i32], i32
    lib.int4mv.argtypes, lib.int4mv.restype = [p, p, p, p, i64, i64, i64, i32], None
    lib.decode_layers.argtypes = [p, i64, p, p, p, p, p, i64, i64, i64, i64, i64, i64, i64, ctypes.c_float, p, i32]
    lib.decode_layers.restype = i32
    lib.argmax_rows.argtypes, lib.argmax_rows.restype = [p, i64, i64, p], None
    codec.declare(lib)  # codec.c's functions, beside their calls
    lib.attn_bf16.argtypes = [p, p, p, p, p, p, p, i64, i64, i64, i64, i64, i64, i32, ctypes.c_float, i32]
    lib.attn_bf16.restype = i32
    return lib, str(so)


def _not_private(so: Path) -> str | None:
    """Why a cached library must not be loaded: someone else could have written it (a shared or world-writable
    $XDG_CACHE_HOME). Loading runs its code in this process, so it and its folder must be ours alone to write."""
    for path in (so, so.parent):
        st = path.stat()
        if st.st_uid != os.getuid():
            return f"{path} belongs to another user"
        if st.st_mode & 0o022:
            return f"{path} is writable by other users"
    return None


def _cpu_has(flags: set[str]) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:  # not Linux
        return False
    return flags <= set(line.partition(":")[2].split())


def _openmp_runtime() -> str | None:
    """The OpenMP runtime torch has mapped (its own libgomp or Intel's libiomp5): linking the kernel against that file
    makes its `omp parallel` use torch's thread pool instead of starting a second pool from the system's libgomp."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    paths = (line.split()[-1] for line in maps.splitlines() if len(line.split()) > 5)
    return next((p for p in paths if os.path.basename(p).startswith(("libgomp", "libiomp5"))), None)


from .argmax import argmax  # noqa: E402, F401  (argmax.py takes _loaded from above)
from .tiles import int8_plain, int8_shape, int8_tiles  # noqa: E402, F401  (tiles.py takes _library from above)
from . import codec  # noqa: E402  (_build declares its functions)
from .codec import codec_runs, int4_dequant, int4_quantize, int8_dequant, int8_quantize  # noqa: E402, F401
from .plan import DecodePlan  # noqa: E402  (last: plan.py takes _dense, _int4, _library and int8_shape from above)
