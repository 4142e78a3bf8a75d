"""Images in: a path, an http(s) URL or stdin -> a decoded Pillow image, with every failure told in one line."""

import hashlib
import io
import os
import re
import socket
import stat
import sys
import urllib.error
import urllib.parse
import urllib.request
import warnings
from pathlib import Path
from typing import BinaryIO

from PIL import Image, ImageOps, UnidentifiedImageError

from . import __version__
from .errors import LlavaError

DEFAULT_MAX_PIXELS = 64_000_000  # 64 MP: above any ordinary photo, far below what would exhaust memory when decoded
DEFAULT_MAX_BYTES = 64 * 2**20
_CHUNK = 2**16
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})


def is_url(source: str) -> bool:
    """Whether `source` names a URL (any scheme; fetching refuses all but http and https)."""
    return bool(_URL_RE.match(source))


def reference(source: str) -> str:
    """How to name an image so it can be read again from any folder: a URL as is, a path made absolute."""
    return source if is_url(source) else os.path.abspath(os.path.expanduser(source))


def is_image_name(name: str) -> bool:
    """Whether a file name has an image file's extension."""
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def _fail(name: str, reason: str) -> LlavaError:
    # one line whatever the reason text holds (HTTP reasons and OS messages can carry newlines)
    return LlavaError(" ".join(f"cannot read image '{name}': {reason}".split()))


def _limit(n: int) -> str:
    return f"{n / 2**20:g} MiB" if n >= 2**20 else f"{n:,} bytes"


