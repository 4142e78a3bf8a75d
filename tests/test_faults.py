"""Faults and interruption: a full disk, Ctrl-C at every stage, SIGKILL, a closed pipe, for ask, chat, batch, convert.

Signals go to real processes. Most are forked from one "zygote" that has imported torch and llava_cli once, so a
run costs what the command costs, not a second of imports. A stage is reached either by a real marker (answer bytes
on stdout, records in the output file) or by a hook the test installs in the child only: the function that runs the
stage touches a marker file and then runs for real, again and again, so the signal lands inside the real code.
"""

import contextlib
import csv
import errno
import io
import json
import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import SafetensorError

from checkpoints import DATA
from llava_cli.cli import app
from test_batch import PROMPTS, make_images, records

ROOT = Path(__file__).resolve().parents[1]
PHOTO = str(DATA / "chelsea.png")
FULL = os.strerror(errno.ENOSPC)  # "No space left on device"

ZYGOTE = r"""
import importlib, json, os, resource, sys, traceback
import torch
with torch.device("meta"):  # torch imports what builds modules on the meta device at first use: once, here
    torch.nn.Conv2d(1, 1, 1), torch.nn.Embedding(1, 1), torch.nn.LayerNorm(1), torch.nn.Linear(1, 1)
import llava_cli.batch, llava_cli.chatfile, llava_cli.cli, llava_cli.convert_write, llava_cli.pipeline  # noqa: E401


def hook(target, marker):
    # module:attr.attr -> a stand-in that touches `marker`, then calls the real function forever
    module, _, path = target.partition(":")
    owner = importlib.import_module(module)
    *parents, name = path.split(".")
    for part in parents:
        owner = getattr(owner, part)
    real = getattr(owner, name)

    def again(*args, **kwargs):
        open(marker, "w").close()
        while True:
            real(*args, **kwargs)

    setattr(owner, name, again)


def child(req):
    code = 99
    try:
        files = [(req.get("stdin") or os.devnull, os.O_RDONLY), (req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                 (req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)]
        for fd, (path, flags) in enumerate(files):
            os.dup2(os.open(path, flags, 0o644), fd)
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False, errors="backslashreplace")
        if req.get("fsize") is not None:  # writes past it fail with EFBIG (Python ignores SIGXFSZ)
            resource.setrlimit(resource.RLIMIT_FSIZE, (req["fsize"], req["fsize"]))
        if req.get("hook"):
            hook(req["hook"], req["marker"])
        sys.argv = ["llava", *req["argv"]]
        try:
            llava_cli.cli.main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        sys.stdout.flush()  # as the interpreter does on its way out
        sys.stderr.flush()
    except BaseException:
        traceback.print_exc()
    os._exit(code)


print("{}", flush=True)  # ready
for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        child(json.loads(line))
    print(json.dumps({"pid": pid}), flush=True)
    print(json.dumps({"code": os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])}), flush=True)
"""


