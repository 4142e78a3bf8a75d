"""llava_cli.image: loading from paths / URLs / stdin, and pixel parity with transformers' PIL image processors."""

import http.server
import io
import json
import os
import socket
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from llava_cli import __version__
from llava_cli.errors import LlavaError
from llava_cli.image import ImageProcessorConfig, preprocess
from llava_cli.sources import image_from_bytes, load_image

DATA = Path(__file__).parent / "data"
HUB = DATA / "hubmeta"
CLIP_JSON = json.loads((HUB / "llava-hf__llava-1.5-7b-hf/preprocessor_config.json").read_text())
SIGLIP_JSON = json.loads((HUB / "llava-hf__llava-interleave-qwen-0.5b-hf/preprocessor_config.json").read_text())
PHOTOS = ["chelsea.png", "astronaut.png", "coffee.png"]


def noise(h: int, w: int, c: int = 3, dtype: type = np.uint8) -> np.ndarray:
    """Random pixels seeded by the shape, so every test and -k selection sees the same image."""
    return np.random.default_rng((h, w, c)).integers(0, np.iinfo(dtype).max + 1, (h, w, c), dtype=dtype)


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def synthetic() -> dict[str, Image.Image]:
    """Every pixel layout the processors have to convert, in awkward sizes."""
    rgb = Image.fromarray(noise(37, 91))
    p_trans = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    p_trans.info["transparency"] = 3  # palette index 3 is see-through
    rgb_trns = rgb.copy()
    rgb_trns.info["transparency"] = tuple(int(v) for v in np.asarray(rgb)[0, 0])  # a tRNS colour key
    return {
        "wide": rgb, "tall": Image.fromarray(noise(91, 37)), "1x1": Image.fromarray(noise(1, 1)),
        "sliver": Image.fromarray(noise(3, 50)), "square": Image.fromarray(noise(50, 50)),
        "RGBA": Image.fromarray(noise(40, 30, 4), "RGBA"), "LA": Image.fromarray(noise(30, 40, 2), "LA"),
        "P": rgb.convert("P", palette=Image.Palette.ADAPTIVE), "P+transparency": p_trans, "RGB+tRNS": rgb_trns,
        "L": Image.fromarray(noise(33, 21, 1)[..., 0], "L"),
        "I;16": Image.fromarray(noise(20, 30, 1, np.uint16)[..., 0]),
        "CMYK-jpeg": Image.open(io.BytesIO(encoded(Image.fromarray(noise(24, 40, 4), "CMYK"), "JPEG"))),
        "1": rgb.convert("1"),
    }


# name -> (preprocessor_config dict, transformers class); small sizes mimic the tiny test checkpoints
CONFIGS = {
    "clip-336": (CLIP_JSON, CLIPImageProcessorPil),
    "clip-56": (CLIP_JSON | {"size": {"shortest_edge": 56}, "crop_size": {"height": 56, "width": 56}},
                CLIPImageProcessorPil),
    "clip-crop-bigger": (CLIP_JSON | {"size": {"shortest_edge": 40}, "crop_size": {"height": 47, "width": 43}},
                         CLIPImageProcessorPil),  # the crop zero-pads
    "clip-int-size": (CLIP_JSON | {"size": 30, "crop_size": 28}, CLIPImageProcessorPil),
    "siglip-384": (SIGLIP_JSON, SiglipImageProcessorPil),
    "siglip-48x64": (SIGLIP_JSON | {"size": {"height": 48, "width": 64}}, SiglipImageProcessorPil),
    "siglip-no-rescale": (SIGLIP_JSON | {"size": {"height": 20, "width": 20}, "do_rescale": False},
                          SiglipImageProcessorPil),
}


def reference(d: dict, cls: type, pad: bool, img: Image.Image):
    if d.get("do_convert_rgb", True) is None and (img.mode != "RGB" or "transparency" in img.info):
        # transformers 5 lets the JSON's explicit null shadow the class default (True), so it skips RGB conversion
        # and then fails on 1- or 4-channel images; we use the class default, so that is the reference here
        d = d | {"do_convert_rgb": True}
    if not pad:
        return cls.from_dict(d)
    # LlavaImageProcessor(do_pad=True) is the pad-to-square reference; it crops by default, SigLIP does not
    return LlavaImageProcessorPil.from_dict(d | {"do_pad": True, "do_center_crop": d.get("do_center_crop", False)})


