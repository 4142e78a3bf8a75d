"""Llama and Qwen2 decoders: RMSNorm, RoPE, grouped-query attention over a preallocated KV cache.

Attribute names mirror the hub keys below `language_model.` (`model.layers.N.self_attn.q_proj`, `lm_head`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .config import TextConfig

LOW_PRECISION = (torch.bfloat16, torch.float16)


_onednn_failed = False  # set when oneDNN refused once (a CPU without bfloat16 matmuls): torch's F.linear from then on


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, post: str = "none",
                  algorithm: str = "") -> torch.Tensor | None:
    """post(x @ weight.T + bias) for 2D bfloat16 x on the CPU in one oneDNN matmul, `post` applied to the float32 sums
    before the one rounding ("gelu" with algorithm "tanh" or "none"); None where it does not run and the caller runs
    torch's operations. With post "none" it gives F.linear's bits (F.linear runs the same oneDNN matmul) 3-6% faster
    on the 729-744-row products of the vision tower and the prefill: F.linear copies the bias into its output first.
    """
    global _onednn_failed
    if (_onednn_failed or weight.dtype is not torch.bfloat16 or x.dtype is not torch.bfloat16 or x.dim() != 2
            or x.device.type != "cpu" or weight.device.type != "cpu" or not weight.is_contiguous()
            or torch.compiler.is_compiling()
            or (torch.is_grad_enabled() and weight.requires_grad) or not torch.backends.mkldnn.is_available()):
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, post, [], algorithm)
    except RuntimeError:
        _onednn_failed = True
        return None


class Linear(nn.Linear):
    """nn.Linear with the fastest CPU kernel for its input shape; same parameters, same results within dtype rounding.

    Inputs are flattened to 2D first: F.linear on a (B, 1, D) slice of a longer sequence can take a batched-matmul
    path that copies the whole weight (1.4 s for a bfloat16 152000 x 1024 head). One row in bfloat16 or float16 is a
    matrix-vector product: torch.mv streams the weight ~1.5x faster than F.linear's gemm at batch 1 (decode), and in
    bfloat16 llava-cli's AVX512-BF16 kernel (kernels/) ~1.3x faster again where it can be built.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])  # (N, in)
        if x.shape[0] == 1 and self.weight.dtype in LOW_PRECISION and self.weight.device.type == "cpu":
            y = kernels.mv(self.weight, x[0])
            y = (torch.mv(self.weight, x[0]) if y is None else y)[None]
            if self.bias is not None:
                y = y + self.bias
        else:
            y = onednn_linear(x, self.weight, self.bias)
            y = F.linear(x, self.weight, self.bias) if y is None else y
        return y.view(*lead, y.shape[-1])


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 as the reference does, then scale in the model dtype. F.rms_norm without a weight is
        # the reference's x * rsqrt(mean(x^2) + eps) bit for bit (tested), in one operation instead of five.
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


