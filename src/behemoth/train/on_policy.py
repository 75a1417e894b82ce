"""On-policy distillation: the student writes, the teacher grades every token it wrote (GKD; MiniLLM).

For a fraction λ = `distill.on_policy` of the optimizer steps (spread evenly: step i is on-policy when
floor((i + 1) λ) > floor(i λ), so λ = 1 is every step, 0 none, 0.25 every fourth), each micro-batch is a
*rollout* instead of the loader's batch (which is still drawn, so the data order does not depend on λ).
`distill.on_policy_start` = f delays the rollouts to the last 1 - f of the run (the steps from f x steps on
count from 0): the first part is plain logit distillation, a warm start for the on-policy part.

1. prompts, `distill.on_policy_rows` of them (0: as many as the micro-batch has rows): the built-in tasks' training
   prompts, a prompt file (.jsonl or text), or the first
   `distill.on_policy_prefix` tokens of each row of the loader's batch (`distill.on_policy_prompts`);
2. the student samples a completion of each (the KV-cache generator, the student's current weights, in eval
   mode so the samples neither move the routing statistics nor see dropout), at `on_policy_temperature`, up
   to `on_policy_tokens` tokens or its EOS;
3. the teacher scores every position of prompt + completion in one forward;
4. the student is trained on the divergence `distill.on_policy_loss` (reverse KL by default; every
   `train.kd.Divergence`, with `distill.temperature` and `distill.top_k` as in KD) between the teacher's and its
   own next-token distributions at the positions whose next token it wrote (its EOS included), with no
   cross-entropy term: its own samples are not targets.

Prompts and sampling are pure functions of (train.seed, optimizer step, micro-batch), so a resumed run draws
exactly the rollouts the uninterrupted one did, with no state to save. Off-policy steps are `DistillStep`'s,
bit for bit. Each step logs `on_policy` (the share of its micro-batches that were rollouts) and the seconds
spent generating (`gen_s`), scoring with the teacher (`score_s`) and on the student's forward and backward
(`train_s`); on a rollout `loss` is the on-policy divergence and `rollout_nll` the student's cross-entropy on its
own samples, and the step's tokens are the completions' (the tokens trained on); `gen_positions` and
`rollout_positions` count the positions the generator ran and the teacher and student computed (cost accounting).

Shape legend: B rows, S rollout length (prompt + completion, right-padded), P prompt length.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from behemoth.data.loader import IGNORE_INDEX, Batch
from behemoth.data.prompts import load_prompts
from behemoth.data.tasks import make_problems
from behemoth.data.tokenizer import Tokenizer
from behemoth.inference.generate import sampled_rows
from behemoth.inference.sampling import SamplingParams
from behemoth.parallel.distributed import rank, world_size
from behemoth.train.config import DistillSection, RouterSection, TrainConfig
from behemoth.train.kd import Divergence
from behemoth.train.kd_weight import KDWeight
from behemoth.train.steps import DistillStep, autocast_context, token_counts
from behemoth.train.teachers import TeacherSource


def on_policy_at(step: int, share: float, start: int = 0) -> bool:
    """Whether optimizer step `step` (0-based) is on-policy at share λ = `share` from step `start` on (module
    docstring)."""
    i = step - start
    return i >= 0 and int((i + 1) * share) > int(i * share)


class PromptPool:
    """Where rollout prompts come from: a fixed list of token-id prompts drawn with replacement, or (`pool`
    None) the first `prefix` tokens of each row of the loader's batch, cut before the first EOS (a packed row may
    begin a document inside its prefix: the prompt is the text before it)."""

    def __init__(self, pool: Sequence[Sequence[int]] | None, prefix: int, seed: int, eos_id: int = -1):
        if pool is not None and not pool:
            raise ValueError("distill.on_policy_prompts: no prompts")
        self.pool, self.prefix, self.seed = [list(p) for p in pool] if pool is not None else None, prefix, seed
        self.eos_id = eos_id

    @property
    def longest(self) -> int:
        """The longest prompt this pool can give, in tokens."""
        return self.prefix if self.pool is None else max(map(len, self.pool))

    def draw(self, batch: Batch, step: int, micro: int, rows: int = 0, rank: int = 0) -> list[list[int]]:
        """`rows` prompts (0: one per row of `batch`), a pure function of (seed, step, micro, rank): each
        data-parallel rank draws its own; corpus prefixes take the batch's rows (this rank's) in turn."""
        rows = rows or batch.input_ids.shape[0]
        if self.pool is None:
            prefixes = [_before_eos(r, self.eos_id) for r in batch.input_ids[:, :self.prefix].tolist()]
            return [prefixes[i % len(prefixes)] for i in range(rows)]
        rng = np.random.default_rng([self.seed, step, micro, rank])
        return [self.pool[i] for i in rng.integers(0, len(self.pool), rows).tolist()]


def _before_eos(ids: list[int], eos_id: int) -> list[int]:
    """`ids` up to its first EOS; what follows it where the row starts with one."""
    cut = ids.index(eos_id) if eos_id in ids else len(ids)
    return ids[:cut] if cut > 0 else (ids[1:] or ids)


def rollout_seed(seed: int, step: int, micro: int, rank: int = 0) -> int:
    """The sampling generator's seed of one rollout micro-batch on one rank (63 bits of a hash)."""
    digest = hashlib.blake2b(f"behemoth.on_policy|{seed}|{step}|{micro}|{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def rollout_batch(prompts: list[list[int]], completions: list[list[int]], eos_id: int,
                  device: torch.device) -> Batch:
    """Prompt + completion rows (+ EOS where the student stopped there), right-padded, as a training batch:
    labels are the student's own tokens, IGNORE_INDEX on the prompt and the padding; the padding has position -1,
    as in generation and image-text rows, so no real token attends to it and it counts in no expert's load."""
    rows = [p + c for p, c in zip(prompts, completions, strict=True)]
    S = max(len(r) for r in rows) - 1
    ids_BS = torch.full((len(rows), S + 1), eos_id, dtype=torch.long)
    labels_BS = torch.full((len(rows), S), IGNORE_INDEX, dtype=torch.long)
    positions_BS = torch.full((len(rows), S), -1, dtype=torch.long)
    for b, (p, r) in enumerate(zip(prompts, rows, strict=True)):
        ids_BS[b, :len(r)] = torch.tensor(r)
        labels_BS[b, len(p) - 1:len(r) - 1] = ids_BS[b, len(p):len(r)]
        positions_BS[b, :len(r) - 1] = torch.arange(len(r) - 1)
    batch = Batch(ids_BS[:, :-1].contiguous(), labels_BS, positions_BS, torch.zeros_like(positions_BS),
                  num_labelled=int((labels_BS != IGNORE_INDEX).sum()))
    return batch.to(device)


