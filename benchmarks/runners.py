"""The two implementations behind one small interface for the benchmark, and the inputs and sizes they share."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import torch

QUESTION = "Describe this image in detail."


class Ours:
    def __init__(self, folder: Path, dtype: str, quantize: str | None, compile: bool = False, kernel: bool = True):
        from llava_cli.pipeline import Llava

        self.kernel = kernel  # False: torch's matrix-vector kernels, as with LLAVA_NO_KERNEL=1

        extra = {"quantize": quantize} if quantize else {}
        extra["threads"] = torch.get_num_threads()  # the benchmark's --threads, not the idle-core default
        if compile:
            extra["compile"] = True
        self.llava = Llava.load(folder, dtype=dtype, device="cpu", **extra)
        self.model = self.llava.model

    @contextlib.contextmanager
    def paths(self) -> Iterator[None]:
        """Within: llava-cli's kernels, or (kernel=False) torch's, for this variant only of the models held."""
        from llava_cli import kernels

        saved = kernels.mv, kernels.int8_mv, kernels.int4_mv, kernels.attention, kernels.DecodePlan.build
        if not self.kernel:
            kernels.mv = kernels.int8_mv = kernels.int4_mv = kernels.attention = lambda *args, **kw: None  # as where
            kernels.DecodePlan.build = classmethod(lambda cls, *args: None)  # they cannot run
        try:
            yield
        finally:
            kernels.mv, kernels.int8_mv, kernels.int4_mv, kernels.attention, kernels.DecodePlan.build = saved

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), self.paths():
            return self.model.encode_images(pixels)

    def run(self, ids: list[list[int]], pixels: torch.Tensor, n: int, stamps: list[float]) -> None:
        from llava_cli.generate import generate

        with self.paths():
            for _ in generate(self.model, ids, self.encode(pixels), max_new_tokens=n):
                stamps.append(time.perf_counter())

    def steps(self, ids: list[list[int]], pixels: torch.Tensor, n: int) -> Iterator[None]:
        """The answer one token at a time: each next() computes one (the first, the prefill), within this variant's
        kernel paths, so that variants can take turns token by token."""
        from llava_cli.generate import generate

        with self.paths():
            tokens = generate(self.model, ids, self.encode(pixels), max_new_tokens=n)
        while True:
            with self.paths():
                if next(tokens, None) is None:
                    return
            yield


class Theirs:
    def __init__(self, folder: Path, dtype: str, quantize: str | None, compile: bool = False):
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        self.model = transformers.LlavaForConditionalGeneration.from_pretrained(
            folder, dtype=getattr(torch, dtype)).eval()
        self.dtype = getattr(torch, dtype)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.model.get_image_features(pixel_values=pixels.to(self.dtype))

    def run(self, ids: list[list[int]], pixels: torch.Tensor, n: int, stamps: list[float]) -> None:
        class Stamps:  # transformers' streamer protocol: put(prompt ids) once, then put(new ids) per step
            calls = 0

            def put(self, value):
                self.calls += 1
                if self.calls > 1:
                    stamps.append(time.perf_counter())

            def end(self):
                pass

        x = torch.tensor(ids)
        with torch.inference_mode():
            self.model.generate(input_ids=x, attention_mask=torch.ones_like(x), pixel_values=pixels.to(self.dtype),
                                max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                                streamer=Stamps() if len(ids) == 1 else None)
        if len(ids) > 1:
            stamps.append(time.perf_counter())


def load_variant(spec: str, folder: Path, compile: bool = False):
    """impl:dtype[:quantization][:torchmv], e.g. ours:bfloat16:int8, ours:bfloat16:torchmv (without our kernels)."""
    impl, dtype, *mods = spec.split(":")
    quantize = next((m for m in mods if m != "torchmv"), None)
    if impl != "ours":
        return Theirs(folder, dtype, quantize, compile)
    return Ours(folder, dtype, quantize, compile, kernel="torchmv" not in mods)


def inputs(folder: Path, n_images: int):
    """Prompt ids (one image + the question, as `llava ask` renders it) and preprocessed random photos."""
    from PIL import Image

    from llava_cli.pipeline import Llava
    from llava_cli.templates import Message

    llava = Llava.load(folder, weights=False)
    ids = llava.prompt([Message("user", QUESTION, images=1)]).ids
    gen = torch.Generator().manual_seed(0)
    photos = [Image.fromarray(torch.randint(0, 256, (480, 640, 3), generator=gen, dtype=torch.uint8).numpy())
              for _ in range(n_images)]
    from llava_cli.image import preprocess

    return ids, preprocess(photos, llava.image_config), llava.config


def _bytes(*modules) -> int:
    """Bytes of the distinct tensors (parameters and buffers) of `modules`; a tied weight counts once."""
    seen = {}
    for mod in modules:
        for t in list(mod.parameters()) + list(mod.buffers()):
            seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


def footprint(m, cfg, context: int) -> dict:
    """Weight bytes held, and bytes one decode step reads: decoder layers, output head and the KV cache."""
    if isinstance(m, Ours):
        lm = m.model.language_model
        layers, head, whole = lm.model.layers, lm.lm_head, m.model
    else:
        layers, head, whole = m.model.model.language_model.layers, m.model.lm_head, m.model
    elem = next(whole.parameters()).element_size() if not isinstance(m, Ours) else m.model.dtype.itemsize
    t = cfg.text
    kv = 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * context * elem
    return {"weight_bytes": _bytes(whole), "decode_bytes": _bytes(layers) + _bytes(head) + kv}
