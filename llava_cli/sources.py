"""Images in: a path, an http(s) URL or stdin -> a decoded Pillow image, with every failure told in one line."""

import hashlib
import io
import math
import os
import re
import socket
import stat
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import BinaryIO

from PIL import Image

from . import __version__
from .decode import DEFAULT_MAX_PIXELS, cannot_read, decode
from .errors import LlavaError

DEFAULT_MAX_BYTES = 64 * 2**20
DEFAULT_TIMEOUT = 30.0  # seconds per socket operation
WHOLE_DOWNLOAD = 4  # a whole download may take this many timeouts: a server trickling bytes cannot hold us forever
# The environment can move both limits: a slow network, a huge scan, or a test that must not wait 30 s.
ENV_MAX_BYTES, ENV_TIMEOUT = "LLAVA_MAX_IMAGE_BYTES", "LLAVA_URL_TIMEOUT"
_CHUNK = 2**16
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")  # data:, javascript:, mailto: (2+ letters: not C:\)
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


def _unsupported_scheme(name: str, scheme: str) -> LlavaError:
    return cannot_read(name, f"unsupported URL scheme '{scheme}' (only http and https; use a plain path for files)")


def _limit(n: int) -> str:
    return f"{n / 2**20:g} MiB" if n >= 2**20 else f"{n:,} bytes"


def _limits(timeout: float | None, max_bytes: int | None) -> tuple[float, int]:
    """The timeout and size cap given, else the environment's, else the defaults."""
    return (timeout or _from_env(ENV_TIMEOUT) or DEFAULT_TIMEOUT,
            max_bytes or int(_from_env(ENV_MAX_BYTES, least=1) or DEFAULT_MAX_BYTES))


