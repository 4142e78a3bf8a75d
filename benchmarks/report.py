"""The benchmark's table: medians, ours/transformers ratios, and the fraction of the machine's limits reached."""

from __future__ import annotations

import statistics
from datetime import datetime


def vision_flops(cfg) -> float:
    """Multiply-adds x 2 of one image through the vision layers LLaVA uses, patch embedding and projector."""
    v = cfg.vision
    t = v.num_patches + int(v.class_token)
    layer = 2 * t * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size) + 4 * t * t * v.hidden_size
    patch = 2 * v.num_patches * v.num_channels * v.patch_size**2 * v.hidden_size
    width = v.hidden_size * len(cfg.feature_layers)
    proj = 2 * cfg.image_tokens * (width * cfg.text.hidden_size + cfg.text.hidden_size**2)
    return cfg.vision_layers_used * layer + patch + proj


def prefill_flops(cfg, tokens: int) -> float:
    """Multiply-adds x 2 of a `tokens`-long causal prefill, output head on the last position only."""
    c = cfg.text
    q = c.num_attention_heads * c.head_dim
    kv = c.num_key_value_heads * c.head_dim
    linear = c.hidden_size * (2 * q + 2 * kv) + 3 * c.hidden_size * c.intermediate_size
    return c.num_hidden_layers * (2 * tokens * linear + 2 * tokens * tokens * q) + 2 * c.hidden_size * c.vocab_size


def _med(xs) -> float:
    return statistics.median(xs) if xs else float("nan")


def _paired(a: list, b: list) -> float:
    """The median of a[i] / b[i] where the two lists are repeat by repeat, else the ratio of their medians."""
    if a and len(a) == len(b):
        return statistics.median(x / y for x, y in zip(a, b, strict=True))
    return _med(a) / _med(b)


def _fmt(x: float, unit: str = "") -> str:
    if x != x:
        return "–"
    return f"{x:.3g}{unit}" if abs(x) < 1000 else f"{x:,.0f}{unit}"


