"""The converted checkpoint's tokenizer: tokenizer.json from whatever the source ships, plus `<image>` and `<pad>`.

Sources ship a tokenizer.json, a byte-level vocab.json + merges.txt (Qwen), or only a SentencePiece tokenizer.model
(LLaMA / Vicuna, converted by convert_spm.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import AddedToken
from tokenizers import Tokenizer as RawTokenizer

from .convert_spm import SentencePiece, sentencepiece_json
from .errors import LlavaError
from .files import read_json
IMAGE, PAD = "<image>", "<pad>"
# Qwen2's pre-tokenizer split, as in the hub tokenizer.json of Qwen2 models (transformers' tokenization_qwen2.py).
QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def byte_level_json(folder: Path) -> dict[str, Any]:
    """tokenizer.json for a Qwen2 byte-level BPE from vocab.json and merges.txt (Qwen2TokenizerFast's pipeline)."""
    vocab = read_json(folder / "vocab.json")
    lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [line.split(" ") for line in lines if line and not line.startswith("#version")]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": False}, byte_level]},
        "post_processor": byte_level, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }


def _content(token: Any) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


@dataclass
class ConvertedTokenizer:
    raw: RawTokenizer
    config: dict[str, Any]  # tokenizer_config.json
    special_map: dict[str, Any]  # special_tokens_map.json ({} when the source has none)
    origin: str  # how tokenizer.json came to be, for the report
    added: dict[str, int]  # tokens this conversion added, with their ids
    text: str | None = None  # the source's tokenizer.json, written as it is when nothing was added

    @property
    def image_id(self) -> int:
        return self.raw.token_to_id(IMAGE)

    def id_of(self, key: str) -> int | None:
        token = _content(self.config.get(key)) or _content(self.special_map.get(key))
        return None if token is None else self.raw.token_to_id(token)

    def __len__(self) -> int:
        return self.raw.get_vocab_size(with_added_tokens=True)

    def files(self) -> dict[str, str]:
        """File name -> text of every tokenizer file to write."""
        text = self.text if self.text is not None and not self.added else self.raw.to_str(pretty=True)
        files = {"tokenizer.json": text,
                 "tokenizer_config.json": json.dumps(self.config, indent=2, ensure_ascii=False) + "\n"}
        if self.special_map:
            files["special_tokens_map.json"] = json.dumps(self.special_map, indent=2, ensure_ascii=False) + "\n"
        return files


def load_tokenizer(folder: Path, add_llava_tokens: bool) -> ConvertedTokenizer:
    """The tokenizer in `folder` as tokenizer.json, with `<image>` (and `<pad>` when it has no pad) added if asked."""
    config = read_json(folder / "tokenizer_config.json")
    special_map = read_json(folder / "special_tokens_map.json", required=False)
    if (folder / "tokenizer.json").is_file():
        text, origin = (folder / "tokenizer.json").read_text(encoding="utf-8"), "tokenizer.json"
    elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        if (config.get("tokenizer_class") or "").removesuffix("Fast") != "Qwen2Tokenizer":
            raise LlavaError(f"{folder}: vocab.json/merges.txt of a {config.get('tokenizer_class')!r} tokenizer are "
                             "not supported; pass --tokenizer with a folder that has a tokenizer.json")
        text, origin = json.dumps(byte_level_json(folder)), "converted from vocab.json and merges.txt"
    elif (folder / "tokenizer.model").is_file():
        sp = SentencePiece.read(folder / "tokenizer.model")
        add_bos, add_eos = bool(config.get("add_bos_token", True)), bool(config.get("add_eos_token", False))
        text = json.dumps(sentencepiece_json(sp, folder / "tokenizer.model", add_bos, add_eos), ensure_ascii=False)
        origin = "converted from SentencePiece tokenizer.model"
    else:
        raise LlavaError(f"{folder}: no tokenizer (tokenizer.json, vocab.json + merges.txt or tokenizer.model); "
                         "pass --tokenizer DIR|ID")
    try:
        raw = RawTokenizer.from_str(text)
    except Exception as e:  # the Rust error names what is wrong
        raise LlavaError(f"{folder}: cannot read its tokenizer: {str(e).splitlines()[0]}") from None
    _add_config_tokens(raw, config, folder)
    tok = ConvertedTokenizer(raw, _plain_config(config), special_map, origin, {},
                             text if origin == "tokenizer.json" else None)
    if add_llava_tokens:
        _add_llava_tokens(tok)
    return tok


def _add_config_tokens(raw: RawTokenizer, config: dict[str, Any], folder: Path) -> None:
    """Add tokenizer_config.json's added tokens that the vocabulary lacks (Qwen's <|im_start|> ...), at their ids."""
    for index, token in sorted((config.get("added_tokens_decoder") or {}).items(), key=lambda kv: int(kv[0])):
        if raw.token_to_id(token["content"]) is not None:
            continue
        raw.add_tokens([AddedToken(token["content"], special=bool(token.get("special", True)), normalized=False)])
        if raw.token_to_id(token["content"]) != int(index):
            raise LlavaError(f"{folder}: tokenizer_config.json puts {token['content']!r} at id {index}, "
                             "which the vocabulary does not leave free")


def _add_llava_tokens(tok: ConvertedTokenizer) -> None:
    """`<image>`, and `<pad>` when the tokenizer pads with nothing or with <unk>, as llava-hf's converters added."""
    unk = _content(tok.config.get("unk_token")) or _content(tok.special_map.get("unk_token"))
    pad = _content(tok.config["pad_token"] if "pad_token" in tok.config else tok.special_map.get("pad_token"))
    wanted = [IMAGE] + ([PAD] if pad is None or pad == unk else [])
    for token in wanted:
        if tok.raw.token_to_id(token) is None:
            tok.raw.add_special_tokens([AddedToken(token, special=True, normalized=False)])
            tok.added[token] = tok.raw.token_to_id(token)
    if PAD in wanted:
        tok.config["pad_token"] = PAD
        if tok.special_map:
            tok.special_map["pad_token"] = PAD
    tok.config["added_tokens_decoder"] = {
        str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                 "single_word": t.single_word, "special": t.special}
        for i, t in sorted(tok.raw.get_added_tokens_decoder().items())
    }
    tok.config.update(image_token=IMAGE, extra_special_tokens={"image_token": IMAGE},
                      processor_class="LlavaProcessor", padding_side="left")


def _plain_config(config: dict[str, Any]) -> dict[str, Any]:
    """tokenizer_config.json with old-style {"__type": "AddedToken", ...} special tokens written as plain strings."""
    return {k: (_content(v) if isinstance(v, dict) and "__type" in v else v) for k, v in config.items()}
