"""SentencePiece tokenizer.model -> tokenizer.json, with neither `sentencepiece` nor `protobuf` installed.

A .model file is one protobuf ModelProto message; the few fields a BPE tokenizer.json needs are read with the
small wire-format reader below. The merges are derived from the piece scores exactly as transformers' converter
derived them for the llava-hf tokenizer.json files (tests check the result against llava-1.5-7b-hf's, byte for byte
once parsed).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import LlavaError

_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4  # SentencePiece piece types (sentencepiece_model.proto)
_BPE = 2  # TrainerSpec.ModelType


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        byte = buf[i]
        i += 1
        n |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return n, i


def _fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of one protobuf message: varints as int, everything else as raw bytes."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, i = buf[i:i + size], i + size
        elif wire == 2:
            size, i = _varint(buf, i)
            value, i = buf[i:i + size], i + size
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if i > len(buf):
            raise ValueError("truncated message")
        yield number, value


@dataclass
class SentencePiece:
    """The parts of a SentencePiece ModelProto a BPE tokenizer.json needs (proto2 defaults where a field is absent)."""

    pieces: list[tuple[str, float, int]]  # (piece, score, type), by id
    model_type: int = 1  # 1 unigram, 2 BPE
    byte_fallback: bool = False
    unk_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    charsmap: bytes = b""

    @classmethod
    def read(cls, path: Path) -> SentencePiece:
        try:
            sp = cls([])
            for number, value in _fields(path.read_bytes()):
                if number == 1:  # repeated SentencePiece {1: piece, 2: score, 3: type}
                    piece = dict(_fields(value))
                    score = struct.unpack("<f", piece[2])[0] if 2 in piece else 0.0
                    sp.pieces.append((piece.get(1, b"").decode("utf-8"), score, piece.get(3, 1)))
                elif number == 2:  # TrainerSpec
                    spec = dict(_fields(value))
                    sp.model_type, sp.byte_fallback = spec.get(3, 1), bool(spec.get(35, 0))
                    sp.unk_id, sp.bos_id, sp.eos_id = spec.get(40, 0), spec.get(41, 1), spec.get(42, 2)
                elif number == 3:  # NormalizerSpec
                    spec = dict(_fields(value))
                    sp.charsmap = spec.get(2, b"")
                    sp.add_dummy_prefix, sp.remove_extra_whitespaces = bool(spec.get(3, 1)), bool(spec.get(4, 1))
        except (ValueError, IndexError, TypeError, UnicodeDecodeError, struct.error) as e:
            raise LlavaError(f"{path}: not a SentencePiece model ({e})") from None
        except OSError as e:
            raise LlavaError(f"cannot read {path}: {e.strerror or e}") from None
        if not sp.pieces:
            raise LlavaError(f"{path}: not a SentencePiece model (no pieces)")
        return sp


def bpe_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[list[str]]:
    """Every split of a piece into two pieces, best score first; splits of one piece in id order (transformers 4.3x)."""
    merges = []
    for piece, score in scores.items():
        local = [(piece[:i], piece[i:], score) for i in range(1, len(piece))
                 if piece[:i] in vocab and piece[i:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges += local
    merges.sort(key=lambda m: m[2], reverse=True)  # stable: ties keep the order above
    return [[left, right] for left, right, _ in merges]


def _added(id_: int, content: str, special: bool) -> dict[str, Any]:
    return {"id": id_, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": special}


def sentencepiece_json(sp: SentencePiece, path: Path, add_bos: bool, add_eos: bool) -> dict[str, Any]:
    """tokenizer.json for a LLaMA-style BPE SentencePiece model, laid out as llava-hf's llava-1.5 tokenizer.json."""
    hint = "pass --tokenizer with a folder or hub id that has a tokenizer.json"
    if sp.model_type != _BPE:
        raise LlavaError(f"{path}: a SentencePiece unigram model, not BPE; {hint}")
    if sp.remove_extra_whitespaces or sp.charsmap:
        raise LlavaError(f"{path}: its SentencePiece normalization cannot be reproduced here; {hint}")
    vocab = {piece: i for i, (piece, _, _) in enumerate(sp.pieces)}
    merges = bpe_merges(vocab, {piece: score for piece, score, _ in sp.pieces})
    added = [_added(i, p, t != _USER_DEFINED) for i, (p, _, t) in enumerate(sp.pieces)
             if t in (_UNKNOWN, _CONTROL, _USER_DEFINED)]
    bos, eos = sp.pieces[sp.bos_id][0], sp.pieces[sp.eos_id][0]

    def template(type_id: int, seq: str) -> list[dict]:
        def special(token: str) -> list[dict]:
            return [{"SpecialToken": {"id": token, "type_id": type_id}}]

        return (special(bos) if add_bos else []) + [{"Sequence": {"id": seq, "type_id": type_id}}] + \
            (special(eos) if add_eos else [])

    used = [t for t, on in ((bos, add_bos), (eos, add_eos)) if on]
    post = {"type": "TemplateProcessing", "single": template(0, "A"), "pair": template(0, "A") + template(1, "B"),
            "special_tokens": {t: {"id": t, "ids": [vocab[t]], "tokens": [t]} for t in used}}
    prepend = [{"type": "Prepend", "prepend": "▁"}] if sp.add_dummy_prefix else []
    strip = [{"type": "Strip", "content": " ", "start": 1, "stop": 0}] if sp.add_dummy_prefix else []
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": prepend + [
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
        "pre_tokenizer": None,
        "post_processor": post,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
            {"type": "Fuse"}] + strip},
        "model": {"type": "BPE", "dropout": None, "unk_token": sp.pieces[sp.unk_id][0],
                  "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                  "byte_fallback": sp.byte_fallback, "ignore_merges": False, "vocab": vocab, "merges": merges},
    }
