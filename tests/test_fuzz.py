"""Hostile files for data.load_rgb: a DataError naming the file every time, nothing else, no hang.

Every input is a few KB at most, so each call is fast by construction (no timeouts needed); the
huge-image cases check that the size limit fires before any pixel memory is allocated.
"""

import io
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from visinspect.data.samples import MAX_PIXELS, load_rgb
from visinspect.errors import DataError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SIGNATURES = {
    "png": PNG_SIGNATURE,
    "jpeg": b"\xff\xd8\xff\xe0",
    "gif": b"GIF89a",
    "bmp": b"BM",
    "tiff_le": b"II*\x00",
    "tiff_be": b"MM\x00*",
    "webp": b"RIFF\x00\x00\x00\x00WEBP",
}
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
# Mutated files make PIL warn (bad EXIF, bomb sizes, NaN casts): noise here, not failures.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_with_header(width: int, height: int, bit_depth: int = 8, color_type: int = 2) -> bytes:
    """A PNG whose IHDR claims width x height (valid CRCs) with almost no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    chunks = png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    return PNG_SIGNATURE + chunks


def encoded(fmt: str, mode: str = "RGB", size: tuple[int, int] = (20, 24)) -> bytes:
    """Noise (so that the pixel data is most of the file) encoded in a format and mode."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), np.uint8))
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, (size[1], size[0])).astype(np.uint16))
    else:
        image = rgb.convert(mode)
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


VALID = {
    "png": encoded("PNG"),
    "png_16bit": encoded("PNG", "I;16"),
    "png_palette": encoded("PNG", "P"),
    "png_rgba": encoded("PNG", "RGBA"),
    "jpeg": encoded("JPEG"),
    "jpeg_cmyk": encoded("JPEG", "CMYK"),
    "bmp": encoded("BMP"),
    "tiff": encoded("TIFF"),
    "tiff_16bit": encoded("TIFF", "I;16"),
    "gif": encoded("GIF", "P"),
}


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


def check(path: Path, data: bytes) -> np.ndarray | None:
    """Write `data` to `path` and read it: an RGB image or a DataError naming the file."""
    path.write_bytes(data)
    try:
        image = load_rgb(path)
    except DataError as e:
        assert str(path) in str(e)
        return None
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert image.shape[0] * image.shape[1] <= MAX_PIXELS
    return image


# ----------------------------------------------------------------------------- random bytes


@FUZZ
@given(data=st.binary(max_size=4096))
def test_random_bytes(workdir, data):
    check(workdir / "random.png", data)


@FUZZ
@given(signature=st.sampled_from(sorted(SIGNATURES)), tail=st.binary(max_size=2048))
def test_valid_signature_then_garbage(workdir, signature, tail):
    check(workdir / f"garbage.{signature}", SIGNATURES[signature] + tail)


@FUZZ
@given(
    name=st.sampled_from(sorted(VALID)),
    edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), max_size=12),
    keep=st.floats(0, 1),
)
def test_mutated_valid_images(workdir, name, edits, keep):
    """Valid files with some bytes overwritten and the end cut off at a random point."""
    data = bytearray(VALID[name])
    for where, value in edits:
        data[int(where * len(data))] = value
    check(workdir / f"mutated_{name}", bytes(data[: max(1, round(keep * len(data)))]))


@FUZZ
@given(width=st.integers(0, 2**31 - 1), height=st.integers(0, 2**31 - 1),
       depth=st.sampled_from([1, 2, 4, 8, 16, 3, 0]), color=st.sampled_from([0, 2, 3, 4, 6, 1, 7]))
def test_png_header_fields(workdir, width, height, depth, color):
    """Any IHDR (zero, absurd or huge sizes; invalid depth/colour combinations)."""
    image = check(workdir / "header.png", png_with_header(width, height, depth, color))
    if image is not None:  # only a small, valid header can decode
        assert image.shape[:2] == (height, width)


# ----------------------------------------------------------------------------- named cases


def _jpeg_sof(data: bytes) -> int:
    """Offset of the baseline start-of-frame marker (FF C0) in a JPEG."""
    i = data.find(b"\xff\xc0")
    assert i > 0
    return i


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(PNG_SIGNATURE, id="png-signature-only"),
        pytest.param(VALID["png"][:20], id="png-truncated-ihdr"),
        pytest.param(png_with_header(0, 0), id="png-zero-size"),
        pytest.param(png_with_header(0, 16), id="png-zero-width"),
        pytest.param(png_with_header(16, 16, bit_depth=5), id="png-bad-bit-depth"),
        pytest.param(png_with_header(16, 16), id="png-missing-pixel-data"),
        pytest.param(VALID["jpeg"][: _jpeg_sof(VALID["jpeg"]) + 6], id="jpeg-cut-in-sof"),
        pytest.param((lambda d, i: d[: i + 5] + b"\x00\x00\x00\x00" + d[i + 9 :])(
            VALID["jpeg"], _jpeg_sof(VALID["jpeg"])), id="jpeg-sof-zero-size"),
        pytest.param((lambda d, i: d[: i + 9] + b"\x09" + d[i + 10 :])(
            VALID["jpeg"], _jpeg_sof(VALID["jpeg"])), id="jpeg-sof-nine-components"),
        pytest.param(VALID["jpeg"][: len(VALID["jpeg"]) // 2], id="jpeg-truncated"),
        pytest.param(b"not an image at all\n" * 10, id="text"),
    ],
)
def test_broken_files_raise_data_error(tmp_path, data):
    path = tmp_path / "broken image.png"
    assert check(path, data) is None


def test_png_truncated_inside_pixel_data(tmp_path):
    """Cut a valid PNG at several offsets inside its pixel data (IDAT): every cut is an error.

    (Cutting only zlib's final checksum bytes still yields every pixel, which PIL accepts.)
    """
    data = VALID["png"]
    start = data.index(b"IDAT") + 4
    end = start + struct.unpack(">I", data[start - 8 : start - 4])[0]
    for offset in np.linspace(start, end - 16, 8).astype(int):
        assert check(tmp_path / f"cut_{offset}.png", data[:offset]) is None, offset


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_rgb(tmp_path / "nope.png")
    folder = tmp_path / "folder.png"
    folder.mkdir()
    with pytest.raises(DataError, match=r"folder\.png"):
        load_rgb(folder)


@pytest.mark.parametrize("name", sorted(VALID))
def test_valid_odd_modes_convert_to_rgb(tmp_path, name):
    image = check(tmp_path / f"ok_{name}", VALID[name])
    assert image is not None and image.shape == (24, 20, 3)


# ----------------------------------------------------------------------------- huge images


@pytest.fixture
def no_decoding(monkeypatch):
    """Make any pixel decoding fail the test: a huge image must be refused from its header."""

    def refuse(self):
        raise AssertionError(f"decoded the pixels of a {self.size} image")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


@pytest.mark.parametrize("pil_guard", [True, False], ids=["pil-guard", "no-pil-guard"])
@pytest.mark.parametrize("side", [20_000, int(MAX_PIXELS**0.5) + 1])
def test_huge_image_refused_before_decoding(tmp_path, monkeypatch, no_decoding, pil_guard, side):
    """20k x 20k (over PIL's own bomb guard) and just over MAX_PIXELS (under it): both refused
    from the header alone, also when a user switched PIL's guard off."""
    if not pil_guard:
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    path = tmp_path / "huge.png"
    path.write_bytes(png_with_header(side, side))
    with pytest.raises(DataError, match=r"huge\.png.*limit"):
        load_rgb(path)
