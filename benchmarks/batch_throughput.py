"""Images per minute of `llava batch` at batch sizes 1, 4, 8, 16 against a loop of transformers generate calls.

    python3 benchmarks/batch_throughput.py                 # 32 images, 16 new tokens, bfloat16 if the CPU has it
    python3 benchmarks/batch_throughput.py --images 8 --sizes 1,4 --tokens 8    # a quick look

Both run the same random-weight checkpoint of the llava-interleave-qwen-0.5b shape (the hub's config, tokenizer and
processor files, random weights; built once by checkpoints.py into --cache). Ours is timed end to end as the command
runs it (read and hash each image, preprocess, encode, decode in batches, write a JSONL record per item); the
baseline reads each image with PIL, runs transformers' processor on it and calls generate() once per image, greedy,
as a Python loop over a folder would. Every image is a distinct file, so nothing is deduplicated. Each repeat runs
every runner once, in a rotating order, so machine noise falls on all of them alike. Medians go to stdout as a
Markdown table with ratios against transformers; progress to stderr.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from checkpoints import build  # noqa: E402

PHOTOS = sorted((HERE.parent / "tests" / "data").glob("*.png"))
QUESTION = "Describe this image in one sentence."


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def make_images(folder: Path, n: int) -> list[Path]:
    """n distinct photos: crops of the test photos at different places and sizes."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        photo = Image.open(PHOTOS[i % len(PHOTOS)]).convert("RGB")
        w, h = photo.size
        side = min(w, h) * (60 + i % 7 * 5) // 100
        left, top = (w - side) * (i % 5) // 4, (h - side) * (i % 3) // 2
        path = folder / f"photo{i:02d}.png"
        photo.crop((left, top, left + side, top + side)).save(path)
        paths.append(path)
    return paths


class Ours:
    def __init__(self, folder: Path, dtype: str, tokens: int, threads: int):
        from llava_cli.batch import Job
        from llava_cli.generate import Sampling
        from llava_cli.pipeline import Llava

        self.llava = Llava.load(folder, dtype=dtype, device="cpu", threads=threads)
        self.job = Job(str(folder), self.llava.template.name, str(self.llava.dtype), tokens, Sampling())
        self.dtype = self.llava.dtype

    def run(self, images: list[Path], batch_size: int, scratch: Path) -> int:
        """Answer every image as `llava batch` does; returns the tokens generated."""
        from llava_cli.batch import run_batch
        from llava_cli.batch_output import RecordWriter

        out = scratch / f"run-{time.monotonic_ns()}.jsonl"  # a new file each time, or resume would skip everything
        writer = RecordWriter(str(out))
        summary = run_batch(self.llava, [(str(p), [QUESTION]) for p in images], self.job, writer, batch_size=batch_size)
        writer.close()
        if summary.done != len(images):
            raise SystemExit(f"ours answered {summary.done} of {len(images)} images: see {out}")
        import json

        return sum(json.loads(line)["tokens"]["generated"] for line in out.read_text().splitlines())


class Transformers:
    def __init__(self, folder: Path, dtype: torch.dtype, tokens: int):
        import transformers

        self.processor = transformers.AutoProcessor.from_pretrained(folder)
        self.model = transformers.LlavaForConditionalGeneration.from_pretrained(folder, dtype=dtype).eval()
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
        self.text = self.processor.apply_chat_template(conversation, add_generation_prompt=True)
        self.tokens = tokens

    def run(self, images: list[Path], batch_size: int, scratch: Path) -> int:
        """One generate() call per image, greedy; returns the tokens generated."""
        generated = 0
        for path in images:
            inputs = self.processor(text=self.text, images=[Image.open(path)], return_tensors="pt")
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
            with torch.inference_mode():
                out = self.model.generate(**inputs, max_new_tokens=self.tokens, do_sample=False)
            generated += out.shape[1] - inputs["input_ids"].shape[1]
        return generated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--sizes", default="1,4,8,16", help="batch sizes of llava batch")
    parser.add_argument("--tokens", type=int, default=16, help="new tokens per answer")
    parser.add_argument("--dtype", default="auto", help="auto: bfloat16 on CPUs with AVX512-BF16/AMX, else float32")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, for both")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "llava-cli-bench")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]

    folder = build("qwen-0.5b", args.cache)
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        images = make_images(scratch / "photos", args.images)
        log(f"loading {folder} twice (ours, transformers)")
        ours = Ours(folder, args.dtype, args.tokens, args.threads)
        theirs = Transformers(folder, ours.dtype, args.tokens)
        runners = [("transformers loop", None)] + [(f"llava batch -b {b}", b) for b in sizes]
        log("warming up on 2 images each")
        for name, b in runners:
            (theirs if b is None else ours).run(images[:2], b or 1, scratch)
        seconds: dict[str, list[float]] = {name: [] for name, _ in runners}
        tokens: dict[str, int] = {}
        for r in range(args.repeats):
            turn = r % len(runners)
            for name, b in runners[turn:] + runners[:turn]:
                start = time.perf_counter()
                tokens[name] = (theirs if b is None else ours).run(images, b or 1, scratch)
                seconds[name].append(time.perf_counter() - start)
                log(f"  repeat {r + 1}: {name}: {seconds[name][-1]:.1f} s, {tokens[name]} tokens")

    base = args.images / statistics.median(seconds["transformers loop"]) * 60
    print(f"{args.images} images, {args.tokens} new tokens each, {str(ours.dtype).removeprefix('torch.')}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}\n")
    print("| runner | seconds | images/min | vs transformers | tokens generated |")
    print("|---|---:|---:|---:|---:|")
    for name, _ in runners:
        s = statistics.median(seconds[name])
        rate = args.images / s * 60
        print(f"| {name} | {s:.1f} | {rate:.1f} | {rate / base:.2f}x | {tokens[name]} |")


if __name__ == "__main__":
    main()
