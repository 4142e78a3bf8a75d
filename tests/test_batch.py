"""`llava batch`: inputs, batched answers equal to single ones, records, resume (also after SIGKILL), errors."""

import csv
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from PIL import Image
from typer.testing import CliRunner

from checkpoints import DATA
from llava_cli.batch_inputs import Item, by_image, expand_inputs, parse_shard, read_prompts_file, shard
from llava_cli.batch_output import RecordWriter
from llava_cli.cli import app
from llava_cli.errors import LlavaError
from llava_cli.pipeline import Llava
from llava_cli.templates import Message

PROMPTS = ["What is this?", "Describe the colours of everything in this picture in detail.", "Why?"]


@pytest.fixture
def photos(tmp_path):
    """A folder of distinct images: the three test photos and small generated ones, one in a subfolder."""
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for name in ("chelsea.png", "coffee.png"):
        (folder / name).write_bytes((DATA / name).read_bytes())
    (folder / "sub" / "astronaut.png").write_bytes((DATA / "astronaut.png").read_bytes())
    return folder


def make_images(folder, n):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = Image.new("RGB", (40 + 7 * i, 30 + 5 * i), (37 * i % 256, 91 * i % 256, 53 * i % 256))
        img.putpixel((i, i), (255, 255, 255))
        img.save(folder / f"img{i:02d}.png")
    return folder


def batch(runner, *args, input=None):
    return runner.invoke(app, ["batch", *args], input=input)


def records(text):
    return [json.loads(line) for line in text.splitlines()]


# ------------------------------------------------------------------------------------------- batched == single

@pytest.mark.parametrize("family", ["llava", "vipllava", "qwen"])
def test_batched_greedy_answers_equal_one_at_a_time(runner, tiny, photos, tmp_path, family):
    """Items of different prompt lengths decoded in left-padded batches answer exactly as `ask` would, alone."""
    folder = tiny(family).folder
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    r = batch(runner, str(photos), "--prompts-file", str(tmp_path / "prompts.txt"), "-m", str(folder), "-n", "10",
              "-b", "4", "--dtype", "float32")
    assert r.exit_code == 0, r.output
    got = records(r.stdout)
    assert sorted((g["image"], g["prompt"]) for g in got) == sorted(
        (str(p), q) for p in [photos / "chelsea.png", photos / "coffee.png", photos / "sub" / "astronaut.png"]
        for q in PROMPTS)
    assert max(g["timings"]["batch_size"] for g in got) == 4  # really batched
    llava = Llava.load(folder, dtype="float32", device="cpu")
    for g in got:
        prompt = llava.prompt([Message("user", g["prompt"], images=1)])
        alone = "".join(llava.stream(prompt, [Image.open(g["image"])], max_tokens=10))
        assert g["answer"] == alone, g
        assert g["tokens"]["prompt"] == prompt.tokens
    assert len({g["answer"] for g in got}) > 1 and all(g["tokens"]["generated"] > 0 for g in got)


def test_each_image_is_encoded_once_for_all_its_questions(runner, qwen, photos, tmp_path, monkeypatch):
    encoded = []
    original = Llava.encode_images
    monkeypatch.setattr(Llava, "encode_images", lambda self, images, pad_square=False: (
        encoded.extend(images), original(self, images, pad_square))[1])
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS))
    r = batch(runner, str(photos), "--prompts-file", str(tmp_path / "prompts.txt"), "-m", qwen, "-n", "3", "-b", "2")
    assert r.exit_code == 0, r.output
    assert len(records(r.stdout)) == 9 and len(encoded) == 3


# ------------------------------------------------------------------------------------------------ records, formats

def test_records_carry_answer_settings_counts_timings_and_a_content_key(runner, qwen, photos):
    r = batch(runner, str(photos / "chelsea.png"), "-p", "What?", "-m", qwen, "-n", "4", "--seed", "7",
              "--dtype", "float32")
    assert r.exit_code == 0, r.output
    (rec,) = records(r.stdout)
    assert rec["image"] == str(photos / "chelsea.png") and rec["prompt"] == "What?" and isinstance(rec["answer"], str)
    assert rec["model"] == qwen and rec["template"] == "interleave-qwen" and rec["seed"] == 7
    assert rec["settings"] == {"max_tokens": 4, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "system": None,
                               "pad_square": False, "dtype": "float32", "quantize": None}
    assert rec["tokens"]["image"] == 16 and 0 < rec["tokens"]["generated"] <= 4
    assert set(rec["timings"]) == {"load_image_s", "vision_s", "first_token_s", "decode_s", "batch_size"}
    assert rec["image_sha256"] == hashlib.sha256((photos / "chelsea.png").read_bytes()).hexdigest()
    assert rec["stop_reason"] in ("stop", "max_tokens") and len(rec["key"]) == 64
    assert "answered" in r.stderr and "{" not in r.stderr  # the summary, on stderr only


