"""CLIP and SigLIP vision transformers, returning the hidden states LLaVA takes its image features from.

Attribute names mirror the hub checkpoint keys below `vision_tower.vision_model.` (note CLIP's `pre_layrnorm`).
Only the layers the features need are built: llava-1.5 reads layer -2, so CLIP's last layer is never run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .config import VisionConfig
from .decoder import Linear, onednn_linear
from .errors import LlavaError


def activation(name: str):
    """The activation functions these checkpoints name in their configs."""
    acts = {
        "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
        "gelu": F.gelu,
        "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "silu": F.silu,
    }
    if name not in acts:
        raise LlavaError(f"unsupported activation {name!r}")
    return acts[name]


class Embeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.class_token = cfg.class_token
        if self.class_token:
            self.class_embedding = nn.Parameter(torch.empty(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(
            cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size, bias=not cfg.class_token
        )
        self.position_embedding = nn.Embedding(cfg.num_patches + int(cfg.class_token), cfg.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))  # (N, D, h, w)
        x = x.flatten(2).transpose(1, 2)  # (N, h*w, D)
        if self.class_token:
            cls = self.class_embedding.expand(x.shape[0], 1, -1)
            x = torch.cat([cls, x], dim=1)
        return x + self.position_embedding.weight


class Attention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = (p(x).view(n, t, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = kernels.attention(q, k, v, causal=False)  # (N, T, D): every patch sees every patch
        if y is None:
            y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, d)
        return self.out_proj(y)


ONEDNN_GELU = {"gelu": "none", "gelu_pytorch_tanh": "tanh"}  # hidden_act -> oneDNN's GELU algorithm


def linear_gelu(lin: nn.Module, x: torch.Tensor, act: str) -> torch.Tensor | None:
    """act(lin(x)) as one oneDNN matmul with the GELU applied to its float32 sums before the one rounding to
    bfloat16 (torch rounds twice): 2.5-3 ms faster a SigLIP layer here, where a separate GELU pass over 729 x 4304
    values costs that much. None where it does not run (another activation, a quantized layer, see onednn_linear)
    and the caller runs torch's two operations."""
    if act not in ONEDNN_GELU or type(lin) is not Linear:
        return None
    y = onednn_linear(x.reshape(-1, x.shape[-1]), lin.weight, lin.bias, "gelu", ONEDNN_GELU[act])
    return None if y is None else y.view(*x.shape[:-1], y.shape[-1])


class MLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.hidden_act, self.act = cfg.hidden_act, activation(cfg.hidden_act)
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = linear_gelu(self.fc1, x, self.hidden_act)
        return self.fc2(self.act(self.fc1(x)) if h is None else h)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = Attention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, cfg: VisionConfig, n_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(n_layers))


class VisionTransformer(nn.Module):
    """`vision_model`: embeddings, CLIP's pre-layernorm, then the encoder layers the features need."""

    def __init__(self, cfg: VisionConfig, n_layers: int):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        if cfg.class_token:
            self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.encoder = Encoder(cfg, n_layers)

    def forward(self, pixels: torch.Tensor, layers: tuple[int, ...]) -> list[torch.Tensor]:
        """Hidden states at `layers` (0 = embeddings, negative counts from the full depth), each (N, T, D)."""
        n_states = self.cfg.num_hidden_layers + 1
        wanted = [i % n_states for i in layers]
        x = self.embeddings(pixels)
        if self.cfg.class_token:
            x = self.pre_layrnorm(x)
        states = {0: x}
        for i, layer in enumerate(self.encoder.layers, start=1):
            x = layer(x)
            if i in wanted:
                states[i] = x
        return [states[i] for i in wanted]


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig, n_layers: int):
        super().__init__()
        self.vision_model = VisionTransformer(cfg, n_layers)
