"""Reading images people bring: any common format and size, refused clearly when it cannot be read.

``open_image`` returns an upright RGB (or L) PIL image or raises :class:`~patchslim.errors.ImageError`
with a sentence a person understands. Decompression bombs are refused by pixel count *before* decoding,
EXIF rotation is applied, animated images give their first frame, 16-bit and CMYK images are converted,
and transparency is flattened onto white.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from patchslim.errors import ImageError

MAX_PIXELS = 50_000_000  # 50 megapixels: far above any photo a person uploads to a demo
MAX_BYTES = 50 * 1024 * 1024  # 50 MB per file

SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")


def open_image(source: str | Path | bytes | io.IOBase, max_pixels: int = MAX_PIXELS,
               max_bytes: int = MAX_BYTES) -> Image.Image:
    """Opens an image file, bytes or file object as an upright RGB or L image.

    Raises:
        ImageError: missing, empty, too large, not an image, truncated or an unsupported format.
    """
    name = str(source) if isinstance(source, (str, Path)) else "the image"
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise ImageError(f"{path} does not exist")
        if path.is_dir():
            raise ImageError(f"{path} is a folder, not an image")
        size = path.stat().st_size
        if size == 0:
            raise ImageError(f"{path} is empty (0 bytes)")
        if size > max_bytes:
            raise ImageError(f"{path} is {size / 1e6:.0f} MB; images up to {max_bytes / 1e6:.0f} MB are accepted")
        data = path.read_bytes()
    elif isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    else:
        data = source.read()
    if not data:
        raise ImageError(f"{name} is empty (0 bytes)")
    if len(data) > max_bytes:
        raise ImageError(f"{name} is {len(data) / 1e6:.0f} MB; images up to {max_bytes / 1e6:.0f} MB are accepted")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            fmt = probe.format
            width, height = probe.size
    except UnidentifiedImageError:
        raise ImageError(
            f"{name} is not an image this tool can read (supported: {', '.join(SUPPORTED_FORMATS)})"
        ) from None
    except Image.DecompressionBombError:
        raise ImageError(f"{name} is too large to decode safely") from None
    except Exception as exc:  # PIL raises many types on malformed headers
        raise ImageError(f"{name} could not be read: {exc}") from None
    if width * height > max_pixels:
        raise ImageError(
            f"{name} is {width}x{height} pixels ({width * height / 1e6:.0f} MP); "
            f"images up to {max_pixels / 1e6:.0f} MP are accepted"
        )
    if width < 1 or height < 1:
        raise ImageError(f"{name} has no pixels ({width}x{height})")
    try:
        image = Image.open(io.BytesIO(data))
        image.seek(0)  # first frame of an animation
        image.load()
        image = ImageOps.exif_transpose(image)
    except Image.DecompressionBombError:
        raise ImageError(f"{name} is too large to decode safely") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{name} is damaged or truncated and cannot be decoded ({fmt}: {exc})") from None
    return to_display_mode(image)


def to_display_mode(image: Image.Image) -> Image.Image:
    """RGB for colour images, L for grayscale; transparency flattened onto white; 16-bit scaled to 8."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        import numpy as np

        arr = np.asarray(image, dtype=np.float64)
        hi = arr.max() if arr.size else 1.0
        scale = 255.0 / (65535.0 if hi > 255 else max(hi, 1.0))
        return Image.fromarray(np.clip(arr * scale, 0, 255).astype("uint8"), "L")
    if mode == "F":
        import numpy as np

        arr = np.asarray(image, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else arr * 0
        return Image.fromarray(arr.astype("uint8"), "L")
    if mode in ("1", "L"):
        return image.convert("L")
    if mode == "P" or mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")
