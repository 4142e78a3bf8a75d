"""Real hub configs resolve as transformers resolves them, and our module names cover the real weight keys."""

import json
from pathlib import Path

import pytest
import torch

from llava_cli.config import LlavaConfig
from llava_cli.errors import LlavaError
from llava_cli.llava import LlavaModel
from llava_cli.weights import canonical, unused

HUBMETA = Path(__file__).parent / "data" / "hubmeta"
RESOLVED = json.loads((HUBMETA / "RESOLVED_DEFAULTS_transformers5.json").read_text())
SUPPORTED = [
    "llava-hf__llava-1.5-7b-hf",
    "llava-hf__llava-1.5-13b-hf",
    "llava-hf__vip-llava-7b-hf",
    "llava-hf__vip-llava-13b-hf",
    "llava-hf__llava-interleave-qwen-0.5b-hf",
    "llava-hf__llava-interleave-qwen-7b-hf",
]
LAYOUTS = ["weight_keys.legacy_hub.txt", "weight_keys.transformers_4.52-4.57.txt", "weight_keys.transformers_5.x.txt"]


def load(repo: str) -> LlavaConfig:
    return LlavaConfig.from_file(HUBMETA / repo / "config.json")


@pytest.mark.parametrize("repo", SUPPORTED)
def test_sparse_config_resolves_like_transformers(repo):
    cfg, ref = load(repo), RESOLVED[repo]
    text, vision = ref["text"], ref["vision"]
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "rms_norm_eps", "max_position_embeddings", "vocab_size", "bos_token_id", "eos_token_id"):
        assert getattr(cfg.text, key) == text[key], key
    assert cfg.text.rope_theta == text["rope_parameters"]["rope_theta"]
    assert cfg.text.head_dim == (text["head_dim"] or text["hidden_size"] // text["num_attention_heads"])
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "hidden_act",
                "layer_norm_eps", "image_size", "patch_size", "num_channels"):
        assert getattr(cfg.vision, key) == vision[key], key
    assert cfg.image_token_id == ref["top"]["image_token_index"]
    assert cfg.tie_word_embeddings == ref["top"]["tie_word_embeddings"]


@pytest.mark.parametrize("repo", SUPPORTED)
def test_image_tokens_match_the_processor(repo):
    cfg = load(repo)
    proc = json.loads((HUBMETA / "llava-hf__llava-1.5-7b-hf/processor_config.json").read_text())
    if (HUBMETA / repo / "processor_config.json").exists():
        proc = json.loads((HUBMETA / repo / "processor_config.json").read_text())
    # LlavaProcessor: (image_size / patch)^2 + num_additional_image_tokens, minus one for the 'default' strategy.
    expected = (cfg.vision.image_size // proc["patch_size"]) ** 2 + proc["num_additional_image_tokens"]
    expected -= proc["vision_feature_select_strategy"] == "default"
    assert cfg.image_tokens == expected


def test_vip_7b_config_quirk_still_means_five_layers():
    cfg = load("llava-hf__vip-llava-7b-hf")
    assert cfg.feature_layers == (-2, -5, -8, -11, 6)
    assert cfg.image_tokens == 576
    assert cfg.vision_layers_used == 23


def test_qwen_7b_defaults_come_from_qwen2():
    cfg = load("llava-hf__llava-interleave-qwen-7b-hf")
    assert (cfg.text.hidden_size, cfg.text.num_hidden_layers, cfg.text.num_key_value_heads) == (4096, 32, 32)
    assert cfg.text.qkv_bias and not cfg.text.o_bias
    assert not cfg.tie_word_embeddings


@pytest.mark.parametrize("repo", SUPPORTED)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_module_names_cover_the_real_weight_keys(repo, layout):
    cfg = load(repo)
    with torch.device("meta"):
        names = set(LlavaModel(cfg).state_dict())
    if cfg.tie_word_embeddings:
        names.discard("language_model.lm_head.weight")
    keys = (HUBMETA / repo / layout).read_text().split()
    renamed = [canonical(k) for k in keys]
    assert len(set(renamed)) == len(keys), "two layouts' keys collapsed onto one name"
    used = {n for n in renamed if not unused(cfg, n)}
    assert used == names
    # What we skip is only what LLaVA never reads: the post-layernorm and vision layers past the features.
    skipped = {n.split(".encoder.layers.")[-1].split(".")[0] for n in renamed if unused(cfg, n) and "encoder" in n}
    assert all(int(i) >= cfg.vision_layers_used for i in skipped)


def test_unsupported_architecture_is_a_clear_error():
    bak = json.loads((HUBMETA / "llava-hf__bakLlava-v1-hf" / "config.json").read_text())
    with pytest.raises(LlavaError, match="unsupported text model_type 'mistral'"):
        LlavaConfig.from_dict(bak)
    with pytest.raises(LlavaError, match="unsupported architecture: model_type 'llava_next'"):
        LlavaConfig.from_dict({**bak, "model_type": "llava_next"})


def test_rope_scaling_is_refused_not_ignored():
    d = json.loads((HUBMETA / "llava-hf__llava-1.5-7b-hf" / "config.json").read_text())
    d["text_config"]["rope_scaling"] = {"type": "linear", "factor": 2.0}
    with pytest.raises(LlavaError, match="RoPE scaling 'linear'"):
        LlavaConfig.from_dict(d)


def test_a_config_without_sub_model_types_means_llama_and_clip():
    cfg = LlavaConfig.from_dict({"model_type": "llava", "image_token_index": 32000, "text_config": {}, "vision_config": {}})
    assert (cfg.text.model_type, cfg.vision.model_type) == ("llama", "clip_vision_model")
    assert cfg.text.hidden_size == 4096 and cfg.vision.hidden_act == "quick_gelu" and cfg.vision.class_token