def test_csv_and_txt_formats(runner, qwen, photos, tmp_path):
    r = batch(runner, str(photos), "-p", "What?", "-m", qwen, "-n", "3", "--format", "csv")
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert len(rows) == 3 and {row["prompt"] for row in rows} == {"What?"} and all(len(row["key"]) == 64 for row in rows)
    j = records(batch(runner, str(photos), "-p", "What?", "-m", qwen, "-n", "3").stdout)
    assert {row["image"]: row["answer"] for row in rows} == {x["image"]: x["answer"] for x in j}
    r = batch(runner, str(photos), "-p", "What?", "-p", "Why?", "-m", qwen, "-n", "3", "-f", "txt")
    lines = r.stdout.splitlines()
    assert len(lines) == 6 and all(len(line.split("\t")) == 3 for line in lines)  # image, prompt, answer
    (tmp_path / "old.csv").write_text("image,answer\nx,y\n")
    r = batch(runner, str(photos), "-p", "What?", "-m", qwen, "-f", "csv", "-o", str(tmp_path / "old.csv"))
    assert r.exit_code == 1 and "only JSONL output can be resumed" in r.stderr
    assert (tmp_path / "old.csv").read_text() == "image,answer\nx,y\n"


def test_each_record_is_one_write_of_one_complete_line(qwen, photos, tmp_path, monkeypatch):
    import llava_cli.batch_output as bo

    writes = []
    real = os.write
    monkeypatch.setattr(bo.os, "write", lambda fd, data: (writes.append(bytes(data)), real(fd, data))[1])
    r = batch(CliRunner(), str(photos), "-p", "What?", "-p", "Why?", "-m", qwen, "-n", "3", "-o", str(tmp_path / "o.jsonl"))
    assert r.exit_code == 0, r.output
    assert len(writes) == 6 and all(w.endswith(b"\n") and w.count(b"\n") == 1 for w in writes)
    assert b"".join(writes) == (tmp_path / "o.jsonl").read_bytes()


# --------------------------------------------------------------------------------------------------------- resume

def test_rerun_skips_done_items_and_appends_the_rest(runner, qwen, photos, tmp_path):
    out = tmp_path / "out.jsonl"
    args = ["-p", "What?", "-m", qwen, "-n", "3", "-o", str(out)]
    assert batch(runner, str(photos / "chelsea.png"), *args).exit_code == 0
    first = out.read_text()
    r = batch(runner, str(photos), *args)
    assert r.exit_code == 0 and r.stdout == ""
    assert out.read_text().startswith(first) and len(records(out.read_text())) == 3
    assert "2 answered, 1 already done" in r.stderr
    r = batch(runner, str(photos), "-p", "What?", "-m", qwen, "-n", "4", "-o", str(out))  # other settings: new keys
    assert "3 answered" in r.stderr and len(records(out.read_text())) == 6


def test_a_torn_last_line_is_cut_and_its_item_redone(runner, qwen, photos, tmp_path):
    out = tmp_path / "out.jsonl"
    args = [str(photos), "-p", "What?", "-m", qwen, "-n", "3", "-o", str(out)]
    assert batch(runner, *args).exit_code == 0
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:2]) + lines[2][:40])  # as if the machine died mid-write
    r = batch(runner, *args)
    assert r.exit_code == 0 and "removed an incomplete last line" in r.stderr
    essentials = lambda recs: sorted((x["image"], x["prompt"], x["answer"], x["key"]) for x in recs)  # noqa: E731
    assert essentials(records(out.read_text())) == essentials(records("".join(lines)))


def test_sigkill_part_way_then_resume_gives_every_item_exactly_once(tiny, tmp_path):
    """A real process killed with SIGKILL mid-run, then the same command again: no torn line, nothing twice."""
    images = make_images(tmp_path / "imgs", 10)
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS + ["Is it day or night?"]))
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "llava_cli", "batch", str(images), "--prompts-file", str(tmp_path / "prompts.txt"),
           "-m", str(tiny("qwen").folder), "-n", "16", "-b", "2", "-o", str(out), "--dtype", "float32"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (out.exists() and out.read_bytes().count(b"\n") >= 3) and proc.poll() is None:
        assert time.monotonic() < deadline, "no record within 120 s"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    part = out.read_bytes()
    assert part.endswith(b"\n") and 3 <= part.count(b"\n") < 40
    assert all(json.loads(line)["answer"] is not None for line in part.splitlines())
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    final = records(out.read_text())
    assert out.read_bytes().startswith(part)
    assert sorted((r["image"], r["prompt"]) for r in final) == sorted(
        (str(images / f"img{i:02d}.png"), p) for i in range(10) for p in PROMPTS + ["Is it day or night?"])
    assert len({r["key"] for r in final}) == 40 and not any("error" in r for r in final)


