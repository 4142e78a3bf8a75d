"""Saving and loading a chat: the conversation as JSON, images as references (path or URL) with their sha256.

A loaded file is checked field by field before anything changes, and every image is read again and must still have
the pixels it had; a file written by hand or by someone else gets a one-line error naming the field.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path

from PIL.Image import Image

from .chat import ChatImage, ChatSession, Settings, Turn, image_sha256
from .errors import LlavaError
from .files import read_json

FORMAT, VERSION = "llava-cli chat", 1
MAX_FILE_BYTES = 16 * 2**20  # far above any conversation that fits a context window
MAX_IMAGES = 256


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
    data = json.dumps(to_dict(session), ensure_ascii=False, indent=2) + "\n"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(data, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise LlavaError(f"cannot save the chat to {path}: {e.strerror or e}") from None


def load(session: ChatSession, path: Path, read_image: Callable[[str], Image]) -> list[str]:
    """Replace the session's conversation with the one in `path`; returns warnings (another model or template)."""
    data = _read(path)
    where = lambda field: f"{path}: {field}"  # noqa: E731
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise LlavaError(f"{path}: not a llava-cli chat file (no \"format\": \"{FORMAT}\")")
    if data.get("version") != VERSION:
        raise LlavaError(where(f"version {data.get('version')!r} is not supported; this llava-cli reads {VERSION}"))
    system = data.get("system")
    if system is not None and not isinstance(system, str):
        raise LlavaError(where("\"system\" must be a string or null"))
    settings = _settings(data.get("settings", {}), where)
    turns_data = _typed(data.get("turns", []), list, where("\"turns\" must be a list"))
    refs = [im for t in turns_data if isinstance(t, dict) for im in t.get("images") or []]
    if len(refs) + len(data.get("pending_images") or []) > MAX_IMAGES:
        raise LlavaError(where(f"more than {MAX_IMAGES} images"))
    cache: dict[str, ChatImage] = {}
    turns = []
    for n, t in enumerate(turns_data, 1):
        t = _typed(t, dict, where(f"turn {n} must be an object"))
        user = _typed(t.get("user"), str, where(f"turn {n}: \"user\" must be a string"))
        answer = t.get("assistant")
        if answer is not None and not isinstance(answer, str):
            raise LlavaError(where(f"turn {n}: \"assistant\" must be a string or null"))
        if answer is None and n != len(turns_data):
            raise LlavaError(where(f"turn {n} has no answer but is not the last turn"))
        images = [_image(ref, read_image, cache, where(f"turn {n}")) for ref in _list(t.get("images"), where(f"turn {n}"))]
        turns.append(Turn(user, images, answer))
    pending = [_image(ref, read_image, cache, where("pending image"))
               for ref in _list(data.get("pending_images"), where("\"pending_images\""))]
    if turns and turns[-1].answer is None:  # saved mid-question: ask it again from the prompt
        pending = turns.pop().images + pending
    session.turns, session.pending, session.system, session.settings = turns, pending, system, settings
    warnings = []
    for key, ours in (("model", session.llava.name), ("template", session.llava.template.name)):
        if isinstance(data.get(key), str) and data[key] != ours:
            warnings.append(f"the chat was saved with {key} {data[key]!r}; it goes on with {ours!r}")
    return warnings


def _read(path: Path) -> dict:
    """The file's JSON object, refused unread when it is larger than any chat could be."""
    try:
        size = path.stat().st_size
    except OSError:
        size = 0  # read_json names what is wrong (not found, a directory, no permission)
    if size > MAX_FILE_BYTES:
        raise LlavaError(f"{path}: {size} bytes is too large for a chat file (the limit is {MAX_FILE_BYTES})")
    return read_json(path)


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
        image = read_image(source)  # raises a one-line error for a missing file or a bad URL
        if image_sha256(image) != sha:
            raise LlavaError(f"{where}: {source} is not the image the chat was saved with (its pixels changed)")
        cache[sha] = ChatImage(source, sha, image)
    return cache[sha]
