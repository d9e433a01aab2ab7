"""Bad and unusual images through every door: the engine, the CLI and the app.

The corpus is built here (no binary fixtures): empty, truncated, mislabelled, bombs, extreme shapes, unusual
modes, transparency, animation, EXIF rotation, and formats the stack cannot decode. Every case either works
(and the test checks the pixels came out right) or is refused with :class:`~patchslim.errors.ImageError`
carrying a sentence a person understands; the CLI then prints one ``error:`` line and exits non-zero, and the
app shows the message and goes on to the next image.
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

import patchslim
from patchslim import bundled, cli
from patchslim.errors import ImageError
from patchslim.images import open_image

REPO = Path(__file__).resolve().parent.parent

RED, GREEN, BLUE, WHITE = (230, 20, 20), (20, 200, 40), (20, 40, 230), (255, 255, 255)


# --------------------------------------------------------------------------- building the corpus

def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def quadrants(width: int = 64, height: int = 48) -> Image.Image:
    """Red, green / blue, white quadrants: any rotation or flip moves a colour to another corner."""
    array = np.zeros((height, width, 3), np.uint8)
    array[: height // 2, : width // 2] = RED
    array[: height // 2, width // 2:] = GREEN
    array[height // 2:, : width // 2] = BLUE
    array[height // 2:, width // 2:] = WHITE
    return Image.fromarray(array)


def png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def png_bomb(width: int, height: int, rows: int | None = None) -> bytes:
    """A valid 8-bit grayscale PNG of zeros, compressed row by row (``rows``: only that many rows of data).

    8000x8000 decodes to 64 MB from a file of about 64 kB; nothing large is ever held while building it.
    """
    compressor = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte + pixels
    idat = b"".join(compressor.compress(row) for _ in range(height if rows is None else rows))
    idat += compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat)
            + png_chunk(b"IEND", b""))


def exif_rotated_jpeg() -> bytes:
    """The quadrants stored turned on their side, with EXIF orientation 6 ("rotate 90 degrees clockwise")."""
    stored = quadrants().transpose(Image.Transpose.ROTATE_90)  # counter-clockwise: the camera held sideways
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(stored, "JPEG", exif=exif, quality=95)


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (16, 16), colour) for colour in (RED, BLUE, GREEN)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


def palette_with_transparency() -> bytes:
    image = Image.new("P", (20, 20), 0)
    image.putpalette(list(RED) + list(BLUE) + [0] * (256 * 3 - 6))
    image.paste(1, (10, 0, 20, 20))  # right half uses the transparent index 1
    return encode(image, "PNG", transparency=1)


def rgba_with_transparency() -> bytes:
    array = np.zeros((20, 20, 4), np.uint8)
    array[:, :10] = (*RED, 255)  # opaque left half
    array[:, 10:] = (*BLUE, 0)  # fully transparent right half
    return encode(Image.fromarray(array, "RGBA"), "PNG")


def sixteen_bit_png() -> bytes:
    ramp = np.linspace(0, 65535, 64, dtype=np.uint16)[None, :].repeat(32, 0)
    return encode(Image.fromarray(ramp), "PNG")


def cmyk_jpeg() -> bytes:
    array = np.zeros((24, 32, 4), np.uint8)
    array[:, :16] = (0, 255, 255, 0)  # cyan+yellow ink: red
    array[:, 16:] = (255, 255, 0, 0)  # cyan+magenta ink: blue
    return encode(Image.fromarray(array, "CMYK"), "JPEG", quality=95)


def truncated_jpeg() -> bytes:
    data = encode(quadrants(256, 256), "JPEG")
    return data[: len(data) // 3]


def fake_heic() -> bytes:
    """The first bytes of an iPhone photo (an ISO-BMFF ``ftyp`` box of brand heic) and nothing decodable."""
    ftyp = struct.pack(">I", 24) + b"ftyp" + b"heic" + struct.pack(">I", 0) + b"mif1heic"
    return ftyp + struct.pack(">I", 16) + b"meta" + bytes(8) + os.urandom(256)


SVG = (b'<?xml version="1.0" encoding="UTF-8"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="100" '
       b'height="100"><circle cx="50" cy="50" r="40" fill="red"/></svg>\n')


# --------------------------------------------------------------------------- what each case must give

def check_upright(image: Image.Image) -> None:
    """The EXIF-rotated JPEG opens as the quadrants the camera saw (JPEG noise allowed)."""
    assert image.size == (64, 48), "EXIF orientation 6 not applied: width and height not swapped back"
    expected = np.asarray(quadrants(), np.float64)
    assert np.abs(np.asarray(image, np.float64) - expected).mean() < 12


def check_colours(*corners: tuple[tuple[int, int], tuple[int, int, int]], tolerance: int = 30):
    def check(image: Image.Image) -> None:
        assert image.mode == "RGB"
        for xy, colour in corners:
            assert np.abs(np.subtract(image.getpixel(xy), colour)).max() <= tolerance, (xy, image.getpixel(xy))
    return check


def check_16_bit(image: Image.Image) -> None:
    assert image.mode == "L" and image.size == (64, 32)
    row = np.asarray(image)[0].astype(int)
    assert row[0] == 0 and row[-1] == 255 and np.all(np.diff(row) >= 0), "16-bit ramp not scaled to 0..255"


def check_gray(image: Image.Image) -> None:
    assert image.mode == "L" and image.getpixel((0, 0)) == 77


def check_one_pixel(image: Image.Image) -> None:
    assert image.size == (1, 1) and image.getpixel((0, 0)) == (10, 20, 30)


def check_png_named_jpeg(image: Image.Image) -> None:
    assert image.size == (64, 48) and image.getpixel((0, 0)) == RED


@dataclass(frozen=True)
class Case:
    """One input: its file name and bytes, and either a check of the opened image or the refusal's words."""

    name: str
    filename: str
    make: Callable[[], bytes]
    check: Callable[[Image.Image], None] | None = None
    refusal: str | None = None  # a regular expression the ImageError message must match

    @property
    def accepted(self) -> bool:
        return self.refusal is None