# --------------------------------------------------------------------------------------------------------- errors

def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bad_items_become_error_records_and_the_run_goes_on(runner, qwen, photos, tmp_path):
    (photos / "notes.jpg").write_text("not an image")
    items = tmp_path / "items.jsonl"
    items.write_text("\n".join(json.dumps(x) for x in [
        {"image": str(photos / "chelsea.png"), "prompt": "cat " * 600},  # beyond the 512-token context
        {"image": str(photos / "coffee.png"), "prompt": "What?"},
        {"image": str(photos / "missing.png")},
        {"image": f"http://127.0.0.1:{_closed_port()}/cat.png"},
        {"image": str(photos / "notes.jpg")},
    ]))
    r = batch(runner, str(items), "-p", "Why?", "-m", qwen, "-n", "3")
    assert r.exit_code == 3, r.output
    got = {rec["image"].rsplit("/", 1)[-1]: rec for rec in records(r.stdout)}
    assert "answer" in got["coffee.png"] and "error" not in got["coffee.png"]
    assert "context is 512" in got["chelsea.png"]["error"]
    assert "file not found" in got["missing.png"]["error"] and got["missing.png"]["prompt"] == "Why?"
    assert "127.0.0.1" in got["cat.png"]["error"] and "not an image" in got["notes.jpg"]["error"]
    assert "1 answered, 4 failed of 5 items" in r.stderr and "Traceback" not in r.output


def test_retry_errors_drops_the_error_records_and_tries_again(runner, qwen, photos, tmp_path):
    out = tmp_path / "out.jsonl"
    (photos / "late.png").write_text("not yet")
    args = [str(photos), "-p", "What?", "-m", qwen, "-n", "3", "-o", str(out)]
    assert batch(runner, *args).exit_code == 3
    r = batch(runner, *args)
    assert r.exit_code == 0 and "1 error record(s) from an earlier run" in r.stderr
    (photos / "late.png").write_bytes((DATA / "chelsea.png").read_bytes()[:-1] + b"\x00")  # now readable
    Image.open(photos / "late.png").load()
    r = batch(runner, *args, "--retry-errors")
    assert r.exit_code == 0, r.output
    final = records(out.read_text())
    assert len(final) == 4 and not any("error" in rec for rec in final)


def test_usage_errors(runner, qwen, photos, tmp_path):
    assert batch(runner, str(photos), "-m", qwen).exit_code == 2  # no prompt
    assert batch(runner, str(photos), "-p", "Q", "--shard", "3/2", "-m", qwen).exit_code == 2
    assert batch(runner, str(photos), "-p", "Q", "-p", "R", "--sidecar", "-m", qwen).exit_code == 2
    r = batch(runner, str(tmp_path / "nothing*.png"), "-p", "Q", "-m", qwen)
    assert r.exit_code == 1 and "no images match" in r.stderr and r.stderr.count("\n") == 1


# ------------------------------------------------------------------------------------ stdin, sidecars, shards, quiet

def test_paths_on_stdin(runner, qwen, photos):
    listing = f"{photos / 'chelsea.png'}\n\n{photos / 'coffee.png'}\n"
    r = batch(runner, "-", "-p", "What?", "-m", qwen, "-n", "3", input=listing)
    assert r.exit_code == 0, r.output
    assert sorted(rec["image"] for rec in records(r.stdout)) == [str(photos / "chelsea.png"), str(photos / "coffee.png")]


def test_sidecar_captions_next_to_each_image_never_overwritten(runner, qwen, photos):
    (photos / "coffee.txt").write_text("my own notes\n")
    r = batch(runner, str(photos), "-p", "What?", "-m", qwen, "-n", "3", "--sidecar")
    assert r.exit_code == 0, r.output
    assert r.stdout == "" and "2 answered, 1 already done" in r.stderr
    assert (photos / "coffee.txt").read_text() == "my own notes\n"
    j = records(batch(runner, str(photos / "chelsea.png"), "-p", "What?", "-m", qwen, "-n", "3").stdout)
    assert (photos / "chelsea.txt").read_text() == j[0]["answer"] + "\n"
    assert (photos / "sub" / "astronaut.txt").is_file()


def test_shards_split_the_images_deterministically(runner, qwen, photos, tmp_path):
    make_images(photos / "more", 4)
    seen = []
    for k in (1, 2, 3):
        r = batch(runner, str(photos), "-p", "Q?", "-m", qwen, "-n", "2", "--shard", f"{k}/3", "-q")
        assert r.exit_code == 0 and r.stderr == ""
        seen.append({rec["image"] for rec in records(r.stdout)})
    assert sum(len(s) for s in seen) == 7 and set.union(*seen) == {rec.image for rec in expand_inputs([str(photos)], ["Q?"])}


