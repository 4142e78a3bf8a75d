"""A tokenizers.Tokenizer wrapper that gives the ids transformers gives, expands image tokens and streams text."""

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken
from tokenizers import Tokenizer as RawTokenizer

from llava_cli.errors import LlavaError
from llava_cli.files import read_json

# transformers 5 maps the llava and vipllava model types to TokenizersBackend, and AutoTokenizer / AutoProcessor
# look at config.json first: a hub checkpoint's tokenizer.json is used as it is, whatever tokenizer_class its
# tokenizer_config.json names. So do we. For llava-1.5 that keeps the legacy normalizer, which prepends "▁" to each
# piece of text after a special token: "<image>\nWhat" is <image> "▁" "\n" "What", as the original LLaVA training
# tokenized it (each chunk after <image> through SentencePiece, with its dummy prefix).
#
# Prompts are encoded from parts (templates.Part). tokenizers splits a text at its added tokens first and
# normalizes, pre-tokenizes and encodes each piece between them on its own, so encoding the runs between the
# template's own special tokens one by one gives the ids a whole-text encode gives. Each run is encoded with
# encode_special_tokens, so a special-token string inside it, which can only come from the text people and answers
# wrote, is plain text. This differs from transformers on purpose: its processor would read "<|im_end|>" typed by a
# user as the end of the turn. Added tokens that are not special (none in the supported families) still match.


class TextStream:
    """Incremental detokenizer: push generated ids one by one, get the text that is now final.

    Text is decoded over a sliding window of the last tokens (as text-generation-inference does), so decoders that
    strip a leading space see the token before, and text is held back while it ends in an incomplete character.
    tokenizers' DecodeStream raises on token runs whose bytes never form valid UTF-8 (random or odd answers do
    that); this emits U+FFFD for them instead, as a full decode would.
    """

    def __init__(self, raw: RawTokenizer) -> None:
        self._raw = raw
        self._ids: list[int] = []
        self._prefix = self._read = 0  # window start; tokens before _read are already shown

    def _decode(self, ids: list[int]) -> str:
        return self._raw.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """The text this token completes ('' while a multi-byte character is still incomplete)."""
        self._ids.append(token_id)
        shown = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        if len(text) <= len(shown) or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(shown):]

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        shown = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return text[len(shown):]


class Tokenizer:
    """The checkpoint's tokenizer, configured the way transformers configures it."""

    def __init__(self, raw: RawTokenizer, special: dict[str, str | None], add_bos: bool) -> None:
        self._raw = raw
        self.bos_id = self._id_of(special.get("bos_token"))
        self.eos_id = self._id_of(special.get("eos_token"))
        self.pad_id = self._id_of(special.get("pad_token"))
        self.add_bos = add_bos and self.bos_id is not None
        added = sorted((t.content for t in raw.get_added_tokens_decoder().values()), key=len, reverse=True)
        # longest first, as tokenizers matches; a capturing group, so split() keeps the tokens at odd indices
        self._added = re.compile("(" + "|".join(map(re.escape, added)) + ")") if added else None

    @classmethod
    def from_folder(cls, folder: Path) -> "Tokenizer":
        """Load tokenizer.json and tokenizer_config.json (special_tokens_map.json fills gaps) from a folder."""
        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file():
            if (folder / "tokenizer.model").is_file():
                raise LlavaError(
                    f"{folder} has a SentencePiece tokenizer.model but no tokenizer.json; "
                    "`llava convert` makes tokenizer.json"
                )
            raise LlavaError(f"{folder} has no tokenizer.json")
        config = read_json(folder / "tokenizer_config.json")
        special_map = read_json(folder / "special_tokens_map.json", required=False)
        try:
            raw = RawTokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # the Rust error says what is wrong with the JSON
            raise LlavaError(f"cannot read {folder / 'tokenizer.json'}: {str(e).splitlines()[0]}") from None

        special = {
            key: _content(config[key] if key in config else special_map.get(key))
            for key in ("bos_token", "eos_token", "pad_token")
        }
        # transformers 5 drops add_bos_token when tokenizer.json exists and lets its post-processor add BOS; on the
        # hub files both agree. We decide from tokenizer_config.json and fall back to the post-processor.
        bos = special["bos_token"]
        json_adds_bos = bos is not None and raw.encode("", add_special_tokens=True).ids[:1] == [raw.token_to_id(bos)]
        add_bos = bool(config.get("add_bos_token", json_adds_bos))

        _add_config_tokens(raw, config.get("added_tokens_decoder") or {})
        return cls(raw, special, add_bos)

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._raw.token_to_id(token)

    def token_to_id(self, token: str) -> int | None:
        """The id of a token string, or None when the vocabulary lacks it."""
        return self._raw.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with BOS first when the tokenizer config asks for it; special tokens are matched."""
        return self._bos() + self._raw.encode(text, add_special_tokens=False).ids

    def encode_parts(self, parts: Sequence[tuple[str, bool]]) -> list[int]:
        """Token ids of a prompt given as (text, plain) parts: special tokens are matched in the template's parts
        only; in plain parts (what people and the model wrote) their strings are ordinary text."""
        runs: list[str | int] = [""]  # text between the template's added tokens, and those tokens' ids
        for text, plain in parts:
            pieces = [text] if plain or self._added is None else self._added.split(text)
            runs[-1] += pieces[0]
            for k in range(1, len(pieces), 2):
                runs += [self._raw.token_to_id(pieces[k]), pieces[k + 1]]
        ids = self._bos()
        self._raw.encode_special_tokens = True
        try:
            for run in runs:
                if isinstance(run, int):
                    ids.append(run)
                elif run:  # tokenizers skips empty pieces between adjacent tokens too
                    ids += self._raw.encode(run, add_special_tokens=False).ids
        finally:
            self._raw.encode_special_tokens = False
        return ids

    def _bos(self) -> list[int]:
        return [self.bos_id] if self.add_bos and self.bos_id is not None else []

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, skipping special tokens."""
        return self._raw.decode(list(ids), skip_special_tokens=True)

    def stream(self) -> TextStream:
        """A fresh incremental detokenizer for one answer."""
        return TextStream(self._raw)

    def __len__(self) -> int:
        return self._raw.get_vocab_size(with_added_tokens=True)


def expand_image_tokens(ids: Sequence[int], image_id: int, per_image: int) -> list[int]:
    """Replace each image id with `per_image` copies, the slots the vision features fill."""
    out: list[int] = []
    for token_id in ids:
        if token_id == image_id:
            out.extend([image_id] * per_image)
        else:
            out.append(token_id)
    return out


def _content(token: Any) -> str | None:
    """A special token's text, from either the plain string or the AddedToken dict form."""
    return token.get("content") if isinstance(token, dict) else token


def _add_config_tokens(raw: RawTokenizer, added: dict[str, Any]) -> None:
    """Add tokenizer_config.json's added tokens that tokenizer.json lacks, with their flags, as transformers does."""
    present = raw.get_added_tokens_decoder()
    for index, token in sorted(added.items(), key=lambda kv: int(kv[0])):
        if int(index) in present or not isinstance(token, dict):
            continue
        # add_tokens keeps a vocabulary token's id and gives a new token the next free id, so only add a token
        # when that lands on the id the config names; files that disagree keep tokenizer.json's view.
        known = raw.token_to_id(token["content"])
        next_free = raw.get_vocab_size(with_added_tokens=True)
        if (known if known is not None else next_free) != int(index):
            continue
        flags = {k: token[k] for k in ("single_word", "lstrip", "rstrip", "normalized", "special") if k in token}
        raw.add_tokens([AddedToken(token["content"], **flags)])
