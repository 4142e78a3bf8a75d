"""ViP-LLaVA visual prompts: boxes, ellipses, arrows and points drawn on the image the way ViP-LLaVA was trained.

ViP-LLaVA (WisconsinAIVision/ViP-LLaVA, llava/visual_prompt_generator.py `image_blending`) draws each mark on a
transparent RGBA layer and alpha-composites it over the RGB image. Sizes scale with the image: a line is
max(int(3 * max(W, H) / anchor), 1) pixels wide, where the anchor is the vision tower's input size (336 for CLIP
ViT-L/14-336), and its CLI and evaluation scripts default to alpha 128 and width 3. A point is a filled dot of radius
8 * max(W, H) / anchor ("constant" style). An arrow is a shaft with a filled head whose two back corners sit 60
degrees either side of the shaft, as in its draw_arrow. Training randomised these sizes; the constant values are
what its evaluation and demo use.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageColor, ImageDraw

from .errors import LlavaError, UsageError

ANCHOR = 336  # ViP-LLaVA's image_size_anchor: the processor's crop size
WIDTH = 3  # line width at the anchor size (ViP-LLaVA's --width default and 'constant' rectangle style)
ALPHA = 128  # ViP-LLaVA's --alpha default, in its CLI and its evaluation
POINT_RADIUS = 8  # 'constant' style point radius at the anchor size
ARROW_HEAD = 0.35  # head size as a share of the arrow, at most 50 px at the anchor size (training: 0.2 to 0.5)
ARROW_HEAD_MIN = 6

# The colours ViP-LLaVA was trained with (its color_pool); other Pillow colour names and #rrggbb work too.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0), "lime": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
    "fuchsia": (255, 0, 255), "aqua": (0, 255, 255), "orange": (255, 165, 0), "purple": (128, 0, 128),
    "gold": (255, 215, 0),
}
SHAPES = {"box": 4, "ellipse": 4, "arrow": 4, "point": 2}  # shape -> how many numbers its coordinates take
_NUMBER = re.compile(r"^\s*[+-]?(\d+(\.\d*)?|\.\d+)\s*$")


class MarkError(UsageError):
    """A --box/--ellipse/--arrow/--point value that cannot be read."""


@dataclass(frozen=True)
class Mark:
    """One visual prompt: a shape, its coordinates (pixels, or fractions of the image size), a colour."""

    shape: str
    coords: tuple[float, ...]
    fractions: bool
    colour: tuple[int, int, int]
    text: str  # as the user wrote it, for error messages

    def pixels(self, size: tuple[int, int]) -> tuple[float, ...]:
        """The coordinates in pixels of an image of `size` (W, H), checked to lie on it."""
        w, h = size
        xy = [c * (w if i % 2 == 0 else h) for i, c in enumerate(self.coords)] if self.fractions else list(self.coords)
        if any(not 0 <= v <= (w if i % 2 == 0 else h) for i, v in enumerate(xy)):
            raise LlavaError(f"--{self.shape} {self.text} falls outside the {w}x{h} image")
        return tuple(xy)


def parse(shape: str, spec: str) -> Mark:
    """'x1,y1,x2,y2[:colour]' (or 'x,y[:colour]' for a point) -> a Mark.

    The numbers are fractions of the image's width and height when all lie in [0, 1] and one has a decimal point
    ('0.25,0.1,0.75,0.9'); otherwise they are pixels.
    """
    if shape not in SHAPES:
        raise MarkError(f"unknown mark {shape!r} (known: {', '.join(SHAPES)})")
    where, _, colour_name = spec.partition(":")
    parts = where.split(",")
    want = SHAPES[shape]
    form = "x,y" if want == 2 else "x1,y1,x2,y2"
    if len(parts) != want or not all(_NUMBER.match(p) for p in parts):
        raise MarkError(f"--{shape} {spec!r}: expected {form} in pixels or fractions, optionally :colour")
    coords = tuple(float(p) for p in parts)
    fractions = all(0 <= c <= 1 for c in coords) and any("." in p for p in parts)
    colour = _colour(colour_name.strip(), shape, spec) if colour_name.strip() else COLOURS["red"]
    if shape in ("box", "ellipse"):
        x1, y1, x2, y2 = coords
        if x1 == x2 or y1 == y2:
            raise MarkError(f"--{shape} {spec!r}: the {shape} has no area (x1 = x2 or y1 = y2)")
        coords = (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))
    if shape == "arrow" and coords[:2] == coords[2:]:
        raise MarkError(f"--arrow {spec!r}: the tail x1,y1 and the tip x2,y2 are the same point")
    return Mark(shape, coords, fractions, colour, spec)


def _colour(name: str, shape: str, spec: str) -> tuple[int, int, int]:
    if name.lower() in COLOURS:
        return COLOURS[name.lower()]
    try:
        return ImageColor.getrgb(name)[:3]
    except ValueError:
        raise MarkError(
            f"--{shape} {spec!r}: unknown colour {name!r} (ViP-LLaVA was trained on {', '.join(COLOURS)}; "
            "#rrggbb works too)"
        ) from None


def draw(image: Image.Image, marks: Sequence[Mark], anchor: int = ANCHOR, alpha: int = ALPHA) -> Image.Image:
    """The image in RGB with each mark alpha-blended on it in turn, sized for a vision tower of `anchor` pixels."""
    out = image.convert("RGB")
    if not marks:
        return out
    scale = max(out.size) / anchor
    width = max(int(WIDTH * scale), 1)
    boxes = [m.pixels(out.size) for m in marks]  # every mark checked before any is drawn
    out = out.convert("RGBA")
    for mark, xy in zip(marks, boxes):
        layer = Image.new("RGBA", out.size, (0, 0, 0, 0))
        pen = ImageDraw.Draw(layer)
        fill = (*mark.colour, alpha)
        if mark.shape == "box":
            pen.rectangle(xy, outline=fill, width=width)
        elif mark.shape == "ellipse":
            pen.ellipse(xy, outline=fill, width=width)
        elif mark.shape == "point":
            r = max(int(POINT_RADIUS * scale), 1)
            x, y = xy
            pen.ellipse((x - r, y - r, x + r, y + r), outline=fill, fill=fill)
        else:
            _arrow(pen, xy, fill, width, scale)
        out = Image.alpha_composite(out, layer)  # one layer per mark, as ViP-LLaVA blends each prompt
    return out.convert("RGB")


def _arrow(pen: ImageDraw.ImageDraw, xy: tuple[float, ...], fill, width: int, scale: float) -> None:
    """A shaft from the tail (x1, y1) to the tip (x2, y2) and a filled head at the tip."""
    tail_x, tail_y, tip_x, tip_y = xy
    length = math.hypot(tail_x - tip_x, tail_y - tip_y)
    angle = math.atan2(tail_y - tip_y, tail_x - tip_x)  # from the tip back along the shaft
    head = min(max(ARROW_HEAD * min(length, 50 * scale), ARROW_HEAD_MIN * scale), length)
    pen.line([(tail_x, tail_y), (tip_x, tip_y)], fill=fill, width=width)
    pen.polygon([
        (tip_x + head * math.cos(angle + math.pi / 3), tip_y + head * math.sin(angle + math.pi / 3)),
        (tip_x, tip_y),
        (tip_x + head * math.cos(angle - math.pi / 3), tip_y + head * math.sin(angle - math.pi / 3)),
    ], fill=fill)


def save(image: Image.Image, path: Path) -> None:
    """Write the marked image; the format follows the file's extension (PNG, JPEG, WebP, ...)."""
    try:
        image.save(path)
    except ValueError:  # Pillow: unknown extension
        raise LlavaError(f"cannot write '{path}': unknown image extension (use .png, .jpg or .webp)") from None
    except OSError as e:
        raise LlavaError(f"cannot write '{path}': {e.strerror or e}") from None
