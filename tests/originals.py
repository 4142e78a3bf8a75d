"""Tiny checkpoints in the original formats `llava convert` reads, made from tiny random transformers models.

  liuhaotian  LLaVA-1.5: pytorch_model-0000N-of-00002.bin + index, flat `mm_*` config, SentencePiece tokenizer.model,
              no vision tower (it lives in a separate CLIP folder, `tower`)
  mucai       ViP-LLaVA: the same, with the tower inside and the clip_layernorm / final_linear projector
  lmms-lab    LLaVA-NeXT-Interleave: safetensors shards + index, Qwen2 vocab.json + merges.txt, tied lm_head,
              SigLIP tower inside minus its last layer, model.image_newline

Each is the inverse of the llava-hf conversion applied to a tiny hub checkpoint from checkpoints.build(): keys
mapped back, the vocabulary cut to the original's rows, the real original config (../shared/hubmeta) with small
sizes. The reference model is transformers' model of the hub checkpoint, with its vocabulary rows past the
original's set to the mean of the others, which is what the conversion writes there.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from checkpoints import HUBMETA, Tiny, build, disk_key, tokenizer_json

SOURCES = {"liuhaotian": "llava", "mucai": "vipllava", "lmms-lab": "qwen"}
CONFIGS = {"liuhaotian": "liuhaotian__llava-v1.5-7b/config.json", "mucai": "mucai__vip-llava-13b/config.json",
           "lmms-lab": "lmms-lab__llava-next-interleave-qwen-0.5b/config.PARTIAL_EXCERPT.txt"}
# lmms-lab's config excerpt stops at rope_theta; the rest as Qwen1.5-0.5B-Chat and LLaVA-NeXT write them.
LMMS_TAIL = {"rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True,
             "tokenizer_model_max_length": 32768, "tokenizer_padding_side": "right", "torch_dtype": "bfloat16",
             "transformers_version": "4.40.0.dev0", "use_cache": True, "use_mm_proj": True,
             "use_sliding_window": False, "vocab_size": 151936}


@dataclass
class Original:
    folder: Path
    source: str  # a key of SOURCES
    reference: torch.nn.Module  # transformers model the converted checkpoint must reproduce
    tower: Path  # CLIP / SigLIP folder to pass as --vision-tower (weights used only for liuhaotian)
    image_token_id: int
    rows: int  # embedding rows of the original


def original_key(legacy: str, vip: bool) -> str:
    """llava-hf legacy hub key -> the original checkpoint's key."""
    if legacy.startswith("language_model."):
        return legacy.removeprefix("language_model.")
    if legacy.startswith("vision_tower."):
        return "model.vision_tower." + legacy
    rest = legacy.removeprefix("multi_modal_projector.")
    table = {"linear_1.": "0.", "linear_2.": "2."}
    if vip:
        table = {"linear_1.": "final_linear.0.", "linear_2.": "final_linear.2.",
                 "projector_layernorm.": "clip_layernorm."}
    old = next(k for k in table if rest.startswith(k))
    return "model.mm_projector." + table[old] + rest[len(old):]


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _config(source: str, t: Tiny, rows: int) -> dict:
    text = HUBMETA.joinpath(CONFIGS[source]).read_text()
    if source == "lmms-lab":
        body = text[text.index("{"):text.index('  "rope_theta"')].rstrip().rstrip(",") + "}"
        cfg = json.loads(body) | LMMS_TAIL
    else:
        cfg = json.loads(text)
    tc, vc = t.model.config.text_config, t.model.config.vision_config
    layers = 5 if source == "mucai" else 1
    cfg.update(hidden_size=tc.hidden_size, intermediate_size=tc.intermediate_size,
               num_hidden_layers=tc.num_hidden_layers,
               num_attention_heads=tc.num_attention_heads, num_key_value_heads=tc.num_key_value_heads,
               max_position_embeddings=tc.max_position_embeddings, vocab_size=rows, torch_dtype="float32",
               mm_hidden_size=vc.hidden_size * layers, bos_token_id=tc.bos_token_id, eos_token_id=tc.eos_token_id)
    if "pad_token_id" in cfg:
        cfg["pad_token_id"] = 0  # <unk>, as the originals pad
    return cfg


# ------------------------------------------------------------------------------------------------ tokenizer files

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _field(number: int, value: int | float | bytes) -> bytes:
    if isinstance(value, bytes):
        return _varint(number << 3 | 2) + _varint(len(value)) + value
    if isinstance(value, float):
        return _varint(number << 3 | 5) + struct.pack("<f", value)
    return _varint(number << 3) + _varint(value)


def sentencepiece_model(vocab: dict[str, int]) -> bytes:
    """A SentencePiece BPE ModelProto for a LLaMA-style vocab (<unk> <s> </s>, 256 byte pieces, then pieces)."""
    pieces = b""
    for piece, i in sorted(vocab.items(), key=lambda kv: kv[1]):
        kind = 2 if i == 0 else 3 if i < 3 else 6 if piece.startswith("<0x") else 1
        score = -float(i) if kind == 1 else 0.0  # earlier pieces merge first
        pieces += _field(1, _field(1, piece.encode()) + _field(2, score) + _field(3, kind))
    trainer = _field(3, 2) + _field(35, 1) + _field(40, 0) + _field(41, 1) + _field(42, 2)  # BPE, byte_fallback
    normalizer = _field(1, b"identity") + _field(3, 1) + _field(4, 0) + _field(5, 1)
    return pieces + _field(2, trainer) + _field(3, normalizer)


