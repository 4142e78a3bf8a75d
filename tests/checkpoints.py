"""Tiny random LLaVA-family checkpoints laid out exactly as on the hub, with transformers' model as the reference.

A folder holds what the hub repo holds (sparse hub-style config.json, tokenizer files, processor files, chat
template, safetensors weights in one of three key layouts). The reference model is built by transformers from that
same config.json, so parity tests compare two readings of the same files.
"""

from __future__ import annotations

import functools
import json
import shutil
import string
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

if TYPE_CHECKING:
    import transformers

DATA = Path(__file__).resolve().parent / "data"
HUBMETA = DATA / "hubmeta"
SHARED_HUBMETA = Path(__file__).resolve().parents[2] / "shared" / "hubmeta"  # <repo>/../shared/hubmeta; may be absent

FAMILIES = ("llava", "vipllava", "qwen")
LAYOUTS = ("legacy", "v4.52", "v5")  # KEY_LAYOUTS.md sections A, B, C (on disk)
VIP_LAYERS = [-2, -5, -8, -11, 6]

TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512)
VISION = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, image_size=56, patch_size=14)


@dataclass(frozen=True)
class _Family:
    files: str  # hubmeta folder whose tokenizer / processor / generation files are copied
    config: str  # hubmeta folder whose config.json key set is used
    arch: str  # transformers model class
    tokenizer: str  # "llama" (SentencePiece-like BPE) or "qwen" (byte-level BPE)
    vision_layers: int


FAMILY_SPECS = {
    "llava": _Family("llava-hf__llava-1.5-7b-hf", "llava-hf__llava-1.5-7b-hf",
                     "LlavaForConditionalGeneration", "llama", 3),
    # vision_feature_layers [-2, -5, -8, -11, 6] need >= 10 CLIP layers (index -11 is the embeddings output)
    "vipllava": _Family("llava-hf__vip-llava-7b-hf", "llava-hf__vip-llava-13b-hf",
                        "VipLlavaForConditionalGeneration", "llama", 10),
    "qwen": _Family("llava-hf__llava-interleave-qwen-0.5b-hf", "llava-hf__llava-interleave-qwen-0.5b-hf",
                    "LlavaForConditionalGeneration", "qwen", 3),
}
_VIP_QUIRK_CONFIG = "llava-hf__vip-llava-7b-hf"  # no vision_feature_layers, a stray "vision_feature_layer": -2

_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "image_token_index")
_LLAMA_BASE_IDS = {"<unk>": 0, "<s>": 1, "</s>": 2}  # in the vocab, so absent from added_tokens.json


@dataclass
class Tiny:
    folder: Path
    family: str
    model: "transformers.PreTrainedModel"  # fp32, eval(), weights exactly those in the folder
    image_token_id: int
    pad_token_id: int | None  # config.json's (None for qwen, as on the hub; its tokenizer pads with <|endoftext|>)
    layout: str = "legacy"
    shards: int = 1
    dtype: torch.dtype = torch.float32


# ---------------------------------------------------------------------------------------------------- tokenizer

_CORPUS = """\
A cat is sitting on a wooden table next to a cup of coffee.
The astronaut in the white suit smiles at the camera in front of a flag.
What is shown in this image? Describe the picture in detail.
The image shows a small orange cat with green eyes and long white whiskers.
There is a red car parked on the street, and two people are walking by.
A dog runs across the green grass of the park while children play with a ball.
The photo was taken at night; the city lights are bright and the sky is dark.
USER: What color is the cat? ASSISTANT: The cat is orange and white.
Please answer the question about the picture with a short sentence.
How many people are in the image? There are three people standing near the water.
The mountains in the background are covered with snow, and the lake is calm.
A bowl of fruit with apples, bananas and oranges sits on the kitchen counter.
She is reading a book by the window while the rain falls outside.
The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ( ) [ ] { } < > # @ % & !
Is there a person in this photo? Yes, a man is holding a camera and looking at the birds.
The bird on the branch is small and blue, and it is singing in the morning sun.
You are a helpful assistant. Answer the user's questions about images and text.
This is a picture of a busy market with fresh vegetables, bread, fish and flowers.
The train arrives at the station, and the passengers get off with their bags.
An old house stands at the end of the road, surrounded by tall trees and a fence.
"""

_QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
_LLAMA_ADDED = ["<image>", "<pad>"]
_QWEN_ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]


def _added(content: str, id_: int) -> dict:
    return {"id": id_, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True}


def _train(tok, vocab_size: int, alphabet: list[str], special: list[str]) -> dict:
    from tokenizers import trainers

    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS.splitlines() * 2, trainer)
    return json.loads(tok.to_str())["model"]


@functools.cache
def tokenizer_json(kind: str) -> str:
    """tokenizer.json text of the tiny tokenizer: "llama" (like llava-1.5's) or "qwen" (like Qwen1.5's)."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

    if kind == "llama":
        norm = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"},
                                                    {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        # Training only: SentencePiece never merges across words. The saved one has no pre-tokenizer, as on the hub.
        tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
        alphabet = sorted(set(string.ascii_letters + string.digits + string.punctuation + "▁"))
        trained = _train(tok, 320, alphabet, ["<unk>", "<s>", "</s>"])
        # ids: <unk> <s> </s>, the 256 byte-fallback tokens, then the learned pieces (as in the LLaMA vocab)
        pieces = sorted((i, t) for t, i in trained["vocab"].items() if i > 2)
        vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
        vocab |= {t: 259 + n for n, (_, t) in enumerate(pieces)}
        added = [_added(t, i) for i, t in enumerate(["<unk>", "<s>", "</s>"])]
        added += [_added(t, len(vocab) + n) for n, t in enumerate(_LLAMA_ADDED)]
        bos = {"SpecialToken": {"id": "<s>", "type_id": 0}}
        body = {
            "normalizer": norm, "pre_tokenizer": None,
            "post_processor": {"type": "TemplateProcessing",
                               "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
                               "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}},
                                        {"SpecialToken": {"id": "<s>", "type_id": 1}},
                                        {"Sequence": {"id": "B", "type_id": 1}}],
                               "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
                {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
            "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                      "vocab": vocab, "merges": trained["merges"]},
        }
    elif kind == "qwen":
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
        tok = Tokenizer(models.BPE())
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
        trained = _train(tok, 400, sorted(pre_tokenizers.ByteLevel.alphabet()), [])
        vocab = trained["vocab"]
        added = [_added(t, len(vocab) + n) for n, t in enumerate(_QWEN_ADDED)]
        body = {
            "normalizer": {"type": "NFC"},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": _QWEN_SPLIT}, "behavior": "Isolated", "invert": False},
                byte_level]},
            "post_processor": byte_level, "decoder": byte_level,
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                      "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": vocab, "merges": trained["merges"]},
        }
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}")
    text = json.dumps({"version": "1.0", "truncation": None, "padding": None, "added_tokens": added} | body,
                      ensure_ascii=False, indent=2)
    Tokenizer.from_str(text)  # fail here, not in a test, if the JSON is not a valid tokenizer
    return text


def padded_vocab(n_tokens: int) -> int:
    """The next multiple of 64 strictly above len(tokenizer), as the llava-hf converters did (32002 -> 32064)."""
    return (n_tokens // 64 + 1) * 64


# ---------------------------------------------------------------------------------------------------- hub files

def _hub(folder: str, name: str):
    return json.loads((HUBMETA / folder / name).read_text())


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _real_to_tiny(family: str, ids: dict[str, int]) -> dict[int, int]:
    """Real special-token id -> the tiny tokenizer's id of the same token."""
    spec = FAMILY_SPECS[family]
    real = _hub(spec.files, "added_tokens.json") | (_LLAMA_BASE_IDS if spec.tokenizer == "llama" else {})
    return {real_id: ids[token] for token, real_id in real.items()}


def _remap_ids(obj: dict, real_to_tiny: dict[int, int]) -> None:
    """Replace (in place) the real special-token ids of a hub config dict by the tiny tokenizer's."""
    for key in _ID_KEYS:
        if isinstance(obj.get(key), int):
            obj[key] = real_to_tiny[obj[key]]


