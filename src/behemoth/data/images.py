"""Images -> tiles for the vision tower, and the prompt tokens that stand for them (Pillow + torch).

The Llama 4 recipe (Meta's `VariableSizeImageTransform`, transformers' `Llama4ImageProcessor`):
  1. RGB (transparency composited over white);
  2. candidate canvases: every (h * S, w * S) with h * w <= max_tiles (S = tile size, 336);
  3. best fit: per canvas the no-distortion scale min(Hc / H, Wc / W); the smallest scale >= 1 if
     any (the largest with `resize_to_max_canvas`), else the largest scale < 1; ties go to the
     smallest canvas;
  4. resize keeping the aspect ratio (bilinear), each side first limited to
     min(max(side, S), canvas side) so small images grow at most to S; the limiting side gets the
     target exactly, the other floor(side * scale);
  5. pad right and bottom with black to the canvas, then x / 255, then (x - 0.5) / 0.5, in bf16 as
     Meta does (padding becomes -1);
  6. split into rows x cols tiles, row-major; with more than one tile, append a global tile (the
     whole image squeezed to S x S), last.

Each tile becomes `tokens_per_tile` (144) `<|patch|>` tokens in the prompt (`image_tokens`).

Shape legend: N tiles, C = 3 channels, S tile size.
"""

from __future__ import annotations

import io
import math
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

MAX_IMAGE_PIXELS = 64_000_000  # larger images are refused (a decompression bomb or a mistake)
IMAGE_START, IMAGE_END, IMAGE, PATCH = "<|image_start|>", "<|image_end|>", "<|image|>", "<|patch|>"
TILE_X_SEP, TILE_Y_SEP = "<|tile_x_separator|>", "<|tile_y_separator|>"
IMAGE_SPECIAL_TOKENS = (IMAGE_START, IMAGE_END, IMAGE, PATCH, TILE_X_SEP, TILE_Y_SEP)  # what a tokenizer needs


@dataclass
class Tiles:
    """pixels [N, 3, S, S] (bf16, normalised): rows x cols tiles, row-major, then the global tile when
    rows * cols > 1."""

    pixels: torch.Tensor
    rows: int
    cols: int


def load_image(source: str | os.PathLike | bytes, what: str | None = None) -> Image.Image:
    """Open an image file (or bytes) as RGB; transparency is composited over white.

    Raises `ValueError` naming the source for a missing, empty, corrupt or oversized image.
    """
    name = what or (str(source) if not isinstance(source, bytes) else "image")
    if isinstance(source, bytes):
        data = source
    else:
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"{name}: no such image file")
        data = path.read_bytes()
    if not data:
        raise ValueError(f"{name}: empty image")
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            if w * h > MAX_IMAGE_PIXELS:
                raise ValueError(f"{name}: {w} x {h} pixels is over the limit of {MAX_IMAGE_PIXELS:,}")
            img.load()
            return _to_rgb(img)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError) as e:
        raise ValueError(f"{name}: not a readable image ({type(e).__name__}: {e})") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "P") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        white.alpha_composite(rgba)
        return white.convert("RGB")
    return img.convert("RGB")


def candidate_canvases(max_tiles: int, tile: int) -> list[tuple[int, int]]:
    """(height, width) of every canvas of h x w tiles with h * w <= max_tiles, in transformers' order
    (grouped by aspect ratio in order of first appearance, from max_tiles tiles down to one)."""
    by_ratio: dict[float, list[tuple[int, int]]] = defaultdict(list)
    for n in range(max_tiles, 0, -1):
        for h in sorted(d for d in range(1, n + 1) if n % d == 0):
            by_ratio[h / (n // h)].append((h, n // h))
    return [(h * tile, w * tile) for group in by_ratio.values() for h, w in group]


def best_canvas(size_hw: tuple[int, int], canvases: list[tuple[int, int]],
                resize_to_max_canvas: bool = False) -> tuple[int, int]:
    """The canvas an image of `size_hw` is resized into (the rules in the module docstring)."""
    H, W = size_hw
    f32 = np.float32  # transformers divides in float32; equal scales (ties) must tie the same way
    scales = [float(min(f32(ch) / f32(H), f32(cw) / f32(W))) for ch, cw in canvases]
    up = [s for s in scales if s >= 1]
    chosen = (max(up) if resize_to_max_canvas else min(up)) if up else max(s for s in scales if s < 1)
    fits = [c for c, s in zip(canvases, scales, strict=True) if s == chosen]
    return min(fits, key=lambda c: c[0] * c[1])  # the first of the smallest (as argmin does)


def fit_without_distortion(size_hw: tuple[int, int], target_hw: tuple[int, int]) -> tuple[int, int]:
    """The largest (height, width) with the image's aspect ratio inside `target_hw` (floor on the
    side that is not limiting)."""
    (H, W), (th, tw) = size_hw, target_hw
    scale_w, scale_h = tw / W, th / H
    if scale_w < scale_h:
        return min(math.floor(H * scale_w), th), tw
    return th, min(math.floor(W * scale_h), tw)


def _normalize(img: Image.Image) -> torch.Tensor:
    """uint8 RGB -> [3, h, w] bf16 in [-1, 1]: x / 255 then (x - 0.5) / 0.5, each step in bf16."""
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
    x = x.to(torch.bfloat16) * (1 / 255)
    return (x - 0.5) / 0.5


def image_to_tiles(img: Image.Image, tile: int = 336, max_tiles: int = 16, resize_to_max_canvas: bool = False) -> Tiles:
    """One RGB image -> its tiles (see the module docstring)."""
    W, H = img.size
    canvas_h, canvas_w = best_canvas((H, W), candidate_canvases(max_tiles, tile), resize_to_max_canvas)
    limit = (canvas_h, canvas_w)
    if not resize_to_max_canvas:  # grow a small image at most to one tile
        limit = (min(max(H, tile), canvas_h), min(max(W, tile), canvas_w))
    h, w = fit_without_distortion((H, W), limit)
    resized = img.resize((max(w, 1), max(h, 1)), Image.BILINEAR)
    canvas = Image.new("RGB", (canvas_w, canvas_h), (0, 0, 0))
    canvas.paste(resized, (0, 0))
    x_3HW = _normalize(canvas)
    rows, cols = canvas_h // tile, canvas_w // tile
    tiles_N3SS = x_3HW.view(3, rows, tile, cols, tile).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, tile, tile)
    if rows * cols > 1:
        global_tile = _normalize(img.resize((tile, tile), Image.BILINEAR))
        tiles_N3SS = torch.cat([tiles_N3SS, global_tile[None]])
    return Tiles(tiles_N3SS.contiguous(), rows, cols)


def image_tokens(rows: int, cols: int, tokens_per_tile: int) -> list[str]:
    """The token block one image stands for in a prompt, as token strings:
    one tile: <|image_start|> <|image|> <|patch|>*T <|image_end|>; several: <|image_start|>, each tile
    row as T patches per tile joined by <|tile_x_separator|> and ended by <|tile_y_separator|>, then
    <|image|>, T patches for the global tile, <|image_end|>."""
    out = [IMAGE_START]
    if rows * cols > 1:
        for _ in range(rows):
            for c in range(cols):
                out += [PATCH] * tokens_per_tile
                if c < cols - 1:
                    out.append(TILE_X_SEP)
            out.append(TILE_Y_SEP)
    return out + [IMAGE] + [PATCH] * tokens_per_tile + [IMAGE_END]
