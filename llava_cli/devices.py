"""Device and dtype choice, and peak memory, for CPU and CUDA alike."""

from __future__ import annotations

import os
import sys
import time

import torch

from .errors import LlavaError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """'auto' is the first CUDA GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LlavaError(f"unknown device {name!r} (use auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LlavaError(f"device {name!r} requested but CUDA is not available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise LlavaError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA devices exist")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise LlavaError("device 'mps' requested but MPS is not available")
    return device


def cpu_has_bf16() -> bool:
    """Whether the CPU computes bfloat16 natively (AVX512-BF16 or AMX); without it bfloat16 is slower than float32."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # private helpers moved: read the flags instead
        try:
            flags = open("/proc/cpuinfo").read()
        except OSError:
            return False
        return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is bfloat16 where the hardware supports it natively, else float32."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_bf16() else torch.float32
    if name not in DTYPES:
        raise LlavaError(f"unknown dtype {name!r} (use auto, {', '.join(DTYPES)})")
    return DTYPES[name]


def memory_peak(device: torch.device) -> int:
    """Peak bytes: CUDA's allocator peak on a GPU, else the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        import resource
    except ImportError:  # Windows
        return 0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB, macOS bytes


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def idle_cores(window: float = 0.1) -> float | None:
    """How many CPUs sat idle over `window` seconds, from /proc/stat; None where there is no /proc."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]  # all jiffies, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(window)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 == total0:
        return None
    return (os.cpu_count() or 1) * (idle1 - idle0) / (total1 - total0)


def default_threads() -> int:
    """One thread per core that is idle now: torch's threads meet at a barrier after every operation, so one thread
    sharing a core with a busy process stalls all of them (2 threads on 2 cores, one busy: decode ~5x slower than
    1 thread). A core idle half the time or more counts. OMP_NUM_THREADS, when set, wins."""
    if (env := os.environ.get("OMP_NUM_THREADS", "")).isdigit() and int(env) > 0:
        return int(env)  # the user's own choice for every OpenMP program
    cores = usable_cores()
    idle = idle_cores()
    return cores if idle is None else max(1, min(cores, int(idle + 0.5)))


def _cpu_sample() -> tuple[float, int, int, int] | None:
    """(time, all jiffies, idle jiffies, this process's jiffies) from /proc; None where there is no /proc."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    except (OSError, ValueError, IndexError):
        return None
    return time.monotonic(), sum(fields), fields[3] + fields[4], int(own[11]) + int(own[12])  # utime + stime


class ThreadTuner:
    """Re-chooses the thread count between answers of a long session (chat, batch) from how busy *other*
    processes kept the CPUs since the last call; this process's own work does not count against it."""

    def __init__(self) -> None:
        self.sample = _cpu_sample()

    def retune(self, min_window: float = 0.05) -> int:
        """Set torch's thread count to the cores others left idle since the last call; return it."""
        now, before = _cpu_sample(), self.sample
        if now is None or before is None or now[0] - before[0] < min_window or now[1] == before[1]:
            return torch.get_num_threads()
        self.sample = now
        free = (os.cpu_count() or 1) * ((now[2] - before[2]) + (now[3] - before[3])) / (now[1] - before[1])
        n = max(1, min(usable_cores(), int(free + 0.5)))
        torch.set_num_threads(n)
        return n


def set_threads(threads: int | None) -> int:
    """Set torch's CPU thread count (default_threads() when None); return it."""
    n = default_threads() if threads is None else threads
    if n < 1:
        raise LlavaError(f"threads must be at least 1, got {n}")
    torch.set_num_threads(n)
    return n