CASES = [
    Case("zero-byte file", "empty.jpg", lambda: b"", refusal=r"empty \(0 bytes\)"),
    Case("truncated JPEG", "cut.jpg", truncated_jpeg, refusal=r"damaged or truncated"),
    Case("text file named .png", "notes.png", lambda: b"shopping list: milk, eggs\n" * 5,
         refusal=r"not an image this tool can read \(supported: JPEG, PNG"),
    Case("decompression bomb 8000x8000 (64 MP in ~64 kB)", "bomb.png", lambda: png_bomb(8000, 8000),
         refusal=r"8000x8000 pixels \(64 MP\); images up to \d+ MP are accepted"),
    Case("decompression bomb 100000x100000 header", "huge.png", lambda: png_bomb(100_000, 100_000, rows=4),
         refusal=r"more than \d+ million pixels, too many to decode safely"),
    Case("1x1 image", "dot.png", lambda: encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"),
         check=check_one_pixel),
    Case("20000x10 panorama", "strip.png", lambda: encode(Image.new("RGB", (20000, 10), GREEN), "PNG"),
         refusal=r"20000x10 pixels, a strip 2000 times longer than it is wide.*Crop it to at most 100:1"),
    Case("1000000x1 needle (resize would need 62 billion pixels)", "needle.png",
         lambda: png_bomb(1_000_000, 1), refusal=r"1000000x1 pixels, a strip"),
    Case("16-bit PNG", "deep.png", sixteen_bit_png, check=check_16_bit),
    Case("CMYK JPEG", "print.jpg", cmyk_jpeg, check=check_colours(((2, 2), (255, 0, 0)), ((30, 20), (0, 0, 255)))),
    Case("RGBA PNG with transparency", "cutout.png", rgba_with_transparency,
         check=check_colours(((2, 2), RED), ((15, 15), WHITE), tolerance=0)),
    Case("palette PNG with a transparent index", "palette.png", palette_with_transparency,
         check=check_colours(((2, 2), RED), ((15, 15), WHITE), tolerance=0)),
    Case("animated GIF (3 frames)", "anim.gif", animated_gif, check=check_colours(((8, 8), RED))),
    Case("EXIF-rotated JPEG (orientation 6)", "sideways.jpg", exif_rotated_jpeg, check=check_upright),
    Case("grayscale PNG", "gray.png", lambda: encode(Image.new("L", (40, 30), 77), "PNG"), check=check_gray),
    Case("PNG named .jpg", "really_png.jpg", lambda: encode(quadrants(), "PNG"), check=check_png_named_jpeg),
    Case("SVG drawing", "logo.svg", lambda: SVG, refusal=r"SVG drawing .*not an image this tool can read.*PNG"),
    Case("fake HEIC (iPhone photo header)", "IMG_0001.heic", fake_heic,
         refusal=r"HEIC/HEIF photo, not an image this tool can read; save it as JPEG or PNG"),
]
IDS = [case.filename for case in CASES]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, tuple[Path, bytes]]:
    """Every case written to a file once: ``filename -> (path, bytes)``."""
    folder = tmp_path_factory.mktemp("bad_inputs")
    files = {}
    for case in CASES:
        data = case.make()
        path = folder / case.filename
        path.write_bytes(data)
        files[case.filename] = (path, data)
    return files


