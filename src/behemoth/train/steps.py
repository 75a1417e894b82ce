"""Steps: the forward, loss and backward of one micro-batch, one class per training paradigm.

The trainer owns the loop (schedule, clipping, optimizer, logging, checkpoints) and knows nothing of
losses; a step knows nothing of the loop. A new paradigm is a new `Step` here (and one entry in
`train/run.py`'s table of modes), not a branch in the loop.
"""

from __future__ import annotations

import contextlib
from typing import Protocol

import torch
from torch import nn

from behemoth.data.loader import Batch
from behemoth.model.moe import MoE
from behemoth.parallel.distributed import mean_over_ranks
from behemoth.train.config import DistillSection, RouterSection
from behemoth.train.kd import Divergence, Teacher, TopK, teacher_topk
from behemoth.train.kd_loss import distill_loss
from behemoth.train.kd_weight import KDWeight
from behemoth.train.losses import balance_loss, chunked_cross_entropy, router_entropy, router_z_loss


class Step(Protocol):
    """What the trainer calls, once per micro-batch (`forward_backward`) or per optimizer step."""

    def trained_models(self) -> dict[str, nn.Module]:
        """What the optimizer updates and checkpoints save ("model" first)."""

    def begin_step(self, index: int, total: int) -> None:
        """Called before optimizer step `index` (0-based) of `total`, for losses that follow a schedule."""

    def forward_backward(self, batch: Batch, loss_scale: float) -> dict:
        """Losses as floats, "tokens", "nonfinite", and "router_entropy" [L] for the MoE layers."""

    def eval_loss(self, batch: Batch) -> tuple[float, int]:
        """(sum of token losses, number of tokens) of the trained model, without gradients."""


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def token_counts(batch: Batch) -> tuple[float, float]:
    """(divisor, labelled share) of a micro-batch, from its number n of labelled tokens.

    divisor: what its losses summed over labelled tokens are divided by: n (1 when there are none) in one
    process; in a distributed run the ranks' mean n (`parallel.distributed.mean_over_ranks`), so that the
    ranks' average is the mean over the whole batch's tokens. share: the fraction of the batch's positions
    that have a label (1.0 for packed text), over all ranks (each holds the same number of positions)."""
    mean = mean_over_ranks(batch.labelled)  # counted on the CPU (`Batch.to`): no device sync
    return mean or 1, mean / max(batch.labels.numel(), 1)


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """bf16 autocast (fp32 master weights) when `dtype` is given, else nothing."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@torch.no_grad()
def teacher_hidden(teacher: nn.Module, batch: Batch, autocast: torch.dtype | None) -> torch.Tensor:
    """A frozen teacher's final hidden states [B*S, D] for a batch (no gradients, under `autocast`)."""
    with autocast_context(batch.input_ids.device, autocast):
        return teacher.hidden_states(batch.input_ids, **batch.model_inputs).flatten(0, 1)