class Zygote:
    """The process that forks each run; one request and its two answers (pid, exit code) at a time."""

    def __init__(self, folder: Path):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        env.pop("LLAVA_DEBUG", None)
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=env)
        self.folder, self.pending = folder, b""
        self.receive()  # ready: every run's time is its own

    def __call__(self, argv, **options) -> "Run":
        """`llava argv` in a fresh fork; options: stdin=path, hook="module:attr", fsize=bytes."""
        return Run(self, argv, **options)

    def send(self, request: dict) -> None:
        self.proc.stdin.write(json.dumps(request).encode() + b"\n")
        self.proc.stdin.flush()

    def receive(self, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            assert chunk, "the zygote died"
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


class Run:
    """One command forked from the zygote: its pid, its stdio files, its exit code once it ends."""

    def __init__(self, zygote: Zygote, argv, **options):
        self.zygote, self.stdout, self.stderr = zygote, zygote.folder / "stdout", zygote.folder / "stderr"
        self.marker = zygote.folder / "reached"
        self.marker.unlink(missing_ok=True)
        self.started = time.monotonic()
        zygote.send({"argv": [str(a) for a in argv], "stdout": str(self.stdout), "stderr": str(self.stderr),
                     "marker": str(self.marker)} | options)
        self.pid = zygote.receive()["pid"]

    def running(self) -> bool:
        try:
            os.kill(self.pid, 0)  # the zygote reaps its child at once: a pid that is gone has ended
        except ProcessLookupError:
            return False
        return True

    def await_(self, reached, timeout: float = 120) -> None:
        """Wait until reached() is true, while the process runs."""
        deadline = time.monotonic() + timeout
        while not reached():
            assert self.running(), f"ended before the stage was reached: {self.stderr.read_text()}"
            assert time.monotonic() < deadline, "the stage was not reached"
            time.sleep(0.002)

    def wait(self, timeout: float = 60) -> int:
        """The exit code (-N: killed by signal N); a run that outlives `timeout` is killed and fails the test."""
        try:
            self.code = self.zygote.receive(timeout)["code"]
        except TimeoutError:
            os.kill(self.pid, signal.SIGKILL)
            self.zygote.receive()
            pytest.fail(f"still running after {timeout} s: {self.stderr.read_text()}")
        self.seconds = time.monotonic() - self.started
        return self.code


@pytest.fixture(scope="module")
def fork(tmp_path_factory):
    """fork(argv, **options) -> Run of `llava argv` in a fresh process forked from the zygote."""
    zygote = Zygote(tmp_path_factory.mktemp("runs"))
    yield zygote
    zygote.close()


def one_error(stderr: str, *parts: str) -> str:
    """stderr is one line, `error: ...`, holding every part; no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert all(p in lines[0] for p in parts), stderr
    return lines[0]


def whole_lines(data: bytes) -> list[dict]:
    """Records of a JSONL output: no torn last line, each line a JSON object."""
    assert data == b"" or data.endswith(b"\n"), data[-200:]
    return records(data.decode())


def pairs(recs) -> list[tuple[str, str]]:
    return sorted((r["image"], r["prompt"]) for r in recs)


@pytest.fixture
def images(tmp_path):
    return make_images(tmp_path / "imgs", 8)


def batch_args(images, qwen, *more):
    return ["batch", str(images), "-p", PROMPTS[0], "-p", PROMPTS[2], "-m", qwen, "--dtype", "float32", "-n", "8",
            "-b", "2", *more]


def everything(images) -> list[tuple[str, str]]:
    return sorted((str(p), q) for p in sorted(images.glob("*.png")) for q in (PROMPTS[0], PROMPTS[2]))


# ---------------------------------------------------------------------------------------------------- full disk

@pytest.mark.parametrize("command", ["ask", "batch"])
def test_stdout_on_a_full_disk_is_one_line(qwen, images, command):
    """`llava ... > /dev/full`: one line naming standard output, exit 1, in a real process."""
    args = batch_args(images, qwen) if command == "batch" else ["ask", PHOTO, "Q", "-m", qwen, "--dtype", "float32"]
    with open("/dev/full", "wb") as full:
        p = subprocess.run([sys.executable, "-m", "llava_cli", *args], stdout=full, stderr=subprocess.PIPE,
                           text=True, timeout=120)
    assert p.returncode == 1
    one_error(p.stderr, "standard output", FULL)


def test_output_file_on_a_full_disk_keeps_whole_records_and_resumes(runner, qwen, images, tmp_path, monkeypatch):
    """The third record is half written when the disk fills: it is cut off, the run stops, a rerun completes."""
    import llava_cli.batch_output as bo

    out, real, calls = tmp_path / "out.jsonl", os.write, []

    def filling(fd, data):
        if len(calls) >= 3:  # full: the rest of the third record, and anything after it
            raise OSError(errno.ENOSPC, FULL)
        if not bytes(data).startswith(b'{"image"'):
            return real(fd, data)
        calls.append(len(data))
        return real(fd, bytes(data)[: len(data) // 2] if len(calls) == 3 else data)  # the third: only a part fits

    monkeypatch.setattr(bo.os, "write", filling)
    r = runner.invoke(app, batch_args(images, qwen, "-o", str(out)))
    monkeypatch.undo()
    assert r.exit_code == 1
    one_error(r.stderr, f"cannot write '{out}': {FULL}", "run the same command again to resume")
    kept = out.read_bytes()
    assert len(whole_lines(kept)) == 2
    r = runner.invoke(app, batch_args(images, qwen, "-o", str(out)))
    assert r.exit_code == 0, r.stderr
    assert out.read_bytes().startswith(kept) and pairs(whole_lines(out.read_bytes())) == everything(images)


@pytest.mark.parametrize("fmt", ["csv", "txt"])
def test_a_csv_or_text_output_on_a_full_disk_does_not_promise_a_resume(runner, qwen, images, tmp_path, monkeypatch,
                                                                       fmt):
    """Only JSONL resumes: a rerun onto a CSV or text file refuses to append, so the error must not say it would."""
    import llava_cli.batch_output as bo

    out, real, calls = tmp_path / f"out.{fmt}", os.write, []

    def filling(fd, data):
        calls.append(1)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, FULL)
        return real(fd, data)

    monkeypatch.setattr(bo.os, "write", filling)
    r = runner.invoke(app, batch_args(images, qwen, "-o", str(out), "-f", fmt))
    monkeypatch.undo()
    assert r.exit_code == 1
    line = one_error(r.stderr, f"cannot write '{out}': {FULL}; its records are whole")
    assert "resume" not in line
    text = out.read_text()
    rows = list(csv.reader(io.StringIO(text))) if fmt == "csv" else text.splitlines()
    assert text.endswith("\n") and len(rows) == 2 + (fmt == "csv")  # two whole records (and the CSV header)


def test_a_file_size_limit_cuts_a_write_short_and_the_part_is_removed(fork, runner, qwen, images, tmp_path):
    """RLIMIT_FSIZE in a real process: the kernel writes what fits, then EFBIG; no torn line stays."""
    out = tmp_path / "out.jsonl"
    run = fork(batch_args(images, qwen, "-o", out), fsize=2500)
    assert run.wait() == 1
    one_error(run.stderr.read_text(), f"cannot write '{out}'", os.strerror(errno.EFBIG))
    kept = out.read_bytes()
    assert 0 < len(kept) <= 2500 and whole_lines(kept)
    r = runner.invoke(app, batch_args(images, qwen, "-o", str(out)))
    assert r.exit_code == 0, r.stderr
    assert pairs(whole_lines(out.read_bytes())) == everything(images)


def test_sidecar_on_a_full_disk_stops_and_leaves_no_temporary_file(runner, qwen, images, monkeypatch):
    import llava_cli.batch_output as bo

    real, opened = os.fdopen, []

    class Filling:  # the second caption file's write fails half-way
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            if len(opened) == 2:
                self.f.write(text[: len(text) // 2])
                self.f.flush()
                raise OSError(errno.ENOSPC, FULL)
            return self.f.write(text)

    monkeypatch.setattr(bo.os, "fdopen", lambda *a, **k: opened.append(1) or Filling(real(*a, **k)))
    args = ["batch", str(images), "-p", "What?", "-m", qwen, "--dtype", "float32", "-n", "4", "--sidecar"]
    r = runner.invoke(app, args)
    monkeypatch.undo()
    assert r.exit_code == 1
    one_error(r.stderr, "cannot write caption", FULL, "run the same command again to resume")
    assert sorted(p.name for p in images.iterdir() if not p.name.endswith(".png")) == ["img00.txt"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0 and "7 answered, 1 already done" in r.stderr
    assert len(list(images.glob("*.txt"))) == 8 and not list(images.glob(".*"))


@pytest.mark.parametrize("fault", [OSError(errno.ENOSPC, FULL), KeyboardInterrupt()], ids=["full", "ctrl-c"])
def test_a_chat_save_cut_short_keeps_the_old_file(runner, qwen, tmp_path, monkeypatch, fault):
    """/save on a full disk: one error line and the chat goes on; Ctrl-C: exit 130. The old file stays either way."""
    import llava_cli.chatfile as chatfile

    saved = tmp_path / "t.json"
    saved.write_text("the old save\n")
    real = chatfile.Path.write_bytes

    def cut_short(self, data, *args, **kwargs):
        real(self, data[: len(data) // 2], *args, **kwargs)
        raise fault

    args = ["chat", PHOTO, "-m", qwen, "--dtype", "float32", "-n", "4"]
    monkeypatch.setattr(chatfile.Path, "write_bytes", cut_short)
    r = runner.invoke(app, args, input=f"What is it?\n/save {saved}\nAnd now?\n")
    monkeypatch.undo()
    if isinstance(fault, OSError):
        assert r.exit_code == 1  # a piped session with a failed line
        one_error(r.stderr, f"cannot save the chat to {saved}: {FULL}")
        assert r.stdout == runner.invoke(app, args, input="What is it?\nAnd now?\n").stdout  # both answered
    else:
        assert r.exit_code == 130 and r.stderr.rstrip().endswith("interrupted")
    assert saved.read_text() == "the old save\n" and [p.name for p in tmp_path.iterdir()] == ["t.json"]


def test_ctrl_c_while_retry_errors_rewrites_the_output_leaves_it_as_it_was(runner, qwen, images, tmp_path,
                                                                           monkeypatch):
    import llava_cli.batch_output as bo

    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"image": "gone.png", "prompt": "Q", "error": "file not found", "key": "k"}) + "\n")
    before = out.read_bytes()

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(bo.os, "fsync", interrupted)  # as the rewritten file is flushed
    r = runner.invoke(app, batch_args(images, qwen, "-o", str(out), "--retry-errors"))
    monkeypatch.undo()
    assert r.exit_code == 130 and "Traceback" not in r.stderr
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "out.jsonl"]


@pytest.mark.parametrize("says", [
    "Error while serializing: I/O error: No space left on device (os error 28)",  # safetensors >= 0.6
    'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })',  # 0.4
])
def test_convert_on_a_full_disk_removes_its_partial_folder(runner, tiny, tmp_path, monkeypatch, says):
    import llava_cli.convert_write as writer

    def filling(tensors, path, metadata=None):
        Path(path).write_bytes(b"\0" * 1000)
        raise SafetensorError(says)

    monkeypatch.setattr(writer, "save_file", filling)
    r = runner.invoke(app, ["convert", str(tiny("qwen").folder), str(tmp_path / "out")])
    assert r.exit_code == 1
    one_error(r.stderr.splitlines()[-1], f"cannot write {tmp_path / 'out'} (model.safetensors): {FULL}")
    assert "Traceback" not in r.stderr and list(tmp_path.iterdir()) == []


def test_convert_names_a_source_file_it_cannot_read_as_such(runner, tiny, tmp_path, monkeypatch):
    """An unreadable source file is not told as a write error of the destination."""
    import llava_cli.convert_write as writer

    def unreadable(src, dst, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(src))

    monkeypatch.setattr(writer.shutil, "copyfile", unreadable)
    src = tiny("qwen").folder
    r = runner.invoke(app, ["convert", str(src), str(tmp_path / "out")])
    assert r.exit_code == 1
    line = one_error(r.stderr.splitlines()[-1], f"cannot read {src}", os.strerror(errno.EACCES))
    assert "cannot write" not in line and list(tmp_path.iterdir()) == []


def test_convert_past_a_file_size_limit_removes_its_partial_folder(fork, qwen, tmp_path):
    """A real EFBIG from safetensors' writer, in a real process."""
    run = fork(["convert", qwen, tmp_path / "out"], fsize=100_000)
    assert run.wait() == 1
    line = run.stderr.read_text().strip().splitlines()[-1]
    assert line.startswith(f"error: cannot write {tmp_path / 'out'} (") and os.strerror(errno.EFBIG) in line
    assert "Traceback" not in run.stderr.read_text() and list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------------- Ctrl-C

ASK = ["ask", PHOTO, "Describe it.", "--dtype", "float32", "-n", "400"]
STAGES = [  # command, stage, the hook that marks the stage (None: a real marker)
    ("ask", "load", "llava_cli.weights:load_model"),
    ("ask", "vision", "llava_cli.pipeline:Llava.encode_images"),
    ("ask", "answer", None),  # the first answer bytes on stdout
    ("batch", "load", "llava_cli.weights:load_model"),
    ("batch", "answers", None),  # records in the output file
    ("chat", "load", "llava_cli.weights:load_model"),
    ("convert", "planning", "llava_cli.convert:plan"),
    ("convert", "writing", "llava_cli.convert_write:_save"),
    ("convert", "verifying", "llava_cli.convert_write:verify"),
]


def test_an_interrupt_that_library_code_swallows_still_ends_the_work():
    """interrupts.caught(): C code that calls Python code and takes any exception as "absent" (numpy's lookups) or
    as another error (torch's shape inference) cannot lose a Ctrl-C; seen as a flaky convert-writing above."""
    from llava_cli import interrupts

    def swallowing():
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler raises here
        except BaseException:
            return "swallowed"

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt), interrupts.caught():
        assert swallowing() == "swallowed"
        interrupts.check()  # the work's next safe point
    with pytest.raises(KeyboardInterrupt), interrupts.caught():
        swallowing()
        raise ValueError("could not determine the shape of object type 'torch.storage.UntypedStorage'")
    with pytest.raises(ValueError), interrupts.caught():  # with no interrupt, an error stays the error it is
        raise ValueError("a real error")
    interrupts.check()  # nothing is remembered past the block
    assert signal.getsignal(signal.SIGINT) is before


