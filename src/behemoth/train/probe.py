"""The routing-stability probe: a fixed batch whose router logits are read at every health report.

The batch (`probe_batch`) is the first rows of the validation data in stream order, or, with too little
validation data, the first rows the training loader yields (a fresh loader with the run's seed: the run's
own loader is not touched). It is derived again, identically, on resume and on every rank, so a checkpoint
only keeps the probe's last selection (`RoutingHealth.state_dict`). At most `PROBE_ROWS` rows and, past one
row, `PROBE_TOKENS` tokens: about a micro-batch row's cost per report.

`RouterProbe.router_logits` runs the model's forward on it without gradients and in eval mode, where `MoE`
records nothing: neither `tokens_per_expert` (which drives the bias update) nor `last_router_logits` move,
and no RNG is drawn, so training is bitwise the same with or without the probe. Forward hooks on each
layer's `Router` read its logits. Compiled blocks run eagerly for it (`torch.compiler.set_stance`): a hook
added to a compiled graph is not guaranteed to run, and eager avoids recompiling for eval mode. In a
distributed run every rank runs the same rows (FSDP and expert parallelism have collectives inside the
forward); rank 0 reports.

Shape legend: T probe tokens (rows x seq_len), E experts.
"""

from __future__ import annotations

import torch
from torch import nn

from behemoth.data.loader import Batch
from behemoth.model.moe import MoE
from behemoth.train.datasets import Data, make_loader
from behemoth.train.steps import autocast_context

PROBE_ROWS = 4
PROBE_TOKENS = 4096


def probe_batch(val: Data, train: Data, batch_size: int, seq_len: int, seed: int) -> Batch:
    """The first min(PROBE_ROWS, batch_size, PROBE_TOKENS // seq_len) rows (at least one) of the validation
    data in stream order; the first rows of the training stream when the validation data hold no window."""
    rows = max(1, min(PROBE_ROWS, batch_size, PROBE_TOKENS // seq_len))
    try:
        return next(make_loader(val, rows, seq_len, seed, shuffle=False))
    except ValueError:  # too few validation tokens for one window
        return next(make_loader(train, rows, seq_len, seed, shuffle=True))  # the training loader's first rows


class RouterProbe:
    """A fixed batch (on the training device) and the autocast the steps use; reads every MoE layer's
    router logits on it."""

    def __init__(self, batch: Batch, device: torch.device, autocast: torch.dtype | None = None):
        self.batch, self.autocast = batch.to(device), autocast

    @property
    def num_tokens(self) -> int:
        return self.batch.num_tokens

    @torch.no_grad()
    def router_logits(self, model: nn.Module, moes: list[MoE]) -> list[torch.Tensor]:
        """fp32 router logits [T, E] of each of `moes` (layers of `model`, in order) on the probe batch's
        tokens, padding left out."""
        captured: dict[int, torch.Tensor] = {}

        def hook(i: int):
            def read(module, args, out) -> None:
                captured[i] = out[2].detach()  # Router.forward -> (scores, ids, logits)
            return read

        handles = [m.router.register_forward_hook(hook(i)) for i, m in enumerate(moes)]
        was_training = model.training
        model.eval()
        try:
            with torch.compiler.set_stance("force_eager"), autocast_context(self.batch.input_ids.device,
                                                                            self.autocast):
                model.hidden_states(self.batch.input_ids, **self.batch.model_inputs)
        finally:
            model.train(was_training)
            for h in handles:
                h.remove()
        valid_T = self.batch.positions.reshape(-1) >= 0  # padding (position -1) is not routing that matters
        return [captured[i][valid_T] for i in range(len(moes))]
