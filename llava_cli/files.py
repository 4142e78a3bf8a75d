"""Reading a checkpoint's JSON files and checking their fields, with one-line errors that name the file and key."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from .errors import LlavaError


MAX_BYTES = 256 * 2**20  # far above any config, index or chat file; /dev/zero or a FIFO stops here, not in swap


def json_text(obj: Any, **options: Any) -> str:
    """json.dumps that UTF-8 can always encode: non-ASCII kept as it is, unless a string holds a surrogate (a file
    name that is not UTF-8, as Python decodes one), which only the \\u escapes of an all-ASCII dump can carry."""
    text = json.dumps(obj, ensure_ascii=False, **options)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj, **options)
    return text


def read_json(path: Path, *, required: bool = True, max_bytes: int = MAX_BYTES) -> dict[str, Any]:
    """A JSON object from `path`; {} when an optional file is absent. A file over `max_bytes` is refused unread."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            raw = f.read(max_bytes + 1) if size <= max_bytes else b""  # devices and pipes report 0: read at most this
        if size > max_bytes or len(raw) > max_bytes:
            raise LlavaError(f"cannot read '{path}': larger than {max_bytes:,} bytes, the most this file may hold")
        data = json.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        if not required:
            return {}
        raise LlavaError(f"cannot read '{path}': file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LlavaError(f"cannot read '{path}': invalid JSON ({e})") from None
    except RecursionError:
        raise LlavaError(f"cannot read '{path}': invalid JSON (nested too deeply)") from None
    except OSError as e:
        raise LlavaError(f"cannot read '{path}': {e.strerror or e}") from None
    if not isinstance(data, dict):
        raise LlavaError(f"cannot read '{path}': expected a JSON object")
    return data


T = TypeVar("T")


def read_config(path: Path, build: Callable[[dict[str, Any]], T]) -> T:
    """build(the JSON object in `path`), every error it raises told as one line that names the file."""
    data = read_json(path)
    try:
        return build(data)
    except LlavaError as e:  # the message names the key; this names the file
        raise LlavaError(f"{path}: {e}") from None
    except (TypeError, ValueError, AttributeError, KeyError, IndexError) as e:  # a type no check foresaw
        raise LlavaError(f"{path}: malformed ({type(e).__name__}: {e})") from None


def is_int(v: Any) -> bool:
    """An integer that is not a bool (JSON's true is not a count)."""
    return isinstance(v, int) and not isinstance(v, bool)


# What a field of each kind accepts (kinds are the config dataclasses' annotations): a hand-edited file's
# wrong type must be told as such, not reach torch.
_VALID: dict[str, tuple[Any, str]] = {
    "int": (lambda v: is_int(v) and v > 0, "a positive integer"),
    "int | None": (lambda v: is_int(v) and v >= 0, "a token id (an integer from 0)"),
    "int | list[int] | None": (lambda v: is_int(v) and v >= 0 or isinstance(v, list) and all(
        is_int(x) and x >= 0 for x in v), "a token id or a list of token ids"),
    "float": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf,
              "a positive number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "layers": (lambda v: is_int(v) or isinstance(v, list) and v and all(is_int(x) for x in v),
               "a layer index or a list of them"),
}


def _bad(key: str, value: Any, expected: str) -> LlavaError:
    shown = json.dumps(value)
    shown = shown if len(shown) <= 40 else shown[:40] + "..."
    return LlavaError(f"{key} must be {expected}, not {shown} (correct it, or get the checkpoint's original file)")


def section(d: dict[str, Any], key: str) -> dict[str, Any]:
    """A nested config object (text_config, vision_config); absent or null means all defaults."""
    value = d.get(key)
    if value is not None and not isinstance(value, dict):
        raise _bad(key, value, "an object")
    return value or {}


def field(d: dict[str, Any], key: str, kind: str, default: Any = None, within: str = "") -> Any:
    """d[key] when it is of `kind` (see _VALID), `default` when absent or null; else an error naming the key."""
    value = d.get(key)
    if value is None:
        return default
    valid, expected = _VALID[kind]
    if not valid(value):
        raise _bad(f"{within}.{key}" if within else key, value, expected)
    return value