@pytest.mark.parametrize("pad", [False, True], ids=["plain", "pad_square"])
@pytest.mark.parametrize("name", CONFIGS)
def test_preprocess_matches_transformers(name: str, pad: bool) -> None:
    d, cls = CONFIGS[name]
    cfg = ImageProcessorConfig.from_dict(d)
    images = synthetic()
    if name in ("clip-336", "siglip-384"):
        images |= {p: Image.open(DATA / p) for p in PHOTOS}
    for label, img in images.items():
        want = reference(d, cls, pad, img)(img, return_tensors="pt")["pixel_values"]
        got = preprocess([img], cfg, pad_square=pad)
        assert got.dtype == torch.float32 and got.shape == (1, 3, *cfg.output_size), label
        assert (got - want).abs().max().item() <= 1e-5, label


def test_preprocess_batch_and_semantics() -> None:
    cfg = ImageProcessorConfig.from_dict(CLIP_JSON | {
        "size": {"shortest_edge": 8}, "crop_size": {"height": 8, "width": 8}})
    clear = Image.new("RGBA", (12, 10), (0, 0, 0, 0))  # fully transparent black composites to white
    white = (1 - torch.tensor(cfg.image_mean)) / torch.tensor(cfg.image_std)
    batch = preprocess([clear, Image.new("RGB", (5, 9), (0, 0, 0))], cfg)
    assert batch.shape == (2, 3, 8, 8)
    torch.testing.assert_close(batch[0], white[:, None, None].expand(3, 8, 8))
    torch.testing.assert_close(batch[1], (-torch.tensor(cfg.image_mean) / torch.tensor(cfg.image_std))[:, None, None]
                               .expand(3, 8, 8))
    # pad_square on a wide image: the top rows are the mean colour, int(mean * 255) / 255, not the image
    wide = Image.new("RGB", (40, 10), (255, 0, 0))
    top = preprocess([wide], cfg, pad_square=True)[0, :, 0, 0]
    fill = torch.tensor([int(m * 255) / 255 for m in cfg.image_mean])
    torch.testing.assert_close(top, (fill - torch.tensor(cfg.image_mean)) / torch.tensor(cfg.image_std))
    assert preprocess([], cfg).shape == (0, 3, 8, 8)
    with pytest.raises(LlavaError, match="mode La"):
        preprocess([Image.new("La", (4, 4))], cfg)


def test_config_from_dict_and_file(tmp_path: Path) -> None:
    clip = ImageProcessorConfig.from_file(HUB / "llava-hf__llava-1.5-7b-hf/preprocessor_config.json")
    assert (clip.kind, clip.shortest_edge, clip.crop_size, clip.output_size) == ("clip", 336, (336, 336), (336, 336))
    assert clip.resample == 3 and clip.image_mean == (0.48145466, 0.4578275, 0.40821073) and not clip.do_pad
    sig = ImageProcessorConfig.from_dict(SIGLIP_JSON | {"some_future_key": 1})
    assert (sig.kind, sig.size, sig.do_center_crop, sig.output_size) == ("siglip", (384, 384), False, (384, 384))
    assert sig.do_convert_rgb is True  # null -> the class default
    bare = ImageProcessorConfig.from_dict({"image_processor_type": "SiglipImageProcessor", "size": 30})
    assert (bare.shortest_edge, bare.size, bare.image_std) == (30, None, (0.5, 0.5, 0.5))  # default_to_square=False
    llava = ImageProcessorConfig.from_dict({"image_processor_type": "LlavaImageProcessorFast", "do_pad": True})
    assert llava.do_pad and llava.kind == "clip" and llava.output_size == (224, 224)
    assert not ImageProcessorConfig.from_dict(CLIP_JSON | {"do_pad": True}).do_pad  # CLIP's do_pad is batch padding
    with pytest.raises(LlavaError, match="unsupported image processor type 'BlipImageProcessor'"):
        ImageProcessorConfig.from_dict({"image_processor_type": "BlipImageProcessor"})
    with pytest.raises(LlavaError, match="unsupported image size"):
        ImageProcessorConfig.from_dict(CLIP_JSON | {"size": {"longest_edge": 3}})
    with pytest.raises(LlavaError, match="depends on the image"):
        _ = ImageProcessorConfig.from_dict(CLIP_JSON | {"do_center_crop": False}).output_size
    (tmp_path / "bad.json").write_text("{nope")
    for path, why in [(tmp_path / "bad.json", "invalid JSON"), (tmp_path / "none.json", "file not found")]:
        with pytest.raises(LlavaError, match=why) as e:
            ImageProcessorConfig.from_file(path)
        assert str(path) in str(e.value)