def _config(family: str, remap: dict[int, int], vocab_size: int, dtype: torch.dtype, quirk: bool,
            heads: tuple[int, int] | None) -> dict:
    spec = FAMILY_SPECS[family]
    cfg = _hub(_VIP_QUIRK_CONFIG if quirk else spec.config, "config.json")
    dtype_name = str(dtype).removeprefix("torch.")
    cfg["text_config"].update(TEXT, vocab_size=vocab_size, torch_dtype=dtype_name)
    if heads:
        cfg["text_config"].update(num_attention_heads=heads[0], num_key_value_heads=heads[1])
    cfg["vision_config"].update(VISION, num_hidden_layers=spec.vision_layers)
    cfg["torch_dtype"] = dtype_name
    if "vocab_size" in cfg:
        cfg["vocab_size"] = vocab_size
    _remap_ids(cfg, remap)
    _remap_ids(cfg["text_config"], remap)
    return cfg


def _write_hub_files(family: str, folder: Path, tok_text: str) -> dict[int, int]:
    """Write tokenizer, processor, generation and chat-template files; return the real -> tiny special-id map."""
    src = HUBMETA / FAMILY_SPECS[family].files
    (folder / "tokenizer.json").write_text(tok_text)
    ids = {t["content"]: t["id"] for t in json.loads(tok_text)["added_tokens"]}

    tok_cfg = _hub(src.name, "tokenizer_config.json")
    tok_cfg["added_tokens_decoder"] = {str(ids[v["content"]]): v for v in tok_cfg["added_tokens_decoder"].values()}
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # use tokenizer.json as is (TokenizersBackend in v5)
    _write_json(folder / "tokenizer_config.json", tok_cfg)
    _write_json(folder / "added_tokens.json", {t: ids[t] for t in _hub(src.name, "added_tokens.json")})
    remap = _real_to_tiny(family, ids)
    gen = _hub(src.name, "generation_config.json")
    _remap_ids(gen, remap)
    _write_json(folder / "generation_config.json", gen)

    pre = _hub(src.name, "preprocessor_config.json")
    for key in ("size", "crop_size"):
        if key in pre:
            pre[key] = {k: 56 for k in pre[key]}  # shortest_edge, or height and width
    _write_json(folder / "preprocessor_config.json", pre)
    for name in ("special_tokens_map.json", "chat_template.json", "processor_config.json"):
        shutil.copyfile(src / name if (src / name).exists() else HUBMETA / FAMILY_SPECS["llava"].files / name,
                        folder / name)  # verbatim
    return remap


# ---------------------------------------------------------------------------------------------------- weights

