"""Data and expert parallelism on `torch.distributed`: process group from the launcher's environment,
device meshes, FSDP2 with expert parallelism, and the two reductions the training loop needs.

`parallelize` applies, in this order (each wraps what the previous one produced):
  1. expert parallelism (`expert_parallel.apply_expert_parallel`): every MoE layer keeps E / ep routed
     experts per rank, on the "ep" dimension of the expert mesh;
  2. activation checkpointing and compile (`apply.py`), per block;
  3. FSDP2 (`fully_shard`): the routed experts over the "efsdp" dimension (the ranks holding the same
     experts), each block's other parameters over all ranks ("dp"), then the root.
World = efsdp x ep. With ep = 1 this is plain FSDP over every rank. Gradients: FSDP averages over its
mesh; an expert's gradient already sums every rank's tokens (the all-to-all backward), so its divide
factor is the whole world, not its efsdp group: every parameter ends with the gradient of the mean loss
over all ranks' tokens, as one device computes it on the whole batch.

Works with gloo on CPU and NCCL on GPU; the model code stays single-device.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from behemoth.model.moe import MoE
from behemoth.parallel.apply import apply_activation_checkpointing, apply_compile
from behemoth.parallel.expert_parallel import ExpertParallelExperts, apply_expert_parallel


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> DistInfo:
    """Join the process group `torchrun` describes (RANK, WORLD_SIZE, LOCAL_RANK; gloo on CPU, NCCL on
    CUDA); a single process without those variables gets world size 1 and no process group."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world, local, dev)


def build_meshes(world: int, ep: int, device_type: str):
    """({"dp": 1-D mesh of every rank}, 2-D expert mesh ("efsdp", "ep")); ep must divide the world."""
    from torch.distributed.device_mesh import init_device_mesh

    if ep < 1 or world % ep:
        raise ValueError(f"parallel.ep={ep}: must divide the number of processes ({world})")
    dp = init_device_mesh(device_type, (world,), mesh_dim_names=("dp",))
    experts = init_device_mesh(device_type, (world // ep, ep), mesh_dim_names=("efsdp", "ep"))
    return dp, experts


def _set_divide_factor(module, factor: float) -> None:
    """FSDP2's gradient divide factor (renamed across torch versions)."""
    for name in ("set_gradient_divide_factor", "set_reduce_scatter_divide_factor"):
        if hasattr(module, name):
            getattr(module, name)(factor)
            return
    raise RuntimeError("this torch's FSDP2 cannot set a gradient divide factor (needs torch >= 2.6)")


def parallelize(model: nn.Module, world: int, ep: int = 1, device_type: str = "cpu",
                activation_checkpointing: bool = False, compile: bool = False) -> nn.Module:
    """Apply expert parallelism, activation checkpointing, compile and FSDP2, in that order (module
    docstring). Every rank must hold the same weights before (same seed or checkpoint). Returns the model."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    dp_mesh, expert_mesh = build_meshes(world, ep, device_type)
    if ep > 1:
        apply_expert_parallel(model, expert_mesh["ep"])
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        apply_compile(model)
    for block in model.layers:
        ff = block.feed_forward
        if isinstance(ff, MoE) and isinstance(ff.experts, ExpertParallelExperts):
            fully_shard(ff.experts, mesh=expert_mesh["efsdp"])
            _set_divide_factor(ff.experts, float(world))
        fully_shard(block, mesh=dp_mesh)
    # the root (embeddings, final norm, head) stays gathered from forward to backward: the training steps call
    # `hidden_states` (registered as an FSDP forward method) and then the head chunk by chunk
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=False)
    register_fsdp_forward_method(model, "hidden_states")
    return model


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """Global gradient norm over every rank's shards, and clipping to `max_norm` (inf: norm only).

    Under `parallelize` each rank holds a distinct part of every parameter (FSDP shards over all ranks,
    experts over ep x efsdp), so the squared norm is the all-reduced sum of the local shards'."""
    grads = [_local(p.grad) for p in params if p.grad is not None]
    sq = torch.stack([g.float().pow(2).sum() for g in grads]).sum() if grads else torch.zeros(())
    if dist.is_initialized():
        dist.all_reduce(sq)
    norm = float(sq.sqrt())
    if math.isfinite(norm) and norm > max_norm:
        coef = max_norm / (norm + 1e-6)
        for g in grads:
            g.mul_(coef)
    return norm


@torch.no_grad()
def all_reduce_counts(moes: list[MoE]) -> None:
    """Sum every MoE layer's routed-token counts over all ranks, so the aux-loss-free bias moves by the
    global load (identically on every rank) rather than by one rank's tokens."""
    if dist.is_initialized() and moes:
        counts = torch.stack([m.tokens_per_expert for m in moes])
        dist.all_reduce(counts)
        for m, c in zip(moes, counts, strict=True):
            m.tokens_per_expert.copy_(c)
