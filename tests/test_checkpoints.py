"""The tiny-checkpoint builder: every folder loads in transformers, holds the reference's exact weights, and is
laid out like the hub (config key sets, weight-key names per layout, padded vocab, tied lm_head, vip quirk)."""

from __future__ import annotations

import json
import re

import pytest
import torch
import transformers
from PIL import Image
from safetensors import safe_open
from tokenizers import Tokenizer

from checkpoints import (FAMILIES, FAMILY_SPECS, HUBMETA, LAYOUTS, TEXT, VIP_LAYERS, VISION, build, disk_key,
                         padded_vocab)

HUB = {family: HUBMETA / spec.files for family, spec in FAMILY_SPECS.items()}
CONFIG_HUB = {family: HUBMETA / spec.config for family, spec in FAMILY_SPECS.items()}
KEY_FILES = {"legacy": "weight_keys.legacy_hub.txt", "v4.52": "weight_keys.transformers_4.52-4.57.txt"}


def read_json(path):
    return json.loads(path.read_text())


def stored(folder) -> dict[str, torch.Tensor]:
    """Every tensor in the folder's safetensors files, by stored key."""
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            assert f.metadata() == {"format": "pt"}
            out |= {k: f.get_tensor(k) for k in f.keys()}
    return out


def layer_pattern(keys) -> set[str]:
    """Key names modulo layer counts."""
    return {re.sub(r"\.layers\.\d+\.", ".layers.N.", k) for k in keys}


def model_class(family):
    return getattr(transformers, FAMILY_SPECS[family].arch)


def assert_same_weights(loaded, reference):
    got, want = loaded.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k].float(), want[k]), k


@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_loads_every_layout(tiny, family, layout, shards):
    t = tiny(family, layout, shards)
    assert_same_weights(model_class(family).from_pretrained(t.folder), t.model)
    processor = transformers.AutoProcessor.from_pretrained(t.folder)
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == t.image_token_id


@pytest.mark.parametrize("family", FAMILIES)
def test_legacy_and_v452_keys_match_the_hub_lists(tiny, family):
    for layout, file in KEY_FILES.items():
        keys = stored(tiny(family, layout).folder)
        assert layer_pattern(keys) == layer_pattern((HUB[family] / file).read_text().split()), layout


@pytest.mark.parametrize("family", FAMILIES)
def test_v5_keys_are_what_save_pretrained_writes(tiny, family, tmp_path):
    t = tiny(family, "v5")
    t.model.save_pretrained(tmp_path)
    assert stored(t.folder).keys() == stored(tmp_path).keys()
    assert not any(".vision_model." in k for k in stored(t.folder))
    # and the in-memory names are those of the real checkpoint under transformers 5
    real = (HUB[family] / "weight_keys.transformers_5.x.txt").read_text().split()
    tied = t.model.config.get_text_config().tie_word_embeddings
    ours = [k for k in t.model.state_dict() if not (tied and k == "lm_head.weight")]
    assert layer_pattern(ours) == layer_pattern(real)


def test_disk_key_examples():
    name = "model.vision_tower.encoder.layers.0.mlp.fc1.weight"
    assert disk_key(name, "legacy") == "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"
    assert disk_key(name, "v4.52") == "model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"
    assert disk_key(name, "v5") == "vision_tower.encoder.layers.0.mlp.fc1.weight"
    assert disk_key("lm_head.weight", "legacy") == disk_key("lm_head.weight", "v5") == "language_model.lm_head.weight"
    assert disk_key("lm_head.weight", "v4.52") == "lm_head.weight"
    assert disk_key("model.language_model.norm.weight", "legacy") == "language_model.model.norm.weight"


def test_sharded_index_is_hub_style(tiny):
    t = tiny("llava", "legacy", 3)
    index = read_json(t.folder / "model.safetensors.index.json")
    assert set(index) == {"metadata", "weight_map"} and set(index["metadata"]) == {"total_size"}
    files = sorted(p.name for p in t.folder.glob("*.safetensors"))
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert set(index["weight_map"].values()) == set(files)
    tensors = stored(t.folder)
    assert index["weight_map"].keys() == tensors.keys()
    assert index["metadata"]["total_size"] == sum(x.numel() * x.element_size() for x in tensors.values())
    assert not (t.folder / "model.safetensors").exists()