def _randomize(model: torch.nn.Module, seed: int, dtype: torch.dtype, n_tokens: int) -> None:
    """Re-initialise every parameter with a wider spread than transformers' std 0.02, rounded through dtype."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 1 and name.endswith("weight"):  # RMSNorm / LayerNorm scales
                p.copy_(1 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif "patch_embedding" in name:  # 3*14*14 inputs per output
                p.copy_(0.05 * noise)
            else:  # linear and embedding weights, class embedding
                p.copy_(0.15 * noise)
        # Rows past the tokenizer as the llava-hf converters filled them: the mean of the real rows plus small noise,
        # so their logits sit near the average and greedy decoding does not pick ids the tokenizer lacks.
        rows = {id(w): w for w in (model.get_input_embeddings().weight, model.lm_head.weight)}  # one if tied
        for w in rows.values():
            real = w[:n_tokens]
            noise = torch.randn(w.shape[0] - n_tokens, w.shape[1], generator=gen)
            w[n_tokens:] = real.mean(0) + 0.01 * real.std() * noise
        for p in model.parameters():
            p.copy_(p.to(dtype).float())


def disk_key(name: str, layout: str) -> str:
    """transformers 5 in-memory parameter name -> the name stored on disk in `layout`."""
    if layout == "v4.52":
        return name.replace("model.vision_tower.", "model.vision_tower.vision_model.", 1)
    if layout not in ("legacy", "v5"):
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    tower = "vision_tower.vision_model." if layout == "legacy" else "vision_tower."
    for old, new in (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                     ("model.vision_tower.", tower), ("model.multi_modal_projector.", "multi_modal_projector.")):
        if name.startswith(old):
            return new + name[len(old):]
    raise KeyError(name)


def _write_weights(model, folder: Path, layout: str, shards: int, dtype: torch.dtype) -> None:
    tied = model.lm_head.weight is model.get_input_embeddings().weight
    tensors = {disk_key(name, layout): t.detach().to(dtype).contiguous().clone()
               for name, t in model.state_dict().items() if not (tied and name == "lm_head.weight")}
    meta = {"format": "pt"}
    if shards == 1:
        save_file(tensors, folder / "model.safetensors", metadata=meta)
        return
    names = list(tensors)
    if not 1 < shards <= len(names):
        raise ValueError(f"shards must be in 1..{len(names)}, got {shards}")
    weight_map = {}
    for i in range(shards):  # contiguous groups of about equal count, in state-dict order
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i * len(names) // shards:(i + 1) * len(names) // shards]
        save_file({k: tensors[k] for k in part}, folder / file, metadata=meta)
        weight_map |= dict.fromkeys(part, file)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    _write_json(folder / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


# ---------------------------------------------------------------------------------------------------- API

def build(family: str, dest: Path, *, layout: str = "legacy", shards: int = 1, seed: int = 0,
          dtype: torch.dtype = torch.float32, vip_config_quirk: bool = False,
          heads: tuple[int, int] | None = None) -> Tiny:
    """Write a tiny random `family` checkpoint into `dest` and return it with its transformers reference model.

    heads: (attention heads, key-value heads) instead of TEXT's (4, 2), whose 16-wide heads llava-cli's one-token
    kernel does not take: (2, 1) gives 32-wide heads, as the real checkpoints' 64 and 128 are multiples of 32."""
    import transformers

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    if vip_config_quirk and family != "vipllava":
        raise ValueError("vip_config_quirk applies to the vipllava family only")
    spec = FAMILY_SPECS[family]
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tok_text = tokenizer_json(spec.tokenizer)
    remap = _write_hub_files(family, dest, tok_text)
    n_tokens = json.loads(tok_text)["added_tokens"][-1]["id"] + 1  # the added tokens come last
    cfg = _config(family, remap, padded_vocab(n_tokens), dtype, vip_config_quirk, heads)
    _write_json(dest / "config.json", cfg)

    # The reference reads the same sparse config.json, so defaults are transformers' own resolution.
    config = transformers.AutoConfig.from_pretrained(dest)
    if vip_config_quirk:
        # transformers 5 aliases vision_feature_layers -> vision_feature_layer, so the stray -2 would give a
        # 1-layer projector; the real vip-llava-7b-hf weights have the 5-layer one.
        config.vision_feature_layer = list(VIP_LAYERS)
    for c in (config, config.text_config, config.vision_config):  # else transformers 5 follows config.json's dtype
        c.dtype = torch.float32
    torch.manual_seed(seed)
    model = getattr(transformers, spec.arch)(config)
    _randomize(model, seed, dtype, n_tokens)
    model.generation_config = transformers.GenerationConfig.from_pretrained(dest)  # as from_pretrained(dest) has it
    model.eval()
    _write_weights(model, dest, layout, shards, dtype)
    return Tiny(dest, family, model, cfg["image_token_index"], cfg.get("pad_token_id"), layout, shards, dtype)


def relayout(src: Tiny, dest: Path, layout: str, shards: int = 1) -> Tiny:
    """The same checkpoint (same weights and reference model) with another key layout or sharding."""
    dest = Path(dest)
    if dest.resolve() == src.folder.resolve():
        raise ValueError(f"relayout needs a new folder, not the source {src.folder}")
    dest.mkdir(parents=True, exist_ok=True)
    for path in src.folder.iterdir():
        if path.is_file() and not (path.suffix == ".safetensors" or path.name == "model.safetensors.index.json"):
            shutil.copyfile(path, dest / path.name)
    _write_weights(src.model, dest, layout, shards, src.dtype)
    return Tiny(dest, src.family, src.model, src.image_token_id, src.pad_token_id, layout, shards, src.dtype)
