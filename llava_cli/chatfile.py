"""Saving and loading a chat: the conversation as JSON, images as references (path or URL) with their sha256.

A loaded file is checked field by field before anything changes, and every image is read again and must still have
the pixels it had; a file written by hand or by someone else gets a one-line error naming the field.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path

from PIL.Image import Image

from .chat import ChatImage, ChatSession, Settings, Turn, image_sha256
from .errors import LlavaError
from .files import is_int, json_text, read_json

FORMAT, VERSION = "llava-cli chat", 1
MAX_FILE_BYTES = 16 * 2**20  # far above any conversation that fits a context window
MAX_IMAGES = 256
MAX_TEXT_CHARS = 2**20  # 32 characters a token over the longest context (32768 tokens): a longer turn never fits
TOP_KEYS = {"format", "version", "model", "template", "system", "settings", "turns", "pending_images"}
TURN_KEYS = {"user", "images", "assistant"}


def to_dict(session: ChatSession) -> dict:
    """The conversation as JSON-ready data: turns, image references with sha256, settings, model, template."""
    ref = lambda im: {"source": im.source, "sha256": im.sha256}  # noqa: E731
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": session.llava.name,
        "template": session.llava.template.name,
        "system": session.system,
        "settings": asdict(session.settings),
        "turns": [{"user": t.text, "images": [ref(im) for im in t.images], "assistant": t.answer}
                  for t in session.turns],
        "pending_images": [ref(im) for im in session.pending],
    }


def save(session: ChatSession, path: Path) -> None:
    """Write the conversation to `path` atomically: a crash mid-write leaves the old file, not half of a new one."""
    raw = (json_text(to_dict(session), indent=2) + "\n").encode("utf-8")  # an image name not UTF-8: escaped
    if "\0" in str(path):
        raise LlavaError(f"cannot save the chat to {str(path)!r}: a file name cannot hold a NUL character")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(raw)
        os.replace(tmp, path)
    except BaseException as e:  # a full disk, or Ctrl-C: the old file stays, and no temporary file is left
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise LlavaError(f"cannot save the chat to {path}: {e.strerror or e}") from None
        raise


def load(session: ChatSession, path: Path, read_image: Callable[[str], Image]) -> list[str]:
    """Replace the session's conversation with the one in `path`; returns warnings (another model or template,
    keys this version does not know). Nothing changes unless the whole file is good."""
    data = read_json(path, max_bytes=MAX_FILE_BYTES)
    where = lambda field: f"{path}: {field}"  # noqa: E731
    if data.get("format") != FORMAT:
        raise LlavaError(f"{path}: not a llava-cli chat file (no \"format\": \"{FORMAT}\")")
    version = data.get("version")
    if is_int(version) and version > VERSION:
        raise LlavaError(where(f"saved by a newer llava-cli (file version {version}; this one reads {VERSION}): "
                               "upgrade llava-cli to load it"))
    if not is_int(version) or version != VERSION:
        raise LlavaError(where(f"version {version!r} is not supported; this llava-cli reads {VERSION}"))
    system = _text(data.get("system"), where("\"system\""), optional=True)
    settings = _settings(data.get("settings", {}), where)
    turns_data = _typed(data.get("turns", []), list, where("\"turns\" must be a list"))
    pending_data = _list(data.get("pending_images"), where("\"pending_images\""))
    counted = [t.get("images") for t in turns_data if isinstance(t, dict)] + [pending_data]
    if sum(len(refs) for refs in counted if isinstance(refs, list)) > MAX_IMAGES:
        raise LlavaError(where(f"more than {MAX_IMAGES} images"))  # before reading any of them
    cache: dict[str, ChatImage] = {}
    turns = []
    unknown = set(data) - TOP_KEYS
    for n, t in enumerate(turns_data, 1):
        t = _typed(t, dict, where(f"turn {n} must be an object"))
        unknown |= {f"turns[].{key}" for key in set(t) - TURN_KEYS}
        user = _text(t.get("user"), where(f"turn {n}: \"user\""))
        answer = _text(t.get("assistant"), where(f"turn {n}: \"assistant\""), optional=True)
        if answer is None and n != len(turns_data):
            raise LlavaError(where(f"turn {n} has no answer but is not the last turn"))
        images = [_image(ref, read_image, cache, where(f"turn {n}")) for ref in _list(t.get("images"), where(f"turn {n}"))]
        turns.append(Turn(user, images, answer))
    pending = [_image(ref, read_image, cache, where("pending image")) for ref in pending_data]
    if turns and turns[-1].answer is None:  # saved mid-question: ask it again from the prompt
        pending = turns.pop().images + pending
    session.turns, session.pending, session.system, session.settings = turns, pending, system, settings
    warnings = []
    if unknown:  # from a newer version or a hand edit: what this version does not read is said, not silently lost
        warnings.append(f"{path}: ignored unknown key(s) {', '.join(sorted(unknown))}")
    for key, ours in (("model", session.llava.name), ("template", session.llava.template.name)):
        if isinstance(data.get(key), str) and data[key] != ours:
            warnings.append(f"the chat was saved with {key} {data[key]!r}; it goes on with {ours!r}")
    return warnings


def _text(value, what: str, optional: bool = False) -> str | None:
    """A string field of the file (null allowed when `optional`), refused when longer than any context holds."""
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise LlavaError(f"{what} must be a string{' or null' if optional else ''}")
    if len(value) > MAX_TEXT_CHARS:
        raise LlavaError(f"{what} is {len(value):,} characters, more than a chat can hold ({MAX_TEXT_CHARS:,})")
    return value


def _typed(value, kind: type, message: str):
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise LlavaError(message)
    return value


def _list(value, where: str) -> list:
    return [] if value is None else _typed(value, list, f"{where}: images must be a list")


def _settings(raw, where) -> Settings:
    raw = _typed(raw, dict, where("\"settings\" must be an object"))
    settings = Settings()
    known = {f.name for f in fields(Settings)}
    for key, value in raw.items():
        if key not in known:
            raise LlavaError(where(f"settings: unknown key {key!r}; known: {', '.join(sorted(known))}"))
        if isinstance(value, bool) or not isinstance(value, (int, float, type(None))):
            raise LlavaError(where(f"settings: {key} must be a number"))
        try:
            settings = settings.changed(key, "none" if value is None else str(value))
        except LlavaError as e:
            raise LlavaError(where(f"settings: {e}")) from None
    return settings


def _image(ref, read_image: Callable[[str], Image], cache: dict[str, ChatImage], where: str) -> ChatImage:
    ref = _typed(ref, dict, f"{where}: an image must be an object with \"source\" and \"sha256\"")
    source = _typed(ref.get("source"), str, f"{where}: an image's \"source\" must be a path or URL")
    sha = _typed(ref.get("sha256"), str, f"{where}: an image's \"sha256\" must be a string")
    if source == "-":
        raise LlavaError(f"{where}: an image read from standard input cannot be loaded again")
    if sha not in cache:
        try:
            image = read_image(source)
        except LlavaError as e:  # a missing file, a directory, a bad URL: said for the turn it belongs to
            raise LlavaError(f"{where}: {e}") from None
        if image_sha256(image) != sha:
            raise LlavaError(f"{where}: {source} is not the image the chat was saved with (its pixels changed)")
        cache[sha] = ChatImage(source, sha, image)
    return cache[sha]
