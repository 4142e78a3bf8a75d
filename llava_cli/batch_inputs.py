"""What `llava batch` works through: inputs (folders, globs, files, stdin lists, JSONL/CSV item files) -> items."""

from __future__ import annotations

import csv
import glob
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from .errors import LlavaError, UsageError
from .sources import IMAGE_EXTENSIONS, is_image_name, is_url

ITEM_FILES = (".jsonl", ".csv")  # an input with one of these suffixes lists {image, prompt} items
_GLOB_RE = re.compile(r"[*?[]")


@dataclass(frozen=True)
class Item:
    """One question about one image; `image` is a path or URL exactly as given."""

    image: str
    prompt: str


def expand_inputs(inputs: Sequence[str], prompts: Sequence[str], stdin: TextIO | None = None) -> list[Item]:
    """Every input -> items in a stable order; each image is asked every prompt unless its item file gives one.

    A folder is searched recursively for image extensions, a glob is expanded (and filtered the same way), `-`
    reads paths or URLs from stdin one per line, a .jsonl/.csv file lists items; anything else is an image, and
    one that cannot be read becomes an error record later rather than stopping the run.
    """
    if list(inputs).count("-") > 1:
        raise UsageError("standard input holds one list of images; give '-' once")
    items: list[Item] = []
    for arg in inputs:
        if arg == "-":
            items += _ask_all(_stdin_lines(stdin), prompts)
        elif is_url(arg):
            items += _ask_all([arg], prompts)
        elif os.path.isdir(arg):
            found = _walk(arg)
            if not found:
                raise LlavaError(f"no images in folder '{arg}' (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
            items += _ask_all(found, prompts)
        elif os.path.isfile(arg) and arg.lower().endswith(ITEM_FILES):
            items += _item_file(arg, prompts)
        elif _GLOB_RE.search(arg) and not os.path.exists(arg):
            items += _ask_all(_glob(arg), prompts)
        else:
            items += _ask_all([arg], prompts)
    if not items:
        raise LlavaError("no images to work on")
    return items


def _ask_all(images: Iterable[str], prompts: Sequence[str]) -> list[Item]:
    images = list(images)
    if images and not prompts:
        raise UsageError(f"no prompt for '{images[0]}': give --prompt or --prompts-file")
    return [Item(image, p) for image in images for p in prompts]


def _walk(folder: str) -> list[str]:
    """Image files under `folder`, sorted, hidden files and folders skipped."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(root, f) for f in sorted(files) if is_image_name(f) and not f.startswith(".")]
    return found


def _glob(pattern: str) -> list[str]:
    paths = []
    for match in sorted(glob.glob(os.path.expanduser(pattern), recursive=True)):
        paths += _walk(match) if os.path.isdir(match) else [match] if is_image_name(match) else []
    if not paths:
        raise LlavaError(f"no images match '{pattern}'")
    return paths


def _stdin_lines(stdin: TextIO | None) -> list[str]:
    import sys

    stream = stdin if stdin is not None else sys.stdin
    if stream is None or stream.isatty():
        raise LlavaError("'-' reads a list of image paths or URLs from stdin, but stdin is a terminal; pipe it in")
    lines = [line.strip() for line in stream.read().splitlines()]
    return [line for line in lines if line]


def _item_file(path: str, prompts: Sequence[str]) -> list[Item]:
    """A JSONL or CSV file of items with `image` and optionally `prompt`; without one, every prompt is asked."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise LlavaError(f"cannot read '{path}': {getattr(e, 'strerror', None) or e}") from None
    if path.lower().endswith(".csv"):
        rows = list(csv.DictReader(text.splitlines()))
        numbered = [(n, row) for n, row in enumerate(rows, start=2)]  # line 1 is the header
    else:
        numbered = []
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    numbered.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise LlavaError(f"{path}:{n}: not a JSON line ({e.msg})") from None
    items = []
    for n, row in numbered:
        image = row.get("image") if isinstance(row, dict) else None
        if not isinstance(image, str) or not image.strip():
            raise LlavaError(f"{path}:{n}: an item needs an \"image\" (a path or URL)")
        prompt = row.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise LlavaError(f"{path}:{n}: \"prompt\" must be a string")
        if prompt and prompt.strip():
            items.append(Item(_relative_to(path, image.strip()), prompt))
        else:
            items += _ask_all([_relative_to(path, image.strip())], prompts)
    return items


def _relative_to(item_file: str, image: str) -> str:
    """Relative image paths in an item file are relative to the file, as in a playlist."""
    if is_url(image) or os.path.isabs(image):
        return image
    return os.path.normpath(os.path.join(os.path.dirname(item_file), image))


def read_prompts_file(path: str) -> list[str]:
    """One prompt per line; blank lines are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise LlavaError(f"cannot read prompts file '{path}': {getattr(e, 'strerror', None) or e}") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise LlavaError(f"prompts file '{path}' holds no prompt")
    return prompts


def parse_shard(text: str) -> tuple[int, int]:
    """'K/N' -> (K, N), 1 <= K <= N."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or not 1 <= int(m[1]) <= int(m[2]):
        raise UsageError(f"--shard takes K/N with 1 <= K <= N, e.g. 1/4; got '{text}'")
    return int(m[1]), int(m[2])


def by_image(items: Sequence[Item]) -> list[tuple[str, list[str]]]:
    """Items grouped per image in order of first appearance: [(image, [prompts])]; duplicates dropped."""
    groups: dict[str, list[str]] = {}
    for item in items:
        prompts = groups.setdefault(item.image, [])
        if item.prompt not in prompts:
            prompts.append(item.prompt)
    return list(groups.items())


def shard(groups: Sequence[tuple[str, list[str]]], k: int, n: int) -> list[tuple[str, list[str]]]:
    """Shard k of n (1-based): every n-th image from the k-th, with all its prompts, so an image is read once."""
    return [g for i, g in enumerate(groups) if i % n == k - 1]
