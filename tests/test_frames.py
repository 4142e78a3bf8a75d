"""--frames: N frames sampled evenly from animated GIF/WebP (Pillow) and videos (ffmpeg), passed as images."""

import shutil
import subprocess

import pytest
from PIL import Image, features
from typer.testing import CliRunner

from checkpoints import DATA
from llava_cli.cli import app
from llava_cli.errors import LlavaError
from llava_cli.frames import expand_markers, load_frames, sample_indices

PHOTO = str(DATA / "chelsea.png")
FFMPEG = shutil.which("ffmpeg") and shutil.which("ffprobe")


def shade(i: int) -> tuple[int, int, int]:
    """A colour that names frame i."""
    return (i * 9 % 256, 255 - i * 9 % 256, 128)


def frames(n: int, size=(48, 32)) -> list[Image.Image]:
    return [Image.new("RGB", size, shade(i)) for i in range(n)]


def which_frame(img: Image.Image, n: int, tolerance: int = 6) -> int:
    """The index of the frame whose colour the image has (lossy codecs move it a little)."""
    r, g, b = img.resize((1, 1), Image.Resampling.BOX).getpixel((0, 0))
    best = min(range(n), key=lambda i: sum(abs(a - c) for a, c in zip((r, g, b), shade(i))))
    assert sum(abs(a - c) for a, c in zip((r, g, b), shade(best))) <= tolerance * 3
    return best


@pytest.mark.parametrize("total,n,expected", [
    (10, 4, [0, 3, 6, 9]), (20, 5, [0, 4, 9, 14, 19]), (7, 1, [0]), (3, 8, [0, 1, 2]), (5, 5, [0, 1, 2, 3, 4]),
    (100, 2, [0, 99]),
])
def test_indices_spread_evenly_first_and_last_included(total, n, expected):
    assert sample_indices(total, n) == expected


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_frames_of_an_animated_image(tmp_path, fmt):
    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    path = tmp_path / f"anim.{fmt.lower()}"
    first, *rest = frames(20)
    first.save(path, save_all=True, append_images=rest, duration=40, loop=0, lossless=True)
    got = load_frames(str(path), 5)
    assert [which_frame(f, 20) for f in got] == [0, 4, 9, 14, 19]
    assert all(f.mode == "RGB" and f.size == (48, 32) for f in got)
    assert [which_frame(f, 20) for f in load_frames(str(path), 50)] == list(range(20))  # fewer frames than asked: all


def test_a_still_image_gives_itself(tmp_path):
    assert len(load_frames(PHOTO, 8)) == 1
    with pytest.raises(LlavaError, match="not an image"):
        load_frames(str(DATA / "hubmeta" / "SOURCES.md"), 4)


def test_one_marker_per_source_becomes_one_per_frame():
    assert expand_markers("Is <image> in <image>?", [1, 3]) == "Is <image> in <image><image><image>?"
    assert expand_markers("Compare <image> and <image>", [1, 1]) == "Compare <image> and <image>"
    assert expand_markers("What happens?", [4]) == "What happens?"  # no markers: the images go first
    assert expand_markers("<image> <image> <image> <image>", [4]) == "<image> <image> <image> <image>"  # per frame already


def test_ask_passes_the_frames_as_images(tiny, tmp_path):
    gif = tmp_path / "clip.gif"
    first, *rest = frames(12)
    first.save(gif, save_all=True, append_images=rest, duration=40, loop=0)
    qwen = str(tiny("qwen").folder)
    r = CliRunner().invoke(app, ["ask", str(gif), "What happens?", "--frames", "4", "-m", qwen, "--show-prompt"])
    assert r.exit_code == 0, r.output
    assert "<|im_start|>user\n<image><image><image><image>\nWhat happens?<|im_end|>" in r.stdout
    assert "64 of them for 4 image(s)" in r.stderr
    r = CliRunner().invoke(app, ["ask", PHOTO, str(gif), "Is <image> in <image>?", "--frames", "3", "-m", qwen, "--show-prompt"])
    assert "Is <image> in <image><image><image>?" in r.stdout
    r = CliRunner().invoke(app, ["ask", str(gif), "What?", "--frames", "2", "-m", qwen, "-n", "3", "--json"])
    assert r.exit_code == 0 and r.stdout and '"image": 32' in r.stdout  # 2 frames of 16 tokens went through the model
    r = CliRunner().invoke(app, ["ask", str(gif), "What?", "--frames", "30", "-m", qwen, "--show-prompt"])
    assert "has only 12 frames; using all of them" in r.stderr
    r = CliRunner().invoke(app, ["ask", str(gif), "What happens?", "--frames", "3", "-m", str(tiny("llava").folder), "-n", "2"])
    assert r.exit_code == 0 and "trained on one image per prompt" in r.stderr
    assert CliRunner().invoke(app, ["ask", str(gif), "Q", "--frames", "0"]).exit_code == 2


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    """A 30-frame video at 10 fps whose frame i has colour shade(i), in a near-lossless codec."""
    if not FFMPEG:
        pytest.skip("ffmpeg and ffprobe are not installed")
    root = tmp_path_factory.mktemp("video")
    for i, f in enumerate(frames(30, (64, 48))):
        f.save(root / f"f{i:03d}.png")
    path = root / "clip.mkv"
    subprocess.run(["ffmpeg", "-v", "error", "-framerate", "10", "-i", str(root / "f%03d.png"), "-c:v", "ffv1",
                    "-pix_fmt", "bgr0", str(path)], check=True, timeout=120)
    return path


def test_frames_of_a_video_through_ffmpeg(video):
    got = load_frames(str(video), 4)
    assert [which_frame(f, 30) for f in got] == [0, 9, 19, 29]
    assert all(f.size == (64, 48) for f in got)


def test_a_video_from_stdin(video, tiny):
    qwen = str(tiny("qwen").folder)
    r = CliRunner().invoke(app, ["ask", "-", "What happens?", "--frames", "3", "-m", qwen, "--show-prompt"],
                           input=video.read_bytes())
    assert r.exit_code == 0, r.output
    assert "<image><image><image>\nWhat happens?" in r.stdout


def test_a_video_without_frames_or_without_ffmpeg_says_what_is_needed(video, tmp_path, monkeypatch):
    r = CliRunner().invoke(app, ["ask", str(video), "Q"])
    assert r.exit_code == 1 and "a video, not an image; sample frames from it with --frames N" in r.stderr
    monkeypatch.setenv("PATH", str(tmp_path))  # no ffmpeg here
    r = CliRunner().invoke(app, ["ask", str(video), "Q", "--frames", "4"])
    assert r.exit_code == 1 and r.stderr.count("\n") == 1
    assert "needs ffmpeg and ffprobe on PATH" in r.stderr and "animated GIF and WebP need nothing" in r.stderr


def test_a_broken_video_is_one_line(tmp_path):
    if not FFMPEG:
        pytest.skip("ffmpeg and ffprobe are not installed")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64)
    with pytest.raises(LlavaError, match="cannot read video '.*bad.mp4'"):
        load_frames(str(bad), 4)
