"""Model configuration from a checkpoint's config.json, with transformers' defaults per model_type.

Hub configs are sparse: llava-1.5-7b-hf's text_config has no hidden_size or layer count, CLIP's hidden_act is
implied. Each dataclass is built by `from_dict`, which ignores unknown keys and fills what is missing from the
defaults of the config's `model_type`, exactly as transformers resolves them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .errors import LlavaError
from .files import field, read_config, section

# Defaults of transformers' config classes, per model_type (only the keys the model core reads).
TEXT_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        hidden_act="silu", max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0,
        attention_bias=False, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    ),
    "qwen2": dict(
        vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope_theta=10000.0, attention_bias=False, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
    ),
}
VISION_DEFAULTS: dict[str, dict[str, Any]] = {
    "clip_vision_model": dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, num_channels=3,
        image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    ),
    "siglip_vision_model": dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, num_channels=3,
        image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
    ),
}
VIP_FEATURE_LAYERS = (-2, -5, -8, -11, 6)
ACTIVATIONS = ("quick_gelu", "gelu", "gelu_pytorch_tanh", "silu")  # those vision.activation() knows


def _pick(cls: type, defaults: dict[str, Any], d: dict[str, Any], within: str) -> dict[str, Any]:
    """The dataclass fields of `cls` from `d`, else from `defaults`; an explicit null means the default too."""
    return {f.name: field(d, f.name, f.type, defaults.get(f.name), within) for f in fields(cls)}


def _unsupported(kind: str, model_type: Any, known: dict) -> LlavaError:
    return LlavaError(f"unsupported {kind} model_type {model_type!r} (supported: {', '.join(sorted(known))})")


@dataclass(frozen=True)
class TextConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_act: str
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    attention_bias: bool
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_id: int | list[int] | None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TextConfig:
        model_type = d.get("model_type", "llama")
        if not isinstance(model_type, str) or model_type not in TEXT_DEFAULTS:
            raise _unsupported("text", model_type, TEXT_DEFAULTS)
        defaults = dict(TEXT_DEFAULTS[model_type], model_type=model_type)
        # transformers 5 writes rope_theta inside rope_parameters; any scaling other than the default would change results.
        rope = section(d, "rope_parameters") or section(d, "rope_scaling")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise LlavaError(f"unsupported RoPE scaling {rope_type!r} in text_config")
        defaults["rope_theta"] = field(rope, "rope_theta", "float", defaults["rope_theta"], "text_config.rope_parameters")
        hidden = field(d, "hidden_size", "int", defaults["hidden_size"], "text_config")
        heads = field(d, "num_attention_heads", "int", defaults["num_attention_heads"], "text_config")
        defaults["num_key_value_heads"] = heads
        defaults["head_dim"] = hidden // heads
        if d.get("hidden_act", "silu") != "silu":
            raise LlavaError(f"unsupported text hidden_act {d['hidden_act']!r}")
        cfg = cls(**_pick(cls, defaults, d, "text_config"))
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise LlavaError(f"text_config.num_attention_heads ({cfg.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({cfg.num_key_value_heads})")
        return cfg

    @property
    def qkv_bias(self) -> bool:
        """Qwen2 always has q/k/v biases; Llama has them (and an o_proj bias) only with attention_bias."""
        return self.model_type == "qwen2" or self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.model_type == "llama" and self.attention_bias


@dataclass(frozen=True)
class VisionConfig:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_channels: int
    image_size: int
    patch_size: int
    hidden_act: str
    layer_norm_eps: float

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VisionConfig:
        model_type = d.get("model_type", "clip_vision_model")
        if not isinstance(model_type, str) or model_type not in VISION_DEFAULTS:
            raise _unsupported("vision", model_type, VISION_DEFAULTS)
        if d.get("vision_use_head"):
            raise LlavaError("unsupported vision tower: SigLIP with a pooling head (vision_use_head)")
        cfg = cls(**_pick(cls, dict(VISION_DEFAULTS[model_type], model_type=model_type), d, "vision_config"))
        if cfg.hidden_size % cfg.num_attention_heads:
            raise LlavaError(f"vision_config.hidden_size ({cfg.hidden_size}) must be a multiple of "
                             f"num_attention_heads ({cfg.num_attention_heads})")
        return cfg

    @property
    def class_token(self) -> bool:
        """CLIP prepends a class token to the patches; SigLIP does not."""
        return self.model_type == "clip_vision_model"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class LlavaConfig:
    model_type: str  # "llava" | "vipllava"
    text: TextConfig
    vision: VisionConfig
    image_token_id: int
    feature_layers: tuple[int, ...]  # indices into the vision tower's hidden states (0 = embeddings)
    select_strategy: str  # "default" drops the class token, "full" keeps every token
    projector_act: str
    projector_bias: bool
    projector_layernorm_eps: float | None  # set for the ViP projector only
    pad_token_id: int | None
    tie_word_embeddings: bool

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LlavaConfig:
        model_type = d.get("model_type")
        if model_type not in ("llava", "vipllava"):
            raise LlavaError(
                f"unsupported architecture: model_type {model_type!r} (supported: llava, vipllava)"
            )
        text = TextConfig.from_dict(section(d, "text_config"))
        vision = VisionConfig.from_dict(section(d, "vision_config"))
        if model_type == "vipllava":
            # vip-llava-7b-hf ships a stray scalar "vision_feature_layer": -2 and no "vision_feature_layers"; its
            # projector is still 5 layers wide. transformers 5 writes the list under "vision_feature_layer".
            layers = field(d, "vision_feature_layers", "layers")
            if layers is None and isinstance(d.get("vision_feature_layer"), list):
                layers = field(d, "vision_feature_layer", "layers")
            layers = layers or list(VIP_FEATURE_LAYERS)
            strategy, ln_eps = "default", field(d, "projector_layernorm_eps", "float", 1e-5)
        else:
            layers = field(d, "vision_feature_layer", "layers", -2)
            strategy, ln_eps = field(d, "vision_feature_select_strategy", "str", "default"), None
        layers = tuple(layers) if isinstance(layers, list) else (layers,)
        if strategy not in ("default", "full"):
            raise LlavaError(f"unsupported vision_feature_select_strategy {strategy!r} (supported: default, full)")
        n_states = vision.num_hidden_layers + 1
        if any(not -n_states <= i < n_states for i in layers):
            raise LlavaError(f"vision feature layers {list(layers)} out of range for {vision.num_hidden_layers} layers")
        key = "image_token_index" if "image_token_index" in d else "image_token_id"
        image_token_id = field(d, key, "int | None")
        if image_token_id is None:
            raise LlavaError("no image_token_index")
        projector_act = field(d, "projector_hidden_act", "str", "gelu")
        for key, act in (("vision_config.hidden_act", vision.hidden_act), ("projector_hidden_act", projector_act)):
            if act not in ACTIVATIONS:
                raise LlavaError(f"unsupported {key} {act!r} (supported: {', '.join(ACTIVATIONS)})")
        return cls(
            model_type=model_type, text=text, vision=vision, image_token_id=image_token_id,
            feature_layers=layers, select_strategy=strategy, projector_act=projector_act,
            projector_bias=field(d, "multimodal_projector_bias", "bool", True),
            projector_layernorm_eps=ln_eps, pad_token_id=field(d, "pad_token_id", "int | None"),
            tie_word_embeddings=field(d, "tie_word_embeddings", "bool", text.tie_word_embeddings),
        )

    @classmethod
    def from_file(cls, path: Path) -> LlavaConfig:
        return read_config(path, cls.from_dict)

    @property
    def image_tokens(self) -> int:
        """Tokens one image becomes in the prompt: the patches, plus the class token only with strategy 'full'."""
        keep_class = self.vision.class_token and self.select_strategy == "full"
        return self.vision.num_patches + int(keep_class)

    @property
    def vision_layers_used(self) -> int:
        """How many vision encoder layers the features need; deeper ones are never run (nor loaded)."""
        n_states = self.vision.num_hidden_layers + 1
        return max(i % n_states for i in self.feature_layers)

    @property
    def context_length(self) -> int:
        return self.text.max_position_embeddings


def read_generation(path: Path) -> dict[str, Any]:
    """generation_config.json ({} when absent), its stop ids checked: they end every answer."""
    def checked(d: dict[str, Any]) -> dict[str, Any]:
        field(d, "eos_token_id", "int | list[int] | None")
        return d

    return read_config(path, checked) if path.exists() else {}