class PretrainStep:
    """Next-token cross-entropy (mean over labelled tokens) + router z-loss and balance loss.

    The router losses are averaged over MoE layers, so their coefficients do not depend on depth. They are
    means over every routed token while the cross-entropy is a mean over the labelled ones, so they are
    weighted by the batch's labelled share: packed text (every position labelled) is unchanged, and data
    whose loss covers a few tokens per row (image-text examples: the answer after a picture and a
    question) keeps the ratio of the two. Unweighted, the z-loss gradient reaching the few image tokens of
    each row outweighs the answer's and flattens the image features.
    """

    def __init__(self, model: nn.Module, router: RouterSection, autocast_dtype: torch.dtype | None = None):
        self.model, self.router_cfg, self.autocast_dtype = model, router, autocast_dtype
        self.moes = moe_layers(model)

    def trained_models(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def begin_step(self, index: int, total: int) -> None:
        """The next-token loss has no schedule."""

    def _hidden(self, batch: Batch) -> torch.Tensor:
        with autocast_context(batch.input_ids.device, self.autocast_dtype):
            return self.model.hidden_states(batch.input_ids, **batch.model_inputs)

    def _cross_entropy(self, model: nn.Module, h_BSD: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, int]:
        with autocast_context(batch.input_ids.device, self.autocast_dtype):
            return chunked_cross_entropy(h_BSD.flatten(0, 1), model.logits, batch.labels.flatten(),
                                         count=batch.labelled)

    def forward_backward(self, batch: Batch, loss_scale: float) -> dict:
        ce_sum, n = self._cross_entropy(self.model, self._hidden(batch), batch)
        divisor, share = token_counts(batch)
        ce = ce_sum / divisor
        return self._finish(ce, {"loss": ce.detach(), "tokens": n}, self.moes, loss_scale, share)

    def _router_losses(self, loss: torch.Tensor, moes: list[MoE], share: float) -> tuple[torch.Tensor, dict]:
        """Add the z-loss and balance loss of `moes` (mean over layers) from their last forward, weighted by
        `share`, the batch's labelled share of positions (see the class docstring); logged unweighted."""
        if not moes:
            return loss, {}
        cfg = self.router_cfg
        flat = lambda t: None if t is None else t.flatten(0, 1)  # noqa: E731  [B, S, ...] -> [B*S, ...]
        z = torch.stack([router_z_loss(m.last_router_logits, m.last_valid) for m in moes]).mean()
        bal = torch.stack([balance_loss(flat(m.last_router_logits), flat(m.last_expert_ids), flat(m.last_valid))
                           for m in moes]).mean()
        router = cfg.z_loss_coef * z + cfg.balance_loss_coef * bal
        metrics = {"z_loss": z.detach(), "balance_loss": bal.detach()}
        if cfg.seq_balance_loss_coef:
            seq = torch.stack([balance_loss(m.last_router_logits, m.last_expert_ids, m.last_valid)
                               for m in moes]).mean()
            router, metrics["seq_balance_loss"] = router + cfg.seq_balance_loss_coef * seq, seq.detach()
        with torch.no_grad():
            metrics["router_entropy"] = torch.stack([router_entropy(m.last_router_logits, m.last_valid)
                                                     for m in moes])
        for m in moes:
            m.last_router_logits = m.last_expert_ids = m.last_valid = None
        return loss + share * router, metrics

    def _finish(self, loss: torch.Tensor, metrics: dict, moes: list[MoE], loss_scale: float, share: float) -> dict:
        """Router losses of the trained model (weighted by the labelled `share`), backward. The metrics stay on the
        device, as 0-dim tensors (`nonfinite` too: the loss was not finite); the trainer reads a whole step's in one
        transfer. A non-finite loss still runs backward (every rank's collectives stay matched) and the trainer
        skips the step on it or on a non-finite gradient norm."""
        loss, router = self._router_losses(loss, moes, share)
        metrics.update(router)
        metrics["nonfinite"] = ~torch.isfinite(loss.detach())
        (loss * loss_scale).backward()
        return metrics

    @torch.no_grad()
    def eval_loss(self, batch: Batch) -> tuple[float, int]:
        ce_sum, n = self._cross_entropy(self.model, self._hidden(batch), batch)
        return ce_sum.item(), n


class DistillStep(PretrainStep):
    """Online distillation: a frozen teacher (eval, no gradients; any size or shape, MoE or dense) and
    a student trained with (1 - alpha_t) CE + alpha_t KD, plus the student's router losses.

    The teacher's trunk runs once per micro-batch; its output head runs chunk by chunk inside the KD
    loss, so neither model's full [N, V] logits are held at once. With `top_k` the student sees only
    the teacher's top-k log-probabilities, exactly what an offline cache would hold. Where the teacher's
    targets come from is `_targets`: subclasses change that alone.
    """

    MATERIALIZE_LOGITS = 2**25  # logits elements (tokens x vocab) held at once rather than recomputed per chunk

    def __init__(self, student: nn.Module, teacher: nn.Module | None, router: RouterSection,
                 distill: DistillSection, autocast_dtype: torch.dtype | None = None):
        super().__init__(student, router, autocast_dtype)
        self.teacher = teacher.eval().requires_grad_(False) if teacher is not None else None
        self.cfg = distill
        self.div = Divergence(kind=distill.loss, temperature=distill.temperature, beta=distill.beta,
                              skew=distill.skew, missing_mass=distill.missing_mass)
        self.weight = KDWeight(schedule=distill.schedule, alpha=distill.alpha, alpha_start=distill.alpha_start,
                               alpha_end=distill.alpha_end, warmup_fraction=distill.warmup_fraction,
                               decay_fraction=distill.decay_fraction, token_rule=distill.token_rule)
        self.schedule_at = (0, 1)  # (optimizer step, total): where the KD weight's schedule stands

    def begin_step(self, index: int, total: int) -> None:
        self.schedule_at = (index, total)

    def _targets_from_hidden(self, h_ND: torch.Tensor) -> Teacher:
        """The teacher's targets from its hidden states: dense logits, chunk by chunk (or at once when small
        enough to hold), or its top-k over the student's vocabulary."""
        head = self.teacher.logits
        if self.cfg.top_k:
            return teacher_topk(head, h_ND, self.cfg.top_k, self.div.temperature, self.model.config.vocab_size)

        def logits(start: int, end: int) -> torch.Tensor:
            with torch.no_grad():
                return head(h_ND[start:end]).float()

        # Small enough to hold (e.g. 2k tokens x 2k vocab = 16 MB): compute the teacher's logits once
        # rather than per chunk. At Llama 4's vocabulary (8k tokens x 202k = 6.6 GB) they stay chunked.
        small = h_ND.shape[0] * self.teacher.config.vocab_size <= self.MATERIALIZE_LOGITS
        return logits(0, h_ND.shape[0]) if small else logits

    def _targets(self, batch: Batch) -> Teacher:
        return self._targets_from_hidden(teacher_hidden(self.teacher, batch, self.autocast_dtype))

    def _distill(self, batch: Batch, h_BSD: torch.Tensor, teacher: Teacher, divisor: float,
                 div: Divergence | None = None, weight: KDWeight | None = None) -> tuple[torch.Tensor, dict]:
        """The mixed CE + KD loss over the batch's labelled tokens (summed, then divided by `divisor`, see
        `token_counts`) and its metrics; `div` and `weight` default to the run's divergence and KD weight."""
        with autocast_context(batch.input_ids.device, self.autocast_dtype):
            # The tokenizers were checked identical before the first step, so teacher columns beyond the
            # student's vocabulary are padding: dropped and the teacher renormalised, without a mass check.
            # Logits small enough to hold at once: keep each chunk's activations for backward instead of
            # recomputing them. At Llama 4's vocabulary they are not.
            small = h_BSD.shape[0] * h_BSD.shape[1] * self.model.config.vocab_size <= self.MATERIALIZE_LOGITS
            res = distill_loss(h_BSD.flatten(0, 1), self.model.logits, batch.labels.flatten(), teacher,
                               div or self.div, weight or self.weight, *self.schedule_at, max_padded_mass=None,
                               recompute=not small, count=batch.labelled)
        metrics = {"loss": res.ce_sum.detach() / divisor, "kd_loss": res.kd_sum.detach() / divisor,
                   "kd_weight": res.alpha_sum / divisor, "tokens": res.tokens}
        return res.loss_sum / divisor, metrics

    def forward_backward(self, batch: Batch, loss_scale: float) -> dict:
        teacher = self._targets(batch)
        divisor, share = token_counts(batch)
        loss, metrics = self._distill(batch, self._hidden(batch), teacher, divisor)
        return self._finish(loss, metrics, self.moes, loss_scale, share)


class CachedDistillStep(DistillStep):
    """Offline distillation: DistillStep with the teacher's top-k read from a `TeacherCache` (written by
    `behemoth distill-cache`) for the batch's windows (`Batch.offsets`) instead of a teacher forward.

    The cache holds, for every window the loader can cut, the top-k the online teacher would compute for
    it, so this trains as DistillStep with `distill.top_k` = the cache's k does (exactly, with f32 values;
    within the quantization bound with u8). `distill.top_k` < k uses each position's top `top_k` entries.
    """

    def __init__(self, student: nn.Module, cache, router: RouterSection, distill: DistillSection,
                 autocast_dtype: torch.dtype | None = None):
        super().__init__(student, None, router, distill, autocast_dtype)
        self.cache = cache

    def _targets(self, batch: Batch) -> Teacher:
        if batch.offsets is None:
            raise ValueError("cached distillation needs Batch.offsets (batches from behemoth.data.DataLoader)")
        return TopK(*self.cache.targets(batch.offsets, top_k=self.cfg.top_k or None,
                                        vocab_size=self.model.config.vocab_size, device=batch.input_ids.device))


class CodistillStep(DistillStep):
    """Codistillation: teacher and student train in the same run on the same batches.

    The teacher's forward pass for its own next-token loss also gives the student's soft targets
    (its hidden states, detached), so the teacher's trunk runs once per batch for both purposes;
    only its output head is applied a second time, chunk by chunk, for the targets.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, router: RouterSection, distill: DistillSection,
                 autocast_dtype: torch.dtype | None = None):
        super().__init__(student, teacher, router, distill, autocast_dtype)
        self.teacher = teacher.train().requires_grad_(True)
        self.teacher_moes = moe_layers(teacher)

    def trained_models(self) -> dict[str, nn.Module]:
        return {"model": self.model, "teacher": self.teacher}

    def forward_backward(self, batch: Batch, loss_scale: float) -> dict:
        with autocast_context(batch.input_ids.device, self.autocast_dtype):
            h_t = self.teacher.hidden_states(batch.input_ids, **batch.model_inputs)
        t_ce_sum, _ = self._cross_entropy(self.teacher, h_t, batch)
        divisor, share = token_counts(batch)
        teacher_loss, t_metrics = self._router_losses(t_ce_sum / divisor, self.teacher_moes, share)
        targets = self._targets_from_hidden(h_t.detach().flatten(0, 1))
        loss, metrics = self._distill(batch, self._hidden(batch), targets, divisor)
        metrics["teacher_loss"] = t_ce_sum.detach() / divisor
        metrics.update({f"teacher_{k}": v for k, v in t_metrics.items() if k != "router_entropy"})
        return self._finish(loss + teacher_loss, metrics, self.moes, loss_scale, share)
