"""Data and expert parallelism on `torch.distributed`: process group from the launcher's environment,
device meshes, FSDP2 with expert parallelism, and the two reductions the training loop needs.

`parallelize` applies, in this order (each wraps what the previous one produced):
  1. expert parallelism (`expert_parallel.apply_expert_parallel`): every MoE layer keeps E / ep routed
     experts per rank, on the "ep" dimension of the expert mesh;
  2. activation checkpointing and compile (`apply.py`), per block;
  3. FSDP2 (`fully_shard`): the routed experts over the "efsdp" dimension (the ranks holding the same
     experts), each block's other parameters over all ranks ("dp"), then the root. A bf16 run
     (`compute_dtype`) all-gathers the blocks' parameters in bf16 and reduce-scatters gradients in fp32
     (`mixed_precision`); the fp32 master weights and optimizer state stay sharded. The root (embeddings,
     final norm, head; gathered once per step) keeps fp32, so the residual stream starts in fp32 and the
     numbers are those of one device under autocast.
World = efsdp x ep. With ep = 1 this is plain FSDP over every rank. Gradients: FSDP averages over its
mesh; an expert's gradient already sums every rank's tokens (the all-to-all backward), so its divide
factor is the whole world, not its efsdp group: every parameter ends with the gradient of the mean loss
over all ranks' tokens, as one device computes it on the whole batch.

Works with gloo on CPU and NCCL on GPU; the model code stays single-device.
"""

from __future__ import annotations

import datetime
import math
import os
import warnings
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


def setup_distributed(device: str = "auto", timeout_s: float = 300.0) -> DistInfo:
    """Join the process group `torchrun` describes (RANK, WORLD_SIZE, LOCAL_RANK; gloo on CPU, NCCL for
    CUDA tensors on GPUs); a single process without those variables gets world size 1 and no process group.
    `timeout_s`: how long a collective waits for the other ranks before it fails (`set_timeout` changes it)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        # on GPUs NCCL for CUDA tensors and gloo for the few CPU ones (the trainer's scalar agreements)
        dist.init_process_group("cpu:gloo,cuda:nccl" if dev.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank, world, local, dev)


def set_timeout(seconds: float) -> bool:
    """Give every process group of this run (the world's and the meshes') a new collective timeout; False where this
    torch cannot change it after the group is made (the start-up timeout then stays)."""
    from torch.distributed import distributed_c10d as c10d

    if not dist.is_initialized() or not hasattr(c10d, "_set_pg_timeout"):
        return False
    timeout = datetime.timedelta(seconds=seconds)
    try:
        for group in list(getattr(c10d._world, "pg_names", {})) or [c10d._get_default_group()]:
            c10d._set_pg_timeout(timeout, group)
    except (RuntimeError, AttributeError, TypeError, ValueError):
        return False
    return True


def is_peer_failure(e: BaseException) -> bool:
    """Whether an exception raised in a collective means another rank is gone or stuck (its connection closed or
    reset, or the collective timed out), rather than a fault of this rank's own."""
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(s in text for s in (
        "Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out", "timed out",
        "Timeout", "NCCL communicator was aborted", "ProcessGroupNCCL", "Gloo"))


def check_degrees(world: int, ep: int, dp_shard: int = -1) -> None:
    """`ValueError` naming the setting when `ep` or `dp_shard` (-1: every rank) does not divide `world`."""
    if ep < 1 or world % ep:
        raise ValueError(f"parallel.ep={ep}: must divide the number of processes ({world})")
    if dp_shard != -1 and (dp_shard < 1 or world % dp_shard):
        raise ValueError(f"parallel.dp_shard={dp_shard}: must be -1 or divide the number of processes ({world})")


