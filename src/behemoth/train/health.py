"""Routing health: per-layer expert load, router entropy, dead experts, bias range, collapse warnings.

The trainer feeds one observation per optimizer step (tokens routed to each expert, mean router
entropy) and asks for a report at a fixed cadence. A layer is flagged when one expert takes more
than `collapse_share` of its tokens, or when an expert has received no token for `dead_windows`
reports in a row: the early signs of the routing collapse that makes MoE training unstable.
"""

from __future__ import annotations

import math

import torch

from behemoth.train.config import HealthSection


class RoutingHealth:
    def __init__(self, layer_ids: list[int], num_experts: int, cfg: HealthSection):
        self.layer_ids, self.num_experts, self.cfg = layer_ids, num_experts, cfg
        self.counts_LE = torch.zeros(len(layer_ids), num_experts, dtype=torch.float64)
        self.entropy_sum_L = torch.zeros(len(layer_ids), dtype=torch.float64)
        self.steps = 0
        self.dead_streak_LE = torch.zeros(len(layer_ids), num_experts, dtype=torch.long)

    def observe(self, counts_LE: torch.Tensor, entropy_L: torch.Tensor) -> None:
        """One optimizer step: counts [L, E] of routed slots, mean normalised router entropy [L]."""
        self.counts_LE += counts_LE.double().cpu()
        self.entropy_sum_L += entropy_L.double().cpu()
        self.steps += 1

    def report(self, step: int, biases_LE: torch.Tensor | None) -> tuple[dict, list[dict]]:
        """Stats over the window since the last report (then reset), and any warning events."""
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
        self.counts_LE.zero_()
        self.entropy_sum_L.zero_()
        self.steps = 0
        return {"type": "routing", "step": step, "layers": layers}, warnings

    def state_dict(self) -> dict:
        return {"counts": self.counts_LE.clone(), "entropy": self.entropy_sum_L.clone(), "steps": self.steps,
                "dead_streak": self.dead_streak_LE.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.counts_LE, self.entropy_sum_L = state["counts"].clone(), state["entropy"].clone()
        self.steps, self.dead_streak_LE = int(state["steps"]), state["dead_streak"].clone()