def fails(fn, *fragments: str) -> str:
    """Run fn, expect a one-line LlavaError holding every fragment; return the message."""
    with pytest.raises(LlavaError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and all(f in msg for f in fragments), msg
    return msg


def png_header(w: int, h: int) -> bytes:
    """A PNG that declares w x h pixels but carries no pixel data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(
        b"IDAT", b"") + chunk(b"IEND", b"")


def test_load_paths_and_bad_files(tmp_path: Path) -> None:
    img = load_image(str(DATA / "chelsea.png"))
    assert img.size == (451, 300) and np.asarray(img).shape == (300, 451, 3)
    assert np.array_equal(np.asarray(img), np.asarray(Image.open(DATA / "chelsea.png")))
    photo = (DATA / "coffee.png").read_bytes()
    jpeg = encoded(Image.open(DATA / "coffee.png"), "JPEG")
    files = {"empty.png": b"", "notes.jpg": b"just some text\n", "half.png": photo[: len(photo) // 2],
             "half.jpg": jpeg[: len(jpeg) // 2], "logo.svg": b'<?xml version="1.0"?>\n<svg width="4"/>',
             "pic.heic": b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + bytes(64), "bomb.png": png_header(9000, 9000),
             "huge.png": png_header(20000, 20000)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    p = str(tmp_path)
    fails(lambda: load_image(p + "/missing.jpg"), "missing.jpg", "file not found")
    fails(lambda: load_image(p), p, "directory")
    fails(lambda: load_image(p + "/empty.png"), "empty.png", "empty")
    fails(lambda: load_image(p + "/notes.jpg"), "'" + p + "/notes.jpg'", "not an image")
    fails(lambda: load_image(p + "/half.png"), "half.png", "truncated or corrupt")
    fails(lambda: load_image(p + "/half.jpg"), "half.jpg", "truncated or corrupt")
    fails(lambda: load_image(p + "/logo.svg"), "logo.svg", "SVG")
    fails(lambda: load_image(p + "/pic.heic"), "pic.heic", "HEIC")
    fails(lambda: load_image(p + "/bomb.png"), "bomb.png", "9000x9000", "64,000,000-pixel limit")
    fails(lambda: load_image(p + "/huge.png"), "huge.png", "64,000,000-pixel limit")
    fails(lambda: load_image(str(DATA / "coffee.png"), max_pixels=1000), "coffee.png", "600x400", "1,000-pixel")
    # under a higher limit the same header passes the check and the missing pixel data is what fails
    fails(lambda: load_image(p + "/bomb.png", max_pixels=10**8), "bomb.png", "truncated or corrupt")


def test_permission_denied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    locked = tmp_path / "locked.png"
    locked.write_bytes((DATA / "chelsea.png").read_bytes())
    locked.chmod(0)
    if os.geteuid() == 0:  # root reads anything, so make the open fail the way it would for a user
        def denied(self, *args, **kwargs):
            raise PermissionError(13, "Permission denied", str(self))
        monkeypatch.setattr(Path, "open", denied)
    fails(lambda: load_image(str(locked)), "locked.png", "permission denied")


def test_pipe_path(tmp_path: Path) -> None:
    fifo = tmp_path / "sub"  # like bash's <(curl ...): size 0, cannot seek
    os.mkfifo(fifo)
    writer = threading.Thread(target=fifo.write_bytes, args=((DATA / "chelsea.png").read_bytes(),))
    writer.start()
    assert load_image(str(fifo)).size == (451, 300)
    writer.join()


def test_exif_orientations_and_modes(tmp_path: Path) -> None:
    a = noise(2, 3)  # (H, W, 3), every pixel distinct enough to tell the eight orientations apart
    want = {1: a, 2: a[:, ::-1], 3: a[::-1, ::-1], 4: a[::-1], 5: a.transpose(1, 0, 2),
            6: np.rot90(a, -1), 7: a[::-1, ::-1].transpose(1, 0, 2), 8: np.rot90(a, 1)}
    for k, expected in want.items():
        exif = Image.Exif()
        exif[0x0112] = k
        (tmp_path / f"o{k}.png").write_bytes(encoded(Image.fromarray(a), "PNG", exif=exif))
        img = load_image(str(tmp_path / f"o{k}.png"))
        assert np.array_equal(np.asarray(img), expected), k
        assert img.getexif().get(0x0112, 1) == 1  # not rotated a second time downstream
    frames = [Image.new("RGB", (4, 4), c) for c in ("red", "blue")]
    gif = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert image_from_bytes(gif, "anim.gif").convert("RGB").getpixel((0, 0)) == (255, 0, 0)
    sixteen = Image.fromarray(np.array([[0, 257, 386, 65535]], dtype=np.uint16))
    img = image_from_bytes(encoded(sixteen, "PNG"), "deep.png")  # PIL would clip this to white when converting
    assert img.mode == "L" and np.asarray(img).tolist() == [[0, 1, 2, 255]]
    assert image_from_bytes(encoded(Image.new("RGBA", (1, 1)), "PNG"), "dot.png").size == (1, 1)


def test_stdin_and_refused_urls() -> None:
    png = (DATA / "chelsea.png").read_bytes()
    assert load_image("-", stdin=io.BytesIO(png)).size == (451, 300)
    fails(lambda: load_image("-", stdin=io.BytesIO(b"")), "<stdin>", "empty")
    fails(lambda: load_image("-", stdin=io.BytesIO(png), max_bytes=1000), "<stdin>", "1,000 bytes limit")
    fails(lambda: load_image("-", stdin=io.BytesIO(b"GIF89a garbage")), "<stdin>", "not an image")
    fails(lambda: image_from_bytes(b"", "upload.png"), "upload.png", "empty")
    fails(lambda: load_image("ftp://127.0.0.1/cat.png"), "ftp://127.0.0.1/cat.png", "scheme 'ftp'")
    fails(lambda: load_image("file:///etc/hostname"), "file:///etc/hostname", "scheme 'file'")
    msg = fails(lambda: load_image("http://me:hunter2@127.0.0.1/cat.png"), "http://127.0.0.1/cat.png", "credentials")
    assert "hunter2" not in msg


def reply(handler: http.server.BaseHTTPRequestHandler, code: int, body: bytes, headers: dict[str, str]) -> None:
    """Send one whole HTTP response."""
    handler.send_response(code)
    for k, v in headers.items():
        handler.send_header(k, v)
    handler.end_headers()
    handler.wfile.write(body)


class _Handler(http.server.BaseHTTPRequestHandler):
    png = (DATA / "coffee.png").read_bytes()
    seen: list[dict] = []
    release = threading.Event()

    def do_GET(self) -> None:  # noqa: N802 -- http.server's naming
        type(self).seen.append(dict(self.headers))
        if self.path == "/slow":
            self.release.wait(5)
        code, body, headers = {
            "/cat.png": (200, self.png, {"Content-Length": str(len(self.png))}),
            "/page": (200, b"<!DOCTYPE html><html>hi</html>", {}),
            "/boom": (500, b"oops", {}), "/big": (200, bytes(5000), {"Content-Length": "5000"}),
            "/big-nolen": (200, bytes(5000), {}), "/empty": (200, b"", {"Content-Length": "0"}),
            "/redirect": (302, b"", {"Location": "/cat.png"}),
            "/redirect-ftp": (302, b"", {"Location": "ftp://127.0.0.1/cat.png"}), "/slow": (200, self.png, {}),
        }.get(self.path, (404, b"no", {}))
        try:
            reply(self, code, body, headers)
        except OSError:  # the client gave up (the timeout test)
            pass

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def server(serve):
    yield serve(_Handler)
    _Handler.release.set()  # before conftest's serve stops the server: the /slow handler is still waiting


def test_http(server: str) -> None:
    img = load_image(server + "/cat.png")
    assert img.size == (600, 400) and np.array_equal(np.asarray(img), np.asarray(Image.open(DATA / "coffee.png")))
    headers = _Handler.seen[-1]
    assert headers["User-Agent"] == f"llava-cli/{__version__}"
    assert not {"Authorization", "Cookie", "Proxy-Authorization"} & set(headers)
    assert load_image(server + "/redirect").size == (600, 400)
    fails(lambda: load_image(server + "/missing"), server + "/missing", "HTTP 404")
    fails(lambda: load_image(server + "/boom"), server + "/boom", "HTTP 500")
    fails(lambda: load_image(server + "/page"), server + "/page", "HTML page")
    fails(lambda: load_image(server + "/big", max_bytes=1000), server + "/big", "1,000 bytes limit")
    fails(lambda: load_image(server + "/big-nolen", max_bytes=1000), server + "/big-nolen", "1,000 bytes limit")
    fails(lambda: load_image(server + "/empty"), server + "/empty", "empty")
    fails(lambda: load_image(server + "/redirect-ftp"), "/redirect-ftp", "ftp")
    fails(lambda: load_image(server + "/slow", timeout=0.2), server + "/slow", "timed out after 0.2 s")
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fails(lambda: load_image(f"http://127.0.0.1:{port}/x.png"), f"127.0.0.1:{port}/x.png", "refused")
