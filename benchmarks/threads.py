"""Decode speed with 1 thread, all cores, and llava's default, alone and next to a competing busy process.

    python3 benchmarks/threads.py            # interleave-qwen-0.5b shape, bfloat16, ~3 minutes

torch's threads meet at a barrier after every operation, so when another process holds one core, a thread that shares
it stalls the others; the default (devices.default_threads: the cores idle at load) is meant not to collapse there.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import torch  # noqa: E402

from checkpoints import SHAPES, build  # noqa: E402

BUSY = "import time\nend = time.time() + 600\nwhile time.time() < end: pass"  # one core, bounded in time


def decode_rate(model, ids: list[int], tokens: int) -> float:
    from llava_cli.generate import generate

    stamps = [time.perf_counter() for _ in generate(model, [ids], None, max_new_tokens=tokens)]
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen-0.5b")
    ap.add_argument("--dir", type=Path, default=Path.home() / ".cache" / "llava-cli-bench")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=24)
    a = ap.parse_args()
    from llava_cli import devices
    from llava_cli.pipeline import Llava
    from llava_cli.templates import Message

    folder = build(a.shape, a.dir)
    llava = Llava.load(folder, dtype=a.dtype, device="cpu", threads=devices.usable_cores())
    ids = llava.prompt([Message("user", "Write a long story about a cat.")]).ids
    cores = devices.usable_cores()
    rows = []
    for competing in (False, True):
        busy = subprocess.Popen([sys.executable, "-c", BUSY]) if competing else None
        try:
            time.sleep(0.5)
            default = devices.default_threads()
            res: dict[str, list[float]] = {"1": [], f"all ({cores})": [], f"default ({default})": []}
            counts = {"1": 1, f"all ({cores})": cores, f"default ({default})": default}
            decode_rate(llava.model, ids, 4)  # warm up
            for r in range(a.repeats):
                for name in (list(res) if r % 2 == 0 else list(res)[::-1]):
                    torch.set_num_threads(counts[name])
                    res[name].append(decode_rate(llava.model, ids, a.tokens))
                    print(f"  competing={competing} threads {name}: {res[name][-1]:.1f} tok/s", file=sys.stderr)
        finally:
            if busy:
                busy.kill()
                busy.wait()
        rows.append((competing, {k: statistics.median(v) for k, v in res.items()}, default))
    load = os.getloadavg()[0]
    print(f"| {a.shape} {a.dtype}, decode tok/s, median of {a.repeats} (load average {load:.1f}) | 1 thread | "
          f"all {cores} cores | default |")
    print("|---|---|---|---|")
    for competing, med, n in rows:
        print(f"| {'one core busy with another process' if competing else 'no process of ours competing'} | "
              + " | ".join(f"{v:.1f}" for v in med.values()) + f" ({n} thread{'s' * (n != 1)}) |")


if __name__ == "__main__":
    main()
