"""Image preprocessing exactly as a checkpoint's preprocessor_config.json says (transformers' PIL processors)."""

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .decode import DEFAULT_MAX_PIXELS
from .errors import LlavaError
from .files import read_config

_CLIP_MEAN, _CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

# The class attributes of transformers' PIL processors; a key that is absent or null in the JSON falls back to these.
_COMMON = dict(do_convert_rgb=True, do_resize=True, resample=3, do_rescale=True, rescale_factor=1 / 255,
               do_normalize=True, default_to_square=False, do_pad=False)
_CLIP = _COMMON | dict(kind="clip", size={"shortest_edge": 224}, do_center_crop=True,
                       crop_size={"height": 224, "width": 224}, image_mean=_CLIP_MEAN, image_std=_CLIP_STD)
_SIGLIP = _COMMON | dict(kind="siglip", size={"height": 224, "width": 224}, do_center_crop=False, crop_size=None,
                         image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
_TYPES = {"CLIPImageProcessor": _CLIP, "LlavaImageProcessor": _CLIP, "SiglipImageProcessor": _SIGLIP}


@dataclass(frozen=True)
class ImageProcessorConfig:
    """Preprocessing as a checkpoint's preprocessor_config.json says."""

    kind: str = "clip"  # "clip" | "siglip": which processor class the defaults came from
    do_convert_rgb: bool = True
    do_resize: bool = True
    shortest_edge: int | None = 224  # resize so the short side is this, keeping the aspect ratio ...
    size: tuple[int, int] | None = None  # ... or to exactly (H, W)
    resample: int = 3  # a PIL filter id; 3 = BICUBIC
    do_center_crop: bool = True
    crop_size: tuple[int, int] | None = (224, 224)  # (H, W)
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = _CLIP_MEAN
    image_std: tuple[float, float, float] = _CLIP_STD
    do_pad: bool = False  # LlavaImageProcessor only: pad to a square with the mean colour before resizing

    @classmethod
    def from_dict(cls, d: dict) -> "ImageProcessorConfig":
        """Read a preprocessor_config.json dict; unknown keys are ignored, missing or null ones get class defaults."""
        name = d.get("image_processor_type") or str(d.get("feature_extractor_type") or "").replace(
            "FeatureExtractor", "ImageProcessor")
        base = re.sub(r"(Fast|Pil)$", "", name)  # the torchvision/PIL variants share one config format
        defaults = _TYPES.get(base)
        if defaults is None:
            raise LlavaError(f"unsupported image processor type {name!r} (supported: {', '.join(_TYPES)})")

        def get(key: str):
            return defaults[key] if d.get(key) is None else d[key]

        shortest, size = _parse_size(get("size"), square=bool(get("default_to_square")))
        do_crop, crop = bool(get("do_center_crop")), get("crop_size")
        crop = None if crop is None else _parse_size(crop, square=True)[1]  # crops are always (H, W)
        if do_crop and crop is None:
            raise LlavaError("preprocessor config sets do_center_crop without a height+width crop_size")
        return cls(kind=defaults["kind"], do_convert_rgb=bool(get("do_convert_rgb")), do_resize=bool(get("do_resize")),
                  shortest_edge=shortest, size=size, resample=_resample(get("resample")), do_center_crop=do_crop,
                  crop_size=crop, do_rescale=bool(get("do_rescale")), rescale_factor=float(get("rescale_factor")),
                  do_normalize=bool(get("do_normalize")), image_mean=_triple(get("image_mean"), "image_mean"),
                  image_std=_triple(get("image_std"), "image_std"),
                  # for CLIP/SigLIP do_pad means batch padding to a common size, a no-op once every image is cropped
                  do_pad=base == "LlavaImageProcessor" and bool(get("do_pad")))

    @classmethod
    def from_file(cls, path: Path) -> "ImageProcessorConfig":
        """Read a preprocessor_config.json file."""
        return read_config(path, cls.from_dict)

    @property
    def output_size(self) -> tuple[int, int]:
        """(H, W) of pixel_values."""
        if self.do_center_crop and self.crop_size:
            return self.crop_size
        if self.do_resize and self.size:
            return self.size
        raise LlavaError("the preprocessor config neither crops nor resizes to a fixed size: it depends on the image")


def _parse_size(value, *, square: bool) -> tuple[int | None, tuple[int, int] | None]:
    """transformers' get_size_dict: an int, [H, W] or a dict -> (shortest_edge, (H, W)), exactly one of them set."""
    if isinstance(value, dict) and set(value) == {"height", "width"}:
        value = (value["height"], value["width"])
    elif isinstance(value, dict) and set(value) == {"shortest_edge"}:
        value, square = value["shortest_edge"], False
    if isinstance(value, int) and value > 0:
        return (None, (value, value)) if square else (value, None)
    if isinstance(value, list | tuple) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value):
        return None, (value[0], value[1])
    raise LlavaError(f"unsupported image size {value!r} in preprocessor config (need shortest_edge or height+width)")


