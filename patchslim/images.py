"""Reading images people bring: any common format and size, refused clearly when it cannot be read.

``open_image`` returns an upright RGB (or L) PIL image or raises :class:`~patchslim.errors.ImageError`
with a sentence a person understands. Decompression bombs are refused by pixel count *before* decoding,
EXIF rotation is applied, animated images give their first frame, 16-bit and CMYK images are converted,
and transparency is flattened onto white. Strips longer than ``MAX_ASPECT_RATIO``:1 are refused too: a
model sees only a square from the centre of an image, and resizing such a strip to the model's short side
would blow it up to billions of pixels (a 1,000,000x1 PNG is a few kB). Formats the stack cannot decode
(SVG, HEIC) are named in the refusal, with what to do instead.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from patchslim.errors import ImageError

MAX_PIXELS = 50_000_000  # 50 megapixels: far above any photo a person uploads to a demo
MAX_BYTES = 50 * 1024 * 1024  # 50 MB per file (the app's upload limit is smaller: app/state.py MAX_UPLOAD_MB)
MAX_ASPECT_RATIO = 100  # longest side / shortest side

SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")


def open_image(source: str | Path | bytes | io.IOBase, max_pixels: int = MAX_PIXELS,
               max_bytes: int = MAX_BYTES) -> Image.Image:
    """Opens an image file, bytes or file object as an upright RGB or L image.

    Raises:
        ImageError: missing, empty, too large, not an image, truncated or an unsupported format.
    """
    name = str(source) if isinstance(source, (str, Path)) else "the file"
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
            raise ImageError(_too_many_bytes(str(path), size, max_bytes))
        data = path.read_bytes()
    elif isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    else:
        data = source.read()
    if not data:
        raise ImageError(f"{name} is empty (0 bytes)")
    if len(data) > max_bytes:
        raise ImageError(_too_many_bytes(name, len(data), max_bytes))
    try:
        with warnings.catch_warnings():
            # PIL warns above 89 MP; the pixel count is checked just below with a clearer message. (Threads
            # entering this block at once can at worst leave this one filter in place: harmless.)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                fmt = probe.format
                width, height = probe.size
    except UnidentifiedImageError:
        raise ImageError(_unreadable(name, data)) from None
    except Image.DecompressionBombError:
        raise ImageError(
            f"{name} has more than {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} million pixels, too many to decode "
            f"safely; images up to {max_pixels / 1e6:.0f} MP are accepted"
        ) from None
    except Exception as exc:  # PIL raises many types on malformed headers
        raise ImageError(f"{name} is damaged or truncated: its header cannot be read ({exc})") from None
    if width < 1 or height < 1:
        raise ImageError(f"{name} has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(
            f"{name} is {width}x{height} pixels ({width * height / 1e6:.0f} MP); "
            f"images up to {max_pixels / 1e6:.0f} MP are accepted"
        )
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageError(
            f"{name} is {width}x{height} pixels, a strip {max(width, height) / min(width, height):.0f} times "
            f"longer than it is wide; the model would see only a {min(width, height)}-pixel square from its "
            f"centre. Crop it to at most {MAX_ASPECT_RATIO}:1 first"
        )
    try:
        image = Image.open(io.BytesIO(data))
        image.seek(0)  # first frame of an animation
        image.load()
        image = ImageOps.exif_transpose(image)
    except Image.DecompressionBombError:
        raise ImageError(f"{name} is too large to decode safely") from None
    except MemoryError:
        raise ImageError(f"{name} needs more memory to decode than this machine has free") from None
    except Exception as exc:  # truncated data, bad EXIF, broken palettes: PIL raises many types
        raise ImageError(f"{name} is damaged or truncated and cannot be decoded ({fmt}: {exc})") from None
    return to_display_mode(image)


def _too_many_bytes(name: str, size: int, max_bytes: int) -> str:
    mib = 1024 * 1024
    return f"{name} is {size / mib:.1f} MB; files up to {max_bytes / mib:.0f} MB are accepted"


def _unreadable(name: str, data: bytes) -> str:
    """Why PIL could not identify ``data``, naming the formats people most often try (SVG, HEIC, PDF)."""
    head = data[:1024].lstrip().lower()
    supported = f"supported: {', '.join(SUPPORTED_FORMATS)}"
    if head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in head):
        return (f"{name} is an SVG drawing (vector graphics), not an image this tool can read; export it as PNG "
                f"({supported})")
    if data[4:8] == b"ftyp" and data[8:12] in (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1",
                                                  b"avif", b"avis"):
        kind = "AVIF" if data[8:12] in (b"avif", b"avis") else "HEIC/HEIF"
        return (f"{name} is a {kind} photo, not an image this tool can read; save it as JPEG or PNG "
                f"({supported})")
    if head.startswith(b"%pdf"):
        return f"{name} is a PDF document, not an image this tool can read; export the page as PNG ({supported})"
    return f"{name} is not an image this tool can read ({supported})"


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
