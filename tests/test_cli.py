"""`llava ask` driven through typer's CliRunner, and once as a real subprocess."""

import json
import shutil
import socket
import subprocess
import sys

import pytest

from checkpoints import DATA
from llava_cli.cli import app

PHOTO = str(DATA / "chelsea.png")


def ask(runner, *args, env=None, input=None):
    return runner.invoke(app, ["ask", *args], env=env, input=input)


def test_ask_streams_the_answer_to_stdout_only(runner, qwen):
    r = ask(runner, PHOTO, "What is this?", "-m", qwen, "-n", "8", "--dtype", "float32")
    assert r.exit_code == 0, r.output
    assert r.stdout.endswith("\n") and r.stdout.strip()
    assert r.stderr == ""


def test_ask_is_greedy_and_deterministic_by_default(runner, qwen):
    a = ask(runner, PHOTO, "What is this?", "-m", qwen, "-n", "8", "--dtype", "float32").stdout
    b = ask(runner, PHOTO, "What is this?", "-m", qwen, "-n", "8", "--dtype", "float32").stdout
    assert a == b


def test_json_output_has_answer_model_timings_and_counts(runner, qwen):
    r = ask(runner, PHOTO, "What is this?", "-m", qwen, "-n", "5", "--json", "--dtype", "float32")
    assert r.exit_code == 0, r.output
    rec = json.loads(r.stdout)
    plain = ask(runner, PHOTO, "What is this?", "-m", qwen, "-n", "5", "--dtype", "float32").stdout
    assert rec["answer"] == plain.removesuffix("\n")
    assert rec["template"] == "interleave-qwen" and rec["model"] == qwen
    assert rec["tokens"]["image"] == 16 and rec["tokens"]["generated"] <= 5 and rec["tokens"]["prompt"] > 16
    assert set(rec["timings"]) >= {"load_s", "vision_s", "first_token_s", "decode_s", "tokens_per_s"}


def test_show_prompt_renders_without_generating(runner, qwen):
    r = ask(runner, PHOTO, "What is this?", "-m", qwen, "--show-prompt", "--system", "Be brief.")
    assert r.exit_code == 0, r.output
    assert r.stdout == "<|im_start|>system\n\nBe brief.<|im_end|>\n<|im_start|>user\n<image>\nWhat is this?<|im_end|>\n<|im_start|>assistant\n\n"
    count, rest = r.stderr.split(" ", 1)
    assert int(count) > 16 and rest == "tokens, 16 of them for 1 image(s) of 16 tokens\n"


def test_text_only_prompt_and_template_override(runner, tiny):
    folder = str(tiny("llava").folder)
    r = ask(runner, "Hello?", "-m", folder, "--show-prompt", "--template", "vip-llava")
    assert r.exit_code == 0 and r.stdout.startswith("A chat between a curious human") and "###Human: Hello?" in r.stdout
    r = ask(runner, "Hello?", "-m", folder, "-n", "4", "--dtype", "float32")
    assert r.exit_code == 0 and r.stdout.strip()


def test_verbose_prints_stats_on_stderr(runner, qwen):
    r = ask(runner, PHOTO, "What?", "-m", qwen, "-n", "4", "-v", "--dtype", "float32")
    assert r.exit_code == 0
    assert "first token" in r.stderr and "tok/s" in r.stderr and "peak memory" in r.stderr


def test_image_from_stdin(runner, qwen):
    data = (DATA / "chelsea.png").read_bytes()
    a = ask(runner, "-", "What?", "-m", qwen, "-n", "4", "--dtype", "float32", input=data)
    b = ask(runner, PHOTO, "What?", "-m", qwen, "-n", "4", "--dtype", "float32")
    assert a.exit_code == 0 and a.stdout == b.stdout


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def broken(tmp_path_factory, tiny):
    """Checkpoint folders and files that are each wrong in one way."""
    root = tmp_path_factory.mktemp("broken")
    src = tiny("qwen").folder
    no_tok = shutil.copytree(src, root / "no-tokenizer")
    (no_tok / "tokenizer.json").unlink()
    arch = shutil.copytree(src, root / "arch")
    cfg = json.loads((arch / "config.json").read_text())
    (arch / "config.json").write_text(json.dumps({**cfg, "model_type": "llava_next"}))
    (root / "notes.jpg").write_text("not an image")
    (root / "cut.png").write_bytes((DATA / "chelsea.png").read_bytes()[:5000])
    return root


