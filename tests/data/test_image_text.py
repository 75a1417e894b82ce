"""Image-text data: the row layout and label mask, the tiles that go with it, JSONL reading and its errors,
the hash split, and the loader's exact resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from behemoth.config import PRESETS, VisionConfig
from behemoth.data.image_text import (
    ImageTextData,
    ImageTextExample,
    ImageTextLoader,
    read_jsonl,
    split_examples,
    visual_task_examples,
)
from behemoth.data.images import IMAGE_SPECIAL_TOKENS, PATCH, image_to_tiles
from behemoth.data.loader import IGNORE_INDEX
from behemoth.data.tasks import ALPHABET
from behemoth.data.tokenizer import Tokenizer
from behemoth.data.vision_tasks import make_visual_problems

VISION = VisionConfig(dim=32, n_layers=1, n_heads=2, ffn_dim=128, image_size=32, patch_size=8, adapter_dim=32)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_chars(ALPHABET, IMAGE_SPECIAL_TOKENS)


def test_char_tokenizer_with_image_tokens(tok):
    plain = Tokenizer.from_chars(ALPHABET)
    assert tok.vocab_size == plain.vocab_size + len(IMAGE_SPECIAL_TOKENS)
    assert tok.encode("Q: 7?\n") == plain.encode("Q: 7?\n")  # characters keep their ids
    assert tok.token_to_id(PATCH) == PRESETS["mini-maverick-vl"].image_token_id
    with pytest.raises(ValueError, match="outside the tokenizer's alphabet"):
        tok.encode(PATCH)  # text never turns into an image token


def test_row_layout_labels_and_tiles(tok):
    problems = make_visual_problems("train", 3, seed=0, tasks=["digit"])
    data = ImageTextData(visual_task_examples(problems), tok, VISION, seq_len=80, max_tiles=4)
    # a 64-pixel picture on 32-pixel tiles: a 2 x 2 grid plus the global tile, 4 tokens each
    block = [tok.token_to_id(t) for t in ("<|image_start|>",)]
    b = data.batch([0, 2])
    assert b.input_ids.shape == (2, 80) and b.labels.shape == (2, 80) and b.pixel_values.shape == (10, 3, 32, 32)
    assert int((b.input_ids == tok.token_to_id(PATCH)).sum()) == 10 * VISION.tokens_per_tile
    for row, p in enumerate((problems[0], problems[2])):
        ids = b.input_ids[row].tolist()
        assert ids[0] == block[0]
        end = ids.index(tok.token_to_id("<|image_end|>")) + 1
        prompt = tok.encode(p.problem.prompt)
        assert ids[end:end + len(prompt)] == prompt
        text = [*tok.encode(p.problem.solution), tok.eos_id]
        n_ctx = end + len(prompt)
        labels = b.labels[row].tolist()
        # the loss covers exactly the text and EOS, each label the next input token
        assert labels[n_ctx - 1:n_ctx - 1 + len(text)] == text
        assert all(x == IGNORE_INDEX for x in labels[:n_ctx - 1] + labels[n_ctx - 1 + len(text):])
        assert ids[n_ctx:n_ctx + len(text) - 1] == text[:-1]
        # positions count the row's tokens; the padding after its EOS is -1 (never attended to, not load)
        n = n_ctx + len(text)
        assert b.positions[row].tolist() == list(range(n)) + [-1] * (80 - n)
    tiles = [image_to_tiles(p.image(), tile=32, max_tiles=4).pixels for p in (problems[0], problems[2])]
    assert torch.equal(b.pixel_values, torch.cat(tiles))  # row by row, in order


def test_too_long_row_names_the_example(tok):
    ex = visual_task_examples(make_visual_problems("train", 1, seed=0, tasks=["count"]))
    with pytest.raises(ValueError, match=r"count problem .*needs \d+ tokens.*data.seq_len"):
        ImageTextData(ex, tok, VISION, seq_len=20, max_tiles=1)


def _image(path, size=(40, 24), colour=(200, 10, 10)):
    Image.new("RGB", size, colour).save(path)
    return path.name


def test_read_jsonl_paths_relative_to_the_file(tmp_path, tok):
    (tmp_path / "img").mkdir()
    a, b = _image(tmp_path / "img" / "a.png"), _image(tmp_path / "img" / "b.jpg", size=(20, 50))
    rows = [{"image": f"img/{a}", "text": " red", "prompt": "colour?"},
            {"image": [f"img/{a}", f"img/{b}"], "text": " two"}]
    f = tmp_path / "data.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    ex = read_jsonl(f)
    assert [e.text for e in ex] == [" red", " two"] and ex[0].prompt == "colour?" and ex[1].prompt == ""
    assert [r.size for r in ex[1].images] == [(40, 24), (20, 50)] and ex[1].where == f"{f}:2"
    data = ImageTextData(ex, tok, VISION, seq_len=120, max_tiles=2)
    b = data.batch([1])
    n_tiles = b.pixel_values.shape[0]
    assert int((b.input_ids == tok.token_to_id(PATCH)).sum()) == n_tiles * VISION.tokens_per_tile
    assert int((b.input_ids == tok.token_to_id("<|image_start|>")).sum()) == 2


@pytest.mark.parametrize("line, match", [
    ("{not json", r"data.jsonl:1: not valid JSON"),
    ('["a"]', r"data.jsonl:1: expected a JSON object"),
    ('{"text": "x"}', r"data.jsonl:1: missing key 'image'"),
    ('{"image": "a.png"}', r"data.jsonl:1: missing key 'text'"),
    ('{"image": [], "text": "x"}', r"'image' must be a path or a non-empty list"),
    ('{"image": "a.png", "text": 3}', r"'text' and 'prompt' must be strings"),
    ('{"image": "missing.png", "text": "x"}', r"data.jsonl:1: image 'missing.png': no such image file"),
    ('{"image": "junk.png", "text": "x"}', r"data.jsonl:1: image 'junk.png': not a readable image"),
])
def test_read_jsonl_errors_name_the_line(tmp_path, line, match):
    _image(tmp_path / "a.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    f = tmp_path / "data.jsonl"
    f.write_text(line + "\n")
    with pytest.raises(ValueError, match=match):
        read_jsonl(f)


def test_read_jsonl_missing_and_empty_file(tmp_path):
    with pytest.raises(ValueError, match="nope.jsonl: no such file"):
        read_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl: no examples"):
        read_jsonl(tmp_path / "empty.jsonl")


def test_split_is_by_content_not_order():
    ex = [ImageTextExample((), f" {i}", "q") for i in range(200)]
    train, val = split_examples(ex, 0.2)
    train2, val2 = split_examples(ex[::-1], 0.2)
    assert {e.text for e in val} == {e.text for e in val2} and 20 <= len(val) <= 60 and len(train) + len(val) == 200
    with pytest.raises(ValueError, match="val_fraction"):
        split_examples(ex[:1], 0.2)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_loader_resume_reproduces_the_uninterrupted_run(tok, k):
    examples = visual_task_examples(make_visual_problems("train", 9, seed=0))
    data = ImageTextData(examples, tok, VISION, seq_len=100, max_tiles=1)
    whole = ImageTextLoader(data, batch_size=4, seed=5)
    ref = [next(whole) for _ in range(8)]
    first = ImageTextLoader(data, batch_size=4, seed=5)
    for _ in range(k):
        next(first)
    resumed = ImageTextLoader(data, batch_size=4, seed=5)
    resumed.load_state_dict(first.state_dict())
    for want in ref[k:]:
        got = next(resumed)
        assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.pixel_values, want.pixel_values)
    # every example once per epoch: 8 batches of 4 over 9 examples visit each 3 or 4 times
    seen = np.concatenate([[r.tolist() for r in b.input_ids] for b in ref], axis=0)
    assert len({tuple(r) for r in seen}) == len({tuple(r) for r in data.tokens[:, :-1].tolist()})