def _tokenizer_files(source: str, folder: Path) -> None:
    if source in ("liuhaotian", "mucai"):  # Vicuna's tokenizer.model and liuhaotian's tokenizer files
        vocab = json.loads(tokenizer_json("llama"))["model"]["vocab"]
        (folder / "tokenizer.model").write_bytes(sentencepiece_model(vocab))
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            (folder / name).write_bytes((HUBMETA / "liuhaotian__llava-v1.5-7b" / name).read_bytes())
        return
    tok = json.loads(tokenizer_json("qwen"))
    _write_json(folder / "vocab.json", tok["model"]["vocab"])
    merges = [" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    cfg = json.loads((HUBMETA / "lmms-lab__llava-next-interleave-qwen-7b" / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"] = {str(ids[v["content"]]): v for v in cfg["added_tokens_decoder"].values()}
    _write_json(folder / "tokenizer_config.json", cfg)
    added = json.loads((HUBMETA / "lmms-lab__llava-next-interleave-qwen-7b" / "added_tokens.json").read_text())
    _write_json(folder / "added_tokens.json", {k: ids[k] for k in added})


# ------------------------------------------------------------------------------------------------ weights

def _tower(source: str, t: Tiny, folder: Path, weights: dict[str, torch.Tensor], as_clip_model: bool) -> None:
    """The separate tower folder: liuhaotian's real weights, or for the others a config with unrelated weights."""
    import transformers

    vc = t.model.config.vision_config
    if source == "lmms-lab":  # google/siglip-so400m-patch14-384 has one layer more than LLaVA-NeXT keeps
        config = transformers.SiglipVisionConfig(**(vc.to_dict() | {"num_hidden_layers": vc.num_hidden_layers + 1}))
        transformers.SiglipVisionModel(config).save_pretrained(folder)
        return
    if not as_clip_model:
        model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**vc.to_dict()))
        if source == "liuhaotian":
            model.load_state_dict(weights, strict=True)
        model.save_pretrained(folder)
        return
    # openai/clip-vit-large-patch14-336 itself: a CLIPModel, pickled, with a text model and projections
    text = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=1, vocab_size=100,
                bos_token_id=0, eos_token_id=1, pad_token_id=1)
    config = transformers.CLIPConfig(vision_config=vc.to_dict(), text_config=text, projection_dim=16)
    clip = transformers.CLIPModel(config)
    clip.vision_model.load_state_dict(weights, strict=True)
    clip.config.save_pretrained(folder)
    torch.save({k: v.contiguous() for k, v in clip.state_dict().items()}, folder / "pytorch_model.bin")


def build_original(source: str, dest: Path, *, seed: int = 0, tower_as_clip_model: bool = False) -> Original:
    """Write a tiny `source`-format checkpoint into dest/original and its tower into dest/tower."""
    vip, family = source == "mucai", SOURCES[source]
    t = build(family, dest / "hub", seed=seed)
    ref = t.model
    vocab = ref.config.text_config.vocab_size
    rows = vocab - 32 if source == "lmms-lab" else t.image_token_id  # Qwen's rows outnumber its tokens
    assert (rows + 2 + 63) // 64 * 64 == vocab, "the conversion must pad back to the reference's vocabulary"
    with torch.no_grad():  # what the conversion writes past the original's rows
        for w in {id(w): w for w in (ref.get_input_embeddings().weight, ref.lm_head.weight)}.values():
            w[rows:] = w[:rows].mean(0)

    folder, tower_dir = dest / "original", dest / "tower"
    folder.mkdir(parents=True)
    tied = ref.lm_head.weight is ref.get_input_embeddings().weight
    state, tower_weights = {}, {}
    for name, tensor in ref.state_dict().items():
        legacy = disk_key(name, "legacy")
        if tied and legacy == "language_model.lm_head.weight":
            continue
        tensor = tensor.detach().clone()
        if legacy in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
            tensor = tensor[:rows].clone()
        if legacy.startswith("vision_tower.") and source == "liuhaotian":
            tower_weights[legacy.removeprefix("vision_tower.vision_model.")] = tensor
            continue
        state[original_key(legacy, vip)] = tensor
    if source == "lmms-lab":
        state["model.image_newline"] = torch.randn(ref.config.text_config.hidden_size)
    else:
        head_dim = ref.config.text_config.hidden_size // ref.config.text_config.num_attention_heads
        for i in range(ref.config.text_config.num_hidden_layers):
            inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2) / head_dim)
            state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq

    keys = sorted(state)
    halves = {"1": keys[: len(keys) // 2], "2": keys[len(keys) // 2:]}
    ext = "safetensors" if source == "lmms-lab" else "bin"
    names = {n: f"{'model' if ext == 'safetensors' else 'pytorch_model'}-0000{n}-of-00002.{ext}" for n in halves}
    for n, part in halves.items():
        shard = {k: state[k] for k in part}
        if ext == "bin":
            torch.save(shard, folder / names[n])
        else:
            save_file(shard, folder / names[n], metadata={"format": "pt"})
    index = "model.safetensors.index.json" if ext == "safetensors" else "pytorch_model.bin.index.json"
    total = sum(v.numel() * v.element_size() for v in state.values())
    _write_json(folder / index, {"metadata": {"total_size": total},
                                 "weight_map": {k: names[n] for n, part in halves.items() for k in part}})
    _write_json(folder / "config.json", _config(source, t, rows))
    tc = ref.config.text_config
    generation = {"bos_token_id": tc.bos_token_id, "eos_token_id": tc.eos_token_id, "max_length": 4096}
    _write_json(folder / "generation_config.json", generation | ({} if source == "lmms-lab" else {"pad_token_id": 0}))
    _tokenizer_files(source, folder)
    _tower(source, t, tower_dir, tower_weights, tower_as_clip_model)
    return Original(folder, source, ref, tower_dir, t.image_token_id, rows)