class OnPolicyDistillStep(DistillStep):
    """`DistillStep` with a share λ of its optimizer steps trained on the student's own rollouts (module
    docstring). `pool`: the prompts; `eos_id`: the token that ends a completion; `seed`: the run's."""

    def __init__(self, student: nn.Module, teacher: nn.Module, router: RouterSection, distill: DistillSection,
                 autocast_dtype: torch.dtype | None, pool: PromptPool, eos_id: int, seed: int):
        super().__init__(student, teacher, router, distill, autocast_dtype)
        self.pool, self.eos_id, self.seed = pool, eos_id, seed
        self.rank = rank()
        self.share = distill.on_policy
        need = pool.longest + distill.on_policy_tokens
        if need > student.config.max_seq_len:
            raise ValueError(f"distill.on_policy_tokens={distill.on_policy_tokens}: the longest rollout prompt "
                             f"({pool.longest} tokens) and its completion exceed the student's max_seq_len "
                             f"({student.config.max_seq_len})")
        self.on_div = Divergence(kind=distill.on_policy_loss, temperature=distill.temperature, beta=distill.beta,
                                 skew=distill.skew, missing_mass=distill.missing_mass)
        self.kd_only = KDWeight(schedule="constant", alpha=1.0)
        self.on_now, self.micro = False, 0

    def begin_step(self, index: int, total: int) -> None:
        super().begin_step(index, total)
        self.on_now = on_policy_at(index, self.share, round(self.cfg.on_policy_start * total))
        self.micro = 0

    def forward_backward(self, batch: Batch, loss_scale: float) -> dict:
        micro, self.micro = self.micro, self.micro + 1
        if not self.on_now:
            return {**super().forward_backward(batch, loss_scale), "on_policy": 0.0}
        device, step = batch.input_ids.device, self.schedule_at[0]
        t0 = _clock(device)
        prompts = self.pool.draw(batch, step, micro, self.cfg.on_policy_rows, self.rank)
        completions, decode_steps = self.sample(prompts, rollout_seed(self.seed, step, micro, self.rank))
        rollout = rollout_batch(prompts, completions, self.eos_id, device)
        t1 = _clock(device)
        targets = self._targets(rollout)
        t2 = _clock(device)
        divisor, share = token_counts(rollout)  # the rollout's loss: the on-policy divergence alone
        loss, metrics = self._distill(rollout, self._hidden(rollout), targets, divisor, self.on_div, self.kd_only)
        # on a rollout the cross-entropy is the student's surprise at its own samples, not a loss it minimises:
        # logged as `rollout_nll`, and `loss` (the progress line's) is the divergence it does minimise
        metrics["rollout_nll"], metrics["loss"] = metrics["loss"], metrics["kd_loss"]
        out = self._finish(loss, metrics, self.moes, loss_scale, share)
        t3 = _clock(device)
        # the work done, for cost accounting: positions the generator ran (every row, its prompt padded to the
        # longest, for every decode step taken), and positions scored by the teacher and trained
        decoded = len(prompts) * (max(map(len, prompts)) + decode_steps)
        return {**out, "on_policy": 1.0, "gen_s": t1 - t0, "score_s": t2 - t1, "train_s": t3 - t2,
                "gen_positions": float(decoded), "rollout_positions": float(rollout.input_ids.numel())}

    @torch.no_grad()
    def sample(self, prompts: list[list[int]], seed: int) -> tuple[list[list[int]], int]:
        """The student's completions of `prompts` (each ending with EOS where it stopped there) and the decode steps
        taken, with the current weights, eagerly (a compiled training model is not recompiled for generation) and in
        eval mode (restored after). Alone, decoding stops once every row has stopped, checked every 16 steps as
        `generate` does; in a distributed run every rank decodes all `on_policy_tokens` steps: a sharded or
        expert-parallel forward is a collective, and ranks whose rows stopped at different steps would otherwise
        wait for each other forever."""
        c = self.cfg
        params = SamplingParams(max_new_tokens=c.on_policy_tokens, temperature=c.on_policy_temperature, seed=seed,
                                stop_ids=(self.eos_id,))
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.compiler.set_stance("force_eager"), autocast_context(next(self.model.parameters()).device,
                                                                            self.autocast_dtype):
                rows = sampled_rows(self.model, prompts, params, early_stop=world_size() == 1)
        finally:
            self.model.train(was_training)
        out = [next((r[:j + 1] for j, t in enumerate(r) if t == self.eos_id), r) for r in rows]  # EOS kept
        return out, len(rows[0])


