"""`llava chat` driven line by line from a pipe (CliRunner), and in a real pseudo-terminal (pexpect)."""

import json
import os
import sys
import time

import pytest
from PIL import Image

from checkpoints import DATA
from llava_cli.chat import ChatSession, Settings
from llava_cli.cli import app
from llava_cli.pipeline import Llava

PHOTO, COFFEE = str(DATA / "chelsea.png"), str(DATA / "coffee.png")


def chat(runner, qwen, *args, input=""):
    return runner.invoke(app, ["chat", *args, "-m", qwen, "--dtype", "float32", "-n", "6"], input=input)


def expected_answers(qwen, questions, images=(PHOTO,)):
    session = ChatSession(Llava.load(qwen, dtype="float32", device="cpu"), Settings(max_tokens=6))
    for path in images:
        session.add_image(path, Image.open(path))
    return ["".join(session.ask(q)) for q in questions]


def test_piped_lines_are_answered_in_turn_with_plain_output(runner, qwen):
    r = chat(runner, qwen, PHOTO, input="What is it?\nWhat colour is it?\n")
    assert r.exit_code == 0, r.output
    a1, a2 = expected_answers(qwen, ["What is it?", "What colour is it?"])
    assert r.stdout == f"{a1}\n{a2}\n"  # answers only: no prompt, banner or colour on stdout
    assert "\x1b[" not in r.stdout


def test_save_and_load_carry_the_conversation_on(runner, qwen, tmp_path):
    saved = tmp_path / "chat.json"
    r = chat(runner, qwen, PHOTO, input=f"What is it?\n/save {saved}\n")
    assert r.exit_code == 0, r.output
    data = json.loads(saved.read_text())
    assert data["turns"][0]["images"][0]["source"] == PHOTO and len(data["turns"][0]["images"][0]["sha256"]) == 64
    r = chat(runner, qwen, "--load", str(saved), input="What colour is it?\n")
    assert r.exit_code == 0, r.output
    assert r.stdout == expected_answers(qwen, ["What is it?", "What colour is it?"])[1] + "\n"


def test_a_line_that_is_an_image_path_adds_the_image(runner, qwen, tmp_path):
    saved = tmp_path / "c.json"
    r = chat(runner, qwen, input=f"{COFFEE}\n/images\nWhat is it?\n/save {saved}\n")
    assert r.exit_code == 0, r.output
    assert "coffee.png" in r.stderr
    assert json.loads(saved.read_text())["turns"][0]["images"][0]["source"] == COFFEE


@pytest.mark.parametrize("line,message", [
    ("/bogus", "unknown command /bogus"),
    ("/sett temperature 1", "did you mean /set"),
    ("/set temperature hot", "temperature takes a number"),
    ("/image /no/such.png", "file not found"),
    ("/load /no/such.json", "file not found"),
    ("/retry", "nothing to retry"),
    ("/show everything", "/show takes"),
])
def test_bad_lines_get_one_line_errors_and_a_nonzero_exit_when_piped(runner, qwen, line, message):
    r = chat(runner, qwen, input=f"{line}\n/set max_tokens 2\nHello?\n")
    assert r.exit_code == 1
    errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], r.stderr
    assert r.stdout.strip()  # the session went on and answered the question after the bad line


def test_multiline_input_is_one_question(runner, qwen, tmp_path):
    saved = tmp_path / "m.json"
    r = chat(runner, qwen, input=f'first line \\\nsecond line\n"""\nblock one\nblock two\n"""\n/save {saved}\n')
    assert r.exit_code == 0, r.output
    turns = json.loads(saved.read_text())["turns"]
    assert [t["user"] for t in turns] == ["first line \nsecond line", "block one\nblock two"]


def test_stdin_image_is_refused_for_chat(runner, qwen):
    r = chat(runner, qwen, "-")
    assert r.exit_code == 2 and "standard input carries the questions" in r.stderr


