"""Token generation: left-padded prefill, then one decode step per new token. The engine knows only token ids."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from . import kernels
from .decoder import Step
from .errors import LlavaError
from .llava import LlavaModel


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. temperature 0 is greedy; a seed makes sampling reproducible."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise LlavaError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise LlavaError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise LlavaError(f"top-k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self, device: torch.device) -> torch.Generator | None:
        return None if self.seed is None else torch.Generator(device).manual_seed(self.seed)


def sample(logits: torch.Tensor, s: Sampling, gen: torch.Generator | None) -> torch.Tensor:
    """(B, V) float32 logits -> (B,) token ids; temperature, then top-k, then top-p, as transformers orders them."""
    if s.greedy:
        fast = kernels.argmax(logits)
        return logits.argmax(-1) if fast is None else fast
    logits = logits / s.temperature
    if s.top_k:
        kth = torch.topk(logits, min(s.top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= s.top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, T) padded on the left, and (B, T) bool marking the real tokens."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    valid = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, p in enumerate(prompts):
        if p:
            ids[row, width - len(p):] = torch.tensor(p)
            valid[row, width - len(p):] = True
    return ids.to(device), valid.to(device)


def prefill_mask(valid: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool: causal, padding hidden; a padding query sees itself so no softmax row is empty."""
    t = valid.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=valid.device).tril()
    eye = torch.eye(t, dtype=torch.bool, device=valid.device)
    return (causal & valid[:, None, :] | eye)[:, None]


def generate(
    model: LlavaModel,
    prompts: Sequence[Sequence[int]],
    image_features: torch.Tensor | None,
    *,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    stop_ids: Sequence[int] = (),
    pad_id: int = 0,
    past: int = 0,
) -> Iterator[torch.Tensor]:
    """Yield (B,) new token ids per step until every row has produced a stop id or max_new_tokens are out.

    image_features (N, tokens, D) fill the prompts' image-token positions in order. Rows that are done keep
    receiving `pad_id`; the caller ignores them. `past` > 0 continues one conversation (B = 1): the model's cache
    already holds its first `past` positions, and `prompts` are only the tokens that follow them.
    """
    device = model.device
    if past and len(prompts) != 1:
        raise ValueError("continuing from a cache takes one prompt")
    ids, valid = left_pad(prompts, pad_id, device)
    b, t = ids.shape
    padded = not bool(valid.all())
    cache = model.setup_cache(b, past + t + max_new_tokens, keep=past)
    keys_valid = torch.ones(b, cache.max_len, dtype=torch.bool, device=device)
    keys_valid[:, past:past + t] = valid
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0) + past  # real tokens count from 0 in every row
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    gen = sampling.generator(device)
    done = torch.zeros(b, dtype=torch.bool, device=device)

    with torch.inference_mode():  # not held across the yields below, so callers run in normal mode
        mask = prefill_mask(valid) if padded else None  # None: causal after the cached past
        logits = model(model.embed(ids, image_features), Step(past, positions, mask))
    next_pos = positions[:, -1:] + 1
    embed_tokens = model.language_model.model.embed_tokens
    for i in range(max_new_tokens):
        tok = sample(logits[:, -1], sampling, gen)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        yield tok
        done |= torch.isin(tok, stops)
        if bool(done.all()) or i == max_new_tokens - 1:
            return
        end = past + t + i + 1
        with torch.inference_mode():
            step = Step(past + t + i, next_pos, keys_valid[:, None, None, :end] if padded else None)
            logits = model(embed_tokens(tok[:, None]), step)
        next_pos = next_pos + 1
