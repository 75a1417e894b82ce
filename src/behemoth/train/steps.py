"""Steps: the forward, loss and backward of one micro-batch, one class per training paradigm.

The trainer owns the loop (schedule, clipping, optimizer, logging, checkpoints) and knows nothing
of losses; a step knows nothing of the loop. Distillation adds steps here, not branches there.

A step provides:
  trained_models() -> {"model": module, ...}   what the optimizer updates and checkpoints save
  forward_backward(batch, loss_scale) -> dict   losses as floats, "tokens", "nonfinite", and
                                                "router_entropy" [L] for the MoE layers
  eval_loss(batch) -> (sum of token losses, number of tokens)
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from behemoth.data.loader import Batch
from behemoth.model.moe import MoE
from behemoth.train.config import RouterSection
from behemoth.train.losses import balance_loss, chunked_cross_entropy, router_entropy, router_z_loss


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """bf16 autocast (fp32 master weights) when `dtype` is given, else nothing."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


class PretrainStep:
    """Next-token cross-entropy (mean over tokens) + router z-loss and balance loss.

    The router losses are averaged over MoE layers, so their coefficients do not depend on depth.
    """

    def __init__(self, model: nn.Module, router: RouterSection, autocast_dtype: torch.dtype | None = None):
        self.model, self.router_cfg, self.autocast_dtype = model, router, autocast_dtype
        self.moes = moe_layers(model)

    def trained_models(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def _hidden(self, batch: Batch) -> torch.Tensor:
        device = batch.input_ids.device
        with autocast_context(device, self.autocast_dtype):
            return self.model.hidden_states(batch.input_ids, batch.positions, batch.segment_ids)

    def forward_backward(self, batch: Batch, loss_scale: float) -> dict:
        h_BSD = self._hidden(batch)
        with autocast_context(batch.input_ids.device, self.autocast_dtype):
            ce_sum, n = chunked_cross_entropy(h_BSD.flatten(0, 1), self.model.logits, batch.labels.flatten())
        ce = ce_sum / max(n, 1)
        loss, metrics = ce, {"loss": ce.item(), "tokens": n}
        if self.moes:
            z = torch.stack([router_z_loss(m.last_router_logits) for m in self.moes]).mean()
            bal = torch.stack([balance_loss(m.last_router_logits, m.last_expert_ids) for m in self.moes]).mean()
            loss = loss + self.router_cfg.z_loss_coef * z + self.router_cfg.balance_loss_coef * bal
            with torch.no_grad():
                metrics["router_entropy"] = torch.stack([router_entropy(m.last_router_logits) for m in self.moes])
            metrics.update(z_loss=z.item(), balance_loss=bal.item())
            for m in self.moes:
                m.last_router_logits = m.last_expert_ids = None
        metrics["nonfinite"] = not bool(torch.isfinite(loss))
        if not metrics["nonfinite"]:
            (loss * loss_scale).backward()
        return metrics

    @torch.no_grad()
    def eval_loss(self, batch: Batch) -> tuple[float, int]:
        h_BSD = self._hidden(batch)
        with autocast_context(batch.input_ids.device, self.autocast_dtype):
            ce_sum, n = chunked_cross_entropy(h_BSD.flatten(0, 1), self.model.logits, batch.labels.flatten())
        return ce_sum.item(), n