# --------------------------------------------------------------------------- the engine

@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_engine_opens_or_refuses_clearly(case, corpus, fashion_random):
    model = fashion_random  # the tests need its input pipeline, not its accuracy
    path, data = corpus[case.filename]
    if not case.accepted:
        with pytest.raises(ImageError, match=case.refusal) as refused:
            open_image(path)
        message = str(refused.value)
        assert "\n" not in message and "Traceback" not in message and len(message) < 400
        with pytest.raises(ImageError, match=case.refusal):
            open_image(data)  # the same from bytes (the app's path)
        return
    image = open_image(path)
    case.check(image)
    case.check(open_image(data))
    trace = patchslim.run(model, image, patchslim.SlimPlan.single("tome", 0.5))
    assert trace.logits.shape == (1, len(model.class_names))
    assert torch.isfinite(trace.logits).all()


@pytest.mark.parametrize("width, height", [(8000, 8000), (100_000, 100_000), (1_000_000, 1)])
def test_bombs_are_refused_from_the_header_without_decoding(width, height, monkeypatch):
    data = png_bomb(width, height, rows=None if width * height <= 64_000_000 else 4)
    assert len(data) < 200_000  # tiny file, huge image
    decoded = []
    original_load = ImageFile.ImageFile.load

    def spy(self):
        decoded.append(self.size)
        return original_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    start = time.perf_counter()
    with pytest.raises(ImageError, match="pixels"):
        open_image(data)
    assert decoded == [], "the image was decoded before being refused"
    assert time.perf_counter() - start < 2.0


def test_exif_rotated_photo_is_classified_upright(corpus, fashion_random):
    model = fashion_random
    """The model sees the upright picture: its input and logits match the upright image, not the stored one."""
    _, data = corpus["sideways.jpg"]
    opened = open_image(data)
    upright = quadrants()
    stored = Image.open(io.BytesIO(data)).convert("RGB")  # what a reader ignoring EXIF would give
    assert stored.size == (48, 64)
    x_opened, x_upright, x_stored = (model.preprocess(im) for im in (opened, upright, stored))
    assert (x_opened - x_upright).abs().mean() < 0.2 * (x_opened - x_stored).abs().mean()
    logits = {name: patchslim.run(model, im).logits for name, im in
              (("opened", opened), ("upright", upright), ("stored", stored))}
    assert (logits["opened"] - logits["upright"]).norm() < (logits["opened"] - logits["stored"]).norm()


def test_limits_are_parameters(corpus):
    _, data = corpus["dot.png"]
    with pytest.raises(ImageError, match="files up to 0 MB"):
        open_image(data, max_bytes=10)
    with pytest.raises(ImageError, match="images up to 0 MP"):
        open_image(encode(Image.new("RGB", (40, 40)), "PNG"), max_pixels=100)