@pytest.mark.parametrize("family", FAMILIES)
def test_config_is_sparse_like_the_hub(tiny, family):
    t = tiny(family)
    cfg, hub = read_json(t.folder / "config.json"), read_json(CONFIG_HUB[family] / "config.json")
    assert cfg.keys() == hub.keys()
    assert cfg["text_config"].keys() == hub["text_config"].keys() | TEXT.keys() | {"vocab_size", "torch_dtype"}
    assert cfg["vision_config"].keys() == hub["vision_config"].keys() | VISION.keys() | {"num_hidden_layers"}
    # defaults the hub omits stay omitted, so a loader must fill them per model_type
    assert "rope_theta" not in cfg["text_config"] or family == "qwen"
    assert "hidden_act" not in cfg["vision_config"] or family == "qwen"
    resolved = t.model.config
    assert resolved.vision_config.hidden_act == ("gelu_pytorch_tanh" if family == "qwen" else "quick_gelu")
    assert resolved.text_config.num_key_value_heads == 2 and resolved.text_config.hidden_size == 64


@pytest.mark.parametrize("family", FAMILIES)
def test_special_ids_are_the_tiny_tokenizers(tiny, family):
    t = tiny(family)
    tok = Tokenizer.from_file(str(t.folder / "tokenizer.json"))
    cfg, gen = read_json(t.folder / "config.json"), read_json(t.folder / "generation_config.json")
    tok_cfg, added = read_json(t.folder / "tokenizer_config.json"), read_json(t.folder / "added_tokens.json")
    assert cfg["image_token_index"] == t.image_token_id == tok.token_to_id("<image>")
    assert added == {k: tok.token_to_id(k) for k in read_json(HUB[family] / "added_tokens.json")}
    assert {int(i): v["content"] for i, v in tok_cfg["added_tokens_decoder"].items()} == {
        tok.token_to_id(v["content"]): v["content"] for v in tok_cfg["added_tokens_decoder"].values()}
    assert tok_cfg.keys() == read_json(HUB[family] / "tokenizer_config.json").keys()
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    if family == "qwen":
        assert t.pad_token_id is None and "pad_token_id" not in cfg
        assert cfg["text_config"]["bos_token_id"] == gen["bos_token_id"] == tok.token_to_id("<|endoftext|>")
        assert cfg["text_config"]["eos_token_id"] == gen["eos_token_id"] == tok.token_to_id("<|im_end|>")
        assert tok_cfg["bos_token"] is None
    else:
        assert cfg["pad_token_id"] == gen["pad_token_id"] == t.pad_token_id == tok.token_to_id("<pad>")
        assert (gen["bos_token_id"], gen["eos_token_id"]) == (tok.token_to_id("<s>"), tok.token_to_id("</s>")) == (1, 2)
        assert tok.token_to_id("<unk>") == 0 and tok.token_to_id("<0x00>") == 3 and tok_cfg["add_bos_token"]


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_tokenizer_is_our_tokenizer_json(tiny, family):
    t = tiny(family)
    raw = Tokenizer.from_file(str(t.folder / "tokenizer.json"))
    hf = transformers.AutoTokenizer.from_pretrained(t.folder)
    for text in ["USER: <image>\nWhat is in this picture? ASSISTANT:", "  two  spaces, é and 🙂\n", "<|im_start|>x"]:
        ids = raw.encode(text).ids
        assert hf(text).input_ids == ids
        assert hf.decode(ids, skip_special_tokens=False) == raw.decode(ids, skip_special_tokens=False)
    assert raw.decode(raw.encode("Zebra é 🙂 café", add_special_tokens=False).ids) == "Zebra é 🙂 café"


@pytest.mark.parametrize("family", FAMILIES)
def test_vocab_is_padded_past_the_tokenizer(tiny, family):
    t = tiny(family)
    n = len(transformers.AutoTokenizer.from_pretrained(t.folder))
    vocab = t.model.config.text_config.vocab_size
    assert vocab == padded_vocab(n) and vocab > n and vocab % 64 == 0
    emb = t.model.get_input_embeddings().weight
    assert emb.shape == (vocab, 64)
    # the padding rows are the mean of the real rows plus small noise, as the llava-hf converters made them
    assert (emb[n:] - emb[:n].mean(0)).abs().max() < 0.01 < (emb[:n] - emb[:n].mean(0)).abs().max()
    assert padded_vocab(32002) == 32064 and padded_vocab(32064) == 32128


