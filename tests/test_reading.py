"""sgm.data.reading: the one image reader (modes, 16-bit, float, transparency, EXIF, errors)."""

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from sgm.data.reading import ImageReadError, image_to_tensor, read_image


def _png16_rgb(path, arr: np.ndarray) -> None:
    """Write a 16-bit RGB PNG (Pillow cannot) from uint16 [h, w, 3]."""
    h, w, _ = arr.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_16_bit_grey_png_is_scaled_to_8_bit(tmp_path):
    ramp = (np.arange(16 * 16, dtype=np.uint32) * 257).astype(np.uint16).reshape(16, 16)  # 0, 257, ..., 65535
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    assert Image.open(tmp_path / "ramp.png").mode.startswith("I")  # really read as 16-bit
    im = read_image(tmp_path / "ramp.png")
    arr = np.asarray(im)
    assert im.mode == "RGB" and arr.dtype == np.uint8
    assert np.array_equal(arr[..., 0], np.arange(256, dtype=np.uint8).reshape(16, 16))
    assert np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2])
    # a dark 16-bit image stays dark (not mistaken for 8-bit): 0..255 of 65535 is 0..1 of 255
    dark = np.arange(256, dtype=np.uint16).reshape(16, 16)
    Image.fromarray(dark).save(tmp_path / "dark.png")
    assert np.asarray(read_image(tmp_path / "dark.png")).max() == 1
    # mid grey: 32768 / 257 = 127.5 -> 128
    Image.fromarray(np.full((4, 4), 32768, np.uint16)).save(tmp_path / "mid.png")
    assert np.all(np.asarray(read_image(tmp_path / "mid.png")) == 128)


def test_16_bit_rgb_png(tmp_path):
    arr = np.zeros((4, 6, 3), np.uint16)
    arr[..., 0], arr[..., 1], arr[..., 2] = 65535, 0x8000, 0x00FF
    _png16_rgb(tmp_path / "rgb16.png", arr)
    got = np.asarray(read_image(tmp_path / "rgb16.png"))
    assert got.shape == (4, 6, 3) and np.all(np.abs(got.astype(int) - [255, 128, 0]) <= 1)


def test_float_tiff_in_0_1_is_scaled(tmp_path):
    ramp = np.linspace(0.0, 1.0, 64, dtype=np.float32).reshape(8, 8)
    Image.fromarray(ramp, "F").save(tmp_path / "f.tif")
    got = np.asarray(read_image(tmp_path / "f.tif"))[..., 0]
    assert np.array_equal(got, np.round(ramp * 255).astype(np.uint8))


def test_transparency_palette_cmyk_and_orientation(tmp_path):
    la = np.zeros((4, 4, 2), np.uint8)
    la[..., 1] = 255
    la[:, :2, 1] = 0  # left half transparent: white
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    got = np.asarray(read_image(tmp_path / "la.png"))
    assert np.all(got[:, :2] == 255) and np.all(got[:, 2:] == 0)
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.info["transparency"] = 1
    pal.save(tmp_path / "pal.png", transparency=1)
    assert np.all(np.asarray(read_image(tmp_path / "pal.png")) == 255)
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))
    cmyk.save(tmp_path / "cmyk.jpg", quality=95)
    got = np.asarray(read_image(tmp_path / "cmyk.jpg")).astype(int)
    assert np.all(np.abs(got - [255, 0, 0]) <= 8)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 40 wide x 24 high, shown 24 x 40
    Image.new("RGB", (40, 24)).save(tmp_path / "rot.jpg", exif=exif)
    assert read_image(tmp_path / "rot.jpg").size == (24, 40)
    big = tmp_path / "big.jpg"
    Image.new("RGB", (400, 240)).save(big, exif=exif)
    w, h = read_image(big, at_least=(30, 20)).size  # reduced-scale decode, never below the (h, w) asked
    assert h >= 30 and w >= 20 and (w, h) == (30, 50)  # 240 x 400 displayed, decoded at 1/8


def test_tensor_range_and_errors_name_the_file(tmp_path):
    Image.fromarray(np.array([[[0, 255, 51]]], np.uint8)).save(tmp_path / "px.png")
    x = image_to_tensor(read_image(tmp_path / "px.png"))
    assert x.shape == (3, 1, 1) and x.dtype == torch.float32
    assert torch.allclose(x.flatten(), torch.tensor([-1.0, 1.0, 51 / 127.5 - 1]))
    (tmp_path / "junk.png").write_bytes(b"not an image")
    for p in (tmp_path / "junk.png", tmp_path / "missing.png"):
        with pytest.raises(ImageReadError, match=p.name) as err:
            read_image(p)
        assert err.value.path == str(p)
