"""A model id or a folder -> a local checkpoint folder, through huggingface_hub's cache.

HF_HOME, HF_HUB_CACHE, HF_TOKEN and HF_HUB_OFFLINE are huggingface_hub's own settings and apply unchanged.
A complete cached snapshot is used without asking the network; an incomplete one is completed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from .errors import LlavaError

# What a checkpoint folder needs; chat_template.json is optional (the template registry has every family).
REQUIRED = ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json")
PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]
PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # torch.load would run code from these


def missing_files(folder: Path) -> list[str]:
    """Required files absent from a checkpoint folder (weights are checked when they are read)."""
    return [name for name in REQUIRED if not (folder / name).is_file()]


def looks_like_path(model: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else the user typed is meant as a path."""
    return model.startswith((".", "/", "~")) or model.count("/") > 1 or (os.sep != "/" and os.sep in model)


def resolve(model: str, *, what: str = "model", patterns: list[str] | None = None,
            complete: Callable[[Path], bool] | None = None, hint: str = "pass a local checkpoint folder with --model PATH",
            ) -> Path:
    """A local folder as is, else a hub repo id downloaded (or found) in the huggingface_hub cache.

    `patterns` are the files to fetch (a checkpoint's by default); a cached snapshot is used without asking the
    network when `complete` says it holds what is needed.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists() and path.suffix in PICKLES:
        raise LlavaError(f"{what} {model!r} is a file of pickled PyTorch weights, which are not loaded for safety; "
                         "give its checkpoint folder to `llava convert` to make safetensors")
    if path.exists():
        raise LlavaError(f"{what} {model!r} is a file; give the checkpoint folder that holds config.json")
    if looks_like_path(model):
        raise LlavaError(f"{what} folder {model!r} not found")
    return _snapshot(model, what, patterns or PATTERNS, complete or (lambda f: not missing_files(f)), hint)


def _snapshot(repo_id: str, what: str, patterns: list[str], complete: Callable[[Path], bool], hint: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        cached = Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
        if complete(cached):
            return cached
    except HFValidationError:
        raise LlavaError(f"{what} {repo_id!r} is neither a folder nor a valid hub model id ({hint})") from None
    except (LocalEntryNotFoundError, FileNotFoundError):
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except GatedRepoError:
        raise LlavaError(f"{repo_id}: gated model; accept its terms on the hub and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise LlavaError(f"{repo_id}: no such model on the hub (or it is private: set HF_TOKEN); {hint}") from None
    except LocalEntryNotFoundError:
        raise LlavaError(
            f"{repo_id}: not in the local cache and the hub cannot be reached (offline or HF_HUB_OFFLINE=1); {hint}"
        ) from None
    except OSError as e:
        raise LlavaError(f"{repo_id}: download failed ({e}); {hint}") from None
