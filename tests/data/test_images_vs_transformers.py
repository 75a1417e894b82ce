"""Our preprocessing against transformers' Llama 4 image processor and processor.

transformers' `Llama4ImageProcessor` needs torchvision, which does not import beside the CPU torch wheel
this project pins, so its outputs for a fixed set of images are kept in `golden/llama4_processor.npz`
(written by `llama4_processor_golden.py`, which records the versions). Where torchvision does import, the
last test runs transformers live on the same and on fresh images. The prompt expansion is also checked
live against `Llama4Processor`'s own code, which imports without torchvision.

Tolerance for pixel values: the tile grid, shapes and the padding must be identical; a pixel may differ by
one uint8 level of the resized image (Pillow's and torchvision's bilinear filters round differently),
which after the bf16 normalisation is at most 3/256; such values stay rare (under 5%; the worst case, noise
squeezed 6x into the global tile, has 3.1%, drawings and gradients under 0.2%).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from behemoth.config import VisionConfig
from behemoth.data.images import best_canvas, candidate_canvases, image_to_tiles, image_tokens

GOLDEN = Path(__file__).parent / "golden" / "llama4_processor.npz"
ONE_LEVEL = 3 / 256  # one uint8 step (2/255 after normalisation) rounded to bf16 near 1
RARE = 0.05


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN) as z:
        return {k: z[k] for k in z.files}


def cases(golden):
    return [i for i in range(json.loads(str(golden["meta"]))["cases"])]


def compare_pixels(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    assert ours.shape == theirs.shape, what
    diff = (ours.float() - theirs.float()).abs()
    assert diff.max() <= ONE_LEVEL, f"{what}: max |difference| {diff.max():.4f}"
    assert (diff > 0).float().mean() < RARE, f"{what}: {(diff > 0).float().mean():.2%} of values differ"


def tokens_per_tile(tile: int) -> int:
    return VisionConfig(image_size=tile, patch_size=14).tokens_per_tile


def test_golden_file_records_its_source(golden):
    meta = json.loads(str(golden["meta"]))
    assert meta["transformers"] and meta["torchvision"] and len(cases(golden)) >= 20
    assert len(golden["grid_wh_max"]) >= 300


def test_tile_grids_match_transformers(golden):
    """338 sizes from 1 x 1 to 5000 x 5000, at 336-pixel tiles with 1, 4, 7 and 16 tiles at most."""
    ours = [[ch // 336, cw // 336] for ch, cw in
            (best_canvas((h, w), candidate_canvases(int(m), 336)) for w, h, m in golden["grid_wh_max"].tolist())]
    theirs = golden["grid_rows_cols"].tolist()
    wrong = [(tuple(s), o, t) for s, o, t in zip(golden["grid_wh_max"].tolist(), ours, theirs, strict=True) if o != t]
    assert not wrong, f"{len(wrong)} grids differ (size, ours, transformers): {wrong[:5]}"


def test_pixel_values_match_transformers(golden):
    """Noise, gradients and drawings of many sizes and aspect ratios, at 28- and 336-pixel tiles."""
    for i in cases(golden):
        tile, max_tiles = golden[f"px{i}_tile_max"].tolist()
        img = Image.fromarray(golden[f"px{i}_image"])
        t = image_to_tiles(img, tile=tile, max_tiles=max_tiles)
        theirs = torch.from_numpy(golden[f"px{i}_pixels_bf16"].astype(np.int16)).view(torch.bfloat16)
        assert [t.rows, t.cols] == golden[f"px{i}_grid"].tolist(), f"case {i}"
        compare_pixels(t.pixels, theirs, f"case {i}: {img.size[0]} x {img.size[1]}, {tile}-pixel tiles")


def test_prompt_tokens_match_the_processor(golden):
    """transformers' `Llama4Processor` on "<|image|>what is this?": the image token becomes the block."""
    for i in cases(golden):
        tile, _ = golden[f"px{i}_tile_max"].tolist()
        rows, cols = golden[f"px{i}_grid"].tolist()
        ours = image_tokens(rows, cols, tokens_per_tile(tile)) + list("what is this?")
        assert ours == golden[f"px{i}_tokens"].tolist(), f"case {i}"


def test_prompt_expansion_matches_transformers_code():
    pytest.importorskip("transformers")
    from transformers.models.llama4.processing_llama4 import Llama4Processor

    for rows, cols in [(1, 1), (1, 2), (2, 1), (2, 3), (4, 4), (1, 16), (3, 5)]:
        for per_tile in (1, 4, 144):
            theirs = Llama4Processor._prompt_split_image(None, (rows, cols), per_tile)
            assert "".join(image_tokens(rows, cols, per_tile)) == theirs


def test_live_against_transformers_image_processor(golden):
    """Runs only where torchvision imports (not with this project's pinned CPU torch)."""
    pytest.importorskip("transformers")
    try:
        from transformers.models.llama4.image_processing_llama4 import Llama4ImageProcessor
    except Exception as e:  # ImportError, or torchvision's own failure to register its operators
        pytest.skip(f"transformers' Llama4ImageProcessor does not import here: {type(e).__name__}")
    rng = np.random.default_rng(1)
    images = [(Image.fromarray(golden[f"px{i}_image"]), *golden[f"px{i}_tile_max"].tolist()) for i in cases(golden)]
    for _ in range(12):
        w, h = (int(v) for v in rng.integers(1, 200, 2))
        images.append((Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)), 28, int(rng.integers(1, 9))))
    for img, tile, max_tiles in images:
        got = Llama4ImageProcessor(size={"height": tile, "width": tile}, max_patches=max_tiles)(
            images=[img], return_tensors="pt")
        t = image_to_tiles(img, tile=tile, max_tiles=max_tiles)
        assert [t.rows, t.cols] == got["aspect_ratios"][0].tolist()
        compare_pixels(t.pixels, got["pixel_values"], f"{img.size}, {tile}-pixel tiles, at most {max_tiles}")
