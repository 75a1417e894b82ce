"""The training run shared by the 2-process worker and the one-process reference."""

import torch
import torch.distributed as dist

import behemoth
from behemoth.config import PRESETS
from behemoth.data.loader import Batch
from behemoth.parallel.distributed import all_reduce_counts, clip_grad_norm
from behemoth.train.balance import update_expert_bias
from behemoth.train.config import OptimSection, RouterSection
from behemoth.train.optim import build_optimizer
from behemoth.train.steps import PretrainStep, moe_layers

CFG = PRESETS["debug"].replace(moe={"num_experts": 4, "top_k": 2})
ROWS, SEQ = 4, 32


def batch(step: int, rank: int, world: int) -> Batch:
    """This rank's rows of step `step`'s global batch [ROWS, SEQ] (two batches in turn, so it can learn)."""
    ids = torch.randint(3, CFG.vocab_size, (ROWS, SEQ + 1), generator=torch.Generator().manual_seed(step % 2))
    ids = ids[rank * ROWS // world:(rank + 1) * ROWS // world]
    rows = len(ids)
    return Batch(ids[:, :-1], ids[:, 1:], torch.arange(SEQ).expand(rows, SEQ), torch.zeros(rows, SEQ, dtype=torch.long))


def _state(model, opt) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}


def train(steps: int, rank: int, world: int, wrap=lambda m: m, start: int = 0, load: str | None = None,
          save: str | None = None, save_at: int | None = None, save_model: str | None = None) -> list[dict]:
    """Steps start..steps-1; `load`: resume from a distributed checkpoint first; `save`: write one after
    step `save_at` (`torch.distributed.checkpoint`, at whatever world size this run has); `save_model`: the
    model at the end, by `save_sharded_model`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    model = wrap(behemoth.build_model(CFG, seed=0).train())
    step_fn = PretrainStep(model, RouterSection(bias_update="sign", bias_update_rate=0.01))
    opt = build_optimizer([model], OptimSection(lr=3e-3))
    moes = moe_layers(model)
    if load is not None:
        state = _state(model, opt)
        dcp.load(state, checkpoint_id=load)
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, opt, state["optim"])
    out = []
    for s in range(start, steps):
        m = step_fn.forward_backward(batch(s, rank, world), 1.0)
        loss = m["loss"].detach().clone()
        if dist.is_initialized():
            dist.all_reduce(loss)
        norm = clip_grad_norm([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        all_reduce_counts(moes)
        for moe in moes:
            update_expert_bias(moe.router.expert_bias, moe.tokens_per_expert, 0.01, "sign")
            moe.tokens_per_expert.zero_()
        out.append({"loss": float(loss) / world, "grad_norm": float(norm)})
        if save is not None and s + 1 == save_at:
            dcp.save(_state(model, opt), checkpoint_id=save)
    if save_model is not None:
        from behemoth.checkpoint.model_dir import save_sharded_model

        save_sharded_model(model, save_model)
    return out
