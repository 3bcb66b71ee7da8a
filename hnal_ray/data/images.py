"""Encoded image bytes in, RGB pixels out: decoding any format Pillow reads, EXIF orientation, alpha on
white, the encoders' resize-and-centre-crop, and small PNG thumbnails for people to look at."""
from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps

# A decompression bomb is an unreadable image to us, not a crash; 180 MP covers real photographs.
Image.MAX_IMAGE_PIXELS = 180_000_000


class ImageError(ValueError):
    """Bytes that Pillow cannot decode into an image."""


def open_rgb(data: bytes) -> Image.Image:
    """Encoded bytes -> upright RGB image: EXIF orientation applied, transparency composited on white.

    Decodes the whole image (a truncated file fails here, not later); raises ImageError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                im = ImageOps.exif_transpose(im)
                if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16/32-bit greyscale
                    im = im.point(lambda v: v / 256).convert("L") if im.mode != "F" else im.convert("L")
                rgba = im.convert("RGBA")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"not a readable image ({exc.__class__.__name__}: {exc})") from None
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def resize_center_crop(image: Image.Image, size: int, crop_pct: float = 1.0) -> Image.Image:
    """Resize (bicubic) so the shorter side is round(size / crop_pct), then cut the central size x size.

    crop_pct=1.0 keeps the whole shorter side (a square image is just resized); 0.875 is the
    classic ImageNet evaluation crop (shorter side 256 for 224)."""
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    w, h = image.size
    short = round(size / crop_pct)
    nw, nh = (short, max(short, round(h * short / w))) if w <= h else (max(short, round(w * short / h)), short)
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    if (nw, nh) != (size, size):
        image = image.crop((left, top, left + size, top + size))
    return image


def thumbnail_png(data: bytes, size: int = 128) -> bytes:
    """A PNG of at most size x size pixels (aspect kept) of encoded image bytes."""
    image = open_rgb(data)
    image.thumbnail((size, size), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return buf.getvalue()
