"""Image-text training data: examples of (images, prompt, text), one example per row, with image tiles.

A row is the examples' image blocks (`data.images.image_tokens`, one per image, in order), then the
prompt, then the text and EOS, right-padded to `seq_len + 1` tokens:

    <|image_start|> <|image|> <|patch|>*T <|image_end|>  Q: which digit is this?\\nA:  #### 7\\n <eos> <pad>...
    '------------------ image: no loss ----------------'  '---- prompt: no loss ---'  '--- loss ---'

Input is row[:-1], labels row[1:], with -100 wherever the label is an image token, a prompt token or
padding: the model learns to write the text given the pictures. The batch's `pixel_values` are the tiles
of all its images, row by row, which the model scatters into the `<|patch|>` positions in order.

Sources: a JSONL file (`read_jsonl`: {"image": path or [paths], "text": ..., "prompt": optional}, paths
relative to the file), or the built-in visual tasks (`visual_task_examples`). Images are decoded when a
batch needs them (built-in ones are drawn), so a dataset of any size costs only its token rows; each
image's size is read up front (the file header) to fix its tile grid, and so its row.

`ImageTextLoader` is endless, deterministic and resumable exactly like `data.loader.DataLoader`, with
examples in place of windows.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from behemoth.config import VisionConfig
from behemoth.data.images import (
    IMAGE_SPECIAL_TOKENS,
    best_canvas,
    candidate_canvases,
    image_to_tiles,
    image_tokens,
    load_image,
)
from behemoth.data.loader import IGNORE_INDEX, Batch, EpochOrder
from behemoth.data.tokenizer import Tokenizer

MAX_TILES = 16  # tiles per image at most, as in Llama 4


@dataclass(frozen=True)
class ImageRef:
    """An image by file path, or drawn on demand by `draw` (the built-in tasks); `size` is (width, height)."""

    size: tuple[int, int]
    path: str | None = None
    draw: Callable[[], Image.Image] | None = None

    def load(self) -> Image.Image:
        return self.draw() if self.draw is not None else load_image(self.path)


@dataclass(frozen=True)
class ImageTextExample:
    images: tuple[ImageRef, ...]
    text: str  # trained on
    prompt: str = ""  # between the images and the text, not trained on
    where: str = "example"  # for error messages: "file.jsonl:12"


def image_block_ids(tokenizer: Tokenizer, rows: int, cols: int, tokens_per_tile: int) -> list[int]:
    """The token ids of one image's block (see `data.images.image_tokens`); `ValueError` if the tokenizer
    lacks an image token."""
    missing = [t for t in IMAGE_SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
    if missing:
        raise ValueError(f"the tokenizer has no {', '.join(missing)}: it cannot carry images")
    return [tokenizer.token_to_id(t) for t in image_tokens(rows, cols, tokens_per_tile)]


def encode_image(img: Image.Image, tokenizer: Tokenizer, vision: VisionConfig,
                 max_tiles: int = MAX_TILES) -> tuple[list[int], torch.Tensor]:
    """An RGB image -> (its prompt token block, its tiles [N, 3, S, S] bf16)."""
    tiles = image_to_tiles(img, tile=vision.image_size, max_tiles=max_tiles)
    return image_block_ids(tokenizer, tiles.rows, tiles.cols, vision.tokens_per_tile), tiles.pixels


def visual_task_examples(problems: Sequence) -> list[ImageTextExample]:
    """Built-in visual problems (`data.vision_tasks.VisualProblem`) as examples: the question is the prompt,
    the answer (" #### 3\\n") the text."""
    from behemoth.data.vision_tasks import SIZE

    return [ImageTextExample((ImageRef((SIZE, SIZE), draw=p.image),), p.problem.solution, p.problem.prompt,
                             where=f"{p.task} problem {p.problem.key}") for p in problems]


def read_jsonl(path: str | Path, image_field: str = "image", text_field: str = "text",
               prompt_field: str = "prompt") -> list[ImageTextExample]:
    """Examples from a JSONL file: one object per line with `image_field` (a path, or a list of paths,
    relative to the file), `text_field` and optionally `prompt_field`. Every image's header is read
    here, so a missing or unreadable image is an error naming its line before anything trains."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    out = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object")
            for key in (image_field, text_field):
                if key not in row:
                    raise ValueError(f"{where}: missing key {key!r}")
            sources = row[image_field] if isinstance(row[image_field], list) else [row[image_field]]
            if not sources or not all(isinstance(s, str) and s for s in sources):
                raise ValueError(f"{where}: {image_field!r} must be a path or a non-empty list of paths")
            text, prompt = row[text_field], row.get(prompt_field, "")
            if not isinstance(text, str) or not isinstance(prompt, str):
                raise ValueError(f"{where}: {text_field!r} and {prompt_field!r} must be strings")
            refs = tuple(_file_ref(path.parent / s, f"{where}: {image_field} {s!r}") for s in sources)
            out.append(ImageTextExample(refs, text, prompt, where))
    if not out:
        raise ValueError(f"{path}: no examples")
    return out


