"""Decoding user images: EXIF orientation, odd modes, corrupt files, resize + centre crop (no squashing)."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from hnal_ray.data.encoders import IMAGE_SIZE, preprocess_image
from hnal_ray.data.images import ImageError, open_rgb, resize_center_crop, thumbnail_png


def encoded(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def left_red_right_blue(w: int, h: int) -> Image.Image:
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = (255, 0, 0)
    a[:, w // 2:] = (0, 0, 255)
    return Image.fromarray(a)


def test_wide_image_is_centre_cropped_not_squashed():
    # 3:1 image with a green centre third: after resize + crop only the green third remains
    a = np.zeros((100, 300, 3), np.uint8)
    a[:, :100], a[:, 100:200], a[:, 200:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    out = resize_center_crop(Image.fromarray(a), IMAGE_SIZE)
    assert out.size == (IMAGE_SIZE, IMAGE_SIZE)
    px = np.asarray(out).astype(int)
    assert (np.abs(px[:, 8:-8] - (0, 255, 0)).max(axis=-1) < 40).all()
    tall = resize_center_crop(Image.fromarray(a.transpose(1, 0, 2).copy()), 64)
    assert tall.size == (64, 64) and np.asarray(tall)[32, 32, 1] > 200


def test_square_image_is_only_resized_and_crop_pct_cuts_the_border():
    img = left_red_right_blue(72, 72)
    direct = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
    assert np.array_equal(np.asarray(resize_center_crop(img, IMAGE_SIZE)), np.asarray(direct))
    framed = np.zeros((256, 256, 3), np.uint8)
    framed[16:-16, 16:-16] = 255
    cropped = np.asarray(resize_center_crop(Image.fromarray(framed), 224, crop_pct=0.875))
    assert cropped.shape == (224, 224, 3) and cropped.min() == 255  # the 16-px black frame is cut off


def test_exif_orientation_is_applied():
    img = left_red_right_blue(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    rgb = open_rgb(encoded(img, "JPEG", exif=exif.tobytes(), quality=95))
    assert rgb.size == (20, 40)
    px = np.asarray(rgb).astype(int)
    assert px[2, 10, 0] > 200 and px[-3, 10, 2] > 200  # red on top, blue at the bottom


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "1"])
def test_any_mode_becomes_rgb(mode):
    img = Image.new("RGB", (30, 20), (10, 200, 30)).convert(mode)
    fmt = "TIFF" if mode in ("CMYK", "I;16") else "PNG"
    rgb = open_rgb(encoded(img, fmt))
    assert rgb.mode == "RGB" and rgb.size == (30, 20)


def test_transparent_pixels_become_white():
    px = np.asarray(open_rgb(encoded(Image.new("RGBA", (8, 8), (0, 0, 0, 0)))))
    assert (px == 255).all()


@pytest.mark.parametrize("data", [b"", b"not an image", None])
def test_corrupt_bytes_raise_image_error(data):
    if data is None:  # a JPEG cut in half
        data = encoded(left_red_right_blue(200, 200), "JPEG")[:300]
    with pytest.raises(ImageError, match="not a readable image"):
        open_rgb(data)


def test_preprocess_image_of_a_jpeg_photo_shape():
    x = preprocess_image(encoded(left_red_right_blue(640, 480), "JPEG"))
    assert x.shape == (3, IMAGE_SIZE, IMAGE_SIZE) and x.dtype == torch.float32


def test_thumbnail_keeps_aspect():
    with Image.open(io.BytesIO(thumbnail_png(encoded(left_red_right_blue(400, 100)), 128))) as im:
        assert im.size == (128, 32) and im.format == "PNG"
