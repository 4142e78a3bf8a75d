"""`llava batch` at its core: items -> length-sorted batches decoded together -> one record per item.

Images are taken a window at a time (a few batches' worth): each is read and hashed once, encoded once for all
its questions, and its items are sorted by prompt length into batches, so left padding stays short. A record is
written as soon as its batch ends; a crash loses at most the batch in flight.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .batch_output import OutputError, RecordWriter, sidecar_path, write_sidecar
from .errors import LlavaError
from .generate import Sampling
from .pipeline import Llava, Prompt, Stats
from .sources import is_url, load_image_hashed
from .templates import Message

WINDOW_BATCHES = 4  # a window holds this many batches' worth of items, sorted by length together


@dataclass(frozen=True)
class Job:
    """Everything besides the image and the prompt that decides an answer: part of every item's key."""

    model: str
    template: str
    dtype: str
    max_tokens: int
    sampling: Sampling = Sampling()
    system: str | None = None
    pad_square: bool = False
    quantize: str | None = None

    @property
    def settings(self) -> dict:
        s = self.sampling
        return {"max_tokens": self.max_tokens, "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k,
                "system": self.system, "pad_square": self.pad_square, "dtype": self.dtype, "quantize": self.quantize}

    def key(self, image_id: str, prompt: str) -> str:
        """sha256 of the image's content (or its source, when unreadable), the prompt and the settings."""
        blob = json.dumps([image_id, prompt, self.model, self.template, self.sampling.seed, self.settings],
                          sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def record(self, image: str, prompt: str, key: str, sha: str | None, **fields) -> dict:
        return {"image": image, "prompt": prompt, **fields, "model": self.model, "template": self.template,
                "seed": self.sampling.seed, "settings": self.settings, "image_sha256": sha, "key": key}


@dataclass
class Summary:
    total: int
    done: int = 0
    failed: int = 0
    skipped: int = 0  # already in the output (or, with --sidecar, already captioned)
    duplicates: int = 0  # the same image content and prompt as an earlier item of this run
    started: float = field(default_factory=time.perf_counter)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started


@dataclass
class _Live:
    """An item that will be answered: where its image's features are and its rendered prompt."""

    image: str
    text: str
    key: str
    sha: str
    slot: int  # index of its image in the window
    prompt: Prompt
    load_s: float


def run_batch(llava: Llava, groups: Sequence[tuple[str, list[str]]], job: Job, writer: RecordWriter, *,
              batch_size: int = 8, sidecar: bool = False, summary: Summary | None = None,
              on_record: Callable[[str, dict | None], None] = lambda kind, record: None) -> Summary:
    """Answer every (image, prompts) group; `on_record(kind, record)` hears of each item: done, failed, skipped."""
    summary = summary or Summary(total=sum(len(p) for _, p in groups))
    prompts: dict[str, Prompt | LlavaError] = {}
    scheduled: set[tuple[str, str | None]] = set()

    def emit(kind: str, record: dict | None) -> None:
        if record is not None:
            writer.write(record)
        setattr(summary, kind, getattr(summary, kind) + 1)
        on_record(kind, record)

    def fail(image: str, prompt: str, key: str, sha: str | None, error: Exception) -> None:
        emit("failed", job.record(image, prompt, key, sha, error=str(error)))

    for window in _windows(groups, batch_size * WINDOW_BATCHES):
        images, live = [], []
        for source, texts in window:
            start = time.perf_counter()
            try:
                if sidecar and is_url(source):
                    raise LlavaError(f"cannot write a caption file next to a URL image '{source}'")
                image, sha = load_image_hashed(source)
            except LlavaError as e:
                for text in texts:
                    key = job.key("source:" + source, text)
                    if key in writer.done:
                        emit("skipped", None)
                    else:
                        fail(source, text, key, None, e)
                continue
            load_s = time.perf_counter() - start
            for text in texts:
                key = job.key(sha, text)
                # with --sidecar every file gets its caption, copies too; otherwise one record per content and prompt
                if sidecar_path(source).exists() if sidecar else key in writer.done:
                    emit("skipped", None)
                    continue
                if (key, source if sidecar else None) in scheduled:
                    emit("duplicates", None)
                    continue
                scheduled.add((key, source if sidecar else None))
                prompt = _prompt(llava, job, text, prompts)
                if isinstance(prompt, LlavaError):
                    fail(source, text, key, sha, prompt)
                    continue
                if not images or images[-1][0] != source:
                    images.append((source, image))
                live.append(_Live(source, text, key, sha, len(images) - 1, prompt, load_s))
        features, vision_s = _encode(llava, [im for _, im in images], job.pad_square, batch_size)
        live.sort(key=lambda item: item.prompt.tokens)  # similar lengths together: little padding
        for at in range(0, len(live), batch_size):
            batch = [item for item in live[at:at + batch_size] if not _failed_image(item, features, fail)]
            if batch:
                _answer(llava, job, batch, features, vision_s, emit, fail, sidecar)
    return summary


def _windows(groups, items_per_window: int) -> Iterator[list]:
    window, count = [], 0
    for group in groups:
        window.append(group)
        count += len(group[1])
        if count >= items_per_window:
            yield window
            window, count = [], 0
    if window:
        yield window


def _prompt(llava: Llava, job: Job, text: str, cache: dict) -> Prompt | LlavaError:
    """The rendered prompt for one question about one image, or why it cannot be asked; computed once per text."""
    if text not in cache:
        messages = ([Message("system", job.system)] if job.system is not None else []) + [Message("user", text, images=1)]
        try:
            prompt = llava.prompt(messages)
            llava.check_fits(prompt, job.max_tokens)
            cache[text] = prompt
        except LlavaError as e:
            cache[text] = e
    return cache[text]


def _encode(llava: Llava, images, pad_square: bool, chunk: int) -> tuple[list, list[float]]:
    """Each image -> its (image_tokens, D) features, or the LlavaError that stopped it; and its share of the time."""
    features: list = []
    seconds: list[float] = []
    for at in range(0, len(images), chunk):
        part = images[at:at + chunk]
        start = time.perf_counter()
        try:
            features += list(llava.encode_images(part, pad_square))
        except LlavaError:  # one bad image (e.g. too elongated to resize): find it, keep the others
            for image in part:
                try:
                    features += list(llava.encode_images([image], pad_square))
                except LlavaError as e:
                    features.append(e)
        seconds += [(time.perf_counter() - start) / len(part)] * len(part)
    return features, seconds


def _failed_image(item: _Live, features: list, fail) -> bool:
    if isinstance(error := features[item.slot], LlavaError):
        fail(item.image, item.text, item.key, item.sha, error)
        return True
    return False


def _answer(llava: Llava, job: Job, batch: list[_Live], features: list, vision_s: list[float], emit, fail,
            sidecar: bool) -> None:
    """Decode one batch together and emit a record per item; a failure of the batch fails its items only."""
    stats = Stats()
    try:
        feats = torch.stack([features[item.slot] for item in batch])  # (B, image_tokens, D)
        answers = llava.answer_features([item.prompt for item in batch], feats, sampling=job.sampling,
                                        max_tokens=job.max_tokens, stats=stats)
    except (LlavaError, RuntimeError) as e:  # RuntimeError: out of memory, and the like
        for item in batch:
            fail(item.image, item.text, item.key, item.sha, e)
        return
    for item, answer in zip(batch, answers):
        record = job.record(
            item.image, item.text, item.key, item.sha, answer=answer.text,
            tokens={"prompt": item.prompt.tokens, "image": item.prompt.images * llava.config.image_tokens,
                    "generated": answer.tokens},
            stop_reason=answer.stop_reason,
            timings={"load_image_s": round(item.load_s, 4), "vision_s": round(vision_s[item.slot], 4),
                     "first_token_s": round(stats.first_token_s, 4), "decode_s": round(stats.decode_s, 4),
                     "batch_size": len(batch)},
        )
        if sidecar:
            try:
                write_sidecar(item.image, answer.text)
            except OutputError:  # a full disk: the run stops, as it does when records cannot be written
                raise
            except LlavaError as e:
                record["error"] = str(e)
        emit("failed" if "error" in record else "done", record)