def build_meshes(world: int, ep: int, device_type: str, dp_shard: int = -1):
    """(data-parallel mesh, 2-D expert mesh ("efsdp", "ep")); ep and dp_shard must divide the world.

    The data-parallel mesh is 1-D ("dp", every rank: FSDP), or with 0 < dp_shard < world 2-D
    ("dp_replicate", "dp_shard"): HSDP, each parameter sharded over dp_shard ranks and replicated
    world / dp_shard times."""
    from torch.distributed.device_mesh import init_device_mesh

    check_degrees(world, ep, dp_shard)
    if dp_shard == -1 or dp_shard == world:
        dp = init_device_mesh(device_type, (world,), mesh_dim_names=("dp",))
    else:
        dp = init_device_mesh(device_type, (world // dp_shard, dp_shard), mesh_dim_names=("dp_replicate", "dp_shard"))
    experts = init_device_mesh(device_type, (world // ep, ep), mesh_dim_names=("efsdp", "ep"))
    return dp, experts


def _set_divide_factor(module, factor: float) -> None:
    """FSDP2's gradient divide factor (renamed across torch versions)."""
    for name in ("set_gradient_divide_factor", "set_reduce_scatter_divide_factor"):
        if hasattr(module, name):
            getattr(module, name)(factor)
            return
    raise RuntimeError("this torch's FSDP2 cannot set a gradient divide factor (needs torch >= 2.6)")


def mixed_precision(compute_dtype: torch.dtype | None):
    """FSDP2's policy for a run computing in `compute_dtype` (the autocast dtype; None: fp32, no policy): parameters
    all-gathered in that dtype, gradients reduced in fp32, and the forward's inputs left as they come, so the
    residual stream stays fp32 as under autocast on one device."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if compute_dtype is None or compute_dtype == torch.float32:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)


def parallelize(model: nn.Module, world: int, ep: int = 1, device_type: str = "cpu",
                activation_checkpointing: bool = False, compile: bool = False, dp_shard: int = -1,
                compute_dtype: torch.dtype | None = None) -> nn.Module:
    """Apply expert parallelism, activation checkpointing, compile and FSDP2, in that order (module
    docstring); `dp_shard` as in `build_meshes`; `compute_dtype` the run's autocast dtype (bf16: parameters
    gathered in bf16, gradients reduced in fp32). Every rank must hold the same weights before (same seed or
    checkpoint). Returns the model."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    dp_mesh, expert_mesh = build_meshes(world, ep, device_type, dp_shard)
    mp = mixed_precision(compute_dtype)
    if ep > 1:
        apply_expert_parallel(model, expert_mesh["ep"])
        # the all-to-all's result is a view; `MoE` only reads it (index_copy_ into a new tensor), so FSDP's
        # caution about in-place ops on a wrapped module's view output does not apply
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPExpertParallelExperts\) returned a view")
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        apply_compile(model, device_type, compute_dtype or torch.float32)
    for block in model.layers:
        ff = block.feed_forward
        if isinstance(ff, MoE) and isinstance(ff.experts, ExpertParallelExperts):
            fully_shard(ff.experts, mesh=expert_mesh["efsdp"], mp_policy=mp)
            _set_divide_factor(ff.experts, float(world))
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=world > 1, mp_policy=mp)
    # the root (embeddings, final norm, head) stays gathered from forward to backward: the training steps call
    # `hidden_states` (registered as an FSDP forward method) and then the head chunk by chunk; in fp32 (docstring)
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=False)
    register_fsdp_forward_method(model, "hidden_states")
    return model


def shard_model(model: nn.Module, world: int, ep: int = 1, device: torch.device | str = "cpu",
                activation_checkpointing: bool = False, compile: bool = False, dp_shard: int = -1,
                from_rank0: bool = True, compute_dtype: torch.dtype | None = None) -> nn.Module:
    """`model` parallelized (as `parallelize`) without any rank holding it whole on `device`. Every rank
    builds a meta-device copy from `model.config`, parallelizes it and allocates only its own shards on
    `device`; then, with `from_rank0`, rank 0 sends each tensor of `model` (whole, in CPU memory, on rank 0
    only; the other ranks pass a meta-device shell) and every rank keeps its part. Without it the shards
    are left for the caller to fill (every rank reading its own from a sharded checkpoint:
    `checkpoint.dcp.load_sharded_state`), and `model` may be a shell everywhere. Returns the new model (in
    `model`'s train/eval mode)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from behemoth.model import Transformer

    device = torch.device(device)
    whole = model.state_dict() if from_rank0 and dist.get_rank() == 0 else {}
    with torch.device("meta"):
        out = Transformer(model.config)
    out.train(model.training)
    parallelize(out, world, ep, device.type, activation_checkpointing, compile, dp_shard, compute_dtype)
    out.to_empty(device=device)
    for m in out.modules():
        if isinstance(m, MoE):
            m.tokens_per_expert.zero_()  # not in any state dict
    if from_rank0:
        set_model_state_dict(out, whole, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return out


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def world_size() -> int:
    """The number of processes in the run (1 without a process group)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def _replicas(t: torch.Tensor) -> int:
    """How many ranks hold the same local part of `t`: a DTensor's replicated mesh dimensions (HSDP's
    replicate dimension); a plain tensor is whole on every rank."""
    if hasattr(t, "placements"):
        return math.prod(t.device_mesh.size(i) for i, p in enumerate(t.placements) if p.is_replicate())
    return dist.get_world_size() if dist.is_initialized() else 1


