"""A chat session: one loaded model, a conversation that grows turn by turn, and the KV cache that keeps it.

A new turn re-renders the whole conversation with the template (so the answer is exactly what a fresh `ask` of the
full history would give), then prefills only the tokens past the longest prefix the cache already holds. Image
tokens are compared by the image's content hash, so a different picture at the same place is never mistaken for a
cached one; each image is encoded once per session.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch
from PIL.Image import Image

from .devices import memory_peak
from .errors import LlavaError
from .generate import Sampling, generate
from .answers import AnswerStream
from .pipeline import Llava, Prompt, Stats
from .templates import Message


def image_sha256(image: Image) -> str:
    """A hash of the decoded pixels: the same picture from another file or URL is the same image."""
    h = hashlib.sha256(f"{image.mode} {image.size[0]}x{image.size[1]}\n".encode())
    h.update(image.tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class ChatImage:
    """An image of the conversation and where it came from (a path or URL, kept to save the chat)."""

    source: str
    sha256: str
    image: Image = field(repr=False, compare=False)


@dataclass
class Settings:
    """What /set changes; sampling follows them from the next turn on."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int = 512

    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.top_p, self.top_k, self.seed)

    def changed(self, name: str, value: str) -> Settings:
        """A copy with one setting parsed from text, validated as the command-line options are."""
        kinds = {"temperature": float, "top_p": float, "top_k": int, "seed": int, "max_tokens": int}
        if name not in kinds:
            raise LlavaError(f"unknown setting {name!r}; settings: {', '.join(kinds)}")
        if name == "seed" and value.lower() in ("none", "off", ""):
            return replace(self, seed=None)
        try:
            parsed = kinds[name](value)
        except ValueError:
            raise LlavaError(f"{name} takes {'an integer' if kinds[name] is int else 'a number'}, not {value!r}") from None
        new = replace(self, **{name: parsed})
        new.sampling()  # raises on a value out of range
        if new.max_tokens < 1:
            raise LlavaError(f"max_tokens must be at least 1, got {new.max_tokens}")
        return new


@dataclass
class Turn:
    """One exchange: the user's text with the images it brought, and the answer (None while unanswered)."""

    text: str
    images: list[ChatImage]
    answer: str | None = None


