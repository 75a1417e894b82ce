"""The data phase of a run: the tokenizer it is bound to and its training and validation data.

Text: the built-in STEM tasks or a corpus on disk (tokenized once into a cached token store, packed into
windows). Image-text: the built-in visual tasks or a JSONL of examples (one example per row). The
tokenizer is, in order: the run's own (on resume), `data.tokenizer`, the teacher's (distillation), the
character tokenizer of the built-in tasks, or a BPE trained on the corpus.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from behemoth.config import VisionConfig
from behemoth.data.corpus import as_text, iter_documents, resolve_paths
from behemoth.data.image_text import ImageTextData, ImageTextLoader, read_jsonl, split_examples, visual_task_examples
from behemoth.data.images import IMAGE_SPECIAL_TOKENS, PATCH
from behemoth.data.loader import DataLoader
from behemoth.data.packing import TokenStore, build_in_memory, tokenize_corpus
from behemoth.data.tasks import ALPHABET, make_problems
from behemoth.data.tokenizer import Tokenizer
from behemoth.data.vision_tasks import make_visual_problems
from behemoth.train.config import DataSection

Data = TokenStore | ImageTextData


def fixed_tokenizer(d: DataSection, run_dir: Path, resume: bool, given: Tokenizer | None) -> Tokenizer | None:
    """The tokenizer a run is bound to, in order: its own (on resume), `data.tokenizer`, `given` (a
    distillation teacher's), the one a dataset directory names (`behemoth synthesize` writes its teacher's
    beside its shards and manifest); None when the run makes its own from the data."""
    saved = run_dir / "tokenizer.json"
    if resume and saved.is_file():
        return Tokenizer.load(saved)
    if d.tokenizer:
        return Tokenizer.load(d.tokenizer)
    if given is not None:
        return given
    own = Path(d.path) / "tokenizer.json" if d.path else None
    if own is not None and (own.parent / "manifest.json").is_file() and own.is_file():
        return Tokenizer.load(own)
    return None


def build_data(d: DataSection, run_dir: Path, seed: int, resume: bool, say: Callable[[str], None],
               tokenizer: Tokenizer | None = None) -> tuple[Tokenizer, TokenStore, TokenStore]:
    """Tokenizer and train/validation token stores: the built-in tasks, or a corpus on disk."""
    paths = resolve_paths(d.path) if d.path is not None else None
    tok = fixed_tokenizer(d, run_dir, resume, tokenizer)
    if tok is None and paths is None:
        tok = Tokenizer.from_chars(ALPHABET)
    elif tok is None:
        say(f"tokenizer: training a byte-level BPE ({d.tokenizer_vocab_size} tokens) on {d.path}")
        tok = Tokenizer.train(map(as_text, iter_documents(paths, d.field, d.prompt_field)),
                              vocab_size=d.tokenizer_vocab_size)
    if paths is None:
        train = make_problems("train", d.num_problems, seed=seed, tasks=d.tasks, difficulty=d.difficulty)
        val = make_problems("test", max(64, d.num_problems // 50), seed=seed, tasks=d.tasks, difficulty=d.difficulty)
        say(f"data: built-in tasks ({', '.join(sorted({p.task for p in train}))}), {len(train):,} training and "
            f"{len(val):,} held-out problems")
        return tok, build_in_memory((p.text for p in train), tok), build_in_memory((p.text for p in val), tok)
    train, val = tokenize_corpus(paths, tok, Path(d.cache_dir), field=d.field, val_fraction=d.val_fraction, seed=seed,
                                 prompt_field=d.prompt_field or None)
    say(f"data: {d.path}: {train.num_docs:,} documents / {train.num_tokens:,} tokens for training, "
        f"{val.num_docs:,} / {val.num_tokens:,} held out")
    return tok, train, val


def build_image_data(d: DataSection, run_dir: Path, seed: int, resume: bool, say: Callable[[str], None],
                     vision: VisionConfig | None,
                     tokenizer: Tokenizer | None = None) -> tuple[Tokenizer, ImageTextData, ImageTextData]:
    """Tokenizer and train/validation image-text data (`data.images`): a JSONL of examples, or the built-in
    visual tasks. The built-in tasks' tokenizer is the character tokenizer with the image tokens; a BPE
    trained on a JSONL's text gets the image tokens added."""
    if vision is None:
        raise ValueError("data.images needs a model with a vision tower (e.g. --model.preset=mini-maverick-vl)")
    if d.path is None:
        train_p = make_visual_problems("train", d.num_problems, seed=seed, tasks=d.tasks)
        val_p = make_visual_problems("test", max(64, d.num_problems // 50), seed=seed, tasks=d.tasks)
        train_ex, val_ex = visual_task_examples(train_p), visual_task_examples(val_p)
        say(f"data: built-in visual tasks ({', '.join(sorted({p.task for p in train_p}))}), {len(train_ex):,} "
            f"training and {len(val_ex):,} held-out pictures")
    else:
        examples = read_jsonl(d.path, image_field=d.image_field, text_field=d.field, prompt_field=d.prompt_field)
        train_ex, val_ex = split_examples(examples, d.val_fraction)
        say(f"data: {d.path}: {len(train_ex):,} image-text examples for training, {len(val_ex):,} held out")
    tok = fixed_tokenizer(d, run_dir, resume, tokenizer)
    if tok is None and d.path is None:
        tok = Tokenizer.from_chars(ALPHABET, IMAGE_SPECIAL_TOKENS)
    elif tok is None:
        say(f"tokenizer: training a byte-level BPE ({d.tokenizer_vocab_size} tokens) on {d.path}, plus image tokens")
        bpe = Tokenizer.train((ex.prompt + ex.text for ex in train_ex), vocab_size=d.tokenizer_vocab_size)
        bpe.hf.add_special_tokens(list(IMAGE_SPECIAL_TOKENS))
        tok = Tokenizer(bpe.hf, source=bpe.source, config=bpe.config)
    data = [ImageTextData(ex, tok, vision, d.seq_len, d.max_tiles) for ex in (train_ex, val_ex)]
    return tok, data[0], data[1]


def image_token_id(tok: Tokenizer) -> int:
    """The tokenizer's `<|patch|>` id: the image token of every model trained with it."""
    patch = tok.token_to_id(PATCH)
    if patch is None:
        raise ValueError(f"the tokenizer has no {PATCH} token: it cannot carry images (data.tokenizer)")
    return patch


def check_same_image_tokens(student: VisionConfig, teacher: VisionConfig | None, who: str) -> None:
    """Teacher and student must turn an image into the same token block (tile size and tokens per tile)."""
    if teacher is None:
        raise ValueError(f"the {who} has no vision tower; distillation on image-text data needs one in both models")
    a, b = (student.image_size, student.tokens_per_tile), (teacher.image_size, teacher.tokens_per_tile)
    if a != b:
        raise ValueError(f"the {who}'s vision tower cuts {b[0]}-pixel tiles into {b[1]} tokens, the student's "
                         f"{a[0]}-pixel tiles into {a[1]}; their image tokens must match")


def make_loader(data: Data, batch_size: int, seq_len: int, seed: int, shuffle: bool):
    """Packed windows of a token store, or whole examples of image-text data."""
    if isinstance(data, ImageTextData):
        return ImageTextLoader(data, batch_size, seed=seed, shuffle=shuffle)
    return DataLoader(data, batch_size, seq_len, seed=seed, shuffle=shuffle)