def test_an_interrupt_as_a_print_ends_leaves_later_prints_written(monkeypatch):
    """A Ctrl-C landing in rich's Console.__exit__, before its count of open prints goes down (seen as the flaky
    convert-verifying above, ~1 in 100 interrupts during prints), held back every later print: the "interrupted"
    line, the rest of a chat. The print that was cut there is written too; it had been rendered whole."""
    import io

    from llava_cli import ui

    for cls in (ui._Console, ui._Stdout):
        console, real = cls(file=io.StringIO(), soft_wrap=True), ui._Console._exit_buffer
        landed = []

        def exit_buffer(self=console):  # the signal handler raising as _exit_buffer is entered, once
            if not landed:
                landed.append(1)
                raise KeyboardInterrupt
            real(self)

        monkeypatch.setattr(console, "_exit_buffer", exit_buffer)
        with pytest.raises(KeyboardInterrupt):
            console.print("cut", end="")
        console.print("\ninterrupted")
        assert landed and console.file.getvalue() == "cut\ninterrupted\n", cls


@pytest.mark.parametrize(("command", "stage", "hook"), STAGES, ids=[f"{c}-{s}" for c, s, _ in STAGES])
def test_ctrl_c_at_every_stage(fork, runner, qwen, images, tmp_path, command, stage, hook):
    """SIGINT: exit 130, "interrupted", no traceback; what was written stays whole, nothing partial is left."""
    out, dst = tmp_path / "out.jsonl", tmp_path / "dst"
    argv = {"ask": [*ASK, "-m", qwen], "batch": batch_args(images, qwen, "-o", out, "-n", "32"),
            "chat": ["chat", PHOTO, "-m", qwen], "convert": ["convert", qwen, dst]}[command]
    run = fork(argv, hook=hook)
    if hook:
        run.await_(run.marker.exists)
    elif command == "ask":
        run.await_(lambda: run.stdout.stat().st_size > 0)
    else:
        run.await_(lambda: out.exists() and out.read_bytes().count(b"\n") >= 2)
    os.kill(run.pid, signal.SIGINT)
    code, stderr = run.wait(), run.stderr.read_text()
    assert code == 130, stderr
    assert stderr.rstrip().endswith("interrupted") and "Traceback" not in stderr, stderr
    if command == "ask":  # the part of the answer already written stays
        assert (run.stdout.read_text() != "") == (stage == "answer")
    if command == "batch" and stage == "load":
        assert not out.exists()  # a run that wrote nothing leaves no empty file
    if command == "batch" and stage == "answers":
        kept = out.read_bytes()
        assert len(whole_lines(kept)) >= 2 and "run the same command again to resume" in stderr
        r = runner.invoke(app, [str(a) for a in argv])
        assert r.exit_code == 0, r.stderr
        assert out.read_bytes().startswith(kept) and pairs(whole_lines(out.read_bytes())) == everything(images)
    if command == "convert":
        assert not dst.exists() and not list(tmp_path.glob(".dst.*"))


