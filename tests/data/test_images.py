"""Image preprocessing: canvases, best fit, resize, padding, normalisation, tiles, the global tile and
the prompt's token block, against the rules and transformers' documented examples."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from behemoth.data.images import (
    PATCH,
    best_canvas,
    candidate_canvases,
    fit_without_distortion,
    image_to_tiles,
    image_tokens,
    load_image,
)


def solid(w: int, h: int, rgb=(255, 0, 0)) -> Image.Image:
    return Image.new("RGB", (w, h), rgb)


def test_candidate_canvases_are_all_tile_grids_up_to_the_maximum():
    got = candidate_canvases(16, 336)
    expect = {(h * 336, w * 336) for h in range(1, 17) for w in range(1, 17) if h * w <= 16}
    assert set(got) == expect and len(got) == len(expect)
    assert candidate_canvases(4, 224)[:3] == [(224, 896), (448, 448), (224, 224)]  # ratio groups, first seen first


def test_best_fit_and_resize_rules():
    canvases = [(224, 672), (672, 224), (224, 448), (448, 224), (224, 224)]
    assert best_canvas((200, 300), canvases) == (224, 448)  # smallest upscale 1.12, then the smaller canvas
    assert best_canvas((200, 300), [*canvases, (448, 448)], resize_to_max_canvas=True) == (448, 448)  # 1.49
    assert best_canvas((2000, 100), canvases) == (672, 224)  # no upscale possible: the least downscale, 0.336
    # floor on the side that is not limiting: 200 * 200/300 = 133.3 -> 133; 600 * 450/800 = 337.5 -> 337
    # (transformers' docstring says 134 and 338, but its code floors exactly like this)
    assert fit_without_distortion((200, 300), (450, 200)) == (133, 200)
    assert fit_without_distortion((800, 600), (450, 1300)) == (450, 337)


@pytest.mark.parametrize("w, h, grid", [(336, 336, (1, 1)), (100, 60, (1, 1)), (500, 300, (1, 2)),
                                        (300, 900, (3, 1)), (1600, 1200, (3, 4)), (5000, 200, (1, 15))])
def test_tiles_grid_padding_and_global_tile(w, h, grid):
    t = image_to_tiles(solid(w, h), max_tiles=16)
    assert (t.rows, t.cols) == grid
    n = grid[0] * grid[1]
    assert t.pixels.shape == (n + (n > 1), 3, 336, 336) and t.pixels.dtype == torch.bfloat16
    red = torch.tensor([1.0, -1.0, -1.0])
    assert torch.equal(t.pixels[0, :, 0, 0].float(), red)  # top-left is image: (255, 0, 0) -> (1, -1, -1)
    if n > 1:
        glob = t.pixels[-1].float()  # the whole (solid red) image squeezed into one tile: no padding
        assert torch.equal(glob.amax((1, 2)), red) and torch.equal(glob.amin((1, 2)), red)


def test_small_images_grow_at_most_to_one_tile_and_pad_black():
    t = image_to_tiles(solid(100, 50), max_tiles=16)
    assert (t.rows, t.cols) == (1, 1)
    img = t.pixels[0].float()
    # 100 x 50 grows to 336 x 168 (the limiting side to one tile), the rest is black padding = -1
    assert torch.equal(img[:, :168, :336].amin((1, 2)), torch.tensor([1.0, -1.0, -1.0]))
    assert torch.equal(img[:, 168:, :], torch.full_like(img[:, 168:, :], -1.0))


def test_normalisation_is_in_bf16_like_meta():
    gray = image_to_tiles(solid(336, 336, (128, 64, 200))).pixels[0, :, 0, 0]
    expect = [((torch.tensor(float(v), dtype=torch.bfloat16) * (1 / 255)) - 0.5) / 0.5 for v in (128, 64, 200)]
    assert torch.equal(gray, torch.stack(expect))


def test_tiles_are_row_major_pieces_of_the_canvas():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (672, 1008, 3), dtype=np.uint8))  # exactly 2 x 3 tiles, no resize
    t = image_to_tiles(img)
    assert (t.rows, t.cols) == (2, 3)
    full = ((torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).to(torch.bfloat16) * (1 / 255)) - 0.5) / 0.5
    assert torch.equal(t.pixels[4], full[:, 336:, 336:672])  # row 1, column 1


def test_image_token_block():
    one = image_tokens(1, 1, 144)
    assert one[:2] == ["<|image_start|>", "<|image|>"] and one[-1] == "<|image_end|>" and len(one) == 147
    rows, cols = 2, 3
    many = image_tokens(rows, cols, 144)
    assert len(many) == 2 + 144 * rows * cols + rows * (cols - 1) + rows + 1 + 144
    assert many.count(PATCH) == 144 * (rows * cols + 1)
    assert many.count("<|tile_x_separator|>") == rows * (cols - 1) and many.count("<|tile_y_separator|>") == rows


def test_rgba_is_composited_over_white(tmp_path):
    img = Image.new("RGBA", (10, 10), (0, 0, 0, 0))  # fully transparent
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    assert load_image(buf.getvalue()).getpixel((0, 0)) == (255, 255, 255)


def test_bad_images_are_one_line_errors(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="empty.png: empty image"):
        load_image(tmp_path / "empty.png")
    with pytest.raises(ValueError, match="junk.png: not a readable image"):
        load_image(tmp_path / "junk.png")
    with pytest.raises(ValueError, match="no such image file"):
        load_image(tmp_path / "missing.png")
    big = tmp_path / "big.png"
    Image.new("L", (9000, 8000)).save(big)
    with pytest.raises(ValueError, match="over the limit"):
        load_image(big)