# --------------------------------------------------------------------------- the CLI

def cli_run(path: Path) -> list[str]:
    return ["run", "--model", bundled.BUNDLED_NAME, "--no-pretrained", "--device", "cpu", "--method", "tome",
            "--keep", "0.5", "--repeats", "0", "--json", "--image", str(path)]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_cli_runs_or_exits_with_one_line(case, corpus, capsys):
    path, _ = corpus[case.filename]
    code = cli.main(cli_run(path))
    out, err = capsys.readouterr()
    if case.accepted:
        assert code == 0, err
        result = json.loads(out)
        assert result["tokens_per_block"][-1] < result["baseline_tokens_per_block"][-1]  # it was slimmed
        assert len(result["top5"]) == 5
        return
    assert code != 0 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    assert path.name in lines[0]
    assert re.search(case.refusal, lines[0]), lines[0]


def test_cli_process_prints_one_line_and_no_traceback(corpus):
    """The real ``python -m patchslim`` process, for the worst cases: a bomb and a truncated JPEG."""
    for filename in ("huge.png", "cut.jpg"):
        path, _ = corpus[filename]
        done = subprocess.run([sys.executable, "-m", "patchslim", *cli_run(path)], cwd=REPO, capture_output=True,
                              text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        assert done.returncode == 2, done.stderr
        assert done.stdout == ""
        assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: "), done.stderr
        assert "Traceback" not in done.stderr


# --------------------------------------------------------------------------- the app

def test_app_shows_each_refusal_and_stays_usable(corpus):
    """One session uploads every case in turn, each refusal followed by a good photo: no exception ever reaches
    the page, refusals are shown as one error naming the reason, and the next image is explored normally.

    Streamlit itself refuses a name outside ``UPLOAD_TYPES`` (``.svg``, ``.heic``): the browser's picker and
    drop zone reject it before anything is sent. Such files are uploaded here renamed to ``.png``, as a person
    would do, so the content check (not the name) is what refuses them.
    """
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(REPO / "app" / "main.py"), default_timeout=180).run()
    at.selectbox(key="model_name").set_value(bundled.BUNDLED_NAME).run()
    at.radio(key="image_source").set_value("Upload").run()
    good = encode(quadrants(), "JPEG")

    def upload(filename: str, data: bytes) -> None:
        at.file_uploader(key="uploader").upload(filename, data, "application/octet-stream").run()
        assert not at.exception, [e.value for e in at.exception]

    def explored() -> bool:
        return any(m.label == "Tokens in last block" and m.value for m in at.metric)

    from app.widgets import UPLOAD_TYPES

    outcomes = {}
    for case in CASES:
        _, data = corpus[case.filename]
        filename = case.filename
        if Path(filename).suffix.lstrip(".") not in UPLOAD_TYPES:
            # the browser's picker refuses .svg/.heic by name before sending; a renamed file gets through
            filename = f"{filename}.png"
        upload(filename, data)
        errors = [e.value for e in at.error]
        if case.accepted:
            assert not errors, (case.name, errors)
            assert explored(), case.name
            outcomes[case.filename] = "explored"
        else:
            refusals = [e for e in errors if e.startswith("This file cannot be used:")]
            assert len(refusals) == 1 and re.search(case.refusal, refusals[0]), (case.name, errors)
            assert "Traceback" not in refusals[0]
            assert not explored()
            outcomes[case.filename] = "refused"
            upload(f"next_after_{case.filename}.jpg", good)
            assert not at.error and explored(), f"the app did not recover after {case.name}"
    assert sorted(outcomes.values()).count("refused") == sum(not c.accepted for c in CASES)


def test_app_decodes_the_exif_rotated_upload_upright(corpus):
    """The app's own upload path (``state.decoded_upload``) gives the upright pixels it displays and runs."""
    pytest.importorskip("streamlit")
    from app import state

    _, data = corpus["sideways.jpg"]
    check_upright(state.decoded_upload(state.image_key(data), data))
