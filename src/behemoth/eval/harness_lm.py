"""`BehemothLM`: lm-evaluation-harness's model interface over a loaded behemoth model, in-process (imported only
when the harness is installed and asked for; see `harness.py`).

Log-likelihoods come from batched, right-padded forward passes (fp32 log-softmax, as the server computes them);
generation goes through `inference.generate`, greedy unless the task's `gen_kwargs` ask for sampling (`do_sample`
with `temperature`, `top_p`, `top_k`; seeded by `seed`), and is cut at the harness's stop strings (`until`).
Contexts are encoded as `behemoth eval` encodes prompts (`Tokenizer.encode`; `encode_prompt` where the harness
asks for special tokens).

Shape legend: B rows, S positions, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from torch import nn

from behemoth.data.tokenizer import Tokenizer
from behemoth.inference.generate import generate, padded
from behemoth.inference.sampling import SamplingParams


class BehemothLM(TemplateLM):
    def __init__(self, model: nn.Module, tokenizer: Tokenizer, batch_size: int = 32, max_length: int | None = None,
                 seed: int = 1234):
        super().__init__()
        self.model, self.tokenizer, self.batch_size, self.seed = model.eval(), tokenizer, batch_size, seed
        self.max_length = max_length or model.config.max_seq_len
        self._device = next(model.parameters()).device

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode_prompt(string) if add_special_tokens else self.tokenizer.encode(string)

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.tokenizer.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        rows = [(ctx + cont)[-(self.max_length + 1):] for _, ctx, cont in requests]
        n_cont = [len(cont) for _, _, cont in requests]
        return _batched(rows, self.batch_size, lambda b: _score(self.model, b[0], b[1], self._device), extra=n_cont)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for (text,) in [r.args for r in requests]:
            windows = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            scores = self._loglikelihood_tokens([(None, c, t) for c, t in windows])
            out.append(sum(s for s, _ in scores))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for i in range(0, len(requests), self.batch_size):
            chunk = [r.args for r in requests[i:i + self.batch_size]]
            for (_, kw), text in zip(chunk, self._generate(chunk), strict=True):
                stops = kw.get("until") or []
                stops = [stops] if isinstance(stops, str) else stops
                cut = min((text.find(s) for s in stops if s and s in text), default=len(text))
                out.append(text[:cut])
        return out

    def _generate(self, chunk) -> list[str]:
        """Continuations of a chunk of (context, gen_kwargs), in groups of equal sampling settings."""
        texts: list[str] = [""] * len(chunk)
        groups: dict[SamplingParams, list[int]] = {}
        for j, (_, kw) in enumerate(chunk):
            groups.setdefault(self._params(kw), []).append(j)
        for params, idx in groups.items():
            room = self.max_length - params.max_new_tokens  # prompt tokens that fit beside the new ones (the last)
            if room < 1:
                raise ValueError(f"max_gen_toks={params.max_new_tokens} leaves no room for a prompt in "
                                 f"{self.max_length} tokens")
            rows = [self.tok_encode(chunk[j][0])[-room:] for j in idx]
            for j, r in zip(idx, generate(self.model, rows, params), strict=True):
                texts[j] = self.tokenizer.decode(r)
        return texts

    def _params(self, kw: dict) -> SamplingParams:
        """The harness's gen_kwargs as sampling settings: greedy unless `do_sample` (or, without it, a temperature
        above 0) asks otherwise, as transformers' generate reads them."""
        n = int(kw.get("max_gen_toks", 256))
        temperature = float(kw.get("temperature", 0.0) or 0.0)
        sample = bool(kw.get("do_sample", temperature > 0))
        if not sample or temperature == 0:
            return SamplingParams(max_new_tokens=n, stop_ids=(self.eot_token_id,))
        return SamplingParams(max_new_tokens=n, temperature=temperature, top_p=float(kw.get("top_p", 1.0) or 1.0),
                              top_k=kw.get("top_k") or None, seed=self.seed, stop_ids=(self.eot_token_id,))


@torch.no_grad()
def _score(model: nn.Module, rows: list[list[int]], n_cont: list[int], device) -> list[tuple[float, bool]]:
    """(sum of the last n_cont tokens' log-probabilities, whether each is the argmax) for each row, from one
    right-padded forward pass; padding is at position -1 (seen by no query)."""
    ids, pos = padded(rows, device)
    logp = model.logits(model.hidden_states(ids, pos)).float().log_softmax(-1)
    out = []
    for b, (r, n) in enumerate(zip(rows, n_cont, strict=True)):
        at = torch.arange(len(r) - n - 1, len(r) - 1, device=device)
        target = torch.tensor(r[len(r) - n:], device=device)
        lp = logp[b, at]
        out.append((float(lp.gather(-1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all())))
    return out


def _batched(rows: list[list[int]], batch_size: int, fn: Callable, extra: list) -> list:
    """`fn((rows, extra))` over batches of similar lengths (longest first), results in the input order."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    out: list = [None] * len(rows)
    for k in range(0, len(order), batch_size):
        idx = order[k:k + batch_size]
        for i, r in zip(idx, fn(([rows[i] for i in idx], [extra[i] for i in idx])), strict=True):
            out[i] = r
    return out
