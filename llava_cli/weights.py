"""Weights: safetensors shards -> a model built on the meta device, through one rename table, strictly.

Every key layout the llava-hf checkpoints exist in maps onto the legacy hub names, which are our module names:
  legacy hub        language_model.model.*, language_model.lm_head.*, vision_tower.vision_model.*, multi_modal_projector.*
  transformers 4.52 model.language_model.*, lm_head.*, model.vision_tower.vision_model.*, model.multi_modal_projector.*
  transformers 5    as either of the above, with `vision_model.` dropped from the vision tower
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .config import LlavaConfig
from .errors import LlavaError
from .files import read_json
from .llava import LlavaModel

RENAMES: tuple[tuple[re.Pattern, str], ...] = (
    (re.compile(r"^model\.language_model\."), "language_model.model."),
    (re.compile(r"^lm_head\."), "language_model.lm_head."),
    (re.compile(r"^model\.vision_tower\."), "vision_tower."),
    (re.compile(r"^model\.multi_modal_projector\."), "multi_modal_projector."),
    (re.compile(r"^vision_tower\.(?!vision_model\.)"), "vision_tower.vision_model."),
)
INDEX = "model.safetensors.index.json"


def canonical(key: str) -> str:
    """A checkpoint key in any supported layout -> our module's parameter name."""
    for pattern, repl in RENAMES:
        key = pattern.sub(repl, key)
    return key


def unused(cfg: LlavaConfig, name: str) -> bool:
    """Tensors a checkpoint carries that the model never reads, so they are neither loaded nor an error."""
    if name.startswith("vision_tower.vision_model.post_layernorm.") or name.endswith("rotary_emb.inv_freq"):
        return True  # LLaVA takes hidden states from before the post-layernorm; RoPE is recomputed
    m = re.match(r"vision_tower\.vision_model\.encoder\.layers\.(\d+)\.", name)
    if m and cfg.vision_layers_used <= int(m.group(1)) < cfg.vision.num_hidden_layers:
        return True  # encoder layers past the deepest feature layer
    return cfg.tie_word_embeddings and name == "language_model.lm_head.weight"


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder: the shards its index names, or model.safetensors."""
    index = folder / INDEX
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise LlavaError(f"{index}: malformed index (no weight_map object)")
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.exists():
                raise LlavaError(f"{folder}: missing weight shard {f.name} (named in {INDEX})")
        return files
    single = folder / "model.safetensors"
    if single.exists():
        return [single]
    if list(folder.glob("pytorch_model*.bin")) or list(folder.glob("*.pt")) or list(folder.glob("*.pth")):
        raise LlavaError(
            f"{folder}: has only pickled PyTorch weights (.bin), which are not loaded for safety; "
            "turn them into safetensors with `llava convert`"
        )
    raise LlavaError(f"{folder}: no weights found (model.safetensors or {INDEX})")


def read_tensors(files: list[Path]) -> Iterator[tuple[str, Path, torch.Tensor]]:
    """(key, file, tensor) for every tensor, one at a time, memory-mapped."""
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    yield key, path, f.get_tensor(key)
        except SafetensorError as e:
            raise LlavaError(f"{path}: corrupt or truncated safetensors file ({e})") from None
        except OSError as e:
            raise LlavaError(f"{path}: cannot read ({e.strerror or e})") from None


def _names(keys: set[str], limit: int = 5) -> str:
    shown = sorted(keys)[:limit]
    return ", ".join(shown) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def load_model(folder: Path, cfg: LlavaConfig, dtype: torch.dtype, device: torch.device) -> LlavaModel:
    """Build the model on the meta device and assign every checkpoint tensor, cast to `dtype` on `device`."""
    with torch.device("meta"):
        model = LlavaModel(cfg)
    expected = {name: p.shape for name, p in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        expected.pop("language_model.lm_head.weight")
    state: dict[str, torch.Tensor] = {}
    for key, path, tensor in read_tensors(weight_files(folder)):
        name = canonical(key)
        if unused(cfg, name):
            continue
        if name not in expected:
            raise LlavaError(f"{path.name}: unexpected tensor {key!r} for this config (model_type {cfg.model_type})")
        if tensor.shape != expected[name]:
            raise LlavaError(
                f"{path.name}: tensor {key!r} has shape {tuple(tensor.shape)}, the config implies {tuple(expected[name])}"
            )
        if name in state:
            raise LlavaError(f"{path.name}: tensor {key!r} appears twice")
        state[name] = tensor.to(device=device, dtype=dtype)
    missing = expected.keys() - state.keys()
    if missing:
        raise LlavaError(f"{folder}: checkpoint is missing {len(missing)} tensors: {_names(missing)}")
    if cfg.tie_word_embeddings:
        state["language_model.lm_head.weight"] = state["language_model.model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.language_model.tie_weights()
    return model.eval().requires_grad_(False)