# ---------------------------------------------------------------------------------------------- SIGKILL, closed pipe

SEED = 8  # the one sequence of kill moments; a failure names it


def test_batch_killed_at_20_random_moments_then_resumed(fork, qwen, tmp_path):
    """20 SIGKILLs at seeded random moments across resumed runs, then a run to the end: each item once, whole.

    A moment is drawn by progress, not by a clock calibrated once (a busy machine makes every run slower than the
    calibration, and all kills then land before the first record): about a third of the runs are killed at a random
    fraction of the time an earlier run took to its first record, the others a random few milliseconds after a
    random number (0-2) of new records have reached the file."""
    imgs = make_images(tmp_path / "imgs", 12)
    argv = ["batch", imgs, "-p", PROMPTS[0], "-p", PROMPTS[1], "-p", PROMPTS[2], "-m", qwen, "--dtype", "float32",
            "-n", "16", "-b", "2", "--threads", "1", "-o"]
    calibration = tmp_path / "calibration.jsonl"
    run = fork([*argv, calibration])
    run.await_(lambda: calibration.exists() and calibration.stat().st_size > 0)
    first = time.monotonic() - run.started  # load, and the first batch
    assert run.wait() == 0
    expected = {(r["image"], r["prompt"]): r["answer"] for r in whole_lines(calibration.read_bytes())}
    assert len(expected) == 36

    def lines() -> int:
        return out.read_bytes().count(b"\n") if out.exists() else 0

    rng, out, history = random.Random(SEED), tmp_path / "out.jsonl", []
    for _ in range(20):
        before, run = lines(), None
        early, more, after = rng.random() < 0.35, rng.randint(0, 2), rng.uniform(0.0, 0.03)
        delay = first * rng.uniform(0.2, 0.9)
        run = fork([*argv, out])
        if early:  # most likely before any record of this run
            time.sleep(max(0.0, delay - (time.monotonic() - run.started)))
        else:  # inside the run: after `more` new records (0: just after the first), a little later
            deadline = time.monotonic() + 60
            while run.running() and lines() <= before + more and time.monotonic() < deadline:
                time.sleep(0.002)
            time.sleep(after)
        with contextlib.suppress(ProcessLookupError):  # it may have ended already
            os.kill(run.pid, signal.SIGKILL)
        code = run.wait()
        data = out.read_bytes() if out.exists() else b""
        history.append(("early" if early else f"after {more + 1}", code, data.count(b"\n") - before))
        assert code in (0, -signal.SIGKILL), f"seed {SEED}: {history}: {run.stderr.read_text()}"
        whole_lines(data)
    run = fork([*argv, out])
    assert run.wait() == 0, run.stderr.read_text()
    final = whole_lines(out.read_bytes())
    message = f"seed {SEED}: (moment, exit code, records written) per run: {history}"
    assert sorted((r["image"], r["prompt"]) for r in final) == sorted(expected), message
    assert {(r["image"], r["prompt"]): r["answer"] for r in final} == expected, message
    killed = [(moment, written) for moment, code, written in history if code == -signal.SIGKILL]
    assert len(killed) >= 5 and any(written for _, written in killed), message  # kills after records were written
    assert any(moment == "early" for moment, _ in killed), message  # and kills as a run starts