def _resample(value) -> int:
    if isinstance(value, int) and 0 <= value <= 5:
        return value
    raise LlavaError(f"unsupported resample {value!r} in preprocessor config (need a PIL filter id 0-5)")


def _triple(value, key: str) -> tuple[float, float, float]:
    if isinstance(value, int | float):
        value = [value] * 3
    if isinstance(value, list | tuple) and len(value) == 3:
        return tuple(float(v) for v in value)
    raise LlavaError(f"preprocessor config {key} must have 3 values, got {value!r}")


def preprocess(images: Sequence[Image.Image], cfg: ImageProcessorConfig, *, pad_square: bool = False) -> torch.Tensor:
    """(N, 3, H, W) float32 pixel values, exactly as transformers' image processor computes them."""
    arrays = [_pixels(img, cfg, pad_square or cfg.do_pad) for img in images]
    if not arrays:
        return torch.empty(0, 3, *cfg.output_size, dtype=torch.float32)
    if len({a.shape for a in arrays}) > 1:
        raise LlavaError("images preprocess to different sizes; the preprocessor config has no fixed output size")
    return torch.stack(arrays)  # (N, 3, H, W)


def _pixels(img: Image.Image, cfg: ImageProcessorConfig, pad_square: bool) -> torch.Tensor:
    """One image -> (3, H, W) float32, in transformers' order: RGB, pad, resize, crop, rescale, normalize."""
    img = _to_rgb(img) if cfg.do_convert_rgb or img.mode != "RGB" else img
    if pad_square:  # LLaVA-1.5's expand2square; the colour truncates like transformers: int(0.481 * 255) = 122
        side = max(img.size)
        canvas = Image.new("RGB", (side, side), tuple(int(x * 255) for x in cfg.image_mean))
        canvas.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
        img = canvas
    if cfg.do_resize:
        h, w = cfg.size or _shortest_edge_hw(img.height, img.width, cfg.shortest_edge)
        if h * w > DEFAULT_MAX_PIXELS:
            raise LlavaError(f"image of {img.width}x{img.height} is too elongated: resizing would give {w}x{h}")
        img = img.resize((w, h), resample=cfg.resample)
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(img.height, img.width, 3).permute(2, 0, 1)
    if cfg.do_center_crop:
        x = _center_crop(x, *cfg.crop_size)  # (3, H, W) uint8
    # rescale in float64, then float32, as transformers' numpy code does; normalize then stays in float32
    x = (x.double() * cfg.rescale_factor).float() if cfg.do_rescale else x.float()
    if cfg.do_normalize:
        mean, std = (torch.tensor(v, dtype=torch.float32).view(3, 1, 1) for v in (cfg.image_mean, cfg.image_std))
        x = (x - mean) / std
    return x.contiguous()


def _to_rgb(img: Image.Image) -> Image.Image:
    """transformers' convert_to_rgb: composite any transparency onto white, everything else via PIL's convert."""
    # do_convert_rgb=False with a non-RGB image breaks inside transformers; the model needs 3 channels, so we convert
    try:
        if "A" in img.getbands() or img.info.get("transparency") is not None:
            white = Image.new("RGBA", img.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise LlavaError(f"cannot convert a mode {img.mode} image to RGB ({e})") from e


def _shortest_edge_hw(h: int, w: int, edge: int) -> tuple[int, int]:
    """transformers' get_resize_output_image_size(default_to_square=False): the long side truncates."""
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(edge * long / short)
    return (new_long, edge) if w <= h else (edge, new_long)


def _center_crop(x: torch.Tensor, ch: int, cw: int) -> torch.Tensor:
    """transformers' center_crop of (3, H, W): floor offsets; an image smaller than the crop is zero-padded."""
    _, h, w = x.shape
    top, left = (h - ch) // 2, (w - cw) // 2
    if top >= 0 and left >= 0:
        return x[:, top : top + ch, left : left + cw]
    nh, nw = max(ch, h), max(cw, w)
    pad_top, pad_left = -(-(nh - h) // 2), -(-(nw - w) // 2)  # ceil
    out = x.new_zeros(x.shape[0], nh, nw)
    out[:, pad_top : pad_top + h, pad_left : pad_left + w] = x
    top, left = top + pad_top, left + pad_left
    return out[:, max(0, top) : min(nh, top + ch), max(0, left) : min(nw, left + cw)]
