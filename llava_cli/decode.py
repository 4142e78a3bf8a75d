"""Bytes -> a Pillow image: the pixel limit checked on the header, the decode, EXIF orientation, and a name for
whatever is not an image (HEIC, SVG, an HTML page, a video)."""

import contextlib
import re
import warnings
from collections.abc import Iterator
from typing import BinaryIO

from PIL import Image, ImageOps, UnidentifiedImageError, features

from .errors import LlavaError

DEFAULT_MAX_PIXELS = 64_000_000  # 64 MP: above any ordinary photo, far below what would exhaust memory when decoded
_ISOBMFF_IMAGES = (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1", b"avif", b"avis")


def cannot_read(name: str, reason: str) -> LlavaError:
    """The one-line error for an image that cannot be read, whatever the reason text holds (HTTP reasons and OS
    messages can carry newlines)."""
    return LlavaError(" ".join(f"cannot read image '{name}': {reason}".split()))


@contextlib.contextmanager
def quiet_pillow() -> Iterator[None]:
    """Pillow's warnings silenced (a bomb-sized header, EXIF tags it skips), which Python would print as two more
    lines on stderr: the pixel limit is checked by the caller, and skipped metadata is nothing a user can act on."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@quiet_pillow()
def decode(fp: BinaryIO, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Header, pixel limit, full decode, EXIF orientation; the result no longer depends on `fp`."""
    try:
        img = Image.open(fp)
    except Image.DecompressionBombError as e:  # Pillow refuses > ~179 MP in the header by itself
        size = re.search(r"\((\d+) pixels\)", str(e))  # its message holds the declared size; ours names our limit
        what = f"image of {int(size[1]):,} pixels" if size else "image"
        raise cannot_read(name, f"{what} is larger than the {max_pixels:,}-pixel limit") from None
    except UnidentifiedImageError:
        try:
            fp.seek(0)
            head = fp.read(1024)
        except OSError:  # a pipe cannot rewind; name it generically
            head = b""
        raise cannot_read(name, _what_is(head)) from None
    except Exception as e:  # Pillow's plugins raise SyntaxError, struct.error, ... on broken headers
        raise cannot_read(name, f"corrupt image header ({e})") from e
    with img:
        w, h = img.size
        if w * h > max_pixels:  # checked on the header, before a bomb can be decoded
            raise cannot_read(name, f"{w}x{h} image is larger than the {max_pixels:,}-pixel limit")
        if w < 1 or h < 1:
            raise cannot_read(name, f"the image is {w}x{h} pixels: it has no pixels")
        animated = _is_animated(img)
        try:
            img.load()  # animated images: frame 0 is the current frame after open
        except Exception as e:  # truncated data surfaces as OSError, SyntaxError, EOFError, ... depending on format
            raise cannot_read(name, f"truncated or corrupt image ({e})") from e
        if animated:  # said once the frame has decoded: a failing image gets its error line alone
            # imported here: the loader stays usable without the CLI's consoles
            from .ui import warn

            warn(f"'{name}' has several frames; using the first (`llava ask --frames N` samples several)")
        try:
            out = ImageOps.exif_transpose(img)  # a copy, detached from fp
        except Exception:  # a malformed EXIF block should not cost the user the picture: keep it unrotated
            out = img.copy()
    if out.mode.startswith("I;16"):
        # PIL's I;16 -> RGB conversion saturates at 255, turning 16-bit greyscale nearly white; scale to 8 bits
        out = out.convert("I").point(lambda v: v / 257 + 0.5).convert("L")  # point() truncates: + 0.5 rounds
    return out


def _is_animated(img: Image.Image) -> bool:
    try:
        return bool(getattr(img, "is_animated", False))
    except Exception:  # GIF reads frame 2's header to know (IndexError, EOFError, ...); if broken, frame 1 is the image
        with contextlib.suppress(Exception):
            img.seek(0)
        return False


def _what_is(head: bytes) -> str:
    """Name what a non-image really is, from its first bytes."""
    text = head.lstrip().lower()
    if head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis"):  # Pillow reads AVIF when built with libavif
        if features.check("avif"):
            return "corrupt AVIF image"
        return "AVIF images are not supported by this Pillow build; convert it to JPEG or PNG"
    if head[4:8] == b"ftyp" and head[8:12] in _ISOBMFF_IMAGES:
        return "HEIC/HEIF images are not supported; convert it to JPEG or PNG"
    if text.startswith(b"<svg") or (text.startswith((b"<?xml", b"<!--")) and b"<svg" in text):
        return "SVG (vector) images are not supported; convert it to PNG"
    if text.startswith((b"<!doctype html", b"<html")):
        return "got an HTML page, not an image"
    if looks_like_video(head):
        return "a video, not an image; sample frames from it with --frames N (needs ffmpeg)"
    return "not an image, or a format Pillow cannot read"


def looks_like_video(head: bytes) -> bool:
    """MP4/MOV/3GP, Matroska/WebM, AVI, FLV, MPEG-PS/TS, Ogg or ASF/WMV, from a file's first bytes."""
    if head[4:8] == b"ftyp":
        return head[8:12] not in _ISOBMFF_IMAGES
    return (head.startswith((b"\x1aE\xdf\xa3", b"FLV", b"OggS", b"\x00\x00\x01\xba", b"\x30\x26\xb2\x75"))
            or (head[:4] == b"RIFF" and head[8:12] == b"AVI ")
            or (len(head) > 188 and head[0] == head[188] == 0x47))  # MPEG-TS: a sync byte every 188 bytes
