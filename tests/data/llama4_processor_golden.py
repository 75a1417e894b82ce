"""Write `golden/llama4_processor.npz`: what transformers' `Llama4ImageProcessor` and `Llama4Processor` give
for a fixed set of images, so `test_images_vs_transformers.py` can check our preprocessing against them
where torchvision cannot be installed (transformers' Llama 4 image processor needs it, and no torchvision
build imports beside the CPU torch wheel this project pins).

Run it in an environment with torch, torchvision, transformers and Pillow, from the repository root:

    python tests/data/llama4_processor_golden.py [OUT.npz]

The file holds:
  grid_*      for many image sizes and tile limits at the real 336-pixel tiles: transformers' tile grid
              (rows, cols);
  px{i}_*     for a few images (stored too, as uint8): transformers' pixel values (bf16 bits as uint16),
              the grid, the tile size and tile limit, and the processor's tokens for "<|image|>what is this?";
  meta        the versions that produced it.
Where torchvision does import, the test also compares live, on the same images.
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

OUT = Path(__file__).parent / "golden" / "llama4_processor.npz"
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|image_start|>", "<|image_end|>", "<|image|>", "<|patch|>",
            "<|tile_x_separator|>", "<|tile_y_separator|>"]


def grid_sizes() -> list[tuple[int, int, int]]:
    """(width, height, max_tiles): edge cases, then log-uniform random sizes from 1 to 5000 pixels a side."""
    edges = [(336, 336), (335, 336), (337, 336), (672, 336), (673, 336), (1, 1), (1, 5000), (5000, 1),
             (1344, 1344), (1345, 1344), (100, 60), (500, 300), (300, 900), (1600, 1200), (5000, 200), (640, 480),
             (1920, 1080), (1080, 1920), (4032, 3024), (224, 224), (800, 600), (1024, 1024)]
    rng = np.random.default_rng(0)
    rand = [tuple(int(v) for v in np.exp(rng.uniform(0, np.log(5000), 2))) for _ in range(160)]
    return [(w, h, m) for m in (16, 4, 1, 7) for (w, h) in edges + (rand if m == 16 else rand[:30])]


def make_image(kind: str, w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    if kind == "noise":
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    if kind == "gradient":
        y, x = np.mgrid[0:h, 0:w]
        a = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x * 3 + y * 5) % 256], -1)
        return Image.fromarray(a.astype(np.uint8))
    img = Image.new("RGB", (w, h), (255, 255, 255))  # "shapes": a drawing with hard edges, as in our tasks
    d = ImageDraw.Draw(img)
    for _ in range(8):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        box = (x0, y0, x0 + int(rng.integers(2, max(3, w // 2))), y0 + int(rng.integers(2, max(3, h // 2))))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)(box, fill=colour)
    return img


def pixel_cases() -> list[tuple[int, int, str, int, int]]:
    """(tile, max_tiles, kind, width, height): small tiles (28 px) for many grids, two at the real 336 px."""
    small = [(28, 6, k, w, h) for k in ("noise", "gradient", "shapes")
             for w, h in ((12, 7), (62, 37), (42, 42), (125, 25), (4, 11), (1, 1), (25, 2), (90, 61), (17, 160))]
    return small + [(336, 16, "gradient", 100, 60), (336, 16, "shapes", 500, 300)]


def main(out: Path) -> None:
    import tokenizers
    import torch
    import torchvision
    import transformers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.llama4.image_processing_llama4 import Llama4ImageProcessor
    from transformers.models.llama4.processing_llama4 import Llama4Processor

    arrays: dict[str, np.ndarray] = {}
    sizes = grid_sizes()
    grids = []
    for w, h, m in sizes:
        proc = Llama4ImageProcessor(max_patches=m)
        # the grid depends only on the size: a one-colour image keeps this fast at 5000 x 5000
        grids.append(proc(images=[Image.new("RGB", (w, h))], return_tensors="pt")["aspect_ratios"][0].tolist())
    arrays["grid_wh_max"] = np.array(sizes, dtype=np.int64)
    arrays["grid_rows_cols"] = np.array(grids, dtype=np.int64)

    vocab = {t: i for i, t in enumerate(SPECIALS + list("abcdefghijklmnopqrstuvwxyz ?"))}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token=None))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex(r"[\s\S]"), behavior="isolated")
    tk.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    for i, (tile, m, kind, w, h) in enumerate(pixel_cases()):
        img = make_image(kind, w, h, seed=i)
        improc = Llama4ImageProcessor(size={"height": tile, "width": tile}, max_patches=m)
        processor = Llama4Processor(image_processor=improc, tokenizer=fast, patch_size=14, pixel_shuffle_ratio=0.5)
        got = improc(images=[img], return_tensors="pt")
        ids = processor(text="<|image|>what is this?", images=[img], return_tensors="pt")["input_ids"][0]
        arrays[f"px{i}_image"] = np.asarray(img, dtype=np.uint8)
        arrays[f"px{i}_pixels_bf16"] = got["pixel_values"].to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        arrays[f"px{i}_grid"] = np.array(got["aspect_ratios"][0].tolist(), dtype=np.int64)
        arrays[f"px{i}_tile_max"] = np.array([tile, m], dtype=np.int64)
        arrays[f"px{i}_tokens"] = np.array(fast.convert_ids_to_tokens(ids.tolist()))
    meta = {"transformers": transformers.__version__, "torchvision": torchvision.__version__,
            "torch": torch.__version__, "date": datetime.date.today().isoformat(), "cases": len(pixel_cases())}
    arrays["meta"] = np.array(json.dumps(meta))
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    print(f"{out}: {len(sizes)} grids, {len(pixel_cases())} pixel cases, {out.stat().st_size / 1e3:.0f} kB; {meta}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
