"""Hostile images, URLs and stdin through `ask`, `chat` and `batch`: one `error:` line and exit 1 (batch: an error
record and exit 3), refused before the model loads; odd but valid images answered with the right pixels."""

import http.server
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, features

from checkpoints import DATA
from llava_cli import decode, pipeline
from llava_cli.cli import app
from llava_cli.image import ImageProcessorConfig, preprocess
from test_image import encoded, noise, png_header, reply

CAP = 100_000  # LLAVA_MAX_IMAGE_BYTES in the size-cap cases
PNG = (DATA / "coffee.png").read_bytes()
JPEG = encoded(Image.open(DATA / "coffee.png"), "JPEG")

# name -> (file bytes, what the one error line must also say); each file is also given to chat and batch
BAD_FILES = {
    "empty.jpg": (b"", "file is empty"),
    "truncated.jpg": (JPEG[: len(JPEG) // 2], "truncated or corrupt"),
    "truncated.png": (PNG[: len(PNG) // 2], "truncated or corrupt"),
    "notes.jpg": (b"just some text\n", "not an image"),
    "bomb.png": (png_header(100_000, 100_000), "10,000,000,000 pixels is larger than the 64,000,000-pixel limit"),
    "wide.png": (png_header(16_000, 9_000), "16000x9000 image is larger than the 64,000,000-pixel limit"),
    "photo.heic": (b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + bytes(64), "HEIC/HEIF images are not supported"),
    "logo.svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="9"/>', "SVG (vector) images are not supported"),
}
# name -> what the error says; each is a path that is not a readable file
BAD_PATHS = {"missing.jpg": "file not found", "folder.png": "is a directory", "locked.png": "permission denied"}
# URL path on the test server, or a whole URL -> (extra environment, what the error says)
BAD_URLS = {
    "/missing.png": ({}, "HTTP 404 Not Found"),
    "/boom.png": ({}, "HTTP 500 Internal Server Error"),
    "/slow.png": ({"LLAVA_URL_TIMEOUT": "0.3"}, "timed out after 0.3 s"),
    "/loop.png": ({}, "the server redirects in a loop"),
    "/nowhere.png": ({}, "HTTP 302 Found"),  # a redirect without a Location: not a loop
    "/trickle.png": ({"LLAVA_URL_TIMEOUT": "0.3"}, "the download took longer than 1.2 s (4 x LLAVA_URL_TIMEOUT, 0.3 s)"),
    "/page.png": ({}, "got an HTML page, not an image"),
    "/text.png": ({}, "not an image"),
    "/big.png": ({"LLAVA_MAX_IMAGE_BYTES": str(CAP)}, "larger than the 100,000 bytes limit (5 MiB)"),
    "file:///etc/passwd": ({}, "unsupported URL scheme 'file'"),
    "ftp://127.0.0.1/cat.png": ({}, "unsupported URL scheme 'ftp'"),
    "data:image/png;base64,iVBORw0KGgo=": ({}, "unsupported URL scheme 'data'"),
    "javascript:alert(1)": ({}, "unsupported URL scheme 'javascript'"),
}


class Server(http.server.BaseHTTPRequestHandler):
    """Serves /cat.png and every bad answer in BAD_URLS; remembers each request's headers."""

    requests: list = []
    release = threading.Event()  # ends /slow.png's wait when the module is done
    endless_sent: list = []  # bytes /endless.png wrote before the client hung up
    endless_done = threading.Event()

    def do_GET(self) -> None:  # noqa: N802 -- http.server's naming
        type(self).requests.append(dict(self.headers))
        port = self.server.server_address[1]
        code, body, headers = {
            "/cat.png": (200, PNG, {"Content-Type": "image/png"}),
            "/boom.png": (500, b"oops", {}),
            "/loop.png": (302, b"", {"Location": "/loop.png"}),
            "/nowhere.png": (302, b"", {}), "/trickle.png": (200, b"", {}),
            "/away.png": (302, b"", {"Location": f"http://localhost:{port}/cat.png"}),  # another host
            "/page.png": (200, b"<!DOCTYPE html><html>login</html>", {"Content-Type": "text/html"}),
            "/text.png": (200, b"hello", {"Content-Type": "text/plain"}),
            "/big.png": (200, b"", {"Content-Length": str(5 * 2**20)}),
            "/slow.png": (200, PNG, {}), "/endless.png": (200, b"", {}),
        }.get(self.path, (404, b"no", {}))
        if self.path == "/slow.png":
            self.release.wait(10)
        try:
            reply(self, code, body, headers)
            if self.path == "/endless.png":
                self._endless()
            if self.path == "/trickle.png":  # a byte every 0.1 s: each wait is short, the whole never ends
                for _ in range(600):
                    self.wfile.write(PNG[:1])
                    self.wfile.flush()
                    time.sleep(0.1)
        except OSError:  # the client hung up, as it should on /slow.png
            pass

    def _endless(self) -> None:
        sent = 0
        try:
            while sent < 2**30:  # a GiB, unless the client stops reading
                self.wfile.write(bytes(2**16))
                sent += 2**16
        finally:
            self.endless_sent.append(sent)
            self.endless_done.set()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def server(serve):
    yield serve(Server)
    Server.release.set()


@pytest.fixture
def bad(tmp_path: Path) -> dict[str, tuple[str, str]]:
    """Every bad file and path of the tables: name -> (path, what its error says)."""
    out = {}
    for name, (data, says) in BAD_FILES.items():
        (tmp_path / name).write_bytes(data)
        out[name] = (str(tmp_path / name), says)
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "locked.png").write_bytes(PNG)
    (tmp_path / "locked.png").chmod(0)
    for name, says in BAD_PATHS.items():
        out[name] = (str(tmp_path / name), says)
    if os.access(tmp_path / "locked.png", os.R_OK):  # root reads it anyway: test_an_unreadable_file_as_root
        del out["locked.png"]
    return out


@pytest.fixture
def no_model(tmp_path: Path) -> str:
    """A model folder without any file: whatever reaches the model load fails there, with another message."""
    (tmp_path / "no-model").mkdir()
    return str(tmp_path / "no-model")


def one_error(r, *says: str) -> str:
    """Exit 1, nothing on stdout, and stderr exactly one `error:` line that says all of `says`."""
    assert "Traceback" not in r.stdout + r.stderr, r.stderr
    assert r.exit_code == 1, (r.exit_code, r.stderr)
    assert r.stdout == "" and r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr
    assert all(s in r.stderr for s in says), r.stderr
    return r.stderr


# ------------------------------------------------------------------- ask and chat: refused in one line, early

def run(runner, command: str, source: str, model: str, env: dict | None = None):
    """`ask [--frames N] SOURCE QUESTION` or `chat SOURCE` with no questions piped in."""
    name, *options = command.split()
    args = [source, "What is it?"] if name == "ask" else [source]
    return runner.invoke(app, [name, *options, *args, "-m", model], env=env, input="")


@pytest.mark.parametrize("command", ["ask", "ask --frames 2", "chat"])
@pytest.mark.parametrize("name", list(BAD_FILES) + list(BAD_PATHS))
def test_a_bad_image_file_is_refused_before_the_model_loads(runner, bad, no_model, name, command, recwarn):
    if name not in bad:
        pytest.skip("running as root: test_an_unreadable_file_as_root covers it")
    path, says = bad[name]
    one_error(run(runner, command, path, no_model), f"cannot read image '{path}'", says)
    assert not recwarn.list  # a Python warning would be two more lines on a user's stderr


DROP_DAC = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--inh-caps", "-dac_override,-dac_read_search"]


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="not root (covered above), or no setpriv")
@pytest.mark.parametrize("command", ["ask", "chat"])
def test_an_unreadable_file_as_root(tmp_path, no_model, command):
    """Root (CI) without the capabilities that bypass file permissions: a real EACCES from a real process."""
    locked = tmp_path / "locked.png"
    locked.write_bytes(PNG)
    locked.chmod(0)
    args = [locked, "What is it?"] if command == "ask" else [locked]
    p = subprocess.run([*DROP_DAC, sys.executable, "-m", "llava_cli", command, *args, "-m", no_model],
                       capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    p.exit_code = p.returncode
    one_error(p, f"cannot read image '{locked}'", "permission denied")


@pytest.mark.parametrize("pillow_reads_avif,says", [
    (True, "corrupt AVIF image"), (False, "AVIF images are not supported by this Pillow build; convert it to JPEG or PNG"),
])
def test_an_avif_that_cannot_be_read_is_named(runner, no_model, tmp_path, monkeypatch, pillow_reads_avif, says):
    monkeypatch.setattr(decode.features, "check", lambda feature: pillow_reads_avif)
    (tmp_path / "photo.avif").write_bytes(b"\0\0\0\x1cftypavif\0\0\0\0avifmif1miaf" + bytes(64))
    one_error(run(runner, "ask", str(tmp_path / "photo.avif"), no_model), says)


@pytest.mark.parametrize("command", ["ask", "ask --frames 2", "chat"])
@pytest.mark.parametrize("url", BAD_URLS)
def test_a_bad_url_is_refused_before_the_model_loads(runner, server, no_model, monkeypatch, url, command):
    env, says = BAD_URLS[url]
    fetched = []
    if url.startswith("/"):
        url = server + url
    else:  # other schemes: refused without touching the network
        monkeypatch.setattr(urllib.request.OpenerDirector, "open", lambda *a, **k: fetched.append(a))
    one_error(run(runner, command, url, no_model, env), f"cannot read image '{url}'", says)
    assert not fetched


def test_a_good_image_does_reach_the_model_load(runner, no_model, tmp_path):
    """The refusals above are the image's, not the empty model folder's."""
    (tmp_path / "ok.png").write_bytes(PNG)
    assert "cannot read image" not in one_error(run(runner, "ask", str(tmp_path / "ok.png"), no_model), no_model)


def test_an_endless_body_is_read_only_up_to_the_cap(runner, server, no_model):
    r = runner.invoke(app, ["ask", server + "/endless.png", "Q?", "-m", no_model],
                      env={"LLAVA_MAX_IMAGE_BYTES": str(CAP)})
    one_error(r, f"cannot read image '{server}/endless.png'", "larger than the 100,000 bytes limit")
    assert Server.endless_done.wait(60)  # the handler notices the hang-up on its next writes
    assert Server.endless_sent[-1] < 2**30 // 4  # far from the whole GiB: only what the socket buffers held


def test_no_credentials_from_the_environment_are_sent(runner, server, no_model, tmp_path):
    (tmp_path / ".netrc").write_text("machine 127.0.0.1 login me password hunter2\n"
                                     "machine localhost login me password hunter2\n")
    Server.requests.clear()
    env = {"HOME": str(tmp_path), "HF_TOKEN": "hf_secret", "HUGGING_FACE_HUB_TOKEN": "hf_secret"}
    r = runner.invoke(app, ["ask", server + "/away.png", "Q?", "-m", no_model], env=env)
    assert r.exit_code == 1 and "cannot read image" not in r.stderr, r.stderr  # the image came; the model did not
    port = server.rsplit(":", 1)[1]
    assert [h["Host"] for h in Server.requests] == [f"127.0.0.1:{port}", f"localhost:{port}"]
    for headers in Server.requests:
        assert not {"Authorization", "Cookie", "Proxy-Authorization"} & set(headers), headers
        assert "hf_secret" not in str(headers) and "hunter2" not in str(headers)


@pytest.mark.parametrize("stdin,env,says", [
    (b"", {}, "stdin is empty"),
    (b"What is in this picture?\n", {}, "not an image"),
    (PNG * 20, {"LLAVA_MAX_IMAGE_BYTES": str(CAP)}, "larger than the 100,000 bytes limit"),
], ids=["empty", "text", "huge"])
def test_ask_refuses_bad_stdin(runner, no_model, stdin, env, says):
    r = runner.invoke(app, ["ask", "-", "What is it?", "-m", no_model], input=stdin, env=env)
    one_error(r, "cannot read image '<stdin>'", says)


def test_an_endless_pipe_into_stdin_is_read_only_up_to_the_cap(no_model):
    yes = subprocess.Popen(["yes"], stdout=subprocess.PIPE)  # never ends: reading it all would hang this test
    try:
        r = subprocess.run([sys.executable, "-m", "llava_cli", "ask", "-", "Q?", "-m", no_model], stdin=yes.stdout,
                           capture_output=True, text=True, env=os.environ | {"LLAVA_MAX_IMAGE_BYTES": str(CAP)},
                           timeout=120)
    finally:
        yes.kill()
        yes.wait()
    r.exit_code = r.returncode
    one_error(r, "cannot read image '<stdin>'", "larger than the 100,000 bytes limit")


# ---------------------------------------------------------------------- odd but valid images: answered, right pixels

def exif_jpeg(a: np.ndarray, k: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = k
    return encoded(Image.fromarray(a), "JPEG", quality=95, exif=exif)


def stored(data: bytes) -> np.ndarray:
    """The pixels as the file stores them, before any EXIF rotation."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


# EXIF orientation -> the transform a viewer applies to the stored pixels
ORIENT = {1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
          5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, -1), 7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
          8: lambda a: np.rot90(a, 1)}


def valid_images() -> dict[str, tuple[bytes, np.ndarray]]:
    """name -> (file bytes, the RGB pixels the model must see), the pixels worked out without llava_cli's loader."""
    g, a = noise(30, 44, 1)[..., 0], np.where(noise(30, 44, 1)[..., 0] > 127, 255, 0).astype(np.uint8)
    grey = np.stack([g] * 3, -1)
    on_white = np.where(a[..., None] == 0, 255, grey)  # transparency composites onto white
    idx, palette = noise(30, 44, 1)[..., 0] % 16, noise(16, 1, 3)[:, 0]
    p = Image.fromarray(idx.astype(np.uint8), "P")
    p.putpalette(palette.tobytes())
    cmyk = encoded(Image.fromarray(noise(24, 40, 4), "CMYK"), "JPEG")
    frames = [Image.new("RGB", (20, 12), c) for c in ((250, 10, 10), (10, 10, 250))]
    first = np.asarray(frames[0])
    cases = {
        "cmyk.jpg": (cmyk, stored(cmyk)),
        "deep.png": (encoded(Image.fromarray(g.astype(np.uint16) * 257), "PNG"), grey),  # mode I;16
        "palette.png": (encoded(p, "PNG"), palette[idx]),
        "palette-transparent.png": (encoded(p, "PNG", transparency=3), np.where((idx == 3)[..., None], 255, palette[idx])),
        "grey.png": (encoded(Image.fromarray(g, "L"), "PNG"), grey),
        "grey-alpha.png": (encoded(Image.fromarray(np.stack([g, a], -1), "LA"), "PNG"), on_white),
        "rgba.png": (encoded(Image.fromarray(np.dstack([grey, a]), "RGBA"), "PNG"), on_white),
        "anim.gif": (encoded(frames[0], "GIF", save_all=True, append_images=frames[1:]), first),
        "anim.webp": (encoded(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True), first),
    }
    for k, turn in ORIENT.items():
        data = exif_jpeg(noise(18, 32), k)
        cases[f"exif{k}.jpg"] = (data, np.ascontiguousarray(turn(stored(data))))
    if features.check("avif"):
        avif = encoded(Image.fromarray(noise(16, 24)), "AVIF")
        cases["photo.avif"] = (avif, stored(avif))
    return cases


VALID = valid_images()


@pytest.fixture
def seen(monkeypatch) -> list[torch.Tensor]:
    """The pixel values the model is given, call by call."""
    calls = []

    def spy(images, cfg, **kw):
        calls.append(preprocess(images, cfg, **kw))
        return calls[-1]

    monkeypatch.setattr(pipeline, "preprocess", spy)
    return calls


@pytest.mark.parametrize("name", VALID)
def test_odd_but_valid_images_are_answered_with_the_right_pixels(runner, qwen, tmp_path, seen, name):
    data, want = VALID[name]
    (tmp_path / name).write_bytes(data)
    r = runner.invoke(app, ["ask", str(tmp_path / name), "What is it?", "-m", qwen, "-n", "2", "--dtype", "float32"])
    assert r.exit_code == 0 and r.stdout.endswith("\n") and "Traceback" not in r.stderr, r.stderr
    if name.startswith("anim."):  # the first frame, and one line that says so
        assert r.stderr == f"warning: '{tmp_path / name}' has several frames; using the first " \
                           "(`llava ask --frames N` samples several)\n"
    else:
        assert r.stderr == ""
    cfg = ImageProcessorConfig.from_file(Path(qwen) / "preprocessor_config.json")
    assert len(seen) == 1 and torch.equal(seen[0], preprocess([Image.fromarray(want)], cfg))


# ------------------------------------------------------------------- chat and batch: the session and the run go on

def every_bad_source(bad: dict, server: str) -> dict[str, str]:
    """Every bad path and URL of the tables -> what its error says."""
    urls = {(server + u if u.startswith("/") else u): says for u, (_, says) in BAD_URLS.items()}
    return {path: says for path, says in bad.values()} | urls


LIMITS = {"LLAVA_URL_TIMEOUT": "0.3", "LLAVA_MAX_IMAGE_BYTES": str(CAP)}  # what BAD_URLS's rows need, all at once


def small_png(tmp_path: Path, h: int = 20, w: int = 30) -> str:
    """A good image under CAP."""
    path = tmp_path / f"small{h}x{w}.png"
    path.write_bytes(encoded(Image.fromarray(noise(h, w)), "PNG"))
    return str(path)


def test_chat_gives_one_error_line_per_bad_image_and_goes_on(runner, qwen, server, bad, tmp_path):
    sources = every_bad_source(bad, server)
    lines = [f"/image {source}" for source in sources] + [f"/image {small_png(tmp_path)}", "What is it?"]
    r = runner.invoke(app, ["chat", "-m", qwen, "-n", "2", "--dtype", "float32"], input="\n".join(lines) + "\n",
                      env=LIMITS)
    assert r.exit_code == 1 and "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == len(sources)
    for line, (source, says) in zip(errors, sources.items()):
        assert f"cannot read image '{source}'" in line and says in line, line
    assert "image 1: " in r.stderr and r.stdout.endswith("\n")  # the good image went with the question


def test_batch_writes_an_error_record_per_bad_image_and_answers_the_good_ones(runner, qwen, server, bad, tmp_path):
    sources = every_bad_source(bad, server)
    (tmp_path / "anim.gif").write_bytes(VALID["anim.gif"][0])
    good = [small_png(tmp_path), str(tmp_path / "anim.gif")]
    listing = "\n".join([good[0], *sources, good[1]]) + "\n"
    out = tmp_path / "out.jsonl"
    r = runner.invoke(app, ["batch", "-", "-p", "What?", "-m", qwen, "-n", "2", "-o", str(out)], input=listing,
                      env=LIMITS)
    assert r.exit_code == 3 and "Traceback" not in r.stderr, r.stderr
    records = {rec["image"]: rec for rec in map(json.loads, out.read_text().splitlines())}
    assert set(records) == {*sources, *good}
    for source in good:
        assert "answer" in records[source] and "error" not in records[source]
    for source, says in sources.items():
        assert f"cannot read image '{source}'" in records[source]["error"] and says in records[source]["error"]
    assert f"2 answered, {len(sources)} failed of {len(sources) + 2} items" in r.stderr
    assert f"warning: '{good[1]}' has several frames; using the first" in r.stderr


@pytest.mark.parametrize("env", [{"LLAVA_URL_TIMEOUT": "soon"}, {"LLAVA_MAX_IMAGE_BYTES": "-5"},
                                 {"LLAVA_MAX_IMAGE_BYTES": "0.5"}], ids=["timeout", "cap", "cap-under-a-byte"])
def test_a_bad_limit_in_the_environment_is_named(runner, no_model, env):
    (var, value), = env.items()
    one_error(run(runner, "ask", str(DATA / "chelsea.png"), no_model, env), f"{var}='{value}' must be a positive number")


def test_batch_over_a_file_name_that_is_not_utf8(qwen, tmp_path):
    """Linux file names are bytes: JSONL escapes one that is not UTF-8 (and resumes over it), text keeps its bytes."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    with open(os.fsencode(folder) + b"/cat\xff.png", "wb") as f:
        f.write(PNG)
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "llava_cli", "batch", str(folder), "-p", "What?", "-m", qwen, "--dtype", "float32",
           "-n", "2"]
    for done in ("1 answered", "0 answered, 1 already done"):
        p = subprocess.run([*cmd, "-o", str(out)], capture_output=True, timeout=120)
        assert p.returncode == 0 and done in p.stderr.decode(errors="replace"), p.stderr
    (record,) = [json.loads(line) for line in out.read_text(encoding="ascii").splitlines()]
    assert os.fsencode(record["image"]) == os.fsencode(folder) + b"/cat\xff.png" and "answer" in record
    p = subprocess.run([*cmd, "-f", "txt"], capture_output=True, timeout=120)
    assert p.returncode == 0 and p.stdout.startswith(os.fsencode(folder) + b"/cat\xff.png\t"), p.stderr
