"""Generated token ids -> the text of an answer: streamed detokenization, cut at stop tokens and stop strings."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .pipeline import Llava


@dataclass
class Answer:
    """One row of a batch: its text, how many tokens it generated (a stop token included) and why it ended."""

    text: str = ""
    tokens: int = 0
    stop_reason: str = "max_tokens"  # or "stop": a stop token or stop string


class StopFilter:
    """Streams text through, holding back any tail that might begin a stop string, and cuts at the first one."""

    def __init__(self, stops: Sequence[str]):
        self.stops, self.held, self.stopped = tuple(s for s in stops if s), "", False

    def push(self, text: str) -> str:
        text = self.held + text
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self.held = True, ""
            return text[: min(hits)]
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep:]
        return text[: len(text) - keep]

    def flush(self) -> str:
        text, self.held = self.held, ""
        return text


class AnswerStream:
    """One answer's token ids -> text: streamed detokenization, cut at a stop id or a template stop string."""

    def __init__(self, llava: Llava):
        self.stream, self.stops = llava.tokenizer.stream(), set(llava.stop_ids)
        self.filter = StopFilter(llava.template.stop_strings)
        self.done = False

    def push(self, token: int) -> str:
        """The text that is final once `token` is added; '' after the answer is done."""
        if self.done:
            return ""
        if token in self.stops:
            self.done = True
            return self.filter.flush()
        text = self.filter.push(self.stream.push(token))
        self.done = self.filter.stopped
        return text

    def flush(self) -> str:
        if not self.done:
            self.filter.push(self.stream.flush())
        return self.filter.flush()

    def reason(self, generated: int, max_new: int) -> str:
        """Why the answer ended: "stop", "max_tokens", or "interrupted"."""
        return "stop" if self.done else "max_tokens" if generated >= max_new else "interrupted"
