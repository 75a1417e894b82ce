"""Choosing the next token: greedy, temperature, top-k, top-p (nucleus), seeded.

Shape legend: B rows, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MIN_TEMPERATURE = 1e-6  # logits of magnitude up to ~1e32 stay finite divided by it


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop.

    temperature 0 is greedy (argmax; top_k/top_p/seed are then irrelevant). top_k keeps the k most
    likely tokens, top_p the smallest set whose probability reaches p (always at least one token).
    `seed` makes sampling reproducible for the same prompts in the same batch. Generation of a row
    ends at the first of `stop_ids` (not included in the output) or after `max_new_tokens`.
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))
        checks = [("max_new_tokens", self.max_new_tokens >= 0, "must be >= 0"),
                  ("temperature", self.temperature >= 0, "must be >= 0"),
                  ("top_k", self.top_k is None or self.top_k >= 1, "must be >= 1"),
                  ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]")]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r}: {why}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_logits(logits_BV: torch.Tensor, top_k: int | None, top_p: float) -> torch.Tensor:
    """Set the logits outside the top-k / top-p set to -inf (fp32 in, fp32 out)."""
    if top_k is not None and top_k < logits_BV.shape[-1]:
        kth_B1 = torch.topk(logits_BV, top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if top_p < 1.0:
        sorted_BV, order_BV = torch.sort(logits_BV, dim=-1, descending=True)
        probs_BV = torch.softmax(sorted_BV, dim=-1)
        before_BV = probs_BV.cumsum(-1) - probs_BV  # mass of the strictly more likely tokens
        drop_BV = before_BV >= top_p
        drop_BV[:, 0] = False  # the most likely token always stays (a top_p below fp32's range would drop it)
        logits_BV = logits_BV.masked_fill(torch.zeros_like(drop_BV).scatter(-1, order_BV, drop_BV), float("-inf"))
    return logits_BV


def distribution(logits_BV: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution [B, V] (fp32) a sampled token is drawn from: temperature, then top-k and top-p. A
    temperature below `MIN_TEMPERATURE` counts as it (already all but greedy): dividing by a far smaller one
    overflows fp32 to inf, and the softmax of infinities is undefined."""
    logits_BV = logits_BV.float() / max(params.temperature, MIN_TEMPERATURE)
    return torch.softmax(filter_logits(logits_BV, params.top_k, params.top_p), dim=-1)


def sample(logits_BV: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids [B] (int64) from logits [B, V] of any dtype (computed in fp32)."""
    if params.greedy:
        return logits_BV.float().argmax(-1)
    return torch.multinomial(distribution(logits_BV, params), 1, generator=generator).squeeze(-1)