@pytest.mark.parametrize("family", FAMILIES)
def test_lm_head_is_tied_only_for_qwen(tiny, family):
    t = tiny(family)
    keys = stored(t.folder).keys()
    tied = t.model.lm_head.weight is t.model.get_input_embeddings().weight
    assert tied == (family == "qwen") == t.model.config.get_text_config().tie_word_embeddings
    assert ("language_model.lm_head.weight" in keys) == (not tied)
    assert any("lm_head" in k for k in stored(tiny(family, "v4.52").folder)) == (not tied)


def test_vip_config_quirk(tiny):
    t = tiny("vipllava", vip_config_quirk=True)
    cfg, real = read_json(t.folder / "config.json"), read_json(HUBMETA / "llava-hf__vip-llava-7b-hf" / "config.json")
    assert cfg.keys() == real.keys() and "vision_feature_layers" not in cfg and cfg["vision_feature_layer"] == -2
    # transformers 5 aliases vision_feature_layers -> vision_feature_layer, so the stray key wins ...
    assert transformers.AutoConfig.from_pretrained(t.folder).vision_feature_layer == -2
    # ... but the weights are those of the 5-layer projector, as in the real vip-llava-7b-hf
    assert t.model.config.vision_feature_layer == VIP_LAYERS
    assert stored(t.folder)["multi_modal_projector.linear_1.weight"].shape == (64, 5 * 32)
    with pytest.raises(RuntimeError, match="mismatch"):
        transformers.VipLlavaForConditionalGeneration.from_pretrained(t.folder)
    loaded = transformers.VipLlavaForConditionalGeneration.from_pretrained(t.folder, vision_feature_layer=VIP_LAYERS)
    assert_same_weights(loaded, t.model)
    assert tiny("vipllava").model.config.vision_feature_layer == VIP_LAYERS  # the 13b-style config


@pytest.mark.parametrize("family", FAMILIES)
def test_processor_and_reference_forward(tiny, family):
    t = tiny(family)
    for name in ("chat_template.json", "special_tokens_map.json", "processor_config.json"):
        assert (t.folder / name).read_bytes() == (HUB[family] / name).read_bytes()
    processor = transformers.AutoProcessor.from_pretrained(t.folder)
    prompt = {"qwen": "<|im_start|>user\n<image>\nWhat is this?<|im_end|>\n<|im_start|>assistant\n"}.get(
        family, "USER: <image>\nWhat is this? ASSISTANT:")
    inputs = processor(images=Image.new("RGB", (80, 60), (200, 30, 90)), text=prompt, return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 56, 56)
    assert (inputs["input_ids"] == t.image_token_id).sum() == 16  # (56/14)^2 patches; CLIP's class token dropped
    with torch.no_grad():
        logits = t.model(**inputs).logits[0, -1]
        out = t.model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    top2 = logits.topk(2).values
    assert logits.std() > 0.5 and top2[0] - top2[1] > 1e-3  # not near-equal logits
    assert out.max() < len(processor.tokenizer)  # padded rows are never the greedy choice
    loaded = model_class(family).from_pretrained(t.folder)
    assert loaded.generation_config.to_dict() == t.model.generation_config.to_dict()


def test_dtype_is_stored_and_the_reference_holds_the_rounded_weights(tmp_path):
    t = build("qwen", tmp_path, dtype=torch.bfloat16)
    tensors = stored(t.folder)
    assert {x.dtype for x in tensors.values()} == {torch.bfloat16}
    assert read_json(t.folder / "config.json")["torch_dtype"] == "bfloat16"
    assert all(p.dtype == torch.float32 for p in t.model.parameters())
    emb = t.model.get_input_embeddings().weight
    assert torch.equal(tensors["language_model.model.embed_tokens.weight"].float(), emb)
    assert_same_weights(transformers.LlavaForConditionalGeneration.from_pretrained(t.folder), t.model)


def test_seeded_and_small(tiny, tmp_path):
    # No timing here: speed is for benchmarks, and these machines are too noisy for timed assertions.
    a = build("llava", tmp_path / "a", seed=0)
    b, c = build("llava", tmp_path / "b", seed=0), build("llava", tmp_path / "c", seed=1)
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "c" / "tokenizer.json").read_bytes()
    sa, sb, sc = stored(a.folder), stored(b.folder), stored(c.folder)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["multi_modal_projector.linear_1.weight"], sc["multi_modal_projector.linear_1.weight"])
    assert sum(p.stat().st_size for p in a.folder.iterdir()) < 2_000_000