@torch.no_grad()
def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Global gradient norm over every rank's shards (a 0-dim tensor on the gradients' device, no host sync), and
    clipping to `max_norm` (inf: norm only).

    Under `parallelize` each rank holds a part of every parameter (FSDP shards, experts over ep x efsdp),
    so the squared norm is the all-reduced sum of the local parts', each divided by the number of ranks
    that hold the same part (1, or HSDP's replicas). Per-tensor fp32 sums of squares are exact to float
    rounding; one-process training keeps torch's `clip_grad_norm_`, whose CPU norm kernel rounds
    differently, so on the CPU the grad norms of one and several processes agree to ~1e-4 relative. The
    clipping factor min(1, max_norm / norm) is applied on the device; a non-finite norm makes the gradients
    non-finite, and the trainer skips that step."""
    grads = [p.grad for p in params if p.grad is not None]
    parts = [_local(g).float().pow(2).sum() / _replicas(g) for g in grads]
    sq = torch.stack(parts).sum() if parts else torch.zeros(())
    grads = [_local(g) for g in grads]
    if dist.is_initialized():
        dist.all_reduce(sq)
    norm = sq.sqrt()
    if math.isfinite(max_norm):
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
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


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any (e.g. a non-finite loss: all ranks must skip the step
    together, or their weights would part); `flag` itself without a process group."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([float(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def mean_over_ranks(count: int) -> float:
    """The mean of `count` over all ranks (`count` itself without a process group). Dividing a loss summed
    over a rank's tokens by it makes the ranks' average (what data-parallel gradient reduction takes) the
    loss over the whole batch's tokens, however the tokens fall on the ranks (image-text rows label
    different numbers of them); with equal counts it is each rank's own mean."""
    if not dist.is_initialized():
        return count
    t = torch.tensor([float(count)], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def all_reduce_metrics(metrics: dict, entropy: torch.Tensor | None) -> tuple[dict, torch.Tensor | None]:
    """One optimizer step's metrics over all ranks: "tokens" summed, every other float averaged (each rank's
    losses are its token sums over the ranks' mean count, `mean_over_ranks`, so their average is the whole
    batch's mean), the per-layer router entropy averaged. Unchanged without a process group."""
    if not dist.is_initialized():
        return metrics, entropy
    keys = [k for k, v in metrics.items() if isinstance(v, float)]
    world = dist.get_world_size()
    parts = [torch.tensor([float(metrics[k]) for k in keys] + [float(metrics["tokens"])], dtype=torch.float64)]
    if entropy is not None:
        parts.append(entropy.detach().double().cpu().flatten())
    flat = torch.cat(parts)
    dist.all_reduce(flat)
    out = {**metrics, **{k: float(flat[i]) / world for i, k in enumerate(keys)}, "tokens": int(flat[len(keys)])}
    if entropy is not None:
        entropy = (flat[len(keys) + 1:] / world).to(entropy.dtype).view(entropy.shape)
    return out, entropy


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sums over all ranks (e.g. a validation loss's sum and token count)."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


class ShardedBatches:
    """This rank's rows of every batch of a loader that every rank draws in the same order: rows
    [rank * B/world, (rank + 1) * B/world) of each global batch of B rows (`next_rows`: only those rows are
    read, and only their images decoded). The loader's state is the same on every rank and the same as one
    process drawing the whole batch, so a checkpoint resumes at any world size."""

    def __init__(self, loader, rank: int, world: int):
        B = loader.batch_size
        if B % world:
            raise ValueError(f"train.batch_size={B}: must be divisible by the number of processes ({world}); "
                             "it is the global batch, split evenly over the ranks")
        self.loader, self.start, self.stop = loader, rank * B // world, (rank + 1) * B // world

    def __iter__(self):
        return self

    def __next__(self):
        return self.loader.next_rows(self.start, self.stop)

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)


def broadcast_from_rank0(obj):
    """Rank 0's `obj` on every rank (any picklable value; the others pass None). A rank waits here until
    rank 0 arrives, which makes it a gate: rank 0 prepares (data, checks), then releases the others."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def teardown() -> None:
    """Leave the process group (after a barrier, so no rank is still in a collective)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def shard_foreign(teacher: nn.Module, world: int, device: torch.device | str = "cpu", dp_shard: int = -1) -> nn.Module:
    """A frozen transformers teacher (`checkpoint.foreign.ForeignTeacher`) sharded with FSDP2 over the ranks, one
    unit per decoder layer plus the root (embeddings, final norm, head), without any rank holding it whole on
    `device`: every rank builds a meta-device copy, allocates its shards, and rank 0 (which holds the loaded
    teacher in CPU memory; the others pass a meta shell) sends each tensor. Buffers outside the state dict (rotary
    frequencies) are sent too. Forward only: the layers reshard after their forward; `hidden_states`,
    `hidden_rows` run through FSDP's hooks; the root stays gathered for the head applied chunk by chunk."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    from behemoth.checkpoint.foreign import meta_copy

    device = torch.device(device)
    rank0 = dist.get_rank() == 0
    whole = teacher.state_dict() if rank0 else {}
    buffers = dict(teacher.named_buffers()) if rank0 else {}
    out = meta_copy(teacher)
    dp_mesh, _ = build_meshes(world, 1, device.type, dp_shard)
    for layer in out.layers:
        fully_shard(layer, mesh=dp_mesh, reshard_after_forward=True)
    fully_shard(out, mesh=dp_mesh, reshard_after_forward=False)
    for method in ("hidden_states", "hidden_rows"):
        register_fsdp_forward_method(out, method)
    out.to_empty(device=device)
    set_model_state_dict(out, whole, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for name, buf in out.named_buffers():
        if rank0:
            buf.copy_(buffers[name])
        dist.broadcast(buf, src=0)
    for m in out.modules():  # transformers 4.x keeps a copy of the RoPE frequencies as a plain attribute
        if isinstance(getattr(m, "original_inv_freq", None), torch.Tensor) and m.original_inv_freq.is_meta:
            m.original_inv_freq = m.inv_freq.clone()
    return out.eval().requires_grad_(False)