def table(raw: dict, cfg) -> str:
    m = raw["machine"]
    bw = m["bandwidth_gbs"][1] * 1e9  # the limits are the best of their repeats: noise only ever lowers them
    peak = {k: v[1] * 1e9 for k, v in m["matmul_gflops"].items()}
    one, sizes = raw["single"], raw["stats"]
    vf, pf = vision_flops(cfg), prefill_flops(cfg, raw["prompt_tokens"])
    batch_sizes = sorted({b for d in raw["batch"].values() for b in d}, key=int)
    head = ["load s", "vision s", "first token s", "decode tok/s"] + [f"batch {b} img/s" for b in batch_sizes]
    lines = [
        f"benchmark {raw['shape']}, {raw.get('date') or f'{datetime.now():%Y-%m-%d %H:%M}'}, {raw['threads']} "
        f"threads, load average {raw['load_avg_before'][0]:.2f} before / {raw['load_avg_after'][0]:.2f} after; "
        f"prompt {raw['prompt_tokens']} tokens (1 image), {raw['tokens']} new tokens; medians of "
        f"{len(next(iter(one.values()))['vision_s'])}",
        f"machine (best / median of repeats): read {m['bandwidth_gbs'][1]:.1f} / {m['bandwidth_gbs'][0]:.1f} GB/s, "
        f"matmul float32 {m['matmul_gflops']['float32'][1]:.0f} / {m['matmul_gflops']['float32'][0]:.0f} GFLOP/s, "
        f"bfloat16 {m['matmul_gflops']['bfloat16'][1]:.0f} / {m['matmul_gflops']['bfloat16'][0]:.0f} GFLOP/s",
        "",
        "| variant | " + " | ".join(head) + " | peak RSS GiB | (peak RSS - imports) / weights |",
        "|---" * (len(head) + 3) + "|",
    ]
    lists, rows = {}, {}
    for v, r in one.items():
        loads = raw["rss"].get(v, [])
        batch = raw["batch"].get(v, {})
        # peak RSS: after load and one short answer, so mapped pages read count too
        lists[v] = {"load": [x["load_s"] for x in loads], "vision": r["vision_s"], "ttft": r["first_token_s"],
                    "decode": r["decode_tps"], "rss": [x["peak"] for x in loads]}
        lists[v] |= {f"b{b}": batch.get(b, []) for b in batch_sizes}
        rows[v] = {k: _med(x) for k, x in lists[v].items()}
        rows[v]["rss_ratio"] = (rows[v]["rss"] - _med([x["base"] for x in loads])) / sizes[v]["weight_bytes"]
    keys = ("load", "vision", "ttft", "decode") + tuple(f"b{b}" for b in batch_sizes)
    for v, row in rows.items():
        cells = [_fmt(row[k]) for k in keys] + [_fmt(row["rss"] / 2**30), _fmt(row["rss_ratio"], "x")]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    names = ["load", "vision", "first token", "decode"] + [f"batch {b}" for b in batch_sizes] + ["peak RSS"]
    theirs, plain = [], []  # ours against transformers in the same dtype; a quantized variant against ours unquantized
    for v in rows:
        impl, dtype, *mods = v.split(":")
        if impl == "ours" and f"transformers:{dtype}" in rows:
            theirs.append((v, f"transformers:{dtype}"))
        if impl == "ours" and mods and f"ours:{dtype}" in rows:
            plain.append((v, f"ours:{dtype}"))
    pairs = theirs + plain
    lines += ["", "Ratios: the median of the per-repeat ratios (the variants alternate within each repeat, so each ratio "
              "compares runs seconds apart).", "", "| ratio | " + " | ".join(names) + " |",
              "|---" * (len(names) + 1) + "|"]
    for a, b in pairs:
        cells = [_fmt(_paired(lists[a][k], lists[b][k]), "x") for k in keys + ("rss",)]
        lines.append(f"| {a} / {b} | " + " | ".join(cells) + " |")
    lines += ["", "| variant | decode: bytes read/token | decode % of the best read | decode % of the read right "
              "after it | vision % of matmul peak | first token % of matmul peak |", "|---|---|---|---|---|---|"]
    for v, row in rows.items():
        p = peak["float32" if ":float32" in v else "bfloat16"]
        step = sizes[v]["decode_bytes"] / 1e9  # GB a token
        beside = one[v].get("read_gbs", [])  # older runs' JSON has no reads beside each decode
        paired = f"{100 * _paired([step * x for x in lists[v]['decode']], beside):.0f}%" if beside else "–"
        lines.append(f"| {v} | {step:.2f} GB | {100 * step * 1e9 * row['decode'] / bw:.0f}% | {paired} "
                     f"| {100 * vf / row['vision'] / p:.0f}% | {100 * (vf + pf) / row['ttft'] / p:.0f}% |")
    if ref := rows.get("transformers:bfloat16"):  # how far any implementation's first token could go on this machine
        floor = (vf + pf) / peak["bfloat16"]
        lines += ["", f"First token's matrix products: {(vf + pf) / 1e12:.2f} TFLOP, {floor:.2f} s at the bfloat16 "
                  f"matmul peak measured here: {floor / ref['ttft']:.2f}x transformers:bfloat16's first token."]
    steps = raw.get("interleaved") or {}  # older runs' JSON has none
    if steps:
        ref = "ours:bfloat16" if "ours:bfloat16" in steps else next(iter(steps))
        reads = raw.get("interleaved_read_gbs") or []  # one read after each round of steps, where measured
        lines += ["", f"Decode of our variants taking turns token by token ({len(steps[ref])} steps each): the "
                  f"speedup is the median over steps of {ref}'s step time over the variant's, the two "
                  "run one after the other; the share of the read is the median over steps of a step's bytes a "
                  "second over a read of the machine right after it.", "",
                  f"| variant | step ms | tok/s | speedup over {ref} | % of the read beside each step |",
                  "|---|---|---|---|---|"]
        for v, xs in steps.items():
            beside = "–"
            if len(reads) == len(xs):
                gb = sizes[v]["decode_bytes"] / 1e9
                beside = f"{100 * statistics.median(gb / t / r for t, r in zip(xs, reads, strict=True)):.0f}%"
            lines.append(f"| {v} | {1e3 * _med(xs):.1f} | {1 / _med(xs):.1f} | {_paired(steps[ref], xs):.2f}x "
                         f"| {beside} |")
    cli, bare, torch_imported = raw["help"]
    lines += ["", f"`llava --help`: {cli:.3f} s wall (bare `python -c pass`: {bare:.3f} s); "
                  f"torch imported by the CLI module: {'yes' if torch_imported else 'no'}"]
    return "\n".join(lines)
