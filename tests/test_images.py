"""Reading images: formats, orientation, and clear refusals (the corpus is built here, no fixtures)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from patchslim.errors import ImageError
from patchslim.images import open_image


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def gradient(w: int = 64, h: int = 48) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.uint8)[None, :].repeat(h, 0)
    return Image.fromarray(np.stack([x, x[::-1], np.full_like(x, 90)], -1))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"])
def test_common_formats_open_as_rgb(fmt):
    image = open_image(encode(gradient(), fmt))
    assert image.mode == "RGB" and image.size == (64, 48)


def test_exif_rotation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image = open_image(encode(gradient(64, 48), "JPEG", exif=exif))
    assert image.size == (48, 64)


def test_transparency_and_grayscale_and_16_bit():
    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    assert open_image(encode(rgba, "PNG")).getpixel((0, 0)) == (255, 255, 255)
    assert open_image(encode(Image.new("L", (10, 10), 80), "PNG")).mode == "L"
    deep = Image.fromarray(np.full((8, 8), 65535, np.uint16))
    converted = open_image(encode(deep, "PNG"))
    assert converted.mode == "L" and converted.getpixel((0, 0)) == 255


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    data = io.BytesIO()
    frames[0].save(data, "GIF", save_all=True, append_images=frames[1:])
    r, g, b = open_image(data.getvalue()).getpixel((0, 0))
    assert r > 200 and b < 50


@pytest.mark.parametrize("data, message", [
    (b"", "empty"),
    (b"just some text, not an image", "not an image"),
    (b"<svg xmlns='http://www.w3.org/2000/svg'></svg>", "not an image"),
])
def test_unreadable_inputs_are_refused(data, message):
    with pytest.raises(ImageError, match=message):
        open_image(data)


def test_truncated_jpeg_is_refused():
    data = encode(gradient(256, 256), "JPEG")
    with pytest.raises(ImageError, match="damaged or truncated"):
        open_image(data[: len(data) // 3])


def test_decompression_bomb_is_refused_before_decoding():
    data = encode(Image.new("L", (12000, 12000)), "PNG")  # 144 MP, a few hundred kB
    assert len(data) < 2_000_000
    with pytest.raises(ImageError, match="12000x12000 pixels"):
        open_image(data)
