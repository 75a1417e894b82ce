"""Auxiliary-loss-free routing balance: the rules that move each expert's selection bias.

Every MoE layer's router adds a bias b_e to its logits to *select* experts (never to weight them,
`model/moe.py`). After every optimizer step the trainer moves the biases by that step's global load
(routed slots per expert, summed over micro-batches and ranks), pushing overloaded experts down and
starved ones up (DeepSeek-V3's auxiliary-loss-free balancing). Three rules, `router.bias_update`:

  sign          b_e += rate * sign(mean - c_e)   (DeepSeek-V3, rate = gamma = 1e-3)
                A fixed step whatever the error: the bias spread grows at most linearly with the steps, so
                in a run of a few hundred steps it cannot undo a logit gap of a unit, and layers collapse.
  proportional  b_e += rate * (mean - c_e) / mean
                The step follows the load error: fast against a collapse, but its gain is fixed, and where
                many tokens sit near a tie (router margins of ~0.1 are common early) a step large enough to
                revive a dead expert moves so many tokens that the loads oscillate from step to step: the
                layer looks balanced over a window while each step is lopsided and tokens keep changing expert.
  adaptive      b_e += s_e * (mean - c_e) / mean: the proportional step, with a gain s_e per expert that starts at
                the rate, grows by 1.5x while the sign of the expert's error stays the same and halves when it
                flips (as Rprop adapts its steps), within [rate / 10, max_step]. A starved expert or a hog
                accelerates geometrically until it is fixed; an expert that overshoots, or whose load only
                wobbles with sampling noise around the mean, has its gain shrink to rate / 10, so a balanced
                layer's routing stays put. The default, with rate 0.01 (so the floor is DeepSeek-V3's gamma,
                1e-3) and max_step 0.05 (`router.bias_max_step`).

Selection noise (`router.selection_noise`, training only): Gaussian noise of that standard deviation on the
biased logits when the experts are chosen. Tokens that are identical (a picture's plain background gives many
identical patch tokens) have identical logits and go to the same expert whatever the biases: a bias that pushes
that expert down only moves the whole group to the next one, so the per-step load stays lopsided and the group's
expert keeps changing. The noise splits the group among the experts whose scores are near the top, and the biases
then balance the expected loads. Scores, and so the weights' gradients, stay those of the unbiased logits. Off
by default: on the vision recipe at lr 1e-3 it balanced every seed, but one run in three did not learn to read the
pictures; at lr 5e-4, the demo's multimodal recipe (`demo.VISION_FULL`), every seed learned and stayed balanced
(README, "Measured").

All three re-centre the biases to zero mean afterwards (it changes no selection) and depend on the counts
only through their relation to the mean, so the update is invariant to batch size; an expert exactly at
the mean, or a step that routed nothing, moves nothing.

Shape legend: L MoE layers, E experts.
"""

from __future__ import annotations

import torch
from torch import nn

from behemoth.train.config import BIAS_RULES, RouterSection

GROW, SHRINK = 1.5, 0.5  # adaptive: step factor while the error keeps its sign / when it flips
MIN_STEP_FRACTION = 0.1  # adaptive: the smallest step, as a share of the rate


@torch.no_grad()
def update_expert_bias(bias_E: torch.Tensor, counts_E: torch.Tensor, rate: float, rule: str = "sign") -> None:
    """One step of a stateless rule (`sign` or `proportional`, module docstring) on one layer's bias [E],
    in place, from its routed counts [E]."""
    counts = counts_E.double()
    mean = counts.mean().clamp_min(1e-12)  # all-zero counts: zero errors, nothing moves (and no host sync)
    if rule == "sign":
        step = torch.sign(mean - counts)
    elif rule == "proportional":
        step = (mean - counts) / mean
    else:
        raise ValueError(f"router.bias_update={rule!r} is not one of {', '.join(BIAS_RULES)}")
    bias_E += (rate * step).to(bias_E.dtype)
    bias_E -= bias_E.mean()


@torch.no_grad()
def adaptive_bias_step(bias_E: torch.Tensor, counts_E: torch.Tensor, step_E: torch.Tensor, last_E: torch.Tensor,
                       min_step: float, max_step: float) -> None:
    """One step of the `adaptive` rule on one layer, in place: bias [E], counts [E], the per-expert gains [E]
    and the sign of each expert's last nonzero error [E] (0 before any)."""
    counts = counts_E.double()
    mean = counts.mean().clamp_min(1e-12)  # all-zero counts: zero errors and signs, nothing moves (no host sync)
    err = ((mean - counts) / mean).to(step_E.dtype)
    sign = torch.sign(err)
    agree = sign * last_E
    factor = torch.where(agree > 0, GROW, torch.where(agree < 0, SHRINK, 1.0))
    step_E.copy_((step_E * factor).clamp(min_step, max_step))
    bias_E += (step_E * err).to(bias_E.dtype)
    bias_E -= bias_E.mean()
    last_E.copy_(torch.where(sign != 0, sign, last_E))


class BiasBalancer:
    """Moves the selection bias of every MoE layer in `moes` after each optimizer step (`update`), by the
    rule and rate of `router`, from the layers' `tokens_per_expert`. Keeps the adaptive rule's state, which
    a training checkpoint saves (`state_dict`) so that a resumed run moves its biases as an unbroken one."""

    def __init__(self, moes: list[nn.Module], router: RouterSection):
        """Also gives every layer's router `router.selection_noise` (module docstring)."""
        self.moes, self.rule, self.rate = moes, router.bias_update, router.bias_rate
        for m in moes:
            m.router.selection_noise = router.selection_noise
        self.max_step = router.bias_max_step
        # the adaptive state [E] per layer, on the bias's device (no host sync per step)
        self.steps = [torch.full_like(m.router.expert_bias, self.rate, dtype=torch.float32) for m in moes]
        self.lasts = [torch.zeros_like(m.router.expert_bias, dtype=torch.float32) for m in moes]

    def update(self) -> None:
        if self.rate <= 0:
            return
        for m, step_E, last_E in zip(self.moes, self.steps, self.lasts, strict=True):
            if self.rule == "adaptive":
                adaptive_bias_step(m.router.expert_bias, m.tokens_per_expert, step_E, last_E,
                                   self.rate * MIN_STEP_FRACTION, self.max_step)
            else:
                update_expert_bias(m.router.expert_bias, m.tokens_per_expert, self.rate, self.rule)

    def state_dict(self) -> dict:
        """The adaptive state: one [E] CPU tensor per layer (a codistilled teacher's layers may have another E)."""
        return {"step": [s.cpu().clone() for s in self.steps], "last": [s.cpu().clone() for s in self.lasts]}

    def load_state_dict(self, state: dict | None) -> None:
        """Restore the adaptive state; a checkpoint from before it existed (None) starts it afresh."""
        if state is None:
            return
        for i, (step_E, last_E) in enumerate(zip(self.steps, self.lasts, strict=True)):
            step_E.copy_(state["step"][i])
            last_E.copy_(state["last"][i])
