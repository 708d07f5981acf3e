"""Camera frames on the network: JPEG (libjpeg-turbo through simplejpeg), with size limits
checked before anything is decompressed.

simplejpeg, not OpenCV or Pillow: a 0.5 MB wheel with libjpeg-turbo inside and numpy as its
only dependency, published for aarch64 (manylinux2014, CPython 3.10), so the robot gets it
without the `camera` extra; and its header read gives the dimensions before any
decompression, so a small hostile file cannot expand into a huge image.
"""

from __future__ import annotations

import numpy as np
import simplejpeg

from runtime.ipc.messages import MessageError


def encode(image: np.ndarray, quality: int) -> bytes:
    """RGB uint8 [h, w, 3] -> JPEG (4:4:4: small frames keep their colour edges)."""
    return bytes(simplejpeg.encode_jpeg(image, quality=quality, colorspace="RGB",
                                        colorsubsampling="444"))


def decode(data: bytes, max_bytes: int, max_pixels: int, field: str) -> np.ndarray:
    """JPEG -> RGB uint8 [h, w, 3]; MessageError (kind `oversize` or `frame`) otherwise."""
    if len(data) > max_bytes:
        raise MessageError("oversize", f"{field}: {len(data)} bytes > {max_bytes}")
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    except Exception as exc:  # simplejpeg raises ValueError, and others on odd input
        raise MessageError("frame", f"{field}: not a JPEG: {exc}") from None
    if not (height > 0 and width > 0 and height * width <= max_pixels):
        raise MessageError("oversize", f"{field}: {width}x{height} pixels > {max_pixels}")
    try:
        image = simplejpeg.decode_jpeg(data, colorspace="RGB")
    except Exception as exc:
        raise MessageError("frame", f"{field}: corrupt JPEG: {exc}") from None
    if image.shape != (height, width, 3):
        raise MessageError("frame", f"{field}: decoded to {list(image.shape)}")
    return image
