"""Reading a checkpoint's JSON files, with one-line errors that name the file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import LlavaError


MAX_BYTES = 256 * 2**20  # far above any config, index or chat file; /dev/zero or a FIFO stops here, not in swap


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