def _from_env(var: str, least: float = 0.0) -> float | None:
    raw = os.environ.get(var, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not (0 < value < math.inf and value >= least):  # NaN fails this too
        raise LlavaError(f"{var}={raw!r} must be a positive number" + (f" (at least {least:g})" if least else ""))
    return value


def load_image(source: str, *, stdin: BinaryIO | None = None, timeout: float | None = None,
               max_bytes: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """A path, an http(s) URL, or '-' (stdin bytes, default sys.stdin.buffer) -> a decoded RGB-convertible image.

    timeout and max_bytes default to $LLAVA_URL_TIMEOUT and $LLAVA_MAX_IMAGE_BYTES, else 30 s and 64 MiB.
    """
    timeout, max_bytes = _limits(timeout, max_bytes)
    if source == "-":
        return image_from_bytes(_read_stdin(stdin, max_bytes), "<stdin>", max_pixels=max_pixels)
    if _URL_RE.match(source):
        return image_from_bytes(_fetch(source, timeout, max_bytes), source, max_pixels=max_pixels)
    with _open(source) as f:
        return decode(f, source, max_pixels)


def load_image_hashed(source: str, *, timeout: float | None = None, max_bytes: int | None = None,
                      max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image, str]:
    """A path or http(s) URL -> (image, sha256 hex of the bytes decoded), hashed from the same read."""
    timeout, max_bytes = _limits(timeout, max_bytes)
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
            raise cannot_read(source, e.strerror or str(e)) from e
        return decode(f, source, max_pixels), digest.hexdigest()


def read_source(source: str, *, stdin: BinaryIO | None = None, timeout: float | None = None,
                max_bytes: int | None = None) -> bytes:
    """The bytes of a path, an http(s) URL or '-' (stdin), with load_image's size limit and one-line errors."""
    timeout, max_bytes = _limits(timeout, max_bytes)
    if source == "-":
        return _read_stdin(stdin, max_bytes)
    if _URL_RE.match(source):
        return _fetch(source, timeout, max_bytes)
    with _open(source) as f:
        try:
            data = _read_capped(f, max_bytes, source)
        except OSError as e:
            raise cannot_read(source, e.strerror or str(e)) from e
    if not data:
        raise cannot_read(source, "file is empty")
    return data


def _open(source: str) -> BinaryIO:
    if (m := _SCHEME_RE.match(source)) and not os.path.lexists(source):  # a URL of a kind we never fetch
        raise _unsupported_scheme(source, m[1])
    try:
        f = Path(source).open("rb")
    except FileNotFoundError:
        raise cannot_read(source, "file not found") from None
    except IsADirectoryError:
        raise cannot_read(source, "is a directory, not an image file") from None
    except PermissionError:
        raise cannot_read(source, "permission denied") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
        raise cannot_read(source, getattr(e, "strerror", None) or str(e)) from e
    st = os.fstat(f.fileno())
    if stat.S_ISREG(st.st_mode) and st.st_size == 0:  # pipes such as <(curl ...) report size 0 too
        f.close()
        raise cannot_read(source, "file is empty")
    return f


def image_from_bytes(data: bytes, name: str, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an in-memory image; `name` is what error messages call it."""
    if not data:
        raise cannot_read(name, "no data (empty input)")
    return decode(io.BytesIO(data), name, max_pixels)


def _read_capped(stream: BinaryIO, max_bytes: int, name: str, timeout: float | None = None) -> bytes:
    """Read to EOF in chunks, failing as soon as more than max_bytes arrive, or (with `timeout`, for a download)
    when the whole read takes longer than WHOLE_DOWNLOAD timeouts."""
    buf = bytearray()
    deadline = time.monotonic() + WHOLE_DOWNLOAD * timeout if timeout else math.inf
    read = getattr(stream, "read1", stream.read)  # read1: what has arrived, so a trickle still reaches the check
    while chunk := read(min(_CHUNK, max_bytes + 1 - len(buf))):
        buf += chunk
        if len(buf) > max_bytes:
            raise cannot_read(name, f"larger than the {_limit(max_bytes)} limit")
        if time.monotonic() > deadline:
            raise cannot_read(name, f"the download took longer than {WHOLE_DOWNLOAD * timeout:g} s "
                                    f"({WHOLE_DOWNLOAD} x {ENV_TIMEOUT}, {timeout:g} s); the server sends too slowly")
    return bytes(buf)


def _read_stdin(stdin: BinaryIO | None, max_bytes: int) -> bytes:
    stream = stdin if stdin is not None else getattr(sys.stdin, "buffer", None)
    if stream is None:
        raise cannot_read("<stdin>", "there is no standard input")
    if getattr(stream, "isatty", lambda: False)():
        raise cannot_read("<stdin>", "stdin is a terminal; pipe the image in, e.g. `< cat.jpg`")
    try:
        data = _read_capped(stream, max_bytes, "<stdin>")
    except OSError as e:
        raise cannot_read("<stdin>", e.strerror or str(e)) from e
    if not data:
        raise cannot_read("<stdin>", "stdin is empty")
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
        raise cannot_read(url, f"invalid URL ({e})") from e
    if parts.scheme.lower() not in ("http", "https"):
        raise _unsupported_scheme(url, parts.scheme)
    if parts.username is not None or parts.password is not None:
        bare = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()  # never echo a password
        raise cannot_read(bare, "credentials in URLs are not supported; download the image first")
    if not parts.hostname:
        raise cannot_read(url, "the URL has no host")
    headers = {"User-Agent": f"llava-cli/{__version__}", "Accept": "image/*,*/*;q=0.8"}  # and nothing else
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.build_opener(_HttpOnlyRedirects).open(req, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > max_bytes:
                raise cannot_read(url, f"larger than the {_limit(max_bytes)} limit ({_limit(int(length))})")
            data = _read_capped(resp, max_bytes, url, timeout)
    except LlavaError:
        raise
    except urllib.error.HTTPError as e:
        e.close()
        if 300 <= e.code < 400 and "infinite loop" in str(e.msg):  # urllib gives up on a loop or after 10
            raise cannot_read(url, f"too many redirects (HTTP {e.code}); the server redirects in a loop") from e
        raise cannot_read(url, f"HTTP {e.code} {e.reason}") from e
    except urllib.error.URLError as e:
        raise cannot_read(url, _net_reason(e.reason, timeout)) from e
    except (OSError, ValueError) as e:
        raise cannot_read(url, _net_reason(e, timeout)) from e
    except Exception as e:  # http.client.HTTPException and friends: IncompleteRead, RemoteDisconnected, ...
        raise cannot_read(url, f"connection error ({type(e).__name__}: {e})") from e
    if not data:
        raise cannot_read(url, "the server sent an empty body")
    return data


def _net_reason(e: object, timeout: float) -> str:
    if isinstance(e, TimeoutError):  # socket.timeout is TimeoutError since Python 3.10
        return f"timed out after {timeout:g} s"
    if isinstance(e, socket.gaierror):
        return f"cannot resolve host ({e.strerror})"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__