def load_image(source: str, *, stdin: BinaryIO | None = None, timeout: float = 30.0,
               max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """A path, an http(s) URL, or '-' (stdin bytes, default sys.stdin.buffer) -> a decoded RGB-convertible image."""
    if source == "-":
        return image_from_bytes(_read_stdin(stdin, max_bytes), "<stdin>", max_pixels=max_pixels)
    if _URL_RE.match(source):
        return image_from_bytes(_fetch(source, timeout, max_bytes), source, max_pixels=max_pixels)
    with _open(source) as f:
        return _decode(f, source, max_pixels)


def load_image_hashed(source: str, *, timeout: float = 30.0, max_bytes: int = DEFAULT_MAX_BYTES,
                      max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image, str]:
    """A path or http(s) URL -> (image, sha256 hex of the bytes decoded), hashed from the same read."""
    if _URL_RE.match(source):
        data = _fetch(source, timeout, max_bytes)
        return image_from_bytes(data, source, max_pixels=max_pixels), hashlib.sha256(data).hexdigest()
    with _open(source) as f:
        digest = hashlib.sha256()
        try:
            while chunk := f.read(2**20):
                digest.update(chunk)
            f.seek(0)
        except OSError as e:
            raise _fail(source, e.strerror or str(e)) from e
        return _decode(f, source, max_pixels), digest.hexdigest()


def read_source(source: str, *, stdin: BinaryIO | None = None, timeout: float = 30.0,
                max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The bytes of a path, an http(s) URL or '-' (stdin), with load_image's size limit and one-line errors."""
    if source == "-":
        return _read_stdin(stdin, max_bytes)
    if _URL_RE.match(source):
        return _fetch(source, timeout, max_bytes)
    with _open(source) as f:
        try:
            data = _read_capped(f, max_bytes, source)
        except OSError as e:
            raise _fail(source, e.strerror or str(e)) from e
    if not data:
        raise _fail(source, "file is empty")
    return data


def _open(source: str) -> BinaryIO:
    try:
        f = Path(source).open("rb")
    except FileNotFoundError:
        raise _fail(source, "file not found") from None
    except IsADirectoryError:
        raise _fail(source, "is a directory, not an image file") from None
    except PermissionError:
        raise _fail(source, "permission denied") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
        raise _fail(source, getattr(e, "strerror", None) or str(e)) from e
    st = os.fstat(f.fileno())
    if stat.S_ISREG(st.st_mode) and st.st_size == 0:  # pipes such as <(curl ...) report size 0 too
        f.close()
        raise _fail(source, "file is empty")
    return f


def image_from_bytes(data: bytes, name: str, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an in-memory image; `name` is what error messages call it."""
    if not data:
        raise _fail(name, "no data (empty input)")
    return _decode(io.BytesIO(data), name, max_pixels)


def _decode(fp: BinaryIO, name: str, max_pixels: int) -> Image.Image:
    """Header, pixel limit, full decode, EXIF orientation; the result no longer depends on `fp`."""
    try:
        with warnings.catch_warnings():  # our own limit below replaces Pillow's bomb warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(fp)
    except Image.DecompressionBombError:  # Pillow refuses > ~179 MP in the header by itself
        raise _fail(name, f"image is larger than the {max_pixels:,}-pixel limit") from None
    except UnidentifiedImageError:
        try:
            fp.seek(0)
            head = fp.read(1024)
        except OSError:  # a pipe cannot rewind; name it generically
            head = b""
        raise _fail(name, _what_is(head)) from None
    except Exception as e:  # Pillow's plugins raise SyntaxError, struct.error, ... on broken headers
        raise _fail(name, f"corrupt image header ({e})") from e
    with img:
        w, h = img.size
        if w * h > max_pixels:  # checked on the header, before a bomb can be decoded
            raise _fail(name, f"{w}x{h} image is larger than the {max_pixels:,}-pixel limit")
        try:
            img.load()  # animated images: frame 0 is the current frame after open
        except Exception as e:  # truncated data surfaces as OSError, SyntaxError, EOFError, ... depending on format
            raise _fail(name, f"truncated or corrupt image ({e})") from e
        try:
            out = ImageOps.exif_transpose(img)  # a copy, detached from fp
        except Exception:  # a malformed EXIF block should not cost the user the picture: keep it unrotated
            out = img.copy()
    if out.mode.startswith("I;16"):
        # PIL's I;16 -> RGB conversion saturates at 255, turning 16-bit greyscale nearly white; scale to 8 bits
        out = out.convert("I").point(lambda v: v / 257 + 0.5).convert("L")  # point() truncates: + 0.5 rounds
    return out


def _what_is(head: bytes) -> str:
    """Name what a non-image really is, from its first bytes."""
    text = head.lstrip().lower()
    if head[4:8] == b"ftyp" and head[8:12] in (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1"):
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
        return head[8:12] not in (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1", b"avif")
    return (head.startswith((b"\x1aE\xdf\xa3", b"FLV", b"OggS", b"\x00\x00\x01\xba", b"\x30\x26\xb2\x75"))
            or (head[:4] == b"RIFF" and head[8:12] == b"AVI ")
            or (len(head) > 188 and head[0] == head[188] == 0x47))  # MPEG-TS: a sync byte every 188 bytes


def _read_capped(stream: BinaryIO, max_bytes: int, name: str) -> bytes:
    """Read to EOF in chunks, failing as soon as more than max_bytes arrive."""
    buf = bytearray()
    while chunk := stream.read(min(_CHUNK, max_bytes + 1 - len(buf))):
        buf += chunk
        if len(buf) > max_bytes:
            raise _fail(name, f"larger than the {_limit(max_bytes)} limit")
    return bytes(buf)


def _read_stdin(stdin: BinaryIO | None, max_bytes: int) -> bytes:
    stream = stdin if stdin is not None else getattr(sys.stdin, "buffer", None)
    if stream is None:
        raise _fail("<stdin>", "there is no standard input")
    if getattr(stream, "isatty", lambda: False)():
        raise _fail("<stdin>", "stdin is a terminal; pipe the image in, e.g. `< cat.jpg`")
    try:
        data = _read_capped(stream, max_bytes, "<stdin>")
    except OSError as e:
        raise _fail("<stdin>", e.strerror or str(e)) from e
    if not data:
        raise _fail("<stdin>", "stdin is empty")
    return data


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) only: a server must not send us on to ftp://."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        scheme = urllib.parse.urlsplit(newurl).scheme.lower()
        if scheme not in ("http", "https"):
            fp.close()  # the 302 response still holds the socket
            raise urllib.error.URLError(f"redirected to an unsupported URL scheme '{scheme}'")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _fetch(url: str, timeout: float, max_bytes: int) -> bytes:
    """GET an http(s) URL with no credentials, a timeout per socket operation and a size cap."""
    try:
        parts = urllib.parse.urlsplit(url)
        _ = parts.port  # raises ValueError on a malformed port
    except ValueError as e:
        raise _fail(url, f"invalid URL ({e})") from e
    if parts.scheme.lower() not in ("http", "https"):
        raise _fail(url, f"unsupported URL scheme '{parts.scheme}' (only http and https; use a plain path for files)")
    if parts.username is not None or parts.password is not None:
        bare = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()  # never echo a password
        raise _fail(bare, "credentials in URLs are not supported; download the image first")
    if not parts.hostname:
        raise _fail(url, "the URL has no host")
    headers = {"User-Agent": f"llava-cli/{__version__}", "Accept": "image/*,*/*;q=0.8"}  # and nothing else
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.build_opener(_HttpOnlyRedirects).open(req, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > max_bytes:
                raise _fail(url, f"larger than the {_limit(max_bytes)} limit ({_limit(int(length))})")
            data = _read_capped(resp, max_bytes, url)
    except LlavaError:
        raise
    except urllib.error.HTTPError as e:
        e.close()
        raise _fail(url, f"HTTP {e.code} {e.reason}") from e
    except urllib.error.URLError as e:
        raise _fail(url, _net_reason(e.reason, timeout)) from e
    except (OSError, ValueError) as e:
        raise _fail(url, _net_reason(e, timeout)) from e
    except Exception as e:  # http.client.HTTPException and friends: IncompleteRead, RemoteDisconnected, ...
        raise _fail(url, f"connection error ({type(e).__name__}: {e})") from e
    if not data:
        raise _fail(url, "the server sent an empty body")
    return data


def _net_reason(e: object, timeout: float) -> str:
    if isinstance(e, TimeoutError):  # socket.timeout is TimeoutError since Python 3.10
        return f"timed out after {timeout:g} s"
    if isinstance(e, socket.gaierror):
        return f"cannot resolve host ({e.strerror})"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__
