"""Images for ``/v1/sample``: a grid of sampled images, and that grid as a grayscale PNG."""

from __future__ import annotations

import io

import numpy as np


def encode_png_gray(pixels: np.ndarray) -> bytes:
    """A grayscale 8-bit PNG of a (H, W) uint8 array (Pillow's encoder, zlib level 6)."""
    from PIL import Image  # imported on first use: serving text costs no Pillow import

    buffer = io.BytesIO()
    image = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8))  # mode "L"
    image.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def image_grid(images: np.ndarray, scale: int = 4, pad: int = 1) -> np.ndarray:
    """(n, h, w) images in [-1, 1] -> one (H, W) uint8 grid, ceil(sqrt(n)) columns."""
    n, h, w = images.shape
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    cell_h, cell_w = h * scale + pad, w * scale + pad
    grid = np.zeros((rows * cell_h + pad, cols * cell_w + pad), np.uint8)
    scaled = np.clip((np.nan_to_num(images) + 1.0) * 127.5, 0, 255).astype(np.uint8)
    for i, image in enumerate(scaled):
        r, c = divmod(i, cols)
        big = np.kron(image, np.ones((scale, scale), np.uint8))
        grid[pad + r * cell_h : pad + r * cell_h + h * scale, pad + c * cell_w :][
            :, : w * scale
        ] = big
    return grid
