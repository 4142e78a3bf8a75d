"""Benchmark llava-cli against transformers on the same random-weight checkpoint of a real shape, side by side.

    python3 benchmarks/bench.py                      # interleave-qwen-0.5b shape, ~15 minutes on 2 cores
    python3 benchmarks/bench.py --shape llava-7b     # llava-1.5-7b shape: writes 14 GB once; bfloat16 variants only,
                                                     # each in its own process (--isolate), no batches by default

Everything is measured in one run: the machine's own limits (read bandwidth, float32 and bfloat16 matmul peaks) and
`llava --help` wall time, then every variant (implementation x dtype [x quantization]) loaded once in this process
and run in alternating order on every repeat (vision encode, time to first token, decode tokens/s at batch 1), then
our variants' decode again taking turns token by token (ratios that hold on a drifting machine), then batch
throughput, then load time and peak RSS each in a fresh subprocess (alternating too). Medians are printed as
a Markdown table on stdout with ours/transformers ratios and the fraction of the machine limit reached; progress on
stderr. Timings on a shared machine are noisy: compare the ratios, which come from interleaved runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]


import limits  # noqa: E402
from checkpoints import SHAPES, build  # noqa: E402
from runners import footprint, inputs, load_variant  # noqa: E402

# ours:bfloat16:torchmv is ours with torch's matrix-vector kernels and attention instead of llava-cli's
# (LLAVA_NO_KERNEL=1)
DEFAULT_VARIANTS = ("ours:bfloat16", "transformers:bfloat16", "ours:float32", "transformers:float32",
                    "ours:bfloat16:int8", "ours:bfloat16:int4", "ours:bfloat16:torchmv")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def rss_now() -> int:
    return _status("VmRSS")


def rss_peak() -> int:
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over fork and exec, so a worker started by a
    # process holding several models would report the parent's peak.
    return _status("VmHWM")


def single(models: dict, ids, pixels, repeats: int, tokens: int, reader: limits.Reader | None = None) -> dict:
    """Vision encode, time to first token and decode rate at batch 1, variants alternating within each repeat; with
    a reader, the read bandwidth right after each decode too, so its share of the bandwidth pairs with it."""
    res = {v: {"vision_s": [], "first_token_s": [], "decode_tps": [], "read_gbs": []} for v in models}
    for m in models.values():  # warm up: first calls pay for page faults, thread pools, oneDNN kernel choice
        m.run([ids], pixels[:1], 2, [])
    for r in range(repeats):
        order = list(models) if r % 2 == 0 else list(models)[::-1]
        for v in order:
            m = models[v]
            t = time.perf_counter()
            m.encode(pixels[:1])
            res[v]["vision_s"].append(time.perf_counter() - t)
            stamps: list[float] = []
            t = time.perf_counter()
            m.run([ids], pixels[:1], tokens, stamps)
            res[v]["first_token_s"].append(stamps[0] - t)
            res[v]["decode_tps"].append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
            if reader:
                res[v]["read_gbs"].append(reader())
            log(f"  repeat {r + 1}/{repeats} {v}: vision {res[v]['vision_s'][-1]:.2f} s, first token "
                f"{res[v]['first_token_s'][-1]:.2f} s, decode {res[v]['decode_tps'][-1]:.1f} tok/s")
    return res


def interleaved(models: dict, ids, pixels, repeats: int, tokens: int,
                reader: limits.Reader | None = None) -> tuple[dict, list[float]]:
    """Seconds of each decode step of our variants, taking turns token by token (the order reversed every step):
    step i of one variant ran within ~0.1 s of step i of the others, so their ratios hold where the machine's
    bandwidth drifts 1.5x between answers. The prefill (first token) is not counted. With a reader, also one read of
    its tensor after each round of steps (GB/s): a bandwidth measured beside each step, for the share of it a step
    reaches; the reads of a whole run swing 1.5-1.8x, those beside a step only with it."""
    res, reads = {v: [] for v in models}, []
    for r in range(repeats):
        runs = {v: m.steps([ids], pixels[:1], tokens) for v, m in models.items()}
        for g in runs.values():
            next(g)  # the prefill
        for i in range(tokens - 1):
            for v in (list(runs) if (r + i) % 2 == 0 else list(runs)[::-1]):
                t = time.perf_counter()
                next(runs[v])
                res[v].append(time.perf_counter() - t)
            if reader:
                reads.append(reader(1))
        log(f"  interleaved repeat {r + 1}/{repeats}: " + ", ".join(
            f"{v} {1 / statistics.median(x[-(tokens - 1):]):.1f} tok/s" for v, x in res.items()))
        del runs
    return res, reads


def batches(models: dict, ids, pixels, sizes: list[int], repeats: int, tokens: int) -> dict:
    res = {v: {b: [] for b in sizes} for v in models}
    for m in models.values():
        m.run([ids] * 2, pixels[:2], 2, [])
    for r in range(repeats):
        for b in sizes:
            order = list(models) if (r + b) % 2 == 0 else list(models)[::-1]
            for v in order:
                stamps: list[float] = []
                t = time.perf_counter()
                models[v].run([ids] * b, pixels[:b], tokens, stamps)
                res[v][b].append(b / (stamps[-1] - t))
                log(f"  batch {b} {v}: {res[v][b][-1]:.2f} images/s ({tokens} tokens each)")
    return res


def worker(spec: str, folder: Path, tokens: int, measure: bool, sizes: list[int]) -> None:
    """Subprocess: load one variant and answer once; print load time and resident memory as JSON. With `measure`
    (--isolate), also one repeat of the batch-1 and batch measurements, for models too big to hold side by side."""
    if spec.startswith("transformers"):
        import transformers  # noqa: F401  (imported before the baseline; each worker imports only its own)
    import llava_cli.pipeline  # noqa: F401

    base = rss_now()
    t = time.perf_counter()
    m = load_variant(spec, folder)
    load_s = time.perf_counter() - t
    loaded_peak = rss_peak()
    ids, pixels, cfg = inputs(folder, max(sizes + [1]))
    out = {"load_s": load_s, "base": base, "loaded_peak": loaded_peak}
    if measure:
        out["stats"] = footprint(m, cfg, len(ids) + tokens // 2)
        out["single"] = single({spec: m}, ids, pixels, 1, tokens)[spec]
        out["batch"] = batches({spec: m}, ids, pixels, sizes, 1, 8)[spec] if sizes else {}
    else:
        m.run([ids], pixels[:1], 4, [])
    out["peak"] = rss_peak()
    print(json.dumps(out))


def subprocess_runs(variants, folder: Path, repeats: int, threads: int, tokens: int = 4, measure: bool = False,
                    sizes: tuple[int, ...] = ()) -> dict:
    res = {v: [] for v in variants}
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    for r in range(repeats):
        for v in (variants if r % 2 == 0 else variants[::-1]):
            cmd = [sys.executable, __file__, "--worker", v, "--folder", str(folder), "--threads", str(threads),
                   "--tokens", str(tokens), "--batch", ",".join(map(str, sizes))] + (["--isolate"] if measure else [])
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if out.returncode:
                log(out.stderr[-2000:])
                raise SystemExit(f"worker {v} failed")
            if measure:
                log(out.stderr.rstrip())
            res[v].append(json.loads(out.stdout.strip().splitlines()[-1]))
            log(f"  load {v}: {res[v][-1]['load_s']:.2f} s, peak RSS {res[v][-1]['peak'] / 2**30:.2f} GiB")
    return res


def help_time(repeats: int = 7) -> tuple[float, float, bool]:
    """Median wall time of `llava --help` and of a bare interpreter; and whether the CLI module imports torch."""
    def wall(args):
        t = time.perf_counter()
        subprocess.run([sys.executable, *args], capture_output=True, check=True, cwd=HERE.parent)
        return time.perf_counter() - t

    cli = statistics.median(wall(["-m", "llava_cli", "--help"]) for _ in range(repeats))
    bare = statistics.median(wall(["-c", "pass"]) for _ in range(repeats))
    probe = subprocess.run([sys.executable, "-c", "import sys, llava_cli.cli; print('torch' in sys.modules)"],
                           capture_output=True, text=True, cwd=HERE.parent)
    return cli, bare, probe.stdout.strip() == "True"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen-0.5b")
    ap.add_argument("--dir", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                    / "llava-cli-bench", help="where the random checkpoints are written (once)")
    ap.add_argument("--variants", help=f"default: {','.join(DEFAULT_VARIANTS)}; for llava-7b the bfloat16 ones")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per batch-1 answer")
    ap.add_argument("--batch", help="batch sizes for throughput ('' to skip); default 8,16, none for llava-7b")
    ap.add_argument("--batch-dtype", default="bfloat16")
    ap.add_argument("--batch-tokens", type=int, default=8)
    ap.add_argument("--batch-repeats", type=int, default=1)
    ap.add_argument("--rss-repeats", type=int, default=2, help="subprocess loads per variant for load time and RSS")
    ap.add_argument("--threads", type=int, help="torch threads for every variant (default: llava's, the idle cores)")
    ap.add_argument("--compile", action="store_true", help="load our variants with --compile")
    ap.add_argument("--isolate", action="store_true",
                    help="measure every variant in its own process, one at a time (default for llava-7b: two 7B "
                         "models do not fit side by side in 24 GB)")
    ap.add_argument("--json", type=Path, help="also write every raw measurement here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    from llava_cli.devices import set_threads

    a.threads = set_threads(a.threads)
    big = a.shape == "llava-7b"
    sizes = [int(b) for b in (a.batch if a.batch is not None else "" if big else "8,16").split(",") if b]
    if a.worker:
        return worker(a.worker, a.folder, a.tokens, a.isolate, sizes)
    import report

    variants = (a.variants or ",".join(v for v in DEFAULT_VARIANTS if not (big and "float32" in v))).split(",")
    load_avg = os.getloadavg()
    log(f"checkpoint {a.shape} in {a.dir}")
    folder = build(a.shape, a.dir)
    log("machine limits")
    machine = limits.measure()
    log("llava --help")  # first, on a quiet machine: after the load subprocesses it read 0.39 s where it takes 0.22
    helps = help_time()
    ids, pixels, cfg = inputs(folder, max(sizes + [1]))
    steps, step_reads = {}, []
    if a.isolate or big:
        log(f"prompt: {len(ids)} tokens; each variant in its own process: {', '.join(variants)}")
        runs = subprocess_runs(variants, folder, a.repeats, a.threads, a.tokens, True, tuple(sizes))
        stats = {v: r[0]["stats"] for v, r in runs.items()}
        one = {v: {k: [y for x in r for y in x["single"][k]] for k in r[0]["single"]} for v, r in runs.items()}
        many = {v: {b: [x["batch"][str(b)][0] for x in r] for b in sizes} for v, r in runs.items()
                if v.split(":")[1:] == [a.batch_dtype] and sizes}
        rss = runs
    else:
        log(f"prompt: {len(ids)} tokens; loading {', '.join(variants)}")
        models = {v: load_variant(v, folder, a.compile) for v in variants}
        stats = {v: footprint(m, cfg, len(ids) + a.tokens // 2) for v, m in models.items()}
        log("batch 1")
        one = single(models, ids, pixels, a.repeats, a.tokens, limits.Reader())
        ours = {v: m for v, m in models.items() if v.startswith("ours:")}
        if len(ours) > 1:
            log("decode, our variants taking turns token by token")
            steps, step_reads = interleaved(ours, ids, pixels, a.repeats, a.tokens, limits.Reader())
        for v in [v for v in models if v.split(":")[1:] != [a.batch_dtype]]:
            del models[v]
        gc.collect()
        log("batch throughput")
        many = batches(models, ids, pixels, sizes, a.batch_repeats, a.batch_tokens) if sizes else {}
        del models
        gc.collect()
        log("load time and peak RSS (subprocesses)")
        rss = subprocess_runs(variants, folder, a.rss_repeats, a.threads)
    raw = {"date": time.strftime("%Y-%m-%d %H:%M"), "shape": a.shape, "threads": a.threads,
           "load_avg_before": load_avg, "load_avg_after": os.getloadavg(),
           "prompt_tokens": len(ids), "tokens": a.tokens, "machine": machine, "stats": stats, "single": one,
           "batch": {v: {str(b): x for b, x in d.items()} for v, d in many.items()}, "rss": rss, "help": helps,
           "interleaved": steps, "interleaved_read_gbs": step_reads}
    if a.json:
        a.json.write_text(json.dumps(raw, indent=1))
    print(report.table(raw, cfg))


if __name__ == "__main__":
    main()