def test_hand_edited_chat_file_is_refused_with_the_field_named(runner, qwen, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "llava-cli chat", "version": 1, "turns": [{"user": 3}]}))
    r = chat(runner, qwen, "--load", str(bad))
    assert r.exit_code == 1 and 'turn 1: "user" must be a string' in r.stderr


def test_a_changed_image_is_refused_on_load(runner, qwen, tmp_path):
    img = tmp_path / "p.png"
    Image.open(PHOTO).save(img)
    saved = tmp_path / "c.json"
    assert chat(runner, qwen, str(img), input=f"Hi?\n/save {saved}\n").exit_code == 0
    Image.open(COFFEE).save(img)
    r = chat(runner, qwen, "--load", str(saved))
    assert r.exit_code == 1 and "pixels changed" in r.stderr


def test_session_in_a_real_terminal(qwen, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    env = dict(os.environ, XDG_DATA_HOME=str(tmp_path / "data"), NO_COLOR="1", TERM="xterm", COLUMNS="200")
    saved = tmp_path / "t.json"
    child = pexpect.spawn(sys.executable, ["-m", "llava_cli", "chat", PHOTO, "-m", qwen, "--dtype", "float32",
                                           "-n", "6"], env=env, encoding="utf-8", timeout=120, dimensions=(40, 200))
    try:
        child.expect_exact(">>> ")
        child.sendline("What is it?")
        child.expect_exact(">>> ")
        child.sendline(f"/image {COFFEE}")
        child.expect_exact("image 2:")
        child.expect_exact(">>> ")
        child.sendline(f"/save {saved}")
        child.expect_exact("saved 1 turns")
        child.expect_exact(">>> ")
        child.sendline(f"/load {saved}")
        child.expect_exact("loaded 1 turns")
        child.expect_exact(">>> ")
        child.sendline("/images")
        child.expect_exact("coffee.png")
        child.expect_exact(">>> ")
        for delay in (0, 0.05, 0.2):  # Ctrl-C while the question is prefilled or answered: the session goes on
            child.sendline("Tell me more.")
            # Wait for readline's echo first: a Ctrl-C sent together with the line makes the terminal drop the line
            # while readline is about to read it, and readline then acts on the Ctrl-C only at the next key.
            child.expect_exact("Tell me more.")
            time.sleep(delay)
            child.sendintr()
            child.expect_exact(">>> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before
    assert json.loads(saved.read_text())["pending_images"][0]["source"] == COFFEE
    history = (tmp_path / "data" / "llava" / "chat_history").read_text()
    assert "What is it?" in history and "/images" in history


def test_passing_the_context_drops_the_oldest_turns_and_says_so(runner, qwen, tmp_path):
    saved = tmp_path / "long.json"
    long_question = "Tell me about " + "this and that " * 40  # ~120 tokens; the tiny model's context is 512
    lines = [f"{i} {long_question}" for i in range(6)]
    r = chat(runner, qwen, PHOTO, input="\n".join(lines) + f"\n/save {saved}\n")
    assert r.exit_code == 0, r.output
    assert "passed the model's context of 512 tokens: dropped the oldest" in r.stderr
    turns = json.loads(saved.read_text())["turns"]
    assert 1 < len(turns) < 6 and turns[-1]["user"].startswith("5 ")


def test_a_question_longer_than_the_context_is_refused_and_the_session_goes_on(runner, qwen):
    r = chat(runner, qwen, input="word " * 2000 + "\nHello?\n")
    assert r.exit_code == 1
    assert "tokens; the model's context is 512" in r.stderr  # the question's own size, then the context
    assert r.stdout.strip()


def test_without_threads_each_answer_retunes_the_thread_count(runner, qwen, monkeypatch):
    from llava_cli.devices import ThreadTuner

    calls = []
    monkeypatch.setattr(ThreadTuner, "retune", lambda self, *a: calls.append(1) or 1)
    assert chat(runner, qwen, input="One?\nTwo?\n").exit_code == 0
    assert len(calls) == 2
    calls.clear()
    assert chat(runner, qwen, "--threads", "1", input="One?\n").exit_code == 0
    assert calls == []  # --threads is the user's choice and stays
