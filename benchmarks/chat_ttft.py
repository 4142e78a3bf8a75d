"""Time to first token on turn 3 of a chat: the KV cache kept between turns against prefilling everything again.

    python3 benchmarks/chat_ttft.py                   # interleave-qwen-0.5b shape, random weights, ~2 minutes
    python3 benchmarks/chat_ttft.py --repeats 7 --dtype float32

One session holds a two-turn conversation about a photo. Turn 3 is then asked, alternating on every repeat, three
ways: (a) as `llava chat` does it, reusing the cache; (b) prefilling the whole conversation again with the image
features kept; (c) from scratch as a fresh `llava ask` of the whole history would, the vision tower included. Each
repeat asks a different question so the cache never holds the question itself. Medians go to stdout as a Markdown
table; random weights write token runs that often re-tokenize differently, so the cache is reused only up to the
last answer's first mismatch: a real model reuses more and gains more.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from checkpoints import build  # noqa: E402

PHOTO = HERE.parent / "tests" / "data" / "chelsea.png"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="qwen-0.5b")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--answer-tokens", type=int, default=32, help="tokens per answer in turns 1 and 2")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "llava-cli-bench")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from llava_cli.chat import ChatSession, Settings
    from llava_cli.pipeline import Llava

    folder = build(args.shape, args.cache)
    llava = Llava.load(folder, dtype=args.dtype, device="cpu")
    session = ChatSession(llava, Settings(max_tokens=args.answer_tokens))
    session.add_image(str(PHOTO), Image.open(PHOTO))
    for question in ("What is in this picture?", "Describe the animal's fur and where it is lying."):
        "".join(session.ask(question))
    session.settings = Settings(max_tokens=1)  # turn 3 only needs its first token

    times: dict[str, list[float]] = {"reused cache": [], "re-prefill, image features kept": [],
                                     "from scratch (as a fresh ask)": []}
    reused = prompt = 0
    for r in range(args.repeats):
        for way in times:
            if way != "reused cache":
                session._cached = []  # the cache holds nothing: prefill the whole conversation
            if way.startswith("from scratch"):
                session._features.clear()
            t0 = time.perf_counter()
            "".join(session.ask(f"Question {r}: is there anything else worth noticing in the picture?"))
            times[way].append(time.perf_counter() - t0)
            if way == "reused cache":
                reused, prompt = session.stats.reused_tokens, session.stats.prompt_tokens
            session.undo()
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items()),
              file=sys.stderr, flush=True)

    base = statistics.median(times["from scratch (as a fresh ask)"])
    print(f"\nturn 3 of a chat, {args.shape} shape, {str(llava.dtype).removeprefix('torch.')}, "
          f"{torch.get_num_threads()} threads: prompt {prompt} tokens, {reused} of them reused from the cache\n")
    print("| turn 3 time to first token | median s | min s | vs from scratch |")
    print("|---|---:|---:|---:|")
    for way, values in times.items():
        med = statistics.median(values)
        print(f"| {way} | {med:.3f} | {min(values):.3f} | {med / base:.2f}x |")


if __name__ == "__main__":
    main()
