"""Routing health: per-layer expert load, router entropy, dead experts, bias range, routing stability;
collapse, dead-expert and instability warnings.

The trainer feeds one observation per optimizer step (tokens routed to each expert, mean router
entropy) and asks for a report at a fixed cadence. A layer is flagged when one expert takes more
than `collapse_share` of its tokens, or when an expert has received no token for `dead_windows`
reports in a row: the early signs of the routing collapse that makes MoE training unstable.

Balance is not stability: a layer can spread its tokens evenly while the expert each token goes to keeps
changing, and every change hands an expert tokens it was not trained on. Stability is measured on a fixed
probe batch (`train/probe.py`) whose router logits are read afresh at every report:

  flip_rate     the share of the probe's routed slots (token, expert) whose expert is no longer among the
                token's top-k since the previous report: 1 - sum_t |S_t & S'_t| / (T K), S_t the token's
                set of k experts now, S'_t at the previous report. Top-1 routing (every Llama 4 model): the
                share of tokens whose expert changed. The order within the k is ignored (the set decides
                which experts compute a token). None at the first report, or when the probe changed shape.
  margin        mean over tokens of s_(K) - s_(K+1), s = router logit + expert bias (the biased scores
                that decide the selection) sorted per token: the last chosen expert's score minus the best
                unchosen one's; top-1: the chosen expert's minus the runner-up's. How far a token is from
                changing expert; a bias step larger than it can move the token. None when E <= K.
  logit_margin  the same on the unbiased router logits: the router's own preference, without the bias.

A layer is flagged `routing_unstable` when its flip rate stays at or above `flip_rate_warn` times the flip rate
of a random reassignment, 1 - K/E (0.75 with 4 experts, 0.94 with 16, 0.97 with 32), for `unstable_windows`
reports in a row in the second half of the run (`LATE_FRACTION`): while the learning rate is high a router
legitimately reorganises, and its flip rate falls as training settles; one that stays near random late is
unstable. The flip rate is per window, so it grows with `log.health_every`; relative to random, one
threshold serves any number of experts. The default 0.6 separates what was measured in the demo's runs
(windows of a sixth of the run): routers that learn while balanced move 0.80 of their slots per window
early, 0.40-0.60 by two thirds of the run and 0.20-0.25 at its end (32 experts: 0.41-0.62 and 0.21-0.26
of random), while a bias rule oscillating from step to step stays at 0.85-0.93 to the end (0.88-0.96 of
random); on the debug model (4 experts, windows of 20-50 steps) healthy runs stay at or below ~0.23 after
the first 20% (0.31 of random) and runs at 10x the learning rate at 0.30-0.53 (up to 0.71 of random).

Shape legend: L MoE layers, E experts, K experts per token, T probe tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from behemoth.train.config import HealthSection

EARLY_FRACTION = 0.2  # warnings after this share of the run's steps are the late ones (`final_routing`)
LATE_FRACTION = 0.5  # reports before this share of the run's steps never count toward `routing_unstable`


def flip_rate(prev_TK: torch.Tensor, now_TK: torch.Tensor) -> float:
    """Share of routed slots whose expert left the token's set: 1 - sum_t |S'_t & S_t| / (T K)."""
    kept_T = (prev_TK[:, :, None] == now_TK[:, None, :]).any(-1).sum(-1)  # top-k ids are distinct per token
    return 1.0 - float(kept_T.sum()) / max(prev_TK.numel(), 1)


def selection_margin(scores_TE: torch.Tensor, k: int) -> float | None:
    """Mean over tokens of the k-th best score minus the (k+1)-th: the gap at the top-k boundary; None if E <= k."""
    if scores_TE.shape[-1] <= k:
        return None
    top_TK1 = torch.topk(scores_TE.float(), k + 1, dim=-1).values
    return float((top_TK1[:, k - 1] - top_TK1[:, k]).mean())


def stability_means(layers: list[dict]) -> tuple[float | None, float | None]:
    """(flip rate, margin) of a routing record's layers, each the mean over the layers that have one (None
    where none has: the first report, no probe, or E <= K)."""
    def mean(key: str) -> float | None:
        values = [r[key] for r in layers if r.get(key) is not None]
        return sum(values) / len(values) if values else None
    return mean("flip_rate"), mean("margin")


def final_routing(records: list[dict], steps: int) -> dict | None:
    """A run's routing at its end, from its metrics records: dead experts (summed over layers) and the worst
    layer's max/mean load over the last full health window (`worst_max_over_mean`: of each step's load, averaged
    over the window's steps, which a load that swings from step to step cannot hide; `worst_window_max_over_mean`:
    of the window's summed load), the mean router entropy, flip rate and margin over layers, and the warnings
    raised after the first `EARLY_FRACTION` of the `steps` (`late_warnings`, by event). None for a run without
    MoE layers."""
    routing = [r for r in records if r.get("type") == "routing"]
    if not routing:
        return None
    end = _last_full_window(routing)
    layers = end["layers"]
    flip, margin = stability_means(layers)
    late: dict[str, int] = {}
    for r in records:
        if r.get("type") == "warning" and r["step"] > EARLY_FRACTION * steps:
            late[r["event"]] = late.get(r["event"], 0) + 1
    return {"step": end["step"], "dead": sum(x["dead"] for x in layers),
            "worst_max_over_mean": max(x.get("step_max_over_mean", x["max_over_mean"]) for x in layers),
            "worst_window_max_over_mean": max(x["max_over_mean"] for x in layers),
            "router_entropy": sum(x["router_entropy"] for x in layers) / len(layers),
            "flip_rate": flip, "margin": margin, "late_warnings": late}


def _last_full_window(routing: list[dict]) -> dict:
    """The last routing record, or the one before it when the last closes a stub window (a run whose length
    is not a multiple of `log.health_every` reports again at its end, over the few steps left): figures over
    two steps are noise, not the state of the routing."""
    if len(routing) < 2:
        return routing[-1]
    last = routing[-1]["step"] - routing[-2]["step"]
    before = routing[-2]["step"] - (routing[-3]["step"] if len(routing) > 2 else 0)
    return routing[-2] if last < before / 2 else routing[-1]


class RoutingHealth:
    def __init__(self, layer_ids: list[int], num_experts: int, cfg: HealthSection, top_k: int = 1,
                 total_steps: int | None = None):
        """`total_steps`: the run's length, for `LATE_FRACTION` (None: every report counts)."""
        self.layer_ids, self.num_experts, self.cfg = layer_ids, num_experts, cfg
        self.top_k, self.total_steps = top_k, total_steps
        self.flip_threshold = cfg.flip_rate_warn * (1 - top_k / num_experts)  # a share of random reassignment's
        self.counts_LE = torch.zeros(len(layer_ids), num_experts, dtype=torch.float64)
        self.entropy_sum_L = torch.zeros(len(layer_ids), dtype=torch.float64)
        self.step_load_sum_L = torch.zeros(len(layer_ids), dtype=torch.float64)  # sum over steps of max/mean
        self.load_steps_L = torch.zeros(len(layer_ids), dtype=torch.float64)  # and how many steps it sums
        self.steps = 0
        self.dead_streak_LE = torch.zeros(len(layer_ids), num_experts, dtype=torch.long)
        self.prev_ids_LTK: torch.Tensor | None = None  # the probe's selection at the last report, int16
        self.unstable_streak_L = torch.zeros(len(layer_ids), dtype=torch.long)

    def observe(self, counts_LE: torch.Tensor, entropy_L: torch.Tensor) -> None:
        """One optimizer step: counts [L, E] of routed slots, mean normalised router entropy [L]."""
        counts_LE = counts_LE.double().cpu()
        self.counts_LE += counts_LE
        self.entropy_sum_L += entropy_L.double().cpu()
        mean_L = counts_LE.mean(-1)
        self.step_load_sum_L += torch.where(mean_L > 0, counts_LE.max(-1).values / mean_L.clamp_min(1e-12), 0.0)
        self.load_steps_L += (mean_L > 0).double()  # steps that routed something, per layer
        self.steps += 1

    def report(self, step: int, biases_LE: torch.Tensor | None,
               probe_logits: Sequence[torch.Tensor] | None = None) -> tuple[dict, list[dict]]:
        """Stats over the window since the last report (then reset), and any warning events.

        probe_logits: the probe batch's router logits, one [T, E] per layer (`train/probe.py`); with them each
        layer's record gets `flip_rate`, `margin` and `logit_margin` (see the module docstring).
        """
        layers, warnings = [], []
        dead_now = self.counts_LE == 0
        self.dead_streak_LE = torch.where(dead_now, self.dead_streak_LE + 1, torch.zeros_like(self.dead_streak_LE))
        for i, layer in enumerate(self.layer_ids):
            c = self.counts_LE[i]
            total = float(c.sum())
            share = c / total if total else torch.zeros_like(c)
            nz = share[share > 0]
            rec = {
                "layer": layer, "tokens": [int(x) for x in c.tolist()],
                "max_over_mean": float(c.max() / c.mean()) if total else 0.0,
                "step_max_over_mean": float(self.step_load_sum_L[i] / self.load_steps_L[i].clamp_min(1)),
                "max_share": float(share.max()),
                "router_entropy": float(self.entropy_sum_L[i] / max(1, self.steps)),
                "load_entropy": float(-(nz * nz.log()).sum() / math.log(self.num_experts)) if self.num_experts > 1
                else 1.0,
                "dead": int(dead_now[i].sum()),
            }
            if biases_LE is not None:
                rec["bias_min"], rec["bias_max"] = float(biases_LE[i].min()), float(biases_LE[i].max())
            layers.append(rec)
            if total and self.num_experts > 1 and rec["max_share"] > self.cfg.collapse_share:
                e = int(share.argmax())
                warnings.append({"type": "warning", "event": "routing_collapse", "step": step, "layer": layer,
                                 "message": f"layer {layer}: expert {e} takes {rec['max_share']:.0%} of the tokens "
                                            f"(threshold {self.cfg.collapse_share:.0%})"})
            persistent = (self.dead_streak_LE[i] >= self.cfg.dead_windows).nonzero().flatten().tolist()
            if total and persistent:
                warnings.append({"type": "warning", "event": "dead_experts", "step": step, "layer": layer,
                                 "experts": persistent,
                                 "message": f"layer {layer}: experts {persistent} got no tokens for "
                                            f"{self.cfg.dead_windows}+ health windows"})
        if probe_logits is not None:
            for rec, stability in zip(layers, self._stability(probe_logits, biases_LE), strict=True):
                rec.update(stability)
            warnings += self._unstable(step, layers)
        self.counts_LE.zero_()
        self.entropy_sum_L.zero_()
        self.step_load_sum_L.zero_()
        self.load_steps_L.zero_()
        self.steps = 0
        return {"type": "routing", "step": step, "layers": layers}, warnings

    def _stability(self, probe_logits: Sequence[torch.Tensor], biases_LE: torch.Tensor | None) -> list[dict]:
        """Per layer: flip rate since the last report, biased and unbiased margins; keeps this selection."""
        out, ids = [], []
        for i, logits_TE in enumerate(probe_logits):
            bias_E = biases_LE[i] if biases_LE is not None else torch.zeros(logits_TE.shape[-1])
            scores_TE = logits_TE.float() + bias_E.to(logits_TE.device).float()  # what selects, as in `Router`
            ids_TK = torch.topk(scores_TE, self.top_k, dim=-1).indices.cpu()
            ids.append(ids_TK.to(torch.int16 if self.num_experts < 2**15 else torch.int32))
            prev = self.prev_ids_LTK
            same_probe = prev is not None and tuple(prev.shape[1:]) == tuple(ids_TK.shape)
            out.append({"flip_rate": flip_rate(prev[i].long(), ids_TK) if same_probe else None,
                        "margin": selection_margin(scores_TE, self.top_k),
                        "logit_margin": selection_margin(logits_TE, self.top_k)})
        self.prev_ids_LTK = torch.stack(ids) if ids else None
        return out

    def _unstable(self, step: int, layers: list[dict]) -> list[dict]:
        """`routing_unstable` for each layer whose flip rate has been at or above `flip_rate_warn` for
        `unstable_windows` reports in a row (reports in the first LATE_FRACTION of the run do not count)."""
        late = self.total_steps is None or step > LATE_FRACTION * self.total_steps
        warnings = []
        for i, rec in enumerate(layers):
            high = (late and rec["flip_rate"] is not None and self.top_k < self.num_experts  # else nothing flips
                    and rec["flip_rate"] >= self.flip_threshold)
            self.unstable_streak_L[i] = self.unstable_streak_L[i] + 1 if high else 0
            if int(self.unstable_streak_L[i]) >= self.cfg.unstable_windows:
                margin = "n/a" if rec["margin"] is None else f"{rec['margin']:.3g}"
                warnings.append({"type": "warning", "event": "routing_unstable", "step": step, "layer": rec["layer"],
                                 "flip_rate": rec["flip_rate"],
                                 "message": f"layer {rec['layer']}: {rec['flip_rate']:.0%} of the probe's routed slots "
                                            f"changed expert since the last health window (threshold "
                                            f"{self.flip_threshold:.0%}, {self.cfg.flip_rate_warn:.0%} of a random "
                                            f"reassignment's, {self.cfg.unstable_windows}+ windows in a row); mean "
                                            f"selection margin {margin}"})
        return warnings

    def state_dict(self) -> dict:
        return {"counts": self.counts_LE.clone(), "entropy": self.entropy_sum_L.clone(), "steps": self.steps,
                "step_load": self.step_load_sum_L.clone(), "load_steps": self.load_steps_L.clone(),
                "dead_streak": self.dead_streak_LE.clone(),
                "probe_ids": None if self.prev_ids_LTK is None else self.prev_ids_LTK.clone(),
                "unstable_streak": self.unstable_streak_L.clone()}

    def load_state_dict(self, state: dict) -> None:
        """A state from `state_dict`; one written before stability was measured starts it afresh."""
        self.counts_LE, self.entropy_sum_L = state["counts"].clone(), state["entropy"].clone()
        self.steps, self.dead_streak_LE = int(state["steps"]), state["dead_streak"].clone()
        zeros = torch.zeros(len(self.layer_ids), dtype=torch.float64)  # a state from before the per-step load
        self.step_load_sum_L = state.get("step_load", zeros).clone()
        self.load_steps_L = state.get("load_steps", zeros).clone()
        ids = state.get("probe_ids")
        self.prev_ids_LTK = None if ids is None else ids.clone()
        streak = state.get("unstable_streak")
        self.unstable_streak_L = (torch.zeros(len(self.layer_ids), dtype=torch.long) if streak is None
                                  else streak.clone())
