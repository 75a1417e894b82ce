"""A model with its tokenizer and chat format, ready to answer text: what `generate`, `chat` and
`serve` share.

`Runner.load(path)` takes a native checkpoint directory, a training run directory (its latest
checkpoint), or a transformers `save_pretrained` directory; the tokenizer is the `tokenizer.json`
beside the weights.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from behemoth.checkpoint.locate import resolve_model_dir
from behemoth.checkpoint.model_dir import load_model
from behemoth.data.image_text import encode_image
from behemoth.data.images import PATCH, load_image
from behemoth.data.tokenizer import Tokenizer
from behemoth.inference.chat import ChatFormat, chat_format
from behemoth.inference.generate import CacheSession, generate, token_steps
from behemoth.inference.sampling import SamplingParams
from behemoth.inference.speculative import SpecStats, speculative_generate
from behemoth.inference.text import Completer, Completion


@dataclass
class Draft:
    """A draft model for speculative decoding (`inference/speculative.py`): its model, k (the first k when
    adaptive) and k's ceiling; `stats` holds the latest run's."""

    model: nn.Module
    k: int = 4
    adaptive: bool = False
    k_max: int = 8
    stats: SpecStats | None = None

    @classmethod
    def load(cls, path: str | Path, target: Runner, **options) -> Draft:
        """A draft from a model directory, checked against the target: the same tokenizer."""
        directory = resolve_model_dir(path)
        if Tokenizer.load(directory).fingerprint != target.tokenizer.fingerprint:
            raise ValueError(f"--draft {path}: its tokenizer differs from the model's (a draft proposes the "
                             "target's token ids)")
        device, dtype = next(target.model.parameters()).device, next(target.model.parameters()).dtype
        return cls(load_model(str(directory), dtype=dtype, device=device).eval(), **options)


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class Runner:
    """`max_tiles`: the most tiles (each `VisionConfig.image_size` pixels square) one image is cut into
    (16, as in Llama 4)."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, chat: ChatFormat | None = None, name: str = "model",
                 max_tiles: int = 16):
        cfg = model.config
        if tokenizer.vocab_size > cfg.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens, the model only {cfg.vocab_size}")
        if cfg.vision is not None and tokenizer.token_to_id(PATCH) not in (None, cfg.image_token_id):
            raise ValueError(f"the tokenizer's {PATCH} is id {tokenizer.token_to_id(PATCH)}, the model's image "
                             f"token is {cfg.image_token_id}")
        self.model, self.tokenizer, self.name, self.max_tiles = model.eval(), tokenizer, name, max_tiles
        self.chat = chat or chat_format(tokenizer)

    def image(self, source, what: str | None = None) -> tuple[list[int], torch.Tensor]:
        """An image (path, bytes or PIL image) -> its prompt token block and its tiles [N, 3, S, S].

        Raises `ValueError` (naming `what`) for a model without a vision tower, a tokenizer without
        the image tokens, or an unreadable image.
        """
        v = self.model.config.vision
        if v is None:
            raise ValueError(f"{self.name} has no vision tower: it cannot take images")
        img = source if isinstance(source, Image.Image) else load_image(source, what)
        return encode_image(img, self.tokenizer, v, self.max_tiles)

    def encode_prompt_with_images(self, prompt: str, blocks: Sequence[list[int]]) -> list[int]:
        """A raw prompt with image blocks first (after the BOS the tokenizer adds, if any)."""
        ids = self.encode_prompt(prompt) if prompt else []
        images = [t for b in blocks for t in b]
        if ids and ids[0] == self.tokenizer.bos_id and self.tokenizer.bos_id != self.tokenizer.eos_id:
            return [ids[0], *images, *ids[1:]]
        return images + ids

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
             chat: str | None = None) -> Runner:
        directory = resolve_model_dir(path)
        device = torch.device(device)
        tokenizer = Tokenizer.load(directory)
        model = load_model(str(directory), dtype=dtype or default_dtype(device), device=device)
        return cls(model, tokenizer, chat_format(tokenizer, chat), name=Path(path).resolve().name)

    @property
    def max_len(self) -> int:
        return self.model.config.max_seq_len

    def encode_prompt(self, prompt: str) -> list[int]:
        ids = self.tokenizer.encode_prompt(prompt)
        if not ids:
            raise ValueError("prompt: empty (it encodes to no tokens)")
        return ids

    def encode_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        return self.chat.encode(messages)

    def params(self, chat: bool, **options) -> SamplingParams:
        """Sampling parameters with the chat format's stop ids added for chat turns."""
        stop = tuple(options.pop("stop_ids", ()))
        if chat:
            stop += self.chat.stop_ids
        return SamplingParams(stop_ids=stop, **options)

    def complete(self, prompts_ids: Sequence[Sequence[int]], params: SamplingParams,
                 stop_strings: Sequence[str] = (), lstrip: bool = False, compile: bool = False,
                 pixel_values: torch.Tensor | None = None, draft: Draft | None = None,
                 prefill_chunk: int | None = None) -> list[Completion]:
        """Batched: one completion per prompt (`lstrip`: drop leading whitespace, for chat answers;
        `pixel_values`: the tiles of all the prompts' images, in order; `draft`: decode speculatively with it, its
        statistics then in `draft.stats`)."""
        out = []
        if draft is not None:
            if pixel_values is not None:
                raise ValueError("--draft: speculative decoding takes text prompts (no images)")
            rows, draft.stats = speculative_generate(self.model, draft.model, prompts_ids, params, k=draft.k,
                                                     adaptive=draft.adaptive, k_max=draft.k_max)
        else:
            rows = generate(self.model, prompts_ids, params, compile=compile, pixel_values=pixel_values,
                            prefill_chunk=prefill_chunk)
        for ids in rows:
            done = Completer(self.tokenizer, params, tuple(stop_strings), lstrip)
            for t in ids:
                done.push(t)
                if done.reason:
                    break
            if len(ids) < params.max_new_tokens:
                done.end("stop")  # `generate` cut the row at a stop id
            done.finish()
            out.append(done.completion())
        return out

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams,
               stop_strings: Sequence[str] = (), lstrip: bool = False, compile: bool = False,
               pixel_values: torch.Tensor | None = None, session: CacheSession | None = None,
               prefill_chunk: int | None = None) -> Iterator[str]:
        """One prompt, text pieces as they become final; `StopIteration.value` is the `Completion`. `session`: keep
        the cache there, reusing what it held for a prompt that begins alike (a conversation's next turn)."""
        done = Completer(self.tokenizer, params, tuple(stop_strings), lstrip)
        for next_B in token_steps(self.model, [prompt_ids], params, compile=compile, pixel_values=pixel_values,
                                  session=session, prefill_chunk=prefill_chunk):
            piece = done.push(int(next_B[0]))
            if piece:
                yield piece
            if done.reason:
                break
        rest = done.finish()
        if rest:
            yield rest
        return done.completion()
