"""Fuzzing image decoding: mutated bytes of small real PNG/JPEG/GIF/WebP files either decode to an image that
preprocesses to a finite (1, 3, H, W) tensor, or fail with a one-line LlavaError; nothing else may come out."""

import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from llava_cli.errors import LlavaError
from llava_cli.image import ImageProcessorConfig, preprocess
from llava_cli.sources import image_from_bytes
from test_image import encoded, noise

FRAMES = [Image.fromarray(a) for a in (noise(12, 10), noise(12, 10)[::-1], noise(12, 10)[:, ::-1])]


def _exif(k: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = k
    return exif


SEEDS = [  # small, so that a mutation often lands in a header or a chunk table
    encoded(FRAMES[0], "PNG"),
    encoded(FRAMES[0].convert("P", palette=Image.Palette.ADAPTIVE, colors=8), "PNG", transparency=2),
    encoded(Image.fromarray(noise(9, 7, 4), "RGBA"), "PNG", exif=_exif(6)),
    encoded(Image.fromarray(noise(9, 7, 2), "LA"), "PNG"),
    encoded(Image.fromarray(noise(5, 6, 1, np.uint16)[..., 0]), "PNG"),  # 16-bit grey, mode I;16
    encoded(FRAMES[0], "JPEG", quality=80, exif=_exif(8)),
    encoded(Image.fromarray(noise(16, 12, 4), "CMYK"), "JPEG"),
    encoded(FRAMES[0], "GIF", save_all=True, append_images=FRAMES[1:], duration=40, loop=0),
    encoded(FRAMES[0], "WEBP", save_all=True, append_images=FRAMES[1:], lossless=True),
    encoded(FRAMES[0], "WEBP", quality=50),
]
CONFIGS = [  # both resize styles: shortest edge then a crop (CLIP), and a fixed size (SigLIP)
    ImageProcessorConfig.from_dict({"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 14},
                                    "crop_size": {"height": 14, "width": 14}}),
    ImageProcessorConfig.from_dict({"image_processor_type": "SiglipImageProcessor", "size": {"height": 12, "width": 16}}),
]
MAX_PIXELS = 2_000_000  # a mutated header may declare a big image; the limit keeps each example fast


@st.composite
def mutated(draw) -> bytes:
    """A seed file with a few byte flips, insertions, deletions, a truncation or a block copied elsewhere."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "copy"]))
        # past the 4-byte signature mostly: a file that is no longer a PNG at all teaches little
        at = draw(st.integers(0 if op == "truncate" or len(data) <= 4 else 4, len(data) - 1))
        if op == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":  # boundary values break lengths and sizes best
            data[at] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF]))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 16))]
        elif op == "truncate":
            del data[at:]
        else:
            src = draw(st.integers(0, len(data) - 1))
            data[at:at] = data[src:src + draw(st.integers(1, 32))]
        if not data:
            break
    return bytes(data)


# A fixed budget for CI: 200 examples drawn from a fixed seed (derandomize), no deadline (the machine may be
# shared), no example database written into the working tree; about 5 s.
@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(data=mutated())
def test_mutated_image_bytes_decode_and_preprocess_or_fail_in_one_line(data: bytes) -> None:
    with warnings.catch_warnings(record=True) as caught:  # Python prints a warning as two more lines on stderr
        warnings.simplefilter("always")
        try:
            img = image_from_bytes(data, "fuzz.bin", max_pixels=MAX_PIXELS)
            for cfg, pad in ((CONFIGS[0], False), (CONFIGS[1], False), (CONFIGS[1], True)):
                x = preprocess([img], cfg, pad_square=pad)
                assert x.shape == (1, 3, *cfg.output_size) and x.dtype.is_floating_point
                assert bool(x.isfinite().all())
        except LlavaError as e:
            assert str(e) and "\n" not in str(e)
    assert not caught, [str(w.message) for w in caught]


@pytest.mark.parametrize("seed", range(len(SEEDS)))
def test_every_seed_decodes_unmutated(seed: int) -> None:
    """The fuzzing starts from good files: each decodes and preprocesses."""
    img = image_from_bytes(SEEDS[seed], f"seed{seed}")
    assert np.asarray(img.convert("RGB")).size and preprocess([img], CONFIGS[0]).shape == (1, 3, 14, 14)