def test_batch_into_a_closed_pipe_ends_quietly(qwen, images):
    """`llava batch ... | head -1`: exit 141, nothing on stderr."""
    cmd = [sys.executable, "-m", "llava_cli", *batch_args(images, qwen, "-n", "32")]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert json.loads(p.stdout.readline())["answer"] is not None
    p.stdout.close()
    stderr = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141 and stderr == ""


def test_a_killed_conversion_s_folder_is_removed_by_the_next(fork, runner, qwen, tmp_path):
    """SIGKILL leaves .DST.partial-PID-*; the next conversion to DST removes it, not one whose process runs."""
    dst = tmp_path / "dst"
    run = fork(["convert", qwen, dst], hook="llava_cli.convert_write:save_file")
    run.await_(run.marker.exists)
    os.kill(run.pid, signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL
    (left,) = tmp_path.glob(f".dst.partial-{run.pid}-*")
    alive = tmp_path / f".dst.partial-{os.getpid()}-abcd1234"  # a conversion still running (this process)
    alive.mkdir()
    r = runner.invoke(app, ["convert", qwen, str(dst), "--no-verify"])
    assert r.exit_code == 0, r.stderr
    assert f"removed {left}, left by a conversion that was killed (process {run.pid} is gone)" in r.stderr
    assert not left.exists() and alive.is_dir() and (dst / "config.json").is_file()


def test_a_partial_folder_still_locked_is_left_even_when_its_pid_is_gone(runner, qwen, tmp_path):
    """A conversion on another host sharing the disk: its pid means nothing here, its lock on the folder does."""
    import fcntl

    dst, other = tmp_path / "dst", tmp_path / ".dst.partial-999999999-abcd1234"  # no such pid here
    other.mkdir()
    fd = os.open(other, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another open file description: it conflicts even within one process
    try:
        r = runner.invoke(app, ["convert", qwen, str(dst), "--no-verify"])
    finally:
        os.close(fd)
    assert r.exit_code == 0, r.stderr
    assert "removed" not in r.stderr and other.is_dir() and (dst / "config.json").is_file()