def _clock(device: torch.device) -> float:
    """The time, once the device's queued work is done (on a GPU, phases are timed by their work, not their
    launches)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def check_on_policy(cfg: TrainConfig, mode: str, teacher: TeacherSource) -> None:
    """On-policy settings a run can use, checked before anything is built (`ValueError` naming the key); the
    rollout prompts are made here, once (`teacher.prompts`)."""
    if cfg.distill.on_policy <= 0:
        return
    why = ("applies to `behemoth distill` (a frozen teacher grades the student's samples)" if mode != "distill" else
           "needs a teacher model to grade the student's samples; a distill.cache holds targets for the corpus only"
           if teacher.cache is not None else
           "needs a teacher with the student's tokenizer (it grades the student's own tokens)"
           if teacher.student_tokenizer is not None else
           "is for text; image-text data (data.images) has no rollouts" if cfg.data.images else None)
    if why:
        raise ValueError(f"distill.on_policy={cfg.distill.on_policy}: on-policy distillation {why}")
    teacher.prompts = prompt_pool(cfg, teacher.tokenizer)  # a bad prompt file is found now


def prompt_pool(cfg: TrainConfig, tok: Tokenizer) -> PromptPool:
    """The rollout prompts of `distill.on_policy_prompts` (module docstring), as `tok`'s token ids."""
    d, source = cfg.distill, cfg.distill.on_policy_prompts
    if source == "auto":
        source = "tasks" if cfg.data.path is None else "corpus"
    if source == "corpus":
        return PromptPool(None, min(d.on_policy_prefix, cfg.data.seq_len), cfg.train.seed, tok.eos_id)
    if source == "tasks":
        texts = [p.prompt for p in make_problems("train", cfg.data.num_problems, seed=cfg.train.seed,
                                                 tasks=cfg.data.tasks, difficulty=cfg.data.difficulty)]
    else:
        try:
            texts = [p.text for p in load_prompts(source)[0]]
        except ValueError as e:
            raise ValueError(f"distill.on_policy_prompts: {e}") from None
    ids = [tok.encode(t) for t in texts]
    if any(not i for i in ids):
        raise ValueError(f"distill.on_policy_prompts={source}: a prompt encodes to no tokens")
    return PromptPool(ids, d.on_policy_prefix, cfg.train.seed, tok.eos_id)