def rope(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin for `positions` (B, T), each (B, 1, T, head_dim), computed in float32; the signed sin is
    sin with its first half negated, for apply_rope."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[..., None] * inv_freq  # (B, T, head_dim/2)
    sin = freqs.sin()
    return (torch.cat([freqs, freqs], dim=-1)[:, None].cos().to(dtype),
            torch.cat([-sin, sin], dim=-1)[:, None].to(dtype))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, as the reference computes it: rotate_half(x) * sin is [-x2, x1] * [s1, s2],
    which equals [x2, x1] * [-s1, s2] bit for bit (negation is exact), and the roll is one operation where the
    reference's slices, negation and concatenation are four: a decode step runs this 2 x layers times."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


class KVCache(nn.Module):
    """Keys and values of every layer, preallocated for `max_len` positions and written in place."""

    def __init__(self, cfg: TextConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def fits(self, batch: int, length: int, dtype: torch.dtype, device: torch.device) -> bool:
        return self.k.shape[1] == batch and length <= self.max_len and self.k.dtype == dtype and self.k.device == device

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (B, Hkv, T, D) at positions start..start+T; return the keys and values of 0..start+T."""
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


@dataclass
class Step:
    """Where a forward pass writes in the cache, and what each query may see."""

    start: int  # cache slot of the first new token
    positions: torch.Tensor  # (B, T) RoPE positions (left padding shifts them per row)
    mask: torch.Tensor | None  # (B, 1, T, start+T) bool, or None: causal, new token i sees slots 0..start+i


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = Linear(h, cfg.num_attention_heads * d, bias=cfg.qkv_bias)
        self.k_proj = Linear(h, cfg.num_key_value_heads * d, bias=cfg.qkv_bias)
        self.v_proj = Linear(h, cfg.num_key_value_heads * d, bias=cfg.qkv_bias)
        self.o_proj = Linear(cfg.num_attention_heads * d, h, bias=cfg.o_bias)

    def forward(self, x: torch.Tensor, rot: tuple[torch.Tensor, torch.Tensor], step: Step, cache: KVCache,
                last: bool = False) -> torch.Tensor:
        """(B, T, hidden) -> (B, T, hidden); with `last`, (B, 1, hidden): the output of the last position alone, whose
        query is then the only one computed (the keys and values of every position still go into the cache)."""
        b, t, _ = x.shape
        k = self.k_proj(x).view(b, t, -1, self.cfg.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(b, t, -1, self.cfg.head_dim).transpose(1, 2)
        k = apply_rope(k, *rot)
        k, v = cache.update(self.layer, step.start, k, v)  # (B, Hkv, start+T, D)
        mask = step.mask
        if last:
            x, rot = x[:, -1:], (rot[0][:, :, -1:], rot[1][:, :, -1:])
            mask = None if mask is None else mask[:, :, -1:]
        tq = x.shape[1]
        q = apply_rope(self.q_proj(x).view(b, tq, -1, self.cfg.head_dim).transpose(1, 2), *rot)  # (B, H, Tq, D)
        gqa = self.cfg.num_attention_heads != self.cfg.num_key_value_heads
        # No mask: causal, query i of the Tq last positions sees cache slots 0..start+T-Tq+i. A block of them goes
        # through llava-cli's kernel where it runs; one query reads the cache once in SDPA (the kernel would copy it
        # first), and sees every slot.
        causal = mask is None and tq > 1
        y = kernels.attention(q, k, v, causal=True) if causal else None  # (B, Tq, H * D)
        if y is None:
            past = k.shape[2] - tq
            if causal and past:  # SDPA's is_causal aligns the diagonal at slot 0
                mask = torch.ones(tq, past + tq, dtype=torch.bool, device=x.device).tril(past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and not past,
                                               enable_gqa=gqa)
            y = y.transpose(1, 2).reshape(b, tq, -1)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, rot, step: Step, cache: KVCache, last: bool = False) -> torch.Tensor:
        """`last`: the output of the last position alone, (B, 1, hidden) (see Attention.forward)."""
        h = self.self_attn(self.input_layernorm(x), rot, step, cache, last)
        x = (x[:, -1:] if last else x) + h
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # RoPE's cos and signed sin for positions 0.. at least the cache's length, kept across plans (every answer
        # builds one, and a chat's turns reuse one cache: a 32768-position table takes ~30 ms to make)
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None
        self.forget_plan()

    def forget_plan(self) -> None:
        """Drop the one-token kernel's plan (kernels.DecodePlan), built at the next one-token step: it holds this
        model's weights as they were when it was built, and one KV cache, which it keeps from being freed."""
        self._plan: tuple[torch.Tensor | None, kernels.DecodePlan | None] = (None, None)  # (cache.k, plan)

    def forward(self, embeds: torch.Tensor, step: Step, cache: KVCache, last_only: bool = False) -> torch.Tensor:
        """Hidden states (B, T, hidden), or with `last_only` (B, 1, hidden) of the last position: the last layer then
        computes its query, attention output and MLP for that position alone, as llama.cpp does for the positions
        whose logits are not asked for (a twenty-fourth of interleave-qwen-0.5b's prefill, less the keys and values
        every position still needs for the cache)."""
        if (embeds.shape[:2] == (1, 1) and step.mask is None and embeds.device.type == "cpu"
                and not torch.compiler.is_compiling()):  # a compiled graph traces torch's operations
            # One token of one row (decode): every layer and the final norm in one call of llava-cli's kernel, where
            # it runs, with RoPE's values looked up in a table (the same bits as rope() of one position, tested), not
            # computed again each step: 0.4 ms of torch operations a step less.
            if self._plan[0] is not cache.k:
                self._plan = cache.k, kernels.DecodePlan.build([_tensors(layer) for layer in self.layers], cache.k,
                                                               cache.v, self.cfg.num_attention_heads,
                                                               self.cfg.rms_norm_eps, self.norm.weight)
                if self._plan[1] and (self._rope is None or self._rope[0].shape[2] < cache.max_len
                                      or self._rope[0].dtype != embeds.dtype):
                    self._rope = rope(torch.arange(cache.max_len)[None], self.cfg.head_dim, self.cfg.rope_theta,
                                      embeds.dtype)
            if plan := self._plan[1]:
                cos, sin = self._rope
                if 0 <= (p := int(step.positions)) < cos.shape[2]:
                    x = embeds.reshape(-1).clone()
                    if plan.run(x, cos[0, 0, p], sin[0, 0, p], step.start):
                        return x.view(embeds.shape)
        rot = rope(step.positions, self.cfg.head_dim, self.cfg.rope_theta, embeds.dtype)
        x, final = embeds, len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x, rot, step, cache, last_only and i == final and x.shape[1] > 1)
        return self.norm(x)


def _tensors(layer: DecoderLayer) -> list:
    """A layer's tensors as kernels.DecodePlan.build takes them; it declines modules it does not know."""
    a, m = layer.self_attn, layer.mlp
    return [layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
            *(_matrix(lin) for lin in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj))]


def _matrix(lin: nn.Module) -> tuple:
    if isinstance(lin, nn.Linear):
        return lin.weight, None, lin.bias
    # quant_layers.Int8Linear, Int4Linear; any other module (bitsandbytes') is declined
    return lin.matrix() if hasattr(lin, "matrix") else (None, None, None)


class CausalLM(nn.Module):
    """`language_model`: the decoder and its output head (tied to the embeddings when the checkpoint says so)."""

    def __init__(self, cfg: TextConfig, tie: bool):
        super().__init__()
        self.model = TextModel(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie = tie

    def tie_weights(self) -> None:
        if self.tie and isinstance(self.lm_head, nn.Linear):  # a quantized head keeps its own copy
            self.lm_head.weight = self.model.embed_tokens.weight
