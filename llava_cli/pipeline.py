"""The public API: load a checkpoint once, then turn images and questions into streamed answers."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL.Image import Image

from .config import LlavaConfig, read_generation
from .devices import memory_peak, resolve_device, resolve_dtype, set_threads
from .errors import LlavaError
from .files import read_json
from .answers import Answer, AnswerStream
from .generate import Sampling, generate
from .hub import missing_files, resolve
from .image import ImageProcessorConfig, preprocess
from .templates import Message, Template, get_template, template_for, template_of_checkpoint
from .tokenizer import Tokenizer, expand_image_tokens


@dataclass
class Prompt:
    """A rendered conversation and its token ids, image tokens expanded."""

    text: str
    ids: list[int]
    images: int

    @property
    def tokens(self) -> int:
        return len(self.ids)


@dataclass
class Stats:
    """What one answer cost; times in seconds, memory in bytes."""

    prompt_tokens: int = 0
    image_tokens: int = 0
    generated_tokens: int = 0
    load_s: float = 0.0
    vision_s: float = 0.0
    first_token_s: float = 0.0
    decode_s: float = 0.0
    peak_memory: int = 0
    stop_reason: str = ""
    reused_tokens: int = 0  # prompt tokens a chat found already in the KV cache

    @property
    def tokens_per_s(self) -> float:
        return (self.generated_tokens - 1) / self.decode_s if self.generated_tokens > 1 and self.decode_s else 0.0


class Llava:
    """A loaded checkpoint: config, tokenizer, image preprocessing, template and (unless asked not to) weights."""

    def __init__(self, folder: Path, name: str, template: str | None = None):
        self.folder, self.name = folder, name
        if missing := missing_files(folder):
            raise LlavaError(f"{folder}: not a checkpoint folder, missing {', '.join(missing)}")
        self.config = LlavaConfig.from_file(folder / "config.json")
        self.tokenizer = Tokenizer.from_folder(folder)
        self.image_config = ImageProcessorConfig.from_file(folder / "preprocessor_config.json")
        self.template: Template = resolve_template(folder, self.config, template)
        token, want = self.template.image_token, self.config.image_token_id
        if (got := self.tokenizer.token_to_id(token)) != want:
            has = f"has {token} as id {got}" if got is not None else f"has no {token} token"
            raise LlavaError(f"{folder / 'tokenizer.json'} {has}, but config.json's image_token_index is {want}; "
                             "the tokenizer files are not this checkpoint's")
        self.generation = read_generation(folder / "generation_config.json")
        self.model = None
        self.dtype: torch.dtype | None = None
        self.load_s = 0.0

    @classmethod
    def load(cls, model: str | Path, *, dtype: str = "auto", device: str = "auto", template: str | None = None,
             weights: bool = True, name: str | None = None, quantize: str | None = None,
             threads: int | None = None, compile: bool = False) -> Llava:
        """Resolve a hub id or folder and load it; `weights=False` stops before the tensors (for --show-prompt).

        quantize: int8 | int4 (CPU) or nf4 | int8 (CUDA, bitsandbytes), see quant.py. threads: CPU threads for torch,
        default the cores idle right now (devices.default_threads). compile: torch.compile the decode step.
        """
        start = time.perf_counter()
        folder = model if isinstance(model, Path) else resolve(model)
        llava = cls(folder, name or str(model), template)
        llava.load_s = time.perf_counter() - start
        if weights:
            llava.load_weights(dtype=dtype, device=device, quantize=quantize, threads=threads, compile=compile)
        return llava

    def load_weights(self, *, dtype: str = "auto", device: str = "auto", quantize: str | None = None,
                     threads: int | None = None, compile: bool = False) -> None:
        """The tensors of a Llava loaded with `weights=False`: `ask` checks its prompt against the context first."""
        from .weights import load_model

        start = time.perf_counter()
        dev = resolve_device(device)
        if dev.type == "cpu":
            set_threads(threads)
        self.dtype = resolve_dtype(dtype, dev)
        self.model = load_model(self.folder, self.config, self.dtype, dev, quantize=quantize)
        if compile:
            self.model.compile_decode()
        self.load_s += time.perf_counter() - start

    @property
    def pad_id(self) -> int:
        """What fills left padding and finished rows (never attended to, never shown)."""
        return self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0

    @property
    def stop_ids(self) -> list[int]:
        eos = self.generation.get("eos_token_id", self.config.text.eos_token_id)
        ids = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_id}
        ids |= {self.tokenizer.token_to_id(t) for t in self.template.stop_tokens}
        return sorted(i for i in ids if i is not None)

    def prompt(self, messages: Sequence[Message]) -> Prompt:
        """Render and tokenize a conversation; each image becomes the config's number of image tokens."""
        parts = self.template.render_parts(messages)
        text = "".join(part.text for part in parts)
        ids = self.tokenizer.encode_parts(parts)  # special-token strings in the messages stay plain text
        n_images = sum(m.images for m in messages)
        ids = expand_image_tokens(ids, self.config.image_token_id, self.config.image_tokens)
        return Prompt(text, ids, n_images)

    def check_fits(self, prompt: Prompt, max_tokens: int) -> None:
        """Refuse before any compute when the prompt leaves no room to answer in the model's context."""
        ctx = self.config.context_length
        if prompt.tokens + 1 > ctx:
            image_part = f", {prompt.images * self.config.image_tokens} of them image tokens" if prompt.images else ""
            raise LlavaError(f"the prompt is {prompt.tokens} tokens{image_part}; the model's context is {ctx}")
        if max_tokens < 1:
            raise LlavaError(f"max tokens must be at least 1, got {max_tokens}")

    def encode_images(self, images: Sequence[Image], pad_square: bool = False) -> torch.Tensor | None:
        """Images -> (N, image_tokens, D) features on the model's device, or None for no images."""
        if not images:
            return None
        pixels = preprocess(images, self.image_config, pad_square=pad_square)
        with torch.inference_mode():
            return self.model.encode_images(pixels)

    def stream(self, prompt: Prompt, images: Sequence[Image], *, sampling: Sampling = Sampling(),
               max_tokens: int = 512, pad_square: bool = False, stats: Stats | None = None) -> Iterator[str]:
        """Stream the answer to one prompt as text chunks; fills `stats` as it goes."""
        for _, text in self._run([prompt], [list(images)], sampling, max_tokens, pad_square, stats or Stats()):
            yield text

    def answer_batch(self, prompts: Sequence[Prompt], images: Sequence[Sequence[Image]], *,
                     sampling: Sampling = Sampling(), max_tokens: int = 512, pad_square: bool = False,
                     stats: Stats | None = None) -> list[str]:
        """Answer several prompts decoded together (left padding); returns the answers in order."""
        out = [""] * len(prompts)
        for row, text in self._run(prompts, images, sampling, max_tokens, pad_square, stats or Stats()):
            out[row] += text
        return out

    def answer_features(self, prompts: Sequence[Prompt], features: torch.Tensor | None, *,
                        sampling: Sampling = Sampling(), max_tokens: int = 512,
                        stats: Stats | None = None) -> list[Answer]:
        """Like answer_batch, from image features already encoded ((N, image_tokens, D), the prompts' images in
        order), so an image asked several questions is encoded once; text, token count and stop reason per row."""
        answers = [Answer() for _ in prompts]
        for row, text in self._run(prompts, None, sampling, max_tokens, False, stats or Stats(), features, answers):
            answers[row].text += text
        return answers

    def _run(self, prompts, images, sampling, max_tokens, pad_square, stats: Stats, features=None,
             answers: list[Answer] | None = None) -> Iterator[tuple[int, str]]:
        if self.model is None:
            raise LlavaError("the model was loaded without weights")
        for p in prompts:
            self.check_fits(p, max_tokens)
        # each row stops where it would alone: at max_tokens or at the end of the context after its own prompt
        limits = [min(max_tokens, self.config.context_length - p.tokens) for p in prompts]
        answers = answers if answers is not None else [Answer() for _ in prompts]
        stats.prompt_tokens = sum(p.tokens for p in prompts)
        stats.image_tokens = sum(p.images for p in prompts) * self.config.image_tokens
        start = time.perf_counter()
        feats = features if images is None else self.encode_images([im for row in images for im in row], pad_square)
        stats.vision_s = time.perf_counter() - start
        streams = [AnswerStream(self) for _ in prompts]
        tokens = generate(self.model, [p.ids for p in prompts], feats, max_new_tokens=max(limits),
                          sampling=sampling, stop_ids=self.stop_ids, pad_id=self.pad_id)
        finished = lambda row: streams[row].done or answers[row].tokens >= limits[row]  # noqa: E731
        stats.stop_reason = "max_tokens"
        try:
            for step, tok in enumerate(tokens):
                now = time.perf_counter()
                if step == 0:
                    stats.first_token_s = now - start
                stats.decode_s = now - start - stats.first_token_s
                stats.generated_tokens += 1
                for row, t in enumerate(tok.tolist()):
                    if finished(row):
                        continue
                    answers[row].tokens += 1
                    text = streams[row].push(t)
                    if streams[row].done:
                        answers[row].stop_reason = "stop"
                    if text:
                        yield row, text
                if all(finished(row) for row in range(len(prompts))):
                    if all(a.stop_reason == "stop" for a in answers):
                        stats.stop_reason = "stop"
                    break
            for row, stream in enumerate(streams):
                if tail := stream.flush():
                    yield row, tail
        finally:
            tokens.close()
            stats.peak_memory = memory_peak(self.model.device)


def resolve_template(folder: Path, cfg: LlavaConfig, name: str | None) -> Template:
    """--template, else the template the checkpoint's own chat template is known to be, else the family's."""
    if name:
        return get_template(name)
    source = read_json(folder / "chat_template.json", required=False).get("chat_template")
    if source is None and (folder / "chat_template.jinja").is_file():
        source = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    known = template_of_checkpoint(source) if isinstance(source, str) else None
    return known or template_for(cfg.model_type, cfg.text.model_type, cfg.vision.model_type)


