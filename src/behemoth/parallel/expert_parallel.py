"""Expert parallelism: each rank of an EP group holds E / ep of every MoE layer's routed experts, and the
routed slots travel to the rank that holds their expert and back with all-to-all.

Applied from outside the model (`apply_expert_parallel`): each `MoE.experts` is replaced by an
`ExpertParallelExperts` whose `w13` [E, D, 2F] and `w2` [E, F, D] are DTensors sharded on dim 0 over the
"ep" device mesh: this rank stores and computes with its consecutive E/ep experts, while names and global
shapes stay those of one device, so `torch.distributed.checkpoint` can save at one world size and load at
another. The router, the shared expert and everything else stay whole on every rank (data parallel).
One MoE forward, for ep ranks holding E_l = E / ep experts each:

  1. the layer has routed its T tokens and sorted the M = T*K slots by global expert id: x [M, D] and
     counts [E] (as on one device);
  2. counts first: an all-to-all of counts viewed [ep, E_l] tells each rank how many slots every source
     sends to each of its experts (one host sync, for the split sizes);
  3. tokens: an all-to-all with input splits = slots per destination rank and output splits = slots per
     source rank; what arrives is ordered by source, then by local expert;
  4. a stable sort makes it local-expert-major, the local experts run (`GroupedExperts.forward` or the
     loop reference), and the inverse permutation restores the arrival order;
  5. the reverse all-to-all returns every result to the rank its token came from, in the layer's sorted
     order; the layer then un-sorts and combines exactly as on one device.

An expert that receives no slot on a rank is normal (an empty slice). Gradients flow back through both
all-to-alls (`all_to_all_single_autograd`), so an expert's gradient holds the contributions of every
rank's tokens; the replicated parameters' gradients are per-rank partial sums that data-parallel
reduction (FSDP) adds up. The routing counts a rank accumulates (`MoE.tokens_per_expert`) are its own
tokens' routing over all E experts; the trainer all-reduces them before the bias update.

Shape legend: M routed slots on this rank, R slots received, D model dim, E experts, E_l local experts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from behemoth.model.moe import GroupedExperts, MoE


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Differentiable all-to-all of rows (the functional collective; `torch.distributed.nn`'s on old torch)."""
    try:
        from torch.distributed._functional_collectives import all_to_all_single_autograd
    except ImportError:  # pragma: no cover - torch without the functional autograd collective
        from torch.distributed.nn.functional import all_to_all_single

        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        return all_to_all_single(out, x, out_splits, in_splits, group=group)
    y = all_to_all_single_autograd(x.contiguous(), out_splits, in_splits, group)
    return y.wait() if hasattr(y, "wait") else y


class ExpertParallelExperts(GroupedExperts):
    """This rank's slice of a `GroupedExperts` plus the all-to-all dispatch around it (module docstring).

    `forward(x [M, D] sorted by expert, counts [E] over all experts) -> [M, D]`, the `GroupedExperts`
    contract, so `MoE` runs unchanged.
    """

    direct_ok = False  # the weights hold E_l experts: `MoE._forward_few` must not index them by global id

    def __init__(self, experts: GroupedExperts, mesh):
        nn.Module.__init__(self)
        self.group = mesh.get_group()
        self.ep, self.ep_rank = mesh.size(), mesh.get_local_rank()
        E = experts.w13.shape[0]
        if E % self.ep:
            raise ValueError(f"{E} experts cannot be split evenly over {self.ep} expert-parallel ranks")
        self.num_experts, self.local_experts = E, E // self.ep
        self.hidden_dim, self.grouped = experts.hidden_dim, experts.grouped
        lo, hi = self.ep_rank * self.local_experts, (self.ep_rank + 1) * self.local_experts
        for name in ("w13", "w2"):
            full = getattr(experts, name)  # the same on every rank (or a meta-device shell): keep this rank's part
            local = DTensor.from_local(full.detach()[lo:hi].clone(), mesh, [Shard(0)], run_check=False)
            setattr(self, name, nn.Parameter(local, requires_grad=full.requires_grad))

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's experts as plain tensors [E/ep, ...] (differentiable into the DTensor parameters)."""
        return tuple(w.to_local() if isinstance(w, DTensor) else w for w in (self.w13, self.w2))

    def forward(self, x_MD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        return self._dispatch(x_MD, counts_E, loop=False)

    def forward_loop(self, x_MD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        return self._dispatch(x_MD, counts_E, loop=True)

    def _local(self, x_RD: torch.Tensor, counts: torch.Tensor, loop: bool) -> torch.Tensor:
        """The local experts on slots sorted by local expert (the kernel chosen as `GroupedExperts` does)."""
        grouped = not loop and (self.use_grouped_mm(x_RD) if self.grouped is None else self.grouped)
        kernel = GroupedExperts.forward_grouped if grouped else GroupedExperts.forward_loop
        return kernel(self, x_RD, counts)

    def _dispatch(self, x_MD: torch.Tensor, counts_E: torch.Tensor, loop: bool) -> torch.Tensor:
        ep, El = self.ep, self.local_experts
        send_counts = counts_E.to(torch.int64).view(ep, El)  # [destination rank, its local expert]
        recv_counts = torch.empty_like(send_counts)  # [source rank, my local expert]
        dist.all_to_all_single(recv_counts, send_counts.contiguous(), group=self.group)
        # the split sizes the all-to-all needs on the host, in one transfer
        host = torch.cat([send_counts.sum(1), recv_counts.flatten()]).tolist()
        in_splits, recv = host[:ep], host[ep:]
        out_splits = [sum(recv[r * El:(r + 1) * El]) for r in range(ep)]
        x_RD = _all_to_all(x_MD, out_splits, in_splits, self.group)
        # arrival order is (source, local expert); make it (local expert, source) for the local experts
        chunk_R = torch.repeat_interleave(torch.arange(ep * El, device=x_MD.device),
                                          recv_counts.flatten().to(x_MD.device), output_size=sum(out_splits))
        order_R = torch.argsort((chunk_R % El) * ep + chunk_R // El, stable=True)
        y_RD = self._local(x_RD[order_R], recv_counts.sum(0).to(counts_E.device), loop)
        if y_RD.shape[0] == 0:
            # nothing arrived: stay on x's graph, so that this rank joins the backward all-to-all, and on the
            # weights' (zero gradients rather than none, so data-parallel reduction sees the same tensors)
            w13, w2 = self.weights()
            y_RD = x_RD * 0 + (w13.sum() + w2.sum()) * 0
        y_RD = torch.empty_like(y_RD).index_copy_(0, order_R, y_RD)
        return _all_to_all(y_RD, in_splits, out_splits, self.group)


def apply_expert_parallel(model: nn.Module, mesh=None) -> nn.Module:
    """Shard the routed experts of every MoE layer of `model` over the 1-D device mesh `mesh` (default: every
    rank, on the CPU or the current CUDA device).

    Every rank must hold the same full weights before (same seed or the same checkpoint); afterwards each
    keeps its slice. Returns the model."""
    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        device = "cuda" if next(model.parameters()).is_cuda else "cpu"
        mesh = init_device_mesh(device, (dist.get_world_size(),), mesh_dim_names=("ep",))
    for m in model.modules():
        if isinstance(m, MoE) and not isinstance(m.experts, ExpertParallelExperts):
            m.experts = ExpertParallelExperts(m.experts, mesh)
    return model
