"""Frames: N frames sampled evenly from an animated GIF/WebP (Pillow) or a video (the ffmpeg program), as images.

Sampling follows LLaVA-NeXT's video code: frame indices np.linspace(0, total - 1, N) truncated to integers, so the
first and the last frame are always among them. The frames go to the model as that many images, which is how
LLaVA-NeXT-Interleave takes a video (`<image>` once per frame, then the text).
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from .decode import DEFAULT_MAX_PIXELS, looks_like_video, quiet_pillow
from .errors import LlavaError
from .sources import image_from_bytes, read_source

FFMPEG_HINT = "install ffmpeg (e.g. `apt install ffmpeg`, `brew install ffmpeg`); animated GIF and WebP need nothing"
TIMEOUT = 120.0  # seconds for one ffmpeg or ffprobe call


def sample_indices(total: int, n: int) -> list[int]:
    """n frame indices spread evenly over 0..total-1, first and last included; every frame when n >= total."""
    if total < 1 or n < 1:
        raise ValueError("total and n must be at least 1")
    if n >= total:
        return list(range(total))
    if n == 1:
        return [0]
    return [int(i * (total - 1) / (n - 1)) for i in range(n)]


def load_frames(source: str, n: int, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> list[Image.Image]:
    """A path, URL or '-' -> n frames of an animated image or a video; a still image gives itself alone."""
    if n < 1:
        raise LlavaError(f"--frames must be at least 1, got {n}")
    if source != "-" and Path(source).is_file() and _is_video_file(source):
        return video_frames(source, n)  # read by ffmpeg from the file, however large
    data = read_source(source)
    if looks_like_video(data[:512]):
        with tempfile.NamedTemporaryFile(suffix=".video") as tmp:
            tmp.write(data)
            tmp.flush()
            return video_frames(tmp.name, n, name=source)
    return animated_frames(data, source, n, max_pixels=max_pixels)


def _is_video_file(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return looks_like_video(f.read(512))
    except OSError:
        return False  # read_source names the problem


@quiet_pillow()
def animated_frames(data: bytes, name: str, n: int, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> list[Image.Image]:
    """n frames of an animated image's bytes, composited as a viewer shows them; a still image gives one."""
    try:
        img = Image.open(io.BytesIO(data))
        total = getattr(img, "n_frames", 1)
    except Exception:
        total = 1
    if total <= 1:
        return [image_from_bytes(data, name, max_pixels=max_pixels)]  # every check and message of a still image
    w, h = img.size
    if w * h > max_pixels:
        raise LlavaError(f"cannot read image '{name}': {w}x{h} frames are larger than the {max_pixels:,}-pixel limit")
    frames = []
    try:
        for i in sample_indices(total, n):
            img.seek(i)  # Pillow decodes from the last key frame, applying each frame's disposal
            frames.append(img.convert("RGB"))
    except Exception as e:
        raise LlavaError(f"cannot read image '{name}': truncated or corrupt frame ({e})") from e
    return frames


def _run(cmd: Sequence[str], name: str) -> bytes:
    try:
        p = subprocess.run(cmd, capture_output=True, timeout=TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise LlavaError(f"cannot read video '{name}': {Path(cmd[0]).name} took longer than {TIMEOUT:g} s") from None
    except OSError as e:
        raise LlavaError(f"cannot read video '{name}': cannot run {cmd[0]} ({e.strerror or e})") from None
    if p.returncode != 0:
        lines = p.stderr.decode("utf-8", "replace").strip().splitlines()
        reason = lines[-1] if lines else f"exit status {p.returncode}"
        raise LlavaError(f"cannot read video '{name}': {Path(cmd[0]).name} failed ({reason})")
    return p.stdout


def _tools(name: str) -> tuple[str, str]:
    ffmpeg, ffprobe = shutil.which("ffmpeg"), shutil.which("ffprobe")
    if not ffmpeg or not ffprobe:
        missing = " and ".join(t for t, path in (("ffmpeg", ffmpeg), ("ffprobe", ffprobe)) if not path)
        raise LlavaError(f"cannot read video '{name}': sampling frames from a video needs {missing} on PATH; {FFMPEG_HINT}")
    return ffmpeg, ffprobe


def probe(path: str, name: str | None = None) -> tuple[int, float]:
    """(frame count, frames per second) of a video's first video stream, from ffprobe's JSON."""
    name = name or path
    _, ffprobe = _tools(name)
    out = _run([ffprobe, "-v", "error", "-select_streams", "v:0", "-show_entries",
                "stream=nb_frames,avg_frame_rate,r_frame_rate,duration:format=duration", "-of", "json", path], name)
    info = json.loads(out or b"{}")
    streams = info.get("streams") or []
    if not streams:
        raise LlavaError(f"cannot read video '{name}': it has no video stream")
    s = streams[0]
    fps = _rate(s.get("avg_frame_rate")) or _rate(s.get("r_frame_rate"))
    count = int(s["nb_frames"]) if str(s.get("nb_frames", "")).isdigit() else 0
    if not count:
        duration = _float(s.get("duration")) or _float(info.get("format", {}).get("duration"))
        count = int(duration * fps) if duration and fps else 0
    if count < 1 or not fps:
        raise LlavaError(f"cannot read video '{name}': ffprobe reports no frame count or duration")
    return count, fps


def video_frames(path: str, n: int, name: str | None = None) -> list[Image.Image]:
    """n frames sampled evenly from a video file, each decoded by ffmpeg at its timestamp."""
    name = name or path
    ffmpeg, _ = _tools(name)
    total, fps = probe(path, name)
    frames = []
    for index in sample_indices(total, n):
        # A container's frame count can overstate what decodes; step back from the end until a frame comes out.
        for i in range(index, max(index - 4, -1), -1):
            # -ss before -i seeks to the key frame before t and decodes up to t exactly; PPM carries its own size.
            ppm = _run([ffmpeg, "-v", "error", "-ss", f"{i / fps:.6f}", "-i", path, "-frames:v", "1",
                        "-f", "image2pipe", "-c:v", "ppm", "-"], name)
            if ppm:
                frames.append(Image.open(io.BytesIO(ppm)).convert("RGB"))
                break
    if not frames:
        raise LlavaError(f"cannot read video '{name}': ffmpeg decoded no frame")
    return frames


def expand_markers(text: str, counts: Sequence[int], marker: str = "<image>") -> str:
    """One marker per source -> one marker per image, where a source gave several frames; else the text as is."""
    if text.count(marker) != len(counts) or all(c == 1 for c in counts):
        return text
    pieces = text.split(marker)
    return pieces[0] + "".join(marker * c + piece for c, piece in zip(counts, pieces[1:]))


def _rate(value: object) -> float:
    num, _, den = str(value or "").partition("/")
    try:
        return float(num) / float(den or 1) if float(den or 1) else 0.0
    except ValueError:
        return 0.0


def _float(value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0.0


def load_sources(sources: Sequence[str], n: int | None) -> tuple[list[Image.Image], list[int]]:
    """Every source's images in order, and how many each gave: n frames of a video or an animation, else one."""
    from .sources import load_image
    from .ui import warn

    images, counts = [], []
    for source in sources:
        got = load_frames(source, n) if n else [load_image(source)]
        if n and 1 < len(got) < n:
            warn(f"{source} has only {len(got)} frames; using all of them")
        images += got
        counts.append(len(got))
    return images, counts
