"""How a source checkpoint's tensors and config map onto the llava-hf hub layout that `llava ask` loads.

Original layouts, mapped as transformers' convert_llava / convert_vipllava scripts map them (KEY_LAYOUTS.md, D-E):
  model.embed_tokens, model.layers.N.*, model.norm     -> language_model.model.*
  lm_head.weight                                     -> language_model.lm_head.weight
  model.mm_projector.0 / .2                          -> multi_modal_projector.linear_1 / .linear_2
  model.mm_projector.final_linear.0 / .2             -> multi_modal_projector.linear_1 / .linear_2 (ViP-LLaVA)
  model.mm_projector.clip_layernorm                  -> multi_modal_projector.projector_layernorm (ViP-LLaVA)
  model.vision_tower.vision_tower.vision_model.*     -> vision_tower.vision_model.*
A separate CLIP / SigLIP tower folder contributes its `vision_model.*` tensors (or the bare ones transformers 5
writes); its text model and projections are not part of LLaVA.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from .config import VIP_FEATURE_LAYERS, LlavaConfig, TextConfig, VisionConfig
from .convert_source import Weights
from .errors import LlavaError

PROJECTOR = (("final_linear.0.", "linear_1."), ("final_linear.2.", "linear_2."), ("0.", "linear_1."),
             ("2.", "linear_2."), ("clip_layernorm.", "projector_layernorm."))
TOWER_PARTS = ("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.")
DROPS = (
    (re.compile(r"\.rotary_emb\.inv_freq$"), "RoPE buffer, recomputed at load"),
    (re.compile(r"^model\.image_newline$"), "LLaVA-NeXT's row separator, unused by the flat image merge"),
    (re.compile(r"^(model\.vision_tower\.vision_tower\.)?vision_model\.head\."), "SigLIP's pooling head, unused"),
)
TEXT_TYPES = {"llava": "llama", "llava_llama": "llama", "llava_qwen": "qwen2", "llava_mistral": "mistral"}
TEXT_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling", "attention_bias",
             "bos_token_id", "eos_token_id")
SELECT_FEATURE = {"patch": "default", "cls_patch": "full"}
_CLIP_L_336 = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                   num_attention_heads=16, num_channels=3, image_size=336, patch_size=14, hidden_act="quick_gelu",
                   layer_norm_eps=1e-5)
# The towers the original configs name by `mm_vision_tower`, for checkpoints that carry the tower's weights.
KNOWN_TOWERS: dict[str, dict[str, Any]] = {
    "openai/clip-vit-large-patch14-336": _CLIP_L_336,
    "clip_4layers_336": _CLIP_L_336,  # ViP-LLaVA's name for CLIP-L/336 read at five depths
    "google/siglip-so400m-patch14-384": dict(
        model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
        num_attention_heads=16, num_channels=3, image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6),
}


@dataclass(frozen=True)
class Entry:
    """One output tensor: where it comes from and whether its rows (vocabulary) are padded."""

    name: str  # llava-hf hub key, which is our module's parameter name
    source: Weights
    key: str
    rows: int | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        shape = self.source.meta[self.key][0]
        return shape if self.rows is None else (self.rows, *shape[1:])


@dataclass
class Mapping:
    entries: list[Entry]
    dropped: list[tuple[str, str]]  # (source key, why)
    unknown: list[str]  # source keys no rule places


def is_original(raw: dict[str, Any]) -> bool:
    """Original LLaVA configs are flat LLM configs with `mm_*` keys; hub ones nest text_config / vision_config."""
    return "mm_vision_tower" in raw or "mm_projector_type" in raw


def dropped_because(key: str) -> str | None:
    """Why the converters drop this tensor, or None when they keep it."""
    return next((why for pattern, why in DROPS if pattern.search(key)), None)


def tower_name(key: str) -> str | None:
    """A CLIP / SigLIP model key -> its llava-hf name under vision_tower.vision_model (None: not the vision encoder)."""
    key = key.removeprefix("vision_model.")
    return "vision_tower.vision_model." + key if key.startswith(TOWER_PARTS) else None


def original_name(key: str) -> str | None:
    """An original LLaVA / ViP-LLaVA / LLaVA-NeXT key -> its llava-hf name (None: no rule places it)."""
    if key.startswith("model.vision_tower.vision_tower."):
        return tower_name(key.removeprefix("model.vision_tower.vision_tower."))
    if key.startswith("model.mm_projector."):
        rest = key.removeprefix("model.mm_projector.")
        old, new = next(((old, new) for old, new in PROJECTOR if rest.startswith(old)), (None, None))
        return None if old is None else "multi_modal_projector." + new + rest[len(old):]
    if key.startswith(("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.")):
        return "language_model." + key
    return None


def map_keys(weights: Weights, rename, rows: int | None = None, tower: bool = False) -> Mapping:
    """Apply `rename` to every key; the embedding and output head get `rows` rows when given."""
    m = Mapping([], [], [])
    for key in weights.keys():
        if why := dropped_because(key):
            m.dropped.append((key, why))
        elif (name := rename(key)) is None:
            (m.dropped.append((key, "not part of the vision encoder")) if tower else m.unknown.append(key))
        else:
            vocab = name in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight")
            m.entries.append(Entry(name, weights, key, rows if vocab and rows != weights.meta[key][0][0] else None))
    return m


def padded_vocab(rows: int) -> int:
    """llava-hf's converters resized the embeddings to rows + 2 (<image>, <pad>), rounded up to a multiple of 64."""
    return -(-(rows + 2) // 64) * 64


def tower_layers(entries: list[Entry]) -> int:
    """How many vision encoder layers the tensors hold."""
    layer = re.compile(r"vision_tower\.vision_model\.encoder\.layers\.(\d+)\.")
    found = {int(m.group(1)) for e in entries if (m := layer.match(e.name))}
    return max(found, default=-1) + 1


def original_config(raw: dict[str, Any], vision: dict[str, Any], *, vip: bool, stored_layers: int, vocab: int,
                    image_id: int, pad_id: int | None, tied: bool, dtype: str) -> dict[str, Any]:
    """config.json in the llava-hf style for an original checkpoint's flat `mm_*` config."""
    if (kind := raw.get("mm_projector_type", "mlp2x_gelu")) != "mlp2x_gelu":
        raise LlavaError(f"unsupported mm_projector_type {kind!r} (supported: mlp2x_gelu)")
    if raw.get("mm_use_im_start_end") or raw.get("mm_use_im_patch_token"):
        raise LlavaError("unsupported: image start/end or patch tokens (mm_use_im_start_end, mm_use_im_patch_token)")
    if raw.get("model_type") not in TEXT_TYPES:
        raise LlavaError(f"unsupported original model_type {raw.get('model_type')!r} "
                         f"(supported: {', '.join(TEXT_TYPES)})")
    text = {k: raw[k] for k in TEXT_KEYS if raw.get(k) is not None}
    text.update(model_type=TEXT_TYPES[raw["model_type"]], vocab_size=vocab, tie_word_embeddings=tied)
    text = {k: v for k, v in dataclasses.asdict(TextConfig.from_dict(text)).items() if k != "head_dim"}
    vision = dict(vision)
    siglip = vision.get("model_type") == "siglip_vision_model"
    if siglip:  # LLaVA-NeXT drops SigLIP's last layer and reads the output of the last one kept, every token
        vision.update(num_hidden_layers=stored_layers, vision_use_head=False)
        layers, strategy = [-1], "full"
    elif vip:  # ViP-LLaVA's multi-layer CLIP tower reads these five depths, class token dropped
        layers, strategy = list(VIP_FEATURE_LAYERS), "default"
    else:
        feature = raw.get("mm_vision_select_feature", "patch")
        if feature not in SELECT_FEATURE:
            raise LlavaError(f"unsupported mm_vision_select_feature {feature!r} (supported: patch, cls_patch)")
        layers, strategy = [raw.get("mm_vision_select_layer", -2)], SELECT_FEATURE[feature]
    vision = dataclasses.asdict(VisionConfig.from_dict(vision)) | ({"vision_use_head": False} if siglip else {})
    if raw.get("mm_hidden_size") not in (None, vision["hidden_size"] * len(layers)):
        raise LlavaError(f"config mm_hidden_size {raw['mm_hidden_size']} does not match the vision tower "
                         f"({len(layers)} x {vision['hidden_size']}); is --vision-tower the right model?")
    arch = "VipLlavaForConditionalGeneration" if vip else "LlavaForConditionalGeneration"
    cfg = {"architectures": [arch], "model_type": "vipllava" if vip else "llava", "image_token_index": image_id,
           "projector_hidden_act": "gelu", "text_config": text, "vision_config": vision,
           "tie_word_embeddings": tied, "torch_dtype": dtype}
    if pad_id is not None:
        cfg["pad_token_id"] = pad_id
    if vip:
        cfg.update(vision_feature_layers=layers, projector_layernorm_eps=1e-5)
    else:
        cfg.update(vision_feature_layer=layers[0], vision_feature_select_strategy=strategy)
    return cfg


def check_entries(cfg: LlavaConfig, entries: list[Entry]) -> None:
    """Every tensor the model needs is there with its shape, and nothing is there that it cannot place."""
    import torch

    from .llava import LlavaModel
    from .weights import unused

    with torch.device("meta"):
        expected = {name: tuple(p.shape) for name, p in LlavaModel(cfg).state_dict().items()}
    if cfg.tie_word_embeddings:
        expected.pop("language_model.lm_head.weight")
    seen: dict[str, Entry] = {}
    for e in entries:
        if e.name in seen:
            raise LlavaError(f"tensors {seen[e.name].key!r} and {e.key!r} both map to {e.name!r}")
        seen[e.name] = e
        if e.name not in expected and not unused(cfg, e.name):
            raise LlavaError(f"unexpected tensor {e.key!r} (as {e.name!r}) for this config")
        if e.name in expected and e.shape != expected[e.name]:
            raise LlavaError(f"tensor {e.key!r} has shape {e.shape}, the config implies {expected[e.name]}")
    if missing := sorted(expected.keys() - seen.keys()):
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        raise LlavaError(f"the source lacks {len(missing)} tensors the model needs: {', '.join(missing[:5])}{more}")
