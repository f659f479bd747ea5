"""Hostile input files shared by the bad-input tests (issue 14 §4): a decompression-bomb PNG and a
16-bit PNG. Built byte by byte with zlib so the bomb costs milliseconds, not a 225-megapixel
image in memory."""
from __future__ import annotations

import struct
import zlib

import numpy as np
from PIL import Image

BOMB_SIDE = 15000  # 225,000,000 pixels: over PIL's default limit (89,478,485) and over twice it


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_bomb_png(path, side: int = BOMB_SIDE) -> int:
    """Write a valid, all-black 1-bit ``side`` x ``side`` PNG (a ~30 KB file claiming side² pixels);
    returns its size in bytes."""
    row = b"\x00" + b"\x00" * ((side + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row * 1000) for _ in range(side // 1000))
    idat += compressor.compress(row * (side % 1000)) + compressor.flush()
    data = (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))
    with open(path, "wb") as f:
        f.write(data)
    return len(data)


def write_png16(path, width: int = 64, height: int = 32) -> np.ndarray:
    """Write a 16-bit greyscale PNG holding a ramp over the whole 0..65535 range; returns the values."""
    values = np.linspace(0, 65535, width * height).round().astype(np.uint16).reshape(height, width)
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    return values


THIN_SIDE = 40000  # a 1 x 40000 image: 40,000 pixels, padded to a square: 1.6 billion


def write_thin_png(path, width: int = 1, height: int = THIN_SIDE) -> int:
    """Write a black ``width`` x ``height`` greyscale PNG (a few hundred bytes for 1 x 40000, far under
    any pixel limit, but padded to a square it is ``height``² pixels); returns its size in bytes."""
    Image.new("L", (width, height), 0).save(path)
    with open(path, "rb") as f:
        return len(f.read())
