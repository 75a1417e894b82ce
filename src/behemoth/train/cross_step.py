"""Distillation across tokenizers: a frozen teacher (any family, `checkpoint/foreign.py`, or native) whose
tokenizer differs from the student's.

Per micro-batch: the student's rows are cut into document pieces, each turned back into text and tokenized by
the teacher (`token_align.plan_cross_batch`); the teacher runs on those rows; every student position whose
context is the same text as some teacher position's (the same byte prefix) is matched with it; the teacher's
distribution there is compared with the student's by `distill.cross_method` (`cross_kd.py`). Positions with
no match train on the hard label alone (their KD weight is 0), so the loss stays a mean over labelled tokens.

Shape legend: B rows, S student positions, N = B * S, R teacher rows, L their length, D teacher width.
"""

from __future__ import annotations

import torch
from torch import nn

from behemoth.data.loader import Batch
from behemoth.data.token_bytes import TokenBytes
from behemoth.data.tokenizer import Tokenizer
from behemoth.train.config import DistillSection, RouterSection
from behemoth.train.kd_loss import CrossTargets
from behemoth.train.steps import DistillStep, autocast_context, token_counts
from behemoth.train.token_align import ContinuationMap, VocabMap, alignment_rate, plan_cross_batch


@torch.no_grad()
def teacher_rows(teacher: nn.Module, ids_RL: torch.Tensor, mask_RL: torch.Tensor,
                 autocast: torch.dtype | None) -> torch.Tensor:
    """The teacher's final hidden states [R, L, D] for right-padded rows of its own tokens, each row a text
    from position 0: a transformers teacher's `hidden_rows`, or a native one with padding at position -1."""
    with autocast_context(ids_RL.device, autocast):
        if hasattr(teacher, "hidden_rows"):
            return teacher.hidden_rows(ids_RL, mask_RL)
        pos_RL = torch.where(mask_RL, torch.arange(ids_RL.shape[1], device=ids_RL.device), -1)
        return teacher.hidden_states(ids_RL, positions=pos_RL, segment_ids=torch.zeros_like(ids_RL))


class CrossTokenizerDistillStep(DistillStep):
    """`DistillStep` with a teacher of another tokenizer: its targets are `CrossTargets` at the aligned student
    positions (the module docstring). Logs `kd_aligned`, the share of labelled positions matched."""

    def __init__(self, student: nn.Module, teacher: nn.Module, teacher_tok: Tokenizer, student_tok: Tokenizer,
                 router: RouterSection, distill: DistillSection, autocast_dtype: torch.dtype | None = None):
        super().__init__(student, teacher, router, distill, autocast_dtype)
        self.teacher_tok = teacher_tok
        self.student_bytes, self.teacher_bytes = TokenBytes.of(student_tok), TokenBytes.of(teacher_tok)
        # marginal: the aligned method at every position; hybrid (and uld, which maps nothing) take it as prefix
        self.marginal = distill.vocab_match == "marginal" and distill.cross_method == "aligned"
        match = "prefix" if distill.vocab_match == "marginal" else distill.vocab_match
        self.vmap = (ContinuationMap.build(teacher_tok, self.teacher_bytes, student_tok, self.student_bytes)
                     if self.marginal else
                     VocabMap.build(teacher_tok, self.teacher_bytes, student_tok, self.student_bytes, match))
        self._vmap_on: dict[torch.device, VocabMap] = {}
        self._rate = 0.0

    def _vmap(self, device: torch.device) -> VocabMap | ContinuationMap:
        if device not in self._vmap_on:
            self._vmap_on[device] = self.vmap.to(device)
        return self._vmap_on[device]

    def _targets(self, batch: Batch) -> CrossTargets:
        plan = plan_cross_batch(batch.input_ids.cpu(), batch.positions.cpu(), batch.segment_ids.cpu(),
                                self.student_bytes, self.teacher_tok, self.teacher_bytes)
        if self.marginal:  # every position with a teacher position before it, at whatever offset
            plan = plan._replace(index=plan.position, aligned=plan.offset >= 0)
        self._rate = alignment_rate(plan, batch.labels.cpu())
        dev = batch.input_ids.device
        aligned_N = plan.aligned.to(dev)
        extra = {}
        if self.marginal:
            flat = plan.teacher_ids.flatten()
            nxt = (plan.index + 1).clamp(0, max(flat.numel() - 1, 0))
            extra = {"offset": plan.offset.to(dev), "next_ids": (flat[nxt] if flat.numel() else plan.offset).to(dev)}
        if plan.teacher_ids.numel():
            h_RLD = teacher_rows(self.teacher, plan.teacher_ids.to(dev), plan.teacher_mask.to(dev),
                                 self.autocast_dtype)
            h_ND = h_RLD.flatten(0, 1)[plan.index.to(dev).clamp_min(0)]
        else:  # no text in the batch: nothing to align, but the teacher still runs once (a one-token row): under
            # torchrun it is sharded, and every rank must join each of its forward passes
            one = torch.full((1, 1), self.teacher_tok.eos_id, dtype=torch.long, device=dev)
            teacher_rows(self.teacher, one, torch.ones_like(one, dtype=torch.bool), self.autocast_dtype)
            h_ND = None
            aligned_N = torch.zeros_like(aligned_N)
        head, vocab = self.teacher.logits, self.teacher.config.vocab_size

        def logits(start: int, end: int) -> torch.Tensor:
            if h_ND is None:
                return torch.zeros(end - start, vocab, device=dev)
            with torch.no_grad():
                return head(h_ND[start:end]).float()

        return CrossTargets(logits, aligned_N, self._vmap(dev), self.cfg.cross_method, self.cfg.uld_weight, **extra)

    def forward_backward(self, batch: Batch, loss_scale: float) -> dict:
        teacher = self._targets(batch)
        divisor, share = token_counts(batch)
        loss, metrics = self._distill(batch, self._hidden(batch), teacher, divisor)
        metrics["kd_aligned"] = self._rate
        return self._finish(loss, metrics, self.moes, loss_scale, share)


