"""The LLaVA model: vision tower -> projector -> image features merged into the decoder's token embeddings.

llava-1.5, ViP-LLaVA and interleave-qwen are this one architecture with different parts, chosen by the config.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import LlavaConfig
from .decoder import CausalLM, KVCache, Linear, Step
from .errors import LlavaError
from .vision import VisionTower, activation


class Projector(nn.Module):
    """`multi_modal_projector`: linear, gelu, linear; ViP-LLaVA first normalises its concatenated layers."""

    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        width = cfg.vision.hidden_size * len(cfg.feature_layers)
        if cfg.projector_layernorm_eps is not None:
            self.projector_layernorm = nn.LayerNorm(width, eps=cfg.projector_layernorm_eps)
        self.linear_1 = Linear(width, cfg.text.hidden_size, bias=cfg.projector_bias)
        self.act = activation(cfg.projector_act)
        self.linear_2 = Linear(cfg.text.hidden_size, cfg.text.hidden_size, bias=cfg.projector_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "projector_layernorm"):
            x = self.projector_layernorm(x)
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaModel(nn.Module):
    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = VisionTower(cfg.vision, cfg.vision_layers_used)
        self.multi_modal_projector = Projector(cfg)
        self.language_model = CausalLM(cfg.text, cfg.tie_word_embeddings)
        self.cache: KVCache | None = None
        self.compiled_step = None  # compile_decode() sets it

    def compile_decode(self) -> None:
        """torch.compile the one-token decode step (positions dynamic, so it compiles once); prefill stays eager.

        Compiling takes 1-1.5 minutes on 2 cores for the 0.5B model. On the CPU the matrix-vector products are ~92% of
        a decode step and stay library calls, and the compiled step measured slower (bfloat16, 1 thread: 7.7 against
        9.0 tokens/s eager); it is meant for CUDA, where per-operation launch overhead dominates (untested here).
        """
        from .quant_layers import Int4Linear, Int8Linear

        for m in self.modules():  # a compiled graph runs torch's packed kernels: their layouts now, not while tracing
            if isinstance(m, Int4Linear):
                m.packed_weight()
            elif isinstance(m, Int8Linear):
                m.plain_qweight()  # tiled weights become rows
        self.compiled_step = torch.compile(self.step, dynamic=True)

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.language_model.model.embed_tokens.weight.device

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) pixel values -> (N, image_tokens, text hidden) features."""
        states = self.vision_tower.vision_model(pixels.to(self.device, self.dtype), self.cfg.feature_layers)
        if self.cfg.select_strategy == "default" and self.cfg.vision.class_token:
            states = [s[:, 1:] for s in states]
        return self.multi_modal_projector(torch.cat(states, dim=-1))

    def embed(self, ids: torch.Tensor, images: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings (B, T, D) with each run of image tokens replaced by one image's features, in order."""
        image_slots = ids == self.cfg.image_token_id
        n_slots = int(image_slots.sum())
        # The image token id is a real vocabulary row; look it up safely and overwrite it below.
        embeds = self.language_model.model.embed_tokens(ids)
        if images is None:
            if n_slots:
                raise LlavaError(f"the prompt holds {n_slots} image tokens but no image was given")
            return embeds
        feats = images.reshape(-1, images.shape[-1]).to(embeds.dtype)
        if feats.shape[0] != n_slots:
            raise LlavaError(f"the prompt holds {n_slots} image tokens but the images give {feats.shape[0]} features")
        return embeds.masked_scatter(image_slots[..., None], feats)

    def setup_cache(self, batch: int, max_len: int, keep: int = 0) -> KVCache:
        """A KV cache for `batch` rows of `max_len` positions; reused when the current one is big enough.

        `keep` > 0 carries the first `keep` positions over when the cache has to grow (a conversation going on);
        it then at least doubles, up to the model's context, so a long chat reallocates only a few times.
        Each call also drops the decode kernel's plan, so it is rebuilt from the weights as they are now.
        """
        self.language_model.model.forget_plan()
        old = self.cache
        if old is not None and old.fits(batch, max_len, self.dtype, self.device):
            return old
        if keep and old is not None:
            max_len = min(max(max_len, 2 * old.max_len), max(max_len, self.cfg.context_length))
            self.cache = KVCache(self.cfg.text, batch, max_len, self.dtype, self.device)
            self.cache.k[:, :, :, :keep] = old.k[:, :, :, :keep]
            self.cache.v[:, :, :, :keep] = old.v[:, :, :, :keep]
        else:
            self.cache = None  # free the old buffers before allocating new ones
            self.cache = KVCache(self.cfg.text, batch, max_len, self.dtype, self.device)
        return self.cache

    def forward(self, embeds: torch.Tensor, step: Step, last_only: bool = True) -> torch.Tensor:
        """Logits (B, 1 or T, vocab) in float32; the output head runs on the last position only unless asked."""
        assert self.cache is not None, "setup_cache() first"
        if self.compiled_step is not None and embeds.shape[1] == 1 and step.mask is None:
            return self.compiled_step(embeds, step, last_only)
        return self.step(embeds, step, last_only)

    def step(self, embeds: torch.Tensor, step: Step, last_only: bool) -> torch.Tensor:
        h = self.language_model.model(embeds, step, self.cache, last_only)  # (B, 1, hidden) with last_only
        return self.language_model.lm_head(h).float()