class ChatSession:
    """A conversation against one loaded model; the model's KV cache holds its tokens between turns."""

    def __init__(self, llava: Llava, settings: Settings | None = None, system: str | None = None,
                 pad_square: bool = False):
        self.llava, self.settings, self.system, self.pad_square = llava, settings or Settings(), system, pad_square
        self.turns: list[Turn] = []
        self.pending: list[ChatImage] = []  # added with /image, sent with the next question
        self.stats = Stats()
        self._features: dict[str, torch.Tensor] = {}  # sha256 -> (image_tokens, D), once per session
        self._cached: list[int | str] = []  # what the cache holds, position by position (image slots by sha256)
        self.last_tokens: list[int] = []  # the ids the last answer generated, its stop token included

    @property
    def images(self) -> list[ChatImage]:
        """Every image of the conversation in prompt order, then the pending ones."""
        return [im for t in self.turns for im in t.images] + self.pending

    def add_image(self, source: str, image: Image) -> ChatImage:
        item = ChatImage(source, image_sha256(image), image)
        self.pending.append(item)
        return item

    def clear(self) -> None:
        """A new conversation with the same model, settings and system prompt."""
        self.turns, self.pending = [], []

    def undo(self) -> Turn | None:
        """Drop the last exchange and its images; returns it, or None when there is nothing to drop."""
        return self.turns.pop() if self.turns else None

    def messages(self, turns: list[Turn]) -> list[Message]:
        msgs = [Message("system", self.system)] if self.system is not None else []
        for t in turns:
            msgs.append(Message("user", t.text, images=len(t.images)))
            if t.answer is not None:
                msgs.append(Message("assistant", t.answer))
        return msgs

    def prompt(self, question: str | None = None) -> Prompt:
        """The whole conversation rendered, plus `question` with the pending images as the next user turn."""
        turns = self.turns + ([Turn(question, self.pending)] if question is not None else [])
        return self.llava.prompt(self.messages(turns))

    def oldest_droppable(self, question: str, room: int = 1) -> int:
        """How many of the oldest turns must go for the next prompt (and `room` answer tokens) to fit; -1 if none can."""
        ctx = self.llava.config.context_length
        for n in range(len(self.turns) + 1):
            turns = self.turns[n:] + [Turn(question, self.pending)]
            if (prompt := self.llava.prompt(self.messages(turns))).tokens + room <= ctx:
                return n
        self.llava.check_fits(prompt, room)  # the question alone is too long: say by how much, image tokens counted
        return -1

    def drop_oldest(self, n: int) -> None:
        del self.turns[:n]

    def ask(self, question: str) -> Iterator[str]:
        """Stream the answer to the next question; the turn joins the conversation even when interrupted."""
        llava, turn = self.llava, Turn(question, self.pending)
        prompt = llava.prompt(self.messages(self.turns + [turn]))
        llava.check_fits(prompt, self.settings.max_tokens)
        keys = self._keys(prompt.ids, self.images)  # the turn holds the pending images: the same list, in order
        past = _common_prefix(self._cached, keys)
        past = min(past, len(keys) - 1)  # at least one token runs, to give the next token's logits
        new_images = self._images_from(keys, past)
        stats = self.stats = Stats(prompt_tokens=prompt.tokens, image_tokens=prompt.images * llava.config.image_tokens)
        stats.reused_tokens = past
        start = time.perf_counter()
        feats = self._encode(new_images)
        stats.vision_s = time.perf_counter() - start
        max_new = min(self.settings.max_tokens, llava.config.context_length - prompt.tokens)
        self._cached = keys[:past]  # prefill overwrites what lies past the shared prefix
        tokens = generate(llava.model, [prompt.ids[past:]], feats, max_new_tokens=max_new,
                          sampling=self.settings.sampling(), stop_ids=llava.stop_ids, pad_id=llava.pad_id, past=past)
        answer = AnswerStream(llava)
        generated: list[int] = []
        self.pending, turn.answer = [], ""
        self.turns.append(turn)
        try:
            for tok in tokens:
                generated.append(int(tok[0]))
                if len(generated) == 1:
                    stats.first_token_s = time.perf_counter() - start
                stats.decode_s = time.perf_counter() - start - stats.first_token_s
                text = answer.push(generated[-1])
                turn.answer += text
                if text:
                    yield text
                if answer.done:
                    break
            if tail := answer.flush():
                turn.answer += tail
                yield tail
        finally:
            tokens.close()
            self.last_tokens = generated
            stats.peak_memory = memory_peak(llava.model.device)
            stats.generated_tokens, stats.stop_reason = len(generated), answer.reason(len(generated), max_new)
            if generated:  # the prefill finished; every generated token but the last has been through the model
                self._cached = keys + generated[:-1]
            if not generated:  # stopped before the first token: as if the question had not been asked
                self.turns.pop()
                self.pending = turn.images

    def retry(self) -> Iterator[str]:
        """Answer the last question again."""
        if not self.turns:
            raise LlavaError("nothing to retry: the conversation is empty")
        last = self.turns.pop()
        self.pending = last.images + self.pending
        return self.ask(last.text)

    def _keys(self, ids: list[int], images: list[ChatImage]) -> list[int | str]:
        """Token ids with each image's slots named by its hash, so that two pictures never compare equal."""
        image_id, per = self.llava.config.image_token_id, self.llava.config.image_tokens
        keys: list[int | str] = list(ids)
        slots = [i for i, t in enumerate(ids) if t == image_id]
        for n, i in enumerate(slots):
            keys[i] = f"{images[n // per].sha256}:{n % per}"
        return keys

    def _images_from(self, keys: list[int | str], past: int) -> list[ChatImage]:
        """The images whose slots lie past `past`, in order (a shared prefix never ends inside an image's slots,
        as slots are keyed by their index within the image)."""
        ordered = [k.split(":")[0] for k in keys[past:] if isinstance(k, str) and k.endswith(":0")]
        by_sha = {im.sha256: im for im in self.images}
        return [by_sha[s] for s in ordered]

    def _encode(self, images: list[ChatImage]) -> torch.Tensor | None:
        for im in images:
            if im.sha256 not in self._features:
                self._features[im.sha256] = self.llava.encode_images([im.image], self.pad_square)[0]
        return torch.stack([self._features[im.sha256] for im in images]) if images else None


def _common_prefix(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