@pytest.mark.parametrize("case,args,message", [
    ("missing image", ["nope.jpg", "Q"], "nope.jpg"),
    ("not an image", ["{root}/notes.jpg", "Q"], "notes.jpg"),
    ("truncated image", ["{root}/cut.png", "Q"], "cut.png"),
    ("unreachable URL", ["http://127.0.0.1:{port}/cat.png", "Q"], "127.0.0.1"),
    ("missing file", ["Q", "-m", "{root}/no-tokenizer"], "tokenizer.json"),
    ("unsupported architecture", ["Q", "-m", "{root}/arch"], "unsupported architecture"),
    ("unknown model offline", ["Q", "-m", "nobody/no-such-model-xyz"], "--model PATH"),
    ("missing folder", ["Q", "-m", "./no/such/folder"], "not found"),
    ("more markers than images", [PHOTO, "<image> vs <image>?", "-m", "{qwen}"], "2 <image> markers but 1 image"),
    ("prompt beyond context", ["{long}", "-m", "{qwen}"], "context is 512"),
    ("bad dtype", ["Q", "-m", "{qwen}", "--dtype", "int3"], "unknown dtype"),
    ("bad device", ["Q", "-m", "{qwen}", "--device", "cuda:7"], "CUDA"),
])
def test_bad_inputs_give_one_line_and_exit_1(runner, broken, qwen, tmp_path, case, args, message):
    long = "cat " * 600
    args = [a.format(root=broken, port=_closed_port(), qwen=qwen, long=long) for a in args]
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    r = ask(runner, *args, env=env)
    assert r.exit_code == 1, (case, r.output)
    assert r.stdout == ""
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert message in r.stderr
    assert "Traceback" not in r.output


def test_usage_errors_exit_2(runner):
    assert runner.invoke(app, ["ask"]).exit_code == 2
    r = runner.invoke(app, ["ask", PHOTO])
    assert r.exit_code == 2 and "the question is missing" in r.stderr
    r = runner.invoke(app, ["ask", "-", "-", "Q"])
    assert r.exit_code == 2 and "give '-' once" in r.stderr
    assert runner.invoke(app, ["ask", "Q", "--temperature", "-1"]).exit_code == 2


def test_llava_debug_shows_the_traceback(runner):
    r = runner.invoke(app, ["ask", "nope.jpg", "Q"], env={"LLAVA_DEBUG": "1"})
    assert r.exit_code == 1 and r.exception is not None and type(r.exception).__name__ == "LlavaError"


def test_real_subprocess(qwen):
    """The installed console script, as a user runs it: answer on stdout, exit 0."""
    cmd = [sys.executable, "-m", "llava_cli", "ask", PHOTO, "What is this?", "-m", qwen, "-n", "6", "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    rec = json.loads(p.stdout)
    assert rec["answer"] and rec["tokens"]["generated"] <= 6
    bad = subprocess.run([sys.executable, "-m", "llava_cli", "ask", "nope.jpg", "Q"], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr


def test_the_checkpoints_own_chat_template_picks_the_template(runner, tiny, tmp_path):
    """A llama-based checkpoint whose chat_template.json is ChatML renders ChatML: checkpoint over family default."""
    folder = shutil.copytree(tiny("llava").folder, tmp_path / "chatml-llava")
    qwen_template = (tiny("qwen").folder / "chat_template.json").read_text()
    (folder / "chat_template.json").write_text(qwen_template)
    r = ask(runner, "Hi", "-m", str(folder), "--show-prompt")
    assert r.exit_code == 0 and r.stdout.startswith("<|im_start|>user\n")
    r = ask(runner, "Hi", "-m", str(folder), "--show-prompt", "--template", "llava-1.5")
    assert r.stdout == "USER: Hi ASSISTANT:\n"


def test_a_closed_pipe_ends_quietly(qwen):
    """`llava ask ... | head -c 1`: no traceback, no error line, the shell's SIGPIPE status."""
    cmd = [sys.executable, "-m", "llava_cli", "ask", PHOTO, "Q", "-m", qwen, "-n", "64", "--dtype", "float32"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.read(1)
    p.stdout.close()
    stderr = p.stderr.read().decode()
    assert p.wait(timeout=120) in (0, 141)  # 0 when the whole answer fit in the pipe before it closed
    assert stderr == ""