def _file_ref(file: Path, what: str) -> ImageRef:
    if not file.is_file():
        raise ValueError(f"{what}: no such image file")
    try:
        with Image.open(file) as img:
            size = img.size
    except Exception as e:  # Pillow raises several types for unreadable files
        raise ValueError(f"{what}: not a readable image ({type(e).__name__})") from None
    return ImageRef(size, path=str(file))


def split_examples(examples: Sequence[ImageTextExample], val_fraction: float) -> tuple[list, list]:
    """(train, validation): an example goes to validation when the sha256 bucket of its content says so,
    so the split does not depend on the file's order or on the other examples."""
    train, val = [], []
    for ex in examples:
        key = json.dumps([[r.path for r in ex.images], ex.prompt, ex.text])
        bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
        (val if bucket < val_fraction else train).append(ex)
    if not train or not val:
        raise ValueError(f"{len(examples)} examples give {len(train)} for training and {len(val)} held out at "
                         f"val_fraction={val_fraction}; use more examples or another val_fraction")
    return train, val


class ImageTextData:
    """Examples tokenized into rows of `seq_len + 1` tokens and their label masks (see the module docstring).

    `ValueError` naming the example when a row would not fit `seq_len + 1` tokens."""

    def __init__(self, examples: Sequence[ImageTextExample], tokenizer: Tokenizer, vision: VisionConfig,
                 seq_len: int, max_tiles: int = MAX_TILES) -> None:
        if not examples:
            raise ValueError("image-text data: no examples")
        self.examples, self.vision, self.seq_len, self.max_tiles = list(examples), vision, seq_len, max_tiles
        canvases = candidate_canvases(max_tiles, vision.image_size)
        width = seq_len + 1
        self.tokens = np.full((len(self.examples), width), tokenizer.pad_id, dtype=np.int64)
        self.trained = np.zeros((len(self.examples), width), dtype=bool)
        self.lengths = np.zeros(len(self.examples), dtype=np.int64)  # tokens before the padding
        blocks: dict[tuple[int, int], list[int]] = {}
        for i, ex in enumerate(self.examples):
            ids: list[int] = []
            for ref in ex.images:
                w, h = ref.size
                ch, cw = best_canvas((h, w), canvases)
                grid = (ch // vision.image_size, cw // vision.image_size)
                if grid not in blocks:
                    blocks[grid] = image_block_ids(tokenizer, *grid, vision.tokens_per_tile)
                ids += blocks[grid]
            ids += tokenizer.encode(ex.prompt) if ex.prompt else []
            n_context = len(ids)
            ids += [*tokenizer.encode(ex.text), tokenizer.eos_id]
            if len(ids) > width:
                raise ValueError(f"{ex.where}: needs {len(ids)} tokens with its images, more than data.seq_len + 1 "
                                 f"= {width}; raise data.seq_len")
            self.tokens[i, :len(ids)] = ids
            self.trained[i, n_context:len(ids)] = True
            self.lengths[i] = len(ids)

    def __len__(self) -> int:
        return len(self.examples)

    def batch(self, indices: Sequence[int]) -> Batch:
        """The `Batch` of the given examples: [B, seq_len] inputs, labels (-100 off the text), positions
        0.. per row and -1 on the padding after it (never attended to, not counted as routed load), one
        segment per row, and the tiles of all their images."""
        idx = np.asarray(indices, dtype=np.int64)
        rows, trained = self.tokens[idx], self.trained[idx]
        labels = np.where(trained[:, 1:], rows[:, 1:], IGNORE_INDEX)
        B, S = len(idx), self.seq_len
        tiles = [image_to_tiles(ref.load(), tile=self.vision.image_size, max_tiles=self.max_tiles).pixels
                 for i in idx.tolist() for ref in self.examples[i].images]
        return Batch(input_ids=torch.from_numpy(np.ascontiguousarray(rows[:, :-1])),
                     labels=torch.from_numpy(np.ascontiguousarray(labels)),
                     positions=torch.from_numpy(np.where(np.arange(S)[None] < self.lengths[idx, None],
                                                         np.arange(S)[None], -1)),
                     segment_ids=torch.zeros(B, S, dtype=torch.long), pixel_values=torch.cat(tiles))


class ImageTextLoader(EpochOrder):
    """Endless iterator of `Batch`es of `batch_size` examples of `data` (see `data.loader.EpochOrder`)."""

    def __init__(self, data: ImageTextData, batch_size: int, seed: int = 0, shuffle: bool = True) -> None:
        super().__init__(len(data), batch_size, data.seq_len, seed, shuffle)
        self.data = data

    def _batch_of(self, indices: np.ndarray) -> Batch:
        return self.data.batch(indices)