# ---------------------------------------------------------------------------------------------------- inputs

def test_folders_globs_and_item_files_expand_in_a_stable_order(photos, tmp_path):
    (photos / ".hidden.png").write_bytes(b"x")
    (photos / "notes.txt").write_text("x")
    (photos / "B.JPG").write_bytes(b"x")
    found = [i.image for i in expand_inputs([str(photos)], ["Q"])]
    assert found == [str(photos / n) for n in ("B.JPG", "chelsea.png", "coffee.png", "sub/astronaut.png")]
    assert [i.image for i in expand_inputs([str(photos / "c*.png")], ["Q"])] == found[1:3]
    assert len(expand_inputs([str(photos / "**" / "*.png")], ["Q", "R"])) == 6
    (tmp_path / "items.jsonl").write_text('{"image": "photos/coffee.png", "prompt": "P1"}\n\n{"image": "https://x/y.png"}\n')
    assert expand_inputs([str(tmp_path / "items.jsonl")], ["Q", "R"]) == [
        Item(str(photos / "coffee.png"), "P1"), Item("https://x/y.png", "Q"), Item("https://x/y.png", "R")]
    (tmp_path / "items.csv").write_text("image,prompt\nphotos/chelsea.png,What?\nphotos/coffee.png,\n")
    assert expand_inputs([str(tmp_path / "items.csv")], ["Q"]) == [
        Item(str(photos / "chelsea.png"), "What?"), Item(str(photos / "coffee.png"), "Q")]
    assert expand_inputs(["-"], ["Q"], stdin=io.StringIO("a.png\nhttp://h/b.jpg\n")) == [
        Item("a.png", "Q"), Item("http://h/b.jpg", "Q")]


@pytest.mark.parametrize("content,message", [
    ('{"image": "a.png"}\nnot json\n', "items.jsonl:2: not a JSON line"),
    ('{"prompt": "Q"}\n', "items.jsonl:1: an item needs an \"image\""),
    ('{"image": "a.png", "prompt": 3}\n', "\"prompt\" must be a string"),
])
def test_bad_item_files_name_the_line(tmp_path, content, message):
    (tmp_path / "items.jsonl").write_text(content)
    with pytest.raises(LlavaError, match=message):
        expand_inputs([str(tmp_path / "items.jsonl")], ["Q"])


def test_prompts_file_grouping_and_shards(tmp_path):
    (tmp_path / "p.txt").write_text("\nFirst?\n  Second?  \n\n")
    assert read_prompts_file(str(tmp_path / "p.txt")) == ["First?", "Second?"]
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(LlavaError, match="holds no prompt"):
        read_prompts_file(str(tmp_path / "empty.txt"))
    items = [Item("a", "1"), Item("b", "1"), Item("a", "2"), Item("a", "1"), Item("c", "1")]
    groups = by_image(items)
    assert groups == [("a", ["1", "2"]), ("b", ["1"]), ("c", ["1"])]
    assert shard(groups, 1, 2) == [("a", ["1", "2"]), ("c", ["1"])] and shard(groups, 2, 2) == [("b", ["1"])]
    assert parse_shard("2/4") == (2, 4)
    for bad in ("0/4", "5/4", "1", "a/b"):
        with pytest.raises(LlavaError):
            parse_shard(bad)


def test_writer_reads_keys_and_ignores_foreign_lines(tmp_path):
    path = tmp_path / "o.jsonl"
    path.write_text('{"key": "k1", "answer": "a"}\nhello\n{"key": "k2", "error": "e"}\n')
    notes = []
    w = RecordWriter(str(path), warn=notes.append)
    assert w.done == {"k1", "k2"} and w.old_errors == 1 and notes == [f"{path}:2: not a llava batch record; kept and ignored"]
    w.write({"image": "x", "prompt": "p", "answer": "b", "key": "k3"})
    w.close()
    assert path.read_text().endswith('"key": "k3"}\n') and path.read_text().count("\n") == 4


def test_presets_give_the_prompt_or_wrap_each_one(runner, qwen, photos):
    r = batch(runner, str(photos / "chelsea.png"), "--preset", "caption", "-m", qwen, "-n", "2")
    assert r.exit_code == 0, r.output
    assert records(r.stdout)[0]["prompt"] == "Provide a one-sentence caption for the provided image."
    r = batch(runner, str(photos / "chelsea.png"), "--preset", "short-answer", "-p", "What colour?", "-m", qwen)
    (rec,) = records(r.stdout)
    assert rec["prompt"] == "What colour?\nAnswer the question using a single word or phrase."
    assert rec["settings"]["max_tokens"] == 16
