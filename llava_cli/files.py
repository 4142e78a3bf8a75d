"""Reading a checkpoint's JSON files, with one-line errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import LlavaError


def read_json(path: Path, *, required: bool = True) -> dict[str, Any]:
    """A JSON object from `path`; {} when an optional file is absent."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if not required:
            return {}
        raise LlavaError(f"cannot read '{path}': file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LlavaError(f"cannot read '{path}': invalid JSON ({e})") from None
    except OSError as e:
        raise LlavaError(f"cannot read '{path}': {e.strerror or e}") from None
    if not isinstance(data, dict):
        raise LlavaError(f"cannot read '{path}': expected a JSON object")
    return data