def overlap_report(teacher_tok: Tokenizer, student_tok: Tokenizer, train, cfg, teacher: nn.Module | None,
                   t_bytes: TokenBytes, s_bytes: TokenBytes, measure_mass: bool = True) -> tuple[str, dict]:
    """One line for the start of a run, and its figures for metrics.jsonl: the method, the vocabularies'
    overlap, and on the first training rows the share of positions matched and (when the teacher's weights are
    here and `measure_mass`: not in a distributed run, where rank 0 holds the whole teacher in CPU memory) the
    teacher's mass on the shared and on the mapped tokens, from one row, its head applied in chunks."""
    from behemoth.train.datasets import make_loader

    match = cfg.distill.vocab_match
    vmap = VocabMap.build(teacher_tok, t_bytes, student_tok, s_bytes, "exact" if match == "exact" else "prefix")
    exact_map = VocabMap.build(teacher_tok, t_bytes, student_tok, s_bytes, "exact")
    exact = exact_map.summary()
    batch = next(iter(make_loader(train, min(cfg.train.batch_size, 4), cfg.data.seq_len, cfg.train.seed,
                                  shuffle=False)))
    plan = plan_cross_batch(batch.input_ids, batch.positions, batch.segment_ids, s_bytes, teacher_tok, t_bytes)
    if match == "marginal" and cfg.distill.cross_method == "aligned":
        plan = plan._replace(aligned=plan.offset >= 0)
    line = (f"teacher: another tokenizer ({teacher_tok.vocab_size:,} tokens vs the student's "
            f"{student_tok.vocab_size:,}); distilling across tokenizers with distill.cross_method="
            f"{cfg.distill.cross_method}: {exact['shared_tokens']:,} shared tokens ({exact['student_share']:.0%} of "
            f"the student's vocabulary, {exact['teacher_share']:.0%} of the teacher's); distill.vocab_match="
            f"{cfg.distill.vocab_match} maps {vmap.summary()['teacher_share']:.0%} of the teacher's tokens; "
            f"{alignment_rate(plan, batch.labels):.0%} of positions aligned")
    stats = {"cross_method": cfg.distill.cross_method, "vocab_match": match, "teacher_vocab": teacher_tok.vocab_size,
             "student_vocab": student_tok.vocab_size, "shared_tokens": exact["shared_tokens"],
             "teacher_tokens_mapped": vmap.summary()["teacher_tokens_mapped"],
             "matched_positions": alignment_rate(plan, batch.labels)}
    params = list(teacher.parameters()) if teacher is not None else []
    if measure_mass and params and not params[0].is_meta and plan.teacher_ids.numel():
        dev, mask = params[0].device, plan.teacher_mask[:1]
        h = teacher_rows(teacher, plan.teacher_ids[:1].to(dev), mask.to(dev), None)[0][mask[0].to(dev)]
        shared, mapped = [], []
        for start in range(0, h.shape[0], 256):
            with torch.no_grad():
                lp = torch.log_softmax(teacher.logits(h[start:start + 256]).float(), -1).cpu()
            shared.append(exact_map.shared_mass(lp))
            mapped.append(vmap.shared_mass(lp))
        stats["teacher_mass_shared"] = float(torch.cat(shared).mean())
        stats["teacher_mass_mapped"] = float(torch.cat(mapped).mean())
        line += (f", teacher mass on shared tokens {stats['teacher_mass_shared']:.0%}"
                 f" (mapped: {stats['teacher_mass_mapped']:.0%})")
    return line + " (first batch)", stats
