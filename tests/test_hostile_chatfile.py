"""Hostile or hand-edited chat files given to `chat --load FILE` and `/load FILE`: one line naming the field, exit code
1 at start; in a running session the conversation already in memory is kept whole when /load fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from checkpoints import DATA
from llava_cli.cli import app

PHOTO = str(DATA / "chelsea.png")
PHOTO_SHA = "e9eb37b26336"  # the start of its pixels' sha256 (a prefix is enough to fail the comparison)


def doc(**fields) -> dict:
    """A valid chat file, with `fields` replaced."""
    return {"format": "llava-cli chat", "version": 1, "model": "m", "template": "interleave-qwen", "system": None,
            "settings": {}, "turns": [{"user": "Hi", "images": [], "assistant": "Hello"}], "pending_images": [],
            **fields}


def turn(**fields) -> dict:
    return doc(turns=[{"user": "Hi", "images": [], "assistant": "Hello", **fields}])


def image(source, sha=PHOTO_SHA) -> dict:
    return {"source": source, "sha256": sha}


def deep(n: int) -> str:
    return "[" * n + "]" * n


# (case id, file content: a dict as JSON, or str / bytes as they are, what the one line must say)
CASES = [
    ("not-json", "{turns: [", ["invalid JSON"]),
    ("not-utf8", b'{"format": "llava-cli chat", "system": "\xff\xfe"}', ["invalid JSON", "utf-8"]),
    ("not-object", "[1, 2]", ["JSON object"]),
    ("deeply-nested", '{"turns": ' + deep(100_000) + "}", ["nested too deeply"]),
    ("no-format", {"turns": []}, ["not a llava-cli chat file"]),
    ("future-version", doc(version=2), ["newer llava-cli", "version 2", "upgrade"]),
    ("version-string", doc(version="1"), ["version '1' is not supported"]),
    ("version-bool", doc(version=True), ["version True is not supported"]),
    ("turns-dict", doc(turns={"user": "Hi"}), ['"turns" must be a list']),
    ("turn-string", doc(turns=["Hi"]), ["turn 1 must be an object"]),
    ("user-number", turn(user=42), ['turn 1: "user" must be a string']),
    ("user-null", turn(user=None), ['turn 1: "user" must be a string']),
    ("assistant-list", turn(assistant=["x"]), ['turn 1: "assistant" must be a string or null']),
    ("images-dict", turn(images={"source": PHOTO}), ["turn 1: images must be a list"]),
    ("images-number", turn(images=7), ["turn 1: images must be a list"]),
    ("image-string", turn(images=[PHOTO]), ["turn 1: an image must be an object"]),
    ("source-number", turn(images=[image(3)]), ['turn 1: an image\'s "source" must be a path or URL']),
    ("sha-missing", turn(images=[{"source": PHOTO}]), ['turn 1: an image\'s "sha256" must be a string']),
    ("image-nowhere", turn(images=[image("/no/such/photo.png")]), ["turn 1:", "/no/such/photo.png", "not found"]),
    ("image-directory", turn(images=[image(str(DATA))]), ["turn 1:", "directory"]),
    ("image-dev-zero", turn(images=[image("/dev/zero")]), ["turn 1:", "/dev/zero"]),
    ("image-other-pixels", turn(images=[image(PHOTO, "0" * 64)]), ["turn 1:", "pixels changed"]),
    ("image-stdin", turn(images=[image("-")]), ["turn 1:", "standard input"]),
    ("too-many-images", turn(images=[image(PHOTO)] * 300), ["more than 256 images"]),
    ("pending-dict", doc(pending_images={"source": PHOTO}), ['"pending_images": images must be a list']),
    ("pending-number", doc(pending_images=5), ['"pending_images": images must be a list']),
    ("system-number", doc(system=5), ['"system" must be a string or null']),
    ("settings-list", doc(settings=[0.5]), ['"settings" must be an object']),
    ("settings-text", doc(settings={"temperature": "hot"}), ["settings: temperature must be a number"]),
    ("settings-negative", doc(settings={"max_tokens": -1}), ["settings:", "max_tokens"]),
    ("settings-unknown", doc(settings={"beam": 4}), ["settings: unknown key 'beam'"]),
    ("unanswered-middle", doc(turns=[{"user": "a"}, {"user": "b", "assistant": "c"}]), ["turn 1 has no answer"]),
    ("huge-text", turn(user="word " * 2_200_000), ['turn 1: "user" is 11,000,000 characters']),
]


def write(path: Path, content) -> Path:
    if isinstance(content, dict):
        content = json.dumps(content)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def chat(runner, qwen, *args, input=""):
    return runner.invoke(app, ["chat", *args, "-m", qwen, "--dtype", "float32", "-n", "3"], input=input)


def errors(result) -> list[str]:
    assert "Traceback" not in result.stderr + result.stdout
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def assert_one_error(result, says) -> None:
    lines = result.stderr.splitlines()
    assert result.exit_code == 1, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and errors(result) == lines, result.stderr
    assert "internal error" not in lines[0] and all(s in lines[0] for s in says), lines[0]


@pytest.mark.parametrize("case,content,says", CASES, ids=[c[0] for c in CASES])
def test_load_at_start_is_refused_in_one_line(runner, qwen, tmp_path, case, content, says):
    bad = write(tmp_path / "bad.json", content)
    r = chat(runner, qwen, "--load", str(bad), input="Hello?\n")
    assert_one_error(r, [str(bad)] + says)
    assert r.stdout == ""  # nothing was answered from a half-loaded session


@pytest.mark.parametrize("case,content,says", CASES, ids=[c[0] for c in CASES])
def test_a_failed_load_keeps_the_conversation_in_memory(runner, qwen, tmp_path, case, content, says):
    bad = write(tmp_path / "bad.json", content)
    before, after = tmp_path / "before.json", tmp_path / "after.json"
    r = chat(runner, qwen, PHOTO, "--system", "Be brief.", input=(
        f"What is it?\n/set temperature 0.5\n/image {PHOTO}\n/save {before}\n/load {bad}\n/save {after}\n"))
    assert r.exit_code == 1  # piped: a failed line makes the exit code 1 at the end
    lines = errors(r)
    assert len(lines) == 1 and all(s in lines[0] for s in says), r.stderr
    assert json.loads(after.read_text()) == json.loads(before.read_text())  # turns, images, settings, system


@pytest.mark.parametrize("special", ["/dev/zero", "fifo", "huge", "directory", "missing"])
def test_a_file_that_is_not_a_small_regular_file_is_refused_unread(runner, qwen, tmp_path, special):
    path = {"/dev/zero": Path("/dev/zero"), "fifo": tmp_path / "fifo", "huge": tmp_path / "huge.json",
            "directory": tmp_path, "missing": tmp_path / "missing.json"}[special]
    writer = None
    if special == "fifo":  # a writer that never ends: the reader must stop at the size limit, not wait for the end
        os.mkfifo(path)
        writer = subprocess.Popen(["sh", "-c", f"yes > '{path}'"], stderr=subprocess.DEVNULL)
    if special == "huge":
        with open(path, "wb") as f:
            f.truncate(200 * 2**20)  # sparse: 200 MB declared, none of it written
    try:
        r = chat(runner, qwen, "--load", str(path))
    finally:
        if writer:
            writer.kill()
            writer.wait()
    says = {"directory": ["directory"], "missing": ["not found"]}.get(special, ["larger than 16,777,216 bytes"])
    assert_one_error(r, says)


def test_unknown_keys_are_ignored_with_a_warning(runner, qwen, tmp_path):
    saved = write(tmp_path / "new.json", doc(colour="blue", turns=[{"user": "Hi", "assistant": "Hello", "rating": 5}]))
    r = chat(runner, qwen, "--load", str(saved), input=f"/save {tmp_path / 'out.json'}\n")
    assert r.exit_code == 0, r.stderr
    assert "warning:" in r.stderr and "ignored unknown key(s) colour, turns[].rating" in r.stderr
    assert json.loads((tmp_path / "out.json").read_text())["turns"] == [
        {"user": "Hi", "images": [], "assistant": "Hello"}]


def test_an_image_name_that_is_not_utf8_saves_and_loads_back(qwen, tmp_path):
    """Linux file names are bytes: one that is not UTF-8 is kept (as surrogates), saved escaped and found again."""
    folder = os.fsencode(tmp_path)
    photo = folder + b"/cat\xff.png"
    with open(photo, "wb") as f:
        f.write(Path(PHOTO).read_bytes())
    saved, again = tmp_path / "chat.json", tmp_path / "again.json"
    cmd = [sys.executable, "-m", "llava_cli", "chat", "-m", qwen, "--dtype", "float32", "-n", "2"]
    lines = [b"/image " + photo, b"What is it?", b"/save " + os.fsencode(saved)]
    p = subprocess.run(cmd, input=b"\n".join(lines) + b"\n", capture_output=True, timeout=120)
    assert p.returncode == 0 and b"error" not in p.stderr, p.stderr.decode(errors="replace")
    assert json.loads(saved.read_text())["turns"][0]["images"][0]["source"] == os.fsdecode(photo)
    p = subprocess.run(cmd + ["--load", str(saved)], input=f"/save {again}\n".encode(), capture_output=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr.decode(errors="replace")
    assert json.loads(again.read_text()) == json.loads(saved.read_text())


def test_a_nul_in_the_save_path_is_one_error_and_the_chat_goes_on(runner, qwen, tmp_path):
    r = chat(runner, qwen, input=f"What is it?\n/save {tmp_path}/a\0b.json\nAnd now?\n")
    assert errors(r) == [f"error: cannot save the chat to '{tmp_path}/a\\x00b.json': a file name cannot hold a "
                         "NUL character"]
    assert r.stdout.count("\n") == 2 and list(tmp_path.iterdir()) == []  # both questions answered, nothing written


def test_an_internal_error_in_one_command_keeps_the_session(runner, qwen, tmp_path, monkeypatch):
    """A bug in one command is one line; the conversation goes on and can still be saved."""
    import llava_cli.repl as repl

    monkeypatch.setattr(repl.ChatSession, "undo", lambda self: 1 / 0)
    saved = tmp_path / "kept.json"
    r = chat(runner, qwen, input=f"What is it?\n/undo\n/save {saved}\n")
    assert errors(r) == ["error: internal error: ZeroDivisionError: division by zero (set LLAVA_DEBUG=1 to see the "
                         "traceback)"]
    assert r.exit_code == 1 and len(json.loads(saved.read_text())["turns"]) == 1
